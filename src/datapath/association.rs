//! One app socket's flows as a state machine, sans IO: a SOCKS5 UDP association (RFC 1928 §7)
//! or an intercepted app socket.
//!
//! The shell owns the sockets; it hands every datagram to an [`Association`] and does what comes
//! back. The rules enforced here:
//!
//! - only the client may use the association: datagrams must come from the IP address of the TCP
//!   control connection and, when the request declared one, from its port; the first such
//!   datagram whose sending socket belongs to the control connection's user (the shell asks the
//!   kernel: [`Admission::Unclaimed`] → [`Association::claim`]) fixes the client's address. On a
//!   shared `127.0.0.1` an IP says nothing about who sends; the socket's owner does;
//! - a datagram with FRAG ≠ 0 is dropped (veil does not reassemble);
//! - each destination is a *flow*, decided by the policy once (with the traffic class of its first
//!   packet) and again whenever the policy changes; the flow table is bounded;
//! - replies are admitted only from destinations that are `direct` flows of this association.

use super::state::{DropReason, PolicyVersion};
use crate::policy::{Decision, Target, User, Verdict};
use crate::traffic::TrafficClass;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// A destination of the association and how it was decided.
#[derive(Debug, Clone)]
struct Flow {
    decision: Decision,
    traffic: TrafficClass,
    generation: u64,
}

/// A client-side datagram that may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// From the association's client.
    Client,
    /// From an address that may become the client: claim it if the kernel says its socket is
    /// the user's, drop the datagram otherwise.
    Unclaimed,
}

/// What the association says about a flow's packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowDecision {
    /// The decision in force.
    pub decision: Decision,
    /// True if the flow is new or its verdict just changed: worth a log line.
    pub changed: bool,
}

/// Which way one datagram from the client goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Nowhere, counted under this reason.
    Drop(DropReason),
    /// From the host, to this (canonical) target.
    Direct(SocketAddr),
    /// Through the relay, decided under this policy generation.
    Relay {
        /// The generation of the policy that decided it.
        generation: u64,
    },
}

/// What [`Association::route`] says about one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Which way it goes.
    pub route: Route,
    /// The flow's decision, if it is new or its verdict changed: to be logged and shown.
    pub log: Option<Decision>,
}

/// The state of one UDP association.
#[derive(Debug)]
pub struct Association {
    control_ip: IpAddr,
    /// The port the request declared (0: none).
    declared_port: u16,
    client: Option<SocketAddr>,
    flows: HashMap<SocketAddr, Flow>,
    max_flows: usize,
}

impl Association {
    /// An association whose control connection comes from `control_ip`.
    pub fn new(control_ip: IpAddr, max_flows: u32) -> Self {
        Self {
            control_ip: control_ip.to_canonical(),
            declared_port: 0,
            client: None,
            flows: HashMap::new(),
            max_flows: usize::try_from(max_flows).unwrap_or(usize::MAX),
        }
    }

    /// The client's UDP address, once its first datagram arrived.
    pub fn client(&self) -> Option<SocketAddr> {
        self.client
    }

    /// Requires the client to send from `port`, as its request declared (RFC 1928 §7: the
    /// server may use DST.ADDR and DST.PORT to limit access); 0 declares nothing.
    pub fn declare_port(&mut self, port: u16) {
        self.declared_port = port;
    }

    /// Admits a datagram arriving on the client side from `from`, or says why not.
    pub fn admit_client(&mut self, from: SocketAddr) -> Result<Admission, DropReason> {
        let from = canonical(from);
        match self.client {
            Some(client) if client == from => Ok(Admission::Client),
            Some(_) => Err(DropReason::ForeignSource),
            None if from.ip() == self.control_ip
                && (self.declared_port == 0 || from.port() == self.declared_port) =>
            {
                Ok(Admission::Unclaimed)
            }
            None => Err(DropReason::ForeignSource),
        }
    }

    /// Makes `from` the client, once its socket's owner is known to be the association's user.
    pub fn claim(&mut self, from: SocketAddr) {
        self.client = Some(canonical(from));
    }

    /// The decision for a packet to `target`, deciding the flow if it is new or the policy
    /// changed since. `packet` is the payload (its class matters only for a new flow).
    pub fn decide(
        &mut self,
        target: SocketAddr,
        packet: &[u8],
        policy: &PolicyVersion,
        user: &User,
    ) -> Result<FlowDecision, DropReason> {
        let target = canonical(target);
        if let Some(flow) = self.flows.get_mut(&target) {
            if flow.generation == policy.generation {
                return Ok(FlowDecision {
                    decision: flow.decision.clone(),
                    changed: false,
                });
            }
            let decision = policy.policy.decide(
                user,
                &Target {
                    addr: target,
                    transport: crate::policy::Transport::Udp,
                    traffic: Some(flow.traffic),
                },
            );
            let changed = decision.verdict != flow.decision.verdict;
            flow.decision = decision.clone();
            flow.generation = policy.generation;
            return Ok(FlowDecision { decision, changed });
        }
        if self.flows.len() >= self.max_flows {
            return Err(DropReason::FlowLimit);
        }
        let traffic = TrafficClass::of(packet);
        let decision = policy.policy.decide(user, &Target::udp(target, packet));
        self.flows.insert(
            target,
            Flow {
                decision: decision.clone(),
                traffic,
                generation: policy.generation,
            },
        );
        Ok(FlowDecision {
            decision,
            changed: true,
        })
    }

    /// Admits `datagram` from peer `from` that arrived `via` a path (`Direct`: an outbound
    /// socket; `Relay`: the tunnel), once the client is known. Returns the client's address.
    ///
    /// From a flow of this association: if its verdict, under the policy in force, is that
    /// path. From any other peer: only through the relay, and only if the policy would relay
    /// to that peer. Filtering unsolicited senders there is the relay's job (its
    /// `inbound_filter`: TURN-like permissions by default, or full cone), and a peer-reflexive
    /// ICE candidate depends on it. Such a peer is judged, not recorded: it becomes a flow
    /// when the client answers it, so senders the client ignores cannot fill its flow table.
    pub fn admit_peer(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        via: Verdict,
        policy: &PolicyVersion,
        user: &User,
    ) -> Result<SocketAddr, DropReason> {
        let client = self.client.ok_or(DropReason::UnknownPeer)?;
        let from = canonical(from);
        if !self.flows.contains_key(&from) {
            let relayed = via == Verdict::Relay
                && policy
                    .policy
                    .decide(user, &Target::udp(from, datagram))
                    .verdict
                    == Verdict::Relay;
            return if relayed {
                Ok(client)
            } else {
                Err(DropReason::UnknownPeer)
            };
        }
        if self.decide(from, &[], policy, user)?.decision.verdict == via {
            Ok(client)
        } else {
            Err(DropReason::UnknownPeer)
        }
    }

    /// The pipeline's step for one datagram from the client to `target`: decide the flow (a
    /// new or changed decision is returned to be logged), drop it if blocked, charge the
    /// user's packet rate (`rate`, asked only for a datagram that may leave), and say which
    /// way it goes. `relay` is never turned into direct: fail closed.
    pub fn route(
        &mut self,
        target: SocketAddr,
        payload: &[u8],
        policy: &PolicyVersion,
        user: &User,
        rate: impl FnOnce() -> bool,
    ) -> Step {
        let decided = match self.decide(target, payload, policy, user) {
            Ok(d) => d,
            Err(reason) => {
                return Step {
                    route: Route::Drop(reason),
                    log: None,
                };
            }
        };
        let route = match decided.decision.verdict {
            Verdict::Block => Route::Drop(DropReason::Blocked),
            _ if !rate() => Route::Drop(DropReason::RateLimit),
            Verdict::Relay => Route::Relay {
                generation: policy.generation,
            },
            Verdict::Direct => Route::Direct(canonical(target)),
        };
        Step {
            route,
            log: decided.changed.then_some(decided.decision),
        }
    }

    /// How many flows the association has.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}

/// The canonical form of a socket address: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::from_files;

    fn version(text: &str, generation: u64) -> PolicyVersion {
        PolicyVersion {
            policy: from_files([("default.toml", text)]).expect("valid"),
            generation,
        }
    }

    const LAN_DIRECT: &str = "fallback = \"block\"\n[[rule]]\nname = \"lan\"\nverdict = \"direct\"\nnetworks = [\"10.0.0.0/8\"]\n";
    const LAN_RELAY: &str = "fallback = \"block\"\n[[rule]]\nname = \"lan\"\nverdict = \"relay\"\nnetworks = [\"10.0.0.0/8\"]\n";

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn only_the_control_connections_ip_may_use_it_and_the_first_port_sticks() {
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 4);
        assert_eq!(
            a.admit_client(addr("127.0.0.2:5000")),
            Err(DropReason::ForeignSource)
        );
        // Until claimed, any port of the control IP is a candidate, none is the client.
        assert_eq!(
            a.admit_client(addr("127.0.0.1:4999")),
            Ok(Admission::Unclaimed)
        );
        assert_eq!(a.client(), None);
        assert_eq!(
            a.admit_client(addr("[::ffff:127.0.0.1]:5000")),
            Ok(Admission::Unclaimed)
        );
        a.claim(addr("[::ffff:127.0.0.1]:5000"));
        assert_eq!(a.client(), Some(addr("127.0.0.1:5000")));
        assert_eq!(
            a.admit_client(addr("127.0.0.1:5000")),
            Ok(Admission::Client)
        );
        assert_eq!(
            a.admit_client(addr("127.0.0.1:5001")),
            Err(DropReason::ForeignSource)
        );
    }

    #[test]
    fn a_declared_port_is_required() {
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 4);
        a.declare_port(5000);
        assert_eq!(
            a.admit_client(addr("127.0.0.1:5001")),
            Err(DropReason::ForeignSource)
        );
        assert_eq!(
            a.admit_client(addr("127.0.0.1:5000")),
            Ok(Admission::Unclaimed)
        );
    }

    #[test]
    fn flows_are_decided_once_per_policy_generation_and_bounded() {
        let user = User::new("u", []);
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 2);
        let p1 = version(LAN_DIRECT, 1);
        let d = a
            .decide(addr("10.1.1.1:9"), b"x", &p1, &user)
            .expect("decided");
        assert_eq!((d.decision.verdict, d.changed), (Verdict::Direct, true));
        let d = a
            .decide(addr("10.1.1.1:9"), b"x", &p1, &user)
            .expect("decided");
        assert_eq!((d.decision.verdict, d.changed), (Verdict::Direct, false));
        let d = a
            .decide(addr("8.8.8.8:9"), b"x", &p1, &user)
            .expect("decided");
        assert_eq!(d.decision.verdict, Verdict::Block);
        assert_eq!(
            a.decide(addr("9.9.9.9:9"), b"x", &p1, &user),
            Err(DropReason::FlowLimit)
        );
        // A reload changes the verdict of a live flow.
        let p2 = version(LAN_RELAY, 2);
        let d = a
            .decide(addr("10.1.1.1:9"), b"x", &p2, &user)
            .expect("decided");
        assert_eq!((d.decision.verdict, d.changed), (Verdict::Relay, true));
    }

    #[test]
    fn replies_only_from_direct_flows_once_the_client_is_known() {
        let user = User::new("u", []);
        let p1 = version(LAN_DIRECT, 1);
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 8);
        a.decide(addr("10.1.1.1:9"), b"x", &p1, &user)
            .expect("decided");
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Direct, &p1, &user),
            Err(DropReason::UnknownPeer)
        );
        a.claim(addr("127.0.0.1:4000"));
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Direct, &p1, &user),
            Ok(addr("127.0.0.1:4000"))
        );
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:10"), b"x", Verdict::Direct, &p1, &user),
            Err(DropReason::UnknownPeer)
        );
        a.decide(addr("8.8.8.8:9"), b"x", &p1, &user)
            .expect("decided");
        assert_eq!(
            a.admit_peer(addr("8.8.8.8:9"), b"x", Verdict::Direct, &p1, &user),
            Err(DropReason::UnknownPeer)
        );
        // After a reload that makes the flow `relay`, its replies stop too.
        let p2 = version(LAN_RELAY, 2);
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Direct, &p2, &user),
            Err(DropReason::UnknownPeer)
        );
        // ... and they are admitted from the tunnel instead.
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Relay, &p2, &user),
            Ok(addr("127.0.0.1:4000"))
        );
    }

    #[test]
    fn an_unsolicited_peer_is_admitted_only_through_the_relay_when_policy_relays_it() {
        let user = User::new("u", []);
        // 10/8 relayed, 192.168/16 direct, everything else blocked.
        let p = version(
            &format!(
                "{LAN_RELAY}[[rule]]\nname = \"home\"\nverdict = \"direct\"\nnetworks = [\"192.168.0.0/16\"]\n"
            ),
            1,
        );
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 2);
        // Not before the client is known.
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Relay, &p, &user),
            Err(DropReason::UnknownPeer)
        );
        a.claim(addr("127.0.0.1:4000"));
        // A relayed peer the client never sent to (a peer-reflexive ICE candidate): admitted.
        assert_eq!(
            a.admit_peer(addr("10.1.1.1:9"), b"x", Verdict::Relay, &p, &user),
            Ok(addr("127.0.0.1:4000"))
        );
        // Not from a direct socket, nor a peer the policy blocks or sends direct.
        for (peer, via) in [
            ("10.1.1.1:9", Verdict::Direct),
            ("8.8.8.8:9", Verdict::Relay),
            ("192.168.1.1:9", Verdict::Relay),
        ] {
            assert_eq!(
                a.admit_peer(addr(peer), b"x", via, &p, &user),
                Err(DropReason::UnknownPeer),
                "{peer} via {via:?}"
            );
        }
        // Judged, not recorded: any number of them leaves the flow table (limit 2) alone.
        for port in 1..100 {
            let from = SocketAddr::new("10.2.2.2".parse().expect("ip"), port);
            assert!(a.admit_peer(from, b"x", Verdict::Relay, &p, &user).is_ok());
        }
        assert_eq!(a.flow_count(), 0);
        a.decide(addr("10.1.1.1:9"), b"x", &p, &user)
            .expect("decided");
        a.decide(addr("10.3.3.3:9"), b"x", &p, &user)
            .expect("decided");
        assert_eq!(a.flow_count(), 2);
    }

    #[test]
    fn route_logs_new_decisions_once_charges_the_rate_only_for_what_may_leave() {
        let user = User::new("u", []);
        let p = version(
            &format!(
                "{LAN_RELAY}[[rule]]\nname = \"home\"\nverdict = \"direct\"\nnetworks = [\"192.168.0.0/16\"]\n"
            ),
            7,
        );
        let mut a = Association::new("127.0.0.1".parse().expect("ip"), 3);
        let never = || -> bool { panic!("a blocked datagram must not be charged") };
        let blocked = a.route(addr("8.8.8.8:9"), b"x", &p, &user, never);
        assert_eq!(blocked.route, Route::Drop(DropReason::Blocked));
        assert_eq!(blocked.log.map(|d| d.verdict), Some(Verdict::Block));
        let again = a.route(addr("8.8.8.8:9"), b"x", &p, &user, never);
        assert_eq!(
            (again.route, again.log),
            (Route::Drop(DropReason::Blocked), None)
        );

        let relayed = a.route(addr("10.1.1.1:9"), b"x", &p, &user, || true);
        assert_eq!(relayed.route, Route::Relay { generation: 7 });
        assert!(relayed.log.is_some());
        // Over the rate: dropped, but the new decision is still logged.
        let limited = a.route(addr("[::ffff:192.168.1.1]:9"), b"x", &p, &user, || false);
        assert_eq!(limited.route, Route::Drop(DropReason::RateLimit));
        assert_eq!(limited.log.map(|d| d.verdict), Some(Verdict::Direct));
        let direct = a.route(addr("192.168.1.1:9"), b"x", &p, &user, || true);
        assert_eq!(
            (direct.route, direct.log),
            (Route::Direct(addr("192.168.1.1:9")), None),
            "the same flow, the target canonical"
        );
        // The flow table is full (3): a fourth target is dropped, nothing to log, not charged.
        let full = a.route(addr("10.9.9.9:9"), b"x", &p, &user, never);
        assert_eq!(
            (full.route, full.log),
            (Route::Drop(DropReason::FlowLimit), None)
        );
        // A reload that turns the relayed flow direct: logged as a change.
        let p2 = version(
            "fallback = \"block\"\n[[rule]]\nname = \"lan\"\nverdict = \"direct\"\nnetworks = [\"10.0.0.0/8\"]\n",
            8,
        );
        let changed = a.route(addr("10.1.1.1:9"), b"x", &p2, &user, || true);
        assert_eq!(changed.route, Route::Direct(addr("10.1.1.1:9")));
        assert_eq!(changed.log.map(|d| d.verdict), Some(Verdict::Direct));
    }
}
