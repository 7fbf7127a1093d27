//! Per-user policy: which destinations a user's traffic may reach, and how.
//!
//! A [`Policy`] is loaded from a directory of TOML files (see [`load`]) and is immutable; the
//! daemon swaps a new one in atomically on reload. [`Policy::decide`] is a pure function from a
//! user and a [`Target`] to a [`Decision`] that names the rule which matched, so every verdict can
//! be logged and audited.
//!
//! How files combine, for a user `U` who belongs to groups `G1 < G2 < …` (sorted by name):
//!
//! 1. rules are tried in the order `users/U.toml`, `groups/G1.toml`, `groups/G2.toml`, …,
//!    `default.toml`, each file's rules top to bottom; the **first match wins**;
//! 2. if nothing matches, `default.toml`'s `fallback` verdict applies;
//! 3. each limit is taken from the first of those files that sets it, else the built-in default.

pub mod load;

use crate::traffic::TrafficClass;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;

pub use load::{LoadError, PolicyErrors, load_dir};

/// What happens to a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Send through the relay, so the peer sees the relay's address.
    Relay,
    /// Send from this machine's own address (e.g. the corporate LAN).
    Direct,
    /// Drop.
    Block,
}

impl Verdict {
    /// The name used in policy files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Direct => "direct",
            Self::Block => "block",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP: media, STUN, QUIC.
    Udp,
    /// TCP: signalling, ICE-TCP, TURN over TLS.
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// Where a flow goes, as far as the policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Destination address and port; canonicalised by [`Policy::decide`].
    pub addr: SocketAddr,
    /// UDP or TCP.
    pub transport: Transport,
    /// For UDP, the class of the flow's first packet.
    pub traffic: Option<TrafficClass>,
}

impl Target {
    /// A UDP flow whose first packet is `first_packet`.
    pub fn udp(addr: SocketAddr, first_packet: &[u8]) -> Self {
        Self {
            addr,
            transport: Transport::Udp,
            traffic: Some(TrafficClass::of(first_packet)),
        }
    }

    /// A TCP connection.
    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Tcp,
            traffic: None,
        }
    }
}

/// Who a flow belongs to: a user name and the names of the user's groups.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct User {
    name: String,
    groups: Vec<String>,
}

impl User {
    /// A user with the given groups (order and duplicates do not matter).
    pub fn new(name: impl Into<String>, groups: impl IntoIterator<Item = String>) -> Self {
        let mut groups: Vec<String> = groups.into_iter().collect();
        groups.sort();
        groups.dedup();
        Self {
            name: name.into(),
            groups,
        }
    }

    /// The user name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The user's groups, sorted by name.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The outcome of [`Policy::decide`]: a verdict and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do with the flow.
    pub verdict: Verdict,
    /// Which rule decided, e.g. `users/alice.toml rule[2] "corporate-lan"`, or `default.toml
    /// fallback`.
    pub rule: Arc<str>,
}

/// Per-user resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent SOCKS5 sessions (UDP associations and TCP connections) of one user.
    pub max_associations: u32,
    /// Distinct destinations (flows) one UDP association may talk to.
    pub max_flows_per_association: u32,
    /// Datagrams per second one user may send, over all of the user's flows.
    pub max_packets_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_associations: 64,
            max_flows_per_association: 256,
            max_packets_per_second: 10_000,
        }
    }
}

/// Limits a file may set; unset ones come from a less specific file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PartialLimits {
    max_associations: Option<u32>,
    max_flows_per_association: Option<u32>,
    max_packets_per_second: Option<u32>,
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    label: Arc<str>,
    verdict: Verdict,
    networks: Vec<IpNet>,
    /// Inclusive ranges; empty means every port.
    ports: Vec<RangeInclusive<u16>>,
    /// Empty means both.
    transports: Vec<Transport>,
    /// Empty means any class (and TCP).
    traffic: Vec<TrafficClass>,
}

impl Rule {
    fn matches(&self, ip: IpAddr, target: &Target) -> bool {
        (self.transports.is_empty() || self.transports.contains(&target.transport))
            && (self.traffic.is_empty()
                || target.traffic.is_some_and(|t| self.traffic.contains(&t)))
            && (self.ports.is_empty() || self.ports.iter().any(|r| r.contains(&target.addr.port())))
            && self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// The rules and limits of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct RuleSet {
    rules: Vec<Rule>,
    limits: PartialLimits,
}

/// A validated set of policy files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    default: RuleSet,
    fallback: Verdict,
    fallback_label: Arc<str>,
    users: HashMap<String, RuleSet>,
    groups: HashMap<String, RuleSet>,
}

impl Policy {
    /// Decides what happens to `target` for `user`. Pure: same inputs, same decision.
    pub fn decide(&self, user: &User, target: &Target) -> Decision {
        let ip = target.addr.ip().to_canonical();
        self.chain(user)
            .flat_map(|set| set.rules.iter())
            .find(|rule| rule.matches(ip, target))
            .map_or_else(
                || Decision {
                    verdict: self.fallback,
                    rule: self.fallback_label.clone(),
                },
                |rule| Decision {
                    verdict: rule.verdict,
                    rule: rule.label.clone(),
                },
            )
    }

    /// The limits that apply to `user`.
    pub fn limits(&self, user: &User) -> Limits {
        let built_in = Limits::default();
        let pick = |f: fn(&PartialLimits) -> Option<u32>, default: u32| {
            self.chain(user)
                .find_map(|s| f(&s.limits))
                .unwrap_or(default)
        };
        Limits {
            max_associations: pick(|l| l.max_associations, built_in.max_associations),
            max_flows_per_association: pick(
                |l| l.max_flows_per_association,
                built_in.max_flows_per_association,
            ),
            max_packets_per_second: pick(
                |l| l.max_packets_per_second,
                built_in.max_packets_per_second,
            ),
        }
    }

    /// The users that have a file of their own, sorted.
    pub fn users(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.users.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The groups that have a file of their own, sorted.
    pub fn groups(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.groups.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// How many rules all files hold together.
    pub fn rule_count(&self) -> usize {
        self.default.rules.len()
            + self.users.values().map(|s| s.rules.len()).sum::<usize>()
            + self.groups.values().map(|s| s.rules.len()).sum::<usize>()
    }

    fn chain<'a>(&'a self, user: &'a User) -> impl Iterator<Item = &'a RuleSet> + 'a {
        self.users
            .get(user.name())
            .into_iter()
            .chain(user.groups().iter().filter_map(|g| self.groups.get(g)))
            .chain(std::iter::once(&self.default))
    }
}

/// Address space that is not publicly routable: a `direct` UDP rule may reach it without
/// revealing the user's address to a peer on the Internet.
fn non_public_networks() -> [IpNet; 14] {
    use std::net::{Ipv4Addr as V4, Ipv6Addr as V6};
    let v4 = |a, b, c, d, len| IpNet::V4(Ipv4Net::new_assert(V4::new(a, b, c, d), len));
    let v6 = |addr: V6, len| IpNet::V6(Ipv6Net::new_assert(addr, len));
    [
        v4(0, 0, 0, 0, 8),                            // "this network"
        v4(10, 0, 0, 0, 8),                           // RFC 1918
        v4(100, 64, 0, 0, 10),                        // CGNAT, RFC 6598
        v4(127, 0, 0, 0, 8),                          // loopback
        v4(169, 254, 0, 0, 16),                       // link-local
        v4(172, 16, 0, 0, 12),                        // RFC 1918
        v4(192, 168, 0, 0, 16),                       // RFC 1918
        v4(224, 0, 0, 0, 4),                          // multicast
        v4(255, 255, 255, 255, 32),                   // limited broadcast
        v6(V6::UNSPECIFIED, 128),                     // ::
        v6(V6::LOCALHOST, 128),                       // ::1
        v6(V6::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),  // ULA
        v6(V6::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10), // link-local
        v6(V6::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),  // multicast
    ]
}

/// True if every address of `net` is outside public address space.
pub fn is_non_public(net: &IpNet) -> bool {
    non_public_networks().iter().any(|p| p.contains(net))
}

/// An IPv4-mapped IPv6 network (`::ffff:a.b.c.d/len`, len ≥ 96) becomes the IPv4 network it
/// names, so that it matches the canonical (IPv4) form of the addresses in it.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new_assert(v4, v6.prefix_len() - 96)),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests;

/// The shipped `policies/default.toml`, built into the binary for `veil up`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../policies/default.toml");

/// The policy of `veil up`: the shipped default alone.
pub fn embedded_default() -> Result<Policy, PolicyErrors> {
    load::from_files([("default.toml", EMBEDDED_DEFAULT)])
}
