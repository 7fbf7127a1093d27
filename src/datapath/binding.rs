//! An app socket's relay bind — a SOCKS5 association's or an intercepted socket's: open, being
//! opened, or not yet. Binds open in the background, so an app socket's loop never waits on the
//! relay: a bind is asked for whenever the tunnel is up and the socket has none (at most once a
//! second on one tunnel connection, at once on a new one), with the public port of the last
//! one. Relayed datagrams that arrive while a bind opens are held (a few) and sent when it is
//! open — after a relay restart an app's first packets are usually ICE checks — never sent any
//! other way: fail closed. Held datagrams were decided under the policy of their moment; if the
//! policy is reloaded before the bind opens, they are dropped rather than sent on a stale
//! decision.

use super::state::{Counters, DropReason, PolicyVersion};
use crate::policy::User;
use crate::tunnel::{Awaited, Bind, OpenError, SendError, Tunnel, TunnelState};
use arc_swap::ArcSwap;
use bytes::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Relayed datagrams held while a bind opens; more are dropped.
const HELD: usize = 16;
/// How long a bind request may take.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(3);
/// How soon a bind is asked for again on the same tunnel connection.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// See the module docs: the shell, which spawns bind requests and owns the bind.
#[derive(Debug)]
pub(crate) struct Binding {
    bind: Option<Bind>,
    opening: Option<JoinHandle<Result<Bind, OpenError>>>,
    /// The public port of the last bind, asked for again.
    public_port: Option<u16>,
    holding: Holding,
}

/// The hold-then-recheck rule, sans IO: when a bind may be asked for, which relayed datagrams
/// wait while it opens, and which of them may still be sent once it is open.
#[derive(Debug, Default)]
pub(crate) struct Holding {
    /// When the last request started, and on which tunnel connection.
    last_attempt: Option<(Instant, u64)>,
    /// Target, payload, and the policy generation that decided to relay it.
    held: Vec<(SocketAddr, Bytes, u64)>,
}

impl Holding {
    /// Whether to ask for a bind at `now` on tunnel connection number `connection`: only on a
    /// connected tunnel, and at most once per [`RETRY_AFTER`] on the same connection (at once
    /// on a new one). A yes is recorded as an attempt.
    pub(crate) fn ask(&mut self, now: Instant, connection: u64, connected: bool) -> bool {
        let recent = self.last_attempt.is_some_and(|(t, c)| {
            c == connection && now.saturating_duration_since(t) < RETRY_AFTER
        });
        if recent || !connected {
            return false;
        }
        self.last_attempt = Some((now, connection));
        true
    }

    /// Holds a datagram decided under policy `generation` while a bind opens; at most [`HELD`].
    pub(crate) fn hold(
        &mut self,
        target: SocketAddr,
        payload: &[u8],
        generation: u64,
    ) -> Result<(), DropReason> {
        if self.is_full() {
            return Err(DropReason::RelayUnavailable);
        }
        self.held
            .push((target, Bytes::copy_from_slice(payload), generation));
        Ok(())
    }

    /// Whether as many datagrams are held as may be.
    pub(crate) fn is_full(&self) -> bool {
        self.held.len() >= HELD
    }

    /// The bind is open: the held datagrams still standing under policy generation `current`,
    /// in the order they came, and how many others are dropped (decided under a policy since
    /// reloaded: never sent on a stale decision).
    pub(crate) fn release(&mut self, current: u64) -> (Vec<(SocketAddr, Bytes)>, u64) {
        let held = std::mem::take(&mut self.held);
        let total = held.len();
        let standing: Vec<_> = held
            .into_iter()
            .filter(|(_, _, generation)| *generation == current)
            .map(|(target, payload, _)| (target, payload))
            .collect();
        let stale = (total - standing.len()) as u64;
        (standing, stale)
    }

    /// The request failed: how many held datagrams are dropped.
    pub(crate) fn fail(&mut self) -> u64 {
        std::mem::take(&mut self.held).len() as u64
    }
}

/// What became of a relayed datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Relayed {
    /// Into the tunnel.
    Now,
    /// Held until the bind that is opening is open.
    Held,
}

/// What happened to the bind.
#[derive(Debug)]
pub(crate) enum BindEvent {
    /// A datagram from a peer (more may be waiting: [`crate::tunnel::burst`]).
    Datagram((SocketAddr, Bytes)),
    /// The bind ended (the relay closed it, or the connection was lost).
    Closed,
    /// A bind is open at `public`; `sent` held datagrams went into the tunnel, `dropped` did not
    /// (too large, or decided under a policy since reloaded).
    Opened {
        public: SocketAddr,
        sent: u64,
        dropped: u64,
    },
    /// The request failed; `dropped` held datagrams are dropped.
    Failed { error: OpenError, dropped: u64 },
}

impl BindEvent {
    /// Logs and counts what happened to the bind of `client`'s socket (a datagram is the
    /// caller's to deliver).
    pub(crate) fn record(&self, counters: &Counters, user: &User, client: SocketAddr) {
        match self {
            Self::Datagram(_) => {}
            Self::Closed => {
                info!(user = %user, client = %client, "relay bind closed; relayed traffic is dropped until a new one opens")
            }
            Self::Opened {
                public,
                sent,
                dropped,
            } => {
                info!(user = %user, client = %client, public = %public, held_sent = sent, "relay bind open");
                counters.relayed_out.fetch_add(*sent, Ordering::Relaxed);
                counters.drop_n(DropReason::RelayUnavailable, *dropped);
            }
            Self::Failed { error, dropped } => {
                warn!(user = %user, client = %client, error = %error, "relay bind failed; relayed traffic is dropped");
                counters.drop_n(DropReason::RelayUnavailable, *dropped);
            }
        }
    }
}

impl Binding {
    /// `bind` already open (or none), or the public port a previous one had.
    pub(crate) fn new(bind: Option<Bind>, public_port: Option<u16>) -> Self {
        Self {
            public_port: bind
                .as_ref()
                .map(|b| b.public_address().port())
                .or(public_port),
            bind,
            opening: None,
            holding: Holding::default(),
        }
    }

    pub(crate) fn bind_mut(&mut self) -> Option<&mut Bind> {
        self.bind.as_mut()
    }

    /// Asks for a bind if there is none, none is being opened, and [`Holding::ask`] agrees.
    pub(crate) fn open(&mut self, tunnel: Option<&Tunnel>, user: &str) {
        let Some(tunnel) = tunnel else { return };
        if self.bind.is_some() || self.opening.is_some() {
            return;
        }
        let connection = tunnel.counters().connects.load(Ordering::Relaxed);
        let connected = tunnel.state() == TunnelState::Connected;
        if !self.holding.ask(Instant::now(), connection, connected) {
            return;
        }
        let (tunnel, user, port) = (tunnel.clone(), user.to_owned(), self.public_port);
        self.opening = Some(tokio::spawn(async move {
            tokio::time::timeout(OPEN_TIMEOUT, tunnel.open_bind(&user, port))
                .await
                .unwrap_or_else(|_| Err(OpenError::Timeout(Awaited::Bind)))
        }));
    }

    /// Whether a bind is opening and holds as many datagrams as it may: a caller that can
    /// leave the next ones queued (an intercepted socket's queue) waits for the open instead of
    /// having them dropped.
    pub(crate) fn is_holding_full(&self) -> bool {
        self.opening.is_some() && self.holding.is_full()
    }

    /// Sends `payload` to `target` through the relay, or holds it while a bind opens (asking
    /// for one if need be); never any other way. `generation`: the policy's that decided it.
    pub(crate) fn send(
        &mut self,
        tunnel: Option<&Tunnel>,
        user: &str,
        target: SocketAddr,
        payload: &[u8],
        generation: u64,
    ) -> Result<Relayed, DropReason> {
        if let Some(bind) = self.bind.as_mut() {
            match bind.send(target, payload) {
                Ok(()) => return Ok(Relayed::Now),
                Err(SendError::Backlog) => return Err(DropReason::TooLarge),
                Err(SendError::Closed) => self.bind = None,
            }
        }
        self.open(tunnel, user);
        if self.opening.is_none() {
            return Err(DropReason::RelayUnavailable);
        }
        self.holding.hold(target, payload, generation)?;
        Ok(Relayed::Held)
    }

    /// The next [`BindEvent`]; `policy` tells whether held datagrams' decisions still stand.
    pub(crate) fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        policy: &ArcSwap<PolicyVersion>,
    ) -> Poll<BindEvent> {
        if let Some(bind) = self.bind.as_mut()
            && let Poll::Ready(next) = bind.poll_recv(cx)
        {
            return Poll::Ready(match next {
                Some(first) => BindEvent::Datagram(first),
                None => {
                    self.bind = None;
                    BindEvent::Closed
                }
            });
        }
        let Some(opening) = self.opening.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(result) = Pin::new(opening).poll(cx) else {
            return Poll::Pending;
        };
        self.opening = None;
        Poll::Ready(match result.unwrap_or(Err(OpenError::Abandoned)) {
            Ok(mut bind) => {
                let (standing, mut dropped) = self.holding.release(policy.load().generation);
                let mut sent = 0;
                for (target, payload) in standing {
                    match bind.send(target, &payload) {
                        Ok(()) => sent += 1,
                        Err(_) => dropped += 1,
                    }
                }
                let public = bind.public_address();
                self.public_port = Some(public.port());
                self.bind = Some(bind);
                BindEvent::Opened {
                    public,
                    sent,
                    dropped,
                }
            }
            Err(error) => BindEvent::Failed {
                error,
                dropped: self.holding.fail(),
            },
        })
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn a_bind_is_asked_for_once_a_second_per_connection_and_only_when_connected() {
        let t0 = Instant::now();
        let mut h = Holding::default();
        assert!(!h.ask(t0, 1, false), "never on a tunnel that is down");
        assert!(h.ask(t0, 1, true));
        assert!(!h.ask(t0 + Duration::from_millis(999), 1, true));
        assert!(h.ask(t0 + RETRY_AFTER, 1, true));
        // A new tunnel connection: at once, whatever the last attempt on the old one.
        assert!(h.ask(t0 + RETRY_AFTER + Duration::from_millis(1), 2, true));
        assert!(!h.ask(t0 + RETRY_AFTER + Duration::from_millis(2), 2, true));
        // A clock read out of order does not panic and counts as recent.
        assert!(!h.ask(t0, 2, true));
    }

    #[test]
    fn at_most_held_datagrams_wait_and_a_failure_drops_them_all() {
        let mut h = Holding::default();
        for i in 0..HELD {
            assert_eq!(h.hold(addr(1), &[i as u8], 1), Ok(()));
        }
        assert!(h.is_full());
        assert_eq!(
            h.hold(addr(1), b"one too many", 1),
            Err(DropReason::RelayUnavailable)
        );
        assert_eq!(h.fail(), HELD as u64);
        assert!(!h.is_full());
        assert_eq!(h.release(1), (Vec::new(), 0));
    }

    #[test]
    fn held_datagrams_decided_under_a_reloaded_policy_are_dropped_not_sent() {
        let mut h = Holding::default();
        h.hold(addr(1), b"a", 1).expect("held");
        h.hold(addr(2), b"b", 2).expect("held");
        h.hold(addr(3), b"c", 1).expect("held");
        h.hold(addr(4), b"d", 2).expect("held");
        let (standing, stale) = h.release(2);
        assert_eq!(
            standing,
            vec![
                (addr(2), Bytes::from_static(b"b")),
                (addr(4), Bytes::from_static(b"d"))
            ],
            "the datagrams of the current generation, in order"
        );
        assert_eq!(stale, 2);
        assert_eq!(h.release(2), (Vec::new(), 0), "released once");
    }
}
