//! The datagram pipeline of one app socket, the same for every front-end.
//!
//! A front-end (a SOCKS5 UDP association, an intercepted app socket) receives datagrams from
//! the app and hands each to [`Pipeline::send`]; it polls [`Pipeline::poll_return`] and hands
//! what comes back to [`Pipeline::deliver`] with its [`Front`], which knows how to reach the
//! app. Everything between is here, once:
//!
//! - out: [`Association::route`] decides (policy, flow table, packet rate); a new decision is
//!   logged and shown in status; the datagram is dropped with a counted reason, sent from the
//!   host (`direct`), or given to the relay bind ([`Binding`]: held while one opens, never sent
//!   any other way);
//! - back: datagrams from the bind and from the direct sockets are admitted by
//!   [`Association::admit_peer`] (a reply only by the path its flow's verdict names) and given
//!   to the front-end in bursts, at most [`BATCH`] per wake-up.

use super::association::{Association, Route};
use super::binding::{BindEvent, Binding, Relayed};
use super::state::{DropReason, Shared};
use crate::batch::Sent;
use crate::policy::{User, Verdict};
use crate::status::LiveSession;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::net::UdpSocket;
use tracing::warn;

/// Datagrams taken from one socket per wake-up before other tasks get a turn.
pub(crate) const BATCH: usize = 64;

/// How a front-end reaches its app.
pub(crate) trait Front {
    /// Calls `fill` with a function that queues one datagram from `peer` for the app at `app`,
    /// then sends whatever is still queued (in GSO runs where it can); returns what was sent.
    fn deliver(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> Sent) -> Sent,
    ) -> Sent;
}

/// Something for the pipeline's return path (see [`Pipeline::poll_return`]).
#[derive(Debug)]
pub(crate) enum Return {
    /// Something happened to the relay bind.
    Bind(BindEvent),
    /// A direct socket (IPv6 if `v6`) has replies waiting.
    Direct { v6: bool },
}

/// What [`Pipeline::deliver`] did with a [`Return`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivered {
    /// Datagrams from peers (some may have been dropped).
    Datagrams,
    /// A relay bind opened at this public address.
    Opened(SocketAddr),
    /// The bind closed or its request failed (logged and counted).
    BindChanged,
}

/// One app socket's pipeline: its flows, its relay bind and its direct sockets.
pub(crate) struct Pipeline<'a> {
    shared: &'a Shared,
    user: User,
    association: Association,
    binding: Binding,
    /// Sockets for `direct` flows, IPv4 and IPv6, opened on first use.
    direct: [Option<UdpSocket>; 2],
    /// This app socket in the status registry.
    live: LiveSession,
    /// Which return source [`Pipeline::poll_return`] looks at first.
    turn: usize,
}

impl<'a> Pipeline<'a> {
    /// A pipeline over `association` (its client claimed or not yet), with `binding`.
    pub(crate) fn new(
        shared: &'a Shared,
        user: User,
        association: Association,
        binding: Binding,
        live: LiveSession,
    ) -> Self {
        Self {
            shared,
            user,
            association,
            binding,
            direct: [None, None],
            live,
            turn: 0,
        }
    }

    /// The sidecar's state.
    pub(crate) fn shared(&self) -> &'a Shared {
        self.shared
    }

    /// The user whose app socket this is.
    pub(crate) fn user(&self) -> &User {
        &self.user
    }

    /// The association, for a front-end's own admission of the client.
    pub(crate) fn association(&mut self) -> &mut Association {
        &mut self.association
    }

    /// Asks for a relay bind if the app socket has none (see [`Binding::open`]).
    pub(crate) fn open_bind(&mut self) {
        self.binding
            .open(self.shared.tunnel.as_ref(), self.user.name());
    }

    /// Whether a bind is opening and holds all it may (see [`Binding::is_holding_full`]).
    pub(crate) fn is_holding_full(&self) -> bool {
        self.binding.is_holding_full()
    }

    /// Sends one datagram from the app to `target`, as the policy says, or drops and counts it.
    pub(crate) fn send(&mut self, target: SocketAddr, payload: &[u8]) {
        let shared = self.shared;
        let policy = shared.policy.load();
        let user = &self.user;
        let step = self.association.route(target, payload, &policy, user, || {
            shared.take_packet_token(user, &policy)
        });
        if let Some(decision) = &step.log {
            let client = self.association.client().unwrap_or(target);
            shared.log_decision(user, client, target, decision);
            self.live.flow(target, decision);
        }
        let counters = &shared.counters;
        match step.route {
            Route::Drop(reason) => counters.drop(reason),
            Route::Relay { generation } => match self.binding.send(
                shared.tunnel.as_ref(),
                user.name(),
                target,
                payload,
                generation,
            ) {
                Ok(Relayed::Now) => {
                    counters.relayed_out.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Relayed::Held) => {}
                Err(reason) => counters.drop(reason),
            },
            Route::Direct(target) => match self.direct_socket(target.is_ipv6()) {
                Some(s) if send_now(s, payload, target).is_ok() => {
                    counters.datagrams_out.fetch_add(1, Ordering::Relaxed);
                }
                _ => counters.drop(DropReason::SendFailed),
            },
        }
    }

    /// The direct socket of a family, opened (with media-sized buffers) on first use.
    fn direct_socket(&mut self, v6: bool) -> Option<&UdpSocket> {
        let slot = &mut self.direct[usize::from(v6)];
        if slot.is_none() {
            match direct_socket(v6) {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    warn!(user = %self.user, error = %e, "cannot open a socket for direct flows");
                }
            }
        }
        slot.as_ref()
    }

    /// Waits for the return path: a direct socket with replies, or the bind's next event.
    /// Starts from a different source each time, so a flooded one cannot starve the others.
    pub(crate) fn poll_return(&mut self, cx: &mut Context<'_>) -> Poll<Return> {
        self.turn = self.turn.wrapping_add(1);
        for i in 0..3 {
            match (self.turn + i) % 3 {
                2 => {
                    if let Poll::Ready(event) = self.binding.poll_event(cx, &self.shared.policy) {
                        return Poll::Ready(Return::Bind(event));
                    }
                }
                n => {
                    let v6 = n == 1;
                    let ready = self.direct[n].as_ref().map(|s| s.poll_recv_ready(cx));
                    match ready {
                        Some(Poll::Ready(Ok(()))) => return Poll::Ready(Return::Direct { v6 }),
                        // A socket in error is closed; the next direct datagram opens another.
                        Some(Poll::Ready(Err(_))) => self.direct[n] = None,
                        _ => {}
                    }
                }
            }
        }
        Poll::Pending
    }

    /// Delivers what [`Pipeline::poll_return`] found to the app through `front`, counting and
    /// logging as it goes; `client` names the app socket in logs.
    pub(crate) fn deliver(
        &mut self,
        returned: Return,
        front: &impl Front,
        client: SocketAddr,
    ) -> Delivered {
        match returned {
            Return::Bind(BindEvent::Datagram(first)) => {
                self.deliver_relayed(first, front);
                Delivered::Datagrams
            }
            Return::Bind(event) => {
                event.record(&self.shared.counters, &self.user, client);
                match event {
                    BindEvent::Opened { public, .. } => Delivered::Opened(public),
                    _ => Delivered::BindChanged,
                }
            }
            Return::Direct { v6 } => {
                self.deliver_direct(v6, front);
                Delivered::Datagrams
            }
        }
    }

    /// Datagrams from relayed peers, `first` and whatever else has already arrived: each to
    /// the app if its peer may be heard through the relay.
    fn deliver_relayed(&mut self, first: (SocketAddr, bytes::Bytes), front: &impl Front) {
        let Self {
            shared,
            user,
            association,
            binding,
            ..
        } = self;
        let policy = shared.policy.load();
        let counters = &shared.counters;
        let sent = front.deliver(|push| {
            let mut sent = Sent::default();
            for (peer, payload) in crate::tunnel::burst(first, binding.bind_mut()) {
                match association.admit_peer(peer, &payload, Verdict::Relay, &policy, user) {
                    Ok(app) => sent += push(peer, app, &payload),
                    Err(reason) => counters.drop(reason),
                }
            }
            sent
        });
        counters.relayed_in.fetch_add(sent.ok, Ordering::Relaxed);
        counters.drop_n(DropReason::SendFailed, sent.failed);
    }

    /// Replies waiting on a direct socket, at most [`BATCH`]: each to the app if its peer is a
    /// `direct` flow.
    fn deliver_direct(&mut self, v6: bool, front: &impl Front) {
        let Self {
            shared,
            user,
            association,
            direct,
            ..
        } = self;
        let Some(socket) = direct[usize::from(v6)].as_ref() else {
            return;
        };
        let counters = &shared.counters;
        let sent = crate::with_buffer(|buf| {
            front.deliver(|push| {
                let mut sent = Sent::default();
                for _ in 0..BATCH {
                    let Ok((n, peer)) = socket.try_recv_from(buf) else {
                        break;
                    };
                    let peer = super::association::canonical(peer);
                    let policy = shared.policy.load();
                    match association.admit_peer(peer, &[], Verdict::Direct, &policy, user) {
                        Ok(app) => sent += push(peer, app, buf.get(..n).unwrap_or_default()),
                        Err(reason) => counters.drop(reason),
                    }
                }
                sent
            })
        });
        counters.datagrams_in.fetch_add(sent.ok, Ordering::Relaxed);
        counters.drop_n(DropReason::SendFailed, sent.failed);
    }

    /// How many flows the app socket has.
    pub(crate) fn flow_count(&self) -> usize {
        self.association.flow_count()
    }
}

/// A socket for direct flows of one family: bound to any address, media-sized buffers.
fn direct_socket(v6: bool) -> io::Result<UdpSocket> {
    let socket = if v6 {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
        s.set_only_v6(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        s
    } else {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        s
    };
    socket.set_nonblocking(true)?;
    crate::SocketBuffers::PerAssociation.apply(&socket);
    UdpSocket::from_std(socket.into())
}

/// Sends at once, without waiting for the runtime to report the socket writable (a UDP socket
/// almost always is; when its buffer is full the datagram is dropped, as the network would).
fn send_now(socket: &UdpSocket, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_to(payload, &to.into())
}
