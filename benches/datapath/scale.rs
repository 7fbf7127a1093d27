//! Simulated calls through veil's SOCKS5 path: N associations, each sending like a call —
//! 50 packets/s of 160 B audio each way, and one call in a hundred (at least one) also sending
//! video as a 33-packet burst of 1200 B every 33 ms (1000 packets/s). A peer on loopback
//! timestamps every packet on arrival and sends it back, so both directions are measured.
//!
//! Criteria for "held": < 0.1 % of packets lost (round trip), and the 99th percentile of
//! one-way delay variation (a packet's transit minus the least transit of its call and
//! direction) under 5 ms.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Packet header: call number, direction-independent sequence, send time (ns since `epoch`).
const HEADER: usize = 16;
/// SOCKS5 UDP request header for an IPv4 target.
const SOCKS: usize = 10;

pub(crate) struct Outcome {
    pub(crate) calls: usize,
    pub(crate) video_calls: usize,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) jitter_p99_ms: f64,
    /// Cores used while sending: sidecar, relay, the call generator, the peer.
    pub(crate) cores: [f64; 4],
}

impl Outcome {
    pub(crate) fn loss(&self) -> f64 {
        (self.sent - self.received.min(self.sent)) as f64 / self.sent.max(1) as f64
    }

    pub(crate) fn holds(&self) -> bool {
        self.loss() < 0.001 && self.jitter_p99_ms < 5.0
    }
}

/// Thread names, to measure their CPU time apart from the rest of the benchmark.
const PEER_THREAD: &str = "callpeer";

/// Transit samples: (call, ns).
type Samples = Vec<(u32, u64)>;

/// The remote peer: records each packet's one-way transit, restamps it and sends it back.
struct Peer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Samples>>,
}

impl Peer {
    fn start(epoch: Instant) -> Self {
        let socket = super::bench_socket("127.0.0.2:0");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(PEER_THREAD.into())
            .spawn(move || {
                let mut samples = Samples::new();
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if n < HEADER {
                        continue;
                    }
                    let now = epoch.elapsed().as_nanos() as u64;
                    let call = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
                    let sent = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
                    samples.push((call, now.saturating_sub(sent)));
                    buf[8..16].copy_from_slice(&now.to_be_bytes());
                    let _ = socket.send_to(&buf[..n], from);
                }
                samples
            })
            .expect("peer thread");
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

/// Opens a SOCKS5 UDP association (greeting and request in one write, as PySocks-shaped
/// clients pipeline them): the control connection and the sidecar's UDP address, or None if
/// the sidecar does not answer within 5 s or refuses.
pub(crate) fn associate(proxy: SocketAddr) -> Option<(TcpStream, SocketAddr)> {
    let mut control = TcpStream::connect(proxy).ok()?;
    control
        .set_read_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    control
        .write_all(&[5, 1, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0])
        .ok()?;
    let mut reply = [0u8; 12];
    control.read_exact(&mut reply).ok()?;
    let relay = SocketAddr::from((
        [reply[6], reply[7], reply[8], reply[9]],
        u16::from_be_bytes([reply[10], reply[11]]),
    ));
    (reply[3] == 0).then_some((control, relay))
}

/// Each sample's delay variation in ms: its transit minus the least transit of its call.
fn variations(samples: &[(u32, u64)], calls: usize) -> Vec<f64> {
    let mut least = vec![u64::MAX; calls];
    for &(call, t) in samples {
        if let Some(m) = least.get_mut(call as usize) {
            *m = (*m).min(t);
        }
    }
    samples
        .iter()
        .filter_map(|&(call, t)| {
            least
                .get(call as usize)
                .map(|m| t.saturating_sub(*m) as f64 / 1e6)
        })
        .collect()
}

pub(crate) fn run(proxy: SocketAddr, pids: [u32; 2], calls: usize, seconds: f64) -> Outcome {
    let epoch = Instant::now();
    let peer = Peer::start(epoch);
    let video_calls = (calls / 100).max(1);
    let mut controls = Vec::with_capacity(calls);
    let mut sockets = Vec::with_capacity(calls);
    for _ in 0..calls {
        let (control, relay) = associate(proxy).expect("associate");
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.connect(relay).expect("connect");
        socket.set_nonblocking(true).expect("nonblocking");
        controls.push(control);
        sockets.push(socket);
    }
    let SocketAddr::V4(target) = peer.addr else {
        panic!("v4 peer")
    };
    let mut socks = [0u8; SOCKS];
    socks[3] = 1;
    socks[4..8].copy_from_slice(&target.ip().octets());
    socks[8..10].copy_from_slice(&target.port().to_be_bytes());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let back = Arc::new(Mutex::new(Samples::new()));
    let me = std::path::Path::new("/proc/thread-self/stat");
    let cpu = || {
        [
            super::proc_cpu_seconds(pids[0]),
            super::proc_cpu_seconds(pids[1]),
            super::stat_cpu_seconds(me),
            super::thread_cpu_seconds(PEER_THREAD),
        ]
    };
    let (cpu_before, wall) = (cpu(), Instant::now());
    let (sent, received) = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let until = Duration::from_secs_f64(seconds);
        for (i, socket) in sockets.into_iter().enumerate() {
            let socket = tokio::net::UdpSocket::from_std(socket).expect("tokio socket");
            let back = back.clone();
            let video = i < video_calls;
            // Calls start spread over one 20 ms audio period.
            let offset = Duration::from_micros((i as u64 * 20_000) / calls as u64);
            tasks.spawn(async move {
                let mut samples = Samples::new();
                let (mut sent, mut received) = (0u64, 0u64);
                let mut audio = tokio::time::interval_at(
                    tokio::time::Instant::now() + offset,
                    Duration::from_millis(20),
                );
                let mut frames = tokio::time::interval(Duration::from_millis(33));
                let mut out = [0u8; SOCKS + 1200];
                out[..SOCKS].copy_from_slice(&socks);
                let mut buf = [0u8; 2048];
                let stop_at = tokio::time::Instant::now() + until;
                let drain_until = stop_at + Duration::from_millis(500);
                let mut seq = 0u32;
                let mut send = |size: usize, sent: &mut u64| {
                    out[SOCKS..SOCKS + 4].copy_from_slice(&(i as u32).to_be_bytes());
                    out[SOCKS + 4..SOCKS + 8].copy_from_slice(&seq.to_be_bytes());
                    let now = epoch.elapsed().as_nanos() as u64;
                    out[SOCKS + 8..SOCKS + 16].copy_from_slice(&now.to_be_bytes());
                    seq = seq.wrapping_add(1);
                    *sent += 1;
                    let _ = socket.try_send(&out[..SOCKS + size]);
                };
                loop {
                    let sending = tokio::time::Instant::now() < stop_at;
                    tokio::select! {
                        _ = audio.tick(), if sending => send(160, &mut sent),
                        _ = frames.tick(), if sending && video => {
                            for _ in 0..33 {
                                send(1200, &mut sent);
                            }
                        }
                        r = socket.recv(&mut buf) => {
                            let Ok(n) = r else { continue };
                            if n < SOCKS + HEADER {
                                continue;
                            }
                            let now = epoch.elapsed().as_nanos() as u64;
                            let at = &buf[SOCKS + 8..SOCKS + 16];
                            let stamped = u64::from_be_bytes(at.try_into().expect("8 bytes"));
                            samples.push((i as u32, now.saturating_sub(stamped)));
                            received += 1;
                        }
                        _ = tokio::time::sleep_until(drain_until) => break,
                    }
                }
                if let Ok(mut b) = back.lock() {
                    b.extend(samples);
                }
                (sent, received)
            });
        }
        let mut totals = (0, 0);
        while let Some(Ok((s, r))) = tasks.join_next().await {
            totals.0 += s;
            totals.1 += r;
        }
        totals
    });
    let (cpu_after, wall) = (cpu(), wall.elapsed().as_secs_f64());
    let mut cores = [0.0; 4];
    for (c, (after, before)) in cores.iter_mut().zip(cpu_after.iter().zip(&cpu_before)) {
        *c = (after - before) / wall;
    }
    drop(controls);
    let up = peer.finish();
    let back = back.lock().map(|b| b.clone()).unwrap_or_default();
    let spread = |samples: &[(u32, u64)]| {
        let mut v = variations(samples, calls);
        v.sort_by(f64::total_cmp);
        let at = |q: usize| v.get(v.len() * q / 1000).copied().unwrap_or(f64::NAN);
        format!(
            "p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} ms",
            at(500),
            at(900),
            at(990),
            at(999)
        )
    };
    eprintln!(
        "{calls} calls, delay variation: to the peer {}; back {}",
        spread(&up),
        spread(&back)
    );
    let mut variation = variations(&up, calls);
    variation.extend(variations(&back, calls));
    variation.sort_by(f64::total_cmp);
    let jitter_p99_ms = variation
        .get(variation.len() * 99 / 100)
        .copied()
        .unwrap_or(f64::NAN);
    Outcome {
        calls,
        video_calls,
        sent,
        received,
        jitter_p99_ms,
        cores,
    }
}
