//! Shared helpers for the integration tests: a sidecar process built from the real binary, a UDP
//! echo server, the pinned Python client environment. Everything spawned is torn down on drop.
#![allow(dead_code, unreachable_pub)]

pub mod cgroup;
pub mod dante;
pub mod netns;
pub mod sip;

pub use netns::in_netns;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Seconds since the Unix epoch, as the Python clients print their timestamps.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The `veil` binary under test.
pub fn veil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_veil"))
}

/// The Python interpreter of the pinned test venv (made by `tests/run.sh`).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("VEIL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    assert!(
        venv.exists(),
        "the pinned Python test clients are missing: run tests/run.sh (it creates target/venv)"
    );
    venv
}

/// A script from `tests/clients/`.
pub fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Writes a policy directory from `(relative path, text)` pairs.
pub fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rel, text) in files {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&path, text).expect("write policy");
    }
    set_modes(dir.path());
    dir
}

/// Policy directories must not be group/world-writable when checked as root.
fn set_modes(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in walk(dir) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A running `veil` daemon (sidecar or relay), killed on drop.
pub struct Daemon {
    child: Child,
    /// The address it announced as ready (`listen=`).
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _reader: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Spawns `cmd` with its stderr captured; waits for the `listen=` line of its ready message.
    /// It logs at debug level (or `$VEIL_TEST_LOG`).
    pub fn spawn(cmd: Command) -> Self {
        let filter = std::env::var("VEIL_TEST_LOG")
            .unwrap_or_else(|_| "debug,quinn=info,h3=info,rustls=info".to_owned());
        Self::spawn_logging(cmd, &filter)
    }

    /// [`Daemon::spawn`] with the log filter `filter` (`VEIL_LOG`).
    pub fn spawn_logging(mut cmd: Command, filter: &str) -> Self {
        let mut child = cmd
            .env("VEIL_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn veil");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("ready")
                        && let Some(addr) = line.split("listen=").nth(1)
                    {
                        let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                    }
                    log.lock().expect("log").push(line);
                }
            })
        };
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "veil did not start:\n{}",
                    log.lock().expect("log").join("\n")
                );
            }
        };
        Self {
            child,
            addr,
            log,
            _reader: Some(reader),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Waits up to `timeout` for a log line containing every one of `needles`.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(line) = self
                .log()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The resident memory of the process now, in KiB (`VmRSS`).
    #[allow(dead_code)] // not every test binary measures memory
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Sends a signal by name (`HUP`, `TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGTERM, then waits for exit; returns the full log.
    pub fn stop(mut self) -> Vec<String> {
        self.signal("TERM");
        let _ = wait_timeout(&mut self.child, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
        self.log()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `veil sidecar` with its policy directory.
pub struct Sidecar {
    daemon: Daemon,
    /// The SOCKS5 address.
    pub addr: SocketAddr,
    policy: tempfile::TempDir,
}

impl std::ops::Deref for Sidecar {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

/// How a sidecar reaches its relay.
pub struct RelayLink {
    pub address: SocketAddr,
    pub server_name: String,
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

pub struct SidecarBuilder {
    policy: Vec<(String, String)>,
    passwords: Option<String>,
    listen: String,
    relay: Option<RelayLink>,
    netns: Option<String>,
    config: Option<PathBuf>,
}

impl Sidecar {
    pub fn builder() -> SidecarBuilder {
        SidecarBuilder {
            policy: Vec::new(),
            passwords: None,
            listen: "127.0.0.1:0".to_owned(),
            relay: None,
            netns: None,
            config: None,
        }
    }

    /// Sends SIGHUP (policy reload).
    pub fn hangup(&self) {
        self.daemon.signal("HUP");
    }

    /// The policy directory.
    pub fn policy_path(&self) -> &Path {
        self.policy.path()
    }

    /// Runs `veil status` against this sidecar's control socket.
    pub fn status(&self) -> String {
        let out = veil()
            .arg("status")
            .arg("--socket")
            .arg(self.policy.path().join(".control/socket"))
            .output()
            .expect("veil status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGTERM, then waits for exit; returns the full log.
    pub fn stop(self) -> Vec<String> {
        self.daemon.stop()
    }

    /// SIGKILL; returns the full log.
    pub fn daemon_kill(self) -> Vec<String> {
        self.daemon.kill()
    }
}

/// A command for the `veil` binary, inside network namespace `netns` if given.
pub fn veil_in(netns: Option<&str>) -> Command {
    match netns {
        // nsenter switches only the network namespace; `ip netns exec` would also remount
        // /sys, hiding the cgroup hierarchy the daemon resolves managed cgroups in.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/var/run/netns/{ns}"))
                .arg(env!("CARGO_BIN_EXE_veil"));
            c
        }
        None => veil(),
    }
}

impl SidecarBuilder {
    pub fn policy(mut self, rel: &str, text: &str) -> Self {
        self.policy.push((rel.to_owned(), text.to_owned()));
        self
    }

    pub fn passwords(mut self, text: &str) -> Self {
        self.passwords = Some(text.to_owned());
        self
    }

    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_owned();
        self
    }

    pub fn relay(mut self, link: RelayLink) -> Self {
        self.relay = Some(link);
        self
    }

    /// A sidecar config file to start with (`--config`).
    pub fn config(mut self, path: &Path) -> Self {
        self.config = Some(path.to_path_buf());
        self
    }

    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    pub fn spawn(self) -> Sidecar {
        let files: Vec<(&str, &str)> = self
            .policy
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let dir = policy_dir(&files);
        let mut cmd = veil_in(self.netns.as_deref());
        cmd.arg("sidecar")
            .arg("--listen")
            .arg(&self.listen)
            .arg("--policy-dir")
            .arg(dir.path())
            .arg("--control")
            .arg(dir.path().join(".control/socket"));
        if let Some(text) = &self.passwords {
            let path = dir.path().join(".passwords");
            std::fs::write(&path, text).expect("write passwords");
            cmd.arg("--passwords").arg(&path);
        }
        if let Some(r) = &self.relay {
            let path = dir.path().join(".sidecar.toml");
            let text = format!(
                "[relay]\naddress = \"{}\"\nserver_name = \"{}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n",
                r.address,
                r.server_name,
                r.ca.display(),
                r.certificate.display(),
                r.private_key.display()
            );
            std::fs::write(&path, text).expect("write sidecar config");
            cmd.arg("--config").arg(&path);
        }
        if let Some(path) = &self.config {
            cmd.arg("--config").arg(path);
        }
        let daemon = Daemon::spawn(cmd);
        Sidecar {
            addr: daemon.addr,
            daemon,
            policy: dir,
        }
    }
}

/// Certificates made by `veil pki` for a relay named `relay_name` and one client `sidecar`.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate(relay_name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = veil()
            .arg("pki")
            .arg(dir.path().join("pki"))
            // "other": a second sidecar (another machine) of the same organisation.
            .args([
                "--relay-name",
                relay_name,
                "--client",
                "sidecar",
                "--client",
                "other",
            ])
            .output()
            .expect("veil pki");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join("pki").join(file)
    }

    /// A sidecar's link to a relay at `address` checked as `server_name`.
    pub fn link(&self, address: SocketAddr, server_name: &str) -> RelayLink {
        RelayLink {
            address,
            server_name: server_name.to_owned(),
            ca: self.path("ca.crt"),
            certificate: self.path("sidecar.crt"),
            private_key: self.path("sidecar.key"),
        }
    }

    /// Writes `sidecar.toml` beside the certificates: `top` lines, a `[relay]` at `relay`
    /// checked as `server_name`, and `[transparent]` managing `nobody`; returns its path.
    #[allow(dead_code)] // only the transparent tests use it
    pub fn transparent_sidecar_config(&self, top: &str, relay: &str, server_name: &str) -> PathBuf {
        let path = self.dir.path().join("sidecar.toml");
        let text = format!(
            "{top}[relay]\naddress = \"{relay}\"\nserver_name = \"{server_name}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\
             [transparent]\nusers = [\"nobody\"]\n",
            self.path("ca.crt").display(),
            self.path("sidecar.crt").display(),
            self.path("sidecar.key").display()
        );
        std::fs::write(&path, text).expect("write sidecar config");
        path
    }

    /// Writes a relay config next to the certificates; returns its path.
    pub fn relay_config(&self, name: &str, listen: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join("pki").join(name);
        let text = format!(
            "listen = \"{listen}\"\ncertificate = \"relay.crt\"\nprivate_key = \"relay.key\"\nclient_ca = \"ca.crt\"\n{extra}"
        );
        std::fs::write(&path, text).expect("write relay config");
        path
    }
}

/// The value of `counter` in a daemon's "final count" log lines, if it logged one.
#[allow(dead_code)] // not every test binary reads counters
pub fn final_count(log: &[String], counter: &str) -> Option<u64> {
    log.iter()
        .filter(|l| l.contains("final count") && l.contains(&format!("counter=\"{counter}\"")))
        .find_map(|l| {
            l.split("value=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// Starts `veil relay --config CONFIG`, inside `netns` if given.
pub fn spawn_relay(netns: Option<&str>, config: &Path) -> Daemon {
    let mut cmd = veil_in(netns);
    cmd.arg("relay").arg("--config").arg(config);
    Daemon::spawn(cmd)
}

/// What an echo server received: sender and payload.
type Seen = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP echo server on loopback that records who sent what; stops on drop.
pub struct UdpEcho {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Seen,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn spawn(bind: &str) -> Self {
        Self::spawn_in(None, bind)
    }

    /// An echo server bound inside network namespace `ns`.
    pub fn spawn_in(ns: Option<&str>, bind: &str) -> Self {
        let bind = bind.to_owned();
        let socket = in_netns(ns, move || UdpSocket::bind(&bind).expect("bind echo"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        // Room for a backlog of hundreds of small datagrams (the kernel caps it at rmem_max).
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        let addr = socket.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let data = buf.get(..n).unwrap_or_default().to_vec();
                        let _ = socket.send_to(&data, from);
                        seen.lock().expect("seen").push((from, data));
                    }
                }
            })
        };
        Self {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the PySocks UDP client script; returns its JSON-ish stdout lines.
pub fn pysocks_udp(proxy: SocketAddr, args: &[&str]) -> Output {
    pysocks_udp_in(None, proxy, args)
}

/// Runs the PySocks UDP client inside network namespace `ns`.
pub fn pysocks_udp_in(ns: Option<&str>, proxy: SocketAddr, args: &[&str]) -> Output {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(python());
            c
        }
        None => Command::new(python()),
    };
    let out = cmd
        .arg(client_script("pysocks_udp.py"))
        .arg(proxy.ip().to_string())
        .arg(proxy.port().to_string())
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "pysocks client failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A one-shot HTTP server on loopback that answers every request with `body`.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// Who connected.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn spawn(body: &'static str) -> Self {
        Self::spawn_in(None, "127.0.0.1:0", body)
    }

    /// An HTTP server bound inside network namespace `ns`.
    pub fn spawn_in(ns: Option<&str>, bind: &str, body: &'static str) -> Self {
        let bind = bind.to_owned();
        let listener = in_netns(ns, move || {
            std::net::TcpListener::bind(&bind).expect("bind http")
        });
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = stop.clone();
            let peers = peers.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut s, peer)) => {
                            peers.lock().expect("peers").push(peer);
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 4096];
                            let _ = std::io::Read::read(&mut s, &mut buf);
                            let _ = write!(
                                s,
                                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            addr,
            peers,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// True when running as root (needed for ownership checks and user switching).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
