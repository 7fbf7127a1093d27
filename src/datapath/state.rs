//! Sidecar-wide state, shared by every front-end (SOCKS5, transparent interception) and by the
//! control socket: the policy in force and its generation, the counters and their drop
//! reasons, each user's session count and packet rate, and the status registry.
//!
//! Nothing here does IO or knows a front-end; [`Handle`] is what the outside (reload, `veil
//! status`, metrics) holds.

use crate::policy::{Decision, Policy, User, Verdict};
use crate::rate::TokenBucket;
use crate::tunnel::{Tunnel, TunnelState};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{info, warn};

/// Why a datagram was dropped; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// From an address other than the association's client.
    ForeignSource,
    /// FRAG ≠ 0.
    Fragmented,
    /// Not a valid SOCKS5 UDP datagram.
    Malformed,
    /// The policy blocks the flow.
    Blocked,
    /// The policy says `relay`, and no tunnel is available.
    RelayUnavailable,
    /// The association already has as many flows as its limit allows.
    FlowLimit,
    /// The user's packet rate is exceeded.
    RateLimit,
    /// A domain target that could not be resolved.
    Unresolved,
    /// A datagram from a peer that is not a direct flow of the association.
    UnknownPeer,
    /// The socket could not take the datagram (buffer full, or an error).
    SendFailed,
    /// Too large for a QUIC DATAGRAM frame, with the bind's request stream already holding as
    /// many DATAGRAM capsules as it may.
    TooLarge,
    /// The sending socket belongs to another user than the association's.
    ForeignOwner,
    /// No socket sends from that address (a raw socket's forgery).
    NoSocket,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 13] = [
        Self::ForeignSource,
        Self::Fragmented,
        Self::Malformed,
        Self::Blocked,
        Self::RelayUnavailable,
        Self::FlowLimit,
        Self::RateLimit,
        Self::Unresolved,
        Self::UnknownPeer,
        Self::SendFailed,
        Self::TooLarge,
        Self::ForeignOwner,
        Self::NoSocket,
    ];

    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForeignSource => "foreign_source",
            Self::Fragmented => "fragmented",
            Self::Malformed => "malformed",
            Self::Blocked => "blocked",
            Self::RelayUnavailable => "relay_unavailable",
            Self::FlowLimit => "flow_limit",
            Self::RateLimit => "rate_limit",
            Self::Unresolved => "unresolved",
            Self::UnknownPeer => "unknown_peer",
            Self::SendFailed => "send_failed",
            Self::TooLarge => "too_large",
            Self::ForeignOwner => "foreign_owner",
            Self::NoSocket => "no_socket",
        }
    }

    /// Index into a counter array.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A policy together with its generation number, which changes on every reload.
#[derive(Debug)]
pub struct PolicyVersion {
    /// The policy.
    pub policy: Policy,
    /// Increases by one with each successful reload.
    pub generation: u64,
}

/// Counters of what the sidecar did; read them with [`Counters::snapshot`].
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Datagrams sent on to targets.
    pub datagrams_out: AtomicU64,
    /// Datagrams from targets delivered to clients.
    pub datagrams_in: AtomicU64,
    /// Datagrams sent through the tunnel.
    pub relayed_out: AtomicU64,
    /// Datagrams from the tunnel delivered to clients.
    pub relayed_in: AtomicU64,
    /// SOCKS5 sessions accepted (past the handshake).
    pub sessions: AtomicU64,
}

impl Counters {
    pub(crate) fn drop(&self, reason: DropReason) {
        self.drop_n(reason, 1);
    }

    pub(crate) fn drop_n(&self, reason: DropReason, n: u64) {
        if let Some(c) = self.drops.get(reason.index())
            && n > 0
        {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Drops so far for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops
            .get(reason.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every counter as `(name, value)`.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let drops = DropReason::ALL
            .iter()
            .map(|r| (format!("dropped_{}", r.as_str()), self.drops(*r)));
        let totals = [
            ("datagrams_out", &self.datagrams_out),
            ("datagrams_in", &self.datagrams_in),
            ("relayed_out", &self.relayed_out),
            ("relayed_in", &self.relayed_in),
            ("sessions", &self.sessions),
        ]
        .into_iter()
        .map(|(name, c)| (name.to_owned(), c.load(Ordering::Relaxed)));
        drops.chain(totals).collect()
    }
}

/// What one user is using right now.
#[derive(Debug)]
struct UserState {
    sessions: u32,
    packets: TokenBucket,
}

/// State shared by every session of every front-end.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The tunnel to the relay; without it, `relay` verdicts are dropped (fail closed).
    pub(crate) tunnel: Option<Tunnel>,
    pub(crate) policy: ArcSwap<PolicyVersion>,
    users: Mutex<HashMap<String, UserState>>,
    pub(crate) counters: Counters,
    /// Bounds how many block decisions are logged per second.
    block_log: Mutex<TokenBucket>,
    /// Bounds how many refused sources (another user's socket, none) are logged per second.
    source_log: Mutex<TokenBucket>,
    /// Live sessions and their flows, for status.
    pub(crate) registry: Arc<crate::status::Registry>,
}

impl Shared {
    /// Logs a datagram refused for the socket that sent it, unless many were just logged (a
    /// flood of forged datagrams must not fill the journal). The caller counts it.
    pub(crate) fn log_refused_source(&self, reason: DropReason, client: SocketAddr, user: &str) {
        let log = self
            .source_log
            .lock()
            .map(|mut b| b.take(Instant::now()))
            .unwrap_or(false);
        if log {
            warn!(client = %client, user, reason = reason.as_str(), "datagram refused for the socket that sent it");
        }
    }

    /// Logs a flow's decision; block decisions at a bounded rate (a flood of blocked
    /// destinations must not fill the journal).
    pub(crate) fn log_decision(
        &self,
        user: &User,
        client: SocketAddr,
        target: SocketAddr,
        decision: &Decision,
    ) {
        if decision.verdict == Verdict::Block {
            let allowed = self
                .block_log
                .lock()
                .map(|mut b| b.take(Instant::now()))
                .unwrap_or(false);
            if !allowed {
                return;
            }
        }
        info!(user = %user, client = %client, target = %target, rule = %decision.rule, verdict = %decision.verdict, "decision");
    }

    /// Charges one datagram to `user`'s packet rate; false if over the limit.
    pub(crate) fn take_packet_token(&self, user: &User, policy: &PolicyVersion) -> bool {
        let Ok(mut users) = self.users.lock() else {
            return false;
        };
        let Some(state) = users.get_mut(user.name()) else {
            return false;
        };
        state
            .packets
            .set_rate(policy.policy.limits(user).max_packets_per_second);
        state.packets.take(Instant::now())
    }

    /// Takes one of `user`'s session slots, or None if they hold `max` already.
    pub(crate) fn take_session_slot(&self, user: &User, max: u32) -> Option<SessionSlot<'_>> {
        let mut users = self.users.lock().ok()?;
        let limits = self.policy.load().policy.limits(user);
        let state = users
            .entry(user.name().to_owned())
            .or_insert_with(|| UserState {
                sessions: 0,
                packets: TokenBucket::new(limits.max_packets_per_second, Instant::now()),
            });
        if state.sessions >= max {
            return None;
        }
        state.sessions += 1;
        Some(SessionSlot {
            shared: self,
            user: user.name().to_owned(),
        })
    }
}

/// One session's hold on its user's session count (and packet-rate bucket); released on drop.
pub(crate) struct SessionSlot<'a> {
    shared: &'a Shared,
    user: String,
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut users) = self.shared.users.lock()
            && let Some(state) = users.get_mut(&self.user)
        {
            state.sessions = state.sessions.saturating_sub(1);
            if state.sessions == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// A handle to a running sidecar's state: reload its policy, read its counters and status.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Fresh state: `policy` as generation 1, relayed traffic through `tunnel` (none: dropped).
    pub fn new(policy: Policy, tunnel: Option<Tunnel>) -> Self {
        let now = Instant::now();
        Self {
            shared: Arc::new(Shared {
                tunnel,
                policy: ArcSwap::from_pointee(PolicyVersion {
                    policy,
                    generation: 1,
                }),
                users: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                block_log: Mutex::new(TokenBucket::new(20, now)),
                source_log: Mutex::new(TokenBucket::new(20, now)),
                registry: Arc::new(crate::status::Registry::default()),
            }),
        }
    }

    /// Swaps in a new policy; every live flow is decided again on its next packet. Returns the
    /// new generation.
    pub fn reload(&self, policy: Policy) -> u64 {
        let generation = self.shared.policy.load().generation + 1;
        self.shared
            .policy
            .store(Arc::new(PolicyVersion { policy, generation }));
        generation
    }

    /// The sidecar's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// The tunnel to the relay, if one is configured.
    pub fn tunnel(&self) -> Option<&Tunnel> {
        self.shared.tunnel.as_ref()
    }

    /// The `veil status` report; `managed` names the transparently managed users and groups.
    pub fn status_report(&self, managed: &[String]) -> String {
        crate::status::report(
            &crate::status::tunnel_line(self.tunnel()),
            managed,
            crate::firewall::last_check().as_deref(),
            &self.shared.registry.snapshot(),
            &self.counters().snapshot(),
        )
    }

    /// The counters in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let tunnel = self.tunnel();
        let up = tunnel.is_some_and(|t| t.state() == TunnelState::Connected);
        crate::status::prometheus(
            up,
            &tunnel.map(Tunnel::figures).unwrap_or_default(),
            &self.shared.registry.snapshot(),
            &self.counters().snapshot(),
        )
    }
}
