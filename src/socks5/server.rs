//! The tokio shell of the SOCKS5 server: accept loop, one task per client, UDP relaying.
//!
//! All decisions are made by the sans-IO parts ([`codec`], [`Association`], [`Policy`]); this
//! module only moves bytes between sockets and does what they say. Shutdown: a cancellation token
//! stops the accept loop and every session, then [`Server::run`] waits for the tasks to finish.

use super::association::{Admission, Association, DropReason, PolicyVersion};
use super::codec::{self, Address, Command, Method, Reply};
use super::passwords::PasswordFile;
use crate::binding::{BindEvent, Binding, Sent};
use crate::identity;
use crate::policy::{Decision, Policy, Target, User, Verdict};
use crate::rate::TokenBucket;
use crate::tunnel::{self, OpenError, Tunnel, TunnelState};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen. Without `passwords`, only a loopback address is accepted.
    pub listen: SocketAddr,
    /// RFC 1929 credentials; when set, every client must log in.
    pub passwords: Option<PasswordFile>,
    /// Clients served at once; more wait to be accepted.
    pub max_clients: usize,
    /// Time a client has to complete greeting, login and request.
    pub handshake_timeout: Duration,
    /// Time a CONNECT to a target may take.
    pub connect_timeout: Duration,
    /// Time sessions get to end after shutdown is requested.
    pub shutdown_grace: Duration,
    /// The tunnel to the relay; without it, `relay` verdicts are dropped (fail closed).
    pub tunnel: Option<Tunnel>,
}

impl Config {
    /// Defaults for a listener on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            passwords: None,
            max_clients: 16_384,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            tunnel: None,
        }
    }
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Listening beyond loopback without authentication would open a proxy to the network.
    #[error(
        "refusing to listen on {0} without authentication: only loopback may be served without a password file"
    )]
    Unauthenticated(SocketAddr),
    /// The listening socket could not be set up.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, io::Error),
}

/// Counters of what the server did; read them with [`Counters::snapshot`].
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

/// State shared by every session (and by transparent interception, [`crate::intercept`]).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) policy: ArcSwap<PolicyVersion>,
    users: Mutex<HashMap<String, UserState>>,
    pub(crate) counters: Counters,
    /// Bounds how many block decisions are logged per second.
    block_log: Mutex<TokenBucket>,
    /// Bounds how many refused sources (another user's socket, none) are logged per second.
    source_log: Mutex<TokenBucket>,
    /// Live sessions and their flows, for status.
    pub(crate) registry: Arc<crate::status::Registry>,
    /// Open connections by owner (a local uid, or a remote client's IP), whatever their stage:
    /// no owner may hold more than [`Shared::per_owner`] of the server's slots.
    owners: Mutex<HashMap<Owner, u32>>,
}

/// Who holds a connection, as known before its handshake: the kernel names a local client's
/// uid; a remote client is known by its IP until it logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    Uid(u32),
    Remote(IpAddr),
}

/// One connection's place in its owner's count; released on drop.
struct OwnerSlot {
    shared: Arc<Shared>,
    owner: Owner,
}

impl Drop for OwnerSlot {
    fn drop(&mut self) {
        if let Ok(mut owners) = self.shared.owners.lock()
            && let Some(n) = owners.get_mut(&self.owner)
        {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.owner);
            }
        }
    }
}

impl Shared {
    /// How many of the server's connection slots one owner may hold: an eighth, so that one
    /// user's idle connections never keep the others waiting (at least 64).
    fn per_owner(&self) -> u32 {
        u32::try_from(self.config.max_clients / 8)
            .unwrap_or(u32::MAX)
            .max(64)
    }

    /// Counts a new connection of `owner`, or None if it holds its share already.
    fn take_owner_slot(self: &Arc<Self>, owner: Owner) -> Option<OwnerSlot> {
        let mut owners = self.owners.lock().ok()?;
        let n = owners.entry(owner).or_insert(0);
        if *n >= self.per_owner() {
            return None;
        }
        *n += 1;
        Some(OwnerSlot {
            shared: self.clone(),
            owner,
        })
    }

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
}

/// A handle to a running server: reload its policy, read its counters.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Swaps in a new policy; every live flow is decided again on its next packet.
    pub fn reload(&self, policy: Policy) -> u64 {
        let generation = self.shared.policy.load().generation + 1;
        self.shared
            .policy
            .store(Arc::new(PolicyVersion { policy, generation }));
        generation
    }

    /// The server's counters.
    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn tunnel_state(&self) -> String {
        match &self.shared.config.tunnel {
            Some(t) => {
                let f = t.figures();
                let rtt = f
                    .rtt
                    .map(|r| format!("rtt {:.1} ms, ", r.as_secs_f64() * 1e3))
                    .unwrap_or_default();
                format!(
                    "{} ({rtt}{} of {} packets lost on this connection; {} connections, {} replaced after the relay fell silent)",
                    t.state().as_str(),
                    f.lost_packets,
                    f.sent_packets,
                    f.connects,
                    f.replaced
                )
            }
            None => "none (no relay configured: relayed traffic is dropped)".to_owned(),
        }
    }

    /// The `veil status` report; `managed` names the transparently managed users and groups.
    pub fn status_report(&self, managed: &[String]) -> String {
        crate::status::report(
            &self.tunnel_state(),
            managed,
            crate::firewall::last_check().as_deref(),
            &self.shared.registry.snapshot(),
            &self.counters().snapshot(),
        )
    }

    /// The counters in Prometheus text format.
    pub fn prometheus(&self) -> String {
        let tunnel = self.shared.config.tunnel.as_ref();
        let up = tunnel.is_some_and(|t| t.state() == TunnelState::Connected);
        crate::status::prometheus(
            up,
            &tunnel.map(Tunnel::figures).unwrap_or_default(),
            &self.shared.registry.snapshot(),
            &self.counters().snapshot(),
        )
    }
}

/// A bound SOCKS5 server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listener. Fails if the configuration would expose an unauthenticated proxy.
    pub async fn bind(config: Config, policy: Policy) -> Result<Self, Error> {
        if config.passwords.is_none() && !config.listen.ip().to_canonical().is_loopback() {
            return Err(Error::Unauthenticated(config.listen));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Listen(config.listen, e))?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            config,
            policy: ArcSwap::from_pointee(PolicyVersion {
                policy,
                generation: 1,
            }),
            users: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            block_log: Mutex::new(TokenBucket::new(20, now)),
            source_log: Mutex::new(TokenBucket::new(20, now)),
            owners: Mutex::new(HashMap::new()),
            registry: Arc::new(crate::status::Registry::default()),
        });
        Ok(Self { listener, shared })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle for reloads and counters.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves clients until `shutdown` is cancelled, then gives sessions the grace period.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.shared.config.max_clients));
        let tasks = TaskTracker::new();
        let mut refusals = TokenBucket::new(5, Instant::now());
        'serve: loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer, owner_slot, uid) = loop {
                let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break 'serve,
                r = self.listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                };
                // Who it is, before it takes a slot (one kernel lookup): a user over its share
                // is turned away at once, without holding anyone else's slot.
                let uid = stream
                    .local_addr()
                    .ok()
                    .and_then(|local| identity::client_uid(local, peer).ok().flatten());
                let owner = uid.map_or(Owner::Remote(peer.ip()), Owner::Uid);
                match self.shared.take_owner_slot(owner) {
                    Some(slot) => break (stream, peer, slot, uid),
                    None => {
                        if refusals.take(Instant::now()) {
                            warn!(client = %peer, limit = self.shared.per_owner(), "connection refused: its user holds its share of the sessions");
                        }
                        drop(stream);
                    }
                }
            };
            let shared = self.shared.clone();
            // A clone, not a child token: nothing cancels one alone, and a child costs a tree
            // node each (memory per idle association).
            let token = shutdown.clone();
            tasks.spawn(async move {
                // Set-up runs boxed and is freed when done: a UDP association's long-lived
                // task holds only its loop's state (memory per idle association).
                // `session` is moved into the loop's future before it is awaited, so the task
                // holds one copy of it, not two.
                let _owner_slot = owner_slot;
                let run = match Box::pin(serve(&shared, stream, peer, uid, token)).await {
                    Ok(Some(session)) => session.run(),
                    Ok(None) => return,
                    Err(e) => {
                        debug!(client = %peer, error = %e, "session ended");
                        return;
                    }
                };
                if let Err(e) = run.await {
                    debug!(client = %peer, error = %e, "session ended");
                }
                drop(permit);
            });
        }
        tasks.close();
        if tokio::time::timeout(self.shared.config.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = tasks.len(),
                "sessions still running after the shutdown grace period"
            );
        }
    }
}

/// Why a session ended early (logged at debug level; the client got its reply already).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("client sent invalid SOCKS5: {0}")]
    Protocol(#[from] codec::Error),
    #[error("client closed the connection during the handshake")]
    Eof,
    #[error("handshake timed out")]
    Timeout,
    #[error("no acceptable authentication method offered")]
    NoMethod,
    #[error("login failed for {0:?}")]
    Login(String),
    #[error("request refused with reply {0:#04x}")]
    Refused(u8),
}

/// Reads one message with `decode`, keeping what follows it in `buf`.
async fn read_message<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    decode: fn(&[u8]) -> codec::Decoded<T>,
) -> Result<T, SessionError> {
    loop {
        if let Some((message, used)) = decode(buf)? {
            buf.drain(..used);
            return Ok(message);
        }
        if buf.len() > codec::MAX_REQUEST_LEN {
            return Err(codec::Error::Trailing(buf.len()).into());
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(SessionError::Eof);
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

/// The unspecified address of the same family, for failure replies.
fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

async fn refuse(stream: &mut TcpStream, reply: Reply) -> SessionError {
    let bound = unspecified_like(stream.local_addr().unwrap_or(SocketAddr::from(([0; 4], 0))));
    let _ = stream.write_all(&codec::encode_reply(reply, bound)).await;
    let _ = stream.shutdown().await;
    SessionError::Refused(reply.byte())
}

/// Greeting, login and request; returns who the client is and what it asked for.
async fn handshake(
    shared: &Shared,
    stream: &mut TcpStream,
    peer: SocketAddr,
    uid: Option<u32>,
) -> Result<(User, Option<u32>, codec::Request), SessionError> {
    let mut buf = Vec::with_capacity(64);
    let methods = read_message(stream, &mut buf, codec::decode_greeting).await?;
    let wanted = if shared.config.passwords.is_some() {
        Method::Password
    } else {
        Method::NoAuth
    };
    if !methods.contains(&wanted.byte()) {
        stream
            .write_all(&codec::encode_method(Method::NoAcceptable))
            .await?;
        return Err(SessionError::NoMethod);
    }
    stream.write_all(&codec::encode_method(wanted)).await?;

    let mut login = None;
    if let Some(passwords) = &shared.config.passwords {
        let creds = read_message(stream, &mut buf, codec::decode_credentials).await?;
        let passwords = passwords.clone();
        let (user, pass) = (creds.username.clone(), creds.password);
        let ok = tokio::task::spawn_blocking(move || passwords.verify(&user, &pass))
            .await
            .unwrap_or(false);
        stream.write_all(&codec::encode_auth_status(ok)).await?;
        let name = String::from_utf8_lossy(&creds.username).into_owned();
        if !ok {
            let _ = stream.shutdown().await;
            return Err(SessionError::Login(name));
        }
        login = Some(name);
    }

    let request = match read_message(stream, &mut buf, codec::decode_request).await {
        Ok(request) => request,
        Err(SessionError::Protocol(e)) => {
            refuse(stream, e.reply()).await;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };

    // The kernel said who owns a local client's socket (at accept); only a remote client is
    // known by its login name alone.
    let user = match uid {
        Some(uid) => identity::user_of_uid(uid)
            .map(|u| (u, Some(uid)))
            .map_err(|e| e.to_string()),
        None => login
            .as_deref()
            .map(|name| (identity::user_named(name), None))
            .ok_or_else(|| "not a local socket and no login".to_owned()),
    };
    match user {
        Ok((user, uid)) => Ok((user, uid, request)),
        Err(e) => {
            warn!(client = %peer, error = %e, "cannot tell who the client is");
            Err(refuse(stream, Reply::GeneralFailure).await)
        }
    }
}

/// One session's hold on its user's session count; released on drop.
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

pub(crate) fn take_session_slot<'a>(
    shared: &'a Shared,
    user: &User,
    max: u32,
) -> Option<SessionSlot<'a>> {
    let mut users = shared.users.lock().ok()?;
    let limits = shared.policy.load().policy.limits(user);
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
        shared,
        user: user.name().to_owned(),
    })
}

/// A session's set-up: handshake, login and request. A CONNECT runs to its end here; a UDP
/// ASSOCIATE that was answered is returned, to run without the set-up's state.
async fn serve<'a>(
    shared: &'a Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    uid: Option<u32>,
    shutdown: CancellationToken,
) -> Result<Option<UdpSession<'a>>, SessionError> {
    let _ = stream.set_nodelay(true);
    let handshake = handshake(shared, &mut stream, peer, uid);
    let (user, uid, request) = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = Box::pin(tokio::time::timeout(shared.config.handshake_timeout, handshake)) => {
            r.map_err(|_| SessionError::Timeout)??
        }
    };
    let limits = shared.policy.load().policy.limits(&user);
    let Some(slot) = take_session_slot(shared, &user, limits.max_associations) else {
        info!(user = %user, client = %peer, limit = limits.max_associations, "session refused: too many sessions");
        return Err(Box::pin(refuse(&mut stream, Reply::NotAllowed)).await);
    };
    shared.counters.sessions.fetch_add(1, Ordering::Relaxed);
    match request.command {
        Command::Connect => {
            Box::pin(connect(
                shared,
                stream,
                peer,
                &user,
                request.address,
                shutdown,
            ))
            .await?;
            Ok(None)
        }
        Command::UdpAssociate => {
            let (control, relay) = associate(
                shared,
                stream,
                peer,
                (user, uid),
                &request.address,
                limits.max_flows_per_association,
            )
            .await?;
            Ok(Some(UdpSession {
                control,
                peer,
                relay,
                shutdown,
                slot,
            }))
        }
        Command::Bind => Err(Box::pin(refuse(&mut stream, Reply::CommandNotSupported)).await),
    }
}

/// Resolves a target once; the policy judges, and the connection uses, that one address.
async fn resolve(address: &Address) -> Option<SocketAddr> {
    match address {
        Address::Ip(addr) => Some(*addr),
        Address::Domain(name, port) => tokio::net::lookup_host((name.as_str(), *port))
            .await
            .ok()?
            .next(),
    }
}

pub(crate) fn log_decision(
    shared: &Shared,
    user: &User,
    client: SocketAddr,
    target: SocketAddr,
    decision: &Decision,
) {
    if decision.verdict == Verdict::Block {
        let allowed = shared
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

fn connect_error_reply(e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
        io::ErrorKind::TimedOut => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

async fn connect(
    shared: &Shared,
    mut stream: TcpStream,
    peer: SocketAddr,
    user: &User,
    address: Address,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let Some(target) = resolve(&address).await else {
        info!(user = %user, client = %peer, target = %address, "cannot resolve target");
        return Err(refuse(&mut stream, Reply::HostUnreachable).await);
    };
    let decision = shared
        .policy
        .load()
        .policy
        .decide(user, &Target::tcp(target));
    log_decision(shared, user, peer, target, &decision);
    match decision.verdict {
        Verdict::Block => return Err(refuse(&mut stream, Reply::NotAllowed).await),
        Verdict::Relay => return connect_relayed(shared, stream, user, target, shutdown).await,
        Verdict::Direct => {}
    }
    let outbound =
        match tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect(target)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(refuse(&mut stream, connect_error_reply(&e)).await),
            Err(_) => return Err(refuse(&mut stream, Reply::TtlExpired).await),
        };
    let _ = outbound.set_nodelay(true);
    let bound = outbound.local_addr()?;
    stream
        .write_all(&codec::encode_reply(Reply::Succeeded, bound))
        .await?;
    let mut outbound = outbound;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = tokio::io::copy_bidirectional(&mut stream, &mut outbound) => { r?; }
    }
    Ok(())
}

/// CONNECT whose verdict is `relay`: a classic CONNECT through the tunnel, never direct.
async fn connect_relayed(
    shared: &Shared,
    mut stream: TcpStream,
    user: &User,
    target: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let Some(tunnel) = &shared.config.tunnel else {
        shared.counters.drop(DropReason::RelayUnavailable);
        return Err(refuse(&mut stream, Reply::NetworkUnreachable).await);
    };
    match tunnel.open_tcp(user.name(), target).await {
        Ok(t) => {
            let bound = unspecified_like(target);
            stream
                .write_all(&codec::encode_reply(Reply::Succeeded, bound))
                .await?;
            t.pump(stream, shutdown).await;
            Ok(())
        }
        Err(e) => {
            info!(user = %user, target = %target, error = %e, "relayed connect failed");
            let reply = match &e {
                OpenError::NotConnected => {
                    shared.counters.drop(DropReason::RelayUnavailable);
                    Reply::NetworkUnreachable
                }
                e if tunnel::is_prohibited(e) => Reply::NotAllowed,
                OpenError::Refused { status: 502, .. } => Reply::ConnectionRefused,
                OpenError::Refused { status: 504, .. } => Reply::TtlExpired,
                _ => Reply::GeneralFailure,
            };
            Err(refuse(&mut stream, reply).await)
        }
    }
}

use crate::HEADROOM;
/// Datagrams handled per wake-up before yielding to other tasks.
const BATCH: usize = 64;

/// The sockets and state of one UDP association.
struct Relay<'a> {
    shared: &'a Shared,
    user: User,
    /// The control connection's uid, for a local client: its datagrams must come from a socket
    /// of this uid.
    uid: Option<u32>,
    /// The association's UDP address (the client socket's).
    bound: SocketAddr,
    association: Association,
    /// Shared with [`Relay::drain_client`]'s receive while it hands datagrams to `self`.
    client_socket: Arc<UdpSocket>,
    out_v4: Option<UdpSocket>,
    out_v6: Option<UdpSocket>,
    /// Domain targets resolved once for the life of the association.
    names: HashMap<(String, u16), SocketAddr>,
    max_names: usize,
    /// The association's bind on the relay: one public address for all its relayed peers.
    binding: Binding,
    /// The client-facing socket is IPv6.
    v6: bool,
    /// This association in the status registry.
    live: crate::status::LiveSession,
    /// Which socket [`poll_ready`] looks at first.
    turn: usize,
}

/// A datagram to a domain target whose name must be resolved first.
struct Unresolved {
    name: String,
    port: u16,
    datagram: Vec<u8>,
}

fn outbound_socket(v6: bool) -> io::Result<UdpSocket> {
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
pub(crate) fn send_now(socket: &UdpSocket, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_to(payload, &to.into())
}

/// Which of an association's sockets has something to read.
enum Ready {
    /// The SOCKS5 control connection (data or its end).
    Control,
    /// The UDP socket facing the client.
    Client,
    /// An outbound socket (replies from `direct` targets).
    Peers { v6: bool },
}

/// Waits for any of an association's sockets to be readable, without a future per socket
/// (memory per idle association). Starts from a different socket each time (`turn`), so a
/// flooded one cannot starve the others.
fn poll_ready(
    cx: &mut Context<'_>,
    turn: &mut usize,
    control: &TcpStream,
    client: &UdpSocket,
    out: [Option<&UdpSocket>; 2],
) -> Poll<io::Result<Ready>> {
    *turn = turn.wrapping_add(1);
    for i in 0..4 {
        let (ready, which) = match (*turn + i) % 4 {
            0 => (control.poll_read_ready(cx), Ready::Control),
            1 => (client.poll_recv_ready(cx), Ready::Client),
            n => match out.get(n - 2).copied().flatten() {
                Some(s) => (s.poll_recv_ready(cx), Ready::Peers { v6: n == 3 }),
                None => continue,
            },
        };
        if let Poll::Ready(r) = ready {
            return Poll::Ready(r.map(|()| which));
        }
    }
    Poll::Pending
}

impl Relay<'_> {
    /// Handles datagrams waiting on the client socket, a burst per `recvmmsg`. Returns those
    /// that need a name resolved first.
    fn drain_client(&mut self) -> Vec<Unresolved> {
        let socket = self.client_socket.clone();
        let mut pending = Vec::new();
        for _ in 0..BATCH / 16 {
            let received = crate::batch::recv_burst(&socket, self.v6, |from, slot, n| {
                let datagram = slot
                    .get(crate::HEADROOM..crate::HEADROOM + n)
                    .unwrap_or_default();
                pending.extend(self.client_datagram(from, datagram));
            });
            if received.is_err() {
                break;
            }
        }
        pending
    }

    fn client_datagram(&mut self, from: SocketAddr, datagram: &[u8]) -> Option<Unresolved> {
        let counters = &self.shared.counters;
        match self.association.admit_client(from) {
            Ok(Admission::Client) => {}
            Ok(Admission::Unclaimed) => {
                // A local client: the socket that sent must be its user's (every local user
                // shares 127.0.0.1, and anyone can read the association's port in
                // /proc/net/udp). A remote client is known by its address alone.
                if let Some(uid) = self.uid {
                    let refused = match identity::udp_source_uid(from, self.bound) {
                        Ok(Some(owner)) if owner == uid => None,
                        Ok(Some(_)) | Err(_) => Some(DropReason::ForeignOwner),
                        Ok(None) => Some(DropReason::NoSocket),
                    };
                    if let Some(reason) = refused {
                        counters.drop(reason);
                        self.shared
                            .log_refused_source(reason, from, self.user.name());
                        return None;
                    }
                }
                self.association.claim(from);
            }
            Err(reason) => {
                counters.drop(reason);
                return None;
            }
        }
        let parsed = match codec::decode_datagram(datagram) {
            Ok(d) => d,
            Err(_) => {
                counters.drop(DropReason::Malformed);
                return None;
            }
        };
        if parsed.frag != 0 {
            counters.drop(DropReason::Fragmented);
            return None;
        }
        let target = match &parsed.target {
            Address::Ip(addr) => *addr,
            Address::Domain(name, port) => match self.names.get(&(name.clone(), *port)) {
                Some(addr) => *addr,
                None => {
                    return Some(Unresolved {
                        name: name.clone(),
                        port: *port,
                        datagram: datagram.to_vec(),
                    });
                }
            },
        };
        self.forward(target, parsed.payload);
        None
    }

    /// Applies policy and limits to one payload for `target`, and sends it if allowed.
    fn forward(&mut self, target: SocketAddr, payload: &[u8]) {
        let shared = self.shared;
        let policy = shared.policy.load();
        let decision = match self
            .association
            .decide(target, payload, &policy, &self.user)
        {
            Ok(d) => d,
            Err(reason) => {
                shared.counters.drop(reason);
                return;
            }
        };
        if decision.changed {
            let client = self.association.client().unwrap_or(target);
            log_decision(shared, &self.user, client, target, &decision.decision);
            self.live.flow(target, &decision.decision);
        }
        if decision.decision.verdict == Verdict::Block {
            return shared.counters.drop(DropReason::Blocked);
        }
        if !self.take_packet_token(&policy) {
            return shared.counters.drop(DropReason::RateLimit);
        }
        if decision.decision.verdict == Verdict::Relay {
            return self.relay(target, payload, policy.generation);
        }
        let target = super::association::canonical(target);
        let slot = if target.is_ipv4() {
            &mut self.out_v4
        } else {
            &mut self.out_v6
        };
        if slot.is_none() {
            match outbound_socket(target.is_ipv6()) {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    warn!(user = %self.user, error = %e, "cannot open an outbound socket");
                    return shared.counters.drop(DropReason::SendFailed);
                }
            }
        }
        let sent = slot.as_ref().map(|s| send_now(s, payload, target));
        match sent {
            Some(Ok(_)) => {
                shared
                    .counters
                    .datagrams_out
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => shared.counters.drop(DropReason::SendFailed),
        }
    }

    /// Sends through the relay (or holds while a bind opens), or drops: never direct.
    fn relay(&mut self, target: SocketAddr, payload: &[u8], generation: u64) {
        let counters = &self.shared.counters;
        let tunnel = self.shared.config.tunnel.as_ref();
        match self
            .binding
            .send(tunnel, self.user.name(), target, payload, generation)
        {
            Ok(Sent::Now) => {
                counters.relayed_out.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Sent::Held) => {}
            Err(reason) => counters.drop(reason),
        }
    }

    /// Datagrams from relayed peers, `first` and whatever else has already arrived: to the
    /// client, each if its peer is a `relay` flow, a burst of one size in one GSO send.
    fn deliver_relayed(&mut self, first: (SocketAddr, bytes::Bytes)) {
        let shared = self.shared;
        let policy = shared.policy.load();
        let sent = crate::batch::send_batched(&self.client_socket, |batch| {
            let mut sent = crate::batch::Sent::default();
            for (peer, payload) in crate::tunnel::burst(first, self.binding.bind_mut()) {
                match self.association.admit_peer(
                    peer,
                    &payload,
                    Verdict::Relay,
                    &policy,
                    &self.user,
                ) {
                    Ok(client) => {
                        let len = codec::datagram_header_len(peer) + payload.len();
                        sent += batch.push(&self.client_socket, Some(client), len, |out| {
                            codec::encode_datagram_header(out, peer);
                            out.extend_from_slice(&payload);
                        });
                    }
                    Err(reason) => shared.counters.drop(reason),
                }
            }
            sent
        });
        let c = &shared.counters;
        c.relayed_in.fetch_add(sent.ok, Ordering::Relaxed);
        c.drop_n(DropReason::SendFailed, sent.failed);
    }

    /// Asks for a bind if the association has none (see [`Binding::open`]).
    fn open_bind(&mut self) {
        self.binding
            .open(self.shared.config.tunnel.as_ref(), self.user.name());
    }

    /// Delivers, counts and logs what happened to the association's bind.
    fn on_bind_event(&mut self, client: SocketAddr, event: BindEvent) {
        match event {
            BindEvent::Datagram(first) => self.deliver_relayed(first),
            other => other.record(&self.shared.counters, &self.user, client),
        }
    }

    fn take_packet_token(&self, policy: &PolicyVersion) -> bool {
        self.shared.take_packet_token(&self.user, policy)
    }

    /// Handles datagrams waiting on an outbound socket: replies from targets.
    fn drain_peers(&mut self, v6: bool) {
        let shared = self.shared;
        crate::with_buffer(|buf| {
            for _ in 0..BATCH {
                let socket = if v6 {
                    self.out_v6.as_ref()
                } else {
                    self.out_v4.as_ref()
                };
                let Some(socket) = socket else { return };
                let Some(space) = buf.get_mut(HEADROOM..) else {
                    return;
                };
                let (n, from) = match socket.try_recv_from(space) {
                    Ok(received) => received,
                    Err(_) => return,
                };
                let policy = shared.policy.load();
                let client = match self.association.admit_peer(
                    from,
                    &[],
                    Verdict::Direct,
                    &policy,
                    &self.user,
                ) {
                    Ok(client) => client,
                    Err(reason) => {
                        shared.counters.drop(reason);
                        continue;
                    }
                };
                let from = super::association::canonical(from);
                let start = HEADROOM - codec::datagram_header_len(from);
                let mut header = Vec::with_capacity(HEADROOM);
                codec::encode_datagram_header(&mut header, from);
                let Some(out) = buf.get_mut(start..HEADROOM + n) else {
                    continue;
                };
                if let Some(head) = out.get_mut(..header.len()) {
                    head.copy_from_slice(&header);
                }
                match send_now(&self.client_socket, out, client) {
                    Ok(_) => {
                        shared.counters.datagrams_in.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => shared.counters.drop(DropReason::SendFailed),
                }
            }
        });
    }

    async fn resolve_and_forward(&mut self, pending: Unresolved) {
        let key = (pending.name, pending.port);
        let resolved = if self.names.len() >= self.max_names {
            None
        } else {
            resolve(&Address::Domain(key.0.clone(), key.1)).await
        };
        let Some(addr) = resolved else {
            self.shared.counters.drop(DropReason::Unresolved);
            return;
        };
        self.names.insert(key, addr);
        if let Ok(parsed) = codec::decode_datagram(&pending.datagram) {
            self.forward(addr, parsed.payload);
        }
    }
}

/// A UDP ASSOCIATE's set-up: its client-facing socket, its relay bind, the reply. Returns the
/// control connection and the association's state.
async fn associate<'a>(
    shared: &'a Shared,
    mut control: TcpStream,
    peer: SocketAddr,
    (user, uid): (User, Option<u32>),
    declared: &Address,
    max_flows: u32,
) -> Result<(TcpStream, Relay<'a>), SessionError> {
    // The UDP socket faces the client, on the address the client reached us at.
    let local = control.local_addr()?;
    let client_socket = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => {
            crate::SocketBuffers::PerAssociation.apply(&s);
            s
        }
        Err(_) => return Err(Box::pin(refuse(&mut control, Reply::GeneralFailure)).await),
    };
    let bound = client_socket.local_addr()?;
    // Open the relay bind before answering, so the app's first packets (STUN, usually) find it.
    let mut bind = None;
    if let Some(tunnel) = &shared.config.tunnel
        && tunnel.state() == TunnelState::Connected
    {
        match Box::pin(tokio::time::timeout(
            crate::binding::OPEN_TIMEOUT,
            tunnel.open_bind(user.name(), None),
        ))
        .await
        {
            Ok(Ok(b)) => bind = Some(b),
            Ok(Err(e)) => {
                warn!(user = %user, error = %e, "relay bind failed; relayed traffic is dropped")
            }
            Err(_) => warn!(user = %user, "relay bind timed out; relayed traffic is dropped"),
        }
    }
    Box::pin(control.write_all(&codec::encode_reply(Reply::Succeeded, bound))).await?;
    {
        let public = bind.as_ref().map(|b| b.public_address().to_string());
        info!(user = %user, client = %peer, udp = %bound, declared = %declared, relay_public = public.as_deref().unwrap_or("none"), "udp association open");
    }

    let live = shared.registry.open(user.name(), peer, "socks5");
    let mut association = Association::new(peer.ip(), max_flows);
    association.declare_port(match declared {
        Address::Ip(a) => a.port(),
        Address::Domain(_, port) => *port,
    });
    let relay = Relay {
        shared,
        user,
        uid,
        bound,
        association,
        client_socket: Arc::new(client_socket),
        out_v4: None,
        out_v6: None,
        names: HashMap::new(),
        max_names: usize::try_from(max_flows).unwrap_or(usize::MAX),
        v6: bound.is_ipv6(),
        live,
        binding: Binding::new(bind, None),
        turn: 0,
    };
    Ok((control, relay))
}

/// An answered UDP ASSOCIATE: what its loop needs, and nothing of its set-up.
struct UdpSession<'a> {
    control: TcpStream,
    peer: SocketAddr,
    relay: Relay<'a>,
    shutdown: CancellationToken,
    /// The session's place in its user's count (and its packet-rate bucket): held until the
    /// loop ends.
    slot: SessionSlot<'a>,
}

impl<'a> UdpSession<'a> {
    /// Runs the association until its control connection ends or `shutdown`. (An `async
    /// move` block rather than an `async fn`, which would keep `self` twice in the session's
    /// future: rust-lang/rust#62958.)
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = Result<(), SessionError>> + 'a {
        async move {
            self.relay.open_bind();
            loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break,
                    r = std::future::poll_fn(|cx| poll_ready(cx, &mut self.relay.turn, &self.control, &self.relay.client_socket, [self.relay.out_v4.as_ref(), self.relay.out_v6.as_ref()])) => match r? {
                        // RFC 1928 §7: the association ends when its TCP connection does.
                        Ready::Control => match self.control.try_read(&mut [0u8; 64]) {
                            Ok(0) => break,
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => break,
                            _ => {}
                        },
                        Ready::Client => {
                            for pending in self.relay.drain_client() {
                                Box::pin(self.relay.resolve_and_forward(pending)).await;
                            }
                        }
                        Ready::Peers { v6 } => self.relay.drain_peers(v6),
                    },
                    event = self.relay.binding.event(&self.relay.shared.policy) => self.relay.on_bind_event(self.peer, event),
                }
                self.relay.open_bind();
            }
            info!(user = %self.relay.user, client = %self.peer, flows = self.relay.association.flow_count(), "udp association closed");
            // Named so the loop's future owns it: an `async move` block captures only the
            // fields of `self` it uses.
            drop(self.slot);
            Ok(())
        }
    }
}
