use super::load::{FileKind, from_files, parse_text};
use super::*;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const DEFAULT: &str = r#"
fallback = "relay"

[limits]
max_associations = 8

[[rule]]
name = "lan"
verdict = "direct"
networks = ["10.0.0.0/8"]

[[rule]]
name = "no-smb"
verdict = "block"
networks = ["0.0.0.0/0", "::/0"]
ports = [445, "137-139"]
transport = ["tcp", "udp"]

[[rule]]
name = "stun-only-to-relay"
verdict = "relay"
networks = ["0.0.0.0/0", "::/0"]
traffic = ["stun"]
"#;

const ALICE: &str = r#"
[limits]
max_packets_per_second = 50

[[rule]]
name = "alice-blocked-lab"
verdict = "block"
networks = ["10.9.0.0/16"]
"#;

const STAFF: &str = r#"
[limits]
max_associations = 2
max_packets_per_second = 100

[[rule]]
name = "staff-lab"
verdict = "direct"
networks = ["10.9.9.0/24", "::ffff:172.16.0.0/108"]
"#;

fn policy() -> Policy {
    from_files([
        ("default.toml", DEFAULT),
        ("users/alice.toml", ALICE),
        ("groups/staff.toml", STAFF),
    ])
    .expect("valid policy")
}

fn udp(addr: &str) -> Target {
    Target::udp(addr.parse().expect("addr"), b"hello")
}

#[test]
fn first_match_wins_in_user_group_default_order() {
    let p = policy();
    let alice = User::new("alice", ["staff".to_owned()]);
    let bob = User::new("bob", ["staff".to_owned()]);
    let carol = User::new("carol", []);
    let cases: &[(&User, Target, Verdict, &str)] = &[
        // alice's own file comes before her group's.
        (
            &alice,
            udp("10.9.9.1:5000"),
            Verdict::Block,
            "users/alice.toml rule[1] \"alice-blocked-lab\"",
        ),
        // bob has no file: his group's rule applies.
        (
            &bob,
            udp("10.9.9.1:5000"),
            Verdict::Direct,
            "groups/staff.toml rule[1] \"staff-lab\"",
        ),
        // carol is in no group: the default's LAN rule.
        (
            &carol,
            udp("10.9.9.1:5000"),
            Verdict::Direct,
            "default.toml rule[1] \"lan\"",
        ),
        // ports are inclusive at both ends.
        (
            &carol,
            udp("203.0.113.5:137"),
            Verdict::Block,
            "default.toml rule[2] \"no-smb\"",
        ),
        (
            &carol,
            udp("203.0.113.5:139"),
            Verdict::Block,
            "default.toml rule[2] \"no-smb\"",
        ),
        (
            &carol,
            udp("203.0.113.5:140"),
            Verdict::Relay,
            "default.toml fallback",
        ),
        (
            &carol,
            Target::tcp("203.0.113.5:445".parse().expect("addr")),
            Verdict::Block,
            "default.toml rule[2] \"no-smb\"",
        ),
        // traffic class is seen only for UDP.
        (
            &carol,
            Target::tcp("203.0.113.5:3478".parse().expect("addr")),
            Verdict::Relay,
            "default.toml fallback",
        ),
        // IPv4-mapped networks in a file match IPv4 addresses.
        (
            &bob,
            udp("172.16.3.4:9"),
            Verdict::Direct,
            "groups/staff.toml rule[1] \"staff-lab\"",
        ),
    ];
    for (user, target, verdict, rule) in cases {
        let d = p.decide(user, target);
        assert_eq!(
            (d.verdict, &*d.rule),
            (*verdict, *rule),
            "{user} -> {target:?}"
        );
    }
}

#[test]
fn traffic_class_of_first_packet_is_matched() {
    let p = policy();
    let carol = User::new("carol", []);
    let mut stun = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[0; 12]);
    let target = Target::udp("198.51.100.7:3478".parse().expect("addr"), &stun);
    assert_eq!(
        &*p.decide(&carol, &target).rule,
        "default.toml rule[3] \"stun-only-to-relay\""
    );
}

#[test]
fn limits_come_from_the_most_specific_file_that_sets_them() {
    let p = policy();
    let alice = User::new("alice", ["staff".to_owned()]);
    let carol = User::new("carol", []);
    assert_eq!(
        p.limits(&alice),
        Limits {
            max_associations: 2,
            max_flows_per_association: Limits::default().max_flows_per_association,
            max_packets_per_second: 50,
        }
    );
    assert_eq!(p.limits(&carol).max_associations, 8);
    assert_eq!(p.limits(&carol).max_packets_per_second, 10_000);
}

fn field_errors(path: &str, text: &str, kind: FileKind) -> Vec<String> {
    parse_text(path, text, kind)
        .expect_err("must be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn direct_to_public_address_space_needs_the_explicit_field() {
    let text = "fallback = \"block\"\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"192.168.0.0/16\", \"203.0.113.0/24\"]\n";
    let errors = field_errors("default.toml", text, FileKind::Default);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("default.toml:4:12: rule[1].networks: sends UDP direct to public address space (203.0.113.0/24)"),
        "{errors:?}"
    );
    let allowed = format!("{text}expose_user_address_to_peers = true\n");
    assert_eq!(
        parse_text("default.toml", &allowed, FileKind::Default),
        Ok(())
    );
    // TCP-only direct rules to public space are allowed: the guard is about peer-to-peer UDP.
    let tcp = format!("{text}transport = [\"tcp\"]\n");
    assert_eq!(parse_text("default.toml", &tcp, FileKind::Default), Ok(()));
    // v4-mapped or the whole v6 space is caught as well.
    let mapped = "fallback = \"block\"\n[[rule]]\nverdict = \"direct\"\nnetworks = [\"::ffff:8.8.8.0/120\"]\n";
    assert_eq!(
        field_errors("default.toml", mapped, FileKind::Default).len(),
        1
    );
}

#[test]
fn every_error_names_file_line_column_and_field() {
    let text = r#"fallback = "relay"
[limits]
max_associations = 0

[[rule]]
verdict = "relay"
networks = ["10.0.0.0/33", "10.0.0.1/8"]
ports = [70000, "20-10", "x"]

[[rule]]
verdict = "block"
networks = ["0.0.0.0/0"]
transport = ["tcp"]
traffic = ["rtp"]
"#;
    let errors = field_errors("users/alice.toml", text, FileKind::Specific);
    let want = [
        "users/alice.toml:1:12: fallback: only default.toml may set the fallback verdict",
        "users/alice.toml:3:20: limits.max_associations: expected a whole number from 1 to 4294967295, found 0",
        "users/alice.toml:7:13: rule[1].networks[0]: expected a CIDR network like \"10.0.0.0/8\" or an address, found \"10.0.0.0/33\"",
        "users/alice.toml:7:28: rule[1].networks[1]: \"10.0.0.1/8\" has host bits set; did you mean \"10.0.0.0/8\"?",
        "users/alice.toml:8:10: rule[1].ports[0]: port 70000 is outside 0-65535",
        "users/alice.toml:8:17: rule[1].ports[1]: range \"20-10\" is empty (first port above last)",
        "users/alice.toml:8:26: rule[1].ports[2]: expected a port number or a range like \"10000-20000\", found \"x\"",
        "users/alice.toml:14:11: rule[2].traffic: traffic classes describe UDP flows, but this rule only matches tcp",
    ];
    assert_eq!(errors, want);
}

#[test]
fn unknown_fields_and_bad_types_are_errors_with_field_names() {
    let unknown =
        "fallback = \"relay\"\n[[rule]]\nverdict = \"relay\"\nnetworks = [\"::/0\"]\nport = [5]\n";
    let e = field_errors("default.toml", unknown, FileKind::Default);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("default.toml:5:1: rule[1].port: unknown field `port`"),
        "{e:?}"
    );

    let bad_verdict =
        "fallback = \"relay\"\n[[rule]]\nverdict = \"allow\"\nnetworks = [\"::/0\"]\n";
    let e = field_errors("default.toml", bad_verdict, FileKind::Default);
    assert!(
        e[0].starts_with("default.toml:3:11: rule[1].verdict: unknown variant `allow`"),
        "{e:?}"
    );

    let missing = "[[rule]]\nverdict = \"relay\"\nnetworks = [\"::/0\"]\n";
    let e = field_errors("default.toml", missing, FileKind::Default);
    assert!(e[0].contains("fallback: missing"), "{e:?}");
}

#[test]
fn every_file_error_is_collected_and_misplaced_files_refused() {
    let errors = from_files([
        ("default.toml", "fallback = 3"),
        ("users/bob.toml", "[[rule]]\nverdict = \"relay\"\n"),
        ("alice.toml", ""),
    ])
    .expect_err("invalid");
    let text = errors.to_string();
    assert_eq!(errors.0.len(), 3, "{text}");
    assert!(text.contains("default.toml:1:12: fallback:"), "{text}");
    assert!(
        text.contains("users/bob.toml:1:1: rule[1]: missing field `networks`"),
        "{text}"
    );
    assert!(text.contains("alice.toml: not a policy file"), "{text}");
    let none = from_files([("users/bob.toml", "")]).expect_err("no default");
    assert_eq!(
        none.to_string(),
        "default.toml: missing: every policy directory needs a default.toml"
    );
}

#[test]
fn networks_and_addresses_are_read_alike_and_transports_once() {
    let rule =
        |body: &str| format!("fallback = \"block\"\n[[rule]]\nverdict = \"relay\"\n{body}\n");
    for bad in [
        "\"010.0.0.0/8\"",
        "\"010.0.0.1\"",
        "\"10.0.0.0/\"",
        "\"10.0.0.0/+8\"",
        "\"10.0.0.0/33\"",
    ] {
        let text = rule(&format!("networks = [{bad}]"));
        let e = from_files([("default.toml", text.as_str())]).expect_err(bad);
        assert!(e.to_string().contains("networks[0]"), "{bad}: {e}");
    }
    for good in [
        "\"10.0.0.0/8\"",
        "\"10.0.0.1\"",
        "\"2001:db8::/32\"",
        "\"::1\"",
    ] {
        let text = rule(&format!("networks = [{good}]"));
        assert!(
            from_files([("default.toml", text.as_str())]).is_ok(),
            "{good}"
        );
    }
    let twice =
        rule("networks = [\"0.0.0.0/0\"]\ntransport = [\"tcp\", \"tcp\"]\ntraffic = [\"stun\"]");
    let e = from_files([("default.toml", twice.as_str())])
        .expect_err("twice")
        .to_string();
    assert!(
        e.contains("rule[1].transport: a transport is listed twice"),
        "{e}"
    );
    assert!(
        e.contains("rule[1].traffic: traffic classes describe UDP flows"),
        "{e}"
    );
}

#[test]
fn every_error_is_one_line_with_file_line_column_and_field() {
    for text in [
        "fallback = \"relay\"\n[[rule]]\nverdict = \"relay\"\nnetworks = [\n",
        "fallback = \"relay\"\n[limits\n",
        "fallback = \"nope\"\n",
        "fallback = \"relay\"\nfallback = \"block\"\n",
        "\"",
        "[[rule]]\n",
    ] {
        let e = from_files([("default.toml", text)]).expect_err(text);
        for err in &e.0 {
            let line = err.to_string();
            assert!(!line.contains('\n'), "{text:?}: {line:?}");
            assert!(line.starts_with("default.toml:"), "{line}");
            assert!(!line.trim_end().ends_with(':'), "empty message: {line:?}");
        }
    }
}

#[test]
fn an_oversized_or_non_utf8_file_is_named_with_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Not UTF-8 on line 2: named there, and not also called missing.
    std::fs::write(
        dir.path().join("default.toml"),
        b"fallback = \"relay\"\n# caf\xe9\n",
    )
    .expect("write");
    let e = load_dir(dir.path(), false)
        .expect_err("not utf-8")
        .to_string();
    assert!(
        e.contains("default.toml:2:6: (file): not UTF-8 text"),
        "{e}"
    );
    assert!(!e.contains("missing"), "{e}");
    // A 2 GB sparse file is refused from its size, without reading it.
    std::fs::write(dir.path().join("default.toml"), "fallback = \"relay\"\n").expect("write");
    let users = dir.path().join("users");
    std::fs::create_dir(&users).expect("mkdir");
    let huge = std::fs::File::create(users.join("bob.toml")).expect("create");
    huge.set_len(2 << 30).expect("sparse");
    let e = load_dir(dir.path(), false)
        .expect_err("too big")
        .to_string();
    assert!(
        e.contains("bob.toml: 2147483648 bytes is more than a policy file may hold"),
        "{e}"
    );
}

#[test]
fn shipped_policies_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let p = load_dir(&dir, false).unwrap_or_else(|e| panic!("{e}"));
    assert!(p.rule_count() > 0);
}

use std::path::Path;

proptest! {
    #[test]
    fn mapped_v6_gets_the_same_verdict_as_v4(a in any::<u32>(), port in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..32)) {
        let p = policy();
        let user = User::new("bob", ["staff".to_owned()]);
        let v4 = Ipv4Addr::from(a);
        let t4 = Target::udp(SocketAddr::new(IpAddr::V4(v4), port), &payload);
        let t6 = Target::udp(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port), &payload);
        prop_assert_eq!(p.decide(&user, &t4), p.decide(&user, &t6));
    }

    #[test]
    fn parser_never_panics(text in "\\PC{0,200}") {
        let _ = parse_text("default.toml", &text, FileKind::Default);
    }

    #[test]
    fn public_guard_agrees_with_the_address_classes(a in any::<u32>()) {
        let ip = Ipv4Addr::from(a);
        let net = IpNet::from(IpAddr::V4(ip));
        let private = ip.is_private() || ip.is_loopback() || ip.is_link_local() || ip.is_multicast()
            || ip.is_broadcast() || ip.octets()[0] == 0 || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64);
        prop_assert_eq!(is_non_public(&net), private);
    }
}

#[test]
fn v6_public_guard() {
    let cases = [
        ("fe80::1", true),
        ("fd00::1", true),
        ("::1", true),
        ("ff02::fb", true),
        ("2001:db8::1", false),
        ("2a00::1", false),
    ];
    for (ip, non_public) in cases {
        let net = IpNet::from(ip.parse::<Ipv6Addr>().map(IpAddr::V6).expect("ip"));
        assert_eq!(is_non_public(&net), non_public, "{ip}");
    }
}
