//! Transparent interception of unmodified apps: the TPROXY listener and one task per app socket.
//!
//! The kernel ([`crate::firewall`]) delivers every UDP datagram of a managed user to veil's
//! transparent sockets on 127.0.0.1 / ::1, with the original destination in an
//! `IP(V6)_ORIGDSTADDR` control message. Each app socket (source address and port) becomes one
//! task that owns one relay bind — one public address for all its peers, as ICE needs — and
//! decides each destination with the same policy and [`Association`] state machine as SOCKS5.
//! Replies reach the app from a transparent socket bound to the peer's address, so the app sees
//! its peer, never veil.

pub mod tcp;

use crate::batch::Sent;
use crate::confine::Resolver;
use crate::datapath::association::Association;
use crate::datapath::binding::Binding;
use crate::datapath::pipeline::{Delivered, Front, Pipeline};
use crate::datapath::state::{DropReason, Handle, Shared};
use crate::identity;
use crate::policy::User;
use bytes::Bytes;
use nix::sys::socket::{setsockopt, sockopt};
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long an app socket may be silent before its task (and relay bind) ends.
const APP_IDLE: Duration = Duration::from_secs(120);
/// Datagrams queued per app socket while its task is busy or waits for its relay bind to open.
const APP_QUEUE: usize = 256;
/// Transparent reply sockets kept open (one per peer address).
const MAX_REPLY_SOCKETS: usize = 4096;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket could not be set up (needs CAP_NET_ADMIN).
    #[error("transparent listener on {0}: {1}")]
    Socket(SocketAddr, io::Error),
}

fn transparent_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    s.set_reuse_address(true)?;
    // IP_TRANSPARENT is honoured on IPv6 sockets too (the kernel shares the flag).
    setsockopt(&s, sockopt::IpTransparent, &true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A listener socket: transparent, and reporting each datagram's original destination.
fn listener(addr: SocketAddr) -> Result<UdpSocket, Error> {
    let fail = |e: io::Error| Error::Socket(addr, e);
    let s = transparent_socket(addr).map_err(fail)?;
    if addr.is_ipv4() {
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true).map_err(|e| fail(e.into()))?;
    } else {
        setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true).map_err(|e| fail(e.into()))?;
    }
    s.bind(&addr.into()).map_err(fail)?;
    crate::SocketBuffers::Shared.apply(&s);
    UdpSocket::from_std(s.into()).map_err(fail)
}

/// Whose app sockets a listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apps {
    /// Sockets on the host: the kernel names each one's owner.
    Host,
    /// A confined view ([`crate::confine`]): everything sent from it is its user's, and
    /// replies leave by its host end (every view has the same app address, so only the
    /// device tells them apart).
    View {
        /// The view's user.
        uid: u32,
        /// Its host end.
        device: String,
        /// Where what the app sends to the view's resolver goes.
        resolver: Resolver,
    },
}

/// Listeners on `port` of 127.0.0.1 and, if the host has IPv6, ::1 (without it, the firewall
/// drops what would have gone to the IPv6 one).
fn loopback_pair<T>(
    port: u16,
    open: impl Fn(SocketAddr) -> Result<T, Error>,
) -> Result<(T, Option<T>), Error> {
    let v4 = open(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let v6 = match open(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no IPv6 transparent listener: intercepted IPv6 is dropped by the firewall");
            None
        }
    };
    Ok((v4, v6))
}

/// Transparent sockets bound to peers' addresses, to answer apps as their peers.
#[derive(Debug, Default)]
struct ReplySockets {
    sockets: Mutex<HashMap<SocketAddr, Arc<socket2::Socket>>>,
    /// The device replies leave by (a view's host end), if not by the routing table's choice.
    device: Option<std::ffi::OsString>,
}

impl ReplySockets {
    /// The socket that answers as `from`, opened the first time.
    fn socket(&self, from: SocketAddr) -> io::Result<Arc<socket2::Socket>> {
        let mut map = self
            .sockets
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        if let Some(s) = map.get(&from) {
            return Ok(s.clone());
        }
        let s = transparent_socket(from)?;
        if let Some(device) = &self.device {
            setsockopt(&s, sockopt::BindToDevice, device)?;
        }
        s.bind(&from.into())?;
        let s = Arc::new(s);
        if map.len() >= MAX_REPLY_SOCKETS {
            map.clear();
        }
        map.insert(from, s.clone());
        Ok(s)
    }
}

/// Replies to an app, with a view's resolver: the upstream's answers reach the app from the
/// resolver's address it asked (see [`Resolver::inbound`]).
struct Answering<'a> {
    replies: &'a ReplySockets,
    resolver: Option<Resolver>,
    asked: bool,
}

impl Front for Answering<'_> {
    fn deliver(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> Sent) -> Sent,
    ) -> Sent {
        let Some(resolver) = self.resolver.filter(|_| self.asked) else {
            return self.replies.deliver(fill);
        };
        self.replies.deliver(|push| {
            fill(&mut |peer, app, payload| push(resolver.inbound(peer, app, true), app, payload))
        })
    }
}

/// Replies reach the app from its peer's address.
impl Front for ReplySockets {
    fn deliver(
        &self,
        fill: impl FnOnce(&mut dyn FnMut(SocketAddr, SocketAddr, &[u8]) -> Sent) -> Sent,
    ) -> Sent {
        crate::batch::send_bursts(|bursts| {
            fill(&mut |peer, app, payload| match self.socket(peer) {
                Ok(socket) => bursts.push(&socket, Some(app), payload.len(), |b| {
                    b.extend_from_slice(payload)
                }),
                Err(e) => {
                    debug!(error = %e, peer = %peer, "no reply socket");
                    Sent { ok: 0, failed: 1 }
                }
            })
        })
    }
}

/// The public port each app socket's relay bind had, kept in a file, so that a restarted
/// sidecar asks for the same ports again and the apps' peers (and ICE sessions) keep reaching
/// them. One line per app socket: `ADDRESS:PORT PUBLIC_PORT`; unreadable lines are skipped.
#[derive(Debug, Default)]
pub struct PublicPorts {
    path: Option<std::path::PathBuf>,
    ports: std::sync::Mutex<HashMap<SocketAddr, u16>>,
}

impl PublicPorts {
    /// Reads `path` (a missing file is an empty table); `None` keeps the table in memory only.
    pub fn load(path: Option<std::path::PathBuf>) -> Arc<Self> {
        let text = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let ports = Self::parse(&text);
        if !ports.is_empty() {
            info!(
                app_sockets = ports.len(),
                "public ports of app sockets kept from before a restart"
            );
        }
        Arc::new(Self {
            path,
            ports: std::sync::Mutex::new(ports),
        })
    }

    fn parse(text: &str) -> HashMap<SocketAddr, u16> {
        text.lines()
            .filter_map(|l| {
                let (app, port) = l.split_once(' ')?;
                Some((app.parse().ok()?, port.trim().parse().ok()?))
            })
            .collect()
    }

    fn get(&self, app: SocketAddr) -> Option<u16> {
        self.ports.lock().ok()?.get(&app).copied()
    }

    /// Records (`Some`) or forgets (`None`) an app socket's public port, and saves the table.
    fn set(&self, app: SocketAddr, port: Option<u16>) {
        let Ok(mut ports) = self.ports.lock() else {
            return;
        };
        let changed = match port {
            Some(p) => ports.insert(app, p) != Some(p),
            None => ports.remove(&app).is_some(),
        };
        let Some(path) = self.path.as_ref().filter(|_| changed) else {
            return;
        };
        let text: String = ports.iter().map(|(a, p)| format!("{a} {p}\n")).collect();
        // Written whole and renamed into place: a crash leaves the old table or the new one.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            debug!(path = %path.display(), error = %e, "cannot save the public ports");
        }
    }
}

/// Runs the transparent listener for `apps` on `port` of 127.0.0.1 (and ::1 if the host has
/// IPv6) until `shutdown`.
pub async fn run(
    handle: Handle,
    port: u16,
    apps_of: Apps,
    ports: Arc<PublicPorts>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (v4, v6) = loopback_pair(port, listener)?;
    let device = match &apps_of {
        Apps::Host => None,
        Apps::View { device, .. } => Some(device.clone()),
    };
    info!(
        port,
        view = device.as_deref().unwrap_or("none"),
        "transparent interception ready"
    );
    let replies = Arc::new(ReplySockets {
        sockets: Mutex::default(),
        device: device.map(Into::into),
    });
    let mut apps: HashMap<SocketAddr, mpsc::Sender<(SocketAddr, Bytes)>> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        let socket = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = v4.readable() => r.map(|()| (&v4, false)),
            r = async { match &v6 { Some(s) => s.readable().await.map(|()| (s, true)), None => std::future::pending().await } } => r,
            _ = sweep.tick() => {
                apps.retain(|_, tx| !tx.is_closed());
                continue;
            }
        };
        let Ok((socket, is_v6)) = socket else {
            continue;
        };
        // Up to 64 datagrams, 16 per `recvmmsg`, before the other listener gets a turn.
        let mut full = true;
        for _ in 0..4 {
            let received = crate::batch::recv_burst_with_destination(
                socket,
                is_v6,
                |source, original, slot, n| {
                    let source = SocketAddr::new(source.ip().to_canonical(), source.port());
                    let payload = Bytes::copy_from_slice(
                        slot.get(crate::HEADROOM..crate::HEADROOM + n)
                            .unwrap_or_default(),
                    );
                    let tx = match apps.get(&source).filter(|tx| !tx.is_closed()) {
                        Some(tx) => tx.clone(),
                        None => {
                            let (tx, rx) = mpsc::channel(APP_QUEUE);
                            let (handle, replies, token, ports) = (
                                handle.clone(),
                                replies.clone(),
                                shutdown.clone(),
                                ports.clone(),
                            );
                            let apps_of = apps_of.clone();
                            tokio::spawn(async move {
                                let (user, resolver) = match apps_of {
                                    Apps::Host => (owner(source, original), None),
                                    Apps::View { uid, resolver, .. } => {
                                        (identity::user_of_uid(uid).ok(), Some(resolver))
                                    }
                                };
                                app(handle, source, (user, resolver), rx, replies, ports, token)
                                    .await
                            });
                            apps.insert(source, tx.clone());
                            tx
                        }
                    };
                    if tx.try_send((original, payload)).is_err() {
                        handle.shared.counters.drop(DropReason::SendFailed);
                    }
                },
            );
            full = false;
            match received {
                Ok(n) if n == crate::batch::RECV_SLOTS => full = true,
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(error = %e, "transparent receive failed");
                    break;
                }
            }
        }
        // More is waiting: let the app sockets' tasks empty their queues first. Without this
        // the listener, always ready under load, filled them faster than they ran and the
        // excess was dropped (20,804 of 360,000 datagrams at 40k-80k pkt/s, `BENCH_BLAST`).
        if full {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// The user who owns the app socket that sent from `source`.
fn owner(source: SocketAddr, destination: SocketAddr) -> Option<User> {
    let uid = identity::udp_source_uid(source, destination).ok()??;
    identity::user_of_uid(uid).ok()
}

/// One app socket of `owner` (None: no socket sends from there), in a confined view if it has
/// the view's `resolver`: its datagrams go through its [`Pipeline`]; replies reach it as its
/// peers.
async fn app(
    handle: Handle,
    source: SocketAddr,
    (owner, resolver): (Option<User>, Option<Resolver>),
    mut rx: mpsc::Receiver<(SocketAddr, Bytes)>,
    replies: Arc<ReplySockets>,
    ports: Arc<PublicPorts>,
    shutdown: CancellationToken,
) {
    let shared: &Shared = &handle.shared;
    let Some(user) = owner else {
        // No socket sends from there (a raw socket's forgery, or one already closed): counted
        // and logged at a bounded rate, since each forged source port comes here once.
        while rx.try_recv().is_ok() {
            shared.counters.drop(DropReason::NoSocket);
        }
        shared.log_refused_source(DropReason::NoSocket, source, "unknown");
        return;
    };
    let limits = shared.policy.load().policy.limits(&user);
    let Some(_slot) = shared.take_session_slot(&user, limits.max_associations) else {
        info!(user = %user, client = %source, "app socket refused: too many sessions");
        return;
    };
    let mut association = Association::new(source.ip(), limits.max_flows_per_association);
    // The kernel named the socket's owner above: it is the client.
    association.claim(source);
    info!(user = %user, client = %source, "app socket intercepted");
    let via = if resolver.is_some() {
        "confined"
    } else {
        "transparent"
    };
    let live = shared.registry.open(user.name(), source, via);
    // Opened in the background, with the public port this app socket had (before a restart,
    // say); the first datagrams wait for it (`Binding`).
    let binding = Binding::new(None, ports.get(source));
    let mut pipeline = Pipeline::new(shared, user, association, binding, live);
    let mut front = Answering {
        replies: &replies,
        resolver,
        asked: false,
    };
    // Checked now and then rather than a timer re-armed for every packet.
    let mut idle_check = tokio::time::interval(APP_IDLE / 8);
    let mut last_active = Instant::now();
    loop {
        pipeline.open_bind();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = idle_check.tick() => if last_active.elapsed() >= APP_IDLE { break },
            // While a bind opens, datagrams past the few it holds wait in the queue.
            packet = rx.recv(), if !pipeline.is_holding_full() => {
                let Some((target, payload)) = packet else { break };
                last_active = Instant::now();
                let target = match resolver {
                    Some(r) => {
                        front.asked |= Resolver::is_alias(target);
                        match r.outbound(target) {
                            Some(t) => t,
                            None => {
                                shared.counters.drop(DropReason::Unresolved);
                                continue;
                            }
                        }
                    }
                    None => target,
                };
                pipeline.send(target, &payload);
            }
            returned = std::future::poll_fn(|cx| pipeline.poll_return(cx)) => {
                match pipeline.deliver(returned, &front, source) {
                    Delivered::Datagrams => last_active = Instant::now(),
                    Delivered::Opened(public) => ports.set(source, Some(public.port())),
                    Delivered::BindChanged => {}
                }
            }
        }
    }
    // Released for good (idle or closed), not lost to a crash: its port need not be kept.
    if !shutdown.is_cancelled() {
        ports.set(source, None);
    }
    info!(user = %pipeline.user(), client = %source, flows = pipeline.flow_count(), "app socket released");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ports_survive_a_restart_and_skip_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ports");
        let app: SocketAddr = "192.0.2.10:40000".parse().expect("addr");
        let app6: SocketAddr = "[2001:db8::10]:40001".parse().expect("addr");
        let ports = PublicPorts::load(Some(path.clone()));
        assert_eq!(ports.get(app), None);
        ports.set(app, Some(50_000));
        ports.set(app6, Some(50_001));
        let again = PublicPorts::load(Some(path.clone()));
        assert_eq!(
            (again.get(app), again.get(app6)),
            (Some(50_000), Some(50_001))
        );
        again.set(app, None);
        assert_eq!(PublicPorts::load(Some(path.clone())).get(app), None);
        std::fs::write(
            &path,
            "garbage\n1.2.3.4:5 notaport\n192.0.2.10:1 70000\n192.0.2.10:2 3\n",
        )
        .expect("write");
        let parsed = PublicPorts::load(Some(path));
        assert_eq!(parsed.ports.lock().expect("lock").len(), 1);
        assert_eq!(parsed.get("192.0.2.10:2".parse().expect("addr")), Some(3));
    }
}
