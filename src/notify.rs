//! systemd's service notification protocol (`sd_notify`): READY, RELOADING, STOPPING, STATUS
//! and watchdog pings, sent as datagrams to `$NOTIFY_SOCKET`. Outside systemd it does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Sends `state` (e.g. `READY=1`) to systemd. Returns false when not run by systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// `RELOADING=1` with the monotonic timestamp systemd asks for.
pub fn reloading() -> io::Result<bool> {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    let usec = u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0) / 1_000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
}

/// The watchdog interval systemd expects pings within, if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let pid: Option<u32> = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    if pid.is_some_and(|p| p != std::process::id()) {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Pings systemd's watchdog at half its interval while the runtime is alive, until
/// `shutdown`.
pub async fn watchdog(shutdown: tokio_util::sync::CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    loop {
        let _ = notify("WATCHDOG=1");
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval / 2) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        // Setting the environment is unsafe in a threaded test; the variable goes to a child
        // process that runs `child_sends_ready` alone.
        let out = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["--exact", "notify::tests::child_sends_ready", "--nocapture"])
            .env("NOTIFY_SOCKET", &path)
            .env("VEIL_NOTIFY_CHILD", "1")
            .output()
            .expect("child");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let mut buf = [0u8; 64];
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let n = server.recv(&mut buf).expect("message");
        assert_eq!(&buf[..n], b"READY=1");
    }

    /// Run by `sends_to_a_path_socket` in a child process; on its own it only checks that
    /// nothing is sent outside systemd.
    #[test]
    fn child_sends_ready() {
        let under_systemd = std::env::var_os("VEIL_NOTIFY_CHILD").is_some();
        assert_eq!(notify("READY=1").expect("send"), under_systemd);
    }
}
