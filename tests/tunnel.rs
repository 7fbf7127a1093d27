//! The tunnel end to end: PySocks → sidecar → QUIC/MASQUE → relay → echo servers, each in its own
//! network namespace, with captures proving that nothing leaves the client's namespace except to
//! the relay.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::netns::{Capture, Topology};
use support::{HttpServer, Pki, Sidecar, UdpEcho, pysocks_udp_in, python, spawn_relay};

const RELAY_IP: &str = "198.51.100.2";
const RELAY: &str = "198.51.100.2:4433";
const ECHO_1: &str = "203.0.113.2:7000";
const ECHO_2: &str = "203.0.113.3:7000";
const RELAY_ALL: &str = "fallback = \"relay\"\n";

/// client (192.0.2.2) — router — relay (198.51.100.2); echo (203.0.113.2 and .3).
fn topology() -> Topology {
    let mut t = Topology::new();
    t.host("c", "192.0.2.2/24", "192.0.2.1/24")
        .host("l", "198.51.100.2/24", "198.51.100.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24")
        .address("e", "203.0.113.3/24");
    t
}

/// A capture of every UDP packet on the client's link that is not to or from the relay.
fn leak_capture(t: &Topology) -> Capture {
    Capture::start(t, "c", &format!("udp and not host {RELAY_IP}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// A relay in `l` and a sidecar in `c` that relays everything, with its tunnel up.
struct Masked {
    _pki: Pki,
    config: std::path::PathBuf,
    relay: support::Daemon,
    sidecar: Sidecar,
}

impl Masked {
    fn start(t: &Topology) -> Self {
        let pki = Pki::generate(RELAY_IP);
        let config = pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.0/24\"]\n");
        let relay = spawn_relay(Some(&t.ns("l")), &config);
        let sidecar = Sidecar::builder()
            .netns(&t.ns("c"))
            .policy("default.toml", RELAY_ALL)
            .relay(pki.link(addr(RELAY), RELAY_IP))
            .spawn();
        let up = sidecar.wait_log(&["tunnel connected"], Duration::from_secs(10));
        assert!(up.is_some(), "tunnel did not come up");
        Self {
            _pki: pki,
            config,
            relay,
            sidecar,
        }
    }
}

/// A burst of equal datagrams (a video frame) crosses sidecar and relay as GSO sends: each
/// datagram must still arrive whole, once, and in order, both ways.
#[test]
fn a_burst_of_full_size_datagrams_arrives_whole_and_in_order_both_ways() {
    let t = topology();
    let _echo1 = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_1);
    let _echo2 = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_2);
    let Masked { relay, sidecar, .. } = Masked::start(&t);
    let capture = leak_capture(&t);
    let out = pysocks_udp_in(
        Some(&t.ns("c")),
        sidecar.addr,
        &[
            "--timeout",
            "3",
            "--burst",
            "60",
            "--size",
            "1200",
            &format!("{ECHO_1}:one"),
            &format!("{ECHO_2}:two"),
            &format!("{ECHO_1}:three"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "burst {ECHO_1} 60/60 intact\nburst {ECHO_2} 60/60 intact\nburst {ECHO_1} 60/60 intact\n"
        )
    );
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "UDP left the client other than to the relay: {leaked:?}"
    );
    drop((relay, sidecar));
}

#[test]
fn relayed_udp_is_seen_from_one_relay_address_by_every_peer() {
    let t = topology();
    let echo1 = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_1);
    let echo2 = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_2);
    let web = HttpServer::spawn_in(Some(&t.ns("e")), "203.0.113.2:8080", "via-relay");
    let Masked { relay, sidecar, .. } = Masked::start(&t);
    let capture = leak_capture(&t);

    let out = pysocks_udp_in(
        Some(&t.ns("c")),
        sidecar.addr,
        &[
            &format!("{ECHO_1}:one"),
            &format!("{ECHO_2}:two"),
            &format!("{ECHO_1}:three"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("reply {ECHO_1} one\nreply {ECHO_2} two\nreply {ECHO_1} three\n")
    );
    // Both peers saw the same relay address and port — never the client's 192.0.2.2.
    let mut sources: Vec<SocketAddr> = echo1
        .seen()
        .iter()
        .chain(echo2.seen().iter())
        .map(|(from, _)| *from)
        .collect();
    assert_eq!(sources.len(), 3);
    sources.dedup();
    assert_eq!(
        sources.len(),
        1,
        "one public address for every peer: {sources:?}"
    );
    assert_eq!(sources[0].ip().to_string(), RELAY_IP);
    // ... and it is the public address the relay announced for the bind.
    let opened = sidecar
        .wait_log(
            &["udp association open", "relay_public="],
            Duration::from_secs(2),
        )
        .expect("bind logged");
    assert!(
        opened.contains(&format!("relay_public=\"{}\"", sources[0])),
        "{opened}"
    );

    // TCP with a `relay` verdict goes through the relay too (classic CONNECT over HTTP/3).
    let curl = t
        .command("c", "curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--socks5",
            &sidecar.addr.to_string(),
            "http://203.0.113.2:8080/",
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "via-relay",
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let tcp_peers = web.peers.lock().expect("peers").clone();
    assert!(
        tcp_peers.iter().all(|p| p.ip().to_string() == RELAY_IP),
        "{tcp_peers:?}"
    );

    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "UDP left the client other than to the relay: {leaked:?}"
    );
    drop(sidecar);
    drop(relay);
}

struct Stream {
    /// (seconds since `start`, sequence number) of each echo.
    replies: Vec<(f64, u64)>,
    sent: u64,
    /// When the client started, on CLOCK_MONOTONIC.
    start: f64,
}

fn stream(t: &Topology, proxy: SocketAddr, target: &str, seconds: u32) -> std::process::Child {
    let (host, port) = target.split_once(':').expect("target");
    t.command("c", python())
        .arg(support::client_script("pysocks_stream.py"))
        .args([
            &proxy.ip().to_string(),
            &proxy.port().to_string(),
            host,
            port,
            &seconds.to_string(),
            "0.02",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stream client")
}

/// Seconds on CLOCK_MONOTONIC (Python's `time.monotonic`).
fn monotonic() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

fn finish(child: std::process::Child) -> Stream {
    let out = child.wait_with_output().expect("stream client");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut s = Stream {
        replies: Vec::new(),
        sent: 0,
        start: 0.0,
    };
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["reply", t, seq] => s
                .replies
                .push((t.parse().unwrap_or(0.0), seq.parse().unwrap_or(0))),
            ["sent", n] => s.sent = n.parse().unwrap_or(0),
            ["start", t] => s.start = t.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    s
}

#[test]
fn relay_killed_mid_stream_fails_closed_then_recovers() {
    let t = topology();
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_1);
    let Masked {
        _pki,
        config,
        relay,
        sidecar,
    } = Masked::start(&t);
    let capture = leak_capture(&t);

    let client = stream(&t, sidecar.addr, ECHO_1, 14);
    std::thread::sleep(Duration::from_secs(3));
    // Moments on CLOCK_MONOTONIC, which the client's `start` is on too.
    relay.kill();
    let killed = monotonic();
    std::thread::sleep(Duration::from_secs(3));
    let restarting = monotonic();
    let relay = spawn_relay(Some(&t.ns("l")), &config);
    let s = finish(client);
    let (killed_at, restarted_at) = (killed - s.start, restarting - s.start);
    let leaked = capture.stop();

    let before = s.replies.iter().filter(|(t, _)| *t < killed_at).count();
    let during = s
        .replies
        .iter()
        .filter(|(t, _)| *t > killed_at + 0.2 && *t < restarted_at)
        .count();
    let first_after = s
        .replies
        .iter()
        .map(|(t, _)| *t)
        .find(|t| *t > restarted_at);
    assert!(before > 50, "media flowed before the relay died: {before}");
    assert_eq!(during, 0, "nothing can be echoed while the relay is dead");
    let recovered = first_after.expect("media flows again after the relay returns");
    eprintln!(
        "relay kill: sent {} replies {} before {before}; media resumed {:.2} s after the relay restarted",
        s.sent,
        s.replies.len(),
        recovered - restarted_at
    );
    assert!(
        recovered - restarted_at < 7.0,
        "recovery took {:.1} s",
        recovered - restarted_at
    );
    assert!(
        leaked.is_empty(),
        "UDP left the client other than to the relay: {leaked:?}"
    );
    assert!(
        echo.seen()
            .iter()
            .all(|(from, _)| from.ip().to_string() == RELAY_IP)
    );
    // The new bind asked for its old port and got it: the peer still sees one address, so an
    // ICE session would survive the restart.
    let mut ports: Vec<u16> = echo.seen().iter().map(|(from, _)| from.port()).collect();
    ports.dedup();
    assert_eq!(
        ports.len(),
        1,
        "one public port across the restart: {ports:?}"
    );
    let log = sidecar.stop().join("\n");
    for l in log
        .lines()
        .filter(|l| l.contains("tunnel") || l.contains("bind"))
    {
        eprintln!("{l}");
    }
    assert!(log.contains("tunnel lost"), "{log}");
    let dropped = log
        .lines()
        .find(|l| l.contains("\"dropped_relay_unavailable\""))
        .expect("counter");
    assert!(!dropped.ends_with("value=0"), "{dropped}");
    drop(relay);
}

/// After a relay restart an app's first datagram — usually an ICE check, which the app will not
/// send again for a while — is held while a new bind opens, then sent from the same public port:
/// not dropped, and never sent any other way.
#[test]
fn the_first_datagram_after_a_relay_restart_waits_for_the_new_bind() {
    use std::io::{BufRead, Write};
    let t = topology();
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_1);
    let Masked {
        _pki,
        config,
        relay,
        sidecar,
    } = Masked::start(&t);
    let capture = leak_capture(&t);
    let mut client = t
        .command("c", python())
        .arg(support::client_script("pysocks_udp.py"))
        .args([
            &sidecar.addr.ip().to_string(),
            &sidecar.addr.port().to_string(),
            "--timeout",
            "4",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("pysocks client");
    let mut to_client = client.stdin.take().expect("stdin");
    let mut from_client = std::io::BufReader::new(client.stdout.take().expect("stdout")).lines();
    let mut exchange = |payload: &str| {
        writeln!(to_client, "{ECHO_1}:{payload}").expect("to client");
        from_client.next().and_then(Result::ok).unwrap_or_default()
    };
    assert_eq!(exchange("before"), format!("reply {ECHO_1} before"));

    relay.kill();
    std::thread::sleep(Duration::from_secs(1));
    let relay = spawn_relay(Some(&t.ns("l")), &config);
    // The sidecar notices the silence, connects to the new relay, and its old bind ends.
    let closed = sidecar.wait_log(&["relay bind closed"], Duration::from_secs(15));
    assert!(closed.is_some(), "the sidecar saw its bind end");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sidecar
        .log()
        .iter()
        .filter(|l| l.contains("tunnel connected"))
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the tunnel did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(exchange("after"), format!("reply {ECHO_1} after"));
    drop(to_client);
    let _ = client.wait();

    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "UDP left the client other than to the relay: {leaked:?}"
    );
    let mut ports: Vec<u16> = echo.seen().iter().map(|(from, _)| from.port()).collect();
    ports.dedup();
    assert_eq!(
        ports.len(),
        1,
        "one public port across the restart: {ports:?}"
    );
    let log = sidecar.stop().join("\n");
    assert!(log.contains("held_sent=1"), "{log}");
    drop(relay);
}

/// Datagrams larger than a QUIC DATAGRAM frame (a SIP INVITE with many candidates, RFC 5780's
/// PADDING, a video frame sent whole) cross as DATAGRAM capsules on the bind's request stream
/// (RFC 9297 §3.5), both ways; the peer sees the relay's address whatever the size.
#[test]
fn datagrams_of_any_size_cross_the_tunnel_both_ways() {
    let t = topology();
    let echo = UdpEcho::spawn_in(Some(&t.ns("e")), ECHO_1);
    let Masked { relay, sidecar, .. } = Masked::start(&t);
    let capture = leak_capture(&t);
    let sizes = [1200, 1413, 1500, 8000, 65_000];
    for size in sizes {
        let out = pysocks_udp_in(
            Some(&t.ns("c")),
            sidecar.addr,
            &[
                "--timeout",
                "3",
                "--burst",
                "2",
                "--size",
                &size.to_string(),
                &format!("{ECHO_1}:s{size}"),
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("burst {ECHO_1} 2/2 intact\n"),
            "{size} B through SOCKS5"
        );
    }
    let seen = echo.seen();
    assert_eq!(
        seen.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(),
        sizes.iter().flat_map(|s| [*s, *s]).collect::<Vec<_>>()
    );
    assert!(
        seen.iter()
            .all(|(from, _)| from.ip().to_string() == RELAY_IP),
        "the echo saw {:?}",
        seen.iter().map(|(f, _)| f).collect::<Vec<_>>()
    );
    let leaked = capture.stop();
    assert!(
        leaked.is_empty(),
        "UDP left the client directly: {leaked:?}"
    );
    let log = relay.stop();
    assert_eq!(
        support::final_count(&log, "dropped_too_large"),
        Some(0),
        "{log:?}"
    );
    drop(sidecar);
}
