//! What every SOCKS5 session shares: the server's configuration, the sidecar's state, and each
//! owner's count of connections (an owner holds at most an eighth of the server's slots).

use super::passwords::PasswordFile;
use crate::datapath::state::Handle;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen. Without `passwords`, only a loopback address is accepted.
    pub listen: SocketAddr,
    /// RFC 1929 credentials; when set, every client must log in.
    pub passwords: Option<PasswordFile>,
    /// Clients served at once; more wait to be accepted.
    pub max_clients: usize,
    /// Time a client has to complete greeting, login and request.
    pub handshake_timeout: Duration,
    /// Time a CONNECT to a target may take.
    pub connect_timeout: Duration,
    /// Time sessions get to end after shutdown is requested.
    pub shutdown_grace: Duration,
}

impl Config {
    /// Defaults for a listener on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            passwords: None,
            max_clients: 16_384,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// What every SOCKS5 session shares: the server's configuration, the sidecar's state, and
/// each owner's count of connections.
#[derive(Debug)]
pub(super) struct Socks5 {
    pub(super) config: Config,
    pub(super) state: Handle,
    /// Open connections by owner (a local uid, or a remote client's IP), whatever their stage:
    /// no owner may hold more than [`Socks5::per_owner`] of the server's slots.
    pub(super) owners: Mutex<HashMap<Owner, u32>>,
}

/// Who holds a connection, as known before its handshake: the kernel names a local client's
/// uid; a remote client is known by its IP until it logs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    Uid(u32),
    Remote(IpAddr),
}

/// What a session holds until it ends: its owner's share and its place among the server's
/// `max_clients`.
pub(super) struct Hold {
    pub(super) _owner: OwnerSlot,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// One connection's place in its owner's count; released on drop.
pub(super) struct OwnerSlot {
    shared: Arc<Socks5>,
    owner: Owner,
}

impl Drop for OwnerSlot {
    fn drop(&mut self) {
        if let Ok(mut owners) = self.shared.owners.lock()
            && let Some(n) = owners.get_mut(&self.owner)
        {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.owner);
            }
        }
    }
}

impl Socks5 {
    /// How many of the server's connection slots one owner may hold: an eighth, so that one
    /// user's idle connections never keep the others waiting (at least 64).
    pub(super) fn per_owner(&self) -> u32 {
        u32::try_from(self.config.max_clients / 8)
            .unwrap_or(u32::MAX)
            .max(64)
    }

    /// Counts a new connection of `owner`, or None if it holds its share already.
    pub(super) fn take_owner_slot(self: &Arc<Self>, owner: Owner) -> Option<OwnerSlot> {
        let mut owners = self.owners.lock().ok()?;
        let n = owners.entry(owner).or_insert(0);
        if *n >= self.per_owner() {
            return None;
        }
        *n += 1;
        Some(OwnerSlot {
            shared: self.clone(),
            owner,
        })
    }
}
