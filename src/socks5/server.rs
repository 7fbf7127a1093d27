//! The tokio shell of the SOCKS5 server: accept loop, one task per client, UDP relaying.
//!
//! All decisions are made by the sans-IO parts ([`codec`], [`Association`], [`Policy`]); this
//! module only moves bytes between sockets and does what they say. Shutdown: a cancellation token
//! stops the accept loop and every session, then [`Server::run`] waits for the tasks to finish.

use super::codec::{self, Address, Command, Method, Reply};
use super::passwords::PasswordFile;
use crate::batch::Sent;
use crate::identity;
use crate::policy::{Target, User, Verdict};
use crate::rate::TokenBucket;
use crate::sidecar::association::{Admission, Association};
use crate::sidecar::binding::Binding;
use crate::sidecar::pipeline::{BATCH, Front, Pipeline, Return};
use crate::sidecar::state::{DropReason, Handle, SessionSlot, Shared};
use crate::tunnel::{self, OpenError, TunnelState};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
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

/// What every SOCKS5 session shares: the server's configuration, the sidecar's state, and
/// each owner's count of connections.
#[derive(Debug)]
struct Socks5 {
    config: Config,
    state: Handle,
    /// Open connections by owner (a local uid, or a remote client's IP), whatever their stage:
    /// no owner may hold more than [`Socks5::per_owner`] of the server's slots.
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
    shared: Arc<Socks5>,
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

impl Socks5 {
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
}

/// A bound SOCKS5 server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Socks5>,
}

impl Server {
    /// Binds the listener, serving the sidecar whose state `state` is. Fails if the
    /// configuration would expose an unauthenticated proxy.
    pub async fn bind(config: Config, state: Handle) -> Result<Self, Error> {
        if config.passwords.is_none() && !config.listen.ip().to_canonical().is_loopback() {
            return Err(Error::Unauthenticated(config.listen));
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Listen(config.listen, e))?;
        let shared = Arc::new(Socks5 {
            config,
            state,
            owners: Mutex::new(HashMap::new()),
        });
        Ok(Self { listener, shared })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
    server: &Socks5,
    stream: &mut TcpStream,
    peer: SocketAddr,
    uid: Option<u32>,
) -> Result<(User, Option<u32>, codec::Request), SessionError> {
    let mut buf = Vec::with_capacity(64);
    let methods = read_message(stream, &mut buf, codec::decode_greeting).await?;
    let wanted = if server.config.passwords.is_some() {
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
    if let Some(passwords) = &server.config.passwords {
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

/// A session's set-up: handshake, login and request. A CONNECT runs to its end here; a UDP
/// ASSOCIATE that was answered is returned, to run without the set-up's state.
async fn serve<'a>(
    server: &'a Socks5,
    mut stream: TcpStream,
    peer: SocketAddr,
    uid: Option<u32>,
    shutdown: CancellationToken,
) -> Result<Option<UdpSession<'a>>, SessionError> {
    let _ = stream.set_nodelay(true);
    let handshake = handshake(server, &mut stream, peer, uid);
    let (user, uid, request) = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        r = Box::pin(tokio::time::timeout(server.config.handshake_timeout, handshake)) => {
            r.map_err(|_| SessionError::Timeout)??
        }
    };
    let limits = server.state.shared.policy.load().policy.limits(&user);
    let Some(slot) = server
        .state
        .shared
        .take_session_slot(&user, limits.max_associations)
    else {
        info!(user = %user, client = %peer, limit = limits.max_associations, "session refused: too many sessions");
        return Err(Box::pin(refuse(&mut stream, Reply::NotAllowed)).await);
    };
    server
        .state
        .counters()
        .sessions
        .fetch_add(1, Ordering::Relaxed);
    match request.command {
        Command::Connect => {
            Box::pin(connect(
                server,
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
            let (control, client, pipeline) = associate(
                server,
                stream,
                peer,
                (user, uid),
                &request.address,
                limits.max_flows_per_association,
            )
            .await?;
            Ok(Some(UdpSession {
                shared: &server.state.shared,
                control,
                peer,
                client,
                pipeline,
                shutdown,
                slot,
                turn: 0,
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
    server: &Socks5,
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
    let decision = server
        .state
        .shared
        .policy
        .load()
        .policy
        .decide(user, &Target::tcp(target));
    server
        .state
        .shared
        .log_decision(user, peer, target, &decision);
    match decision.verdict {
        Verdict::Block => return Err(refuse(&mut stream, Reply::NotAllowed).await),
        Verdict::Relay => return connect_relayed(server, stream, user, target, shutdown).await,
        Verdict::Direct => {}
    }
    let outbound =
        match tokio::time::timeout(server.config.connect_timeout, TcpStream::connect(target)).await
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
    server: &Socks5,
    mut stream: TcpStream,
    user: &User,
    target: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    let Some(tunnel) = server.state.tunnel() else {
        server.state.counters().drop(DropReason::RelayUnavailable);
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
                    server.state.counters().drop(DropReason::RelayUnavailable);
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

/// The association's socket facing the client, and what the SOCKS5 UDP header needs.
struct ClientSide {
    socket: UdpSocket,
    /// The socket is IPv6.
    v6: bool,
    /// The socket's address (the association's).
    bound: SocketAddr,
    /// The control connection's uid, for a local client: its datagrams must come from a socket
    /// of this uid.
    uid: Option<u32>,
    /// Domain targets resolved once for the life of the association.
    names: HashMap<(String, u16), SocketAddr>,
    max_names: usize,
}

/// Datagrams from peers reach the client with a SOCKS5 UDP header naming the peer.
impl Front for ClientSide {
    fn deliver(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> Sent) -> Sent,
    ) -> Sent {
        crate::batch::send_batched(&self.socket, |batch| {
            fill(&mut |peer, client, payload| {
                let len = codec::datagram_header_len(peer) + payload.len();
                batch.push(&self.socket, Some(client), len, |out| {
                    codec::encode_datagram_header(out, peer);
                    out.extend_from_slice(payload);
                })
            })
        })
    }
}

/// A datagram to a domain target whose name must be resolved first.
struct Unresolved {
    name: String,
    port: u16,
    datagram: Vec<u8>,
}

impl ClientSide {
    /// Handles datagrams waiting on the client socket, a burst per `recvmmsg`, handing each to
    /// `pipeline`. Returns those that need a name resolved first.
    fn drain(&self, shared: &Shared, pipeline: &mut Pipeline<'_>) -> Vec<Unresolved> {
        let mut pending = Vec::new();
        for _ in 0..BATCH / 16 {
            let received = crate::batch::recv_burst(&self.socket, self.v6, |from, slot, n| {
                let datagram = slot
                    .get(crate::HEADROOM..crate::HEADROOM + n)
                    .unwrap_or_default();
                pending.extend(self.datagram(shared, pipeline, from, datagram));
            });
            if received.is_err() {
                break;
            }
        }
        pending
    }

    /// One datagram from the client side: admitted (the client's, or claimed for it), its
    /// header parsed, its target resolved from the table or left for [`ClientSide::resolve`].
    fn datagram(
        &self,
        shared: &Shared,
        pipeline: &mut Pipeline<'_>,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Option<Unresolved> {
        let counters = &shared.counters;
        match pipeline.association().admit_client(from) {
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
                        shared.log_refused_source(reason, from, pipeline.user().name());
                        return None;
                    }
                }
                pipeline.association().claim(from);
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
        pipeline.send(target, parsed.payload);
        None
    }

    /// Resolves a datagram's domain target (once per association, up to its flow limit) and
    /// hands it to `pipeline`.
    async fn resolve(&mut self, shared: &Shared, pipeline: &mut Pipeline<'_>, pending: Unresolved) {
        let key = (pending.name, pending.port);
        let resolved = if self.names.len() >= self.max_names {
            None
        } else {
            resolve(&Address::Domain(key.0.clone(), key.1)).await
        };
        let Some(addr) = resolved else {
            shared.counters.drop(DropReason::Unresolved);
            return;
        };
        self.names.insert(key, addr);
        if let Ok(parsed) = codec::decode_datagram(&pending.datagram) {
            pipeline.send(addr, parsed.payload);
        }
    }
}

/// What woke an association up.
enum Ready {
    /// The SOCKS5 control connection (data or its end).
    Control,
    /// The UDP socket facing the client.
    Client,
    /// The pipeline's return path.
    Return(Return),
}

/// Waits for the control connection, the client socket or the pipeline's return path, without
/// a future per socket (memory per idle association). Starts from a different one each time
/// (`turn`), so a flooded one cannot starve the others.
fn poll_ready(
    cx: &mut Context<'_>,
    turn: &mut usize,
    control: &TcpStream,
    client: &UdpSocket,
    pipeline: &mut Pipeline<'_>,
) -> Poll<io::Result<Ready>> {
    *turn = turn.wrapping_add(1);
    for i in 0..3 {
        let ready = match (*turn + i) % 3 {
            0 => control.poll_read_ready(cx).map_ok(|()| Ready::Control),
            1 => client.poll_recv_ready(cx).map_ok(|()| Ready::Client),
            _ => pipeline.poll_return(cx).map(|r| Ok(Ready::Return(r))),
        };
        if ready.is_ready() {
            return ready;
        }
    }
    Poll::Pending
}

/// A UDP ASSOCIATE's set-up: its client-facing socket, its relay bind, the reply. Returns the
/// control connection, the client side and the association's pipeline.
async fn associate<'a>(
    server: &'a Socks5,
    mut control: TcpStream,
    peer: SocketAddr,
    (user, uid): (User, Option<u32>),
    declared: &Address,
    max_flows: u32,
) -> Result<(TcpStream, ClientSide, Pipeline<'a>), SessionError> {
    let shared: &Shared = &server.state.shared;
    // The UDP socket faces the client, on the address the client reached us at.
    let local = control.local_addr()?;
    let socket = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => {
            crate::SocketBuffers::PerAssociation.apply(&s);
            s
        }
        Err(_) => return Err(Box::pin(refuse(&mut control, Reply::GeneralFailure)).await),
    };
    let bound = socket.local_addr()?;
    // Open the relay bind before answering, so the app's first packets (STUN, usually) find it.
    let mut bind = None;
    if let Some(tunnel) = server.state.tunnel()
        && tunnel.state() == TunnelState::Connected
    {
        match Box::pin(tokio::time::timeout(
            crate::sidecar::binding::OPEN_TIMEOUT,
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
    let client = ClientSide {
        v6: bound.is_ipv6(),
        socket,
        bound,
        uid,
        names: HashMap::new(),
        max_names: usize::try_from(max_flows).unwrap_or(usize::MAX),
    };
    let pipeline = Pipeline::new(shared, user, association, Binding::new(bind, None), live);
    Ok((control, client, pipeline))
}

/// An answered UDP ASSOCIATE: what its loop needs, and nothing of its set-up.
struct UdpSession<'a> {
    shared: &'a Shared,
    control: TcpStream,
    peer: SocketAddr,
    client: ClientSide,
    pipeline: Pipeline<'a>,
    shutdown: CancellationToken,
    /// The session's place in its user's count (and its packet-rate bucket): held until the
    /// loop ends.
    slot: SessionSlot<'a>,
    /// Which source [`poll_ready`] looks at first.
    turn: usize,
}

impl<'a> UdpSession<'a> {
    /// Runs the association until its control connection ends or `shutdown`. (An `async
    /// move` block rather than an `async fn`, which would keep `self` twice in the session's
    /// future: rust-lang/rust#62958.)
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = Result<(), SessionError>> + 'a {
        async move {
            self.pipeline.open_bind();
            loop {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break,
                    r = std::future::poll_fn(|cx| poll_ready(cx, &mut self.turn, &self.control, &self.client.socket, &mut self.pipeline)) => match r? {
                        // RFC 1928 §7: the association ends when its TCP connection does.
                        Ready::Control => match self.control.try_read(&mut [0u8; 64]) {
                            Ok(0) => break,
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => break,
                            _ => {}
                        },
                        Ready::Client => {
                            for pending in self.client.drain(self.shared, &mut self.pipeline) {
                                Box::pin(self.client.resolve(self.shared, &mut self.pipeline, pending)).await;
                            }
                        }
                        Ready::Return(returned) => {
                            self.pipeline.deliver(returned, &self.client, self.peer);
                        }
                    },
                }
                self.pipeline.open_bind();
            }
            info!(user = %self.pipeline.user(), client = %self.peer, flows = self.pipeline.flow_count(), "udp association closed");
            // Named so the loop's future owns it: an `async move` block captures only the
            // fields of `self` it uses.
            drop(self.slot);
            Ok(())
        }
    }
}
