//! A classic CONNECT on the relay: a TCP connection to the target, its bytes carried on the
//! request stream both ways.

use super::counters::bump;
use super::request::{H3Stream, Refuse, refuse};
use super::shared::Shared;
use http::{Response, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Connects to `target` for `user`, answers, and pumps until either side ends or `shutdown`.
pub(super) async fn serve_tcp(
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
    let (send, recv) = stream.split();
    crate::pump::pump(tcp, send, recv, shutdown).await;
    info!(user, target = %target, "tcp tunnel closed");
}
