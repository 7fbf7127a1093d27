//! Confined apps: an app in a confined view sees only the placeholder addresses, its UDP is
//! relayed (the peer sees the relay), and nothing it sends leaves any other way — not with
//! the sidecar killed, not with the nftables table flushed and forwarding switched on. The
//! positive control: with veil's firewall removed too, the capture does see the view's
//! packets leave, so it can see what it looks for.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::netns::{Capture, Topology};
use support::{Pki, Sidecar, UdpEcho, spawn_relay, veil_in};

const RELAY_IP: &str = "198.51.100.2";
const RELAY: &str = "198.51.100.2:4433";
const ECHO: &str = "203.0.113.2:7000";
const ECHO6: &str = "[2001:db8:e::2]:7000";
/// Relay by default; TCP to port 8081 blocked, to 8082 direct.
const POLICY: &str = "fallback = \"relay\"\n\
    [[rule]]\nname = \"no-8081\"\nverdict = \"block\"\nnetworks = [\"203.0.113.2/32\"]\nports = [8081]\ntransport = [\"tcp\"]\n\
    [[rule]]\nname = \"lan-8082\"\nverdict = \"direct\"\nnetworks = [\"203.0.113.2/32\"]\nports = [8082]\ntransport = [\"tcp\"]\n";

/// The view's namespace, deleted when the test ends (the sidecar leaves views in place).
struct ViewNs(String);

impl Drop for ViewNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

/// `veil run` for unprivileged users: a copy of the binary in a directory anyone may read,
/// and the launch socket's path there.
struct Launcher {
    dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Launcher {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::copy(env!("CARGO_BIN_EXE_veil"), dir.path().join("veil")).expect("copy veil");
        let socket = dir.path().join("run").join("launch");
        Self { dir, socket }
    }

    /// `veil run -- ARGS` as `user` (on the host, outside any view).
    fn run(&self, user: &str, args: &[&str]) -> std::process::Output {
        Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                "--regid=nogroup",
                "--clear-groups",
            ])
            .arg(self.dir.path().join("veil"))
            .args(["run", "--socket"])
            .arg(&self.socket)
            .arg("--")
            .args(args)
            .current_dir("/")
            .output()
            .expect("veil run")
    }

    /// Its standard output, which must have succeeded.
    fn lines(&self, args: &[&str]) -> Vec<String> {
        let out = self.run("nobody", args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `tests/clients/dns_server.py` in a namespace: answers `peer.test`, records who asked.
struct DnsServer {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl DnsServer {
    fn spawn(t: &Topology, role: &str, bind: &str) -> Self {
        use std::io::BufRead;
        let mut child = t
            .command(role, "/usr/bin/python3")
            .arg(support::client_script("dns_server.py"))
            .args([bind, "53", "peer.test=203.0.113.2,2001:db8:e::2"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("dns server");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        assert_eq!(
            out.next().and_then(Result::ok).as_deref(),
            Some("listening")
        );
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.map_while(Result::ok) {
                sink.lock().expect("lines").push(l);
            }
        });
        Self { child, lines }
    }

    fn queries(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn topology() -> Topology {
    let mut t = Topology::new();
    t.host("c", "192.0.2.2/24", "192.0.2.1/24")
        .host("l", "198.51.100.2/24", "198.51.100.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24");
    t.ipv6("c", "2001:db8:c::2/64", "2001:db8:c::1/64")
        .ipv6("l", "2001:db8:1::2/64", "2001:db8:1::1/64")
        .ipv6("e", "2001:db8:e::2/64", "2001:db8:e::1/64");
    t
}

/// Runs `program args` as `nobody` inside the view; returns its output lines.
fn in_view(view: &str, program: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", view, "setpriv"])
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(program)
        .args(args)
        .output()
        .expect("run in view");
    assert!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Sends `payloads` from the view to `target`; returns the sender's lines.
fn send_from_view(view: &str, target: &str, timeout: &str, payloads: &[&str]) -> Vec<String> {
    let (host, port) = target.rsplit_once(':').expect("target");
    let host = host.trim_matches(['[', ']']);
    let script = support::client_script("udp_sender.py");
    let mut args = vec![script.to_str().expect("path"), host, port, timeout];
    args.extend(payloads);
    in_view(view, "/usr/bin/python3", &args)
}

/// On the client machine's link: anything from a view's addresses, and any UDP or TCP but
/// the tunnel to the relay.
fn leak_capture(t: &Topology) -> Capture {
    Capture::start(
        t,
        "c",
        &format!(
            "src net 192.0.0.0/30 or src net fd76:6569:6c00::/64 or ((udp or tcp) and not host {RELAY_IP})"
        ),
    )
}

fn nft_in_c(t: &Topology, args: &[&str]) {
    let ok = t.command("c", "nft").args(args).status().expect("nft");
    assert!(ok.success(), "nft {args:?}");
}

/// A sidecar in `c` with `config`, once its view is `ensured` (Built or Kept), its tunnel up
/// and the view's listener ready.
fn start_sidecar(t: &Topology, config: &std::path::Path, ensured: &str) -> Sidecar {
    let sidecar = Sidecar::builder()
        .netns(&t.ns("c"))
        .policy("default.toml", POLICY)
        .config(config)
        .spawn();
    let ensured = format!("ensured={ensured}");
    for ready in [
        ensured.as_str(),
        "tunnel connected",
        "view=\"vc-65534\"",
        "confined TCP ready",
    ] {
        assert!(
            sidecar
                .wait_log(&[ready], Duration::from_secs(10))
                .is_some(),
            "{ready}: {:?}",
            sidecar.log()
        );
    }
    sidecar
}

/// Sends from the view and asserts that nothing comes back, nothing reaches the peer and
/// nothing leaves the machine.
fn assert_sealed(t: &Topology, view: &str, echo: &UdpEcho, what: &str) {
    let capture = leak_capture(t);
    let before = echo.seen().len();
    let lines = send_from_view(view, ECHO, "0.5", &["x", "y"]);
    assert!(
        lines.iter().all(|l| l.starts_with("fail")),
        "{what}: {lines:?}"
    );
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "{what}: left the machine directly: {leaked:?}"
    );
    assert_eq!(echo.seen().len(), before, "{what}: the peer heard the app");
}

#[test]
fn a_confined_app_sees_no_address_of_the_machine_and_leaves_only_through_veil() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let _relay = spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config(
            "relay.toml",
            RELAY,
            "allow = [\"203.0.113.0/24\", \"2001:db8:e::/64\"]\n",
        ),
    );
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO);
    let echo6 = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO6);
    let prefix = format!("vt{}-", std::process::id());
    let view = ViewNs(format!("{prefix}nobody"));
    let config = pki.transparent_sidecar_config("", RELAY, RELAY_IP);
    let mut text = std::fs::read_to_string(&config).expect("config");
    // `veil run` as an unprivileged user: the binary and the socket where nobody can reach.
    let launcher = Launcher::new();
    text.push_str(&format!(
        "confined = [\"nobody\"]\nnetns_prefix = \"{prefix}\"\nconfined_dns = \"203.0.113.2:53\"\nlaunch = \"{}\"\n",
        launcher.socket.display()
    ));
    let dns = DnsServer::spawn(&t, "e", "203.0.113.2");
    std::fs::write(&config, text).expect("config");
    let sidecar = start_sidecar(&t, &config, "Built");

    // What the app can see: loopback and the placeholders, nothing of the machine.
    let addresses = in_view(&view.0, "ip", &["-o", "addr", "show"]);
    let shown: Vec<String> = addresses
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} {}", f.get(1)?, f.get(3)?))
        })
        .collect();
    assert_eq!(
        shown,
        [
            "lo 127.0.0.1/8",
            "lo ::1/128",
            "eth0 192.0.0.2/30",
            "eth0 fd76:6569:6c00::2/64",
            "eth0 fe80::76:65ff:fe69:6c02/64",
        ],
        "{addresses:?}"
    );
    let links = in_view(&view.0, "ip", &["-o", "link", "show"]);
    assert_eq!(links.len(), 2, "only lo and eth0: {links:?}");

    // `veil run`: the app runs as the asking user, in the view, on the caller's stdout, with
    // the view's resolver and the caller's exit status; it cannot leave the view.
    assert!(
        sidecar
            .wait_log(&["veil run ready"], Duration::from_secs(5))
            .is_some()
    );
    assert_eq!(launcher.lines(&["ip", "-o", "addr", "show"]), addresses);
    assert_eq!(launcher.lines(&["id", "-u", "-n"]), ["nobody"]);
    assert_eq!(launcher.lines(&["sh", "-c", "ulimit -n"]), ["1024"]);
    let resolv = launcher.lines(&["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains(&"nameserver 192.0.0.1".to_owned()),
        "{resolv:?}"
    );
    let found = launcher.lines(&["getent", "ahostsv4", "peer.test"]);
    assert!(
        found.first().is_some_and(|l| l.starts_with("203.0.113.2 ")),
        "{found:?}"
    );
    let seven = launcher.run("nobody", &["sh", "-c", "exit 7"]);
    assert_eq!(seven.status.code(), Some(7), "{seven:?}");
    // A signal to `veil run` (Ctrl-C, a launcher stopping it) reaches the app.
    {
        use std::io::BufRead as _;
        let mut client = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(launcher.dir.path().join("veil"))
            .args(["run", "--socket"])
            .arg(&launcher.socket)
            .args(["--", "sh", "-c"])
            .arg("trap 'echo got; exit 3' TERM; echo ready; while :; do sleep 0.1; done")
            .current_dir("/")
            .stdout(Stdio::piped())
            .spawn()
            .expect("veil run");
        let mut out = std::io::BufReader::new(client.stdout.take().expect("stdout")).lines();
        assert_eq!(out.next().and_then(Result::ok).as_deref(), Some("ready"));
        let ok = Command::new("kill")
            .args(["-TERM", &client.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        assert_eq!(out.next().and_then(Result::ok).as_deref(), Some("got"));
        assert_eq!(client.wait().expect("wait").code(), Some(3));
    }
    let escape = launcher.run("nobody", &["nsenter", "--net=/proc/1/ns/net", "true"]);
    assert!(!escape.status.success(), "left the view: {escape:?}");
    // Someone without a view (root is never confined) gets nothing started.
    let refused = launcher.run("root", &["true"]);
    assert_eq!(refused.status.code(), Some(127), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("has no confined view"),
        "{refused:?}"
    );

    // Its UDP reaches the peer from the relay's address; replies come back from the peer's.
    let capture = leak_capture(&t);
    let lines = send_from_view(&view.0, ECHO, "3", &["a", "b"]);
    assert_eq!(lines, ["a", "b"].map(|p| format!("reply {ECHO} {p}")));
    let seen = echo.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|(from, _)| from.ip().to_string() == RELAY_IP),
        "the peer saw {seen:?}"
    );
    // Its IPv6 UDP is caught too, by the view's listener on ::1. (The relay is reached over
    // IPv4 here, so its bind's one public address is IPv4 and cannot reach an IPv6 peer:
    // the datagram is dropped there, never sent from the machine.)
    let lines = send_from_view(&view.0, ECHO6, "0.5", &["c"]);
    assert_eq!(lines, ["fail TimeoutError"]);
    assert!(
        sidecar
            .wait_log(
                &["relay bind open", "client=[fd76:6569:6c00::2]"],
                Duration::from_secs(5)
            )
            .is_some(),
        "{:?}",
        sidecar.log()
    );
    assert!(echo6.seen().is_empty());
    // Local chatter (mDNS, SSDP) reaches no link: it goes to veil like any UDP, and no policy
    // relays multicast.
    for target in ["224.0.0.251:5353", "239.255.255.250:1900"] {
        let lines = send_from_view(&view.0, target, "0.3", &["chatter"]);
        assert_eq!(lines, ["fail TimeoutError"], "{target}");
    }

    // DNS: the app's resolver is the host end (resolv.conf in /etc/netns, which `ip netns
    // exec` mounts); glibc's lookup is answered, and the upstream heard it from the relay.
    let resolv = in_view(&view.0, "cat", &["/etc/resolv.conf"]);
    assert_eq!(
        resolv[1..],
        ["nameserver 192.0.0.1", "nameserver fd76:6569:6c00::1"]
    );
    let found = in_view(&view.0, "getent", &["ahostsv4", "peer.test"]);
    assert!(
        found.first().is_some_and(|l| l.starts_with("203.0.113.2 ")),
        "{found:?} {:?}",
        sidecar.log()
    );
    let queries = dns.queries();
    assert!(
        !queries.is_empty()
            && queries
                .iter()
                .all(|q| q.ends_with(&format!("from {RELAY_IP}"))),
        "{queries:?}"
    );
    // A name the resolver does not know fails as it would anywhere (NXDOMAIN, not a hang).
    let missing = Command::new("ip")
        .args([
            "netns",
            "exec",
            &view.0,
            "getent",
            "ahostsv4",
            "nothing.test",
        ])
        .output()
        .expect("getent");
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    // TCP: the kernel terminates it; `relay` reaches the server from the relay's address,
    // `block` resets and the server never hears of it.
    let relayed = support::HttpServer::spawn_in(Some(&t.ns("e")), "203.0.113.2:8080", "relayed");
    let blocked = support::HttpServer::spawn_in(Some(&t.ns("e")), "203.0.113.2:8081", "blocked");
    let direct = support::HttpServer::spawn_in(Some(&t.ns("e")), "203.0.113.2:8082", "direct");
    let body = in_view(
        &view.0,
        "curl",
        &["-sS", "-m", "5", "http://203.0.113.2:8080/"],
    );
    assert_eq!(body, ["relayed"]);
    let peers = relayed.peers.lock().expect("peers").clone();
    assert!(
        !peers.is_empty() && peers.iter().all(|p| p.ip().to_string() == RELAY_IP),
        "{peers:?}"
    );
    let refused = Command::new("ip")
        .args(["netns", "exec", &view.0, "curl", "-sS", "-m", "5"])
        .arg("http://203.0.113.2:8081/")
        .output()
        .expect("curl");
    assert!(!refused.status.success(), "{refused:?}");
    assert!(blocked.peers.lock().expect("peers").is_empty());
    let leaked = capture.stop();
    assert!(leaked.is_empty(), "left the machine directly: {leaked:?}");
    // `direct` (the corporate network, say) leaves from the host's address.
    let body = in_view(
        &view.0,
        "curl",
        &["-sS", "-m", "5", "http://203.0.113.2:8082/"],
    );
    assert_eq!(body, ["direct"]);
    let peers = direct.peers.lock().expect("peers").clone();
    assert!(
        peers.iter().all(|p| p.ip().to_string() == "192.0.2.2"),
        "{peers:?}"
    );
    let status = sidecar.status();
    assert!(status.contains("confined"), "{status}");

    // Fail closed. The sidecar killed: nothing comes back, nothing leaves, and `veil run`
    // fails at once.
    sidecar.daemon_kill();
    assert_sealed(&t, &view.0, &echo, "sidecar killed");
    let orphan = launcher.run("nobody", &["true"]);
    assert_eq!(orphan.status.code(), Some(127), "{orphan:?}");
    assert!(
        String::from_utf8_lossy(&orphan.stderr).contains("cannot reach the veil daemon"),
        "{orphan:?}"
    );

    // A new sidecar takes the view as it is (apps inside keep running) and serves it again.
    let sidecar = start_sidecar(&t, &config, "Kept");
    let lines = send_from_view(&view.0, ECHO, "3", &["again"]);
    assert_eq!(lines, [format!("reply {ECHO} again")]);
    sidecar.daemon_kill();

    // The table flushed, forwarding on: the blackhole rule still holds.
    nft_in_c(&t, &["flush", "ruleset"]);
    let forward = t
        .command("c", "sysctl")
        .args([
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])
        .status()
        .expect("sysctl");
    assert!(forward.success());
    assert_sealed(&t, &view.0, &echo, "dead, ruleset flushed, forwarding on");

    // Positive control: with veil's policy routing gone too (and the host end's own IPv4
    // forwarding switched back on), the same packet does leave, and the capture sees it.
    let out = veil_in(Some(&t.ns("c")))
        .args(["firewall", "remove"])
        .output()
        .expect("veil firewall remove");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on = t
        .command("c", "sysctl")
        .args(["-qw", "net.ipv4.conf.vc-65534.forwarding=1"])
        .status()
        .expect("sysctl");
    assert!(on.success());
    let capture = leak_capture(&t);
    let _ = send_from_view(&view.0, ECHO, "0.5", &["control"]);
    let seen = capture.stop();
    assert!(
        seen.iter().any(|l| l.contains("192.0.0.2")),
        "the capture cannot see a forwarded packet: {seen:?}"
    );
}
