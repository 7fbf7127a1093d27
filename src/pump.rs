//! One TCP pump for both ends of a classic CONNECT: bytes between a TCP connection and an
//! HTTP/3 request stream, each way until its end, half-closing the other side.

use bytes::{Buf, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// The sending half of a request stream (client or server side).
pub(crate) trait Outgoing {
    /// Sends `data`; false if the stream is gone.
    fn send(&mut self, data: Bytes) -> impl Future<Output = bool>;
    /// Ends the stream.
    fn finish(&mut self) -> impl Future<Output = ()>;
}

/// The receiving half of a request stream (client or server side).
pub(crate) trait Incoming {
    /// The next chunk; None at the end of the stream or on an error.
    fn recv(&mut self) -> impl Future<Output = Option<impl Buf>>;
}

macro_rules! halves {
    ($stream:ident) => {
        impl<S: h3::quic::SendStream<Bytes>> Outgoing for h3::$stream::RequestStream<S, Bytes> {
            async fn send(&mut self, data: Bytes) -> bool {
                self.send_data(data).await.is_ok()
            }

            async fn finish(&mut self) {
                let _ = h3::$stream::RequestStream::finish(self).await;
            }
        }

        impl<S: h3::quic::RecvStream> Incoming for h3::$stream::RequestStream<S, Bytes> {
            async fn recv(&mut self) -> Option<impl Buf> {
                self.recv_data().await.ok().flatten()
            }
        }
    };
}

halves!(client);
halves!(server);

/// Pumps bytes between `tcp` and the request stream's halves until both directions end or
/// `shutdown`.
pub(crate) async fn pump(
    tcp: TcpStream,
    mut send: impl Outgoing,
    mut recv: impl Incoming,
    shutdown: CancellationToken,
) {
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tcp_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if !send.send(chunk).await {
                        return;
                    }
                }
            }
        }
        send.finish().await;
    };
    let down = async {
        while let Some(mut data) = recv.recv().await {
            if tcp_write.write_all_buf(&mut data).await.is_err() {
                return;
            }
        }
        let _ = tcp_write.shutdown().await;
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}
