//! One SOCKS5 session's set-up: greeting, login (RFC 1929) and request, each message read
//! through the sans-IO codec, every failure answered with its exact reply code.

use super::codec::{self, Address, Method, Reply};
use super::shared::Socks5;
use crate::identity;
use crate::policy::User;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

/// Why a session ended early (logged at debug level; the client got its reply already).
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
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
pub(super) fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

pub(super) async fn refuse(stream: &mut TcpStream, reply: Reply) -> SessionError {
    let bound = unspecified_like(stream.local_addr().unwrap_or(SocketAddr::from(([0; 4], 0))));
    let _ = stream.write_all(&codec::encode_reply(reply, bound)).await;
    let _ = stream.shutdown().await;
    SessionError::Refused(reply.byte())
}

/// Greeting, login and request; returns who the client is and what it asked for.
pub(super) async fn handshake(
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

/// Resolves a target once; the policy judges, and the connection uses, that one address.
pub(super) async fn resolve(address: &Address) -> Option<SocketAddr> {
    match address {
        Address::Ip(addr) => Some(*addr),
        Address::Domain(name, port) => tokio::net::lookup_host((name.as_str(), *port))
            .await
            .ok()?
            .next(),
    }
}
