//! A SOCKS5 UDP ASSOCIATE (RFC 1928 §7): the front-end of the sidecar's datagram pipeline. It
//! owns the socket facing the client — who may use it, the SOCKS5 UDP header, domain targets —
//! and hands every datagram to the association's [`Pipeline`]; replies reach the client with a
//! header naming their peer. The association ends with its control connection.

use super::codec::{self, Address, Reply};
use super::session::{SessionError, refuse, resolve};
use super::shared::{Hold, Socks5};
use crate::batch::Sent;
use crate::datapath::association::{Admission, Association};
use crate::datapath::binding::Binding;
use crate::datapath::pipeline::{BATCH, Front, Pipeline, Return};
use crate::datapath::state::{DropReason, SessionSlot, Shared};
use crate::identity;
use crate::policy::User;
use crate::tunnel::TunnelState;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The association's socket facing the client, and what the SOCKS5 UDP header needs.
pub(super) struct ClientSide {
    socket: UdpSocket,
    /// The socket is IPv6.
    v6: bool,
    /// The socket's address (the association's).
    bound: SocketAddr,
    /// The control connection's uid, for a local client: its datagrams must come from a socket
    /// of this uid.
    uid: Option<u32>,
    /// Domain targets resolved once for the life of the association.
    names: HashMap<(String, u16), SocketAddr>,
    max_names: usize,
}

/// Datagrams from peers reach the client with a SOCKS5 UDP header naming the peer.
impl Front for ClientSide {
    fn deliver(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> Sent) -> Sent,
    ) -> Sent {
        crate::batch::send_batched(&self.socket, |batch| {
            fill(&mut |peer, client, payload| {
                let len = codec::datagram_header_len(peer) + payload.len();
                batch.push(&self.socket, Some(client), len, |out| {
                    codec::encode_datagram_header(out, peer);
                    out.extend_from_slice(payload);
                })
            })
        })
    }
}

/// A datagram to a domain target whose name must be resolved first.
struct Unresolved {
    name: String,
    port: u16,
    datagram: Vec<u8>,
}

impl ClientSide {
    /// Handles datagrams waiting on the client socket, a burst per `recvmmsg`, handing each to
    /// `pipeline`. Returns those that need a name resolved first.
    fn drain(&self, pipeline: &mut Pipeline<'_>) -> Vec<Unresolved> {
        let mut pending = Vec::new();
        for _ in 0..BATCH / 16 {
            let received = crate::batch::recv_burst(&self.socket, self.v6, |from, slot, n| {
                let datagram = slot
                    .get(crate::HEADROOM..crate::HEADROOM + n)
                    .unwrap_or_default();
                pending.extend(self.datagram(pipeline, from, datagram));
            });
            if received.is_err() {
                break;
            }
        }
        pending
    }

    /// One datagram from the client side: admitted (the client's, or claimed for it), its
    /// header parsed, its target resolved from the table or left for [`ClientSide::resolve`].
    fn datagram(
        &self,
        pipeline: &mut Pipeline<'_>,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Option<Unresolved> {
        let shared = pipeline.shared();
        let counters = &shared.counters;
        match pipeline.association().admit_client(from) {
            Ok(Admission::Client) => {}
            Ok(Admission::Unclaimed) => {
                // A local client: the socket that sent must be its user's (every local user
                // shares 127.0.0.1, and anyone can read the association's port in
                // /proc/net/udp). A remote client is known by its address alone.
                if let Some(uid) = self.uid {
                    let refused = match identity::udp_source_uid(from, self.bound) {
                        Ok(Some(owner)) if owner == uid => None,
                        Ok(Some(_)) | Err(_) => Some(DropReason::ForeignOwner),
                        Ok(None) => Some(DropReason::NoSocket),
                    };
                    if let Some(reason) = refused {
                        counters.drop(reason);
                        shared.log_refused_source(reason, from, pipeline.user().name());
                        return None;
                    }
                }
                pipeline.association().claim(from);
            }
            Err(reason) => {
                counters.drop(reason);
                return None;
            }
        }
        let parsed = match codec::decode_datagram(datagram) {
            Ok(d) => d,
            Err(_) => {
                counters.drop(DropReason::Malformed);
                return None;
            }
        };
        if parsed.frag != 0 {
            counters.drop(DropReason::Fragmented);
            return None;
        }
        let target = match &parsed.target {
            Address::Ip(addr) => *addr,
            Address::Domain(name, port) => match self.names.get(&(name.clone(), *port)) {
                Some(addr) => *addr,
                None => {
                    return Some(Unresolved {
                        name: name.clone(),
                        port: *port,
                        datagram: datagram.to_vec(),
                    });
                }
            },
        };
        pipeline.send(target, parsed.payload);
        None
    }

    /// Resolves each datagram's domain target and hands it to `pipeline`, in order.
    async fn resolve_all(&mut self, pipeline: &mut Pipeline<'_>, pending: Vec<Unresolved>) {
        for datagram in pending {
            self.resolve(pipeline, datagram).await;
        }
    }

    /// Resolves a datagram's domain target (once per association, up to its flow limit) and
    /// hands it to `pipeline`.
    async fn resolve(&mut self, pipeline: &mut Pipeline<'_>, pending: Unresolved) {
        let key = (pending.name, pending.port);
        let resolved = if self.names.len() >= self.max_names {
            None
        } else {
            resolve(&Address::Domain(key.0.clone(), key.1)).await
        };
        let Some(addr) = resolved else {
            pipeline.shared().counters.drop(DropReason::Unresolved);
            return;
        };
        self.names.insert(key, addr);
        if let Ok(parsed) = codec::decode_datagram(&pending.datagram) {
            pipeline.send(addr, parsed.payload);
        }
    }
}

/// What woke an association up.
enum Ready {
    /// The SOCKS5 control connection (data or its end).
    Control,
    /// The UDP socket facing the client.
    Client,
    /// The pipeline's return path.
    Return(Return),
}

/// Waits for the control connection, the client socket or the pipeline's return path, without
/// a future per socket (memory per idle association). Starts from a different one each time
/// (`turn`), so a flooded one cannot starve the others.
fn poll_ready(
    cx: &mut Context<'_>,
    turn: &mut usize,
    control: &TcpStream,
    client: &UdpSocket,
    pipeline: &mut Pipeline<'_>,
) -> Poll<io::Result<Ready>> {
    *turn = turn.wrapping_add(1);
    for i in 0..3 {
        let ready = match (*turn + i) % 3 {
            0 => control.poll_read_ready(cx).map_ok(|()| Ready::Control),
            1 => client.poll_recv_ready(cx).map_ok(|()| Ready::Client),
            _ => pipeline.poll_return(cx).map(|r| Ok(Ready::Return(r))),
        };
        if ready.is_ready() {
            return ready;
        }
    }
    Poll::Pending
}

/// A UDP ASSOCIATE's set-up: its client-facing socket, its relay bind, the reply. Returns the
/// control connection, the client side and the association's pipeline.
pub(super) async fn associate<'a>(
    server: &'a Socks5,
    mut control: TcpStream,
    peer: SocketAddr,
    (user, uid): (User, Option<u32>),
    declared: &Address,
    max_flows: u32,
) -> Result<(TcpStream, ClientSide, Pipeline<'a>), SessionError> {
    let shared: &Shared = &server.state.shared;
    // The UDP socket faces the client, on the address the client reached us at.
    let local = control.local_addr()?;
    let socket = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => {
            crate::SocketBuffers::PerAssociation.apply(&s);
            s
        }
        Err(_) => return Err(Box::pin(refuse(&mut control, Reply::GeneralFailure)).await),
    };
    let bound = socket.local_addr()?;
    // Open the relay bind before answering, so the app's first packets (STUN, usually) find it.
    let mut bind = None;
    if let Some(tunnel) = server.state.tunnel()
        && tunnel.state() == TunnelState::Connected
    {
        match Box::pin(tokio::time::timeout(
            crate::datapath::binding::OPEN_TIMEOUT,
            tunnel.open_bind(user.name(), None),
        ))
        .await
        {
            Ok(Ok(b)) => bind = Some(b),
            Ok(Err(e)) => {
                warn!(user = %user, error = %e, "relay bind failed; relayed traffic is dropped")
            }
            Err(_) => warn!(user = %user, "relay bind timed out; relayed traffic is dropped"),
        }
    }
    Box::pin(control.write_all(&codec::encode_reply(Reply::Succeeded, bound))).await?;
    {
        let public = bind.as_ref().map(|b| b.public_address().to_string());
        info!(user = %user, client = %peer, udp = %bound, declared = %declared, relay_public = public.as_deref().unwrap_or("none"), "udp association open");
    }

    let live = shared.registry.open(user.name(), peer, "socks5");
    let mut association = Association::new(peer.ip(), max_flows);
    association.declare_port(match declared {
        Address::Ip(a) => a.port(),
        Address::Domain(_, port) => *port,
    });
    let client = ClientSide {
        v6: bound.is_ipv6(),
        socket,
        bound,
        uid,
        names: HashMap::new(),
        max_names: usize::try_from(max_flows).unwrap_or(usize::MAX),
    };
    let pipeline = Pipeline::new(shared, user, association, Binding::new(bind, None), live);
    Ok((control, client, pipeline))
}

/// An answered UDP ASSOCIATE: what its loop needs, and nothing of its set-up.
pub(super) struct UdpSession<'a> {
    pub(super) control: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) client: ClientSide,
    pub(super) pipeline: Pipeline<'a>,
    pub(super) shutdown: CancellationToken,
    /// The session's place in its user's count (and its packet-rate bucket): held until the
    /// loop ends.
    pub(super) slot: SessionSlot<'a>,
    /// The client's share of the server: held until the loop ends.
    pub(super) hold: Hold,
    /// Which source [`poll_ready`] looks at first.
    pub(super) turn: usize,
}

impl<'a> UdpSession<'a> {
    /// Runs the association until its control connection ends or `shutdown`. (An `async
    /// move` block rather than an `async fn`, which would keep `self` twice in the session's
    /// future: rust-lang/rust#62958.) Its one long wait is the `select!`: the rare wait for
    /// a name is boxed, so an idle association's future is not sized by it.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run(mut self) -> impl Future<Output = ()> + 'a {
        async move {
            self.pipeline.open_bind();
            loop {
                let ready = tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => break,
                    r = std::future::poll_fn(|cx| poll_ready(cx, &mut self.turn, &self.control, &self.client.socket, &mut self.pipeline)) => r,
                };
                let pending = match ready {
                    Err(e) => {
                        debug!(client = %self.peer, error = %e, "session ended");
                        break;
                    }
                    // RFC 1928 §7: the association ends when its TCP connection does.
                    Ok(Ready::Control) => match self.control.try_read(&mut [0u8; 64]) {
                        Ok(0) => break,
                        Err(e) if e.kind() != io::ErrorKind::WouldBlock => break,
                        _ => Vec::new(),
                    },
                    Ok(Ready::Client) => self.client.drain(&mut self.pipeline),
                    Ok(Ready::Return(returned)) => {
                        self.pipeline.deliver(returned, &self.client, self.peer);
                        Vec::new()
                    }
                };
                if !pending.is_empty() {
                    Box::pin(self.client.resolve_all(&mut self.pipeline, pending)).await;
                }
                self.pipeline.open_bind();
            }
            info!(user = %self.pipeline.user(), client = %self.peer, flows = self.pipeline.flow_count(), "udp association closed");
            // Named so the loop's future owns them: an `async move` block captures only the
            // fields of `self` it uses.
            drop(self.slot);
            drop(self.hold);
        }
    }
}
