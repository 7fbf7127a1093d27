//! What the relay did: datagrams each way, requests accepted and refused, and every drop by
//! its reason (one counter each, as the sidecar's [`DropReason`](crate::datapath::state::DropReason)s).

use std::sync::atomic::{AtomicU64, Ordering};

/// Why the relay dropped a datagram; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelayDrop {
    /// The egress policy forbids the peer.
    Egress,
    /// A user or bind quota.
    Quota,
    /// A context or request the relay does not know.
    Unknown,
    /// Too large for a QUIC DATAGRAM frame on the path, with the request stream's backlog of
    /// DATAGRAM capsules full.
    TooLarge,
    /// The bind's socket refused the send (buffer full, or an error).
    SendFailed,
    /// A peer the client has not sent to (address-dependent filtering).
    InboundFilter,
}

impl RelayDrop {
    /// Every reason, in counter order.
    pub const ALL: [Self; 6] = [
        Self::Egress,
        Self::Quota,
        Self::Unknown,
        Self::TooLarge,
        Self::SendFailed,
        Self::InboundFilter,
    ];

    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Egress => "egress",
            Self::Quota => "quota",
            Self::Unknown => "unknown",
            Self::TooLarge => "too_large",
            Self::SendFailed => "send_failed",
            Self::InboundFilter => "inbound_filter",
        }
    }
}

/// The relay's counters; read them with [`RelayCounters::snapshot`].
#[derive(Debug, Default)]
pub struct RelayCounters {
    drops: [AtomicU64; RelayDrop::ALL.len()],
    /// Datagrams from clients sent on to peers.
    pub datagrams_out: AtomicU64,
    /// Datagrams from peers delivered to clients.
    pub datagrams_in: AtomicU64,
    /// Requests accepted.
    pub requests_accepted: AtomicU64,
    /// Requests refused.
    pub requests_refused: AtomicU64,
}

impl RelayCounters {
    pub(crate) fn drop(&self, reason: RelayDrop) {
        self.drop_n(reason, 1);
    }

    pub(crate) fn drop_n(&self, reason: RelayDrop, n: u64) {
        if let Some(c) = self.drops.get(reason as usize)
            && n > 0
        {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Drops so far for `reason`.
    pub fn drops(&self, reason: RelayDrop) -> u64 {
        self.drops
            .get(reason as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Every counter as `(name, value)`: `datagrams_out`, `datagrams_in`, `dropped_REASON`
    /// for each reason, `requests_accepted`, `requests_refused`.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let load = |name: &str, c: &AtomicU64| (name.to_owned(), c.load(Ordering::Relaxed));
        let mut out = vec![
            load("datagrams_out", &self.datagrams_out),
            load("datagrams_in", &self.datagrams_in),
        ];
        out.extend(
            RelayDrop::ALL
                .iter()
                .map(|r| (format!("dropped_{}", r.as_str()), self.drops(*r))),
        );
        out.push(load("requests_accepted", &self.requests_accepted));
        out.push(load("requests_refused", &self.requests_refused));
        out
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_has_its_own_stably_named_counter() {
        let c = RelayCounters::default();
        for (i, r) in RelayDrop::ALL.iter().enumerate() {
            for _ in 0..=i {
                c.drop(*r);
            }
        }
        let names: Vec<(String, u64)> = c.snapshot();
        assert_eq!(
            names,
            [
                ("datagrams_out", 0),
                ("datagrams_in", 0),
                ("dropped_egress", 1),
                ("dropped_quota", 2),
                ("dropped_unknown", 3),
                ("dropped_too_large", 4),
                ("dropped_send_failed", 5),
                ("dropped_inbound_filter", 6),
                ("requests_accepted", 0),
                ("requests_refused", 0),
            ]
            .map(|(n, v)| (n.to_owned(), v))
        );
    }
}
