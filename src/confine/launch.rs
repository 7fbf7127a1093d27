//! `veil run`: a person starts an app in their confined view.
//!
//! The unprivileged `veil run -- CMD ARGS…` connects to the daemon's launch socket and sends
//! its command line, environment and working directory, with its stdin, stdout and stderr as
//! file descriptors (`SCM_RIGHTS`), so the app uses the person's terminal. The daemon learns who
//! is asking from the kernel (`SO_PEERCRED`), never from the request: only a user with a view
//! gets one, and the app runs as exactly that user — their uid, primary group and the groups
//! the account database gives them — inside their view's network namespace and a mount
//! namespace of its own, where the view's resolv.conf replaces the host's and the host's
//! resolver sockets that cross network namespaces (systemd-resolved's varlink sockets, nscd,
//! avahi) are masked. The working directory is entered after the uid is dropped, so a request
//! cannot reach a directory its user could not. The app cannot leave the namespace (that needs
//! `CAP_SYS_ADMIN`) nor open a raw socket there that leaves (nothing leaves the view but what
//! veil carries).
//!
//! The client forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the app and exits with its exit
//! status (128 + N for a signal); if the client goes away, the app gets SIGHUP, as from a
//! closed terminal. Without the daemon, `veil run` fails at once and runs nothing.
//!
//! Wire format ([`Request`], [`Reply`]) sans IO: a request is a 4-byte big-endian length, then
//! NUL-terminated fields — `veil-run/1`, the working directory, the argument count, the
//! arguments, then `NAME=VALUE` environment entries. Replies are lines: `started PID`,
//! `exit N`, `signal N`, `error MESSAGE`; the client sends `signal N` lines.

use super::View;
use std::ffi::{CString, OsString};
use std::io::{self, BufRead, Write as _};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where the daemon listens for `veil run` unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/veil/launch";
const MAGIC: &[u8] = b"veil-run/1";
/// The largest request taken (arguments and environment together).
pub const MAX_REQUEST: usize = 256 * 1024;
/// How long a connected client may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Signals the client passes on to the app.
const FORWARDED: [nix::sys::signal::Signal; 4] = [
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGHUP,
    nix::sys::signal::Signal::SIGQUIT,
];
/// Sockets of host services that answer name lookups across network namespaces.
const MASKED_SOCKETS: [&str; 5] = [
    "/run/systemd/resolve/io.systemd.Resolve",
    "/run/systemd/resolve/io.systemd.Resolve.Monitor",
    "/run/nscd/socket",
    "/var/run/nscd/socket",
    "/run/avahi-daemon/socket",
];

/// What `veil run` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command and its arguments.
    pub argv: Vec<String>,
    /// The environment, as `(NAME, VALUE)`.
    pub env: Vec<(String, String)>,
    /// The working directory.
    pub cwd: String,
}

/// A request that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// It does not start as a `veil run` request does.
    #[error("not a veil run request")]
    Magic,
    /// Longer than [`MAX_REQUEST`].
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLarge,
    /// Fewer fields than it says.
    #[error("truncated request")]
    Truncated,
    /// A field that is not UTF-8.
    #[error("a field is not UTF-8")]
    Utf8,
    /// No command.
    #[error("no command to run")]
    Empty,
    /// An environment entry without `=`.
    #[error("an environment entry without '='")]
    Env,
}

impl Request {
    /// The request's bytes, its length first.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut field = |b: &[u8]| {
            body.extend_from_slice(b);
            body.push(0);
        };
        field(MAGIC);
        field(self.cwd.as_bytes());
        field(self.argv.len().to_string().as_bytes());
        for a in &self.argv {
            field(a.as_bytes());
        }
        for (k, v) in &self.env {
            field(format!("{k}={v}").as_bytes());
        }
        let mut out = u32::try_from(body.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes()
            .to_vec();
        out.extend(body);
        out
    }

    /// The length a request's first four bytes announce.
    pub fn announced(prefix: [u8; 4]) -> Result<usize, WireError> {
        let n = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| WireError::TooLarge)?;
        if n > MAX_REQUEST {
            return Err(WireError::TooLarge);
        }
        Ok(n)
    }

    /// A request from its body (the bytes after the length).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let body = body.strip_suffix(&[0]).ok_or(WireError::Truncated)?;
        let mut fields = body.split(|b| *b == 0);
        if fields.next() != Some(MAGIC) {
            return Err(WireError::Magic);
        }
        let mut text = || -> Result<String, WireError> {
            let f = fields.next().ok_or(WireError::Truncated)?;
            String::from_utf8(f.to_vec()).map_err(|_| WireError::Utf8)
        };
        let cwd = text()?;
        let argc: usize = text()?.parse().map_err(|_| WireError::Truncated)?;
        if argc == 0 {
            return Err(WireError::Empty);
        }
        let argv = (0..argc).map(|_| text()).collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for entry in fields {
            let entry = std::str::from_utf8(entry).map_err(|_| WireError::Utf8)?;
            let (k, v) = entry.split_once('=').ok_or(WireError::Env)?;
            env.push((k.to_owned(), v.to_owned()));
        }
        Ok(Self { argv, env, cwd })
    }
}

/// What the daemon tells `veil run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The app runs, with this pid.
    Started(u32),
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// Nothing was started, or the app could not be waited for.
    Error(String),
}

impl Reply {
    /// The reply's line.
    pub fn encode(&self) -> String {
        match self {
            Self::Started(pid) => format!("started {pid}\n"),
            Self::Exited(n) => format!("exit {n}\n"),
            Self::Signaled(n) => format!("signal {n}\n"),
            // One line: a message never spans two.
            Self::Error(m) => format!("error {}\n", m.replace('\n', " ")),
        }
    }

    /// A reply from its line.
    pub fn decode(line: &str) -> Option<Self> {
        let (word, rest) = line.trim_end().split_once(' ')?;
        match word {
            "started" => rest.parse().ok().map(Self::Started),
            "exit" => rest.parse().ok().map(Self::Exited),
            "signal" => rest.parse().ok().map(Self::Signaled),
            "error" => Some(Self::Error(rest.to_owned())),
            _ => None,
        }
    }
}

/// Why `veil run` could not run the app.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon answers at the socket.
    #[error("cannot reach the veil daemon at {path}: {source}; nothing was started")]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The command line, environment or directory cannot be sent.
    #[error("{0}")]
    Request(String),
    /// The daemon refused, or could not start the app.
    #[error("veil refused: {0}")]
    Refused(String),
    /// The connection failed while the app ran.
    #[error("lost the veil daemon: {0}")]
    Lost(io::Error),
}

/// Runs `argv` in the caller's confined view through the daemon at `socket`; returns the
/// app's exit status (128 + N when signal N ended it).
pub fn run(socket: &Path, argv: Vec<OsString>) -> Result<i32, ClientError> {
    let text = |o: OsString, what: &str| {
        o.into_string()
            .map_err(|o| ClientError::Request(format!("{what} {o:?} is not UTF-8")))
    };
    let request = Request {
        argv: argv
            .into_iter()
            .map(|a| text(a, "argument"))
            .collect::<Result<_, _>>()?,
        env: std::env::vars_os()
            .map(|(k, v)| Ok((text(k, "variable")?, text(v, "value")?)))
            .collect::<Result<_, ClientError>>()?,
        cwd: text(
            std::env::current_dir()
                .map_err(|e| ClientError::Request(format!("working directory: {e}")))?
                .into_os_string(),
            "working directory",
        )?,
    };
    if request.argv.is_empty() {
        return Err(ClientError::Request("no command to run".into()));
    }
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        ClientError::Unreachable {
            path: socket.to_owned(),
            source,
        }
    })?;
    let bytes = request.encode();
    let fds: [RawFd; 3] = [0, 1, 2];
    let sent = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(&bytes)],
        &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    );
    // Short of the whole request, the daemon has answered already (a refusal): read it below.
    if let Ok(n) = sent
        && n < bytes.len()
    {
        let _ = (&stream).write_all(bytes.get(n..).unwrap_or_default());
    }
    // Signals meant for the app: blocked here, taken by a thread that passes them on.
    let mut set = nix::sys::signal::SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    let _ = set.thread_block();
    let mut forward = stream.try_clone().map_err(ClientError::Lost)?;
    std::thread::spawn(move || {
        while let Ok(sig) = set.wait() {
            if forward
                .write_all(format!("signal {}\n", sig as i32).as_bytes())
                .is_err()
            {
                break;
            }
        }
    });
    for line in io::BufReader::new(stream).lines() {
        let line = line.map_err(ClientError::Lost)?;
        match Reply::decode(&line) {
            Some(Reply::Exited(n)) => return Ok(n),
            Some(Reply::Signaled(n)) => return Ok(128 + n),
            Some(Reply::Error(m)) => return Err(ClientError::Refused(m)),
            Some(Reply::Started(_)) | None => {}
        }
    }
    Err(ClientError::Lost(io::ErrorKind::UnexpectedEof.into()))
}

/// Serves `veil run` on `path` for the users of `views` until `shutdown`. The socket is open to
/// everyone (mode 0666): the kernel says who connected.
pub async fn serve(path: PathBuf, views: Vec<View>, shutdown: CancellationToken) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    info!(socket = %path.display(), "veil run ready");
    let views = Arc::new(views);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "veil run: accept failed");
                    continue;
                }
            },
        };
        let views = views.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            if let Err(message) = session(&mut stream, &views).await {
                let _ = stream
                    .write_all(Reply::Error(message).encode().as_bytes())
                    .await;
            }
        });
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// One `veil run`: who asks, what, then the app until it exits. Errors are for the client.
async fn session(stream: &mut UnixStream, views: &[View]) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell who is asking: {e}"))?;
    let uid = cred.uid();
    // Read first, even to refuse: a socket closed with unread data resets the client's end,
    // and the refusal would never be read. A connection that sends nothing holds no task for
    // long.
    let (request, fds) = tokio::time::timeout(REQUEST_TIMEOUT, receive(stream))
        .await
        .map_err(|_| "no request within 5 s".to_owned())??;
    let Some(view) = views.iter().find(|v| v.uid == uid) else {
        info!(uid, "veil run refused: no confined view for this user");
        return Err(format!(
            "uid {uid} has no confined view (sidecar.toml [transparent] confined)"
        ));
    };
    let mut command = confined_command(view, &request, fds)?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", request.argv[0]))?;
    let pid = child.id();
    info!(user = %view.user, pid, command = %request.argv[0], netns = %view.netns, "confined app started");
    stream
        .write_all(Reply::Started(pid).encode().as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let (read, mut write) = stream.split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut wait = tokio::task::spawn_blocking(move || child.wait());
    let mut client_gone = false;
    let status = loop {
        tokio::select! {
            status = &mut wait => break status,
            line = lines.next_line(), if !client_gone => {
                let sig = match line {
                    Ok(Some(l)) => match Reply::decode(&l) {
                        Some(Reply::Signaled(n)) => FORWARDED.into_iter().find(|s| *s as i32 == n),
                        _ => None,
                    },
                    // Its terminal (or launcher) is gone: a hang-up, as a terminal gives.
                    _ => {
                        client_gone = true;
                        Some(nix::sys::signal::Signal::SIGHUP)
                    }
                };
                if let (Some(sig), Ok(pid)) = (sig, i32::try_from(pid)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                }
            }
        }
    };
    let reply = match status {
        Ok(Ok(s)) => {
            use std::os::unix::process::ExitStatusExt as _;
            match (s.code(), s.signal()) {
                (Some(code), _) => Reply::Exited(code),
                (None, Some(sig)) => Reply::Signaled(sig),
                (None, None) => Reply::Exited(1),
            }
        }
        _ => Reply::Error("the app could not be waited for".into()),
    };
    info!(user = %view.user, pid, status = %reply.encode().trim_end(), "confined app ended");
    let _ = write.write_all(reply.encode().as_bytes()).await;
    Ok(())
}

/// Reads a request and the three descriptors that came with it.
async fn receive(stream: &UnixStream) -> Result<(Request, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; MAX_REQUEST + 4];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut wanted = None;
    while wanted.is_none_or(|n| got < n + 4) {
        stream.readable().await.map_err(|e| e.to_string())?;
        let read = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut space = nix::cmsg_space!([RawFd; 3]);
            let mut iov = [io::IoSliceMut::new(buf.get_mut(got..).unwrap_or_default())];
            let msg = nix::sys::socket::recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
                    fds.extend(raw.into_iter().map(crate::platform::received_fd));
                }
            }
            Ok(msg.bytes)
        });
        match read {
            Ok(0) => return Err("the request ended early".into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.to_string()),
        }
        if wanted.is_none() && got >= 4 {
            let prefix = [buf[0], buf[1], buf[2], buf[3]];
            wanted = Some(Request::announced(prefix).map_err(|e| e.to_string())?);
        }
    }
    let n = wanted.unwrap_or(0);
    let request =
        Request::decode(buf.get(4..4 + n).unwrap_or_default()).map_err(|e| e.to_string())?;
    if fds.len() != 3 {
        return Err("expected stdin, stdout and stderr with the request".into());
    }
    Ok((request, fds))
}

/// The command that starts `request` as the view's user inside the view, on `fds`.
fn confined_command(
    view: &View,
    request: &Request,
    mut fds: Vec<OwnedFd>,
) -> Result<std::process::Command, String> {
    let account = nix::unistd::User::from_uid(view.uid.into())
        .ok()
        .flatten()
        .ok_or_else(|| format!("uid {} is not in the account database", view.uid))?;
    let name = CString::new(account.name.as_bytes()).map_err(|e| e.to_string())?;
    let groups = nix::unistd::getgrouplist(&name, account.gid).map_err(|e| e.to_string())?;
    let netns = std::fs::File::open(view.netns_path())
        .map_err(|e| format!("the confined view {} is not there: {e}", view.netns))?;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string());
    let mut binds = Vec::new();
    if Path::new("/etc/resolv.conf").exists() {
        binds.push((
            c(&view.resolv_conf_path())?,
            c(Path::new("/etc/resolv.conf"))?,
        ));
    }
    for socket in MASKED_SOCKETS {
        if Path::new(socket).exists() {
            binds.push((c(Path::new("/dev/null"))?, c(Path::new(socket))?));
        }
    }
    let (stderr, stdout, stdin) = (fds.pop(), fds.pop(), fds.pop());
    let (Some(stdin), Some(stdout), Some(stderr)) = (stdin, stdout, stderr) else {
        return Err("expected stdin, stdout and stderr with the request".into());
    };
    let mut command = std::process::Command::new(&request.argv[0]);
    command
        .args(&request.argv[1..])
        .env_clear()
        .envs(request.env.iter().map(|(k, v)| (k, v)))
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    crate::platform::confine_child(
        &mut command,
        crate::platform::Confinement {
            netns: netns.into(),
            binds,
            uid: account.uid,
            gid: account.gid,
            groups,
            cwd: CString::new(request.cwd.as_bytes()).map_err(|e| e.to_string())?,
        },
    );
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let r = Request {
            argv: vec!["zoom".into(), "--url=x y".into()],
            env: vec![
                ("HOME".into(), "/home/a".into()),
                ("EMPTY".into(), String::new()),
            ],
            cwd: "/home/a".into(),
        };
        let bytes = r.encode();
        let n = Request::announced([bytes[0], bytes[1], bytes[2], bytes[3]]).expect("length");
        assert_eq!(n, bytes.len() - 4);
        assert_eq!(Request::decode(&bytes[4..]), Ok(r.clone()));
        assert_eq!(
            Request::decode(&bytes[4..bytes.len() - 1]),
            Err(WireError::Truncated)
        );
        assert_eq!(Request::decode(b"nope\0"), Err(WireError::Magic));
        assert_eq!(
            Request::decode(b"veil-run/1\0/\x000\0"),
            Err(WireError::Empty)
        );
        assert_eq!(
            Request::decode(b"veil-run/1\0/\x003\0a\0"),
            Err(WireError::Truncated)
        );
        assert_eq!(
            Request::decode(b"veil-run/1\0/\x001\0a\0NOEQ\0"),
            Err(WireError::Env)
        );
        assert_eq!(
            Request::decode(b"veil-run/1\0\xff\x001\0a\0"),
            Err(WireError::Utf8)
        );
        assert_eq!(
            Request::announced([0, 0x10, 0, 1]),
            Err(WireError::TooLarge)
        );
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Started(42),
            Reply::Exited(7),
            Reply::Signaled(15),
            Reply::Error("no view".into()),
        ] {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
        assert_eq!(
            Reply::decode(&Reply::Error("two\nlines".into()).encode()),
            Some(Reply::Error("two lines".into()))
        );
        assert_eq!(Reply::decode("gibberish"), None);
    }
}
