//! veil: a policy-enforcing UDP privacy sidecar for calling apps.
//!
//! The library holds all logic; `src/main.rs` is a thin command-line shell around it.

pub mod control;
pub mod firewall;
pub mod identity;
pub mod intercept;
pub mod masque;
pub mod notify;
pub mod pki;
pub mod policy;
pub mod rate;
pub mod relay;
pub mod sidecar;
pub mod socks5;
pub mod status;
pub mod traffic;
pub mod tunnel;

/// Raises the soft open-file limit to the hard limit: a proxy holds a few sockets per
/// association, and 1024 would cap it at a few hundred.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
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
