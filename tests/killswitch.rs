//! The kill switch probed as a hostile local user would: from a managed user, every way an
//! unprivileged process can make the kernel send a non-TCP packet (`tests/clients/leak_probe.py`:
//! plain, device-bound, `*_UNICAST_IF`, `PKTINFO`, link-local, multicast and broadcast of
//! every kind, `sendmmsg`, GSO, UDP-Lite, ICMP echo; IPv4 and IPv6), in every state of the
//! README's table and in the states another root tool can put the kernel in (ruleset flushed,
//! one chain flushed, routing flushed, the link-down sysctl), with the daemon alive and dead.
//! A capture at the gateway looks for each probe's tag: zero may leave. An unmanaged user's
//! probes, seen by the same capture, are the positive control.

mod support;

use std::time::Duration;
use support::netns::{Capture, Topology};
use support::{Pki, Sidecar, spawn_relay, veil_in};

const RELAY_IP: &str = "198.51.100.2";
const RELAY: &str = "198.51.100.2:4433";

fn topology() -> Topology {
    let mut t = Topology::new();
    t.host("c", "192.0.2.2/24", "192.0.2.1/24")
        .host("l", "198.51.100.2/24", "198.51.100.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24");
    t.ipv6("c", "2001:db8:1::2/64", "2001:db8:1::1/64").ipv6(
        "e",
        "2001:db8:3::2/64",
        "2001:db8:3::1/64",
    );
    // Fixed link-local addresses on the client's link (no DAD wait), and ping sockets for
    // every group, as Debian configures them.
    let router = t.ns("r");
    for (ns, dev, addr) in [
        (router.as_str(), t.gateway_iface("c"), "fe80::1/64"),
        (&t.ns("c"), t.iface("c"), "fe80::2/64"),
    ] {
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", &dev, "nodad"]);
    }
    sysctl(&t, "net.ipv4.ping_group_range=0 2147483647");
    t
}

fn run(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sysctl(t: &Topology, setting: &str) {
    run(&["ip", "netns", "exec", &t.ns("c"), "sysctl", "-qw", setting]);
}

fn nft(t: &Topology, args: &[&str]) {
    let ok = t.command("c", "nft").args(args).status().expect("nft");
    assert!(ok.success(), "nft {args:?}");
}

/// How many eBPF programs the cgroup v2 root has on its egress hook.
fn root_egress_programs() -> usize {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(support::client_script("cgroup_egress_programs.py"))
        .output()
        .expect("query");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("count")
}

/// What another tool does to veil's policy routing: its rules and its table gone.
fn flush_routing(t: &Topology) {
    for family in ["-4", "-6"] {
        while t
            .command("c", "ip")
            .args([family, "rule", "del", "lookup", "7697"])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("ip rule")
            .success()
        {}
        let _ = t
            .command("c", "ip")
            .args([family, "route", "flush", "table", "7697"])
            .status();
    }
}

/// One probe run: the classes the script tried, and those the gateway saw.
struct Outcome {
    tried: Vec<String>,
    refused: Vec<String>,
    seen: Vec<String>,
}

/// Runs every probe as `user` with tag `tag`, with a capture on the client's link.
fn probe(t: &Topology, user: &str, tag: &str) -> Outcome {
    let capture = Capture::start_gateway_payloads(t, "c", "not (udp port 4433)");
    let out = t
        .command("c", "setpriv")
        .args([
            &format!("--reuid={user}"),
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(support::client_script("leak_probe.py"))
        .args([
            tag,
            &t.iface("c"),
            "192.0.2.2",
            "203.0.113.2",
            "192.0.2.255",
            "2001:db8:3::2",
            "fe80::1",
        ])
        .output()
        .expect("leak probe");
    assert!(
        out.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = capture.stop().join("\n");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut o = Outcome {
        tried: Vec::new(),
        refused: Vec::new(),
        seen: Vec::new(),
    };
    for l in report.lines() {
        let Some((class, rest)) = l.split_once(' ') else {
            continue;
        };
        o.tried.push(class.to_owned());
        if rest.starts_with("refused") {
            o.refused.push(format!("{class} ({rest})"));
        }
        if lines.contains(&format!("veilprobe {class} {tag} ")) {
            o.seen.push(class.to_owned());
        }
    }
    assert!(o.tried.len() >= 25, "the probe ran: {report}");
    o
}

/// The matrix, printed as it is filled in.
#[derive(Default)]
struct Matrix {
    rows: Vec<String>,
    leaks: Vec<String>,
}

impl Matrix {
    /// Probes as the managed user in `state`: nothing may leave.
    fn sealed(&mut self, t: &Topology, state: &str) {
        let tag = format!("m{}", self.rows.len());
        let o = probe(t, "nobody", &tag);
        // What the kernel let the probe send (to veil over lo, or to a drop in nftables).
        let accepted: Vec<&String> = o
            .tried
            .iter()
            .filter(|c| !o.refused.iter().any(|r| r.starts_with(&format!("{c} "))))
            .collect();
        let row = format!(
            "{state:<50} managed: {:>2}/{} leaked; send refused {:>2}, accepted {accepted:?}",
            o.seen.len(),
            o.tried.len(),
            o.refused.len()
        );
        eprintln!("{row}");
        self.rows.push(row);
        if !o.seen.is_empty() {
            self.leaks.push(format!("{state}: {:?}", o.seen));
        }
    }

    /// Probes as an unmanaged user: every class must reach the gateway, or the capture could
    /// not see a leak of that class.
    fn control(&mut self, t: &Topology, state: &str, user: &str) {
        let tag = format!("c{}", self.rows.len());
        let o = probe(t, user, &tag);
        let row = format!(
            "{state:<50} {user}: {:>2}/{} seen (positive control)",
            o.seen.len(),
            o.tried.len()
        );
        eprintln!("{row}");
        self.rows.push(row);
        let unseen: Vec<&String> = o.tried.iter().filter(|c| !o.seen.contains(c)).collect();
        assert!(
            unseen.is_empty(),
            "{state}: the capture did not see {unseen:?} from {user} (refused: {:?}), so it could not see them leak",
            o.refused
        );
    }
}

fn start_sidecar(t: &Topology, config: &std::path::Path) -> Sidecar {
    let sidecar = Sidecar::builder()
        .netns(&t.ns("c"))
        .policy("default.toml", "fallback = \"relay\"\n")
        .config(config)
        .spawn();
    assert!(
        sidecar
            .wait_log(&["transparent interception ready"], Duration::from_secs(10))
            .is_some(),
        "interception did not start"
    );
    sidecar
}

/// Waits for the daemon to report `damage` and repair it.
fn repaired(sidecar: &Sidecar, damage: &str) {
    assert!(
        sidecar
            .wait_log(&["kill switch was changed", damage], Duration::from_secs(8))
            .is_some(),
        "no repair of {damage:?} logged: {:?}",
        sidecar.log().iter().rev().take(15).collect::<Vec<_>>()
    );
    assert!(
        sidecar
            .wait_log(&["firewall reinstalled"], Duration::from_secs(4))
            .is_some()
    );
}

#[test]
fn no_probe_of_a_managed_user_leaves_in_any_state() {
    let t = topology();
    let pki = Pki::generate(RELAY_IP);
    let config = pki.transparent_sidecar_config("", RELAY, RELAY_IP);
    let mut m = Matrix::default();
    eprintln!("leak matrix ({} classes per probe, IPv4 and IPv6):", 25);
    m.control(&t, "no veil at all", "nobody");

    // Only this test's lock comes and goes on the root cgroup (no other test runs in this
    // binary): one program while installed, none left after removal.
    let programs = root_egress_programs();
    let install = veil_in(Some(&t.ns("c")))
        .args(["firewall", "install", "--config"])
        .arg(&config)
        .output()
        .expect("veil firewall install");
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );
    m.sealed(&t, "boot: firewall unit ran, no daemon");
    assert_eq!(
        root_egress_programs(),
        programs + 1,
        "the lock is attached once"
    );

    let sidecar = start_sidecar(&t, &config);
    m.sealed(&t, "sidecar running, relay unreachable");
    let relay = spawn_relay(
        Some(&t.ns("l")),
        &pki.relay_config("relay.toml", RELAY, "allow = [\"203.0.113.0/24\"]\n"),
    );
    assert!(
        sidecar
            .wait_log(&["tunnel connected"], Duration::from_secs(10))
            .is_some()
    );
    m.sealed(&t, "connected");
    m.control(&t, "connected", "daemon");

    // Reloads: a good policy, then a bad one (the old one keeps running).
    let policy = sidecar.policy_path().join("default.toml");
    std::fs::write(&policy, "fallback = \"relay\"\n# reloaded\n").expect("policy");
    sidecar.hangup();
    assert!(
        sidecar
            .wait_log(&["policy reloaded"], Duration::from_secs(5))
            .is_some()
    );
    m.sealed(&t, "policy reloaded");
    std::fs::write(&policy, "fallback = \"nowhere\"\n").expect("policy");
    sidecar.hangup();
    assert!(
        sidecar
            .wait_log(&["policy reload refused"], Duration::from_secs(5))
            .is_some()
    );
    m.sealed(&t, "bad policy reloaded");

    nft(&t, &["flush", "ruleset"]);
    m.sealed(&t, "ruleset flushed, daemon running");
    repaired(&sidecar, "nftables table inet veil: removed");
    let status = sidecar.status();
    assert!(
        status.contains("kill switch: intact")
            && status.contains("last repaired")
            && status.contains("nftables table inet veil: removed"),
        "{status}"
    );

    nft(&t, &["flush", "chain", "inet", "veil", "killswitch"]);
    m.sealed(&t, "killswitch chain flushed, daemon running");
    repaired(&sidecar, "differs from what veil wrote");

    flush_routing(&t);
    m.sealed(&t, "policy routing flushed, daemon running");
    repaired(&sidecar, "fwmark 0x1e11 lookup 7697: missing");

    sidecar.signal("STOP");
    m.sealed(&t, "daemon stopped (SIGSTOP)");
    let log = sidecar.daemon_kill();
    m.sealed(&t, "daemon killed (SIGKILL)");
    drop(relay);

    nft(&t, &["flush", "ruleset"]);
    m.sealed(&t, "dead, ruleset flushed");
    flush_routing(&t);
    m.sealed(&t, "dead, ruleset and routing flushed");
    for family in ["ipv4", "ipv6"] {
        for scope in ["all", "default", &t.iface("c")] {
            sysctl(
                &t,
                &format!("net.{family}.conf.{scope}.ignore_routes_with_linkdown=1"),
            );
        }
    }
    m.sealed(&t, "dead, all flushed, ignore_routes_with_linkdown=1");
    m.control(
        &t,
        "dead, all flushed, ignore_routes_with_linkdown=1",
        "daemon",
    );

    // Only the explicit removal lets the managed user out: the same capture then sees its
    // probes, which shows it would have seen them above.
    let remove = veil_in(Some(&t.ns("c")))
        .args(["firewall", "remove"])
        .output()
        .expect("veil firewall remove");
    assert!(
        remove.status.success(),
        "{}",
        String::from_utf8_lossy(&remove.stderr)
    );
    m.control(&t, "veil firewall remove", "nobody");
    // Every repair above replaced the program in place; removal leaves nothing attached.
    assert_eq!(
        root_egress_programs(),
        programs,
        "a lock program was left attached"
    );

    eprintln!("\n{}", m.rows.join("\n"));
    assert!(
        m.leaks.is_empty(),
        "leaked: {:#?}\nsidecar log tail: {:?}",
        m.leaks,
        log.iter().rev().take(20).collect::<Vec<_>>()
    );
}
