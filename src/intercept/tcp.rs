//! TCP of a confined view. The kernel terminates each connection (TPROXY in prerouting, so no
//! user-space TCP stack); veil carries it as the user's policy says, like a SOCKS5 CONNECT:
//! `relay` → a CONNECT through the tunnel (the far end sees the relay's address), `direct` →
//! a connection from the host, `block` → reset. A connection to the view's resolver goes to
//! its upstream (DNS over TCP), decided the same way.

use super::Error;
use crate::confine::Resolver;
use crate::datapath::state::{DropReason, Handle, Shared};
use crate::identity;
use crate::policy::{Target, User, Verdict};
use nix::sys::socket::{setsockopt, sockopt};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// How long a direct connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A transparent TCP listener on `addr`.
fn listener(addr: SocketAddr) -> Result<TcpListener, Error> {
    let fail = |e: io::Error| Error::Socket(addr, e);
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(fail)?;
    s.set_reuse_address(true).map_err(fail)?;
    setsockopt(&s, sockopt::IpTransparent, &true).map_err(|e| fail(e.into()))?;
    if addr.is_ipv6() {
        s.set_only_v6(true).map_err(fail)?;
    }
    s.set_nonblocking(true).map_err(fail)?;
    s.bind(&addr.into()).map_err(fail)?;
    s.listen(1024).map_err(fail)?;
    TcpListener::from_std(s.into()).map_err(fail)
}

/// Serves the TCP of the view of user `uid` on `port` of 127.0.0.1 and ::1 until `shutdown`.
pub async fn run(
    handle: Handle,
    port: u16,
    uid: u32,
    resolver: Resolver,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (v4, v6) = super::loopback_pair(port, listener)?;
    info!(port, "confined TCP ready");
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = v4.accept() => r,
            r = async { match &v6 { Some(l) => l.accept().await, None => std::future::pending().await } } => r,
        };
        let (stream, app) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "confined TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handle, token) = (handle.clone(), shutdown.clone());
        tokio::spawn(async move {
            let Ok(user) = identity::user_of_uid(uid) else {
                reset(stream);
                return;
            };
            connection(&handle.shared, stream, app, &user, resolver, token).await;
        });
    }
    Ok(())
}

/// Closes `stream` with a reset, as a refused connection looks to the app.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// One connection from the app at `app`: decided, then carried or reset.
async fn connection(
    shared: &Shared,
    stream: TcpStream,
    app: SocketAddr,
    user: &User,
    resolver: Resolver,
    shutdown: CancellationToken,
) {
    // The kernel kept the app's destination as the accepted socket's own address.
    let Ok(original) = stream.local_addr() else {
        return reset(stream);
    };
    let original = SocketAddr::new(original.ip().to_canonical(), original.port());
    let Some(target) = resolver.outbound(original) else {
        shared.counters.drop(DropReason::Unresolved);
        return reset(stream);
    };
    let policy = shared.policy.load();
    let limits = policy.policy.limits(user);
    let Some(_slot) = shared.take_session_slot(user, limits.max_associations) else {
        info!(user = %user, client = %app, "confined connection refused: too many sessions");
        return reset(stream);
    };
    let decision = policy.policy.decide(user, &Target::tcp(target));
    drop(policy);
    shared.log_decision(user, app, target, &decision);
    let _ = stream.set_nodelay(true);
    match decision.verdict {
        Verdict::Block => {
            shared.counters.drop(DropReason::Blocked);
            reset(stream);
        }
        Verdict::Relay => {
            let Some(tunnel) = shared.tunnel.as_ref() else {
                shared.counters.drop(DropReason::RelayUnavailable);
                return reset(stream);
            };
            match tunnel.open_tcp(user.name(), target).await {
                Ok(t) => t.pump(stream, shutdown).await,
                Err(e) => {
                    info!(user = %user, target = %target, error = %e, "relayed connection failed");
                    reset(stream);
                }
            }
        }
        Verdict::Direct => {
            let mut outbound = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                TcpStream::connect(target),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    info!(user = %user, target = %target, error = %e, "direct connection failed");
                    return reset(stream);
                }
                Err(_) => return reset(stream),
            };
            let _ = outbound.set_nodelay(true);
            let mut stream = stream;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = tokio::io::copy_bidirectional(&mut stream, &mut outbound) => {
                    if let Err(e) = r {
                        debug!(user = %user, target = %target, error = %e, "direct connection ended");
                    }
                }
            }
        }
    }
}
