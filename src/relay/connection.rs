//! One sidecar's QUIC connection on the relay: its HTTP/3 requests, each set up in a task of its
//! own within a budget (headers, time, requests in set-up at once), the sweep that ends idle
//! requests, each request handed to what serves it (bind, fixed UDP target, TCP), and the task
//! that reads its QUIC DATAGRAM frames and sends each on from its request's socket (a map
//! lookup by quarter stream ID; no channel hop).

use super::bind::{ENDED_IDLE, ENDED_SHUTDOWN, OpenUdp, Requests, Target, open_udp};
use super::counters::RelayDrop;
use super::request::{Admitted, H3Stream, Refuse, admit, header, peer_subject, refuse};
use super::shared::{Ends, Shared};
use super::tcp::serve_tcp;
use crate::masque::request as mreq;
use http::StatusCode;

use crate::masque::wire;
use crate::rate::TokenBucket;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info};

type H3Conn = h3::server::Connection<super::budget::Connection, Bytes>;
/// Requests one connection may have in set-up at once (headers arriving, admission, the bind's
/// socket): with the per-request budget, at most 1,024 × 64 KiB buffered per connection (a
/// sidecar that reconnects opens its binds all at once, one per app socket).
const MAX_PENDING_REQUESTS: usize = 1024;

/// A request's place in its connection's count of requests being set up.
struct Pending(Arc<std::sync::atomic::AtomicUsize>);

impl Pending {
    fn hold(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest decoded header section a request may have.
const MAX_FIELD_SECTION: u64 = 16 << 10;
/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Logs a request that could not be read, at info (an operator's business: a broken or hostile
/// client), truncated and at a bounded rate.
pub(super) fn bad_request(error: &str) {
    static LOG: Mutex<Option<TokenBucket>> = Mutex::new(None);
    let log = LOG
        .lock()
        .map(|mut b| {
            b.get_or_insert_with(|| TokenBucket::new(20, Instant::now()))
                .take(Instant::now())
        })
        .unwrap_or(false);
    if log {
        let error: String = error.chars().take(200).collect();
        info!(error = %error.escape_debug(), "bad request");
    }
}

pub(super) async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
    shard: usize,
) -> Result<(), h3::error::ConnectionError> {
    let remote = conn.remote_address();
    let identity = peer_subject(&conn).and_then(|s| s.common_name);
    info!(client = %remote, shard, identity = identity.as_deref().unwrap_or("-"), "sidecar connected");
    let mut h3c: H3Conn = h3::server::builder()
        // Decoded request headers are small (a CONNECT and a few fields).
        .max_field_section_size(MAX_FIELD_SECTION)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .build(super::budget::Connection(h3_quinn::Connection::new(
            conn.clone(),
        )))
        .await?;
    let requests: Requests = Arc::new(Mutex::new(HashMap::new()));
    let datagrams = tokio::spawn(read_datagrams(
        shared.clone(),
        conn.clone(),
        requests.clone(),
    ));
    let tasks = TaskTracker::new();
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One sweep for the connection's idle requests, rather than a timer in every bind.
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let resolver = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                end_idle(&shared, &requests);
                continue;
            }
            r = h3c.accept() => match r {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    debug!(client = %remote, error = %e, "connection closed");
                    break;
                }
            },
        };
        // Each request being set up may hold its budget of buffered bytes; a connection may
        // have only so many at once (a sidecar opens its binds a few at a time).
        if pending.load(Ordering::Relaxed) >= MAX_PENDING_REQUESTS {
            bad_request("too many requests being set up on one connection; refused");
            drop(resolver);
            continue;
        }
        let held = Pending::hold(&pending);
        let (shared, conn, requests, token) = (
            shared.clone(),
            conn.clone(),
            requests.clone(),
            shutdown.clone(),
        );
        // Set-up runs boxed and is freed when done, so a bind's long-lived task holds only its
        // datagram loop (memory per idle bind).
        let span = tracing::info_span!("request", client = %remote, user = tracing::field::Empty);
        let set_up = Box::pin(
            async move {
                let _held = held;
                // A request whose headers never finish holds memory: it gets a deadline.
                match tokio::time::timeout(HEADER_TIMEOUT, resolver.resolve_request()).await {
                    Ok(Ok((req, stream))) => {
                        serve_request(shared, conn, requests, req, stream, token).await
                    }
                    Ok(Err(e)) => {
                        bad_request(&e.to_string());
                        None
                    }
                    Err(_) => {
                        bad_request("headers not complete within 10 s");
                        None
                    }
                }
            }
            .instrument(span),
        );
        tasks.spawn(async move {
            // `open` is moved into the loop's future before it is awaited, so the task holds
            // one copy of it, not two.
            let serve = match set_up.await {
                Some(open) => open.serve(),
                None => return,
            };
            serve.await;
        });
    }
    if shutdown.is_cancelled()
        && let Ok(requests) = requests.lock()
    {
        for request in requests.values() {
            request.end(ENDED_SHUTDOWN);
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    datagrams.abort();
    info!(client = %remote, "sidecar disconnected");
    Ok(())
}

/// Ends the requests that have carried no datagram for the idle timeout.
fn end_idle(shared: &Shared, requests: &Requests) {
    let idle_ms = u64::try_from(shared.config.quotas.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let now = shared.millis();
    let Ok(requests) = requests.lock() else {
        return;
    };
    for request in requests.values() {
        if now.saturating_sub(request.active.load(Ordering::Relaxed)) >= idle_ms {
            request.end(ENDED_IDLE);
        }
    }
}

/// Datagrams from the client, sent on from their binds' sockets. What quinn has already
/// received is taken in one go, so a burst to one peer leaves as one GSO send.
async fn read_datagrams(shared: Arc<Shared>, conn: quinn::Connection, requests: Requests) {
    while let Ok(first) = conn.read_datagram().await {
        let sent = crate::batch::send_bursts(|bursts| {
            let mut sent = forward(&shared, &requests, bursts, &first);
            for _ in 1..64 {
                match crate::batch::ready(conn.read_datagram()) {
                    Some(Ok(datagram)) => sent += forward(&shared, &requests, bursts, &datagram),
                    _ => break,
                }
            }
            sent
        });
        count_sent(&shared, sent);
    }
}

/// One datagram from the client: decoded, admitted, and queued on its bind's socket.
fn forward(
    shared: &Shared,
    requests: &Requests,
    bursts: &mut crate::batch::Bursts<'_, UdpSocket>,
    datagram: &[u8],
) -> crate::batch::Sent {
    let none = crate::batch::Sent::default();
    let Ok(d) = wire::decode_http_datagram(datagram) else {
        shared.counters.drop(RelayDrop::Unknown);
        return none;
    };
    let request = requests
        .lock()
        .ok()
        .and_then(|t| t.get(&d.quarter_stream_id).cloned());
    let Some(request) = request else {
        shared.counters.drop(RelayDrop::Unknown);
        return none;
    };
    match request.admit_from_client(shared, d.context_id, d.payload) {
        Some((to, udp)) => {
            bursts.push(&request.socket, to, udp.len(), |b| b.extend_from_slice(udp))
        }
        None => none,
    }
}

fn count_sent(shared: &Shared, sent: crate::batch::Sent) {
    let c = &shared.counters;
    c.datagrams_out.fetch_add(sent.ok, Ordering::Relaxed);
    c.drop_n(RelayDrop::SendFailed, sent.failed);
}

/// Admits a request (user, identity, quota) and serves it: a TCP request to its end here, a UDP
/// request up to its answer (its loop runs without the set-up's state).
async fn serve_request(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    requests: Requests,
    req: http::Request<()>,
    mut stream: H3Stream,
    shutdown: CancellationToken,
) -> Option<OpenUdp> {
    let (user, admitted) = match admit(&shared, &req).await {
        Ok(a) => a,
        Err(r) => {
            refuse(&shared, &mut stream, r).await;
            return None;
        }
    };
    let identity = peer_subject(&conn).and_then(|s| s.common_name);
    if !shared.config.may_speak_for(identity.as_deref(), &user) {
        let r = Refuse(
            StatusCode::FORBIDDEN,
            "identity_not_permitted",
            format!(
                "certificate {} may not speak for user {user}",
                identity.as_deref().unwrap_or("(no common name)")
            ),
        );
        refuse(&shared, &mut stream, r).await;
        return None;
    }
    let Some(slot) = shared.usage.take(&user, Instant::now()) else {
        let r = Refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "connection_limit_reached",
            format!("quota for user {user}"),
        );
        refuse(&shared, &mut stream, r).await;
        return None;
    };
    // A port below 1024 is never handed out, whatever a sidecar asks for.
    let preferred = header(&req, mreq::HEADER_PREFERRED_PORT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|p| *p >= 1024);
    drop(req);
    let target = match admitted {
        Admitted::Tcp(target) => {
            serve_tcp(&shared, &user, target, stream, shutdown).await;
            drop(slot);
            return None;
        }
        Admitted::Bind => Target::Bind { preferred },
        Admitted::Fixed(t) => Target::Fixed(t),
    };
    let user = (user, slot);
    open_udp(shared, conn, requests, user, target, stream, shutdown).await
}
