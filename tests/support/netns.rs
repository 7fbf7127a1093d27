//! Network namespaces made by a test: a router namespace joining hosts, each on its own link
//! with documentation-range addresses. Names are unique per process and call; everything is
//! deleted on drop (processes inside are the caller's to stop first).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A set of namespaces joined by a router namespace.
pub struct Topology {
    id: String,
    namespaces: Vec<String>,
}

impl Topology {
    /// An empty topology: just the router. Needs root.
    pub fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespace tests need root; tests/run.sh runs them as root in CI"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}{:x}", std::process::id() % 0xffff, n);
        let mut t = Self {
            id,
            namespaces: Vec::new(),
        };
        let router = t.ns("r");
        ip(&["netns", "add", &router]);
        t.namespaces.push(router.clone());
        ip(&["-n", &router, "link", "set", "lo", "up"]);
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &router, "sysctl", "-qw", key])
                .status()
                .expect("sysctl");
            assert!(ok.success(), "sysctl {key}");
        }
        t
    }

    /// The namespace name of `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("veil{}{role}", self.id)
    }

    /// The interface name of `role` inside its namespace.
    pub fn iface(&self, role: &str) -> String {
        format!("v{}{role}", self.id)
    }

    /// Adds host `role` at `addr` (CIDR) on its own link to the router, which takes `gateway`
    /// (CIDR) on that link; the host routes everything through it.
    pub fn host(&mut self, role: &str, addr: &str, gateway: &str) -> &mut Self {
        let ns = self.ns(role);
        let router = self.ns("r");
        let inner = self.iface(role);
        let outer = format!("r{}{role}", self.id);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &outer, "netns", &router, "type", "veth", "peer", "name", &inner,
            "netns", &ns,
        ]);
        ip(&["-n", &router, "addr", "add", gateway, "dev", &outer]);
        ip(&["-n", &router, "link", "set", &outer, "up"]);
        ip(&["-n", &ns, "addr", "add", addr, "dev", &inner]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let gw = gateway.split('/').next().unwrap_or(gateway);
        ip(&["-n", &ns, "route", "add", "default", "via", gw]);
        self
    }

    /// Gives host `role` an IPv6 address too (`addr`, CIDR), with the router at `gateway` on
    /// its link, and routes IPv6 through it. Duplicate address detection is skipped so the
    /// addresses can be used at once.
    #[allow(dead_code)] // not every test binary uses IPv6
    pub fn ipv6(&mut self, role: &str, addr: &str, gateway: &str) -> &mut Self {
        let (ns, router) = (self.ns(role), self.ns("r"));
        let outer = format!("r{}{role}", self.id);
        ip(&[
            "-n", &router, "addr", "add", gateway, "dev", &outer, "nodad",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            addr,
            "dev",
            &self.iface(role),
            "nodad",
        ]);
        let gw = gateway.split('/').next().unwrap_or(gateway);
        ip(&["-n", &ns, "-6", "route", "add", "default", "via", gw]);
        self
    }

    /// Adds another address to host `role`'s interface.
    pub fn address(&mut self, role: &str, addr: &str) -> &mut Self {
        ip(&[
            "-n",
            &self.ns(role),
            "addr",
            "add",
            addr,
            "dev",
            &self.iface(role),
        ]);
        self
    }

    /// The router's end of `role`'s link (inside the router's namespace, `ns("r")`).
    #[allow(dead_code)] // not every test binary captures at the gateway
    pub fn gateway_iface(&self, role: &str) -> String {
        format!("r{}{role}", self.id)
    }

    /// A command run inside `role`'s namespace.
    pub fn command(&self, role: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(role)]).arg(program);
        c
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_egress_lock(ns);
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A veil sidecar's egress lock is attached to the host's root cgroup (scoped to its network
/// namespace, so it does nothing once the namespace is gone): take it away with the namespace,
/// even when the test failed before its own `veil firewall remove`.
fn remove_egress_lock(ns: &str) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(format!("/var/run/netns/{ns}")) else {
        return;
    };
    let prefix = format!("net{}-", meta.ino());
    let pinned = std::fs::read_dir("/sys/fs/bpf/veil").is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    });
    if pinned {
        let _ = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args([env!("CARGO_BIN_EXE_veil"), "firewall", "remove"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A tcpdump capture inside a namespace; lines are the packets seen.
pub struct Capture {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Capture {
    /// Starts capturing on `role`'s interface with a pcap `filter`; returns once tcpdump listens.
    pub fn start(t: &Topology, role: &str, filter: &str) -> Self {
        Self::start_on(t, role, &t.iface(role), filter, "-q")
    }

    /// Starts capturing on every interface of `role`'s namespace (e.g. the router).
    pub fn start_all(t: &Topology, role: &str, filter: &str) -> Self {
        Self::start_on(t, role, "any", filter, "-q")
    }

    /// Like `start_all`, with each packet's payload as text lines after its summary line.
    #[allow(dead_code)] // not every test binary reads payloads
    pub fn start_all_payloads(t: &Topology, role: &str, filter: &str) -> Self {
        Self::start_on(t, role, "any", filter, "-A")
    }

    /// Everything `role` puts on its link, payloads included, as the router sees it.
    #[allow(dead_code)] // not every test binary captures at the gateway
    pub fn start_gateway_payloads(t: &Topology, role: &str, filter: &str) -> Self {
        Self::start_on(t, "r", &t.gateway_iface(role), filter, "-A")
    }

    fn start_on(t: &Topology, role: &str, iface: &str, filter: &str, detail: &str) -> Self {
        use std::io::BufRead;
        let mut child = t
            .command(role, "tcpdump")
            .args(["-i", iface, "-n", "-l", detail, "-U", filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (tests/run.sh installs it)");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    lines.lock().expect("lines").push(l);
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if l.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("tcpdump did not start");
        Self { child, lines }
    }

    /// Stops the capture and returns every packet line.
    pub fn stop(mut self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let lines = self.lines.lock().expect("lines");
        lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .cloned()
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it makes live there).
pub fn in_netns<T: Send + 'static>(ns: Option<&str>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.map(str::to_owned);
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
    .join()
    .expect("netns thread")
}
