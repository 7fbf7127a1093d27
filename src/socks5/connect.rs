//! A SOCKS5 CONNECT: its target decided by the policy like any flow; `direct` connects from
//! the host, `relay` goes as a classic CONNECT through the tunnel (never direct), `block` is
//! refused.

use super::codec::{self, Address, Reply};
use super::session::{SessionError, refuse, resolve, unspecified_like};
use super::shared::Socks5;
use crate::datapath::state::DropReason;
use crate::policy::{Target, User, Verdict};
use crate::tunnel::{self, OpenError};
use std::io;
use std::net::SocketAddr;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

fn connect_error_reply(e: &io::Error) -> Reply {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Reply::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable => Reply::NetworkUnreachable,
        io::ErrorKind::HostUnreachable => Reply::HostUnreachable,
        io::ErrorKind::TimedOut => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

pub(super) async fn connect(
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
