//! An app socket's relay bind — a SOCKS5 association's or an intercepted socket's: open, being
//! opened, or not yet. Binds open in the background, so an app socket's loop never waits on the
//! relay: a bind is asked for whenever the tunnel is up and the socket has none (at most once a
//! second on one tunnel connection, at once on a new one), with the public port of the last
//! one. Relayed datagrams that arrive while a bind opens are held (a few) and sent when it is
//! open — after a relay restart an app's first packets are usually ICE checks — never sent any
//! other way: fail closed. Held datagrams were decided under the policy of their moment; if the
//! policy is reloaded before the bind opens, they are dropped rather than sent on a stale
//! decision.

use crate::policy::User;
use crate::socks5::association::{DropReason, PolicyVersion};
use crate::socks5::server::Counters;
use crate::tunnel::{Bind, OpenError, SendError, Tunnel, TunnelState};
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

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Binding {
    bind: Option<Bind>,
    opening: Option<JoinHandle<Result<Bind, OpenError>>>,
    /// When the last request started, and on which tunnel connection.
    last_attempt: Option<(Instant, u64)>,
    /// The public port of the last bind, asked for again.
    public_port: Option<u16>,
    /// Target, payload, and the policy generation that decided to relay it.
    held: Vec<(SocketAddr, Bytes, u64)>,
}

/// What became of a relayed datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
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
            last_attempt: None,
            held: Vec::new(),
        }
    }

    pub(crate) fn bind_mut(&mut self) -> Option<&mut Bind> {
        self.bind.as_mut()
    }

    /// Asks for a bind if there is none, none is being opened, the tunnel is up, and the last
    /// request on this tunnel connection was long enough ago.
    pub(crate) fn open(&mut self, tunnel: Option<&Tunnel>, user: &str) {
        let Some(tunnel) = tunnel else { return };
        if self.bind.is_some() || self.opening.is_some() {
            return;
        }
        let connection = tunnel.counters().connects.load(Ordering::Relaxed);
        if self
            .last_attempt
            .is_some_and(|(t, c)| c == connection && t.elapsed() < RETRY_AFTER)
            || tunnel.state() != TunnelState::Connected
        {
            return;
        }
        self.last_attempt = Some((Instant::now(), connection));
        let (tunnel, user, port) = (tunnel.clone(), user.to_owned(), self.public_port);
        self.opening = Some(tokio::spawn(async move {
            tokio::time::timeout(OPEN_TIMEOUT, tunnel.open_bind(&user, port))
                .await
                .unwrap_or_else(|_| Err(OpenError::Failed("bind request timed out".into())))
        }));
    }

    /// Whether a bind is opening and holds as many datagrams as it may: a caller that can
    /// leave the next ones queued (an intercepted socket's queue) waits for the open instead of
    /// having them dropped.
    pub(crate) fn is_holding_full(&self) -> bool {
        self.opening.is_some() && self.held.len() >= HELD
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
    ) -> Result<Sent, DropReason> {
        if let Some(bind) = self.bind.as_mut() {
            match bind.send(target, payload) {
                Ok(()) => return Ok(Sent::Now),
                Err(SendError::Backlog) => return Err(DropReason::TooLarge),
                Err(SendError::Closed) => self.bind = None,
            }
        }
        self.open(tunnel, user);
        if self.opening.is_none() || self.held.len() >= HELD {
            return Err(DropReason::RelayUnavailable);
        }
        self.held
            .push((target, Bytes::copy_from_slice(payload), generation));
        Ok(Sent::Held)
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
        let held = std::mem::take(&mut self.held);
        let mut dropped = held.len() as u64;
        Poll::Ready(
            match result.unwrap_or_else(|e| Err(OpenError::Failed(e.to_string()))) {
                Ok(mut bind) => {
                    let current = policy.load().generation;
                    let sent = held
                        .into_iter()
                        .filter(|(target, payload, generation)| {
                            *generation == current && bind.send(*target, payload).is_ok()
                        })
                        .count() as u64;
                    dropped -= sent;
                    let public = bind.public_address();
                    self.public_port = Some(public.port());
                    self.bind = Some(bind);
                    BindEvent::Opened {
                        public,
                        sent,
                        dropped,
                    }
                }
                Err(error) => BindEvent::Failed { error, dropped },
            },
        )
    }

    /// [`Binding::poll_event`] as a future.
    pub(crate) async fn event(&mut self, policy: &ArcSwap<PolicyVersion>) -> BindEvent {
        std::future::poll_fn(|cx| self.poll_event(cx, policy)).await
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
    }
}
