//! veil's shape with nothing of veil in it: a UDP socket → one quinn DATAGRAM connection → a UDP
//! socket to the echo, each end on its own runtime thread (as the sidecar and the relay are two
//! single-threaded processes), with veil's QUIC settings. No SOCKS5 header, no MASQUE framing,
//! no policy, no association table, no batching: plain tokio sockets, one datagram per system
//! call. What this path costs, any proxy of veil's shape on this machine pays; what veil costs
//! beyond it is veil's own.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

/// The names of the two ends' runtime threads, to measure their CPU time apart.
pub(crate) const SIDE_THREAD: &str = "shapeside";
pub(crate) const RELAY_THREAD: &str = "shaperelay";

pub(crate) struct Shape {
    _side: tokio::runtime::Runtime,
    _relay: tokio::runtime::Runtime,
    /// The app's socket, connected to the sidecar end's UDP socket.
    pub(crate) app: UdpSocket,
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A tokio UDP socket on `bind` with veil's buffer sizes (512 KiB).
fn udp(bind: &str) -> tokio::net::UdpSocket {
    let socket = UdpSocket::bind(bind).expect("bind");
    let s = socket2::SockRef::from(&socket);
    s.set_recv_buffer_size(512 << 10).expect("rcvbuf");
    s.set_send_buffer_size(512 << 10).expect("sndbuf");
    socket.set_nonblocking(true).expect("nonblocking");
    tokio::net::UdpSocket::from_std(socket).expect("tokio socket")
}

impl Shape {
    pub(crate) fn start(echo: SocketAddr) -> Self {
        let (server_cfg, client_cfg) = crate::quinn_configs();
        let relay = runtime(RELAY_THREAD);
        let relay_addr = relay.block_on(async move {
            let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr"))
                .expect("endpoint");
            let addr = server.local_addr().expect("addr");
            tokio::spawn(async move {
                let Some(incoming) = server.accept().await else {
                    return;
                };
                let Ok(conn) = incoming.await else {
                    return;
                };
                let out = Arc::new(udp("127.0.0.1:0"));
                if out.connect(echo).await.is_err() {
                    return;
                }
                let (up_conn, up_out) = (conn.clone(), out.clone());
                tokio::spawn(async move {
                    while let Ok(d) = up_conn.read_datagram().await {
                        let _ = up_out.send(&d).await;
                    }
                });
                let mut buf = vec![0u8; 2048];
                while let Ok(n) = out.recv(&mut buf).await {
                    let _ = conn.send_datagram(Bytes::copy_from_slice(&buf[..n]));
                }
            });
            addr
        });
        let side = runtime(SIDE_THREAD);
        let side_addr = side.block_on(async move {
            let mut client =
                quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
            client.set_default_client_config(client_cfg);
            let conn = client
                .connect(relay_addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            let app_side = Arc::new(udp("127.0.0.1:0"));
            let addr = app_side.local_addr().expect("addr");
            let app: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
            let (down_conn, down_side, down_app) = (conn.clone(), app_side.clone(), app.clone());
            tokio::spawn(async move {
                let _endpoint = client;
                while let Ok(d) = down_conn.read_datagram().await {
                    let to = *down_app.lock().expect("lock");
                    if let Some(to) = to {
                        let _ = down_side.send_to(&d, to).await;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = app_side.recv_from(&mut buf).await {
                    *app.lock().expect("lock") = Some(from);
                    let _ = conn.send_datagram(Bytes::copy_from_slice(&buf[..n]));
                }
            });
            addr
        });
        let app = crate::bench_socket("127.0.0.1:0");
        app.connect(side_addr).expect("connect");
        app.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self {
            _side: side,
            _relay: relay,
            app,
        }
    }
}

impl crate::Path2 for Shape {
    fn send(&self, payload: &[u8]) {
        let _ = self.app.send(payload);
    }
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        self.app.recv(buf).ok()
    }
}
