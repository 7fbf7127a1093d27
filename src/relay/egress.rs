//! Where the relay may send: deny every special-purpose range and every encoding of one, unless
//! the operator allows it. Sans IO.
//!
//! An address is judged in its canonical form (`::ffff:a.b.c.d` is `a.b.c.d`). The IPv6
//! encodings that embed an IPv4 address — IPv4-compatible `::/96`, IPv4-translated
//! `::ffff:0:0:0/96`, 6to4 `2002::/16`, Teredo `2001::/32`, NAT64 `64:ff9b::/96` and
//! `64:ff9b:1::/48` — are denied as whole ranges, so no embedding of a private address slips
//! through (coturn's CVE history is the checklist). The
//! relay's own addresses are always denied, even when an allow entry covers them.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The address is in a denied range.
    #[error("{addr} is in the denied range {range}")]
    Denied {
        /// The (canonical) address.
        addr: IpAddr,
        /// The range that denies it.
        range: IpNet,
    },
    /// The address is one of the relay's own.
    #[error("{0} is the relay's own address")]
    Own(IpAddr),
    /// Port 0 is not a destination.
    #[error("port 0 is not a destination")]
    PortZero,
}

impl Refusal {
    /// The `Proxy-Status` error parameter (RFC 9209 §2.3) for this refusal.
    pub fn proxy_status(&self) -> &'static str {
        "destination_ip_prohibited"
    }
}

/// The ranges denied by default, with why: every entry of IANA's IPv4 and IPv6
/// Special-Purpose Address Registries (globally reachable or not: a relay has no business with
/// anycast PCP or TURN servers of its own network, AS112 sinks or ORCHIDs), multicast, and
/// every IPv6 form that embeds an IPv4 address.
pub const DEFAULT_DENY: &[(&str, &str)] = &[
    // IANA IPv4 Special-Purpose Address Registry.
    (
        "0.0.0.0/8",
        "this network, incl. the unspecified address (RFC 791)",
    ),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT, RFC 6598)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local, incl. cloud metadata 169.254.169.254",
    ),
    ("172.16.0.0/12", "private (RFC 1918)"),
    (
        "192.0.0.0/24",
        "IETF protocol assignments, incl. DS-Lite, PCP and TURN anycast, NAT64 discovery",
    ),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.31.196.0/24", "AS112-v4"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("192.175.48.0/24", "direct delegation AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("240.0.0.0/4", "reserved, incl. broadcast 255.255.255.255"),
    // IPv4 multicast (its own registry).
    ("224.0.0.0/4", "multicast"),
    // IANA IPv6 Special-Purpose Address Registry.
    (
        "::/96",
        "unspecified, loopback and IPv4-compatible (deprecated)",
    ),
    ("::ffff:0:0/96", "IPv4-mapped (checked as IPv4 first)"),
    ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"),
    ("64:ff9b::/96", "NAT64 (embeds IPv4)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy prefix (RFC 9780)"),
    (
        "2001::/23",
        "IETF protocol assignments, incl. Teredo, benchmarking, AMT, AS112, ORCHID, DETs, anycast",
    ),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4 (embeds IPv4)"),
    ("2620:4f:8000::/48", "direct delegation AS112"),
    ("3fff::/20", "documentation (RFC 9637)"),
    ("5f00::/16", "segment routing (SRv6) SIDs"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    // IPv6 multicast.
    ("ff00::/8", "multicast"),
];

/// The relay's egress policy.
#[derive(Debug)]
pub struct Egress {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
    /// The host's addresses right now: they change (DHCP, SLAAC, a floating IP), and the
    /// relay follows them ([`Egress::set_own`]).
    own: arc_swap::ArcSwap<Vec<IpAddr>>,
}

impl Egress {
    /// The default deny list, with `allow` exceptions; `own` are the relay's addresses.
    pub fn new(allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        let deny = DEFAULT_DENY
            .iter()
            .filter_map(|(net, _)| net.parse().ok())
            .collect();
        let own = Self::canonical(own);
        Self {
            deny,
            allow,
            own: arc_swap::ArcSwap::from_pointee(own),
        }
    }

    fn canonical(own: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut own: Vec<IpAddr> = own.into_iter().map(|a| a.to_canonical()).collect();
        own.sort_unstable();
        own.dedup();
        own
    }

    /// Replaces the relay's own addresses; true if they changed.
    pub fn set_own(&self, own: Vec<IpAddr>) -> bool {
        let own = Self::canonical(own);
        if **self.own.load() == own {
            return false;
        }
        self.own.store(std::sync::Arc::new(own));
        true
    }

    /// Whether `addr` is one of the relay's own addresses.
    pub fn is_own(&self, addr: IpAddr) -> bool {
        self.own.load().contains(&addr.to_canonical())
    }

    /// Whether the relay may send to `target`.
    pub fn check(&self, target: SocketAddr) -> Result<(), Refusal> {
        if target.port() == 0 {
            return Err(Refusal::PortZero);
        }
        let addr = target.ip().to_canonical();
        if self.own.load().contains(&addr) {
            return Err(Refusal::Own(addr));
        }
        if self.allow.iter().any(|n| n.contains(&addr)) {
            return Ok(());
        }
        match self.deny.iter().find(|n| n.contains(&addr)) {
            Some(range) => Err(Refusal::Denied {
                addr,
                range: *range,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: &Egress, s: &str) -> Result<(), Refusal> {
        e.check(s.parse().expect("socket address"))
    }

    #[test]
    fn every_encoding_of_loopback_and_private_is_denied() {
        assert_eq!(
            DEFAULT_DENY
                .iter()
                .filter(|(n, _)| n.parse::<IpNet>().is_err())
                .count(),
            0
        );
        let e = Egress::new(vec![], vec!["198.51.100.2".parse().expect("ip")]);
        let denied = [
            "127.0.0.1:9",
            "[::ffff:127.0.0.1]:9",
            "[::127.0.0.1]:9",
            "[::7f00:1]:9",
            "[2002:7f00:1::]:9",
            "[2001:0:4136:e378:8000:63bf:80ff:fffe]:9",
            "[64:ff9b::7f00:1]:9",
            "[64:ff9b:1::a00:1]:9",
            "10.0.0.1:9",
            "[::ffff:10.0.0.1]:9",
            "[::a00:1]:9",
            "[2002:a00:1::]:9",
            "[64:ff9b::a00:1]:9",
            "0.0.0.0:9",
            "[::]:9",
            "[::1]:9",
            "169.254.169.254:80",
            "100.64.1.1:9",
            "224.0.0.251:5353",
            "255.255.255.255:9",
            "[ff02::fb]:5353",
            "[fe80::1]:9",
            "[fd00::1]:9",
            "192.0.2.1:9",
            "[2001:db8::1]:9",
            "198.51.100.2:9",
        ];
        for s in denied {
            assert!(check(&e, s).is_err(), "{s} must be denied");
        }
        for s in ["8.8.8.8:53", "[2606:4700::1111]:443", "[::ffff:8.8.8.8]:53"] {
            assert_eq!(check(&e, s), Ok(()), "{s}");
        }
        assert_eq!(check(&e, "8.8.8.8:0"), Err(Refusal::PortZero));
    }

    /// One address inside each entry of IANA's registries (as of 2025), the probe's gaps
    /// included: each must be denied.
    #[test]
    fn every_special_purpose_registry_entry_is_denied() {
        let e = Egress::new(vec![], vec![]);
        let inside = [
            "0.0.0.0",
            "0.1.2.3",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "192.0.0.1",
            "192.0.0.8",
            "192.0.0.9",
            "192.0.0.10",
            "192.0.0.170",
            "192.0.0.171",
            "192.0.2.1",
            "192.31.196.1",
            "192.52.193.1",
            "192.88.99.1",
            "192.168.1.1",
            "192.175.48.1",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.1",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "64:ff9b::1.2.3.4",
            "64:ff9b:1::1",
            "100::1",
            "100:0:0:1::1",
            "2001::1",
            "2001:1::1",
            "2001:1::2",
            "2001:1::3",
            "2001:2::1",
            "2001:3::1",
            "2001:4:112::1",
            "2001:10::1",
            "2001:20::1",
            "2001:30::1",
            "2001:db8::1",
            "2002::1",
            "2620:4f:8000::1",
            "3fff::1",
            "5f00::1",
            "fc00::1",
            "fe80::1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:8.8.8.8",
            "fec0::1",
            "ff0e::1",
        ];
        for a in inside {
            let addr: IpAddr = a.parse().expect(a);
            assert!(
                e.check(SocketAddr::new(addr, 9)).is_err(),
                "{a} must be denied"
            );
        }
    }

    /// An independent classifier, written from the registries as numeric prefixes (and std's
    /// own predicates where they exist), over the canonical address.
    fn special(addr: IpAddr) -> bool {
        match addr.to_canonical() {
            IpAddr::V4(v4) => {
                let n = u32::from(v4);
                let within = |base: u32, len: u32| n >> (32 - len) == base >> (32 - len);
                v4.is_private()
                    || v4.is_loopback()
                    || v4.is_link_local()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.is_documentation()
                    || within(0, 8)
                    || within(0x6440_0000, 10)
                    || within(0xc000_0000, 24)
                    || within(0xc01f_c400, 24)
                    || within(0xc034_c100, 24)
                    || within(0xc058_6300, 24)
                    || within(0xc0af_3000, 24)
                    || within(0xc612_0000, 15)
                    || within(0xf000_0000, 4)
            }
            IpAddr::V6(v6) => {
                let n = u128::from(v6);
                let within = |base: u128, len: u32| n >> (128 - len) == base >> (128 - len);
                v6.is_unspecified()
                    || v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unique_local()
                    || v6.is_unicast_link_local()
                    || within(0, 96)
                    || within(0xffff << 48, 96)
                    || within(0x64_ff9b << 96, 96)
                    || within((0x64_ff9b << 96) | (1 << 80), 48)
                    || within(0x100 << 112, 64)
                    || within((0x100 << 112) | (1 << 64), 64)
                    || within(0x2001 << 112, 23)
                    || within((0x2001 << 112) | (0xdb8 << 96), 32)
                    || within(0x2002 << 112, 16)
                    || within((0x2620 << 112) | (0x4f << 96) | (0x8000 << 80), 48)
                    || within(0x3fff << 112, 20)
                    || within(0x5f00 << 112, 16)
                    || within(0xfec0 << 112, 10)
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn the_deny_list_agrees_with_the_registries(
            kind in 0u8..8,
            v4 in proptest::prelude::any::<u32>(),
            v6 in proptest::prelude::any::<u128>(),
            near in 0usize..DEFAULT_DENY.len(),
        ) {
            let e = Egress::new(vec![], vec![]);
            let v4 = std::net::Ipv4Addr::from(v4);
            let addr: IpAddr = match kind {
                0 => v4.into(),
                1 => std::net::Ipv6Addr::from(v6).into(),
                2 => v4.to_ipv6_mapped().into(),
                3 => v4.to_ipv6_compatible().into(),
                // 6to4, NAT64, Teredo (client address in the last 32 bits, inverted) and
                // IPv4-translated embeddings.
                4 => std::net::Ipv6Addr::from((0x2002u128 << 112) | (u128::from(u32::from(v4)) << 80)).into(),
                5 => std::net::Ipv6Addr::from((0x64_ff9bu128 << 96) | u128::from(u32::from(v4))).into(),
                6 => std::net::Ipv6Addr::from((0x2001u128 << 112) | u128::from(!u32::from(v4))).into(),
                _ => {
                    // A random address inside one of the denied prefixes, or just past it.
                    let net: IpNet = DEFAULT_DENY[near].0.parse().expect("net");
                    match net {
                        IpNet::V4(n) => {
                            let host = u32::from(v4) & !u32::from(n.netmask());
                            std::net::Ipv4Addr::from(u32::from(n.network()) | host).into()
                        }
                        IpNet::V6(n) => {
                            let host = v6 & !u128::from(n.netmask());
                            std::net::Ipv6Addr::from(u128::from(n.network()) | host).into()
                        }
                    }
                }
            };
            let denied = e.check(SocketAddr::new(addr, 9)).is_err();
            proptest::prop_assert_eq!(denied, special(addr), "{}", addr);
        }
    }

    #[test]
    fn allow_overrides_deny_but_never_the_relays_own_address() {
        let own = "203.0.113.1".parse().expect("ip");
        let e = Egress::new(vec!["203.0.113.0/24".parse().expect("net")], vec![own]);
        assert_eq!(check(&e, "203.0.113.9:7"), Ok(()));
        assert_eq!(check(&e, "[::ffff:203.0.113.9]:7"), Ok(()));
        assert_eq!(check(&e, "203.0.113.1:7"), Err(Refusal::Own(own)));
        // An address the host gains later is its own from then on, and one it loses is not.
        assert!(e.set_own(vec![own, "203.0.113.9".parse().expect("ip")]));
        assert!(!e.set_own(vec!["203.0.113.9".parse().expect("ip"), own]));
        assert!(check(&e, "[::ffff:203.0.113.9]:7").is_err());
        assert!(e.set_own(vec![own]));
        assert_eq!(check(&e, "203.0.113.9:7"), Ok(()));
        assert_eq!(
            check(&e, "198.51.100.1:7"),
            Err(Refusal::Denied {
                addr: "198.51.100.1".parse().expect("ip"),
                range: "198.51.100.0/24".parse().expect("net")
            })
        );
    }
}
