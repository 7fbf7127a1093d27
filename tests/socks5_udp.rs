//! SOCKS5 UDP ASSOCIATE through the real `veil` binary, with the unmodified PySocks client and
//! with hand-made hostile datagrams.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;
use support::{Pki, Sidecar, UdpEcho, pysocks_udp, spawn_relay};

fn policy_for(echo_direct: SocketAddr, blocked: SocketAddr) -> String {
    format!(
        r#"fallback = "relay"
[[rule]]
name = "echo"
verdict = "direct"
networks = ["127.0.0.0/8", "::1"]
ports = [{}]
[[rule]]
name = "blocked-echo"
verdict = "block"
networks = ["127.0.0.0/8"]
ports = [{}]
"#,
        echo_direct.port(),
        blocked.port()
    )
}

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn pysocks_udp_is_relayed_when_direct_and_dropped_when_blocked_or_relay() {
    let allowed = UdpEcho::spawn("127.0.0.1:0");
    let blocked = UdpEcho::spawn("127.0.0.1:0");
    // A third echo on another loopback address: no rule names it, so the fallback `relay`
    // applies, and with no tunnel yet that must mean dropped, never sent direct.
    let relayed = UdpEcho::spawn("127.0.0.3:0");
    let sidecar = Sidecar::builder()
        .policy("default.toml", &policy_for(allowed.addr, blocked.addr))
        .spawn();

    let out = pysocks_udp(
        sidecar.addr,
        &[
            "--timeout",
            "0.5",
            &format!("{}:one", allowed.addr),
            &format!("{}:two", blocked.addr),
            &format!("127.0.0.3:{}:three", relayed.addr.port()),
            &format!("localhost:{}:four", allowed.addr.port()),
        ],
    );
    assert_eq!(
        lines(&out),
        vec![
            format!("reply {} one", allowed.addr),
            "timeout".to_owned(),
            "timeout".to_owned(),
            format!("reply {} four", allowed.addr),
        ]
    );
    assert_eq!(allowed.seen().len(), 2);
    assert!(
        blocked.seen().is_empty(),
        "blocked target received {:?}",
        blocked.seen()
    );
    assert!(
        relayed.seen().is_empty(),
        "relay-verdict target received direct traffic"
    );

    // Every decision is logged with user, target, rule and verdict.
    let line = sidecar
        .wait_log(
            &[
                "decision",
                "verdict=block",
                "blocked-echo",
                "user=",
                "target=",
            ],
            Duration::from_secs(2),
        )
        .expect("block decision logged");
    assert!(line.contains(&format!("target={}", blocked.addr)), "{line}");
    let log = sidecar.stop().join("\n");
    assert!(log.contains("counter=\"dropped_blocked\" value=1"), "{log}");
    assert!(
        log.contains("counter=\"dropped_relay_unavailable\" value=1"),
        "{log}"
    );
}

/// Opens a UDP association by hand; returns the control stream and the relay's UDP address.
fn associate(proxy: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut control = TcpStream::connect(proxy).expect("connect");
    control
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    control.write_all(&[5, 1, 0]).expect("greeting");
    let mut choice = [0u8; 2];
    control.read_exact(&mut choice).expect("method");
    assert_eq!(choice, [5, 0]);
    // Declared address 0.0.0.0:0, as real clients send.
    control
        .write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .expect("request");
    let mut reply = [0u8; 10];
    control.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..4], &[5, 0, 0, 1]);
    let port = u16::from_be_bytes([reply[8], reply[9]]);
    let ip = std::net::Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]);
    (control, SocketAddr::from((ip, port)))
}

fn datagram(frag: u8, target: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("v4 only")
    };
    let mut d = vec![0, 0, frag, 1];
    d.extend_from_slice(&v4.ip().octets());
    d.extend_from_slice(&v4.port().to_be_bytes());
    d.extend_from_slice(payload);
    d
}

fn recv(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    socket
        .recv_from(&mut buf)
        .ok()
        .map(|(n, _)| buf[..n].to_vec())
}

/// A sidecar, a UDP echo server and one hand-made association, with its client socket.
struct Handmade {
    echo: UdpEcho,
    sidecar: Sidecar,
    control: Option<TcpStream>,
    relay: SocketAddr,
    client: UdpSocket,
}

impl Handmade {
    /// `policy` gets the echo server's address and returns default.toml.
    fn open(policy: impl FnOnce(SocketAddr) -> String) -> Self {
        let echo = UdpEcho::spawn("127.0.0.1:0");
        let sidecar = Sidecar::builder()
            .policy("default.toml", &policy(echo.addr))
            .spawn();
        let (control, relay) = associate(sidecar.addr);
        let client = UdpSocket::bind("127.0.0.1:0").expect("client");
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        Self {
            echo,
            sidecar,
            control: Some(control),
            relay,
            client,
        }
    }

    fn send(&self, frag: u8, target: SocketAddr, payload: &[u8]) {
        self.client
            .send_to(&datagram(frag, target, payload), self.relay)
            .expect("send");
    }

    /// Sends `payload` to the echo server; true if the echo came back.
    fn ping(&self, payload: &[u8]) -> bool {
        self.send(0, self.echo.addr, payload);
        recv(&self.client).is_some_and(|r| r.ends_with(payload))
    }
}

fn echo_direct(echo: SocketAddr) -> String {
    policy_for(echo, "127.0.0.1:1".parse().expect("addr"))
}

#[test]
fn only_the_client_may_use_the_association_and_frag_is_dropped() {
    let h = Handmade::open(echo_direct);
    h.send(0, h.echo.addr, b"mine");
    let reply = recv(&h.client).expect("echo through veil");
    assert_eq!(&reply[..4], &[0, 0, 0, 1], "reply header RSV RSV FRAG ATYP");
    assert!(reply.ends_with(b"mine"));

    // Another socket on the same host, other port: nothing relayed, nothing answered.
    let intruder = UdpSocket::bind("127.0.0.1:0").expect("intruder");
    intruder
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    intruder
        .send_to(&datagram(0, h.echo.addr, b"theirs"), h.relay)
        .expect("send");
    assert_eq!(recv(&intruder), None);
    // Another source address entirely.
    let other = UdpSocket::bind("127.0.0.2:0").expect("other address");
    other
        .send_to(&datagram(0, h.echo.addr, b"spoof"), h.relay)
        .expect("send");

    // FRAG != 0 is dropped.
    h.send(1, h.echo.addr, b"frag");
    // Malformed: truncated address.
    h.client
        .send_to(&[0, 0, 0, 1, 127, 0], h.relay)
        .expect("send");
    assert_eq!(recv(&h.client), None);

    std::thread::sleep(Duration::from_millis(100));
    let payloads: Vec<Vec<u8>> = h.echo.seen().into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![b"mine".to_vec()]);
    let log = h.sidecar.stop().join("\n");
    for counter in [
        "dropped_foreign_source\" value=2",
        "dropped_fragmented\" value=1",
        "dropped_malformed\" value=1",
    ] {
        assert!(log.contains(counter), "{counter}: {log}");
    }
}

#[test]
fn association_ends_with_its_control_connection() {
    let mut h = Handmade::open(echo_direct);
    assert!(h.ping(b"before"));
    drop(h.control.take());
    // RFC 1928 §7: the association terminates with the TCP connection (veil: within 100 ms).
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        h.send(0, h.echo.addr, b"after");
    }
    assert_eq!(recv(&h.client), None);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        h.echo.seen().iter().all(|(_, p)| p != b"after"),
        "datagrams were relayed after the control connection closed"
    );
    assert!(
        h.sidecar
            .wait_log(&["udp association closed"], Duration::from_secs(1))
            .is_some()
    );
}

fn echo_only_with(limit: &str) -> impl FnOnce(SocketAddr) -> String {
    move |echo| {
        format!(
            "fallback = \"block\"\n[limits]\n{limit}\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"127.0.0.0/8\"]\nports = [{}]\n",
            echo.port()
        )
    }
}

#[test]
fn flow_table_is_bounded_per_association() {
    let h = Handmade::open(echo_only_with("max_flows_per_association = 2"));
    // Two flows fill the table (the second is blocked by the fallback, but still a flow).
    assert!(h.ping(b"a"));
    h.send(0, "127.0.0.1:9".parse().expect("addr"), b"b");
    h.send(0, "127.0.0.9:9".parse().expect("addr"), b"c");
    // The known flow keeps working.
    assert!(h.ping(b"d"));
    let log = h.sidecar.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_flow_limit\" value=1"),
        "{log}"
    );
}

#[test]
fn ipv6_targets_from_pysocks() {
    let echo = UdpEcho::spawn("[::1]:0");
    let sidecar = Sidecar::builder()
        .policy("default.toml", &echo_direct(echo.addr))
        .spawn();
    let out = pysocks_udp(sidecar.addr, &[&format!("[::1]:{}:six", echo.addr.port())]);
    assert_eq!(
        lines(&out),
        vec![format!("reply ::1:{} six", echo.addr.port())]
    );
}

#[test]
fn packet_rate_limit_applies_per_user() {
    let h = Handmade::open(echo_only_with("max_packets_per_second = 20"));
    // 200 datagrams in a burst: the bucket holds 20.
    for i in 0..200u32 {
        h.send(0, h.echo.addr, &i.to_be_bytes());
    }
    std::thread::sleep(Duration::from_millis(300));
    let delivered = h.echo.seen().len();
    // 20 from the full bucket, plus what refills at 20/s while the burst is sent.
    assert!(
        (20..=30).contains(&delivered),
        "delivered {delivered} of 200"
    );
    let log = h.sidecar.stop().join("\n");
    let want = format!("counter=\"dropped_rate_limit\" value={}", 200 - delivered);
    assert!(log.contains(&want), "{log}");
}

#[test]
fn reload_changes_live_flows_and_a_bad_policy_changes_nothing() {
    let h = Handmade::open(echo_direct);
    assert!(h.ping(b"1"));

    // A broken policy: refused, the old one keeps running.
    let default = h.sidecar.policy_path().join("default.toml");
    std::fs::write(&default, "fallback = \"nope\"\n").expect("write");
    h.sidecar.hangup();
    let refused = ["policy reload refused", "default.toml:1:12: fallback"];
    assert!(
        h.sidecar
            .wait_log(&refused, Duration::from_secs(3))
            .is_some()
    );
    assert!(h.ping(b"2"), "the running policy must survive a bad reload");

    // A stricter policy: the live flow is cut on its next packet.
    std::fs::write(&default, "fallback = \"block\"\n").expect("write");
    h.sidecar.hangup();
    let reloaded = ["policy reloaded", "generation=2"];
    assert!(
        h.sidecar
            .wait_log(&reloaded, Duration::from_secs(3))
            .is_some()
    );
    assert!(!h.ping(b"3"), "a flow the new policy blocks must stop");
    let cut = ["verdict=block", "default.toml fallback"];
    assert!(h.sidecar.wait_log(&cut, Duration::from_secs(2)).is_some());
}

/// Through the relay, who may reach a SOCKS5 client is the relay's `inbound_filter`, end to end.
/// Under the default (TURN-like permissions by IP), a sender at an IP the client has sent to
/// gets through from any port — as a peer-reflexive ICE candidate needs — and is handed to the
/// client with its own address; a sender at any other IP is dropped at the relay.
#[test]
fn relayed_replies_come_from_any_port_of_a_contacted_ip_and_no_other_ip() {
    let pki = Pki::generate("localhost");
    let relay = spawn_relay(
        None,
        &pki.relay_config("relay.toml", "127.0.0.1:0", "allow = [\"127.0.0.0/8\"]\n"),
    );
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let sidecar = Sidecar::builder()
        .policy("default.toml", "fallback = \"relay\"\n")
        .relay(pki.link(relay.addr, "localhost"))
        .spawn();
    assert!(
        sidecar
            .wait_log(&["tunnel connected"], Duration::from_secs(10))
            .is_some()
    );
    let (_control, udp) = associate(sidecar.addr);
    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    client
        .send_to(&datagram(0, echo.addr, b"hello"), udp)
        .expect("send");
    let reply = recv(&client).expect("the echo through the relay");
    assert!(reply.ends_with(b"hello"));
    let public = echo.seen()[0].0;
    assert_eq!(public.ip().to_string(), "127.0.0.1", "the relay's address");

    // Same IP as the echo, another port: never sent to, admitted.
    let neighbour = UdpSocket::bind("127.0.0.2:0").expect("neighbour");
    neighbour.send_to(b"knock", public).expect("send");
    let got = recv(&client).expect("a sender at a contacted IP reaches the client");
    assert_eq!(
        got,
        datagram(0, neighbour.local_addr().expect("addr"), b"knock")
    );
    // Another IP: dropped at the relay.
    let stranger = UdpSocket::bind("127.0.0.3:0").expect("stranger");
    for _ in 0..3 {
        stranger.send_to(b"let me in", public).expect("send");
    }
    assert_eq!(recv(&client), None, "a stranger got through");
    drop(sidecar);
    let log = relay.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_inbound_filter\" value=3"),
        "{log}"
    );
}

/// Runs the victim (`nobody`) and the attacker (`daemon`, whose policy is the same file but
/// who must never use nobody's association) of `socks5_race.py`; returns their outputs.
fn race(sidecar: &Sidecar, echo: &UdpEcho, declare: bool, victim_first: bool) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    if victim_first {
        std::fs::write(dir.path().join("go"), "").expect("go");
    }
    let script = support::client_script("socks5_race.py");
    let as_user = |user: &str, group: &str| {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            &format!("--reuid={user}"),
            &format!("--regid={group}"),
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(&script);
        c
    };
    let victim = as_user("nobody", "nogroup")
        .args([
            "victim",
            &sidecar.addr.port().to_string(),
            &echo.addr.port().to_string(),
            if declare { "1" } else { "0" },
        ])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("victim");
    let mut attacker = as_user("daemon", "daemon");
    attacker
        .args(["attacker", &echo.addr.port().to_string()])
        .arg(dir.path());
    if victim_first {
        attacker.arg("after");
    }
    let attacker = attacker.output().expect("attacker");
    let victim = victim.wait_with_output().expect("victim");
    (
        String::from_utf8_lossy(&victim.stdout).trim().to_owned(),
        String::from_utf8_lossy(&attacker.stdout).trim().to_owned(),
    )
}

#[test]
fn another_local_user_cannot_take_over_an_association_in_either_order() {
    assert!(support::is_root(), "needs root to run clients as two users");
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let sidecar = Sidecar::builder()
        .policy(
            "default.toml",
            &policy_for(echo.addr, "127.0.0.1:9".parse().expect("addr")),
        )
        .spawn();
    for declare in [false, true] {
        for victim_first in [false, true] {
            let case = format!("declared port: {declare}, victim first: {victim_first}");
            let (victim, attacker) = race(&sidecar, &echo, declare, victim_first);
            assert_eq!(victim, "got victim", "{case}");
            assert_eq!(attacker, "none", "{case}");
        }
    }
    assert!(
        echo.seen().iter().all(|(_, p)| p == b"victim"),
        "the attacker's datagram went out: {:?}",
        echo.seen()
    );
    // Attacker first without a declared port: refused for its socket's owner; with one, for
    // its port (before any lookup); second, for not being the client.
    let metrics = sidecar.log().join("\n");
    assert!(
        metrics.contains("reason=\"foreign_owner\""),
        "no refusal logged: {metrics}"
    );
}

/// One user's idle connections take at most its share of the server's slots (an eighth, at
/// least 64): another user's association is served at once.
#[test]
fn one_users_idle_connections_do_not_keep_another_user_waiting() {
    assert!(
        support::is_root(),
        "needs root to run the hoarder as another user"
    );
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sidecar.toml");
    std::fs::write(&config, "max_sessions = 128\n").expect("config");
    let sidecar = Sidecar::builder()
        .policy(
            "default.toml",
            &policy_for(echo.addr, "127.0.0.1:9".parse().expect("addr")),
        )
        .config(&config)
        .spawn();
    let mut hoarder = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(support::client_script("socks5_hoarder.py"))
        .args([sidecar.addr.port().to_string(), "300".to_owned()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hoarder");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hoarder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("hoarder output");
    assert!(line.starts_with("holding"), "{line}");
    // root, another user, gets its association and its echo at once.
    let out = pysocks_udp(
        sidecar.addr,
        &["--timeout", "2", &format!("{}:root", echo.addr)],
    );
    let _ = hoarder.kill();
    let _ = hoarder.wait();
    assert_eq!(lines(&out), vec![format!("reply {} root", echo.addr)]);
    assert!(
        sidecar
            .log()
            .iter()
            .any(|l| l.contains("its user holds its share of the sessions")
                && l.contains("limit=64")),
        "{:?}",
        sidecar.log().iter().rev().take(10).collect::<Vec<_>>()
    );
}
