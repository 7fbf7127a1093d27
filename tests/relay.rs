//! `veil relay` against an independent MASQUE client (aioquic: its own QUIC and HTTP/3 stack),
//! and its refusals: no client certificate, forbidden targets in every encoding, quotas, bad
//! configuration.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use support::{
    Daemon, Pki, Sidecar, UdpEcho, client_script, pysocks_udp, python, spawn_relay, veil,
};

/// The aioquic MASQUE client, pointed at `relay`, with the sidecar's certificate or none.
fn masque_client(relay: SocketAddr, pki: &Pki, with_cert: bool) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(client_script("masque_client.py"))
        .arg(relay.ip().to_string())
        .arg(relay.port().to_string())
        .args(["--name", "localhost", "--ca"])
        .arg(pki.path("ca.crt"));
    if with_cert {
        cmd.arg("--cert")
            .arg(pki.path("sidecar.crt"))
            .arg("--key")
            .arg(pki.path("sidecar.key"));
    }
    cmd
}

fn masque(relay: SocketAddr, pki: &Pki, with_cert: bool, args: &[&str]) -> Vec<String> {
    let out = masque_client(relay, pki, with_cert)
        .args(args)
        .output()
        .expect("run aioquic client");
    assert!(
        out.status.success(),
        "aioquic client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn relay_with(pki: &Pki, extra: &str) -> Daemon {
    let config = pki.relay_config("relay.toml", "127.0.0.1:0", extra);
    spawn_relay(None, &config)
}

#[test]
fn aioquic_binds_and_compresses_through_veil_relay() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let lines = masque(relay.addr, &pki, true, &["bind", &echo.addr.to_string()]);
    let public = lines
        .iter()
        .find_map(|l| l.strip_prefix("public "))
        .expect("public address")
        .trim_matches('"')
        .to_owned();
    let want = [
        "status 200 bind ?1".to_owned(),
        format!("public \"{public}\""),
        format!("reply 2 {} plain-0", echo.addr),
        "ack 2".to_owned(),
        "ack 4".to_owned(),
        format!("reply 4 {} compressed-0", echo.addr),
    ];
    assert_eq!(lines, want);
    // The echo server saw the relay's public address of the bind, for both datagrams.
    let seen: Vec<String> = echo
        .seen()
        .iter()
        .map(|(from, _)| from.to_string())
        .collect();
    assert_eq!(seen, vec![public.clone(), public]);
}

#[test]
fn deny_by_default_drops_datagrams_and_refuses_contexts() {
    let pki = Pki::generate("localhost");
    // No allow list: loopback is denied like every special-purpose range.
    let relay = relay_with(&pki, "");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let lines = masque(relay.addr, &pki, true, &["bind", &echo.addr.to_string()]);
    assert!(
        lines.contains(&format!("no-reply {}", echo.addr)),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"close 4".to_owned()),
        "the compressed context is refused: {lines:?}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        echo.seen().is_empty(),
        "a denied target received {:?}",
        echo.seen()
    );
    let log = relay.stop().join("\n");
    assert!(log.contains("counter=\"dropped_egress\" value=1"), "{log}");
}

#[test]
fn every_forbidden_target_class_is_refused_with_proxy_status() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.2/32\"]\n");
    let forbidden = [
        // Every IPv4-embedding encoding of 127.0.0.1 and 10.0.0.1.
        "127.0.0.1:9",
        "[::ffff:127.0.0.1]:9",
        "[::127.0.0.1]:9",
        "[2002:7f00:1::]:9",
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]:9",
        "[64:ff9b::7f00:1]:9",
        "[64:ff9b:1::7f00:1]:9",
        "10.0.0.1:9",
        "[::ffff:10.0.0.1]:9",
        "[::10.0.0.1]:9",
        "[2002:a00:1::]:9",
        "[64:ff9b::a00:1]:9",
        // Unspecified, link-local (cloud metadata), CGNAT, multicast, broadcast, ULA, documentation.
        "0.0.0.0:9",
        "[::]:9",
        "[::1]:9",
        "169.254.169.254:80",
        "[fe80::1]:9",
        "100.64.0.1:9",
        "224.0.0.251:5353",
        "[ff02::fb]:5353",
        "255.255.255.255:9",
        "[fd00::1]:9",
        "192.0.2.1:9",
        "[2001:db8::1]:9",
        "172.16.0.1:9",
        "192.168.1.1:9",
        "198.18.0.1:9",
    ];
    let mut args = vec!["targets", "127.0.0.2:9"];
    args.extend(forbidden);
    let lines = masque(relay.addr, &pki, true, &args);
    assert_eq!(lines.len(), forbidden.len() + 1, "{lines:?}");
    assert_eq!(lines[0], "target 127.0.0.2:9 200 ");
    for (line, target) in lines[1..].iter().zip(forbidden) {
        assert!(
            line.starts_with(&format!(
                "target {target} 403 veil; error=destination_ip_prohibited; details="
            )),
            "{line}"
        );
    }
}

#[test]
fn no_client_certificate_no_tunnel() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let lines = masque(relay.addr, &pki, false, &["targets", "127.0.0.2:9"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("handshake-failed"), "{lines:?}");
    assert!(
        relay
            .wait_log(
                &["handshake failed", "peer sent no certificates"],
                Duration::from_secs(3)
            )
            .is_some()
    );

    // A sidecar whose certificate comes from another CA never gets a tunnel, and its relayed
    // traffic is dropped, not sent another way.
    let stranger = Pki::generate("localhost");
    let mut link = pki.link(relay.addr, "localhost");
    link.certificate = stranger.path("sidecar.crt");
    link.private_key = stranger.path("sidecar.key");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let sidecar = Sidecar::builder()
        .policy("default.toml", "fallback = \"relay\"\n")
        .relay(link)
        .spawn();
    let out = pysocks_udp(
        sidecar.addr,
        &["--timeout", "0.5", &format!("{}:x", echo.addr)],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "timeout\n");
    assert!(echo.seen().is_empty());
    // The relay refuses the certificate during or right after the handshake: the sidecar logs
    // either that it cannot reach the relay or that the tunnel was lost.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sidecar
        .log()
        .iter()
        .any(|l| l.contains("cannot reach the relay") || l.contains("tunnel lost"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no tunnel failure logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A relayed CONNECT while the relay is unreachable gets a clean SOCKS5 failure: X'03'.
    let web = support::HttpServer::spawn("never");
    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--socks5",
            &sidecar.addr.to_string(),
            &format!("http://{}/", web.addr),
        ])
        .output()
        .expect("curl");
    assert!(!curl.status.success());
    let err = String::from_utf8_lossy(&curl.stderr);
    assert!(err.contains("(3)") || err.contains("unreachable"), "{err}");
    assert!(
        web.peers.lock().expect("peers").is_empty(),
        "the relayed CONNECT went direct"
    );
    let log = sidecar.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_relay_unavailable\" value=2"),
        "{log}"
    );
}

#[test]
fn bind_quota_is_enforced_with_429() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(
        &pki,
        "allow = [\"127.0.0.0/8\"]\n[quotas]\nbinds_per_user = 2\n",
    );
    let lines = masque(relay.addr, &pki, true, &["binds", "3"]);
    // The relay serves requests concurrently: which one is refused is not fixed.
    let mut statuses: Vec<&str> = lines
        .iter()
        .map(|l| l.splitn(3, ' ').nth(2).unwrap_or(""))
        .collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [
            "200 ",
            "200 ",
            "429 veil; error=connection_limit_reached; details=\"quota for user alice\""
        ],
        "{lines:?}"
    );
}

/// A bind that carries nothing for the idle timeout (120 s, the least allowed) is ended by the
/// relay's sweep, and not long before: the connection itself is kept up by keep-alives.
#[test]
fn an_idle_bind_is_ended_after_the_idle_timeout() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(
        &pki,
        "allow = [\"127.0.0.0/8\"]\n[quotas]\nidle_timeout_seconds = 120\n",
    );
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let started = std::time::Instant::now();
    let mut client = Lingering(
        masque_client(relay.addr, &pki, true)
            .args(["--linger", "150", "bind", &echo.addr.to_string()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run aioquic client"),
    );
    assert!(
        relay
            .wait_log(&["udp tunnel open"], Duration::from_secs(20))
            .is_some()
    );
    let closed = relay.wait_log(&["udp tunnel closed"], Duration::from_secs(150));
    let after = started.elapsed();
    assert!(
        closed
            .as_deref()
            .is_some_and(|l| l.contains("reason=\"idle\"")),
        "{closed:?}\n{}",
        relay.log().join("\n")
    );
    // Swept every 5 s: ended between 120 and about 126 s after its last datagram.
    assert!(
        after >= Duration::from_secs(118) && after <= Duration::from_secs(140),
        "ended after {after:?}"
    );
    // Still lingering (its connection kept up by the relay's keep-alives) until now.
    assert!(client.0.try_wait().expect("client").is_none());
}

/// A client process killed when the test ends, however it ends.
struct Lingering(std::process::Child);

impl Drop for Lingering {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn malformed_config_stops_startup() {
    let pki = Pki::generate("localhost");
    let config = pki.relay_config("bad.toml", "127.0.0.1:0", "allow = [\"10.0.0.1/8\"]\n");
    let out = veil()
        .arg("relay")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run veil relay");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:5:10: allow[0]: expected a CIDR network without host bits, found \"10.0.0.1/8\"",
            config.display()
        )),
        "{err}"
    );
}

/// Address-dependent filtering: a bind's public address admits only peers its client has sent
/// to; anyone else's datagrams are dropped at the relay.
#[test]
fn a_bind_admits_only_peers_its_client_has_sent_to() {
    use std::io::BufRead;
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let mut child = masque_client(relay.addr, &pki, true)
        .args(["--linger", "1.5", "bind", &echo.addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("aioquic client");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut public = None;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if let Some(p) = line.strip_prefix("public ") {
            public = Some(
                p.trim_matches('"')
                    .parse::<SocketAddr>()
                    .expect("public address"),
            );
        }
        if line == "listening" {
            break;
        }
    }
    let public = public.expect("the bind's public address");
    let stranger = std::net::UdpSocket::bind("127.0.0.3:0").expect("stranger");
    for _ in 0..3 {
        stranger.send_to(b"let me in", public).expect("send");
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().expect("client").success());
    assert!(
        rest.iter().all(|l| !l.starts_with("unexpected")),
        "a stranger got through: {rest:?}"
    );
    let log = relay.stop().join("\n");
    assert!(
        log.contains("counter=\"dropped_inbound_filter\" value=3"),
        "{log}"
    );
}

/// The sidecar's QUIC client settings, from the test PKI's files.
fn quic_client(pki: &Pki) -> quinn::ClientConfig {
    let read = |f: &str| std::fs::read_to_string(pki.path(f)).expect("read PKI file");
    let ca = veil::pki::certificates(&read("ca.crt"), "ca").expect("ca");
    let certs = veil::pki::certificates(&read("sidecar.crt"), "cert").expect("cert");
    let key = veil::pki::private_key(&read("sidecar.key"), "key").expect("key");
    veil::pki::client_config(&ca, certs, key).expect("client config")
}

/// The relay's QUIC port is served by several threads, each with its own socket; the kernel
/// steers every packet to the thread that owns its connection by connection ID. Connections
/// spread over the threads, and a client whose address changes (a laptop on another network,
/// a NAT rebinding) keeps its connection: were packets spread by address, each change would
/// land on the wrong thread three times in four and be answered with a stateless reset (without
/// the steering, this test would pass by a chance of 4⁻⁹).
#[test]
fn a_threaded_relay_keeps_each_connection_on_its_thread_across_address_changes() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "threads = 4\n");
    let config = quic_client(&pki);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..16 {
            let mut endpoint =
                quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
            endpoint.set_default_client_config(config.clone());
            let conn = endpoint
                .connect(relay.addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake with the relay");
            clients.push((endpoint, conn));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let shards = loop {
            let shards: std::collections::HashSet<String> = relay
                .log()
                .iter()
                .filter(|l| l.contains("sidecar connected"))
                .filter_map(|l| l.split("shard=").nth(1))
                .filter_map(|s| s.split_whitespace().next().map(str::to_owned))
                .collect();
            let connected = relay
                .log()
                .iter()
                .filter(|l| l.contains("sidecar connected"))
                .count();
            if connected >= 16 || std::time::Instant::now() > deadline {
                assert_eq!(connected, 16, "every connection is served");
                break shards;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            shards.len() >= 2,
            "16 connections all on one thread: {shards:?}"
        );

        for (endpoint, conn) in clients.iter().take(3) {
            for change in 0..3 {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                let new = socket.local_addr().expect("addr");
                endpoint.rebind(socket).expect("rebind");
                let heard = conn.stats().udp_rx.datagrams;
                // Keep-alives go every second; the relay answers them on the new path.
                tokio::time::sleep(Duration::from_millis(1200)).await;
                assert!(
                    conn.close_reason().is_none(),
                    "change {change} to {new}: connection lost: {:?}",
                    conn.close_reason()
                );
                assert!(
                    conn.stats().udp_rx.datagrams > heard,
                    "change {change} to {new}: nothing heard from the relay"
                );
            }
        }
        for (endpoint, conn) in &clients {
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        }
    });
    let log = relay.stop();
    assert!(
        !log.iter().any(|l| l.contains("ERROR")),
        "relay errors: {log:#?}"
    );
}

/// The count a stopped relay logged for `counter` ("final count" lines).
fn final_count(log: &[String], counter: &str) -> u64 {
    support::final_count(log, counter)
        .unwrap_or_else(|| panic!("no final count of {counter} in {log:#?}"))
}

/// A user's packets are capped per second, both directions together: a burst beyond the
/// allowance is dropped and counted, while the same burst under the default quota comes back
/// whole. (The allowance is each user's own, shared by all its binds on every relay thread.)
#[test]
fn a_users_packet_rate_is_capped_and_the_excess_counted() {
    let pki = Pki::generate("localhost");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let target = echo.addr.to_string();
    let burst = |relay: &Daemon| {
        let lines = masque(relay.addr, &pki, true, &["burst", &target, "100"]);
        let last = lines.last().cloned().unwrap_or_default();
        let replies: u64 = last
            .strip_prefix("sent 100 replies ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected client output {lines:?}"));
        replies
    };

    let open = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let replies = burst(&open);
    let log = open.stop();
    assert_eq!(replies, 100, "the default quota passes a burst of 100");
    assert_eq!(final_count(&log, "dropped_quota"), 0);
    // Each echo the client got was counted once on its way in.
    assert_eq!(final_count(&log, "datagrams_in"), replies);

    let capped = relay_with(
        &pki,
        "allow = [\"127.0.0.0/8\"]\n[quotas]\npackets_per_second_per_user = 20\n",
    );
    let replies = burst(&capped);
    let log = capped.stop();
    // 20 packets' allowance (plus what a second earns), each echoed packet charged out and back.
    assert!(
        (1..=12).contains(&replies),
        "{replies} of 100 came back through an allowance of 20 packets/s"
    );
    let dropped = final_count(&log, "dropped_quota");
    assert!(dropped >= 80, "{dropped} counted over quota");
    assert_eq!(final_count(&log, "datagrams_in"), replies);
}

/// The public port of a bind, from the client's `public ADDR` line.
fn public_port(lines: &[String]) -> u16 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("public "))
        .and_then(|a| a.trim_matches('"').rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no public address in {lines:?}"))
}

/// A sidecar that restarts asks for its binds' old public ports, and the relay hands a port
/// over from an older bind of the *same user* on another connection, wherever the relay's
/// threads put the two connections; another user asking for it gets a different port and
/// the holder keeps it.
#[test]
fn a_public_port_is_handed_over_only_to_the_same_user_of_the_same_sidecar() {
    use std::io::BufRead;
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\nthreads = 4\n");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let target = echo.addr.to_string();
    // Four holder/taker pairs: each new connection lands on a random one of the four threads.
    for round in 0..4 {
        let mut holder = Lingering(
            masque_client(relay.addr, &pki, true)
                .args(["--linger", "30", "bind", &target])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run aioquic client"),
        );
        let stdout = holder.0.stdout.take().expect("stdout");
        let held: Vec<String> = std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("listening"))
            .collect();
        let port = public_port(&held);
        let port_arg = port.to_string();

        let other = masque(
            relay.addr,
            &pki,
            true,
            &[
                "--user",
                "bob",
                "--preferred-port",
                &port_arg,
                "bind",
                &target,
            ],
        );
        assert_ne!(
            public_port(&other),
            port,
            "round {round}: bob took alice's port"
        );
        assert!(
            holder.0.try_wait().expect("holder").is_none(),
            "round {round}: the holder's client ended"
        );

        // Another machine's sidecar, speaking for the same user: not the same sidecar, so it
        // cannot take the port (it would take the user's calls).
        let out = masque_client(relay.addr, &pki, false)
            .arg("--cert")
            .arg(pki.path("other.crt"))
            .arg("--key")
            .arg(pki.path("other.key"))
            .args(["--preferred-port", &port_arg, "bind", &target])
            .output()
            .expect("aioquic client");
        let stranger: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_ne!(
            public_port(&stranger),
            port,
            "round {round}: another sidecar's certificate took alice's port"
        );
        assert!(
            holder.0.try_wait().expect("holder").is_none(),
            "round {round}: the holder's bind ended for another sidecar"
        );

        let taker = masque(
            relay.addr,
            &pki,
            true,
            &["--preferred-port", &port_arg, "bind", &target],
        );
        assert_eq!(
            public_port(&taker),
            port,
            "round {round}: alice's new connection did not get her port back\n{}",
            relay.log().join("\n")
        );
        assert!(
            taker.iter().any(|l| l.starts_with("reply 2 ")),
            "round {round}: no echo through the taken-over port: {taker:?}"
        );
    }
    let handed = relay
        .log()
        .iter()
        .filter(|l| l.contains("public port taken over"))
        .count();
    assert_eq!(handed, 4, "{}", relay.log().join("\n"));
}

/// aioquic sends datagrams of every size as DATAGRAM capsules on the bind's request stream
/// (RFC 9297 §3.5); the relay sends them on, and answers each echo as a DATAGRAM frame where one
/// fits and as a capsule where none does.
#[test]
fn aioquic_datagram_capsules_of_any_size_are_relayed_both_ways() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let lines = masque(
        relay.addr,
        &pki,
        true,
        &[
            "capsules",
            &echo.addr.to_string(),
            "500",
            "1413",
            "8000",
            "65000",
        ],
    );
    assert_eq!(
        lines,
        [
            "status 200",
            "echo 500 frame intact",
            "echo 1413 capsule intact",
            "echo 8000 capsule intact",
            "echo 65000 capsule intact",
        ]
    );
    let sizes: Vec<usize> = echo.seen().iter().map(|(_, d)| d.len()).collect();
    assert_eq!(sizes, [500, 1413, 8000, 65_000]);
    let log = relay.stop();
    assert_eq!(final_count(&log, "datagrams_out"), 4);
    assert_eq!(final_count(&log, "dropped_too_large"), 0);
}

/// Certificates say what they are for: the relay's own certificate (server authentication
/// only) is refused as a client certificate, while the sidecar's (client authentication) is
/// accepted.
#[test]
fn the_relays_own_certificate_is_not_accepted_as_a_clients() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let out = Command::new(python())
        .arg(client_script("masque_client.py"))
        .arg(relay.addr.ip().to_string())
        .arg(relay.addr.port().to_string())
        .args(["--name", "localhost", "--ca"])
        .arg(pki.path("ca.crt"))
        .arg("--cert")
        .arg(pki.path("relay.crt"))
        .arg("--key")
        .arg(pki.path("relay.key"))
        .args(["bind", &echo.addr.to_string()])
        .output()
        .expect("aioquic client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("status 200"),
        "the relay accepted its own certificate from a client: {text}"
    );
    assert!(echo.seen().is_empty());
    let good = masque(relay.addr, &pki, true, &["bind", &echo.addr.to_string()]);
    assert_eq!(good.first().map(String::as_str), Some("status 200 bind ?1"));
}

/// Hostile request fields get an answer, never silence, and cannot forge log lines: a target
/// with a NUL, newline or carriage return is a 400, so is a `veil-user` outside the user-name
/// characters; each refusal is logged with the client's address (and the user, once known).
#[test]
fn hostile_targets_and_user_names_are_refused_with_400_and_logged_with_the_client() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let paths: Vec<String> = ["%00", "%0A", "%0D"]
        .iter()
        .map(|c| format!("/.well-known/masque/udp/127.0.0.2{c}x/9/"))
        .collect();
    let mut args = vec!["paths"];
    args.extend(paths.iter().map(String::as_str));
    let lines = masque(relay.addr, &pki, true, &args);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert!(l.contains(" 400 "), "{l}");
    }
    for user in ["al ice", "bob\"x", "eve=\"root\""] {
        let out = masque_client(relay.addr, &pki, true)
            .args([
                "--user",
                user,
                "paths",
                "/.well-known/masque/udp/127.0.0.2/9/",
            ])
            .output()
            .expect("aioquic client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(" 400 "), "{user:?}: {text}");
    }
    let log = relay.stop();
    let refusals: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("request refused"))
        .collect();
    assert_eq!(refusals.len(), 6, "{log:#?}");
    assert!(
        refusals.iter().all(|l| l.contains("client=127.0.0.1:")),
        "{refusals:#?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("user=eve") || l.contains("user=al ice")),
        "a refused user name reached the log as a field: {log:#?}"
    );
}

/// A floating address that moves to the relay's host after the relay started becomes one of
/// its own at once: a client can no longer reach a service there, though it could while the
/// address belonged to another host (the positive control).
#[test]
fn an_address_the_relay_host_gains_after_start_is_its_own() {
    use support::netns::Topology;
    const FLOATING: &str = "10.99.0.5";
    let mut t = Topology::new();
    t.host("c", "192.0.2.2/24", "192.0.2.1/24")
        .host("l", "198.51.100.2/24", "198.51.100.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24");
    let pki = Pki::generate("198.51.100.2");
    let relay = spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config(
            "relay.toml",
            "198.51.100.2:4433",
            "allow = [\"10.99.0.0/24\"]\n",
        ),
    );
    let ip = |args: &[&str]| {
        let ok = Command::new("ip").args(args).status().expect("ip");
        assert!(ok.success(), "ip {args:?}");
    };
    let client_ns = t.ns("c");
    let bind_from_client = || -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &client_ns])
            .arg(python())
            .arg(client_script("masque_client.py"))
            .args(["198.51.100.2", "4433", "--name", "198.51.100.2", "--ca"])
            .arg(pki.path("ca.crt"))
            .arg("--cert")
            .arg(pki.path("sidecar.crt"))
            .arg("--key")
            .arg(pki.path("sidecar.key"))
            .args(["bind", &format!("{FLOATING}:7000")])
            .output()
            .expect("aioquic client");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    // The address on another host: reachable.
    let (router, e_ns) = (t.ns("r"), t.ns("e"));
    let via_e = t.gateway_iface("e");
    t.address("e", &format!("{FLOATING}/32"));
    ip(&[
        "-n",
        &router,
        "route",
        "add",
        &format!("{FLOATING}/32"),
        "dev",
        &via_e,
    ]);
    let elsewhere = support::UdpEcho::spawn_in(Some(&e_ns), &format!("{FLOATING}:7000"));
    let lines = bind_from_client();
    assert!(
        lines.contains(&format!("reply 2 {FLOATING}:7000 plain-0")),
        "positive control: {lines:?}"
    );
    drop(elsewhere);
    // The address moves to the relay's host, where a service listens on it.
    ip(&[
        "-n",
        &t.ns("e"),
        "addr",
        "del",
        &format!("{FLOATING}/32"),
        "dev",
        &t.iface("e"),
    ]);
    t.address("l", &format!("{FLOATING}/32"));
    let on_relay = support::UdpEcho::spawn_in(Some(&t.ns("l")), &format!("{FLOATING}:7000"));
    assert!(
        relay
            .wait_log(
                &["the host's addresses changed", FLOATING],
                Duration::from_secs(5)
            )
            .is_some(),
        "the relay did not notice the new address"
    );
    let lines = bind_from_client();
    assert!(
        lines.contains(&format!("no-reply {FLOATING}:7000")),
        "{lines:?}"
    );
    assert!(
        on_relay.seen().is_empty(),
        "a service on the relay's host was reached: {:?}",
        on_relay.seen()
    );
    let log = relay.stop().join("\n");
    assert!(log.contains("counter=\"dropped_egress\" value=1"), "{log}");
}

/// With `[speaks_for]`, a sidecar's certificate may act only for the users listed for its
/// common name: `veil-user` is no longer whatever a valid certificate says.
#[test]
fn a_certificate_speaks_only_for_its_listed_users() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(
        &pki,
        "allow = [\"127.0.0.0/8\"]\n[speaks_for]\n\"sidecar\" = [\"alice\"]\n",
    );
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let target = echo.addr.to_string();
    let alice = masque(relay.addr, &pki, true, &["bind", &target]);
    assert_eq!(
        alice.first().map(String::as_str),
        Some("status 200 bind ?1")
    );
    let bob = masque(relay.addr, &pki, true, &["--user", "bob", "bind", &target]);
    assert!(
        bob.first().is_some_and(|l| l.starts_with("status 403")),
        "{bob:?}"
    );
    let out = masque_client(relay.addr, &pki, false)
        .arg("--cert")
        .arg(pki.path("other.crt"))
        .arg("--key")
        .arg(pki.path("other.key"))
        .args(["bind", &target])
        .output()
        .expect("aioquic client");
    let other = String::from_utf8_lossy(&out.stdout);
    assert!(other.starts_with("status 403"), "{other}");
    let log = relay.stop().join("\n");
    assert!(
        log.contains("certificate other may not speak for user alice"),
        "{log}"
    );
}

/// One authenticated request cannot grow the relay's memory without bound: a HEADERS frame
/// announcing 2^40 bytes is stopped once the request has sent 64 KiB unanswered (without the
/// budget the same client pushes all 64 MiB in and RSS grows by 15 MB or more). RSS is printed
/// before and after.
#[test]
fn hostile_requests_leave_the_relays_memory_flat() {
    let pki = Pki::generate("localhost");
    let relay = relay_with(&pki, "allow = [\"127.0.0.0/8\"]\n");
    let before = relay.rss_kib();
    let lines = masque(relay.addr, &pki, true, &["bigheaders", "64"]);
    std::thread::sleep(Duration::from_millis(500));
    let after = relay.rss_kib();
    eprintln!(
        "relay RSS: {before} KiB before, {after} KiB after 64 MiB of announced headers ({lines:?})"
    );
    assert_eq!(lines, ["stopped"], "the relay took the whole frame");
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // 20,000 COMPRESSION_CLOSE capsules on one bind: the request ends at the cap.
    let before = relay.rss_kib();
    let lines = masque(relay.addr, &pki, true, &["closes", "20000"]);
    let after = relay.rss_kib();
    eprintln!(
        "relay RSS: {before} KiB before, {after} KiB after 20,000 COMPRESSION_CLOSE ({lines:?})"
    );
    assert_eq!(lines, ["ended"]);
    assert!(
        after < before + 4 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert!(
        relay
            .wait_log(&["more than 1024 contexts closed"], Duration::from_secs(2))
            .is_some()
    );
    // Requests whose headers never finish are dropped after 10 s: on one connection, a second
    // round of 1,000 reuses what the first one held instead of adding to it.
    let mut client = masque_client(relay.addr, &pki, true)
        .args(["--linger", "11", "unfinished", "1000", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("aioquic client");
    let stdout = client.stdout.take().expect("stdout");
    let mut rss = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
        if line.ends_with("done") {
            rss.push(relay.rss_kib());
        }
    }
    let _ = client.wait();
    eprintln!("relay RSS after each round of 1,000 unfinished requests: {rss:?} KiB");
    assert_eq!(rss.len(), 2, "{rss:?}");
    assert!(
        rss[1] < rss[0] + 4 * 1024,
        "RSS grew from {} to {} KiB",
        rss[0],
        rss[1]
    );
    assert!(
        relay
            .wait_log(
                &["headers not complete within 10 s"],
                Duration::from_secs(2)
            )
            .is_some()
    );
    // 2,000 unfinished requests on one connection at once: at most 1,024 are set up (so at most
    // 1,024 budgets are ever buffered), the rest refused.
    let before = relay.rss_kib();
    let lines = masque(
        relay.addr,
        &pki,
        true,
        &["--linger", "2", "unfinished", "2000", "1", "1000"],
    );
    let after = relay.rss_kib();
    eprintln!(
        "relay RSS: {before} KiB before, {after} KiB with 2,000 unfinished requests at once ({lines:?})"
    );
    assert_eq!(lines, ["round 1 done"]);
    assert!(
        relay
            .wait_log(&["too many requests being set up"], Duration::from_secs(2))
            .is_some()
    );
    // The relay still serves.
    let echo = UdpEcho::spawn("127.0.0.2:0");
    let good = masque(relay.addr, &pki, true, &["bind", &echo.addr.to_string()]);
    assert_eq!(good.first().map(String::as_str), Some("status 200 bind ?1"));
}
