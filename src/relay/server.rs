//! The relay's tokio shell: QUIC endpoint, HTTP/3 connections, one task per CONNECT-UDP request.
//!
//! Per connection, one task reads QUIC DATAGRAM frames and hands each to its request by quarter
//! stream ID (a map lookup; the UDP send happens right there, no channel hop). Per request, one
//! task owns the request stream (capsules) and reads the bind's UDP socket, sending what arrives
//! back as datagrams. The sans-IO parts decide: [`ProxyContexts`], [`Egress`], token buckets.

use super::config::{InboundFilter, RelayConfig};
use super::egress::{Egress, Refusal};
use crate::masque::request::{
    self as mreq, HEADER_BIND, HEADER_CAPSULE_PROTOCOL, HEADER_PUBLIC_ADDRESS, HEADER_USER,
    ProxyContexts, UdpTarget,
};
use crate::masque::wire;
use crate::rate::TokenBucket;
use bytes::{BufMut, Bytes};
use http::{Method, Response, StatusCode};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, error, info, warn};

type H3Conn = h3::server::Connection<super::budget::Connection, Bytes>;
type H3Stream =
    h3::server::RequestStream<super::budget::Budgeted<h3_quinn::BidiStream<Bytes>>, Bytes>;

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QUIC endpoint could not be bound.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, io::Error),
}

/// What the relay did, by reason.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Datagrams from clients sent on to peers.
    pub datagrams_out: AtomicU64,
    /// Datagrams from peers delivered to clients.
    pub datagrams_in: AtomicU64,
    /// Dropped: the egress policy forbids the peer.
    pub dropped_egress: AtomicU64,
    /// Dropped: a user or bind quota.
    pub dropped_quota: AtomicU64,
    /// Dropped: a context or request the relay does not know.
    pub dropped_unknown: AtomicU64,
    /// Dropped: too large for a QUIC DATAGRAM frame on the path, with the request stream's
    /// backlog of DATAGRAM capsules full.
    pub dropped_too_large: AtomicU64,
    /// Dropped: the bind's socket refused the send (buffer full, or an error).
    pub dropped_send_failed: AtomicU64,
    /// Dropped: a peer the client has not sent to (address-dependent filtering).
    pub dropped_inbound_filter: AtomicU64,
    /// Requests accepted.
    pub requests_accepted: AtomicU64,
    /// Requests refused.
    pub requests_refused: AtomicU64,
}

impl RelayCounters {
    /// Every counter as `(name, value)`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("datagrams_out", &self.datagrams_out),
            ("datagrams_in", &self.datagrams_in),
            ("dropped_egress", &self.dropped_egress),
            ("dropped_quota", &self.dropped_quota),
            ("dropped_unknown", &self.dropped_unknown),
            ("dropped_too_large", &self.dropped_too_large),
            ("dropped_send_failed", &self.dropped_send_failed),
            ("dropped_inbound_filter", &self.dropped_inbound_filter),
            ("requests_accepted", &self.requests_accepted),
            ("requests_refused", &self.requests_refused),
        ]
        .into_iter()
        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
        .collect()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What one user uses right now. Each of the user's binds holds it, so a packet is charged
/// under the user's own lock, not the map's (the relay's shards charge in parallel).
#[derive(Debug)]
struct UserUse {
    /// Binds held; changed only under the map's lock.
    binds: AtomicU32,
    /// Packets and bytes (in 1500-byte units) per second.
    rates: Mutex<(TokenBucket, TokenBucket)>,
}

impl UserUse {
    /// Charges one datagram of `len` bytes; false if over quota.
    fn charge(&self, len: usize) -> bool {
        let now = Instant::now();
        let Ok(mut rates) = self.rates.lock() else {
            return false;
        };
        let (packets, bytes) = &mut *rates;
        if !packets.take(now) {
            return false;
        }
        // Bytes are charged in 1500-byte units so that one token bucket serves both limits.
        let units = len.div_ceil(1500).max(1);
        (0..units).all(|_| bytes.take(now))
    }
}

#[derive(Debug)]
struct Shared {
    config: RelayConfig,
    egress: Egress,
    users: Mutex<HashMap<String, Arc<UserUse>>>,
    binds_total: AtomicU32,
    counters: RelayCounters,
    started: Instant,
    /// The live binds on the public address, by port: the only own-address destinations,
    /// and who holds each (a newer bind of the same user may take a port over).
    bind_ports: Mutex<HashMap<u16, PortHolder>>,
    /// Numbers the binds, to tell holders apart.
    next_bind: AtomicU64,
}

/// The bind that holds a public port.
#[derive(Debug)]
struct PortHolder {
    user: String,
    /// The subject of the certificate it came with: only the same sidecar may take the port.
    subject: Option<Vec<u8>>,
    bind: u64,
    /// The QUIC connection it came on ([`connection_id`]).
    conn: usize,
    /// That bind's request, to end it.
    tunnel: Arc<Tunnel>,
}

impl Shared {
    /// True if `peer` is one of this relay's own live bind sockets.
    fn is_hairpin(&self, peer: SocketAddr) -> bool {
        peer.ip().to_canonical() == self.config.public_address.to_canonical()
            && self
                .bind_ports
                .lock()
                .is_ok_and(|p| p.contains_key(&peer.port()))
    }

    /// Whether a bind may send to `peer`: the egress policy, or another bind of this relay.
    fn may_send_to(&self, peer: SocketAddr) -> bool {
        self.is_hairpin(peer) || self.egress.check(peer).is_ok()
    }

    fn millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A running request's slot in its user's and the global bind count; released on drop.
struct BindSlot {
    shared: Arc<Shared>,
    user: String,
    usage: Arc<UserUse>,
}

impl Drop for BindSlot {
    fn drop(&mut self) {
        self.shared.binds_total.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut users) = self.shared.users.lock()
            && self.usage.binds.fetch_sub(1, Ordering::Relaxed) <= 1
        {
            users.remove(&self.user);
        }
    }
}

fn take_bind_slot(shared: &Arc<Shared>, user: &str) -> Option<BindSlot> {
    let q = shared.config.quotas;
    let mut users = shared.users.lock().ok()?;
    let now = Instant::now();
    let u = users.entry(user.to_owned()).or_insert_with(|| {
        Arc::new(UserUse {
            binds: AtomicU32::new(0),
            rates: Mutex::new((
                TokenBucket::new(q.packets_per_second_per_user, now),
                TokenBucket::new(q.bytes_per_second_per_user.div_ceil(1500), now),
            )),
        })
    });
    if u.binds.load(Ordering::Relaxed) >= q.binds_per_user {
        return None;
    }
    if shared.binds_total.fetch_add(1, Ordering::Relaxed) >= q.binds_total {
        shared.binds_total.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    u.binds.fetch_add(1, Ordering::Relaxed);
    Some(BindSlot {
        shared: shared.clone(),
        user: user.to_owned(),
        usage: u.clone(),
    })
}

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
struct Tunnel {
    user: String,
    /// The user's packet and byte allowance.
    usage: Arc<UserUse>,
    socket: Arc<UdpSocket>,
    mode: Mode,
    /// Peer IPs the client has sent to: the only ones admitted back (address-dependent).
    permitted: Mutex<HashSet<IpAddr>>,
    /// When the request last carried a datagram, in ms since the relay started.
    active: AtomicU64,
    /// Wakes the request's task to end it, for the reason in `ended` (see [`Tunnel::end`]).
    end: Notify,
    ended: AtomicU8,
    /// The socket is IPv6.
    v6: bool,
}

type Tunnels = Arc<Mutex<HashMap<u64, Arc<Tunnel>>>>;

/// Why a request is ended from outside its task (`Tunnel::ended`).
const ENDED_TAKEN_OVER: u8 = 1;
const ENDED_IDLE: u8 = 2;
const ENDED_SHUTDOWN: u8 = 3;

impl Tunnel {
    /// Ends the request for `why` (one of the `ENDED_*`). A notification rather than a
    /// cancellation token per bind, and one for the relay's shutdown too: the bind's task waits
    /// on one future, not two (memory per idle bind).
    fn end(&self, why: u8) {
        self.ended.store(why, Ordering::Relaxed);
        self.end.notify_one();
    }

    fn end_reason(&self) -> &'static str {
        match self.ended.load(Ordering::Relaxed) {
            ENDED_TAKEN_OVER => "port taken over by a newer bind of the same user",
            ENDED_IDLE => "idle",
            _ => "shutdown",
        }
    }

    /// A datagram from the client: checked and charged. Returns where its UDP payload goes
    /// (`None`: the connected target) and the payload, if it may go.
    fn admit_from_client<'a>(
        &self,
        shared: &Shared,
        context_id: u64,
        payload: &'a [u8],
    ) -> Option<(Option<SocketAddr>, &'a [u8])> {
        let c = &shared.counters;
        let (target, udp) = match &self.mode {
            Mode::Fixed if context_id == 0 => (None, payload),
            Mode::Fixed => {
                bump(&c.dropped_unknown);
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
                        bump(&c.dropped_unknown);
                        return None;
                    }
                }
            }
        };
        if let Some(peer) = target {
            let mut permitted = self.permitted.lock().ok()?;
            if shared.is_hairpin(peer) {
                // Another bind of this relay (two masked users calling each other): allowed,
                // judged per packet, never cached as a permitted IP.
                permitted.insert(peer.ip());
            } else if !permitted.contains(&peer.ip())
                || peer.ip() == shared.config.public_address
                || shared.egress.is_own(peer.ip())
            {
                if let Err(refusal) = shared.egress.check(peer) {
                    debug!(user = %self.user, target = %peer, reason = %refusal, "egress denied");
                    bump(&c.dropped_egress);
                    return None;
                }
                if permitted.len() >= shared.config.quotas.peers_per_bind as usize {
                    bump(&c.dropped_quota);
                    return None;
                }
                permitted.insert(peer.ip());
            }
        }
        if !self.usage.charge(udp.len()) {
            bump(&c.dropped_quota);
            return None;
        }
        self.active.store(shared.millis(), Ordering::Relaxed);
        Some((target, udp))
    }
}

/// The relay: its QUIC port bound, ready to [`run`](Relay::run).
///
/// The port is served by `threads` shards: each has its own socket (`SO_REUSEPORT`), thread,
/// single-threaded runtime and QUIC endpoint, and the kernel steers each packet to the shard
/// that owns its connection (see [`crate::reuseport`]). A connection's packets, binds and
/// tasks stay on one thread, so none is handed between threads on the way.
#[derive(Debug)]
pub struct Relay {
    /// Per shard, its socket and endpoint settings.
    shards: Vec<(std::net::UdpSocket, quinn::EndpointConfig)>,
    tls: quinn::ServerConfig,
    shared: Arc<Shared>,
}

/// A handle to read a running relay's counters.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl RelayHandle {
    /// The relay's counters.
    pub fn counters(&self) -> &RelayCounters {
        &self.shared.counters
    }
}

/// The addresses of this host's interfaces now, and the configured public and listening
/// addresses: the relay never sends to itself.
fn own_addresses(config: &RelayConfig) -> Vec<IpAddr> {
    let mut own: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|s| {
                    s.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .collect()
        })
        .unwrap_or_default();
    own.push(config.public_address);
    if !config.listen.ip().is_unspecified() {
        own.push(config.listen.ip());
    }
    own
}

/// Follows the host's addresses, on a thread of its own: the kernel announces every address
/// added or removed on the route netlink groups, and the relay reads the whole list again at
/// each announcement (and every 30 s, in case one was lost to a full socket buffer).
fn follow_own_addresses(shared: Arc<Shared>, shutdown: CancellationToken) {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv,
        setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd as _;
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let events = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .and_then(|fd| {
        bind(
            fd.as_raw_fd(),
            &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(30, 0),
        )?;
        Ok(fd)
    });
    if let Err(e) = &events {
        warn!(error = %e, "cannot follow address changes; the relay's own addresses are read every 30 s");
    }
    let mut buf = vec![0u8; 16 << 10];
    while !shutdown.is_cancelled() {
        match &events {
            // A message, a timeout or an overrun: each is a reason to look again.
            Ok(fd) => {
                let _ = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty());
            }
            Err(_) => std::thread::sleep(Duration::from_secs(30)),
        }
        let own = own_addresses(&shared.config);
        if shared.egress.set_own(own.clone()) {
            info!(own = ?own, "the host's addresses changed; the relay never sends to any of them");
        }
    }
}

/// `shards` UDP sockets on `listen` (the first one's port if `listen` has port 0), in one
/// `SO_REUSEPORT` group steered by connection ID when there are several.
fn listen_sockets(listen: SocketAddr, shards: u8) -> io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut sockets: Vec<std::net::UdpSocket> = Vec::with_capacity(usize::from(shards));
    let mut addr = listen;
    for _ in 0..shards.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if shards > 1 {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReusePort, &true)?;
        }
        socket.bind(&addr.into())?;
        let socket = std::net::UdpSocket::from(socket);
        addr = socket.local_addr()?;
        crate::SocketBuffers::Shared.apply(&socket);
        sockets.push(socket);
    }
    if let (true, Some(first)) = (shards > 1, sockets.first()) {
        crate::reuseport::steer_by_connection_id(first, shards).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("attaching the program that steers packets to the relay's {shards} threads (threads = 1 does without): {e}"),
            )
        })?;
    }
    Ok(sockets)
}

impl Relay {
    /// Binds the QUIC port with `config.threads` sockets, `tls` (see
    /// [`crate::pki::server_config`]) and, per shard, `endpoint_config(shard, shards)` (see
    /// [`crate::pki::relay_endpoint_config`]).
    pub fn bind(
        config: RelayConfig,
        tls: quinn::ServerConfig,
        endpoint_config: impl Fn(u8, u8) -> quinn::EndpointConfig,
    ) -> Result<Self, Error> {
        let listen = config.listen;
        let count = config.threads.max(1);
        let sockets = listen_sockets(listen, count).map_err(|e| Error::Listen(listen, e))?;
        let shards = (0..count)
            .zip(sockets)
            .map(|(i, socket)| (socket, endpoint_config(i, count)))
            .collect();
        let egress = Egress::new(config.allow.clone(), own_addresses(&config));
        let shared = Arc::new(Shared {
            config,
            egress,
            users: Mutex::new(HashMap::new()),
            binds_total: AtomicU32::new(0),
            counters: RelayCounters::default(),
            started: Instant::now(),
            bind_ports: Mutex::new(HashMap::new()),
            next_bind: AtomicU64::new(0),
        });
        Ok(Self {
            shards,
            tls,
            shared,
        })
    }

    /// The QUIC listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.shards.first() {
            Some((socket, _)) => socket.local_addr(),
            None => Err(io::Error::other("no socket")),
        }
    }

    /// A handle for counters.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown`, then closes every connection and waits (bounded) for the close
    /// to reach the clients. Shard 0 runs in the caller's runtime, every other one on a thread
    /// of its own; a shard that cannot start stops the whole relay (its share of packets would
    /// go unanswered).
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            shards,
            tls,
            shared,
        } = self;
        {
            let (shared, token) = (shared.clone(), shutdown.clone());
            let spawned = std::thread::Builder::new()
                .name("veil-relay-addresses".into())
                .spawn(move || follow_own_addresses(shared, token));
            if let Err(e) = spawned {
                warn!(error = %e, "cannot follow address changes: the relay's own addresses stay as they were at start");
            }
        }
        let mut shards = shards.into_iter().enumerate();
        let first = shards.next();
        let mut threads = Vec::new();
        for (index, (socket, endpoint_config)) in shards {
            let (tls, shared, token) = (tls.clone(), shared.clone(), shutdown.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("veil-relay-{index}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(serve_shard(
                            index,
                            socket,
                            endpoint_config,
                            tls,
                            shared,
                            token,
                        )),
                        Err(e) => {
                            error!(shard = index, error = %e, "cannot start a relay thread's runtime; stopping");
                            token.cancel();
                        }
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    error!(shard = index, error = %e, "cannot start a relay thread; stopping");
                    shutdown.cancel();
                }
            }
        }
        if let Some((index, (socket, endpoint_config))) = first {
            serve_shard(index, socket, endpoint_config, tls, shared, shutdown).await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// One shard: its endpoint's connections, until `shutdown`.
async fn serve_shard(
    index: usize,
    socket: std::net::UdpSocket,
    endpoint_config: quinn::EndpointConfig,
    tls: quinn::ServerConfig,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let endpoint = match quinn::Endpoint::new(
        endpoint_config,
        Some(tls),
        socket,
        Arc::new(quinn::TokioRuntime),
    ) {
        Ok(e) => e,
        Err(e) => {
            error!(shard = index, error = %e, "cannot start the QUIC endpoint; stopping");
            shutdown.cancel();
            return;
        }
    };
    let tasks = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let shared = shared.clone();
        // A clone, not a child token: nothing cancels one alone, and a child costs a tree
        // node each (memory per idle association).
        let token = shutdown.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    if let Err(e) = serve_connection(shared, conn, token, index).await {
                        debug!(client = %remote, error = %e, "connection ended");
                    }
                }
                Err(e) => info!(client = %remote, error = %e, "handshake failed"),
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
    endpoint.close(0u32.into(), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Requests one connection may have in set-up at once (headers arriving, admission, the bind's
/// socket): with the per-request budget, at most 1,024 × 64 KiB buffered per connection (a
/// sidecar that reconnects opens its binds all at once, one per app socket).
const MAX_PENDING_REQUESTS: usize = 1024;

/// A request's place in its connection's count of requests being set up.
struct Pending(Arc<std::sync::atomic::AtomicUsize>);

impl Pending {
    fn hold(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest decoded header section a request may have.
const MAX_FIELD_SECTION: u64 = 16 << 10;
/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs a request that could not be read, at info (an operator's business: a broken or hostile
/// client), truncated and at a bounded rate.
fn bad_request(error: &str) {
    static LOG: Mutex<Option<TokenBucket>> = Mutex::new(None);
    let log = LOG
        .lock()
        .map(|mut b| {
            b.get_or_insert_with(|| TokenBucket::new(20, Instant::now()))
                .take(Instant::now())
        })
        .unwrap_or(false);
    if log {
        let error: String = error.chars().take(200).collect();
        info!(error = %error.escape_debug(), "bad request");
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
    shard: usize,
) -> Result<(), h3::error::ConnectionError> {
    let remote = conn.remote_address();
    let identity = peer_subject(&conn).and_then(|s| s.common_name);
    info!(client = %remote, shard, identity = identity.as_deref().unwrap_or("-"), "sidecar connected");
    let mut h3c: H3Conn = h3::server::builder()
        // Decoded request headers are small (a CONNECT and a few fields).
        .max_field_section_size(MAX_FIELD_SECTION)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .build(super::budget::Connection(h3_quinn::Connection::new(
            conn.clone(),
        )))
        .await?;
    let tunnels: Tunnels = Arc::new(Mutex::new(HashMap::new()));
    let datagrams = tokio::spawn(read_datagrams(
        shared.clone(),
        conn.clone(),
        tunnels.clone(),
    ));
    let requests = TaskTracker::new();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One sweep for the connection's idle requests, rather than a timer in every bind.
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let resolver = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                end_idle(&shared, &tunnels);
                continue;
            }
            r = h3c.accept() => match r {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    debug!(client = %remote, error = %e, "connection closed");
                    break;
                }
            },
        };
        // Each request being set up may hold its budget of buffered bytes; a connection may
        // have only so many at once (a sidecar opens its binds a few at a time).
        if pending.load(Ordering::Relaxed) >= MAX_PENDING_REQUESTS {
            bad_request("too many requests being set up on one connection; refused");
            drop(resolver);
            continue;
        }
        let held = Pending::hold(&pending);
        let (shared, conn, tunnels, token) = (
            shared.clone(),
            conn.clone(),
            tunnels.clone(),
            shutdown.clone(),
        );
        // Set-up runs boxed and is freed when done, so a bind's long-lived task holds only its
        // datagram loop (memory per idle bind).
        let span = tracing::info_span!("request", client = %remote, user = tracing::field::Empty);
        let set_up = Box::pin(
            async move {
                let _held = held;
                // A request whose headers never finish holds memory: it gets a deadline.
                match tokio::time::timeout(HEADER_TIMEOUT, resolver.resolve_request()).await {
                    Ok(Ok((req, stream))) => {
                        serve_request(shared, conn, tunnels, req, stream, token).await
                    }
                    Ok(Err(e)) => {
                        bad_request(&e.to_string());
                        None
                    }
                    Err(_) => {
                        bad_request("headers not complete within 10 s");
                        None
                    }
                }
            }
            .instrument(span),
        );
        requests.spawn(async move {
            // `open` is moved into the loop's future before it is awaited, so the task holds
            // one copy of it, not two.
            let serve = match set_up.await {
                Some(open) => open.serve(),
                None => return,
            };
            serve.await;
        });
    }
    if shutdown.is_cancelled()
        && let Ok(tunnels) = tunnels.lock()
    {
        for tunnel in tunnels.values() {
            tunnel.end(ENDED_SHUTDOWN);
        }
    }
    requests.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), requests.wait()).await;
    datagrams.abort();
    info!(client = %remote, "sidecar disconnected");
    Ok(())
}

/// Tells a connection apart from every other live one of the relay, whichever shard it is on
/// (quinn's `stable_id` is unique only within one endpoint): the address of its requests' map,
/// which lives as long as any of its binds.
fn connection_id(tunnels: &Tunnels) -> usize {
    Arc::as_ptr(tunnels) as usize
}

/// Ends the requests that have carried no datagram for the idle timeout.
fn end_idle(shared: &Shared, tunnels: &Tunnels) {
    let idle_ms = u64::try_from(shared.config.quotas.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let now = shared.millis();
    let Ok(tunnels) = tunnels.lock() else {
        return;
    };
    for tunnel in tunnels.values() {
        if now.saturating_sub(tunnel.active.load(Ordering::Relaxed)) >= idle_ms {
            tunnel.end(ENDED_IDLE);
        }
    }
}

/// Datagrams from the client, sent on from their binds' sockets. What quinn has already
/// received is taken in one go, so a burst to one peer leaves as one GSO send.
async fn read_datagrams(shared: Arc<Shared>, conn: quinn::Connection, tunnels: Tunnels) {
    while let Ok(first) = conn.read_datagram().await {
        let sent = crate::batch::send_bursts(|bursts| {
            let mut sent = forward(&shared, &tunnels, bursts, &first);
            for _ in 1..64 {
                match crate::batch::ready(conn.read_datagram()) {
                    Some(Ok(datagram)) => sent += forward(&shared, &tunnels, bursts, &datagram),
                    _ => break,
                }
            }
            sent
        });
        count_sent(&shared, sent);
    }
}

/// One datagram from the client: decoded, admitted, and queued on its bind's socket.
fn forward(
    shared: &Shared,
    tunnels: &Tunnels,
    bursts: &mut crate::batch::Bursts<'_, UdpSocket>,
    datagram: &[u8],
) -> crate::batch::Sent {
    let none = crate::batch::Sent::default();
    let Ok(d) = wire::decode_http_datagram(datagram) else {
        bump(&shared.counters.dropped_unknown);
        return none;
    };
    let tunnel = tunnels
        .lock()
        .ok()
        .and_then(|t| t.get(&d.quarter_stream_id).cloned());
    let Some(tunnel) = tunnel else {
        bump(&shared.counters.dropped_unknown);
        return none;
    };
    match tunnel.admit_from_client(shared, d.context_id, d.payload) {
        Some((to, udp)) => bursts.push(&tunnel.socket, to, udp.len(), |b| b.extend_from_slice(udp)),
        None => none,
    }
}

fn count_sent(shared: &Shared, sent: crate::batch::Sent) {
    let c = &shared.counters;
    c.datagrams_out.fetch_add(sent.ok, Ordering::Relaxed);
    c.dropped_send_failed
        .fetch_add(sent.failed, Ordering::Relaxed);
}

/// A refusal: status, `Proxy-Status` error and details.
struct Refuse(StatusCode, &'static str, String);

async fn refuse(shared: &Shared, stream: &mut H3Stream, Refuse(status, error, details): Refuse) {
    bump(&shared.counters.requests_refused);
    // Whatever the request held (a NUL or newline in its target), the refusal goes out: a
    // header value of visible ASCII only, and at most 200 characters of it.
    let details: String = details
        .chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .take(200)
        .collect();
    info!(status = %status, error, details, "request refused");
    let resp = Response::builder()
        .status(status)
        .header(
            "proxy-status",
            format!("veil; error={error}; details=\"{details}\""),
        )
        .body(());
    if let Ok(resp) = resp {
        let _ = stream.send_response(resp).await;
    }
    let _ = stream.finish().await;
}

fn header<'a>(req: &'a http::Request<()>, name: &str) -> Option<&'a [u8]> {
    req.headers().get(name).map(|v| v.as_bytes())
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, Refuse> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            Refuse(
                StatusCode::BAD_GATEWAY,
                "dns_error",
                format!("cannot resolve {host}"),
            )
        })
}

fn prohibited(r: Refusal) -> Refuse {
    Refuse(StatusCode::FORBIDDEN, r.proxy_status(), r.to_string())
}

/// Checks a request and says what it is for: the user, and the UDP target or TCP target.
async fn admit(shared: &Shared, req: &http::Request<()>) -> Result<(String, Admitted), Refuse> {
    let bad = |d: &str| Refuse(StatusCode::BAD_REQUEST, "http_request_error", d.to_owned());
    // A user name as Unix and directory services write them; anything else (spaces, quotes,
    // control characters that would forge fields in log lines) is refused.
    let user = header(req, HEADER_USER).ok_or_else(|| bad("missing veil-user header"))?;
    if user.is_empty()
        || user.len() > 255
        || !user
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@+$".contains(b))
    {
        return Err(bad(
            "veil-user must be 1-255 characters of A-Z a-z 0-9 . _ - @ + $",
        ));
    }
    let user = String::from_utf8_lossy(user).into_owned();
    tracing::Span::current().record("user", user.as_str());
    if req.method() != Method::CONNECT {
        return Err(Refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "http_request_error",
            "only CONNECT".into(),
        ));
    }
    let protocol = req.extensions().get::<h3::ext::Protocol>();
    match protocol {
        None => {
            // Classic CONNECT: a TCP tunnel to the authority.
            let authority = req
                .uri()
                .authority()
                .ok_or_else(|| bad("CONNECT without authority"))?;
            let port = authority
                .port_u16()
                .ok_or_else(|| bad("CONNECT authority without port"))?;
            let target = resolve(authority.host(), port).await?;
            shared.egress.check(target).map_err(prohibited)?;
            Ok((user, Admitted::Tcp(target)))
        }
        Some(p) if *p == h3::ext::Protocol::CONNECT_UDP => {
            match mreq::parse_path(req.uri().path()).map_err(|e| bad(&e.to_string()))? {
                UdpTarget::Bind => {
                    if !header(req, HEADER_BIND).is_some_and(mreq::is_sf_true) {
                        return Err(bad("target * needs connect-udp-bind: ?1"));
                    }
                    Ok((user, Admitted::Bind))
                }
                UdpTarget::Host { host, port } => {
                    let target = resolve(&host, port).await?;
                    shared.egress.check(target).map_err(prohibited)?;
                    Ok((user, Admitted::Fixed(target)))
                }
            }
        }
        Some(_) => Err(Refuse(
            StatusCode::NOT_IMPLEMENTED,
            "http_request_error",
            "unsupported :protocol".into(),
        )),
    }
}

enum Admitted {
    Bind,
    Fixed(SocketAddr),
    Tcp(SocketAddr),
}

async fn serve_request(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    tunnels: Tunnels,
    req: http::Request<()>,
    mut stream: H3Stream,
    shutdown: CancellationToken,
) -> Option<OpenUdp> {
    let (user, admitted) = match admit(&shared, &req).await {
        Ok(a) => a,
        Err(r) => {
            refuse(&shared, &mut stream, r).await;
            return None;
        }
    };
    let identity = peer_subject(&conn).and_then(|s| s.common_name);
    if !shared.config.may_speak_for(identity.as_deref(), &user) {
        let r = Refuse(
            StatusCode::FORBIDDEN,
            "identity_not_permitted",
            format!(
                "certificate {} may not speak for user {user}",
                identity.as_deref().unwrap_or("(no common name)")
            ),
        );
        refuse(&shared, &mut stream, r).await;
        return None;
    }
    let Some(slot) = take_bind_slot(&shared, &user) else {
        let r = Refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "connection_limit_reached",
            format!("quota for user {user}"),
        );
        refuse(&shared, &mut stream, r).await;
        return None;
    };
    // A port below 1024 is never handed out, whatever a sidecar asks for.
    let preferred = header(&req, mreq::HEADER_PREFERRED_PORT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|p| *p >= 1024);
    drop(req);
    let target = match admitted {
        Admitted::Tcp(target) => {
            serve_tcp(&shared, &user, target, stream, shutdown).await;
            drop(slot);
            return None;
        }
        Admitted::Bind => Target::Bind { preferred },
        Admitted::Fixed(t) => Target::Fixed(t),
    };
    let user = (user, slot);
    open_udp(shared, conn, tunnels, user, target, stream, shutdown).await
}

async fn serve_tcp(
    shared: &Shared,
    user: &str,
    target: SocketAddr,
    mut stream: H3Stream,
    shutdown: CancellationToken,
) {
    let tcp = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let r = Refuse(StatusCode::BAD_GATEWAY, "connection_refused", e.to_string());
            return refuse(shared, &mut stream, r).await;
        }
        Err(_) => {
            let r = Refuse(
                StatusCode::GATEWAY_TIMEOUT,
                "connection_timeout",
                target.to_string(),
            );
            return refuse(shared, &mut stream, r).await;
        }
    };
    let Ok(resp) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    if stream.send_response(resp).await.is_err() {
        return;
    }
    bump(&shared.counters.requests_accepted);
    info!(user, target = %target, "tcp tunnel open");
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (mut send, mut recv) = stream.split();
    let up = async {
        while let Ok(Some(mut data)) = recv.recv_data().await {
            if tcp_write.write_all_buf(&mut data).await.is_err() {
                return;
            }
        }
        let _ = tcp_write.shutdown().await;
    };
    let down = async {
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
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
    info!(user, target = %target, "tcp tunnel closed");
}

/// Who the client's certificate names (the end-entity certificate of its chain).
fn peer_subject(conn: &quinn::Connection) -> Option<crate::pki::Subject> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::pki::Subject::of_certificate(chain.first()?.as_ref())
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
        holder.tunnel.end(ENDED_TAKEN_OVER);
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
enum Target {
    /// A bind (any peer), preferably on this port.
    Bind { preferred: Option<u16> },
    /// Unextended CONNECT-UDP: one fixed target.
    Fixed(SocketAddr),
}

#[allow(clippy::too_many_arguments)]
/// Opens the UDP socket of a CONNECT-UDP request and answers 200, or refuses.
async fn open_udp(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    tunnels: Tunnels,
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
            connection_id(&tunnels),
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
    let tunnel = Arc::new(Tunnel {
        user: user.clone(),
        usage: slot.usage.clone(),
        socket: Arc::new(socket),
        mode,
        permitted: Mutex::new(HashSet::new()),
        active: AtomicU64::new(shared.millis()),
        end: Notify::new(),
        ended: AtomicU8::new(0),
        v6: bound.is_ipv6(),
    });
    if let Ok(mut t) = tunnels.lock() {
        t.insert(quarter, tunnel.clone());
    }
    let hairpin_port = fixed.is_none().then_some(bound.port());
    let id = shared.next_bind.fetch_add(1, Ordering::Relaxed);
    if let (Some(port), Ok(mut ports)) = (hairpin_port, shared.bind_ports.lock()) {
        let holder = PortHolder {
            user: user.clone(),
            subject,
            bind: id,
            conn: connection_id(&tunnels),
            tunnel: tunnel.clone(),
        };
        ports.insert(port, holder);
    }
    let mut open = OpenUdp {
        _slot: slot,
        shared,
        conn,
        tunnels,
        user,
        stream,
        shutdown,
        tunnel,
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
struct OpenUdp {
    /// The request's place in its user's and the global bind count (and its user's quotas).
    _slot: BindSlot,
    shared: Arc<Shared>,
    conn: quinn::Connection,
    tunnels: Tunnels,
    user: String,
    stream: H3Stream,
    shutdown: CancellationToken,
    tunnel: Arc<Tunnel>,
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
        self.tunnels
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
    fn serve(mut self) -> impl Future<Output = ()> {
        async move {
            let (shared, tunnel) = (&self.shared, &self.tunnel);
            let mut capsules = Vec::new();
            // Set up after the connection's shutdown pass (which ends every bind it knows)?
            let reason = loop {
                if self.shutdown.is_cancelled() {
                    break "shutdown";
                }
                tokio::select! {
                    _ = tunnel.end.notified() => break tunnel.end_reason(),
                    data = self.stream.recv_data() => match data {
                        Ok(Some(data)) => {
                            capsules.put(data);
                            match handle_capsules(shared, tunnel, &mut capsules) {
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
                    r = std::future::poll_fn(|cx| tunnel.socket.poll_recv_ready(cx)) => {
                        if r.is_err() {
                            break "socket error";
                        }
                        let Ok(capsules) = to_client(shared, &self.conn, tunnel, self.quarter) else {
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

fn handle_capsules(shared: &Shared, tunnel: &Tunnel, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut replies = Vec::new();
    let mut used = 0;
    while let Some((capsule, n)) =
        wire::decode_capsule(buf.get(used..).unwrap_or_default()).map_err(|e| e.to_string())?
    {
        used += n;
        if let wire::Capsule::Datagram(value) = &capsule {
            // A datagram too large for the client's DATAGRAM frames: sent on like one.
            let (context, payload) = wire::split_context(value).map_err(|e| e.to_string())?;
            if let Some((to, udp)) = tunnel.admit_from_client(shared, context, payload) {
                let sent = match to {
                    Some(to) => tunnel.socket.try_send_to(udp, to),
                    None => tunnel.socket.try_send(udp),
                };
                match sent {
                    Ok(_) => bump(&shared.counters.datagrams_out),
                    Err(_) => bump(&shared.counters.dropped_send_failed),
                }
            }
            continue;
        }
        if let Mode::Bind(contexts) = &tunnel.mode {
            let mut table = contexts.lock().map_err(|_| "lock poisoned".to_owned())?;
            let reply = table
                .on_capsule(&capsule, |peer| shared.may_send_to(peer))
                .map_err(|e| e.to_string())?;
            if let Some(reply) = reply {
                reply.encode(&mut replies);
            }
        }
    }
    buf.drain(..used);
    if buf.is_empty() && buf.capacity() > 4096 {
        // A large DATAGRAM capsule passed: an idle bind keeps no buffer for it.
        *buf = Vec::new();
    }
    Ok(replies)
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
    tunnel: &Tunnel,
    quarter: u64,
) -> Result<Vec<u8>, ()> {
    let mut sent = 0;
    let mut capsules = Vec::new();
    let mut outcome = Ok(());
    for _ in 0..4 {
        let mut lost = false;
        let received = crate::batch::recv_burst(&tunnel.socket, tunnel.v6, |from, slot, n| {
            let payload = slot.get(HEADROOM..HEADROOM + n).unwrap_or_default();
            match one_to_client(shared, conn, tunnel, quarter, from, payload, &mut capsules) {
                Ok(true) => sent += 1,
                Ok(false) => {}
                Err(()) => lost = true,
            }
        });
        if lost {
            outcome = Err(());
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
    tunnel: &Tunnel,
    quarter: u64,
    from: SocketAddr,
    payload: &[u8],
    capsules: &mut Vec<u8>,
) -> Result<bool, ()> {
    let c = &shared.counters;
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let (context, compressed) = match &tunnel.mode {
        Mode::Fixed => (0, true),
        Mode::Bind(contexts) => {
            if shared.config.inbound_filter == InboundFilter::AddressDependent
                && !tunnel
                    .permitted
                    .lock()
                    .is_ok_and(|p| p.contains(&from.ip()))
            {
                bump(&c.dropped_inbound_filter);
                return Ok(false);
            }
            match contexts.lock().ok().and_then(|t| t.to_client(from)) {
                Some(found) => found,
                None => {
                    bump(&c.dropped_unknown);
                    return Ok(false);
                }
            }
        }
    };
    if !tunnel.usage.charge(payload.len()) {
        bump(&c.dropped_quota);
        return Ok(false);
    }
    tunnel.active.store(shared.millis(), Ordering::Relaxed);
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
            bump(&c.dropped_too_large);
            return Ok(false);
        }
        let value = datagram.split_off(wire::varint_len(quarter));
        wire::Capsule::Datagram(value).encode(capsules);
        return Ok(true);
    }
    match conn.send_datagram(Bytes::from(datagram)) {
        Ok(()) => return Ok(true),
        Err(quinn::SendDatagramError::ConnectionLost(_)) => return Err(()),
        Err(_) => bump(&c.dropped_unknown),
    }
    Ok(false)
}
