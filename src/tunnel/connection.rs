//! The tunnel's QUIC connection: kept up with backoff and jitter, replaced when the relay
//! falls silent, and its DATAGRAM frames read and queued on their binds.

use super::bind::Inbound;
use super::{Live, Tunnel, TunnelConfig, TunnelCounters, TunnelState};
use crate::masque::wire;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

impl Tunnel {
    pub(super) async fn manage(
        self,
        endpoint: quinn::Endpoint,
        state: watch::Sender<TunnelState>,
        shutdown: CancellationToken,
    ) {
        let mut failures: u32 = 0;
        // A fresh connection already up, to take over from one that was silent too long.
        let mut fresh: Option<quinn::Connection> = None;
        loop {
            let attempt = async {
                let conn = match fresh.take() {
                    Some(conn) => conn,
                    None => handshake(&endpoint, &self.config, HANDSHAKE_TIMEOUT).await?,
                };
                let (mut driver, requests) = h3::client::builder()
                    .enable_extended_connect(true)
                    .enable_datagram(true)
                    .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
                    .await
                    .map_err(ConnectError::Http3)?;
                tokio::spawn(async move {
                    let _ = driver.wait_idle().await;
                });
                Ok::<_, ConnectError>(Live {
                    conn,
                    requests,
                    binds: Arc::new(Mutex::new(HashMap::new())),
                })
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = attempt => r,
            };
            match result {
                Ok(live) => {
                    failures = 0;
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    let conn = live.conn.clone();
                    let binds = live.binds.clone();
                    self.live.store(Some(Arc::new(live)));
                    state.send_replace(TunnelState::Connected);
                    info!(relay = %self.config.relay, "tunnel connected");
                    let reader =
                        tokio::spawn(read_datagrams(conn.clone(), binds, self.counters.clone()));
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            conn.close(0u32.into(), b"sidecar shutting down");
                            reader.abort();
                            break;
                        }
                        e = conn.closed() => warn!(relay = %self.config.relay, error = %e, "tunnel lost; relayed traffic is dropped until it is back"),
                        replacement = replace_after_silence(&endpoint, &self.config, &conn) => {
                            info!(relay = %self.config.relay, "tunnel replaced: the relay was silent for a while and a fresh connection is up (the old one's loss recovery would have waited out its backoff)");
                            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
                            conn.close(REPLACED, b"replaced after an outage");
                            fresh = Some(replacement);
                        }
                    }
                    reader.abort();
                    self.live.store(None);
                    state.send_replace(TunnelState::Unreachable);
                    if fresh.is_some() {
                        continue;
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures <= 3 || failures % 20 == 0 {
                        warn!(relay = %self.config.relay, error = %e, failures, "cannot reach the relay; relayed traffic is dropped");
                    }
                    state.send_replace(TunnelState::Unreachable);
                }
            }
            // Exponential backoff from 100 ms to 5 s, with ±50% jitter so that many sidecars
            // do not come back in step after a relay restart.
            let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
            let jitter = fastrand::u64(base / 2..=base + base / 2);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(jitter)) => {}
            }
        }
        self.live.store(None);
        state.send_replace(TunnelState::Unreachable);
    }
}

async fn read_datagrams(
    conn: quinn::Connection,
    binds: Arc<Mutex<HashMap<u64, Inbound>>>,
    counters: Arc<TunnelCounters>,
) {
    while let Ok(datagram) = conn.read_datagram().await {
        let quarter = wire::read_varint(&datagram).map(|(q, _)| q);
        let tx = quarter
            .ok()
            .and_then(|q| binds.lock().ok().and_then(|b| b.get(&q).cloned()));
        let delivered = tx.is_some_and(|bind| bind.deliver(datagram));
        if !delivered {
            counters.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How long a connection handshake may take before the attempt counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The application error code a connection is closed with when a fresh one replaces it.
const REPLACED: quinn::VarInt = quinn::VarInt::from_u32(1);

/// Why a connection to the relay could not be set up.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// The endpoint refused to start a connection (a bad server name, say).
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    /// No handshake within its time.
    #[error("handshake timed out")]
    Timeout,
    /// The handshake failed.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// HTTP/3 could not start on the connection.
    #[error("HTTP/3: {0}")]
    Http3(h3::error::ConnectionError),
}

/// A connection handshake with the relay, bounded by `timeout`.
async fn handshake(
    endpoint: &quinn::Endpoint,
    config: &TunnelConfig,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let connecting = endpoint.connect(config.relay, &config.server_name)?;
    Ok(tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout)??)
}

/// Resolves to a fresh connection once `conn` has heard nothing from the relay for
/// [`Silence::LIMIT`] and a new handshake succeeds; pending for as long as the relay is heard.
///
/// After an outage of a few seconds both ends of the old connection have backed their loss
/// probes off exponentially (RFC 9002 §6.2): each end sends again only at its next probe, which
/// comes about as long after the outage as the outage lasted, so media would stay silent for
/// seconds after the network is back. A new connection starts with none of that: handshakes are
/// tried about once a second while the old connection is silent, and the first that completes
/// replaces it (its binds are asked for again, with their public ports).
async fn replace_after_silence(
    endpoint: &quinn::Endpoint,
    config: &TunnelConfig,
    conn: &quinn::Connection,
) -> quinn::Connection {
    let mut silence = Silence::new(std::time::Instant::now(), 0);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !silence.observe(std::time::Instant::now(), conn.stats().udp_rx.datagrams) {
        tick.tick().await;
    }
    // Even if the old connection is heard again now, its backed-off end may still wait many
    // seconds to send: it is replaced all the same. A second or so per try (jittered, so that
    // sidecars cut off together do not all come back in the same instant), until one completes.
    loop {
        let timeout = Duration::from_millis(fastrand::u64(750..=1_250));
        let started = std::time::Instant::now();
        match handshake(endpoint, config, timeout).await {
            Ok(fresh) => return fresh,
            Err(e) => {
                debug!(relay = %config.relay, error = %e, "relay still silent");
                if let Some(rest) = timeout.checked_sub(started.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
        }
    }
}

/// Whether a connection has heard nothing from its peer for too long: fed the count of
/// datagrams received so far and the time.
#[derive(Debug)]
struct Silence {
    received: u64,
    last_heard: std::time::Instant,
}

impl Silence {
    /// Both ends send a keep-alive after 1 s without traffic, and every keep-alive is
    /// acknowledged, so a path that works delivers something at least once a second.
    const LIMIT: Duration = Duration::from_secs(3);

    fn new(now: std::time::Instant, received: u64) -> Self {
        Self {
            received,
            last_heard: now,
        }
    }

    /// True while nothing has been received for [`Self::LIMIT`] or longer.
    fn observe(&mut self, now: std::time::Instant, received: u64) -> bool {
        if received != self.received {
            self.received = received;
            self.last_heard = now;
        }
        now.saturating_duration_since(self.last_heard) >= Self::LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::Silence;
    use std::time::{Duration, Instant};

    #[test]
    fn silence_counts_from_the_last_datagram_heard() {
        let start = Instant::now();
        let mut s = Silence::new(start, 10);
        assert!(!s.observe(start + Duration::from_millis(2_900), 10));
        assert!(s.observe(start + Duration::from_secs(3), 10));
        // Heard again: the count restarts from then.
        assert!(!s.observe(start + Duration::from_secs(4), 11));
        assert!(!s.observe(start + Duration::from_millis(6_900), 11));
        assert!(s.observe(start + Duration::from_secs(7), 11));
        // A clock that does not move forward is not silence.
        assert!(!s.observe(start, 12));
    }
}
