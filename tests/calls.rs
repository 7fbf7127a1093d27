//! Proof with real calls: two masked users (alice and bob, each behind a veil sidecar in
//! transparent mode) complete a WebRTC call with aiortc — real ICE with STUN, DTLS-SRTP, Opus —
//! and a capture at the router shows that no packet carries their addresses to anyone but the
//! relay.

mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;
use support::netns::{Capture, Topology};
use support::{Pki, Sidecar, spawn_relay};

const ALICE: &str = "192.0.2.10";
const BOB: &str = "198.51.100.20";
const RELAY_IP: &str = "203.0.113.2";
const RELAY: &str = "203.0.113.2:4433";
const STUN: &str = "203.0.113.130";

fn call_python() -> PathBuf {
    let p = std::env::var_os("VEIL_CALL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/veil-test/venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: tests/run.sh installs the call clients (aiortc)",
        p.display()
    );
    p
}

fn topology() -> Topology {
    let mut t = Topology::new();
    t.host("a", "192.0.2.10/24", "192.0.2.1/24")
        .host("b", "198.51.100.20/24", "198.51.100.1/24")
        .host("l", "203.0.113.2/25", "203.0.113.1/25")
        .host("s", "203.0.113.130/25", "203.0.113.129/25");
    t
}

/// coturn's STUN server in namespace `s`; killed on drop.
struct Stun(Child);

impl Stun {
    fn start(t: &Topology) -> Self {
        let child = t
            .command("s", "turnserver")
            .args([
                "-n",
                "--stun-only",
                "--no-cli",
                "--listening-ip",
                STUN,
                "--listening-port",
                "3478",
                "--log-file",
                "stdout",
                "--simple-log",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnserver (tests/run.sh installs coturn)");
        std::thread::sleep(Duration::from_millis(700));
        Self(child)
    }
}

impl Drop for Stun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(t: &Topology, role: &str, pki: &Pki) -> Sidecar {
    let config = pki.dir.path().join(format!("sidecar-{role}.toml"));
    std::fs::write(
        &config,
        format!(
            "[relay]\naddress = \"{RELAY}\"\nserver_name = \"{RELAY_IP}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[transparent]\nusers = [\"nobody\"]\n",
            pki.path("ca.crt").display(),
            pki.path("sidecar.crt").display(),
            pki.path("sidecar.key").display()
        ),
    )
    .expect("config");
    let s = Sidecar::builder()
        .netns(&t.ns(role))
        .policy("default.toml", "fallback = \"relay\"\n")
        .config(&config)
        .spawn();
    assert!(
        s.wait_log(&["tunnel connected"], Duration::from_secs(10))
            .is_some(),
        "{role}'s tunnel"
    );
    s
}

fn peer(t: &Topology, role: &str, which: &str, signal: &std::path::Path, seconds: u32) -> Child {
    let script = std::fs::read_to_string(support::client_script("webrtc_peer.py")).expect("script");
    t.command(role, "setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(call_python())
        .arg("-c")
        .arg(script)
        .arg(which)
        .arg(signal)
        .arg(format!("stun:{STUN}:3478"))
        .arg(seconds.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("webrtc peer")
}

#[derive(Debug)]
struct Outcome {
    state: String,
    frames: u64,
    rms: f64,
    setup_ms: Option<u64>,
    candidates: Vec<String>,
}

fn outcome(child: Child) -> Outcome {
    let out = child.wait_with_output().expect("peer");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default().to_owned();
    let field = |name: &str| -> String {
        line.split(&format!("\"{name}\": "))
            .nth(1)
            .map(|rest| {
                rest.split([',', '}'])
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let candidates = line
        .split("a=candidate:")
        .skip(1)
        .map(|c| c.split('"').next().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !line.is_empty(),
        "peer printed nothing; stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Outcome {
        state: field("state"),
        frames: field("frames").parse().unwrap_or(0),
        rms: field("rms").parse().unwrap_or(0.0),
        setup_ms: field("setup_ms").parse().ok(),
        candidates,
    }
}

#[test]
fn webrtc_call_between_two_masked_users_leaks_nothing() {
    let _ = call_python();
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let relay = spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.128/25\"]\n"),
    );
    let _stun = Stun::start(&t);
    let alice = sidecar(&t, "a", &pki);
    let bob = sidecar(&t, "b", &pki);

    // IPv4 to or from alice or bob with anyone but the relay, and any IPv6 UDP at all (the
    // hosts have only link-local IPv6; ARP between router and hosts is not a leak).
    let leak_filter =
        format!("(ip and (host {ALICE} or host {BOB}) and not host {RELAY_IP}) or (ip6 and udp)");
    let leaks = Capture::start_all(&t, "r", &leak_filter);
    let all = Capture::start_all(&t, "r", "udp");
    let signal = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        signal.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let offer = peer(&t, "a", "offer", signal.path(), 5);
    let answer = peer(&t, "b", "answer", signal.path(), 5);
    let (a, b) = (outcome(offer), outcome(answer));
    let leaked = leaks.stop();
    let captured = all.stop();

    eprintln!(
        "webrtc call: captured {} packets, leaked {}; alice received {} frames (rms {}), bob {} frames (rms {}); set-up {:?} / {:?} ms",
        captured.len(),
        leaked.len(),
        a.frames,
        a.rms,
        b.frames,
        b.rms,
        a.setup_ms,
        b.setup_ms
    );
    assert_eq!(
        (a.state.as_str(), b.state.as_str()),
        ("connected", "connected"),
        "{a:?}\n{b:?}"
    );
    // Five seconds of 20 ms Opus frames each way, and not silence.
    assert!(a.frames > 150 && b.frames > 150, "{a:?}\n{b:?}");
    assert!(a.rms > 500.0 && b.rms > 500.0, "{a:?}\n{b:?}");
    // STUN from each app reports the relay's address, not the user's.
    for o in [&a, &b] {
        let srflx: Vec<&String> = o
            .candidates
            .iter()
            .filter(|c| c.contains("typ srflx"))
            .collect();
        assert!(!srflx.is_empty(), "no server-reflexive candidate: {o:?}");
        assert!(
            srflx.iter().all(|c| c.contains(&format!(" {RELAY_IP} "))),
            "{srflx:?}"
        );
    }
    assert!(
        leaked.is_empty(),
        "packets with alice's or bob's address went elsewhere than the relay: {leaked:?}"
    );
    drop(alice);
    drop(bob);
    drop(relay);
}

/// The oracle itself: the same call with no veil in the way is seen leaking.
#[test]
fn the_leak_oracle_sees_an_unprotected_call() {
    let _ = call_python();
    let t = topology();
    let _stun = Stun::start(&t);
    let leak_filter =
        format!("(ip and (host {ALICE} or host {BOB}) and not host {RELAY_IP}) or (ip6 and udp)");
    let leaks = Capture::start_all(&t, "r", &leak_filter);
    let signal = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        signal.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    let offer = peer(&t, "a", "offer", signal.path(), 2);
    let answer = peer(&t, "b", "answer", signal.path(), 2);
    let (a, b) = (outcome(offer), outcome(answer));
    let leaked = leaks.stop();
    assert_eq!(
        (a.state.as_str(), b.state.as_str()),
        ("connected", "connected"),
        "{a:?}\n{b:?}"
    );
    let direct = leaked
        .iter()
        .filter(|l| l.contains(ALICE) && l.contains(BOB))
        .count();
    eprintln!(
        "unprotected call: {} packets with the users' addresses, {direct} straight between them",
        leaked.len()
    );
    assert!(direct > 50, "the oracle must see a direct call: {leaked:?}");
}
