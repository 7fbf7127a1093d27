//! Transparent interception of unmodified apps in network namespaces: a plain Python UDP socket
//! run as a managed user is caught by the kernel and relayed; root's is untouched; and when the
//! daemon is dead, stopped, unconfigured or its table flushed, nothing leaks.

mod support;

use std::time::Duration;
use support::cgroup::{TestCgroup, in_ns_keeping_mounts};
use support::netns::{Capture, Topology};
use support::{Pki, Sidecar, UdpEcho, spawn_relay, veil_in};

const RELAY_IP: &str = "198.51.100.2";
const RELAY: &str = "198.51.100.2:4433";
const MANAGED_ECHO: &str = "203.0.113.2:7000";
const ROOT_ECHO: &str = "203.0.113.2:7001";

fn topology() -> Topology {
    let mut t = Topology::new();
    t.host("c", "192.0.2.2/24", "192.0.2.1/24")
        .host("l", "198.51.100.2/24", "198.51.100.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24");
    t
}

/// Sends from namespace `c` as `user` (None: root) to `target`; returns the output lines.
fn send_as(
    t: &Topology,
    user: Option<&str>,
    target: &str,
    timeout: &str,
    payloads: &[&str],
) -> Vec<String> {
    let (host, port) = target.rsplit_once(':').expect("target");
    let host = host.trim_matches(['[', ']']);
    let mut cmd = t.command("c", "setpriv");
    match user {
        Some(u) => cmd.args([&format!("--reuid={u}"), "--regid=nogroup", "--clear-groups"]),
        None => cmd.args(["--reuid=0"]),
    };
    let out = cmd
        .arg("/usr/bin/python3")
        .arg(support::client_script("udp_sender.py"))
        .args([host, port, timeout])
        .args(payloads)
        .output()
        .expect("sender");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn sidecar_config(pki: &Pki) -> std::path::PathBuf {
    pki.transparent_sidecar_config("metrics = \"127.0.0.1:9101\"\n", RELAY, RELAY_IP)
}

fn start_sidecar(t: &Topology, config: &std::path::Path) -> Sidecar {
    Sidecar::builder()
        .netns(&t.ns("c"))
        .policy("default.toml", "fallback = \"relay\"\n")
        .config(config)
        .spawn()
}

/// root is not managed: its UDP goes out directly from the client's own address.
fn assert_root_untouched(t: &Topology, root_echo: &UdpEcho) {
    let lines = send_as(t, None, ROOT_ECHO, "2", &["r"]);
    assert_eq!(lines, [format!("reply {ROOT_ECHO} r")]);
    assert!(
        root_echo
            .seen()
            .iter()
            .all(|(f, _)| f.ip().to_string() == "192.0.2.2")
    );
}

/// The relay in namespace `l`, allowed to reach the echo network.
fn start_relay(t: &Topology, pki: &Pki) -> support::Daemon {
    spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.0/24\"]\n"),
    )
}

/// A sidecar in `c` whose tunnel is up and whose interception is in place.
fn start_connected(t: &Topology, config: &std::path::Path) -> Sidecar {
    let sidecar = start_sidecar(t, config);
    for ready in ["tunnel connected", "transparent interception ready"] {
        assert!(
            sidecar
                .wait_log(&[ready], Duration::from_secs(10))
                .is_some(),
            "{ready}"
        );
    }
    sidecar
}

/// A relay, the managed user's echo, and a sidecar with its tunnel and interception up.
fn start_managed(t: &Topology) -> (Pki, support::Daemon, UdpEcho, Sidecar) {
    let pki = Pki::generate(RELAY_IP);
    let relay = start_relay(t, &pki);
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), MANAGED_ECHO);
    let sidecar = start_connected(t, &sidecar_config(&pki));
    (pki, relay, echo, sidecar)
}

/// UDP on the client's link that is neither tunnel traffic nor root's own test flow.
fn leak_capture(t: &Topology) -> Capture {
    Capture::start(
        t,
        "c",
        &format!("udp and not host {RELAY_IP} and not port 7001"),
    )
}

fn firewall_remove(t: &Topology) {
    let out = veil_in(Some(&t.ns("c")))
        .args(["firewall", "remove"])
        .output()
        .expect("veil firewall remove");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn managed_user_is_intercepted_and_relayed_root_is_untouched() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let relay = start_relay(&t, &pki);
    let managed_echo = UdpEcho::spawn_in(Some(&t.ns("e")), MANAGED_ECHO);
    let root_echo = UdpEcho::spawn_in(Some(&t.ns("e")), ROOT_ECHO);
    let config = sidecar_config(&pki);
    let sidecar = start_sidecar(&t, &config);
    assert!(
        sidecar
            .wait_log(&["transparent interception ready"], Duration::from_secs(10))
            .is_some()
    );
    assert!(
        sidecar
            .wait_log(&["tunnel connected"], Duration::from_secs(10))
            .is_some()
    );
    let capture = leak_capture(&t);

    // The app sees its peer's address on every reply, as if nothing were in between.
    let lines = send_as(&t, Some("nobody"), MANAGED_ECHO, "2", &["a", "b", "c"]);
    assert_eq!(
        lines,
        ["a", "b", "c"].map(|p| format!("reply {MANAGED_ECHO} {p}"))
    );
    let sources: Vec<String> = managed_echo
        .seen()
        .iter()
        .map(|(f, _)| f.to_string())
        .collect();
    assert_eq!(sources.len(), 3);
    assert!(
        sources
            .iter()
            .all(|s| s.starts_with(&format!("{RELAY_IP}:"))),
        "peer saw {sources:?}"
    );
    assert!(
        sources.windows(2).all(|w| w[0] == w[1]),
        "one public address per app socket: {sources:?}"
    );

    // A burst (a video frame) comes back whole and in order through the GSO'd replies.
    let lines = send_as(&t, Some("nobody"), MANAGED_ECHO, "3", &["burst:60:1200"]);
    assert_eq!(lines, [format!("burst {MANAGED_ECHO} 60/60 intact")]);

    // A backlog (the daemon was busy; here, stopped) is taken whole: the listener lets the
    // app socket's task empty its queue between rounds instead of overfilling it.
    let seen = managed_echo.seen().len();
    let burst = burst_while_stopped(&t, &sidecar, 400);
    assert_eq!(
        managed_echo.seen().len() - seen,
        401,
        "the peer got only part of the backlog (the first is the warm-up); the app got {burst}"
    );
    assert_eq!(burst, format!("burst {MANAGED_ECHO} 400/400 intact"));

    // root is not managed: its UDP goes out directly from 192.0.2.2.
    assert_root_untouched(&t, &root_echo);

    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "managed UDP left the client directly: {leaked:?}"
    );
    let line = sidecar
        .wait_log(&["relay bind open", "user=nobody"], Duration::from_secs(1))
        .expect("logged");
    assert!(line.contains(&format!("public={} ", sources[0])), "{line}");
    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
}

/// As `nobody`: one datagram to open the app socket's bind, then, while the sidecar is stopped,
/// `n` datagrams back to back, which wait in the listener's socket; then the sidecar goes on.
/// Returns the sender's line for the burst.
fn burst_while_stopped(t: &Topology, sidecar: &Sidecar, n: usize) -> String {
    use std::io::BufRead;
    let (host, port) = MANAGED_ECHO.rsplit_once(':').expect("target");
    let mut sender = t
        .command("c", "setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg("/usr/bin/python3")
        .arg(support::client_script("udp_sender.py"))
        .args([host, port, "5", "warm"])
        .args(["sleep:1", &format!("burst:{n}:64")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sender");
    let mut lines = std::io::BufReader::new(sender.stdout.take().expect("stdout")).lines();
    let warm = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(warm, format!("reply {MANAGED_ECHO} warm"));
    sidecar.signal("STOP");
    std::thread::sleep(Duration::from_millis(1_500));
    sidecar.signal("CONT");
    let burst = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = sender.wait();
    burst
}

/// Sends as the managed user and asserts that nothing comes back and nothing leaks.
fn assert_sealed(t: &Topology, what: &str) {
    let capture = leak_capture(t);
    let lines = send_as(t, Some("nobody"), MANAGED_ECHO, "0.3", &["x", "y", "z"]);
    let leaked = capture.stop();
    assert!(
        lines.iter().all(|l| !l.starts_with("reply")),
        "{what}: got {lines:?}"
    );
    assert!(
        leaked.is_empty(),
        "{what}: managed UDP left the client: {leaked:?}"
    );
}

#[test]
fn nothing_leaks_when_the_daemon_is_killed_stopped_or_its_table_flushed() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), MANAGED_ECHO);
    let config = sidecar_config(&pki);

    // "Boot": only the early table, no daemon yet.
    let out = veil_in(Some(&t.ns("c")))
        .args(["firewall", "install", "--config"])
        .arg(&config)
        .output()
        .expect("install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_sealed(&t, "before veil starts");

    // Relay unreachable (never started): the daemon runs, relayed traffic is dropped.
    let sidecar = start_sidecar(&t, &config);
    assert!(
        sidecar
            .wait_log(&["transparent interception ready"], Duration::from_secs(10))
            .is_some()
    );
    assert_sealed(&t, "relay unreachable");

    // Another tool flushes the whole ruleset: the egress lock still holds, and the daemon
    // puts its table back.
    let flush = t
        .command("c", "nft")
        .args(["flush", "ruleset"])
        .status()
        .expect("nft flush");
    assert!(flush.success());
    assert_sealed(&t, "ruleset flushed");
    assert!(
        sidecar
            .wait_log(&["firewall reinstalled"], Duration::from_secs(6))
            .is_some()
    );

    // Daemon killed: the table stays.
    let log = sidecar.daemon_kill();
    assert!(
        log.iter()
            .any(|l| l.contains("nftables table inet veil: removed"))
    );
    assert_sealed(&t, "daemon killed");

    // Daemon stopped cleanly: the table stays too.
    let sidecar = start_sidecar(&t, &config);
    assert!(
        sidecar
            .wait_log(&["transparent interception ready"], Duration::from_secs(10))
            .is_some()
    );
    sidecar.stop();
    assert_sealed(&t, "daemon stopped");
    assert!(
        echo.seen().is_empty(),
        "the echo server heard {:?}",
        echo.seen()
    );

    // Only an explicit removal opens the way again — and the same capture then sees the
    // packets, which shows it would have seen a leak above.
    firewall_remove(&t);
    let capture = leak_capture(&t);
    let lines = send_as(&t, Some("nobody"), MANAGED_ECHO, "2", &["open"]);
    assert_eq!(lines, [format!("reply {MANAGED_ECHO} open")]);
    let seen = capture.stop();
    assert!(
        seen.iter()
            .any(|l| l.contains("192.0.2.2") && l.contains("203.0.113.2.7000")),
        "{seen:?}"
    );
}

#[test]
fn reload_under_traffic_keeps_allowed_flows_and_cuts_the_others() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let relay = start_relay(&t, &pki);
    let kept = UdpEcho::spawn_in(Some(&t.ns("e")), MANAGED_ECHO);
    let cut = UdpEcho::spawn_in(Some(&t.ns("e")), "203.0.113.2:7002");
    let config = sidecar_config(&pki);
    let sidecar = start_connected(&t, &config);

    let shared = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let go = shared.path().join("go");
    let child = t
        .command("c", "setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(support::client_script("udp_two_phases.py"))
        .args([MANAGED_ECHO, "203.0.113.2:7002"])
        .arg(&go)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sender");
    assert!(
        sidecar
            .wait_log(
                &["decision", "target=203.0.113.2:7002"],
                Duration::from_secs(5)
            )
            .is_some()
    );
    std::thread::sleep(Duration::from_millis(500));
    let capture = leak_capture(&t);

    // A broken policy first: refused, and the running one stays.
    std::fs::write(
        sidecar.policy_path().join("default.toml"),
        "fallback = \"maybe\"\n",
    )
    .expect("broken policy");
    sidecar.hangup();
    let refused = ["policy reload refused", "default.toml:1:12: fallback"];
    assert!(sidecar.wait_log(&refused, Duration::from_secs(5)).is_some());

    std::fs::write(
        sidecar.policy_path().join("default.toml"),
        "fallback = \"relay\"\n[[rule]]\nname = \"no-7002\"\nverdict = \"block\"\nnetworks = [\"203.0.113.0/24\"]\nports = [7002]\n",
    )
    .expect("new policy");
    sidecar.hangup();
    assert!(
        sidecar
            .wait_log(&["policy reloaded", "generation=2"], Duration::from_secs(5))
            .is_some()
    );
    std::fs::write(&go, "").expect("go");
    let out = child.wait_with_output().expect("sender");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            format!("reply {MANAGED_ECHO} before"),
            "reply 203.0.113.2:7002 before".to_owned(),
            format!("reply {MANAGED_ECHO} after"),
            "fail 203.0.113.2:7002 after".to_owned(),
        ]
    );
    assert_eq!(
        cut.seen().len(),
        1,
        "the cut flow got nothing after the reload"
    );
    assert_eq!(kept.seen().len(), 2);
    assert!(
        sidecar
            .wait_log(&["verdict=block", "no-7002"], Duration::from_secs(2))
            .is_some()
    );
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "UDP left the client directly during the reloads: {leaked:?}"
    );
    drop(sidecar);
    drop(relay);
}

/// Runs `tests/clients/udp_receiver.py` in namespace `c` (inside `cgroup` if given, as `nobody` if `as_nobody`) while
/// `e` sends to it; returns what it printed last.
fn unsolicited(t: &Topology, cgroup: Option<&TestCgroup>, as_nobody: bool, port: u16) -> String {
    use std::io::BufRead;
    let enter = cgroup
        .map(TestCgroup::enter)
        .unwrap_or_else(|| "exec".into());
    let user = if as_nobody {
        "setpriv --reuid=nobody --regid=nogroup --clear-groups"
    } else {
        ""
    };
    let mut child = in_ns_keeping_mounts(t, "c", "sh")
        .args([
            "-c",
            &format!("{enter} {user} /usr/bin/python3 \"$0\" \"$@\""),
        ])
        .arg(support::client_script("udp_receiver.py"))
        .args([&port.to_string(), "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("receiver");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("ready"));
    for _ in 0..5 {
        let status = t
            .command("e", "/usr/bin/python3")
            .args([
                "-c",
                "import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'knock', ('192.0.2.2', int(sys.argv[1])))",
                &port.to_string(),
            ])
            .status()
            .expect("knock");
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = lines.next().and_then(Result::ok).unwrap_or_default();
    let _ = child.wait();
    last
}

#[test]
fn an_app_in_a_managed_cgroup_is_intercepted_whoever_runs_it_and_gets_no_unsolicited_udp() {
    let t = topology();
    let cgroup = TestCgroup::new();
    let pki = Pki::generate(RELAY_IP);
    let relay = start_relay(&t, &pki);
    let managed_echo = UdpEcho::spawn_in(Some(&t.ns("e")), MANAGED_ECHO);
    let root_echo = UdpEcho::spawn_in(Some(&t.ns("e")), ROOT_ECHO);
    let config = pki.dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\naddress = \"{RELAY}\"\nserver_name = \"{RELAY_IP}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n\
             [transparent]\ncgroups = [\"{}\"]\n",
            pki.path("ca.crt").display(),
            pki.path("sidecar.crt").display(),
            pki.path("sidecar.key").display(),
            cgroup.name,
        ),
    )
    .expect("write sidecar config");
    let sidecar = start_connected(&t, &config);
    let capture = leak_capture(&t);

    // root, inside the managed cgroup: intercepted and relayed like a managed user.
    let out = in_ns_keeping_mounts(&t, "c", "sh")
        .args([
            "-c",
            &format!("{} /usr/bin/python3 \"$0\" \"$@\"", cgroup.enter()),
        ])
        .arg(support::client_script("udp_sender.py"))
        .args(["203.0.113.2", "7000", "2", "a", "b"])
        .output()
        .expect("sender in cgroup");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        ["a", "b"].map(|p| format!("reply {MANAGED_ECHO} {p}"))
    );
    let seen = managed_echo.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|(f, _)| f.ip().to_string() == RELAY_IP),
        "peer saw {seen:?}"
    );
    // root outside it: untouched.
    assert_root_untouched(&t, &root_echo);
    let leaked = capture.stop();
    assert!(leaked.is_empty(), "managed UDP left directly: {leaked:?}");

    // Unsolicited UDP from the network reaches an app outside the cgroup (the control) but
    // not one inside it.
    assert_eq!(
        unsolicited(&t, None, false, 9000),
        "got knock from 203.0.113.2"
    );
    assert_eq!(unsolicited(&t, Some(&cgroup), false, 9001), "none");

    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
}

#[test]
fn ipv6_udp_of_a_managed_user_is_intercepted_and_relayed_over_ipv6() {
    const RELAY6: &str = "2001:db8:2::2";
    const ECHO6: &str = "[2001:db8:3::2]:7000";
    let mut t = topology();
    t.ipv6("c", "2001:db8:1::2/64", "2001:db8:1::1/64")
        .ipv6("l", "2001:db8:2::2/64", "2001:db8:2::1/64")
        .ipv6("e", "2001:db8:3::2/64", "2001:db8:3::1/64");
    let pki = Pki::generate(RELAY_IP);
    let relay = spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config(
            "relay.toml",
            &format!("[{RELAY6}]:4433"),
            "allow = [\"2001:db8:3::/64\"]\n",
        ),
    );
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO6);
    let config = pki.transparent_sidecar_config("", &format!("[{RELAY6}]:4433"), RELAY_IP);
    let sidecar = start_connected(&t, &config);
    let capture = Capture::start(&t, "c", &format!("udp and not host {RELAY6}"));

    let lines = send_as(&t, Some("nobody"), ECHO6, "2", &["a", "b", "c"]);
    assert_eq!(
        lines,
        ["a", "b", "c"].map(|p| format!("reply 2001:db8:3::2:7000 {p}"))
    );
    let seen = echo.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter().all(|(f, _)| f.ip().to_string() == RELAY6),
        "peer saw {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 == w[1].0),
        "one public address per app socket: {seen:?}"
    );
    let leaked = capture.stop();
    assert!(leaked.is_empty(), "IPv6 UDP left directly: {leaked:?}");
    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
}

#[test]
fn a_managed_users_session_gets_no_unsolicited_udp_once_its_slice_appears() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let relay = start_relay(&t, &pki);
    let config = sidecar_config(&pki);
    let sidecar = start_connected(&t, &config);
    // Before nobody has a session slice, nftables cannot tell its sockets on input: an
    // unsolicited datagram reaches it (the gap this closes).
    assert_eq!(
        unsolicited(&t, None, true, 9000),
        "got knock from 203.0.113.2"
    );
    // nobody logs in: systemd would make its slice; the sidecar picks it up within seconds.
    let slice = TestCgroup::at("user.slice/user-65534.slice");
    assert!(
        sidecar
            .wait_log(
                &["session cgroups changed", "user-65534.slice"],
                Duration::from_secs(10)
            )
            .is_some(),
        "the sidecar did not notice the new session slice"
    );
    assert_eq!(unsolicited(&t, Some(&slice), true, 9001), "none");
    // The same user outside its slice (no session) still gets it: the rule is the slice's.
    assert_eq!(
        unsolicited(&t, None, true, 9002),
        "got knock from 203.0.113.2"
    );
    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
    drop(slice);
}

/// After a relay restart, an unmodified app's next datagram on the same socket is held while
/// the socket's new bind opens, then relayed from the same public port.
#[test]
fn an_app_sockets_first_datagram_after_a_relay_restart_waits_for_its_new_bind() {
    let t = topology();
    let (pki, relay, echo, sidecar) = start_managed(&t);
    let capture = leak_capture(&t);
    let (lines, restarted) = std::thread::scope(|s| {
        // One socket: a datagram, a pause long enough for the relay to be restarted (and the
        // sidecar to notice), another datagram.
        let app = s.spawn(|| {
            send_as(
                &t,
                Some("nobody"),
                MANAGED_ECHO,
                "4",
                &["before", "sleep:6", "after"],
            )
        });
        // The relay goes once the first echo has reached the app (not merely the echo
        // server: its reply could still be on the way back through the relay).
        let delivered = || {
            sidecar
                .status()
                .lines()
                .find_map(|l| l.trim().strip_prefix("relayed_in "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while delivered() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        relay.kill();
        std::thread::sleep(Duration::from_secs(1));
        let relay = start_relay(&t, &pki);
        let by = std::time::Instant::now() + Duration::from_secs(4);
        let connects = || {
            let log = sidecar.log();
            let closed = log.iter().any(|l| l.contains("relay bind closed"));
            closed as usize
                * log
                    .iter()
                    .filter(|l| l.contains("tunnel connected"))
                    .count()
        };
        while connects() < 2 && std::time::Instant::now() < by {
            std::thread::sleep(Duration::from_millis(20));
        }
        let restarted = connects() >= 2;
        (app.join().expect("app"), (restarted, relay))
    });
    let (restarted, relay) = restarted;
    assert!(
        restarted,
        "the sidecar had not reconnected before the app sent again: {:?}",
        sidecar.log()
    );
    assert_eq!(
        lines,
        ["before", "after"].map(|p| format!("reply {MANAGED_ECHO} {p}"))
    );
    let mut ports: Vec<u16> = echo.seen().iter().map(|(from, _)| from.port()).collect();
    ports.dedup();
    assert_eq!(
        ports.len(),
        1,
        "one public port across the restart: {ports:?}"
    );
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "managed UDP left the client directly: {leaked:?}"
    );
    let log = sidecar.stop().join("\n");
    assert!(log.contains("held_sent=1"), "{log}");
    firewall_remove(&t);
    drop(relay);
}

/// An app socket's first datagram waits while its bind is being opened (here the relay is
/// stopped, so the request hangs), and goes out when the bind opens — unless the policy was
/// reloaded meanwhile: then the decision it waited under no longer stands, and it is dropped.
#[test]
fn a_held_datagram_goes_out_when_its_bind_opens_unless_the_policy_changed_meanwhile() {
    let t = topology();
    let (_pki, relay, echo, sidecar) = start_managed(&t);
    let capture = leak_capture(&t);
    let count = |needle: &str| sidecar.log().iter().filter(|l| l.contains(needle)).count();
    // One new app socket sends one datagram while the relay is stopped; `meanwhile` runs once
    // the sidecar holds it, then the relay goes on. Returns what the app got.
    let with_relay_stopped = |payload: &str, meanwhile: &dyn Fn()| {
        let sockets = count("app socket intercepted");
        std::thread::scope(|s| {
            relay.signal("STOP");
            let app = s.spawn(|| send_as(&t, Some("nobody"), MANAGED_ECHO, "4", &[payload]));
            let by = std::time::Instant::now() + Duration::from_secs(3);
            while count("app socket intercepted") == sockets && std::time::Instant::now() < by {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
            meanwhile();
            relay.signal("CONT");
            app.join().expect("app")
        })
    };

    let lines = with_relay_stopped("held", &|| ());
    assert_eq!(lines, [format!("reply {MANAGED_ECHO} held")]);
    assert_eq!(echo.seen().len(), 1);

    let lines = with_relay_stopped("stale", &|| {
        let reloads = count("policy reloaded");
        std::fs::write(
            sidecar.policy_path().join("default.toml"),
            "fallback = \"relay\"\n[[rule]]\nname = \"no-echo\"\nverdict = \"block\"\nnetworks = [\"203.0.113.2/32\"]\n",
        )
        .expect("policy");
        sidecar.hangup();
        let by = std::time::Instant::now() + Duration::from_secs(2);
        while count("policy reloaded") == reloads && std::time::Instant::now() < by {
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert_eq!(lines, ["fail TimeoutError"]);
    assert_eq!(
        echo.seen().len(),
        1,
        "the held datagram was sent after the reload"
    );

    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "managed UDP left the client directly: {leaked:?}"
    );
    let log = sidecar.stop().join("\n");
    let opens: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("relay bind open"))
        .collect();
    assert_eq!(opens.len(), 2, "{log}");
    assert!(
        opens[0].contains("held_sent=1") && opens[1].contains("held_sent=0"),
        "{opens:?}"
    );
    firewall_remove(&t);
    drop(relay);
}

/// An intercepted app's datagrams of any size reach the peer through the relay and come back
/// whole: those larger than a QUIC DATAGRAM frame as DATAGRAM capsules on the bind's stream.
#[test]
fn an_intercepted_apps_large_datagrams_are_relayed_whole() {
    let t = topology();
    let (_pki, relay, echo, sidecar) = start_managed(&t);
    let capture = leak_capture(&t);
    let sizes = [1413, 1500, 8000, 65_000];
    let bursts: Vec<String> = sizes.iter().map(|s| format!("burst:1:{s}")).collect();
    let bursts: Vec<&str> = bursts.iter().map(String::as_str).collect();
    let lines = send_as(&t, Some("nobody"), MANAGED_ECHO, "3", &bursts);
    assert_eq!(
        lines,
        sizes.map(|_| format!("burst {MANAGED_ECHO} 1/1 intact")),
        "sidecar log: {:?}",
        sidecar.log().iter().rev().take(10).collect::<Vec<_>>()
    );
    let seen = echo.seen();
    assert_eq!(seen.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(), sizes);
    assert!(
        seen.iter().all(|(f, _)| f.ip().to_string() == RELAY_IP),
        "{seen:?}"
    );
    let leaked = capture.stop();
    assert!(leaked.is_empty(), "managed UDP left directly: {leaked:?}");
    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
}

/// Forged datagrams from ports with no socket behind them are dropped as `no_socket`, never
/// relayed, and the journal gets a bounded number of lines for them, not one per datagram.
#[test]
fn forged_udp_from_ports_without_a_socket_is_dropped_and_logged_at_a_bounded_rate() {
    let t = topology();
    let (_pki, relay, echo, sidecar) = start_managed(&t);
    let capture = leak_capture(&t);
    let (host, port) = MANAGED_ECHO.rsplit_once(':').expect("target");
    let out = t
        .command("c", "setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=+net_raw",
            "--ambient-caps=+net_raw",
            "/usr/bin/python3",
        ])
        .arg(support::client_script("udp_forger.py"))
        .args([host, port, "300"])
        .output()
        .expect("forger");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counted = |status: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.trim().strip_prefix("dropped_no_socket "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counted(&sidecar.status()) < 300 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = sidecar.status();
    assert_eq!(counted(&status), 300, "{status}");
    let lines = sidecar
        .log()
        .iter()
        .filter(|l| l.contains("no_socket"))
        .count();
    assert!(
        (1..=60).contains(&lines),
        "{lines} log lines for 300 forged datagrams"
    );
    assert!(echo.seen().is_empty(), "forged datagrams reached the peer");
    let leaked = capture.stop();
    assert!(leaked.is_empty(), "{leaked:?}");
    drop(sidecar);
    firewall_remove(&t);
    drop(relay);
}
