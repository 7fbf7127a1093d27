//! A classic CONNECT (TCP) request through the tunnel.

use super::{ClientStream, OpenError, Tunnel, response};
use crate::masque::request::HEADER_USER;
use http::Method;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

impl Tunnel {
    /// Opens a classic CONNECT (TCP) request to `target` for `user`.
    pub async fn open_tcp(&self, user: &str, target: SocketAddr) -> Result<TcpTunnel, OpenError> {
        let live = self.live()?;
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(HEADER_USER, user)
            .body(())
            .map_err(|e| OpenError::Stream(e.to_string()))?;
        let mut requests = live.requests.clone();
        let result = match requests.send_request(req).await {
            Ok(mut stream) => response(&mut stream).await.map(|_| TcpTunnel { stream }),
            Err(e) => Err(OpenError::Stream(e.to_string())),
        };
        result.map_err(|e| live.explain(e))
    }
}

/// A classic CONNECT tunnel through the relay.
pub struct TcpTunnel {
    stream: ClientStream,
}

impl TcpTunnel {
    /// Pumps bytes between `tcp` and the tunnel until either side ends or `shutdown`.
    pub async fn pump(self, tcp: tokio::net::TcpStream, shutdown: CancellationToken) {
        let (send, recv) = self.stream.split();
        crate::pump::pump(tcp, send, recv, shutdown).await;
    }
}
