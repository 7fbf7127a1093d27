//! What every shard, connection and request of the relay shares.

use super::config::RelayConfig;
use super::counters::RelayCounters;
use super::egress::Egress;
use super::permissions::Peer;
use super::quota::Usage;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: RelayConfig,
    pub(super) egress: Egress,
    pub(super) usage: Arc<Usage>,
    pub(super) counters: RelayCounters,
    started: Instant,
    /// The live binds on the public address, by port: the only own-address destinations,
    /// and who holds each (a newer bind of the same user may take a port over).
    pub(super) bind_ports: Mutex<HashMap<u16, PortHolder>>,
    /// Numbers the binds, to tell holders apart.
    pub(super) next_bind: AtomicU64,
}

/// The bind that holds a public port.
#[derive(Debug)]
pub(super) struct PortHolder {
    pub(super) user: String,
    /// The subject of the certificate it came with: only the same sidecar may take the port.
    pub(super) subject: Option<Vec<u8>>,
    pub(super) bind: u64,
    /// The QUIC connection it came on ([`super::bind::connection_id`]).
    pub(super) conn: usize,
    /// That bind's request, to end it.
    pub(super) request: Arc<dyn Ends>,
}

/// A request that can be ended from outside its task (a port taken over).
pub(super) trait Ends: std::fmt::Debug + Send + Sync {
    /// Ends the request for `why` (one of `super::bind`'s reasons).
    fn end(&self, why: u8);
}

impl Shared {
    pub(super) fn new(config: RelayConfig, egress: Egress) -> Self {
        Self {
            usage: Usage::new(config.quotas),
            config,
            egress,
            counters: RelayCounters::default(),
            started: Instant::now(),
            bind_ports: Mutex::new(HashMap::new()),
            next_bind: AtomicU64::new(0),
        }
    }

    /// True if `peer` is one of this relay's own live bind sockets.
    pub(super) fn is_hairpin(&self, peer: SocketAddr) -> bool {
        peer.ip().to_canonical() == self.config.public_address.to_canonical()
            && self
                .bind_ports
                .lock()
                .is_ok_and(|p| p.contains_key(&peer.port()))
    }

    /// What [`super::permissions::Permissions`] needs to know of `peer`.
    pub(super) fn peer(&self, peer: SocketAddr) -> Peer {
        let ip = peer.ip().to_canonical();
        Peer {
            ip: peer.ip(),
            hairpin: self.is_hairpin(peer),
            own: ip == self.config.public_address.to_canonical() || self.egress.is_own(ip),
        }
    }

    /// Whether a bind may send to `peer`: the egress policy, or another bind of this relay.
    pub(super) fn may_send_to(&self, peer: SocketAddr) -> bool {
        self.is_hairpin(peer) || self.egress.check(peer).is_ok()
    }

    /// Milliseconds since the relay started: a request's last activity, in one atomic.
    pub(super) fn millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}
