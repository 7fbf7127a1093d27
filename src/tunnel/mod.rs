//! The sidecar's tunnel to the relay: one QUIC connection shared by every user, kept up with
//! keep-alives and reconnected with backoff and jitter; CONNECT-UDP bind requests for UDP
//! associations and classic CONNECT requests for TCP.
//!
//! **Fails closed.** While the connection is down there is no [`Bind`] to send on: callers drop
//! `relay`-verdict packets and count them; nothing here ever sends a packet any other way.
//!
//! The tasks: the connection manager ([`connection`]) keeps one QUIC connection up and runs
//! the task that reads its DATAGRAM frames and queues each on its bind; each bind ([`bind`])
//! has a task that carries its capsules on the request stream. The bind's owner (an app
//! socket's pipeline) sends datagrams itself and takes what the queue holds.

mod bind;
mod connection;
mod tcp;

pub use bind::{Bind, SendError, burst};
pub use tcp::TcpTunnel;

use arc_swap::ArcSwapOption;
use bind::Inbound;
use bytes::Bytes;
use http::StatusCode;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
#[non_exhaustive]
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
    /// The request's stream, or the connection under it, failed (h3's errors are neither
    /// `Clone` nor `PartialEq`: kept as their text).
    #[error("request failed: {0}")]
    Stream(String),
    /// The relay did not answer in time.
    #[error("no {0} from the relay in time")]
    Timeout(Awaited),
    /// The relay answered but broke the bind protocol.
    #[error("the relay broke the bind protocol: {0}")]
    Protocol(BindProtocolError),
    /// The request's task ended before it had an answer.
    #[error("the request was abandoned")]
    Abandoned,
}

/// What a request waited for when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// The response to a request.
    Response,
    /// The acknowledgement of a bind's uncompressed context.
    ContextAck,
    /// A whole bind request, response and acknowledgement.
    Bind,
}

impl std::fmt::Display for Awaited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Response => "response",
            Self::ContextAck => "acknowledgement of the uncompressed context",
            Self::Bind => "bind",
        })
    }
}

/// How a relay's answer to a bind request broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindProtocolError {
    /// A 2xx without `connect-udp-bind: ?1`.
    #[error("it did not grant connect-udp-bind")]
    NotGranted,
    /// A 2xx without a usable `proxy-public-address`.
    #[error("it sent no proxy-public-address")]
    NoPublicAddress,
    /// The stream ended before the uncompressed context was acknowledged.
    #[error("the bind closed before its context was acknowledged")]
    ClosedBeforeAck,
    /// A capsule the bind's contexts cannot take.
    #[error("{0}")]
    Capsule(String),
}

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

    fn live(&self) -> Result<Arc<Live>, OpenError> {
        self.live.load_full().ok_or(OpenError::NotConnected)
    }
}

impl Live {
    /// A request that failed because the connection itself is gone (a relay that refuses our
    /// certificate closes it just after our side thought the handshake done) is
    /// `NotConnected`, not a failure of that request.
    fn explain(&self, e: OpenError) -> OpenError {
        match e {
            OpenError::Stream(_) if self.conn.close_reason().is_some() => OpenError::NotConnected,
            e => e,
        }
    }
}

async fn response(stream: &mut ClientStream) -> Result<http::Response<()>, OpenError> {
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.recv_response())
        .await
        .map_err(|_| OpenError::Timeout(Awaited::Response))?
        .map_err(|e| OpenError::Stream(e.to_string()))?;
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
