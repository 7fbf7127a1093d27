//! A CONNECT-UDP request on the relay, bind or fixed target: its socket opened (with the port
//! takeover rule), its answer, and its task, which carries capsules on the request stream and
//! sends what its socket receives back to the client. Datagrams from the client reach it
//! through [`UdpRequest::admit_from_client`], called by the connection's datagram task.

use super::config::InboundFilter;
use super::counters::{RelayDrop, bump};
use super::permissions::{Denied, Permissions};
use super::quota::{BindSlot, UserUse};
use super::request::{H3Stream, peer_subject};
use super::request::{Refuse, refuse};
use super::shared::{Ends, PortHolder, Shared};
use crate::masque::request::{
    self as mreq, HEADER_BIND, HEADER_CAPSULE_PROTOCOL, HEADER_PUBLIC_ADDRESS, ProxyContexts,
};
use crate::masque::wire;
use bytes::Bytes;
use http::{Response, StatusCode};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What a request's datagrams mean.
#[derive(Debug)]
enum Mode {
    /// Bind: contexts say where each datagram goes.
    Bind(Mutex<ProxyContexts>),
    /// Unextended CONNECT-UDP: context 0 to and from one target (the socket is connected).
    Fixed,
}

/// The part of a request that the connection's datagram task needs.
#[derive(Debug)]
pub(super) struct UdpRequest {
    user: String,
    /// The user's packet and byte allowance.
    usage: Arc<UserUse>,
    pub(super) socket: Arc<UdpSocket>,
    mode: Mode,
    /// The peers the client has sent to: the only ones admitted back (address-dependent).
    permitted: Mutex<Permissions>,
    /// When the request last carried a datagram, in ms since the relay started.
    pub(super) active: AtomicU64,
    /// Wakes the request's task to end it, for the reason in `ended` (see [`UdpRequest::end`]).
    end: Notify,
    ended: AtomicU8,
    /// The socket is IPv6.
    v6: bool,
}

/// A connection's UDP requests by quarter stream ID.
pub(super) type Requests = Arc<Mutex<HashMap<u64, Arc<UdpRequest>>>>;

/// Tells a connection apart from every other live one of the relay, whichever shard it is on
/// (quinn's `stable_id` is unique only within one endpoint): the address of its requests' map,
/// which lives as long as any of its binds.
pub(super) fn connection_id(requests: &Requests) -> usize {
    Arc::as_ptr(requests) as usize
}

/// Why a request is ended from outside its task (`UdpRequest::ended`).
const ENDED_TAKEN_OVER: u8 = 1;
pub(super) const ENDED_IDLE: u8 = 2;
pub(super) const ENDED_SHUTDOWN: u8 = 3;

impl Ends for UdpRequest {
    /// Ends the request for `why` (one of the `ENDED_*`). A notification rather than a
    /// cancellation token per bind, and one for the relay's shutdown too: the bind's task waits
    /// on one future, not two (memory per idle bind).
    fn end(&self, why: u8) {
        self.ended.store(why, Ordering::Relaxed);
        self.end.notify_one();
    }
}

impl UdpRequest {
    fn end_reason(&self) -> &'static str {
        match self.ended.load(Ordering::Relaxed) {
            ENDED_TAKEN_OVER => "port taken over by a newer bind of the same user",
            ENDED_IDLE => "idle",
            _ => "shutdown",
        }
    }

    /// A datagram from the client: checked and charged. Returns where its UDP payload goes
    /// (`None`: the connected target) and the payload, if it may go.
    pub(super) fn admit_from_client<'a>(
        &self,
        shared: &Shared,
        context_id: u64,
        payload: &'a [u8],
    ) -> Option<(Option<SocketAddr>, &'a [u8])> {
        let c = &shared.counters;
        let (target, udp) = match &self.mode {
            Mode::Fixed if context_id == 0 => (None, payload),
            Mode::Fixed => {
                c.drop(RelayDrop::Unknown);
                return None;
            }
            Mode::Bind(contexts) => {
                let found = contexts
                    .lock()
                    .ok()
                    .and_then(|t| t.from_client(context_id, payload));
                match found {
                    Some((peer, udp)) => (Some(peer), udp),
                    None => {
                        c.drop(RelayDrop::Unknown);
                        return None;
                    }
                }
            }
        };
        if let Some(peer) = target {
            let judged = shared.peer(peer);
            let verdict = self
                .permitted
                .lock()
                .ok()?
                .outbound(judged, || shared.egress.check(peer));
            match verdict {
                Ok(()) => {}
                Err(Denied::Egress(refusal)) => {
                    debug!(user = %self.user, target = %peer, reason = %refusal, "egress denied");
                    c.drop(RelayDrop::Egress);
                    return None;
                }
                Err(Denied::Quota) => {
                    c.drop(RelayDrop::Quota);
                    return None;
                }
            }
        }
        if !self.usage.charge(udp.len(), Instant::now()) {
            c.drop(RelayDrop::Quota);
            return None;
        }
        self.active.store(shared.millis(), Ordering::Relaxed);
        Some((target, udp))
    }
}

/// Room for the HTTP Datagram prefix and an uncompressed address before a payload.
use crate::HEADROOM;

/// Binds `addr` (a preferred public port). If a bind of the same user, from a sidecar with the
/// same certificate subject, on *another* connection holds it — the bind of a sidecar that
/// restarted and has not been noticed gone — that bind is ended and the port taken over.
/// Another user's port is never taken, nor one held by another sidecar (another machine's
/// certificate), nor one of the same connection (two of its app sockets must not take a port
/// back and forth).
async fn bind_preferred(
    shared: &Shared,
    (user, subject): (&str, Option<&[u8]>),
    conn: usize,
    addr: SocketAddr,
) -> io::Result<UdpSocket> {
    let first = UdpSocket::bind(addr).await;
    if first.is_ok() {
        return first;
    }
    let released = shared.bind_ports.lock().ok().and_then(|ports| {
        let holder = ports.get(&addr.port()).filter(|h| {
            h.user == user && h.conn != conn && subject.is_some() && h.subject.as_deref() == subject
        })?;
        holder.request.end(ENDED_TAKEN_OVER);
        Some(())
    });
    if released.is_none() {
        return first;
    }
    // The old bind's task closes its socket when it notices; give it a moment.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if let Ok(s) = UdpSocket::bind(addr).await {
            info!(user, public = %addr, "public port taken over from an older bind of the same user");
            return Ok(s);
        }
    }
    first
}

/// What a UDP request is for.
pub(super) enum Target {
    /// A bind (any peer), preferably on this port.
    Bind { preferred: Option<u16> },
    /// Unextended CONNECT-UDP: one fixed target.
    Fixed(SocketAddr),
}

#[allow(clippy::too_many_arguments)]
/// Opens the UDP socket of a CONNECT-UDP request and answers 200, or refuses.
pub(super) async fn open_udp(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    requests: Requests,
    (user, slot): (String, BindSlot),
    target: Target,
    mut stream: H3Stream,
    shutdown: CancellationToken,
) -> Option<OpenUdp> {
    let (fixed, preferred) = match target {
        Target::Bind { preferred } => (None, preferred),
        Target::Fixed(t) => (Some(t), None),
    };
    let ip = shared.config.public_address;
    let subject = peer_subject(&conn).map(|s| s.der);
    let mut socket = Err(io::Error::other("no preferred port"));
    if let Some(port) = preferred {
        socket = bind_preferred(
            &shared,
            (&user, subject.as_deref()),
            connection_id(&requests),
            SocketAddr::new(ip, port),
        )
        .await;
        if socket.is_err() {
            debug!(user = %user, port, "preferred public port taken; picking another");
        }
    }
    if socket.is_err() {
        socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await;
    }
    let socket = match socket {
        Ok(s) => {
            crate::SocketBuffers::PerAssociation.apply(&s);
            s
        }
        Err(e) => {
            let r = Refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "proxy_internal_error",
                e.to_string(),
            );
            refuse(&shared, &mut stream, r).await;
            return None;
        }
    };
    if let Some(target) = fixed
        && let Err(e) = socket.connect(target).await
    {
        let r = Refuse(
            StatusCode::BAD_GATEWAY,
            "destination_unavailable",
            e.to_string(),
        );
        refuse(&shared, &mut stream, r).await;
        return None;
    }
    let bound = socket.local_addr().ok()?;
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(HEADER_CAPSULE_PROTOCOL, "?1");
    if fixed.is_none() {
        resp = resp.header(HEADER_BIND, "?1").header(
            HEADER_PUBLIC_ADDRESS,
            mreq::format_public_addresses(&[bound]),
        );
    }
    let resp = resp.body(()).ok()?;
    let quarter = stream.id().into_inner() / 4;
    let mode = match fixed {
        Some(_) => Mode::Fixed,
        None => Mode::Bind(Mutex::new(ProxyContexts::new(
            shared.config.quotas.contexts_per_bind as usize,
        ))),
    };
    let request = Arc::new(UdpRequest {
        user: user.clone(),
        usage: slot.user_use(),
        socket: Arc::new(socket),
        mode,
        permitted: Mutex::new(Permissions::new(
            shared.config.quotas.peers_per_bind as usize,
        )),
        active: AtomicU64::new(shared.millis()),
        end: Notify::new(),
        ended: AtomicU8::new(0),
        v6: bound.is_ipv6(),
    });
    if let Ok(mut t) = requests.lock() {
        t.insert(quarter, request.clone());
    }
    let hairpin_port = fixed.is_none().then_some(bound.port());
    let id = shared.next_bind.fetch_add(1, Ordering::Relaxed);
    if let (Some(port), Ok(mut ports)) = (hairpin_port, shared.bind_ports.lock()) {
        let holder = PortHolder {
            user: user.clone(),
            subject,
            bind: id,
            conn: connection_id(&requests),
            request: request.clone(),
        };
        ports.insert(port, holder);
    }
    let mut open = OpenUdp {
        _slot: slot,
        shared,
        conn,
        requests,
        user,
        stream,
        shutdown,
        request,
        quarter,
        bound,
        fixed,
        hairpin_port,
        id,
    };
    if open.stream.send_response(resp).await.is_err() {
        open.forget();
        return None;
    }
    bump(&open.shared.counters.requests_accepted);
    info!(user = %open.user, public = %open.bound, target = ?open.fixed, "udp tunnel open");
    Some(open)
}

/// A UDP request the relay has answered with 200: what its datagram loop needs.
pub(super) struct OpenUdp {
    /// The request's place in its user's and the global bind count (and its user's quotas).
    _slot: BindSlot,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    requests: Requests,
    user: String,
    stream: H3Stream,
    shutdown: CancellationToken,
    request: Arc<UdpRequest>,
    /// The request's quarter stream ID, which prefixes its datagrams.
    quarter: u64,
    bound: SocketAddr,
    fixed: Option<SocketAddr>,
    /// The public port other binds may send to (hairpin), if this is a bind.
    hairpin_port: Option<u16>,
    id: u64,
}

impl OpenUdp {
    /// Forgets the request: its datagrams and its public port.
    fn forget(&self) {
        self.requests
            .lock()
            .map(|mut t| t.remove(&self.quarter))
            .ok();
        if let (Some(port), Ok(mut ports)) = (self.hairpin_port, self.shared.bind_ports.lock())
            && ports.get(&port).is_some_and(|h| h.bind == self.id)
        {
            ports.remove(&port);
        }
    }

    /// Carries capsules and the bind's inbound datagrams until the request or the bind ends.
    /// (An `async move` block rather than an `async fn`, which would hold `self` twice:
    /// rust-lang/rust#62958.)
    #[allow(clippy::manual_async_fn)]
    pub(super) fn serve(mut self) -> impl Future<Output = ()> {
        async move {
            let (shared, request) = (&self.shared, &self.request);
            let mut capsules = wire::CapsuleReader::default();
            // Set up after the connection's shutdown pass (which ends every bind it knows)?
            let reason = loop {
                if self.shutdown.is_cancelled() {
                    break "shutdown";
                }
                tokio::select! {
                    _ = request.end.notified() => break request.end_reason(),
                    data = self.stream.recv_data() => match data {
                        Ok(Some(data)) => {
                            match handle_capsules(shared, request, &mut capsules, data) {
                                Ok(replies) if replies.is_empty() => {}
                                Ok(replies) => {
                                    if Box::pin(self.stream.send_data(Bytes::from(replies))).await.is_err() {
                                        break "stream closed";
                                    }
                                }
                                Err(e) => {
                                    warn!(user = %self.user, error = %e, "capsule protocol error");
                                    self.stream.stop_stream(h3::error::Code::H3_DATAGRAM_ERROR);
                                    break "capsule error";
                                }
                            }
                        }
                        Ok(None) => break "request stream finished",
                        Err(_) => break "request stream reset",
                    },
                    // Polled in place rather than through `readable()`'s future: memory per bind.
                    r = std::future::poll_fn(|cx| request.socket.poll_recv_ready(cx)) => {
                        if r.is_err() {
                            break "socket error";
                        }
                        let Ok(capsules) = to_client(shared, &self.conn, request, self.quarter) else {
                            break "connection lost";
                        };
                        if !capsules.is_empty() && Box::pin(self.stream.send_data(Bytes::from(capsules))).await.is_err() {
                            break "stream closed";
                        }
                    }
                }
            };
            self.forget();
            let _ = Box::pin(self.stream.finish()).await;
            info!(user = %self.user, public = %self.bound, reason, "udp tunnel closed");
        }
    }
}

/// Capsules from the client: a DATAGRAM capsule is sent on like a DATAGRAM frame; the others
/// go to the bind's context table. Returns the replies to write on the request stream.
fn handle_capsules(
    shared: &Shared,
    request: &UdpRequest,
    reader: &mut wire::CapsuleReader,
    data: impl bytes::Buf,
) -> Result<Vec<u8>, wire::ReadError<CapsuleError>> {
    let mut replies = Vec::new();
    let read = reader.read(data, |capsule| {
        if let wire::Capsule::Datagram(value) = &capsule {
            // A datagram too large for the client's DATAGRAM frames: sent on like one.
            let (context, payload) = wire::split_context(value)?;
            if let Some((to, udp)) = request.admit_from_client(shared, context, payload) {
                let sent = match to {
                    Some(to) => request.socket.try_send_to(udp, to),
                    None => request.socket.try_send(udp),
                };
                match sent {
                    Ok(_) => bump(&shared.counters.datagrams_out),
                    Err(_) => shared.counters.drop(RelayDrop::SendFailed),
                }
            }
            return Ok(());
        }
        if let Mode::Bind(contexts) = &request.mode {
            let mut table = contexts.lock().map_err(|_| CapsuleError::Poisoned)?;
            let reply = table.on_capsule(&capsule, |peer| shared.may_send_to(peer))?;
            if let Some(reply) = reply {
                reply.encode(&mut replies);
            }
        }
        Ok::<(), CapsuleError>(())
    });
    read?;
    Ok(replies)
}

/// The client's connection is gone: the request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnectionLost;

/// Why a request stream's capsules end the request.
#[derive(Debug, thiserror::Error)]
enum CapsuleError {
    /// A DATAGRAM capsule without a context ID.
    #[error("{0}")]
    Wire(#[from] wire::Error),
    /// A capsule the bind's context table refuses.
    #[error("{0}")]
    Context(#[from] crate::masque::request::ContextError),
    /// The context table's lock was poisoned by a panic.
    #[error("context table lock poisoned")]
    Poisoned,
}

/// Bytes of DATAGRAM capsules one wake-up of a bind may write on its request stream.
const MAX_CAPSULES_PER_WAKE: usize = 256 << 10;

/// Drains the bind's socket into datagrams to the client, a burst per `recvmmsg`; returns the
/// DATAGRAM capsules to write on the request stream for those too large for a DATAGRAM frame.
/// Err if the connection is gone. The shared `datagrams_in` counter is added to once per
/// wake-up, not per datagram (the relay's threads share it).
fn to_client(
    shared: &Shared,
    conn: &quinn::Connection,
    request: &UdpRequest,
    quarter: u64,
) -> Result<Vec<u8>, ConnectionLost> {
    let mut sent = 0;
    let mut capsules = Vec::new();
    let mut outcome = Ok(());
    for _ in 0..4 {
        let mut lost = false;
        let received = crate::batch::recv_burst(&request.socket, request.v6, |from, slot, n| {
            let payload = slot.get(HEADROOM..HEADROOM + n).unwrap_or_default();
            match one_to_client(shared, conn, request, quarter, from, payload, &mut capsules) {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(ConnectionLost) => lost = true,
            }
        });
        if lost {
            outcome = Err(ConnectionLost);
            break;
        }
        if received.is_err() {
            break;
        }
    }
    shared
        .counters
        .datagrams_in
        .fetch_add(sent, Ordering::Relaxed);
    outcome.map(|()| capsules)
}

/// One datagram from a peer: checked, charged, and sent to the client (true) or dropped and
/// counted (false). Err if the connection is gone.
fn one_to_client(
    shared: &Shared,
    conn: &quinn::Connection,
    request: &UdpRequest,
    quarter: u64,
    from: SocketAddr,
    payload: &[u8],
    capsules: &mut Vec<u8>,
) -> Result<bool, ConnectionLost> {
    let c = &shared.counters;
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let (context, compressed) = match &request.mode {
        Mode::Fixed => (0, true),
        Mode::Bind(contexts) => {
            if shared.config.inbound_filter == InboundFilter::AddressDependent
                && !request.permitted.lock().is_ok_and(|p| p.inbound(from.ip()))
            {
                c.drop(RelayDrop::InboundFilter);
                return Ok(false);
            }
            match contexts.lock().ok().and_then(|t| t.to_client(from)) {
                Some(found) => found,
                None => {
                    c.drop(RelayDrop::Unknown);
                    return Ok(false);
                }
            }
        }
    };
    if !request.usage.charge(payload.len(), Instant::now()) {
        c.drop(RelayDrop::Quota);
        return Ok(false);
    }
    request.active.store(shared.millis(), Ordering::Relaxed);
    let mut datagram = Vec::with_capacity(HEADROOM + payload.len());
    wire::write_http_datagram_prefix(&mut datagram, quarter, context);
    if !compressed {
        wire::write_uncompressed_address(&mut datagram, from);
    }
    datagram.extend_from_slice(payload);
    if conn
        .max_datagram_size()
        .is_none_or(|max| datagram.len() > max)
    {
        // RFC 9297 §3.5: on the request stream instead, without the quarter stream ID.
        if capsules.len() + datagram.len() > MAX_CAPSULES_PER_WAKE {
            c.drop(RelayDrop::TooLarge);
            return Ok(false);
        }
        let value = datagram.split_off(wire::varint_len(quarter));
        wire::Capsule::Datagram(value).encode(capsules);
        return Ok(true);
    }
    match conn.send_datagram(Bytes::from(datagram)) {
        Ok(()) => return Ok(true),
        Err(quinn::SendDatagramError::ConnectionLost(_)) => return Err(ConnectionLost),
        Err(_) => c.drop(RelayDrop::Unknown),
    }
    Ok(false)
}
