//! shadowsocks-rust (`sslocal` + `ssserver`, aes-128-gcm) on loopback: SOCKS5 in, an encrypted
//! tunnel, UDP out — veil's shape, the optional peer row of the benchmark. The binaries come
//! from `benches/shadowsocks.sh` (`target/shadowsocks/bin`), `BENCH_SHADOWSOCKS=DIR`, or `PATH`.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Shadowsocks {
    local: Child,
    server: Child,
    /// sslocal's SOCKS5 address.
    pub(crate) addr: SocketAddr,
}

impl Drop for Shadowsocks {
    fn drop(&mut self) {
        for child in [&mut self.local, &mut self.server] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::var_os("BENCH_SHADOWSOCKS")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/shadowsocks/bin")])
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port free for both TCP and UDP on 127.0.0.1 (sslocal serves SOCKS5 on both).
fn free_port() -> Result<u16, String> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = udp.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port".into())
}

impl Shadowsocks {
    /// Starts ssserver and sslocal; `Err` says why not (not built, did not start).
    pub(crate) fn start() -> Result<Self, String> {
        let (Some(local), Some(server)) = (binary("sslocal"), binary("ssserver")) else {
            return Err("sslocal/ssserver not found: run benches/shadowsocks.sh".into());
        };
        let (server_port, local_port) = (free_port()?, free_port()?);
        let common = ["-m", "aes-128-gcm", "-k", "veil-bench", "-U"];
        let spawn = |bin: &PathBuf, args: &[String]| {
            Command::new(bin)
                .args(args)
                .args(common)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e}", bin.display()))
        };
        let server = spawn(&server, &["-s".into(), format!("127.0.0.1:{server_port}")])?;
        let local = spawn(
            &local,
            &[
                "-b".into(),
                format!("127.0.0.1:{local_port}"),
                "-s".into(),
                format!("127.0.0.1:{server_port}"),
            ],
        )?;
        let ss = Shadowsocks {
            local,
            server,
            addr: SocketAddr::from(([127, 0, 0, 1], local_port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(ss.addr).is_err() {
            if Instant::now() > deadline {
                return Err("sslocal did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // ssserver's UDP side has no handshake to wait for; give it the same head start.
        std::thread::sleep(Duration::from_millis(300));
        Ok(ss)
    }

    /// sslocal's and ssserver's process IDs.
    pub(crate) fn pids(&self) -> [u32; 2] {
        [self.local.id(), self.server.id()]
    }
}
