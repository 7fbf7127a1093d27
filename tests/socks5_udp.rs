//! SOCKS5 UDP ASSOCIATE through the real `veil` binary, with the unmodified PySocks client and
//! with hand-made hostile datagrams.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;
use support::{Sidecar, UdpEcho, pysocks_udp};

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

#[test]
fn only_the_client_may_use_the_association_and_frag_is_dropped() {
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let sidecar = Sidecar::builder()
        .policy(
            "default.toml",
            &policy_for(echo.addr, "127.0.0.1:1".parse().expect("addr")),
        )
        .spawn();
    let (_control, relay) = associate(sidecar.addr);

    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    client
        .send_to(&datagram(0, echo.addr, b"mine"), relay)
        .expect("send");
    let reply = recv(&client).expect("echo through veil");
    assert_eq!(&reply[..4], &[0, 0, 0, 1], "reply header RSV RSV FRAG ATYP");
    assert!(reply.ends_with(b"mine"));

    // Another socket on the same host, other port: nothing relayed, nothing answered.
    let intruder = UdpSocket::bind("127.0.0.1:0").expect("intruder");
    intruder
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    intruder
        .send_to(&datagram(0, echo.addr, b"theirs"), relay)
        .expect("send");
    assert_eq!(recv(&intruder), None);
    // Another source address entirely.
    let other = UdpSocket::bind("127.0.0.2:0").expect("other address");
    other
        .send_to(&datagram(0, echo.addr, b"spoof"), relay)
        .expect("send");

    // FRAG != 0 is dropped.
    client
        .send_to(&datagram(1, echo.addr, b"frag"), relay)
        .expect("send");
    // Malformed: truncated address.
    client.send_to(&[0, 0, 0, 1, 127, 0], relay).expect("send");
    assert_eq!(recv(&client), None);

    std::thread::sleep(Duration::from_millis(100));
    let payloads: Vec<Vec<u8>> = echo.seen().into_iter().map(|(_, p)| p).collect();
    assert_eq!(payloads, vec![b"mine".to_vec()]);
    let log = sidecar.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_foreign_source\" value=2"),
        "{log}"
    );
    assert!(
        log.contains("counter=\"dropped_fragmented\" value=1"),
        "{log}"
    );
    assert!(
        log.contains("counter=\"dropped_malformed\" value=1"),
        "{log}"
    );
}

#[test]
fn association_ends_with_its_control_connection() {
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let sidecar = Sidecar::builder()
        .policy(
            "default.toml",
            &policy_for(echo.addr, "127.0.0.1:1".parse().expect("addr")),
        )
        .spawn();
    let (control, relay) = associate(sidecar.addr);
    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    client
        .send_to(&datagram(0, echo.addr, b"before"), relay)
        .expect("send");
    assert!(recv(&client).is_some());

    drop(control);
    // RFC 1928 §7: the association terminates with the TCP connection (veil: within 100 ms).
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let _ = client.send_to(&datagram(0, echo.addr, b"after"), relay);
    }
    assert_eq!(recv(&client), None);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        echo.seen().iter().all(|(_, p)| p != b"after"),
        "datagrams were relayed after the control connection closed"
    );
    assert!(
        sidecar
            .wait_log(&["udp association closed"], Duration::from_secs(1))
            .is_some()
    );
}

#[test]
fn flow_table_is_bounded_per_association() {
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let text = format!(
        "fallback = \"block\"\n[limits]\nmax_flows_per_association = 2\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"127.0.0.0/8\"]\nports = [{}]\n",
        echo.addr.port()
    );
    let sidecar = Sidecar::builder().policy("default.toml", &text).spawn();
    let (_control, relay) = associate(sidecar.addr);
    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    // Two flows fill the table (the second is blocked by the fallback, but still a flow).
    client
        .send_to(&datagram(0, echo.addr, b"a"), relay)
        .expect("send");
    assert!(recv(&client).is_some());
    client
        .send_to(
            &datagram(0, "127.0.0.1:9".parse().expect("addr"), b"b"),
            relay,
        )
        .expect("send");
    client
        .send_to(
            &datagram(0, "127.0.0.9:9".parse().expect("addr"), b"c"),
            relay,
        )
        .expect("send");
    // The known flow keeps working.
    client
        .send_to(&datagram(0, echo.addr, b"d"), relay)
        .expect("send");
    assert!(recv(&client).is_some_and(|r| r.ends_with(b"d")));
    let log = sidecar.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_flow_limit\" value=1"),
        "{log}"
    );
}
