//! Which peers one bind may exchange datagrams with, sans IO: the relay's security rule for
//! each datagram a client sends, and the inbound filter for each datagram a peer sends.
//!
//! - A peer IP the client has sent to is *permitted* (TURN's permissions, RFC 8656 §9, keyed
//!   by IP: any port of it), up to `peers_per_bind` of them; the first datagram to a new IP is
//!   judged by the egress policy, and one that is refused permits nothing.
//! - Another live bind of this relay (two masked users calling each other) may always be sent
//!   to: it is judged per packet, by port, and its IP (the relay's own) is never trusted for
//!   other ports — a datagram to an own address that is not a live bind is judged by the egress
//!   policy every time, however often it was permitted.
//! - Inbound, with address-dependent filtering (the default), only permitted IPs are heard.
//!
//! Permissions last as long as the bind: veil's binds end when their app socket does.

use super::egress::Refusal;
use std::collections::HashSet;
use std::net::IpAddr;

/// Why a datagram to a peer may not leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The egress policy refuses the peer.
    Egress(Refusal),
    /// The bind already permits as many peer IPs as it may.
    Quota,
}

/// What the relay knows about a datagram's peer, beyond its IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The peer's IP.
    pub ip: IpAddr,
    /// The peer is a live bind socket of this relay (its public address and a bound port).
    pub hairpin: bool,
    /// The IP is one of this host's own (or the relay's public address).
    pub own: bool,
}

/// The permitted peers of one bind.
#[derive(Debug)]
pub struct Permissions {
    permitted: HashSet<IpAddr>,
    max: usize,
}

impl Permissions {
    /// No peer permitted yet; at most `max` peer IPs ever.
    pub fn new(max: usize) -> Self {
        Self {
            permitted: HashSet::new(),
            max,
        }
    }

    /// Whether the client may send to `peer`, permitting its IP if so. `egress` is the egress
    /// policy's judgement, asked only when the rule needs it.
    pub fn outbound(
        &mut self,
        peer: Peer,
        egress: impl FnOnce() -> Result<(), Refusal>,
    ) -> Result<(), Denied> {
        if peer.hairpin {
            self.permitted.insert(peer.ip);
            return Ok(());
        }
        let known = self.permitted.contains(&peer.ip);
        if known && !peer.own {
            return Ok(());
        }
        egress().map_err(Denied::Egress)?;
        if !known {
            if self.permitted.len() >= self.max {
                return Err(Denied::Quota);
            }
            self.permitted.insert(peer.ip);
        }
        Ok(())
    }

    /// Whether a datagram from `ip` may reach the client under address-dependent filtering.
    pub fn inbound(&self, ip: IpAddr) -> bool {
        self.permitted.contains(&ip)
    }

    /// How many peer IPs are permitted.
    pub fn len(&self) -> usize {
        self.permitted.len()
    }

    /// Whether no peer IP is permitted yet.
    pub fn is_empty(&self) -> bool {
        self.permitted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn peer(s: &str) -> Peer {
        Peer {
            ip: ip(s),
            hairpin: false,
            own: false,
        }
    }

    #[test]
    fn a_new_peer_is_judged_once_then_permitted_and_heard() {
        let mut p = Permissions::new(4);
        let asked = Cell::new(0);
        let allow = || {
            asked.set(asked.get() + 1);
            Ok(())
        };
        assert!(
            !p.inbound(ip("203.0.113.5")),
            "nobody is heard before the client sends"
        );
        assert_eq!(p.outbound(peer("203.0.113.5"), allow), Ok(()));
        assert_eq!(p.outbound(peer("203.0.113.5"), allow), Ok(()));
        assert_eq!(asked.get(), 1, "the egress policy judges a new IP once");
        assert!(p.inbound(ip("203.0.113.5")));
        assert!(!p.inbound(ip("203.0.113.6")));
    }

    #[test]
    fn a_refused_peer_is_never_permitted() {
        let mut p = Permissions::new(4);
        let refuse = || Err(Refusal::PortZero);
        for _ in 0..3 {
            assert_eq!(
                p.outbound(peer("10.0.0.1"), refuse),
                Err(Denied::Egress(Refusal::PortZero))
            );
        }
        assert!(p.is_empty());
        assert!(!p.inbound(ip("10.0.0.1")));
    }

    #[test]
    fn peers_per_bind_caps_new_ips_not_known_ones() {
        let mut p = Permissions::new(2);
        let allow = || Ok(());
        assert_eq!(p.outbound(peer("203.0.113.1"), allow), Ok(()));
        assert_eq!(p.outbound(peer("203.0.113.2"), allow), Ok(()));
        assert_eq!(p.outbound(peer("203.0.113.3"), allow), Err(Denied::Quota));
        assert_eq!(p.outbound(peer("203.0.113.1"), allow), Ok(()));
        assert_eq!(p.len(), 2);
        assert!(!p.inbound(ip("203.0.113.3")));
    }

    #[test]
    fn a_hairpin_is_allowed_per_packet_and_its_ip_trusts_no_other_port() {
        let mut p = Permissions::new(1);
        let relay = Peer {
            ip: ip("198.51.100.2"),
            hairpin: true,
            own: true,
        };
        assert_eq!(
            p.outbound(relay, || panic!("not asked for a hairpin")),
            Ok(())
        );
        // The same IP on a port that is no live bind: an own address, judged every time.
        let own = Peer {
            hairpin: false,
            ..relay
        };
        let refuse = || Err(Refusal::Own(ip("198.51.100.2")));
        for _ in 0..2 {
            assert_eq!(
                p.outbound(own, refuse),
                Err(Denied::Egress(Refusal::Own(ip("198.51.100.2"))))
            );
        }
        // Allowed by the operator (an `allow` entry): sent, and the cap not charged again.
        assert_eq!(p.outbound(own, || Ok(())), Ok(()));
        assert_eq!(p.len(), 1);
    }
}
