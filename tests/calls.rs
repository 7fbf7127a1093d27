//! Proof with real calls: two masked users (alice and bob, each behind a veil sidecar in
//! transparent mode) complete a WebRTC call with aiortc — real ICE with STUN, DTLS-SRTP, Opus —
//! and a capture at the router shows that no packet carries their addresses to anyone but the
//! relay.

mod support;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;
use support::netns::{Capture, Topology};
use support::sip::{Baresip, SIP_SERVER, SipServer};
use support::{Pki, Sidecar, spawn_relay};

const ALICE: &str = "192.0.2.10";
const BOB: &str = "198.51.100.20";
const RELAY_IP: &str = "203.0.113.2";
const RELAY: &str = "203.0.113.2:4433";
const STUN: &str = "203.0.113.130";

/// The leak oracle: any IPv4 packet *sent by* alice's or bob's address to anything but the
/// relay (which includes anything arriving at one of them from the other), and any IPv6 UDP at
/// all (the hosts have only link-local IPv6). ARP, and the router's own ICMP errors to them, are
/// not leaks.
fn leak_filter() -> String {
    format!(
        "(ip and (src host {ALICE} or src host {BOB}) and not dst host {RELAY_IP}) or (ip6 and udp)"
    )
}

/// Calls are CPU-heavy (Opus in Python): one at a time, so that timing is the network's.
static ONE_CALL_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CALL_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

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
        // Wait until it really listens: a STUN request lost at start leaves an app without its
        // server-reflexive candidate.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ss = t
                .command("s", "ss")
                .args(["-Hlun", "sport", "= :3478"])
                .output()
                .expect("ss");
            if !ss.stdout.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "turnserver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
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
    sidecar_with(t, role, pki, "")
}

/// A sidecar for `role` with `transparent` lines added to its `[transparent]` section.
fn sidecar_with(t: &Topology, role: &str, pki: &Pki, transparent: &str) -> Sidecar {
    let config = pki.dir.path().join(format!("sidecar-{role}.toml"));
    std::fs::write(
        &config,
        format!(
            "[relay]\naddress = \"{RELAY}\"\nserver_name = \"{RELAY_IP}\"\nca = \"{}\"\ncertificate = \"{}\"\nprivate_key = \"{}\"\n[transparent]\nusers = [\"nobody\"]\nports_file = \"ports-{role}\"\n{transparent}",
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

/// Two masked users (alice and bob, each behind a transparent sidecar), the relay and the STUN
/// server: where every call test starts. Dropped in this order: sidecars, STUN, relay, then
/// the namespaces.
struct Masked {
    _alice: Sidecar,
    _bob: Sidecar,
    _stun: Stun,
    _relay: support::Daemon,
    _pki: Pki,
    t: Topology,
}

impl Masked {
    fn start() -> Self {
        Self::with_relay("")
    }

    /// With `extra` lines in the relay's configuration.
    fn with_relay(extra: &str) -> Self {
        let t = topology();
        let pki = Pki::generate(RELAY_IP);
        let relay = spawn_relay(
            Some(&t.ns("l")),
            &pki.relay_config(
                "relay.toml",
                RELAY,
                &format!("allow = [\"203.0.113.128/25\"]\n{extra}"),
            ),
        );
        let stun = Stun::start(&t);
        Self {
            _alice: sidecar(&t, "a", &pki),
            _bob: sidecar(&t, "b", &pki),
            _stun: stun,
            _relay: relay,
            _pki: pki,
            t,
        }
    }
}

fn peer(t: &Topology, role: &str, which: &str, signal: &std::path::Path, seconds: u32) -> Child {
    peer_with(t, role, which, signal, seconds, 5, true)
}

/// A WebRTC peer in network namespace `ns` (a confined view), as `nobody`.
fn peer_in(ns: &str, which: &str, signal: &std::path::Path, seconds: u32) -> Child {
    let script = std::fs::read_to_string(support::client_script("webrtc_peer.py")).expect("script");
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "setpriv"])
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(call_python())
        .arg("-c")
        .arg(script)
        .args([
            which,
            &signal.display().to_string(),
            &format!("stun:{STUN}:3478"),
        ])
        .arg(seconds.to_string())
        .env("PEER_FRAME_TIMEOUT", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("webrtc peer")
}

/// The signalling oracle: which of the users' own addresses appear in what the peers sent each
/// other (the offer and the answer, SDP with every ICE candidate), as `(address, file, times)`.
fn disclosed(signal: &std::path::Path) -> Vec<(&'static str, String, usize)> {
    let mut found = Vec::new();
    for file in ["offer.json", "answer.json"] {
        let text = std::fs::read_to_string(signal.join(file)).unwrap_or_default();
        assert!(text.contains("v=0"), "{file} holds no SDP: {text:?}");
        for address in [ALICE, BOB] {
            let times = text.matches(address).count();
            if times > 0 {
                found.push((address, file.to_owned(), times));
            }
        }
    }
    found
}

fn peer_with(
    t: &Topology,
    role: &str,
    which: &str,
    signal: &std::path::Path,
    seconds: u32,
    frame_timeout: u32,
    stun: bool,
) -> Child {
    let script = std::fs::read_to_string(support::client_script("webrtc_peer.py")).expect("script");
    t.command(role, "setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(call_python())
        .arg("-c")
        .arg(script)
        .arg(which)
        .arg(signal)
        .arg(if stun {
            format!("stun:{STUN}:3478")
        } else {
            "none".to_owned()
        })
        .arg(seconds.to_string())
        .env("PEER_FRAME_TIMEOUT", frame_timeout.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("webrtc peer")
}

/// A temporary directory every user may write (the apps run as `nobody`).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod");
    dir
}

#[derive(Debug)]
struct Outcome {
    state: String,
    frames: u64,
    rms: f64,
    setup_ms: Option<u64>,
    candidates: Vec<String>,
    /// Wall-clock seconds at which each audio frame arrived.
    arrivals: Vec<f64>,
}

impl Outcome {
    /// Frames that arrived between `from` and `to` (wall-clock seconds).
    fn frames_between(&self, from: f64, to: f64) -> usize {
        self.arrivals
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count()
    }

    /// The first frame after `t`.
    fn first_after(&self, t: f64) -> Option<f64> {
        self.arrivals.iter().copied().find(|a| *a > t)
    }
}

use support::unix_now as now;

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
    let start: f64 = field("start").parse().unwrap_or(0.0);
    let arrivals = line
        .split("\"times\": [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .map(|list| {
            list.split(',')
                .filter_map(|t| t.trim().parse::<f64>().ok())
                .map(|t| start + t)
                .collect()
        })
        .unwrap_or_default();
    Outcome {
        state: field("state"),
        frames: field("frames").parse().unwrap_or(0),
        rms: field("rms").parse().unwrap_or(0.0),
        setup_ms: field("setup_ms").parse().ok(),
        candidates,
        arrivals,
    }
}

#[test]
fn webrtc_call_between_two_masked_users_leaks_nothing() {
    let _ = call_python();
    let _serial = one_at_a_time();
    let m = Masked::start();
    let t = &m.t;

    let leak_filter = leak_filter();
    let leaks = Capture::start_all(t, "r", &leak_filter);
    let all = Capture::start_all(t, "r", "udp");
    let signal = open_dir();
    let offer = peer(t, "a", "offer", signal.path(), 5);
    let answer = peer(t, "b", "answer", signal.path(), 5);
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
        "{a:?}\n{b:?}\nalice's sidecar:\n{}\nbob's sidecar:\n{}",
        tunnel_excerpt(Some(&m._alice)),
        tunnel_excerpt(Some(&m._bob))
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
    // The signalling oracle's positive control: transparent interception masks the packets,
    // but the apps still name their own addresses to each other (host candidates, `c=`).
    let named = disclosed(signal.path());
    eprintln!("webrtc call, transparent: the signalling names {named:?}");
    assert!(
        named
            .iter()
            .any(|(a, f, _)| *a == ALICE && f == "offer.json")
            && named
                .iter()
                .any(|(a, f, _)| *a == BOB && f == "answer.json"),
        "the oracle must see the addresses an unconfined app signals: {named:?}"
    );
    drop(m);
}

#[test]
fn webrtc_call_between_two_confined_users_discloses_no_address() {
    let _ = call_python();
    let _serial = one_at_a_time();
    let c = Confined::start();
    let leaks = Capture::start_all(&c.t, "r", &confined_leak_filter());
    let signal = open_dir();
    let offer = peer_in(&c.views[0].0, "offer", signal.path(), 5);
    let answer = peer_in(&c.views[1].0, "answer", signal.path(), 5);
    let (a, b) = (outcome(offer), outcome(answer));
    let leaked = leaks.stop();
    let named = disclosed(signal.path());
    let placeholder = ["offer.json", "answer.json"]
        .iter()
        .filter(|f| {
            std::fs::read_to_string(signal.path().join(f))
                .unwrap_or_default()
                .contains("192.0.0.2")
        })
        .count();
    eprintln!(
        "webrtc call, confined: leaked {} packets; the signalling names {named:?}; placeholder in {placeholder} of 2; alice received {} frames, bob {}; set-up {:?} / {:?} ms",
        leaked.len(),
        a.frames,
        b.frames,
        a.setup_ms,
        b.setup_ms
    );
    assert_eq!(
        (a.state.as_str(), b.state.as_str()),
        ("connected", "connected"),
        "{a:?}\n{b:?}"
    );
    assert!(a.frames > 150 && b.frames > 150, "{a:?}\n{b:?}");
    assert!(a.rms > 500.0 && b.rms > 500.0, "{a:?}\n{b:?}");
    assert!(named.is_empty(), "the signalling named {named:?}");
    assert_eq!(
        placeholder, 2,
        "each side offers the placeholder as its host candidate"
    );
    for o in [&a, &b] {
        assert!(
            o.candidates.iter().all(|c| c.contains(" 192.0.0.2 ")
                || c.contains(&format!(" {RELAY_IP} "))
                || c.contains(" fd76:6569:6c00::2 ")),
            "a candidate names something else: {:?}",
            o.candidates
        );
    }
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
    drop(c);
}

/// The packet oracle for confined calls: the leak oracle, and anything from the placeholder
/// address on the wire.
fn confined_leak_filter() -> String {
    format!("{} or (ip and src net 192.0.0.0/30)", leak_filter())
}

/// Alice and bob confined (one view on each machine, both with the same placeholder
/// address), the relay and the STUN/SIP host. Dropped in order: sidecars, views, STUN, relay,
/// namespaces.
struct Confined {
    _alice: Sidecar,
    _bob: Sidecar,
    views: Vec<ViewNs>,
    _stun: Stun,
    _relay: support::Daemon,
    _pki: Pki,
    t: Topology,
}

impl Confined {
    fn start() -> Self {
        let t = topology();
        let pki = Pki::generate(RELAY_IP);
        let relay = spawn_relay(
            Some(&t.ns("l")),
            &pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.128/25\"]\n"),
        );
        let stun = Stun::start(&t);
        let prefix = |role: &str| format!("vc{}{}{role}-", std::process::id(), t.ns(""));
        let views = ["a", "b"]
            .iter()
            .map(|r| ViewNs(format!("{}nobody", prefix(r))))
            .collect();
        let confined = |role: &str| {
            format!(
                "confined = [\"nobody\"]\nnetns_prefix = \"{}\"\n",
                prefix(role)
            )
        };
        let alice = sidecar_with(&t, "a", &pki, &confined("a"));
        let bob = sidecar_with(&t, "b", &pki, &confined("b"));
        for s in [&alice, &bob] {
            assert!(
                s.wait_log(&["confined view ready"], Duration::from_secs(10))
                    .is_some()
            );
        }
        Self {
            _alice: alice,
            _bob: bob,
            views,
            _stun: stun,
            _relay: relay,
            _pki: pki,
            t,
        }
    }
}

/// A confined view's namespace, deleted when the test ends (the sidecar leaves it in place).
struct ViewNs(String);

impl Drop for ViewNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.0));
    }
}

/// A caller with no server-reflexive candidate (no STUN server: host candidates only) reaches
/// a masked peer when the relay is full cone (`inbound_filter = "endpoint-independent"`): her
/// first connectivity check arrives at bob's bind unsolicited, from her relay address, and ICE
/// learns it as a peer-reflexive candidate. The sidecar admits such a packet when the policy
/// relays its sender, so the relay's filter setting is what decides, end to end.
#[test]
fn a_host_only_caller_reaches_a_masked_peer_through_a_full_cone_relay() {
    let _ = call_python();
    let _serial = one_at_a_time();
    let m = Masked::with_relay("inbound_filter = \"endpoint-independent\"\n");
    let t = &m.t;
    let leaks = Capture::start_all(t, "r", &leak_filter());
    let signal = open_dir();
    let offer = peer_with(t, "a", "offer", signal.path(), 5, 5, false);
    let answer = peer(t, "b", "answer", signal.path(), 5);
    let (a, b) = (outcome(offer), outcome(answer));
    let leaked = leaks.stop();
    assert!(
        a.candidates.iter().all(|c| c.contains("typ host")),
        "alice must offer host candidates only: {a:?}"
    );
    if (a.state.as_str(), b.state.as_str()) != ("connected", "connected") {
        panic!(
            "the call did not set up\n{a:?}\n{b:?}\nbob's sidecar:\n{}",
            m._bob.status()
        );
    }
    assert!(a.frames > 150 && b.frames > 150, "{a:?}\n{b:?}");
    assert!(leaked.is_empty(), "{leaked:?}");
    drop(m);
}

/// The oracle itself: the same call with no veil in the way is seen leaking.
#[test]
fn the_leak_oracle_sees_an_unprotected_call() {
    let _ = call_python();
    let _serial = one_at_a_time();
    let t = topology();
    let _stun = Stun::start(&t);
    let leak_filter = leak_filter();
    let leaks = Capture::start_all(&t, "r", &leak_filter);
    let signal = open_dir();
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

/// What a sidecar logged about the peers' sockets, their binds and the tunnel: for a failed
/// call's message.
fn tunnel_excerpt(s: Option<&Sidecar>) -> String {
    s.map(|s| s.log())
        .unwrap_or_default()
        .into_iter()
        .filter(|l| {
            ["bind", "app socket", "tunnel", "relay"]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A fault injected into a running call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    RelayBlackholed,
    BadPolicyReloaded,
    RelayRestarted,
    SidecarRestarted,
    StricterPolicyReloaded,
}

impl Fault {
    const ALL: [Self; 5] = [
        Self::RelayBlackholed,
        Self::BadPolicyReloaded,
        Self::RelayRestarted,
        Self::SidecarRestarted,
        Self::StricterPolicyReloaded,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RelayBlackholed => "relay blackholed 10 s",
            Self::BadPolicyReloaded => "bad policy reloaded",
            Self::RelayRestarted => "relay killed and restarted",
            Self::SidecarRestarted => "alice's sidecar killed and restarted",
            Self::StricterPolicyReloaded => {
                "stricter policy reloaded (bob's relay address blocked)"
            }
        }
    }

    /// Whether the call must come through it; a stricter policy is meant to stop it.
    fn survives(self) -> bool {
        self != Self::StricterPolicyReloaded
    }
}

/// What the faults act on: the relay and the two sidecars of one topology.
struct Stage<'a> {
    t: &'a Topology,
    pki: &'a Pki,
    relay_config: PathBuf,
    relay: Option<support::Daemon>,
    alice: Option<Sidecar>,
    bob: Sidecar,
}

const OPEN_POLICY: &str = "fallback = \"relay\"\n";

impl Stage<'_> {
    fn alice(&self) -> Result<&Sidecar, String> {
        self.alice
            .as_ref()
            .ok_or_else(|| "alice's sidecar is gone".to_owned())
    }

    /// Writes alice's policy and reloads it; waits for the log line `expect`.
    fn reload_alice(&self, policy: &str, expect: &str) -> Result<(), String> {
        let s = self.alice()?;
        std::fs::write(s.policy_path().join("default.toml"), policy).map_err(|e| e.to_string())?;
        s.hangup();
        match s.wait_log(&[expect], Duration::from_secs(3)) {
            Some(_) => Ok(()),
            None => Err(format!("alice's sidecar did not log {expect:?}")),
        }
    }

    fn inject(&mut self, fault: Fault) -> Result<(), String> {
        let t = self.t;
        match fault {
            Fault::RelayBlackholed => {
                let iface = t.iface("l");
                let link = |state: &str| {
                    t.command("l", "ip")
                        .args(["link", "set", &iface, state])
                        .status()
                        .map_err(|e| e.to_string())?
                        .success()
                        .then_some(())
                        .ok_or_else(|| format!("ip link set {state} failed"))
                };
                link("down")?;
                std::thread::sleep(Duration::from_secs(10));
                link("up")?;
                let _ = t
                    .command("l", "ip")
                    .args(["route", "replace", "default", "via", "203.0.113.1"])
                    .status();
            }
            Fault::BadPolicyReloaded => {
                self.reload_alice("fallback = 7\n", "policy reload refused")?;
                // Put the good file back (not reloaded: the running policy never changed).
                let s = self.alice()?;
                std::fs::write(s.policy_path().join("default.toml"), OPEN_POLICY)
                    .map_err(|e| e.to_string())?;
            }
            Fault::RelayRestarted => {
                if let Some(r) = self.relay.take() {
                    r.kill();
                }
                std::thread::sleep(Duration::from_secs(2));
                self.relay = Some(spawn_relay(Some(&t.ns("l")), &self.relay_config));
            }
            Fault::SidecarRestarted => {
                if let Some(s) = self.alice.take() {
                    s.daemon_kill();
                }
                std::thread::sleep(Duration::from_secs(1));
                self.alice = Some(sidecar(t, "a", self.pki));
            }
            Fault::StricterPolicyReloaded => self.reload_alice(
                "fallback = \"relay\"\n[[rule]]\nname = \"no-bob\"\nverdict = \"block\"\nnetworks = [\"203.0.113.0/25\"]\ntransport = [\"udp\"]\n",
                "policy reloaded",
            )?,
        }
        Ok(())
    }

    /// Puts back what `fault` left changed, for the faults after it.
    fn restore(&mut self, fault: Fault) {
        if fault == Fault::StricterPolicyReloaded {
            let _ = self.reload_alice(OPEN_POLICY, "policy reloaded");
        }
    }

    /// Both sidecars' logs about the peers' sockets, their binds and the tunnel.
    fn excerpts(&self) -> String {
        format!(
            "alice's sidecar:\n{}\nbob's sidecar:\n{}",
            tunnel_excerpt(self.alice.as_ref()),
            tunnel_excerpt(Some(&self.bob))
        )
    }

    /// One call through `fault`: the leak oracle, whether the call survived as it should, and
    /// how long until media flowed again. Returns the report's line.
    fn call_through(&mut self, fault: Fault, leak_filter: &str) -> Result<String, String> {
        let t = self.t;
        let scenario = fault.name();
        let leaks = Capture::start_all(t, "r", leak_filter);
        let signal = open_dir();
        // Calls meant to survive run long enough to show media after a 10 s outage (QUIC's
        // probe backoff can hold the first packets back a few seconds); the others end early.
        let (seconds, frame_timeout) = if fault.survives() { (28, 20) } else { (10, 6) };
        let offer = peer_with(t, "a", "offer", signal.path(), seconds, frame_timeout, true);
        let answer = peer_with(
            t,
            "b",
            "answer",
            signal.path(),
            seconds,
            frame_timeout,
            true,
        );
        // The fault comes once the call is up and media has flowed a moment: a fixed wait was
        // once too short in CI, the relay went dark during alice's ICE gathering, and without
        // a server-reflexive candidate of hers the call could not set up (the relay's inbound
        // filter, like a NAT's, drops bob's side of it) — correct, but not this test's subject.
        let connected = |role: &str| signal.path().join(format!("{role}.connected")).exists();
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while !(connected("offer") && connected("answer")) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !(connected("offer") && connected("answer")) {
            let (a, b) = (outcome(offer), outcome(answer));
            return Err(format!(
                "the call did not set up before the fault\n{a:?}\n{b:?}\n{}",
                self.excerpts()
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
        let fault_at = now();
        let injected = self.inject(fault);
        let fault_end = now();
        let (a, b) = (outcome(offer), outcome(answer));
        let leaked = leaks.stop();
        injected?;
        eprintln!("{scenario}: fault from {fault_at:.1} to {fault_end:.1}");
        if !leaked.is_empty() {
            return Err(format!("leaked {leaked:?}"));
        }
        if (a.state.as_str(), b.state.as_str()) != ("connected", "connected") {
            return Err(format!(
                "the call did not survive\n{a:?}\n{b:?}\n{}",
                self.excerpts()
            ));
        }
        let resumed = |o: &Outcome| o.first_after(fault_end).map(|t| t - fault_end);
        let after = |o: &Outcome| o.frames_between(fault_end + 0.5, f64::MAX);
        let line = format!(
            "| {scenario} | {} | {} | {} / {} | {} |",
            leaked.len(),
            a.setup_ms
                .zip(b.setup_ms)
                .map_or("-".to_owned(), |(x, y)| format!("{x} / {y} ms")),
            after(&a),
            after(&b),
            match (resumed(&a), resumed(&b)) {
                (Some(x), Some(y)) => format!("{:.2} s / {:.2} s", x.max(0.0), y.max(0.0)),
                _ => "does not resume".to_owned(),
            }
        );
        eprintln!("{line}");
        if !fault.survives() {
            // Alice drops bob's media and sends none: the call stops (without leaking).
            if after(&a) != 0 {
                return Err("alice still hears bob".into());
            }
            if after(&b) != 0 {
                return Err("bob still hears alice".into());
            }
            return Ok(line);
        }
        if !(after(&a) > 50 && after(&b) > 50) {
            return Err(format!("the call must survive\n{a:?}\n{b:?}"));
        }
        if fault == Fault::RelayBlackholed {
            // The sidecars replace their silent connections as soon as the relay answers
            // again, rather than wait out QUIC's backed-off loss probes (up to as long again as
            // the outage).
            let slowest = resumed(&a).zip(resumed(&b)).map(|(x, y)| x.max(y));
            if !slowest.is_some_and(|s| s < 3.0) {
                return Err(format!(
                    "media must flow again within 3 s of the link's return both ways, not {slowest:?}\n{a:?}\n{b:?}"
                ));
            }
            // And `veil status` says why.
            let status = self.alice()?.status();
            let replaced = status
                .split(" replaced after the relay fell silent")
                .next()
                .and_then(|head| head.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok());
            if replaced.is_none_or(|n| n < 1) {
                return Err(format!(
                    "status does not count the replaced connection:\n{status}"
                ));
            }
        }
        Ok(line)
    }
}

/// Faults during a call, each in the same oracle: what leaves, whether the call survives, and
/// how long until media flows again. Every fault is tried, whatever became of the ones before;
/// the test fails with all the failures.
#[test]
fn faults_during_a_call() {
    let _ = call_python();
    let _serial = one_at_a_time();
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let relay_config = pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.128/25\"]\n");
    let relay = Some(spawn_relay(Some(&t.ns("l")), &relay_config));
    let _stun = Stun::start(&t);
    let mut stage = Stage {
        t: &t,
        pki: &pki,
        relay_config,
        relay,
        alice: Some(sidecar(&t, "a", &pki)),
        bob: sidecar(&t, "b", &pki),
    };
    let leak_filter = leak_filter();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for fault in Fault::ALL {
        match stage.call_through(fault, &leak_filter) {
            Ok(line) => report.push(line),
            Err(e) => failures.push(format!("{}: {e}", fault.name())),
        }
        stage.restore(fault);
    }
    eprintln!(
        "| scenario | leaked packets | set-up (alice / bob) | frames after the fault (alice / bob) | media again after |"
    );
    for line in report {
        eprintln!("{line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// What a SIP call between alice and bob showed.
struct SipCall {
    leaked: Vec<String>,
    /// Lines of signalling from the server (SIP headers, SDP) that name a user's own address.
    fields: Vec<String>,
}

/// A baresip call from alice (in namespace `alice_ns`) to bob (in `bob_ns`) through the SIP
/// server, asserted to carry audio both ways; `leak_filter` is the packet oracle.
fn sip_call(t: &Topology, alice_ns: &str, bob_ns: &str, leak_filter: &str) -> SipCall {
    let _sip = SipServer::start(t);
    let leaks = Capture::start_all(t, "r", leak_filter);
    let all = Capture::start_all(t, "r", "udp");
    // Signalling from the SIP server towards the relay (so towards the users), as text.
    let signalling = Capture::start_all_payloads(
        t,
        "r",
        &format!("udp and src host {SIP_SERVER} and src port 5060"),
    );

    let callee = Baresip::start(bob_ns, "bob", 660, None, 16, STUN);
    assert!(
        callee.wait_for("200 OK", Duration::from_secs(8)).is_some(),
        "bob did not register:\n{}",
        callee.output()
    );
    let dialled = now();
    let caller = Baresip::start(
        alice_ns,
        "alice",
        440,
        Some(&format!("sip:bob@{SIP_SERVER}")),
        12,
        STUN,
    );
    let established = caller.wait_for("Call established", Duration::from_secs(10));
    let (alice_heard, alice_rms, alice_log) = caller.finish();
    let (bob_heard, bob_rms, bob_log) = callee.finish();
    let leaked = leaks.stop();
    let captured = all.stop();
    let fields: Vec<String> = signalling
        .stop()
        .into_iter()
        .filter(|l| l.contains(ALICE) || l.contains(BOB))
        .collect();
    eprintln!(
        "sip call ({alice_ns}): captured {} packets, leaked {}; set-up {:?} ms; alice heard {alice_heard:.1} s (rms {alice_rms:.0}), bob {bob_heard:.1} s (rms {bob_rms:.0}); \
         {} SIP/SDP lines from the server name a user's own address, e.g. {:?}",
        captured.len(),
        leaked.len(),
        established.map(|e| ((e - dialled) * 1000.0) as u64),
        fields.len(),
        fields
            .iter()
            .filter(|l| l.contains("IN IP4"))
            .take(4)
            .collect::<Vec<_>>(),
    );
    assert!(
        established.is_some(),
        "the call was not established\nalice:\n{alice_log}\nbob:\n{bob_log}"
    );
    // Several seconds of Opus each way, and a tone, not silence.
    assert!(
        alice_heard > 3.0 && bob_heard > 3.0,
        "alice heard {alice_heard} s, bob {bob_heard} s\nalice:\n{alice_log}\nbob:\n{bob_log}"
    );
    assert!(
        alice_rms > 500.0 && bob_rms > 500.0,
        "rms {alice_rms} / {bob_rms}"
    );
    SipCall { leaked, fields }
}

#[test]
fn sip_call_between_two_masked_users_leaks_nothing() {
    let _serial = one_at_a_time();
    let m = Masked::start();
    let t = &m.t;
    let call = sip_call(t, &t.ns("a"), &t.ns("b"), &leak_filter());
    assert!(
        call.leaked.is_empty(),
        "packets with alice's or bob's address went elsewhere than the relay: {:?}",
        call.leaked
    );
    // Threat vector 10, measured: transparent interception masks the packets, but SIP headers
    // and SDP fields written by the apps still name their own addresses, and the server passes
    // them on (the positive control of the confined call's signalling oracle).
    assert!(
        !call.fields.is_empty(),
        "the oracle must see the addresses unconfined apps signal"
    );
    drop(m);
}

#[test]
fn sip_call_between_two_confined_users_discloses_no_address() {
    let _serial = one_at_a_time();
    let c = Confined::start();
    let call = sip_call(&c.t, &c.views[0].0, &c.views[1].0, &confined_leak_filter());
    assert!(call.leaked.is_empty(), "leaked: {:?}", call.leaked);
    assert!(
        call.fields.is_empty(),
        "the signalling names a user's address: {:?}",
        call.fields
    );
    drop(c);
}
