//! Where the relay may send: deny every special-purpose range and every encoding of one, unless
//! the operator allows it. Sans IO.
//!
//! An address is judged in its canonical form (`::ffff:a.b.c.d` is `a.b.c.d`). The IPv6
//! encodings that embed an IPv4 address — IPv4-compatible `::/96`, 6to4 `2002::/16`, Teredo
//! `2001::/32`, NAT64 `64:ff9b::/96` and `64:ff9b:1::/48` — are denied as whole ranges, so no
//! embedding of a private address slips through (coturn's CVE history is the checklist). The
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

/// The ranges denied by default, with why.
pub const DEFAULT_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this network, incl. the unspecified address"),
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    (
        "169.254.0.0/16",
        "link-local, incl. cloud metadata 169.254.169.254",
    ),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved, incl. broadcast 255.255.255.255"),
    ("::/96", "unspecified, loopback and IPv4-compatible"),
    ("::ffff:0:0/96", "IPv4-mapped (checked as IPv4 first)"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
];

/// The relay's egress policy.
#[derive(Debug, Clone)]
pub struct Egress {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
    own: Vec<IpAddr>,
}

impl Egress {
    /// The default deny list, with `allow` exceptions; `own` are the relay's addresses.
    pub fn new(allow: Vec<IpNet>, own: Vec<IpAddr>) -> Self {
        let deny = DEFAULT_DENY
            .iter()
            .filter_map(|(net, _)| net.parse().ok())
            .collect();
        Self {
            deny,
            allow,
            own: own.into_iter().map(|a| a.to_canonical()).collect(),
        }
    }

    /// Whether the relay may send to `target`.
    pub fn check(&self, target: SocketAddr) -> Result<(), Refusal> {
        if target.port() == 0 {
            return Err(Refusal::PortZero);
        }
        let addr = target.ip().to_canonical();
        if self.own.contains(&addr) {
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

    #[test]
    fn allow_overrides_deny_but_never_the_relays_own_address() {
        let own = "203.0.113.1".parse().expect("ip");
        let e = Egress::new(vec!["203.0.113.0/24".parse().expect("net")], vec![own]);
        assert_eq!(check(&e, "203.0.113.9:7"), Ok(()));
        assert_eq!(check(&e, "[::ffff:203.0.113.9]:7"), Ok(()));
        assert_eq!(check(&e, "203.0.113.1:7"), Err(Refusal::Own(own)));
        assert_eq!(
            check(&e, "198.51.100.1:7"),
            Err(Refusal::Denied {
                addr: "198.51.100.1".parse().expect("ip"),
                range: "198.51.100.0/24".parse().expect("net")
            })
        );
    }
}
