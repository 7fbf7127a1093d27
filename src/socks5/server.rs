//! The SOCKS5 server's accept loop: one task per client, at most `max_clients` at once and an
//! eighth of them per owner (a local uid, or a remote IP before login); shutdown stops the
//! loop and every session, then waits out their grace period.
//!
//! A session ([`super::session`]) is a handshake and one request: CONNECT
//! ([`super::connect`]) or UDP ASSOCIATE ([`super::udp`], the front-end of the sidecar's
//! datagram pipeline). Decisions are the sans-IO parts' ([`super::codec`], the policy, the
//! association); these modules move bytes and do what they say.

pub use super::shared::Config;

use super::codec::{Command, Reply};
use super::connect::connect;
use super::session::{SessionError, handshake, refuse};
use super::shared::{Hold, Owner, Socks5};
use super::udp::{UdpSession, associate};
use crate::datapath::state::Handle;
use crate::identity;
use crate::rate::TokenBucket;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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
            let client = Box::new(Client {
                stream,
                peer,
                uid,
                shutdown: shutdown.clone(),
                hold: Hold {
                    _owner: owner_slot,
                    _permit: permit,
                },
            });
            // The task's future keeps what it captures for its whole life, so it captures two
            // pointers: the set-up runs boxed and is freed when done, and what a UDP
            // association keeps is moved into its loop (memory per idle association).
            tasks.spawn(async move {
                // `session` moves into the loop's future before it is awaited, so the task
                // holds one copy of it, not two.
                let run = match Box::pin(serve(&shared, client)).await {
                    Some(session) => session.run(),
                    None => return,
                };
                run.await;
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

/// An accepted client, with what it holds while its session lasts.
struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    uid: Option<u32>,
    shutdown: CancellationToken,
    hold: Hold,
}

/// A session's set-up: handshake, login and request. A CONNECT runs to its end here; a UDP
/// ASSOCIATE that was answered is returned, to run without the set-up's state. Logs why a
/// session ended early.
async fn serve(server: &Socks5, client: Box<Client>) -> Option<UdpSession<'_>> {
    let peer = client.peer;
    match set_up(server, *client).await {
        Ok(session) => session,
        Err(e) => {
            debug!(client = %peer, error = %e, "session ended");
            None
        }
    }
}

async fn set_up(server: &Socks5, client: Client) -> Result<Option<UdpSession<'_>>, SessionError> {
    let Client {
        mut stream,
        peer,
        uid,
        shutdown,
        hold,
    } = client;
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
                control,
                peer,
                client,
                pipeline,
                shutdown,
                slot,
                hold,
                turn: 0,
            }))
        }
        Command::Bind => Err(Box::pin(refuse(&mut stream, Reply::CommandNotSupported)).await),
    }
}
