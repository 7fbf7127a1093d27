//! The sidecar's tunnel to the relay: one QUIC connection shared by every user, kept up with
//! keep-alives and reconnected with backoff and jitter; CONNECT-UDP bind requests for UDP
//! associations and classic CONNECT requests for TCP.
//!
//! **Fails closed.** While the connection is down there is no [`Bind`] to send on: callers drop
//! `relay`-verdict packets and count them; nothing here ever sends a packet any other way.

use crate::masque::request::{
    self as mreq, BIND_PATH, ClientContexts, HEADER_BIND, HEADER_CAPSULE_PROTOCOL, HEADER_USER,
};
use crate::masque::wire::{self, Capsule};
use arc_swap::ArcSwapOption;
use bytes::{BufMut, Bytes};
use http::{Method, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type ClientStream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Where the relay is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// The relay's QUIC address.
    pub relay: SocketAddr,
    /// The name the relay's certificate is checked against.
    pub server_name: String,
    /// TLS settings with the sidecar's client certificate (see [`crate::pki::client_config`]).
    pub client: quinn::ClientConfig,
}

/// The tunnel's connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// Not yet connected since start.
    Connecting,
    /// Connected: binds can be opened.
    Connected,
    /// Lost or never reached; retrying with backoff.
    Unreachable,
}

impl TunnelState {
    /// A stable name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Connected => "connected",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Why a request through the tunnel failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The tunnel is not connected.
    #[error("the relay is not connected")]
    NotConnected,
    /// The relay refused: status and `Proxy-Status` value.
    #[error("the relay refused with {status}: {proxy_status}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The `Proxy-Status` header, if any.
        proxy_status: String,
    },
    /// The request failed on the way (stream or connection error, timeout).
    #[error("request failed: {0}")]
    Failed(String),
}

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
struct BindState {
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
    fn deliver(&self, datagram: Bytes) -> bool {
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

type Inbound = Arc<BindState>;

/// A live connection to the relay.
struct Live {
    conn: quinn::Connection,
    requests: SendRequest,
    /// Binds by quarter stream ID.
    binds: Arc<Mutex<HashMap<u64, Inbound>>>,
}

/// Counters of the tunnel.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Connections established.
    pub connects: AtomicU64,
    /// Datagrams from the relay for no known bind, or whose bind's queue was full.
    pub dropped_inbound: AtomicU64,
    /// Connections replaced by a fresh one after the relay was silent too long.
    pub replaced: AtomicU64,
}

/// What `veil status` and the metrics show of the tunnel.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TunnelFigures {
    /// Connections established since start.
    pub connects: u64,
    /// Of those, how many replaced one the relay had gone silent on.
    pub replaced: u64,
    /// The current connection's smoothed round trip, if connected.
    pub rtt: Option<Duration>,
    /// Packets sent on the current connection, and of those declared lost.
    pub sent_packets: u64,
    /// See `sent_packets`.
    pub lost_packets: u64,
}

/// The shared tunnel to the relay.
#[derive(Clone)]
pub struct Tunnel {
    config: Arc<TunnelConfig>,
    live: Arc<ArcSwapOption<Live>>,
    state: watch::Receiver<TunnelState>,
    counters: Arc<TunnelCounters>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("relay", &self.config.relay)
            .field("state", &self.state())
            .finish()
    }
}

impl Tunnel {
    /// Starts the connection manager; the tunnel connects in the background.
    pub fn start(config: TunnelConfig, shutdown: CancellationToken) -> std::io::Result<Self> {
        let local: SocketAddr = if config.relay.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local)?;
        crate::SocketBuffers::Shared.apply(&socket);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        endpoint.set_default_client_config(config.client.clone());
        let (tx, rx) = watch::channel(TunnelState::Connecting);
        let tunnel = Self {
            config: Arc::new(config),
            live: Arc::new(ArcSwapOption::empty()),
            state: rx,
            counters: Arc::new(TunnelCounters::default()),
        };
        tokio::spawn(tunnel.clone().manage(endpoint, tx, shutdown));
        Ok(tunnel)
    }

    /// The current state.
    pub fn state(&self) -> TunnelState {
        *self.state.borrow()
    }

    /// Waits until the state is `want` or `timeout` passes; true if reached.
    pub async fn wait_for(&self, want: TunnelState, timeout: Duration) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s == want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The tunnel's counters.
    pub fn counters(&self) -> &TunnelCounters {
        &self.counters
    }

    /// Counters and the current connection's path figures.
    pub fn figures(&self) -> TunnelFigures {
        let path = self.live.load_full().map(|live| live.conn.stats().path);
        TunnelFigures {
            connects: self.counters.connects.load(Ordering::Relaxed),
            replaced: self.counters.replaced.load(Ordering::Relaxed),
            rtt: path.map(|p| p.rtt),
            sent_packets: path.map_or(0, |p| p.sent_packets),
            lost_packets: path.map_or(0, |p| p.lost_packets),
        }
    }

    async fn manage(
        self,
        endpoint: quinn::Endpoint,
        state: watch::Sender<TunnelState>,
        shutdown: CancellationToken,
    ) {
        let mut failures: u32 = 0;
        // A fresh connection already up, to take over from one that was silent too long.
        let mut fresh: Option<quinn::Connection> = None;
        loop {
            let attempt = async {
                let conn = match fresh.take() {
                    Some(conn) => conn,
                    None => handshake(&endpoint, &self.config, HANDSHAKE_TIMEOUT).await?,
                };
                let (mut driver, requests) = h3::client::builder()
                    .enable_extended_connect(true)
                    .enable_datagram(true)
                    .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = driver.wait_idle().await;
                });
                Ok::<_, String>(Live {
                    conn,
                    requests,
                    binds: Arc::new(Mutex::new(HashMap::new())),
                })
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = attempt => r,
            };
            match result {
                Ok(live) => {
                    failures = 0;
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    let conn = live.conn.clone();
                    let binds = live.binds.clone();
                    self.live.store(Some(Arc::new(live)));
                    state.send_replace(TunnelState::Connected);
                    info!(relay = %self.config.relay, "tunnel connected");
                    let reader =
                        tokio::spawn(read_datagrams(conn.clone(), binds, self.counters.clone()));
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            conn.close(0u32.into(), b"sidecar shutting down");
                            reader.abort();
                            break;
                        }
                        e = conn.closed() => warn!(relay = %self.config.relay, error = %e, "tunnel lost; relayed traffic is dropped until it is back"),
                        replacement = replace_after_silence(&endpoint, &self.config, &conn) => {
                            info!(relay = %self.config.relay, "tunnel replaced: the relay was silent for a while and a fresh connection is up (the old one's loss recovery would have waited out its backoff)");
                            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
                            conn.close(REPLACED, b"replaced after an outage");
                            fresh = Some(replacement);
                        }
                    }
                    reader.abort();
                    self.live.store(None);
                    state.send_replace(TunnelState::Unreachable);
                    if fresh.is_some() {
                        continue;
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures <= 3 || failures % 20 == 0 {
                        warn!(relay = %self.config.relay, error = %e, failures, "cannot reach the relay; relayed traffic is dropped");
                    }
                    state.send_replace(TunnelState::Unreachable);
                }
            }
            // Exponential backoff from 100 ms to 5 s, with ±50% jitter so that many sidecars
            // do not come back in step after a relay restart.
            let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
            let jitter = fastrand::u64(base / 2..=base + base / 2);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(jitter)) => {}
            }
        }
        self.live.store(None);
        state.send_replace(TunnelState::Unreachable);
    }

    fn live(&self) -> Result<Arc<Live>, OpenError> {
        self.live.load_full().ok_or(OpenError::NotConnected)
    }

    /// Opens a CONNECT-UDP bind request for `user`: one public address on the relay for every
    /// peer of one app socket. `preferred_port`: the port the app socket's previous bind had,
    /// asked for again so that its peers' packets still find it.
    pub async fn open_bind(
        &self,
        user: &str,
        preferred_port: Option<u16>,
    ) -> Result<Bind, OpenError> {
        let live = self.live()?;
        let mut req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{}{BIND_PATH}", self.config.server_name))
            .header(HEADER_BIND, "?1")
            .header(HEADER_CAPSULE_PROTOCOL, "?1")
            .header(HEADER_USER, user);
        if let Some(port) = preferred_port {
            req = req.header(mreq::HEADER_PREFERRED_PORT, port.to_string());
        }
        let req = req
            .extension(h3::ext::Protocol::CONNECT_UDP)
            .body(())
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        let failed = |e: &dyn std::fmt::Display| OpenError::Failed(e.to_string());
        let mut requests = live.requests.clone();
        let mut stream = requests.send_request(req).await.map_err(|e| failed(&e))?;
        // Read the stream ID now: h3-quinn's recv half cannot report it while a read is pending.
        let quarter = stream.id().into_inner() / 4;
        // Register the uncompressed context at once, before the response (listen-13 §4).
        let (contexts, assign) = ClientContexts::new(64, 8);
        let mut hello = Vec::new();
        assign.encode(&mut hello);
        stream
            .send_data(Bytes::from(hello))
            .await
            .map_err(|e| failed(&e))?;
        let resp = response(&mut stream).await?;
        if !resp
            .headers()
            .get(HEADER_BIND)
            .is_some_and(|v| mreq::is_sf_true(v.as_bytes()))
        {
            return Err(OpenError::Failed(
                "relay did not grant connect-udp-bind".into(),
            ));
        }
        let public = resp
            .headers()
            .get(mreq::HEADER_PUBLIC_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| mreq::parse_public_addresses(v).into_iter().next())
            .ok_or_else(|| OpenError::Failed("relay sent no proxy-public-address".into()))?;
        // Wait for the proxy to acknowledge the uncompressed context: a datagram sent before the
        // proxy has read the registration would be dropped there (listen-13 §3.1 allows
        // pre-emptive use, but losing an app's first packet — usually STUN — is worse than one
        // more round trip at bind time).
        let mut contexts = contexts;
        let mut pending = Vec::new();
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let data = match stream.recv_data().await {
                    Ok(Some(data)) => data,
                    _ => {
                        return Err(OpenError::Failed(
                            "bind closed before its context was acknowledged".into(),
                        ));
                    }
                };
                pending.put(data);
                let mut used = 0;
                let mut acked = false;
                while let Some((capsule, n)) =
                    wire::decode_capsule(pending.get(used..).unwrap_or_default())
                        .map_err(|e| OpenError::Failed(e.to_string()))?
                {
                    used += n;
                    acked |= capsule
                        == (Capsule::CompressionAck {
                            context_id: mreq::UNCOMPRESSED_CONTEXT,
                        });
                    contexts
                        .on_capsule(&capsule)
                        .map_err(|e| OpenError::Failed(e.to_string()))?;
                }
                pending.drain(..used);
                if acked {
                    return Ok(());
                }
            }
        })
        .await
        .map_err(|_| OpenError::Failed("no acknowledgement of the uncompressed context".into()))?;
        acked?;
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
            pending,
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

    /// Opens a classic CONNECT (TCP) request to `target` for `user`.
    pub async fn open_tcp(&self, user: &str, target: SocketAddr) -> Result<TcpTunnel, OpenError> {
        let live = self.live()?;
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(HEADER_USER, user)
            .body(())
            .map_err(|e| OpenError::Failed(e.to_string()))?;
        let mut requests = live.requests.clone();
        let result = match requests.send_request(req).await {
            Ok(mut stream) => response(&mut stream).await.map(|_| TcpTunnel { stream }),
            Err(e) => Err(OpenError::Failed(e.to_string())),
        };
        result.map_err(|e| live.explain(e))
    }
}

impl Live {
    /// A request that failed because the connection itself is gone (a relay that refuses our
    /// certificate closes it just after our side thought the handshake done) is
    /// `NotConnected`, not a failure of that request.
    fn explain(&self, e: OpenError) -> OpenError {
        match e {
            OpenError::Failed(_) if self.conn.close_reason().is_some() => OpenError::NotConnected,
            e => e,
        }
    }
}

async fn response(stream: &mut ClientStream) -> Result<http::Response<()>, OpenError> {
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.recv_response())
        .await
        .map_err(|_| OpenError::Failed("no response from the relay".into()))?
        .map_err(|e| OpenError::Failed(e.to_string()))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    Err(OpenError::Refused {
        status: resp.status().as_u16(),
        proxy_status: resp
            .headers()
            .get("proxy-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    })
}

/// Whether a refusal means the relay's policy forbids the target.
pub fn is_prohibited(e: &OpenError) -> bool {
    matches!(e, OpenError::Refused { status, .. } if *status == StatusCode::FORBIDDEN.as_u16())
}

async fn read_datagrams(
    conn: quinn::Connection,
    binds: Arc<Mutex<HashMap<u64, Inbound>>>,
    counters: Arc<TunnelCounters>,
) {
    while let Ok(datagram) = conn.read_datagram().await {
        let quarter = wire::read_varint(&datagram).map(|(q, _)| q);
        let tx = quarter
            .ok()
            .and_then(|q| binds.lock().ok().and_then(|b| b.get(&q).cloned()));
        let delivered = tx.is_some_and(|bind| bind.deliver(datagram));
        if !delivered {
            counters.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long a connection handshake may take before the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The application error code a connection is closed with when a fresh one replaces it.
const REPLACED: quinn::VarInt = quinn::VarInt::from_u32(1);

/// A connection handshake with the relay, bounded by `timeout`.
async fn handshake(
    endpoint: &quinn::Endpoint,
    config: &TunnelConfig,
    timeout: Duration,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(config.relay, &config.server_name)
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())
}

/// Resolves to a fresh connection once `conn` has heard nothing from the relay for
/// [`Silence::LIMIT`] and a new handshake succeeds; pending for as long as the relay is heard.
///
/// After an outage of a few seconds both ends of the old connection have backed their loss
/// probes off exponentially (RFC 9002 §6.2): each end sends again only at its next probe, which
/// comes about as long after the outage as the outage lasted, so media would stay silent for
/// seconds after the network is back. A new connection starts with none of that: handshakes are
/// tried about once a second while the old connection is silent, and the first that completes
/// replaces it (its binds are asked for again, with their public ports).
async fn replace_after_silence(
    endpoint: &quinn::Endpoint,
    config: &TunnelConfig,
    conn: &quinn::Connection,
) -> quinn::Connection {
    let mut silence = Silence::new(std::time::Instant::now(), 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !silence.observe(std::time::Instant::now(), conn.stats().udp_rx.datagrams) {
        tick.tick().await;
    }
    // Even if the old connection is heard again now, its backed-off end may still wait many
    // seconds to send: it is replaced all the same. A second or so per try (jittered, so that
    // sidecars cut off together do not all come back in the same instant), until one completes.
    loop {
        let timeout = Duration::from_millis(fastrand::u64(750..=1_250));
        let started = std::time::Instant::now();
        match handshake(endpoint, config, timeout).await {
            Ok(fresh) => return fresh,
            Err(e) => {
                debug!(relay = %config.relay, error = %e, "relay still silent");
                if let Some(rest) = timeout.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
        }
    }
}

/// Whether a connection has heard nothing from its peer for too long: fed the count of
/// datagrams received so far and the time.
#[derive(Debug)]
struct Silence {
    received: u64,
    last_heard: std::time::Instant,
}

impl Silence {
    /// Both ends send a keep-alive after 1 s without traffic, and every keep-alive is
    /// acknowledged, so a path that works delivers something at least once a second.
    const LIMIT: Duration = Duration::from_secs(3);

    fn new(now: std::time::Instant, received: u64) -> Self {
        Self {
            received,
            last_heard: now,
        }
    }

    /// True while nothing has been received for [`Self::LIMIT`] or longer.
    fn observe(&mut self, now: std::time::Instant, received: u64) -> bool {
        if received != self.received {
            self.received = received;
            self.last_heard = now;
        }
        now.saturating_duration_since(self.last_heard) >= Self::LIMIT
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
    mut buf: Vec<u8>,
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
                        buf.put(data);
                        let mut replies = Vec::new();
                        let mut used = 0;
                        let mut broken = false;
                        while let Ok(Some((capsule, n))) = wire::decode_capsule(buf.get(used..).unwrap_or_default()) {
                            used += n;
                            if let wire::Capsule::Datagram(value) = capsule {
                                // Queued like one from a DATAGRAM frame: the same prefix.
                                let mut d = Vec::with_capacity(8 + value.len());
                                wire::write_varint(&mut d, quarter);
                                d.extend_from_slice(&value);
                                state.deliver(Bytes::from(d));
                                continue;
                            }
                            let reply = state.inner.lock().map_err(|_| ()).and_then(|mut i| i.contexts.on_capsule(&capsule).map_err(|_| ()));
                            match reply {
                                Ok(Some(r)) => r.encode(&mut replies),
                                Ok(None) => {}
                                Err(()) => broken = true,
                            }
                        }
                        buf.drain(..used);
                        if buf.is_empty() && buf.capacity() > 4096 {
                            buf = Vec::new();
                        }
                        if broken || wire::decode_capsule(&buf).is_err() {
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

/// A classic CONNECT tunnel through the relay.
pub struct TcpTunnel {
    stream: ClientStream,
}

impl TcpTunnel {
    /// Pumps bytes between `tcp` and the tunnel until either side ends or `shutdown`.
    pub async fn pump(self, tcp: tokio::net::TcpStream, shutdown: CancellationToken) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut tcp_read, mut tcp_write) = tcp.into_split();
        let (mut send, mut recv) = self.stream.split();
        let up = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tcp_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                        if send.send_data(chunk).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = send.finish().await;
        };
        let down = async {
            while let Ok(Some(mut data)) = recv.recv_data().await {
                if tcp_write.write_all_buf(&mut data).await.is_err() {
                    return;
                }
            }
            let _ = tcp_write.shutdown().await;
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = async { tokio::join!(up, down) } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Silence;
    use std::time::{Duration, Instant};

    #[test]
    fn silence_counts_from_the_last_datagram_heard() {
        let start = Instant::now();
        let mut s = Silence::new(start, 10);
        assert!(!s.observe(start + Duration::from_millis(2_900), 10));
        assert!(s.observe(start + Duration::from_secs(3), 10));
        // Heard again: the count restarts from then.
        assert!(!s.observe(start + Duration::from_secs(4), 11));
        assert!(!s.observe(start + Duration::from_millis(6_900), 11));
        assert!(s.observe(start + Duration::from_secs(7), 11));
        // A clock that does not move forward is not silence.
        assert!(!s.observe(start, 12));
    }
}
