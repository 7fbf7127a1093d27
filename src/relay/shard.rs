//! The relay's QUIC port, served by shards: each has its own socket (`SO_REUSEPORT`), thread,
//! single-threaded runtime and QUIC endpoint, and the kernel steers each packet to the shard
//! that owns its connection (see [`crate::reuseport`]). Also the thread that follows the
//! host's own addresses, which the relay never sends to.

use super::config::RelayConfig;
use super::connection::serve_connection;
use super::counters::RelayCounters;
use super::egress::Egress;
use super::shared::Shared;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// Why the relay cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QUIC endpoint could not be bound.
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, io::Error),
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
        let shared = Arc::new(Shared::new(config, egress));
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
