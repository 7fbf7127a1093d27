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
