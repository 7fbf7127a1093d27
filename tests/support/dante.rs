//! Dante (`danted`), the reference SOCKS5 server, on loopback with no authentication: what the
//! tests compare veil's SOCKS5 answers with, and the benchmark's same-run peer. Killed on drop.
//! Only std and tempfile, so the benchmark can include this file too.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Dante {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Dante {
    fn drop(&mut self) {
        // Its children (negotiate, request and i/o processes) would follow the mother's death;
        // they are told directly so that none is left behind.
        let children: Vec<u32> = self.pids().into_iter().skip(1).collect();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in children {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Dante {
    /// Starts `danted` on a free port of 127.0.0.1 and waits until it accepts; `Err` names
    /// why it could not (not installed, did not start).
    pub fn start() -> Result<Self, String> {
        let danted = ["/usr/sbin/danted", "/usr/sbin/sockd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .ok_or("Dante is not installed: tests/run.sh installs dante-server")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port();
        let conf = dir.path().join("danted.conf");
        std::fs::write(
            &conf,
            format!(
                "internal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\nsocksmethod: none\nclientmethod: none\n\
                 user.unprivileged: nobody\nclient pass {{ from: 127.0.0.0/8 to: 0/0 }}\n\
                 socks pass {{ from: 0/0 to: 0/0 command: bind connect udpassociate }}\n\
                 socks pass {{ from: 0/0 to: 0/0 command: bindreply udpreply }}\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new(danted)
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path().join("pid"))
            .args(["-N", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {danted}: {e}"))?;
        let dante = Dante {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(dante.addr).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("danted did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(dante)
    }

    /// The mother process and all its descendants (Dante forks a process per role).
    pub fn pids(&self) -> Vec<u32> {
        let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let ppid = stat
                    .rsplit(')')
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                Some((pid, ppid))
            })
            .collect();
        let mut tree = vec![self.child.id()];
        let mut i = 0;
        while let Some(&parent) = tree.get(i) {
            tree.extend(
                parents
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            i += 1;
        }
        tree
    }
}
