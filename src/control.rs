//! The sidecar's local control socket (`veil status`) and optional Prometheus endpoint.
//!
//! The control socket is a Unix stream socket, mode 0600 in a 0700 directory, and answers only
//! root (checked again with the peer's credentials). One request per connection: the word
//! `status`; the answer is the report text.

use crate::datapath::state::Handle;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/run/veil/control";

/// Binds the control socket at `path` (replacing a stale one), root-only. Its directory is
/// made (mode 0700) if it does not exist; an existing one must be veil's: owned by this user
/// and writable by no one else (in `/tmp`, anyone could swap the socket). An existing
/// directory's mode is never changed.
pub fn bind_control(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if dir.exists() {
            own_directory(dir)?;
        } else {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Checks that `dir` is a directory of this user's that no one else can write to.
fn own_directory(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not veil's own directory (owner uid {}, mode {:o}): put the control socket in a directory only root can write to, like /run/veil",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Serves `veil status` requests until `shutdown`.
pub async fn serve_control(
    listener: UnixListener,
    handle: Handle,
    managed: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let (handle, managed) = (handle.clone(), managed.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &handle, &managed).await {
                debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(mut stream: UnixStream, handle: &Handle, managed: &[String]) -> io::Result<()> {
    if stream.peer_cred()?.uid() != 0 {
        return stream
            .write_all(b"error: veil status is for root only\n")
            .await;
    }
    let mut request = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut request))
        .await
        .map_err(|_| io::Error::other("timed out"))??;
    let reply = match request.get(..n).map(|r| r.trim_ascii()) {
        Some(b"status") => handle.status_report(managed),
        _ => "error: unknown request (expected: status)\n".to_owned(),
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Asks a running sidecar for its status (the `veil status` command).
pub async fn request_status(path: &Path) -> io::Result<String> {
    let mut stream = UnixStream::connect(path).await?;
    stream.write_all(b"status\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .map_err(|_| io::Error::other("no answer from the sidecar"))??;
    Ok(out)
}

/// Serves the counters in Prometheus text format on `addr` (loopback only) until `shutdown`.
pub async fn serve_metrics(
    addr: SocketAddr,
    handle: Handle,
    shutdown: CancellationToken,
) -> io::Result<()> {
    if !addr.ip().is_loopback() {
        return Err(io::Error::other(format!(
            "metrics must listen on loopback, not {addr}"
        )));
    }
    let listener = TcpListener::bind(addr).await?;
    info!(listen = %listener.local_addr()?, "metrics ready");
    loop {
        let mut stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            let read = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(chunk.get(..n).unwrap_or_default());
                }
                Ok::<_, io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(2), read)
                .await
                .is_err()
            {
                return;
            }
            let response = if request.starts_with(b"GET /metrics ") {
                let body = handle.prometheus();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The control socket path of a config, or the default.
pub fn socket_path(configured: Option<&PathBuf>) -> PathBuf {
    configured
        .cloned()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_directory_is_made_private_or_must_already_be() {
        let base = tempfile::tempdir().expect("tempdir");
        // A directory like /tmp: refused, and left as it was.
        let shared = base.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        let err = bind_control(&shared.join("control")).expect_err("refused");
        assert!(
            err.to_string().contains("is not veil's own directory"),
            "{err}"
        );
        let mode = std::fs::metadata(&shared)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o1777);
        // A new directory is veil's: made 0700.
        let new = base.path().join("a/b");
        bind_control(&new.join("control")).expect("bound");
        let mode = std::fs::metadata(&new).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        // An existing private one is used as it is.
        let private = base.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        bind_control(&private.join("control")).expect("bound");
        let mode = std::fs::metadata(&private)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o750);
    }
}
