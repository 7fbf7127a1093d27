//! A CONNECT-UDP bind through the tunnel: the request that opens it, the task that carries its
//! capsules, and the [`Bind`] its owner sends and receives with.

use super::{Awaited, BindProtocolError, ClientStream, OpenError, Tunnel, response};
use crate::masque::request::{
    self as mreq, BIND_PATH, ClientContexts, HEADER_BIND, HEADER_CAPSULE_PROTOCOL, HEADER_USER,
};
use crate::masque::wire::{self, Capsule};
use bytes::Bytes;
use http::Method;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Why a datagram could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// Too large for a QUIC DATAGRAM frame, and the request stream already holds
    /// [`MAX_QUEUED_CAPSULES`] bytes waiting for the relay: dropped.
    Backlog,
    /// The bind or the connection is gone.
    Closed,
}

/// Bytes of DATAGRAM capsules a bind may have waiting on its request stream (a few of the
/// largest datagrams, or a couple of hundred SIP messages).
const MAX_QUEUED_CAPSULES: usize = 256 << 10;

/// Datagrams from the relay held for one bind while its owner is busy; more are dropped.
const INBOUND_QUEUE: usize = 1024;

/// What a bind's owner ([`Bind`]), its request-stream driver and the connection's datagram
/// reader share. Queues rather than channels: an idle bind's queues hold no memory.
#[derive(Debug)]
pub(super) struct BindState {
    inner: Mutex<BindInner>,
    /// Capsules are waiting in `capsules`, or the [`Bind`] was dropped.
    capsules_ready: Notify,
}

#[derive(Debug)]
struct BindInner {
    contexts: ClientContexts,
    inbound: VecDeque<Bytes>,
    /// The bind's owner, waiting in [`Bind::poll_recv`] for `inbound`.
    owner: Option<Waker>,
    /// The request stream has ended: nothing more will arrive.
    closed: bool,
    /// The [`Bind`] was dropped: its driver ends the request.
    dropped: bool,
    /// Encoded capsules for the relay.
    capsules: Vec<u8>,
}

impl BindState {
    /// Queues a datagram from the relay; false if the queue is full.
    pub(super) fn deliver(&self, datagram: Bytes) -> bool {
        let owner = {
            let Ok(mut inner) = self.inner.lock() else {
                return false;
            };
            if inner.inbound.len() >= INBOUND_QUEUE {
                return false;
            }
            inner.inbound.push_back(datagram);
            inner.owner.take()
        };
        if let Some(owner) = owner {
            owner.wake();
        }
        true
    }

    /// Marks the bind closed and wakes its owner.
    fn close(&self) {
        let owner = self.inner.lock().ok().and_then(|mut i| {
            i.closed = true;
            i.owner.take()
        });
        if let Some(owner) = owner {
            owner.wake();
        }
    }
}

pub(super) type Inbound = Arc<BindState>;

impl Tunnel {
    /// Opens a CONNECT-UDP bind request for `user`: one public address on the relay for every
    /// peer of one app socket. `preferred_port`: the port the app socket's previous bind had,
    /// asked for again so that its peers' packets still find it.
    pub async fn open_bind(
        &self,
        user: &str,
        preferred_port: Option<u16>,
    ) -> Result<Bind, OpenError> {
        let live = self.live()?;
        let req = bind_request(&self.config.server_name, user, preferred_port)?;
        let stream_error = |e: &dyn std::fmt::Display| OpenError::Stream(e.to_string());
        let mut requests = live.requests.clone();
        let mut stream = requests
            .send_request(req)
            .await
            .map_err(|e| stream_error(&e))?;
        // Read the stream ID now: h3-quinn's recv half cannot report it while a read is pending.
        let quarter = stream.id().into_inner() / 4;
        // Register the uncompressed context at once, before the response (listen-13 §4).
        let (mut contexts, assign) = ClientContexts::new(64, 8);
        let mut hello = Vec::new();
        assign.encode(&mut hello);
        stream
            .send_data(Bytes::from(hello))
            .await
            .map_err(|e| stream_error(&e))?;
        let public = granted(&response(&mut stream).await?)?;
        let reader = tokio::time::timeout(
            Duration::from_secs(10),
            context_acknowledged(&mut stream, &mut contexts),
        )
        .await
        .map_err(|_| OpenError::Timeout(Awaited::ContextAck))??;
        let state = Arc::new(BindState {
            inner: Mutex::new(BindInner {
                contexts,
                inbound: VecDeque::new(),
                owner: None,
                closed: false,
                dropped: false,
                capsules: Vec::new(),
            }),
            capsules_ready: Notify::new(),
        });
        if let Ok(mut binds) = live.binds.lock() {
            binds.insert(quarter, state.clone());
        }
        tokio::spawn(drive_bind_stream(
            stream,
            reader,
            state.clone(),
            live.binds.clone(),
            quarter,
        ));
        debug!(user, public = %public, "bind open");
        Ok(Bind {
            conn: live.conn.clone(),
            quarter,
            state,
            public,
        })
    }
}

/// The CONNECT-UDP bind request (listen-13) for `user` at the relay named `server_name`.
fn bind_request(
    server_name: &str,
    user: &str,
    preferred_port: Option<u16>,
) -> Result<http::Request<()>, OpenError> {
    let mut req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{server_name}{BIND_PATH}"))
        .header(HEADER_BIND, "?1")
        .header(HEADER_CAPSULE_PROTOCOL, "?1")
        .header(HEADER_USER, user);
    if let Some(port) = preferred_port {
        req = req.header(mreq::HEADER_PREFERRED_PORT, port.to_string());
    }
    req.extension(h3::ext::Protocol::CONNECT_UDP)
        .body(())
        .map_err(|e| OpenError::Stream(e.to_string()))
}

/// The public address a 2xx answer to a bind request grants, if it granted the bind.
fn granted(resp: &http::Response<()>) -> Result<SocketAddr, OpenError> {
    let headers = resp.headers();
    if !headers
        .get(HEADER_BIND)
        .is_some_and(|v| mreq::is_sf_true(v.as_bytes()))
    {
        return Err(OpenError::Protocol(BindProtocolError::NotGranted));
    }
    headers
        .get(mreq::HEADER_PUBLIC_ADDRESS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| mreq::parse_public_addresses(v).into_iter().next())
        .ok_or(OpenError::Protocol(BindProtocolError::NoPublicAddress))
}

/// Waits for the relay to acknowledge the uncompressed context. A datagram sent before the
/// relay has read the registration would be dropped there (listen-13 §3.1 allows pre-emptive
/// use, but losing an app's first packet — usually STUN — is worse than one more round trip at
/// bind time). Returns the reader, holding whatever followed the acknowledgement.
async fn context_acknowledged(
    stream: &mut ClientStream,
    contexts: &mut ClientContexts,
) -> Result<wire::CapsuleReader, OpenError> {
    let mut reader = wire::CapsuleReader::default();
    loop {
        let Ok(Some(data)) = stream.recv_data().await else {
            return Err(OpenError::Protocol(BindProtocolError::ClosedBeforeAck));
        };
        let mut acked = false;
        reader
            .read(data, |capsule| {
                acked |= capsule
                    == (Capsule::CompressionAck {
                        context_id: mreq::UNCOMPRESSED_CONTEXT,
                    });
                contexts.on_capsule(&capsule).map(|_| ())
            })
            .map_err(|e| OpenError::Protocol(BindProtocolError::Capsule(e.to_string())))?;
        if acked {
            return Ok(reader);
        }
    }
}

/// Carries a bind's capsules both ways on its request stream until the stream or the bind
/// ends.
///
/// A plain function returning an `async move` block, not an `async fn`: an `async fn` keeps
/// its arguments twice in its future (rust-lang/rust#62958), and the stream is 400-odd bytes
/// held for the life of every bind.
#[allow(clippy::manual_async_fn)]
fn drive_bind_stream(
    mut stream: ClientStream,
    mut reader: wire::CapsuleReader,
    state: Arc<BindState>,
    binds: Arc<Mutex<HashMap<u64, Inbound>>>,
    quarter: u64,
) -> impl Future<Output = ()> {
    async move {
        loop {
            tokio::select! {
                _ = state.capsules_ready.notified() => {
                    let Ok((out, dropped)) = state.inner.lock().map(|mut i| (std::mem::take(&mut i.capsules), i.dropped)) else { break };
                    if dropped {
                        break;
                    }
                    if !out.is_empty() && Box::pin(stream.send_data(Bytes::from(out))).await.is_err() {
                        break;
                    }
                },
                data = stream.recv_data() => match data {
                    Ok(Some(data)) => {
                        let mut replies = Vec::new();
                        let read = reader.read(data, |capsule| {
                            if let Capsule::Datagram(value) = capsule {
                                // Queued like one from a DATAGRAM frame: the same prefix.
                                let mut d = Vec::with_capacity(8 + value.len());
                                wire::write_varint(&mut d, quarter);
                                d.extend_from_slice(&value);
                                state.deliver(Bytes::from(d));
                                return Ok(());
                            }
                            let reply = state.inner.lock().map_err(|_| ())?.contexts.on_capsule(&capsule).map_err(|_| ())?;
                            if let Some(r) = reply {
                                r.encode(&mut replies);
                            }
                            Ok::<(), ()>(())
                        });
                        if read.is_err() {
                            warn!("relay broke the capsule protocol; closing the bind");
                            break;
                        }
                        if !replies.is_empty() && Box::pin(stream.send_data(Bytes::from(replies))).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        if let Ok(mut b) = binds.lock() {
            b.remove(&quarter);
        }
        state.close();
        let _ = Box::pin(stream.finish()).await;
    }
}

/// One CONNECT-UDP bind: a public address on the relay, shared by every peer of one app socket.
/// Dropping it closes the request (and the relay's socket with it).
#[derive(Debug)]
pub struct Bind {
    conn: quinn::Connection,
    quarter: u64,
    state: Arc<BindState>,
    public: SocketAddr,
}

impl Bind {
    /// The address peers see: the same for every peer, for the life of the bind.
    pub fn public_address(&self) -> SocketAddr {
        self.public
    }

    /// Sends `payload` to `peer` through the relay.
    pub fn send(&mut self, peer: SocketAddr, payload: &[u8]) -> Result<(), SendError> {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let out = {
            let mut inner = self.state.inner.lock().map_err(|_| SendError::Closed)?;
            if inner.closed {
                return Err(SendError::Closed);
            }
            let out = inner.contexts.outbound(peer).ok_or(SendError::Closed)?;
            if let Some(assign) = &out.assign {
                assign.encode(&mut inner.capsules);
                drop(inner);
                self.state.capsules_ready.notify_one();
            }
            out
        };
        let mut d = Vec::with_capacity(16 + wire::uncompressed_address_len(peer) + payload.len());
        wire::write_http_datagram_prefix(&mut d, self.quarter, out.context_id);
        if !out.compressed {
            wire::write_uncompressed_address(&mut d, peer);
        }
        d.extend_from_slice(payload);
        if self
            .conn
            .max_datagram_size()
            .is_some_and(|max| d.len() <= max)
        {
            return match self.conn.send_datagram(Bytes::from(d)) {
                Ok(()) => Ok(()),
                Err(_) => Err(SendError::Closed),
            };
        }
        // Larger than a DATAGRAM frame on this path (a SIP INVITE with many candidates, a
        // video frame a sender did not split): a DATAGRAM capsule on the request stream
        // (RFC 9297 §3.5), the HTTP Datagram without its quarter stream ID.
        let value = d.split_off(wire::varint_len(self.quarter));
        let mut inner = self.state.inner.lock().map_err(|_| SendError::Closed)?;
        if inner.capsules.len() + value.len() > MAX_QUEUED_CAPSULES {
            return Err(SendError::Backlog);
        }
        wire::Capsule::Datagram(value).encode(&mut inner.capsules);
        drop(inner);
        self.state.capsules_ready.notify_one();
        Ok(())
    }

    /// The next datagram from a peer: its address and UDP payload. `None` once the bind is
    /// closed (relay closed it, or the connection was lost) and nothing is left to read.
    pub async fn recv(&mut self) -> Option<(SocketAddr, Bytes)> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Bind::recv`] as a poll: no future to keep between polls.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<(SocketAddr, Bytes)>> {
        let Ok(mut inner) = self.state.inner.lock() else {
            return Poll::Ready(None);
        };
        if let Some(found) = next_inbound(&mut inner) {
            return Poll::Ready(Some(found));
        }
        if inner.closed {
            return Poll::Ready(None);
        }
        if !inner
            .owner
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inner.owner = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// A datagram from a peer that has already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<(SocketAddr, Bytes)> {
        next_inbound(&mut *self.state.inner.lock().ok()?)
    }
}

/// The first queued datagram whose context is known: its peer and UDP payload.
fn next_inbound(inner: &mut BindInner) -> Option<(SocketAddr, Bytes)> {
    while let Some(datagram) = inner.inbound.pop_front() {
        if let Some(found) = decode(&inner.contexts, &datagram) {
            return Some(found);
        }
    }
    // After a burst, give the queue's memory back.
    if inner.inbound.capacity() > 64 {
        inner.inbound = VecDeque::new();
    }
    None
}

/// A datagram from the relay: its peer and UDP payload, if its context is known.
fn decode(contexts: &ClientContexts, datagram: &Bytes) -> Option<(SocketAddr, Bytes)> {
    let d = wire::decode_http_datagram(datagram).ok()?;
    let offset = datagram.len() - d.payload.len();
    let (peer, p) = contexts.inbound(d.context_id, d.payload)?;
    let header = d.payload.len() - p.len();
    Some((peer, datagram.slice(offset + header..)))
}

/// `first` and the datagrams that have already arrived on `bind` after it, up to 64 in all:
/// one burst to deliver together.
pub fn burst(
    first: (SocketAddr, Bytes),
    mut bind: Option<&mut Bind>,
) -> impl Iterator<Item = (SocketAddr, Bytes)> + '_ {
    let mut first = Some(first);
    let mut taken = 0;
    std::iter::from_fn(move || {
        taken += 1;
        if taken > 64 {
            return None;
        }
        first.take().or_else(|| bind.as_deref_mut()?.try_recv())
    })
}

impl Drop for Bind {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.state.inner.lock() {
            inner.dropped = true;
        }
        // A permit is kept if the driver is not waiting right now: it sees `dropped` next.
        self.state.capsules_ready.notify_one();
    }
}
