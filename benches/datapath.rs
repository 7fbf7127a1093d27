//! The side-by-side data-path benchmark (issue 6): direct UDP, a raw quinn DATAGRAM connection,
//! veil's shape with nothing of veil in it (`shape.rs`), the peers (Dante, shadowsocks-rust if
//! built), and veil's SOCKS5 path (PySocks-shaped client → `veil sidecar` → QUIC/MASQUE → `veil relay`
//! → UDP echo), all on loopback, in one run.
//!
//! Run: `cargo bench --bench datapath` (release build; a few minutes; loopback only; every loop
//! bounded in count and time). `BENCH_QUICK=1` shortens every phase for a smoke run.
//!
//! For each path: 200-byte ping-pong round trip p50/p99/p999; the highest fixed rate of 1200-byte
//! packets echoed with < 0.1 % loss; CPU time per echoed packet (one packet out and its echo
//! back, so two relayed packets) of the proxy processes (from /proc; for raw quinn, of its
//! runtime's threads) at 10k pkt/s; their peak RSS. Then, through veil: the largest number of
//! simulated calls held (see `scale.rs`), and memory per idle association.
//!
//! `BENCH_PATHS_ONLY=1` stops after the per-path table (no calls, no idle associations).
//! `BENCH_BLAST=RATE[,RATE…]` only sends 1200 B packets through the SOCKS5 path (and, as root,
//! the transparent path) at each rate and prints where any were lost (kernel UDP overflow
//! counters and the sockets that overflowed, per namespace; the sidecar's status).
//! `BENCH_CALLS=N[,N…]` only runs the simulated calls, with N calls each (with `BENCH_PROFILE`,
//! profiled into FILE.calls).
//! `BENCH_PROFILE=FILE` also records a `perf` call graph of the two daemons during the CPU phase
//! (the transparent path's into FILE.transparent).

#[path = "datapath/scale.rs"]
mod scale;
#[path = "datapath/shadowsocks.rs"]
mod shadowsocks;
#[path = "datapath/shape.rs"]
mod shape;
// The integration tests' fixtures: daemons, the topology, Dante.
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "datapath/transparent.rs"]
mod transparent;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{Daemon, dante, netns};

/// A short smoke run: with `BENCH_QUICK`, or when run as a test (`cargo test --all-targets`
/// runs this without `--bench`), so the test command checks that the benchmark still works.
fn quick() -> bool {
    std::env::var_os("BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// A UDP socket with 4 MiB buffers, so the benchmark's own sockets do not overflow when a 1 ms
/// tick's packets arrive together.
fn bench_socket(bind: &str) -> UdpSocket {
    let socket = UdpSocket::bind(bind).expect("bind");
    let s = socket2::SockRef::from(&socket);
    s.set_recv_buffer_size(4 << 20).expect("rcvbuf");
    s.set_send_buffer_size(4 << 20).expect("sndbuf");
    socket
}

/// A UDP echo server on `bind`, in its own thread; stops when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(bind: &str) -> Self {
        let socket = bench_socket(bind);
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One way to get a datagram to the echo server and back.
trait Path2: Send + Sync {
    fn send(&self, payload: &[u8]);
    /// Receives one echo into `buf`; the payload length, or None on timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize>;
}

struct Direct {
    socket: UdpSocket,
}

impl Path2 for Direct {
    fn send(&self, payload: &[u8]) {
        let _ = self.socket.send(payload);
    }
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        self.socket.recv(buf).ok()
    }
}

/// A SOCKS5 UDP association, as PySocks makes one.
struct Socks {
    _control: TcpStream,
    socket: UdpSocket,
    header: Vec<u8>,
}

impl Socks {
    fn open(proxy: SocketAddr, target: SocketAddr) -> Self {
        let (control, relay) = scale::associate(proxy).expect("associate");
        let socket = bench_socket("127.0.0.1:0");
        socket.connect(relay).expect("connect");
        let SocketAddr::V4(t) = target else {
            panic!("v4 target")
        };
        let mut header = vec![0, 0, 0, 1];
        header.extend_from_slice(&t.ip().octets());
        header.extend_from_slice(&t.port().to_be_bytes());
        Self {
            _control: control,
            socket,
            header,
        }
    }
}

impl Socks {
    /// An association with no client UDP socket: the sidecar and relay hold all their state
    /// for it (socket, bind, tasks), the benchmark only the control connection.
    /// None if the sidecar does not answer within 5 s or refuses.
    fn open_idle(proxy: SocketAddr) -> Option<TcpStream> {
        scale::associate(proxy).map(|(control, _)| control)
    }
}

impl Path2 for Socks {
    fn send(&self, payload: &[u8]) {
        let mut d = Vec::with_capacity(self.header.len() + payload.len());
        d.extend_from_slice(&self.header);
        d.extend_from_slice(payload);
        let _ = self.socket.send(&d);
    }
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        let mut raw = [0u8; 2048];
        let n = self.socket.recv(&mut raw).ok()?;
        let body = raw.get(self.header.len()..n)?;
        buf.get_mut(..body.len())?.copy_from_slice(body);
        Some(body.len())
    }
}

/// Ping-pong round trips of `size`-byte packets: (p50, p99, p999) in microseconds.
fn round_trips(path: &dyn Path2, size: usize, count: usize) -> (f64, f64, f64) {
    let payload = vec![7u8; size];
    let mut buf = vec![0u8; 2048];
    for _ in 0..100 {
        path.send(&payload);
        let _ = path.recv(&mut buf);
    }
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        path.send(&payload);
        if path.recv(&mut buf).is_some() {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| {
        rtts.get(((rtts.len() as f64) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99), at(0.999))
}

/// Sends `rate` packets/s of `size` bytes for `seconds`; returns (sent, received).
fn blast(path: Arc<dyn Path2>, rate: u64, size: usize, seconds: f64) -> (u64, u64) {
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (path, received, done) = (path.clone(), received.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 2048];
            let mut idle_since = None;
            loop {
                if path.recv(&mut buf).is_some() {
                    received.fetch_add(1, Ordering::Relaxed);
                    idle_since = None;
                } else if done.load(Ordering::Relaxed) {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(300) {
                        return;
                    }
                }
            }
        })
    };
    let payload = vec![9u8; size];
    let total = (rate as f64 * seconds) as u64;
    let start = Instant::now();
    // Paced in 1 ms ticks: sleep, then send what is due. A spinning sender would take a whole
    // core from the processes being measured on this 2-core machine.
    let mut sent = 0;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while sent < due {
            path.send(&payload);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    (total, received.load(Ordering::Relaxed))
}

/// The highest rate (packets/s) with < 0.1 % loss, by doubling then bisecting.
fn capacity(path: Arc<dyn Path2>, size: usize) -> u64 {
    let seconds = if quick() { 0.3 } else { 1.0 };
    let ok = |rate: u64| {
        let (sent, got) = blast(path.clone(), rate, size, seconds);
        (sent - got.min(sent)) as f64 / sent as f64 <= 0.001
    };
    let mut good = 0;
    let mut rate = 10_000;
    while rate <= 800_000 && ok(rate) {
        good = rate;
        rate *= 2;
    }
    let mut bad = rate;
    for _ in 0..(if quick() { 2 } else { 5 }) {
        let mid = (good + bad) / 2;
        if ok(mid) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    good
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(Path::new(&format!("/proc/{pid}/stat")))
}

/// utime + stime from a `/proc/…/stat` file, in seconds.
fn stat_cpu_seconds(path: &Path) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

/// The name of the raw quinn runtime's threads, to measure their CPU time apart.
const RAW_QUINN_THREAD: &str = "rawquinn";

/// CPU seconds of this process's threads named `name` (the raw quinn client and server).
fn thread_cpu_seconds(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .map(|t| stat_cpu_seconds(&t.path().join("stat")))
        .sum()
}

fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the daemons log during a benchmark: enough to see a problem, not a line per flow.
const BENCH_LOG: &str = "warn,veil=info";

/// Starts `veil ARGS` (inside network namespace `ns` if given) and waits for its ready line;
/// returns the daemon and the address it listens on.
fn spawn(ns: Option<&str>, args: &[&str]) -> (Daemon, SocketAddr) {
    let mut cmd = support::veil_in(ns);
    cmd.args(args);
    let daemon = Daemon::spawn_logging(cmd, BENCH_LOG);
    let addr = daemon.addr;
    (daemon, addr)
}

struct Veil {
    relay: Daemon,
    sidecar: Daemon,
    socks: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Writes `pki/NAME.toml` for a relay on 127.0.0.1 with quotas no benchmark reaches (and
/// `extra` lines), starts it (inside `ns` if given), and returns it with its address.
fn start_relay(ns: Option<&str>, pki: &Path, name: &str, extra: &str) -> (Daemon, SocketAddr) {
    let config = pki.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ncertificate = \"relay.crt\"\nprivate_key = \"relay.key\"\nclient_ca = \"ca.crt\"\n{extra}\
             [quotas]\nbinds_per_user = 20000\nbinds_total = 20000\npackets_per_second_per_user = 4000000\nbytes_per_second_per_user = 4000000000\n"
        ),
    )
    .expect("relay config");
    let config = config.display().to_string();
    spawn(ns, &["relay", "--config", &config])
}

/// Writes a relay-everything policy in `dir/NAME-policies` and `pki/NAME.toml` for a sidecar
/// whose tunnel goes to `relay` (plus `extra` lines), starts it (inside `ns` if given), and
/// returns it with its SOCKS5 address. `max_sessions` is high because one user opens every
/// association here, and an owner may hold an eighth of the sessions.
fn start_sidecar(
    ns: Option<&str>,
    pki: &Path,
    dir: &Path,
    name: &str,
    relay: SocketAddr,
    extra: &str,
) -> (Daemon, SocketAddr) {
    let policy = dir.join(format!("{name}-policies"));
    std::fs::create_dir_all(&policy).expect("policy dir");
    std::fs::write(policy.join("default.toml"), "fallback = \"relay\"\n[limits]\nmax_associations = 20000\nmax_packets_per_second = 4000000\n").expect("policy");
    let config = pki.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nmax_sessions = 100000\npolicy_dir = \"{}\"\ncontrol = \"{}\"\n[relay]\naddress = \"{relay}\"\nserver_name = \"localhost\"\nca = \"ca.crt\"\ncertificate = \"bench.crt\"\nprivate_key = \"bench.key\"\n{extra}",
            policy.display(),
            dir.join(format!("{name}-control")).display()
        ),
    )
    .expect("sidecar config");
    let config = config.display().to_string();
    spawn(ns, &["sidecar", "--config", &config])
}

fn start_veil(dir: &Path) -> Veil {
    let out = Command::new(env!("CARGO_BIN_EXE_veil"))
        .arg("pki")
        .arg(dir.join("pki"))
        .args(["--relay-name", "localhost", "--client", "bench"])
        .output()
        .expect("veil pki");
    assert!(out.status.success());
    let pki = dir.join("pki");
    let (relay, relay_addr) = start_relay(None, &pki, "relay", "allow = [\"127.0.0.2/32\"]\n");
    let (sidecar, socks) = start_sidecar(None, &pki, dir, "sidecar", relay_addr, "");
    std::thread::sleep(Duration::from_millis(500));
    Veil {
        relay,
        sidecar,
        socks,
        _dir: tempfile::tempdir().expect("tempdir"),
    }
}

/// A QUIC server and client configuration with veil's transport settings and a fresh PKI.
fn quinn_configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let set = veil::pki::generate(&["localhost".into()], &["c".into()]).expect("pki");
    let ca = veil::pki::certificates(&set.ca_cert_pem, "ca").expect("ca");
    let server = veil::pki::server_config(
        veil::pki::certificates(&set.relay.cert_pem, "r").expect("cert"),
        veil::pki::private_key(&set.relay.key_pem, "k").expect("key"),
        &ca,
    )
    .expect("server");
    let (_, id) = &set.clients[0];
    let client = veil::pki::client_config(
        &ca,
        veil::pki::certificates(&id.cert_pem, "c").expect("cert"),
        veil::pki::private_key(&id.key_pem, "k").expect("key"),
    )
    .expect("client");
    (server, client)
}

/// A raw quinn DATAGRAM echo: the tunnel's ceiling.
struct RawQuinn {
    _runtime: tokio::runtime::Runtime,
    conn: quinn::Connection,
    inbound: std::sync::Mutex<std::sync::mpsc::Receiver<bytes::Bytes>>,
}

impl RawQuinn {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(RAW_QUINN_THREAD)
            .enable_all()
            .build()
            .expect("runtime");
        let (server_cfg, client_cfg) = quinn_configs();
        let (conn, rx) = runtime.block_on(async {
            let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr"))
                .expect("endpoint");
            let addr = server.local_addr().expect("addr");
            tokio::spawn(async move {
                if let Some(incoming) = server.accept().await
                    && let Ok(conn) = incoming.await
                {
                    while let Ok(d) = conn.read_datagram().await {
                        let _ = conn.send_datagram(d);
                    }
                }
            });
            let mut client =
                quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
            client.set_default_client_config(client_cfg);
            let conn = client
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = conn.clone();
            tokio::spawn(async move {
                while let Ok(d) = reader.read_datagram().await {
                    if tx.send(d).is_err() {
                        return;
                    }
                }
            });
            (conn, rx)
        });
        Self {
            _runtime: runtime,
            conn,
            inbound: std::sync::Mutex::new(rx),
        }
    }
}

impl Path2 for RawQuinn {
    fn send(&self, payload: &[u8]) {
        let _ = self
            .conn
            .send_datagram(bytes::Bytes::copy_from_slice(payload));
    }
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        let d = self
            .inbound
            .lock()
            .ok()?
            .recv_timeout(Duration::from_millis(200))
            .ok()?;
        buf.get_mut(..d.len())?.copy_from_slice(&d);
        Some(d.len())
    }
}

/// CPU microseconds per delivered packet at 10k pkt/s of 1200 B, for each part that
/// `cpu_seconds` counts (e.g. sidecar and relay). The run with the median total of three (one in
/// a quick run): this machine's neighbours are noisy.
fn cpu_per_packet(path: Arc<dyn Path2>, cpu_seconds: &dyn Fn() -> Vec<f64>) -> Vec<f64> {
    let mut runs: Vec<Vec<f64>> = (0..if quick() { 1 } else { 3 })
        .map(|_| {
            let before = cpu_seconds();
            let (_, delivered) = blast(path.clone(), 10_000, 1200, if quick() { 1.0 } else { 2.0 });
            cpu_seconds()
                .iter()
                .zip(&before)
                .map(|(after, before)| (after - before) * 1e6 / delivered.max(1) as f64)
                .collect()
        })
        .collect();
    runs.sort_by(|a, b| a.iter().sum::<f64>().total_cmp(&b.iter().sum()));
    runs.get(runs.len() / 2).cloned().unwrap_or_default()
}

/// `/proc/net/FILE` as seen in network namespace `ns` (None: this one); empty if unreadable.
fn proc_net(ns: Option<&str>, file: &str) -> String {
    let path = format!("/proc/net/{file}");
    match ns {
        None => std::fs::read_to_string(&path).unwrap_or_default(),
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "cat", &path])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default(),
    }
}

/// The kernel's UDP error counters (`/proc/net/snmp`): receive errors, of which buffer
/// overflows, and send buffer overflows.
fn udp_errors(ns: Option<&str>) -> [u64; 3] {
    let snmp = proc_net(ns, "snmp");
    let mut rows = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (rows.next().unwrap_or(""), rows.next().unwrap_or(""));
    let field = |name: &str| {
        names
            .split_whitespace()
            .position(|n| n == name)
            .and_then(|i| values.split_whitespace().nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    [
        field("InErrors"),
        field("RcvbufErrors"),
        field("SndbufErrors"),
    ]
}

/// The UDP sockets (IPv4, local address) that have dropped datagrams, with their counts, from
/// `/proc/net/udp` in `ns` (the whole namespace, not only veil's).
fn dropping_sockets(ns: Option<&str>) -> Vec<String> {
    let table = proc_net(ns, "udp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let drops: u64 = fields.last()?.parse().ok()?;
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let ip = std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.swap_bytes());
            let port = u16::from_str_radix(port, 16).ok()?;
            (drops > 0).then(|| format!("{ip}:{port} {drops}"))
        })
        .collect()
}

/// `BENCH_BLAST=RATE[,RATE…]`: where 1200 B packets are lost on the SOCKS5 path at each rate
/// (2 s each): the kernel's UDP overflow counters and the sidecar's own counters.
fn diagnose_loss(
    path: &Arc<dyn Path2>,
    rates: &str,
    control: &Path,
    namespaces: &[Option<String>],
) {
    for rate in rates
        .split(',')
        .filter_map(|r| r.trim().parse::<u64>().ok())
    {
        let errors = || -> Vec<[u64; 3]> {
            namespaces
                .iter()
                .map(|ns| udp_errors(ns.as_deref()))
                .collect()
        };
        let before = errors();
        let (sent, got) = blast(path.clone(), rate, 1200, 2.0);
        let after = errors();
        println!(
            "{rate} pkt/s: sent {sent}, echoed {got}, lost {}",
            sent - got.min(sent)
        );
        for ((ns, after), before) in namespaces.iter().zip(&after).zip(&before) {
            println!(
                "  kernel UDP counters ({}): receive errors {}, of which buffer overflows {}, send buffer overflows {}; sockets that dropped (since they opened): {}",
                ns.as_deref().unwrap_or("this namespace"),
                after[0] - before[0],
                after[1] - before[1],
                after[2] - before[2],
                dropping_sockets(ns.as_deref()).join(", ")
            );
        }
    }
    let status = Command::new(env!("CARGO_BIN_EXE_veil"))
        .arg("status")
        .arg("--socket")
        .arg(control)
        .output();
    if let Ok(out) = status {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// With `BENCH_PROFILE=FILE`, records `perf` call graphs of the veil processes during the CPU
/// phase into FILE (read it with `perf report -i FILE`), of the transparent path's into
/// FILE.transparent.
fn profile_start(pids: &[u32], suffix: &str) -> Option<Child> {
    let out = std::env::var("BENCH_PROFILE").ok()? + suffix;
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args([
            "record",
            "-g",
            "-F",
            "2000",
            "-o",
            &out,
            "-p",
            &pids.join(","),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok();
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn profile_stop(child: Option<Child>) {
    if let Some(child) = child {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let _ = child.wait_with_output();
    }
}

/// 10,000, or fewer in steps of 500 if the open-file hard limit cannot hold two descriptors
/// for each (plus room for the sidecar's own).
fn idle_associations_that_fit() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let hard = getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(_, hard)| hard);
    let fit = usize::try_from(hard.saturating_sub(200) / 2).unwrap_or(usize::MAX);
    (fit / 500 * 500).min(10_000)
}

fn phase(name: &str, since: Instant) {
    eprintln!("[{:6.1} s] {name}", since.elapsed().as_secs_f64());
}

fn main() {
    let t0 = Instant::now();
    // Loopback only, bounded loops; see the module docs.
    veil::raise_open_file_limit();
    if let Ok(steps) = std::env::var("BENCH_CALLS") {
        let dir = tempfile::tempdir().expect("tempdir");
        let veil = start_veil(dir.path());
        let pids = [veil.sidecar.pid(), veil.relay.pid()];
        let profile = profile_start(&pids, ".calls");
        let results: Vec<scale::Outcome> = steps
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .map(|calls| scale::run(veil.socks, pids, calls, 4.0))
            .collect();
        profile_stop(profile);
        print_calls(&results);
        return;
    }
    let pings = if quick() { 500 } else { 5000 };
    let echo = Echo::start("127.0.0.2:0");
    let mut rows: Vec<Row> = Vec::new();

    let direct = Direct {
        socket: bench_socket("127.0.0.1:0"),
    };
    direct.socket.connect(echo.addr).expect("connect");
    direct
        .socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let direct: Arc<dyn Path2> = Arc::new(direct);
    let rtt = round_trips(direct.as_ref(), 200, pings);
    rows.push((
        "direct UDP".into(),
        rtt,
        capacity(direct.clone(), 1200),
        None,
        None,
    ));

    let quinn_path = Arc::new(RawQuinn::start());
    let rtt = round_trips(quinn_path.as_ref(), 200, pings);
    phase("quinn round trips", t0);
    let cap = capacity(quinn_path.clone(), 1200);
    phase("quinn capacity", t0);
    let cpu = cpu_per_packet(quinn_path.clone(), &|| {
        vec![thread_cpu_seconds(RAW_QUINN_THREAD)]
    });
    rows.push((
        "raw quinn DATAGRAM".into(),
        rtt,
        cap,
        Some(cpu.iter().sum()),
        None,
    ));
    // Each path's CPU split between its sidecar and relay ends.
    let mut splits = Vec::new();
    drop(quinn_path);
    phase("quinn closed", t0);

    // veil's shape with nothing of veil: what any proxy of this shape pays on this machine.
    let shape_path = Arc::new(shape::Shape::start(echo.addr));
    let shape_path: Arc<dyn Path2> = shape_path;
    let rtt = round_trips(shape_path.as_ref(), 200, pings);
    let cap = capacity(shape_path.clone(), 1200);
    let cpu = cpu_per_packet(shape_path.clone(), &|| {
        vec![
            thread_cpu_seconds(shape::SIDE_THREAD),
            thread_cpu_seconds(shape::RELAY_THREAD),
        ]
    });
    rows.push((
        "veil's shape, nothing of veil: UDP → quinn DATAGRAM → UDP".into(),
        rtt,
        cap,
        Some(cpu.iter().sum()),
        None,
    ));
    splits.push(("shape", cpu));
    drop(shape_path);
    phase("shape", t0);

    // The nearest peers, in the same run: Dante's SOCKS5 UDP relay (one hop, no tunnel, no
    // encryption) and, if built, shadowsocks-rust (veil's shape); CPU summed over their
    // processes.
    match dante::Dante::start() {
        Ok(d) => {
            rows.push(socks_peer(
                "Dante SOCKS5 UDP relay (peer)",
                d.addr,
                &echo,
                pings,
                &|| d.pids(),
            ));
            phase("Dante", t0);
        }
        Err(why) => eprintln!("Dante not measured: {why}"),
    }
    match shadowsocks::Shadowsocks::start() {
        Ok(ss) => {
            let pids = ss.pids().to_vec();
            rows.push(socks_peer(
                "shadowsocks-rust sslocal → ssserver, aes-128-gcm (peer)",
                ss.addr,
                &echo,
                pings,
                &|| pids.clone(),
            ));
            phase("shadowsocks-rust", t0);
        }
        Err(why) => eprintln!("shadowsocks-rust not measured: {why}"),
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let veil = start_veil(dir.path());
    let socks = Socks::open(veil.socks, echo.addr);
    socks
        .socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let socks: Arc<dyn Path2> = Arc::new(socks);
    if let Ok(rates) = std::env::var("BENCH_BLAST") {
        println!("SOCKS5 path:");
        diagnose_loss(&socks, &rates, &dir.path().join("sidecar-control"), &[None]);
        match transparent::start(&dir.path().join("pki"), dir.path()) {
            Ok(t) => {
                println!("transparent path:");
                let namespaces = t.namespaces().map(Some);
                diagnose_loss(
                    &t.app(),
                    &rates,
                    &dir.path().join("sidecar-t-control"),
                    &namespaces,
                );
            }
            Err(why) => println!("transparent path not measured: {why}"),
        }
        return;
    }
    phase("veil started", t0);
    let pids = [veil.sidecar.pid(), veil.relay.pid()];
    let rtt = round_trips(socks.as_ref(), 200, pings);
    phase("veil round trips", t0);
    let cap = capacity(socks.clone(), 1200);
    phase("veil capacity", t0);
    // CPU per delivered packet of sidecar + relay at 10k pkt/s.
    let profile = profile_start(&pids, "");
    let cpu = cpu_per_packet(socks.clone(), &|| {
        pids.iter().map(|p| proc_cpu_seconds(*p)).collect()
    });
    profile_stop(profile);
    let cpu_us = cpu.iter().sum();
    splits.push(("SOCKS5", cpu));
    let rss: u64 = pids.iter().map(|p| proc_kib(*p, "VmHWM:")).sum();
    rows.push((
        "veil SOCKS5 → QUIC → relay".into(),
        rtt,
        cap,
        Some(cpu_us),
        Some(rss),
    ));

    // The transparent path, in namespaces (root only), with direct UDP on its route as floor.
    let floor_note = match transparent::start(&dir.path().join("pki"), dir.path()) {
        Ok(t) => {
            phase("transparent path started", t0);
            let direct = t.direct();
            let floor = round_trips(direct.as_ref(), 200, pings);
            rows.push((
                "direct UDP via a router (namespaces)".into(),
                floor,
                capacity(direct, 1200),
                None,
                None,
            ));
            let app = t.app();
            let rtt = round_trips(app.as_ref(), 200, pings);
            let cap = capacity(app.clone(), 1200);
            let pids = [t.sidecar.pid(), t.relay.pid()];
            let profile = profile_start(&pids, ".transparent");
            let cpu = cpu_per_packet(app, &|| pids.iter().map(|p| proc_cpu_seconds(*p)).collect());
            profile_stop(profile);
            let cpu_us = cpu.iter().sum();
            splits.push(("transparent", cpu));
            let rss: u64 = pids.iter().map(|p| proc_kib(*p, "VmHWM:")).sum();
            rows.push((
                "veil transparent: app → TPROXY → QUIC → relay".into(),
                rtt,
                cap,
                Some(cpu_us),
                Some(rss),
            ));
            phase("transparent path", t0);
            format!(
                "\ntransparent p50 vs direct UDP on its own route: {:.2}×",
                rtt.0 / floor.0
            )
        }
        Err(why) => {
            eprintln!("transparent path not measured: {why}");
            format!("\ntransparent path not measured: {why}")
        }
    };

    let paths_only = std::env::var_os("BENCH_PATHS_ONLY").is_some();
    // Memory per idle association, from RSS growth of each process, before the calls: memory
    // the calls freed would be reused and understate the growth. 10,000 associations, or
    // as many as fit the open-file hard limit (the sidecar holds two descriptors for each; a
    // sandbox's limit of 20,000 allows 9,500).
    let n = if paths_only {
        0
    } else if quick() {
        200
    } else {
        idle_associations_that_fit()
    };
    let rss_now = |pid: u32| proc_kib(pid, "VmRSS:");
    let base = pids.map(rss_now);
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        match Socks::open_idle(veil.socks) {
            Some(c) => idle.push(c),
            None => break,
        }
    }
    assert_eq!(idle.len(), n, "the sidecar stopped accepting associations");
    std::thread::sleep(Duration::from_millis(500));
    let grown =
        |i: usize| rss_now(pids[i]).saturating_sub(base[i]) as f64 * 1024.0 / n.max(1) as f64;
    let (sidecar_bytes, relay_bytes) = (grown(0), grown(1));
    drop(idle);
    // Let the daemons tear them down before the calls start.
    if n > 0 {
        std::thread::sleep(Duration::from_secs(2));
    }
    phase("idle associations", t0);

    // Simulated calls, growing N until one fails the call criteria.
    let mut held = None;
    let mut results = Vec::new();
    let steps: &[usize] = if paths_only {
        &[]
    } else if quick() {
        &[20]
    } else {
        &[100, 250, 375, 500, 750, 1000, 1500, 2000]
    };
    for &calls in steps {
        let r = scale::run(veil.socks, pids, calls, if quick() { 1.0 } else { 4.0 });
        phase(&format!("{calls} calls"), t0);
        let ok = r.holds();
        results.push(r);
        if !ok {
            break;
        }
        held = Some(calls);
    }

    let (d_rtt, q_rtt) = (rows[0].1, rows[1].1);
    println!(
        "\n| path | RTT p50 / p99 / p999 (µs, 200 B) | p50 vs direct / quinn | lossless 1200 B (pkt/s) | CPU per packet at 10k pkt/s | peak RSS |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, (p50, p99, p999), cap, cpu, rss) in &rows {
        println!(
            "| {name} | {p50:.0} / {p99:.0} / {p999:.0} | {:.2}× / {:.2}× | {cap} | {} | {} |",
            p50 / d_rtt.0,
            p50 / q_rtt.0,
            cpu.map_or("—".to_owned(), |c| format!("{c:.1} µs")),
            rss.map_or("—".to_owned(), |r| format!(
                "{:.1} MiB",
                r as f64 / 1024.0
            )),
        );
    }
    println!("{floor_note}");
    for (path, parts) in &splits {
        if let [sidecar, relay] = parts.as_slice() {
            println!(
                "{path} CPU per echoed packet: sidecar end {sidecar:.1} µs + relay end {relay:.1} µs"
            );
        }
    }
    print_calls(&results);
    println!(
        "\nlargest number of calls held (< 0.1 % loss, p99 delay variation < 5 ms): {}",
        held.map_or("none".to_owned(), |n| n.to_string())
    );
    println!(
        "idle associations: {n} opened; {:.0} bytes each (sidecar {sidecar_bytes:.0} + relay {relay_bytes:.0}, RSS growth)",
        sidecar_bytes + relay_bytes
    );
}

/// A row of the paths table: name, round trip p50/p99/p999, lossless rate, CPU per echoed
/// packet, peak RSS (KiB).
type Row = (String, (f64, f64, f64), u64, Option<f64>, Option<u64>);

/// Measures a SOCKS5 UDP peer (another project's proxy) at `proxy` as the veil paths are
/// measured: its CPU and peak RSS summed over `pids` (read again at each sample, as the set
/// can change).
fn socks_peer(
    name: &str,
    proxy: SocketAddr,
    echo: &Echo,
    pings: usize,
    pids: &dyn Fn() -> Vec<u32>,
) -> Row {
    let path = Socks::open(proxy, echo.addr);
    path.socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let path: Arc<dyn Path2> = Arc::new(path);
    let rtt = round_trips(path.as_ref(), 200, pings);
    let cap = capacity(path.clone(), 1200);
    let cpu = cpu_per_packet(path, &|| {
        vec![pids().into_iter().map(proc_cpu_seconds).sum()]
    });
    let rss = pids().into_iter().map(|p| proc_kib(p, "VmHWM:")).sum();
    (name.into(), rtt, cap, Some(cpu.iter().sum()), Some(rss))
}

/// The simulated calls' table: one row per step.
fn print_calls(results: &[scale::Outcome]) {
    println!(
        "\n| simulated calls | packets sent | loss | one-way delay variation p99 | held | cores: sidecar / relay / callers / peer |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in results {
        println!(
            "| {} ({} with video) | {} | {:.3} % | {:.2} ms | {} | {:.2} / {:.2} / {:.2} / {:.2} |",
            r.calls,
            r.video_calls,
            r.sent,
            r.loss() * 100.0,
            r.jitter_p99_ms,
            if r.holds() { "yes" } else { "no" },
            r.cores[0],
            r.cores[1],
            r.cores[2],
            r.cores[3],
        );
    }
}
