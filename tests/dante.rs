//! The same PySocks cases and hand-made probes against Dante (the reference SOCKS5 server) and
//! veil, side by side. Where the two differ, the difference is asserted and explained, so a change
//! in either shows up here. The README's "veil and Dante" table comes from this test.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use support::dante::{Dante, free_port};
use support::{Sidecar, UdpEcho, client_script, pysocks_udp, python};

fn probe(server: SocketAddr, closed_port: u16) -> BTreeMap<String, String> {
    let out = Command::new(python())
        .arg(client_script("socks5_probe.py"))
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .arg(closed_port.to_string())
        .output()
        .expect("run probe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn veil_and_dante_side_by_side() {
    let echo = UdpEcho::spawn("127.0.0.1:0");
    let closed = free_port();
    let dante = Dante::start().expect("Dante");
    let veil = Sidecar::builder()
        .policy(
            "default.toml",
            "fallback = \"relay\"\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"127.0.0.0/8\"]\n",
        )
        .spawn();

    // The PySocks UDP case works the same through both.
    for server in [dante.addr, veil.addr] {
        let out = pysocks_udp(
            server,
            &[
                &format!("{}:ping", echo.addr),
                &format!("localhost:{}:name", echo.addr.port()),
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("reply {0} ping\nreply {0} name\n", echo.addr),
            "through {server}"
        );
    }

    let d = probe(dante.addr, closed);
    let v = probe(veil.addr, closed);
    let same = |k: &str| {
        assert_eq!(
            d.get(k),
            v.get(k),
            "{k}: dante {:?} veil {:?}",
            d.get(k),
            v.get(k)
        )
    };
    // The same: a truncated request gets no reply, a password-only greeting gets X'FF'.
    same("truncated-domain");
    same("password-only-offered");
    assert_eq!(v["password-only-offered"], "05ff");

    // Differences, each on purpose:
    // BIND: Dante serves it; veil answers X'07' (an inbound TCP listener has no place in a
    // calling-app privacy proxy).
    assert!(
        d["bind"].starts_with("05000500"),
        "dante bind: {}",
        d["bind"]
    );
    assert_eq!(v["bind"], "050005070001000000000000");
    // Unknown command / address type: Dante closes silently; veil sends the RFC 1928 reply
    // (X'07', X'08'), so the client learns why.
    assert_eq!(d["unknown-command"], "0500");
    assert_eq!(v["unknown-command"], "050005070001000000000000");
    assert_eq!(d["unknown-address-type"], "0500");
    assert_eq!(v["unknown-address-type"], "050005080001000000000000");
    // Bytes after a request: Dante ignores them and connects (here: refused, X'05'); veil refuses
    // the request (X'01'), since a client must wait for the reply.
    assert!(
        d["trailing-bytes"].starts_with("05000505"),
        "dante trailing: {}",
        d["trailing-bytes"]
    );
    assert_eq!(v["trailing-bytes"], "050005010001000000000000");
}
