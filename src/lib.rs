//! veil: a policy-enforcing UDP privacy sidecar for calling apps, and the relay it tunnels to.
//!
//! The library holds all logic; `src/main.rs` is a thin command-line shell around it. Sans-IO
//! cores (bytes and `now` in, decisions out) sit under thin tokio shells.
//!
//! # Crate map
//!
//! The sidecar (one machine's calls):
//! - [`sidecar`]: [`sidecar::Sidecar`] (bind, run, reload, status), which puts the rest
//!   together; [`sidecar::managed`] (who is intercepted), [`sidecar::config`] (`sidecar.toml`).
//! - [`datapath`]: what every front-end shares: [`datapath::state`] (counters, drop reasons,
//!   policy generation, session slots), [`datapath::association`] (one app socket's flows;
//!   the sans-IO routing step), `datapath::pipeline` (the datagram pipeline of one app
//!   socket), `datapath::binding` (its relay bind, held while it opens).
//! - Front-ends, which only receive from and deliver to apps: [`socks5`] (RFC 1928/1929:
//!   codec, password file, server) and [`intercept`] (TPROXY: one task per app socket).
//! - [`tunnel`]: the QUIC connection to the relay, its binds and TCP requests.
//! - [`policy`]: per-user policy files, loaded and decided; [`traffic`] classifies a flow's
//!   first packet.
//! - [`firewall`]: the kernel kill switch (nftables, policy routing, the eBPF egress lock) and
//!   its guard; [`confine`]: confined network views (a namespace per user with placeholder
//!   addresses), the third way in.
//! - [`control`] (`veil status`, metrics), [`status`] (their text), [`notify`] (systemd),
//!   [`identity`] (who owns a socket: sock_diag).
//!
//! The relay:
//! - [`relay`]: shards, connections, requests, binds, TCP, quotas, permissions, egress.
//! - [`masque`]: MASQUE's wire formats and per-request context tables, sans IO.
//!
//! Shared:
//! - [`pki`]: certificates and TLS configurations; [`rate`]: the token bucket; [`command`]:
//!   running `nft` and `ip`.
//! - `batch` (recvmmsg / GSO sends), `pump` (TCP over a request stream), `reuseport`
//!   (steering QUIC packets to shards), `platform` (the one module with `unsafe`: bpf(2),
//!   socket options).

pub(crate) mod batch;
pub mod command;
pub mod confine;
pub mod control;
pub mod datapath;
pub mod firewall;
pub mod identity;
pub mod intercept;
pub mod masque;
pub mod notify;
pub mod pki;
mod platform;
pub mod policy;
mod pump;
pub mod rate;
pub mod relay;
pub(crate) mod reuseport;
pub mod sidecar;
pub mod socks5;
pub mod status;
pub mod traffic;
pub mod tunnel;

/// Raises the open-file limit: a proxy holds two sockets per association, and 1024 would cap
/// it at a few hundred. Root (or `CAP_SYS_RESOURCE`) may go up to `fs.nr_open`; anyone else
/// gets the hard limit.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && (ceiling <= hard || setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_err())
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Kernel buffer sizes for sockets that carry media: a video key frame arrives as a burst of
/// dozens of 1200-byte packets, and the default (~208 KiB, about 90 such packets) overflows
/// when a burst meets a busy thread. The kernel caps them at `net.core.[rw]mem_max`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SocketBuffers {
    /// A socket of one app association or relay bind.
    PerAssociation,
    /// A socket shared by every association: a QUIC endpoint, a TPROXY listener.
    Shared,
}

impl SocketBuffers {
    /// Applies the sizes to `socket`; a refusal only leaves the default sizes.
    pub(crate) fn apply<S: std::os::fd::AsFd>(self, socket: &S) {
        let bytes = match self {
            Self::PerAssociation => 512 << 10,
            Self::Shared => 4 << 20,
        };
        let s = socket2::SockRef::from(socket);
        let _ = s.set_recv_buffer_size(bytes);
        let _ = s.set_send_buffer_size(bytes);
    }
}

/// Room kept in front of a received payload for the largest header a proxy puts before it
/// (a SOCKS5 UDP header with an IPv6 address; an HTTP datagram prefix with one).
pub(crate) const HEADROOM: usize = 64;

thread_local! {
    /// One receive buffer per runtime thread, shared by every association on it, so an idle
    /// association holds no buffer at all.
    static BUFFER: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; HEADROOM + 65_536].into_boxed_slice());
}

/// Runs `f` with this thread's receive buffer (`HEADROOM` + 64 KiB). `f` must not await: the
/// buffer belongs to whichever association the thread runs next.
pub(crate) fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUFFER.with_borrow_mut(|b| f(b))
}
