//! The transparent path, in network namespaces the benchmark makes (needs root and nftables):
//!
//! ```text
//! namespace c (192.0.2.2)                                   router      namespace e
//!   app socket of `nobody` ──TPROXY──▶ veil sidecar ──QUIC over lo──▶ veil relay ──▶ UDP echo
//! ```
//!
//! The app socket is an ordinary UDP socket created as uid 65534 (`setfsuid` on the creating
//! thread), so the sidecar's nftables rules intercept it like any managed user's. The relay
//! shares the client's namespace (its QUIC stays on lo, as the SOCKS5 row's does) and reaches
//! the echo across two veth links and a router, so the same run also measures direct UDP over
//! that route as this row's floor.

use super::netns::{Topology, in_netns};
use super::{Daemon, Direct, Echo, Path2, bench_socket, start_relay, start_sidecar};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENT_IP: &str = "192.0.2.2";
const ECHO_BIND: &str = "203.0.113.2:0";

/// The namespaces, the two daemons in `c` and the echo in `e`; all torn down on drop.
pub(crate) struct Transparent {
    pub(crate) sidecar: Daemon,
    pub(crate) relay: Daemon,
    echo: Echo,
    // Dropped last: the daemons and the echo's socket live in its namespaces.
    topology: Topology,
}

/// Starts everything, or says why not (not root: namespaces and nftables need it).
pub(crate) fn start(pki: &Path, dir: &Path) -> Result<Transparent, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (network namespaces, nftables)".into());
    }
    let mut topology = Topology::new();
    topology
        .host("c", &format!("{CLIENT_IP}/24"), "192.0.2.1/24")
        .host("e", "203.0.113.2/24", "203.0.113.1/24");
    let (c, e) = (topology.ns("c"), topology.ns("e"));
    let echo = in_netns(Some(&e), || Echo::start(ECHO_BIND));

    let allow = format!("public_address = \"{CLIENT_IP}\"\nallow = [\"203.0.113.0/24\"]\n");
    let (relay, relay_addr) = start_relay(Some(&c), pki, "relay-t", &allow);
    let managed = "[transparent]\nusers = [\"nobody\"]\n";
    let (sidecar, _) = start_sidecar(Some(&c), pki, dir, "sidecar-t", relay_addr, managed);
    let t = Transparent {
        sidecar,
        relay,
        echo,
        topology,
    };
    // Up once an intercepted datagram comes back (the tunnel connects after the listener).
    let app = t.app();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    loop {
        app.send(b"up?");
        if app.recv(&mut buf).is_some() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err("no echo through the transparent path within 15 s".into());
        }
    }
}

impl Transparent {
    fn socket(&self, fsuid: Option<u32>) -> Arc<dyn Path2> {
        let echo = self.echo.addr;
        let socket = in_netns(Some(&self.topology.ns("c")), move || {
            // Sockets belong to the filesystem uid of the thread that makes them.
            if let Some(uid) = fsuid {
                nix::unistd::setfsuid(nix::unistd::Uid::from_raw(uid));
            }
            let s = bench_socket("0.0.0.0:0");
            s.connect(echo).expect("connect");
            s
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Arc::new(Direct { socket })
    }

    /// The namespaces: the app's, both daemons' and the router's near side; the echo's.
    pub(crate) fn namespaces(&self) -> [String; 2] {
        [self.topology.ns("c"), self.topology.ns("e")]
    }

    /// An unmodified app's socket: `nobody`'s, intercepted.
    pub(crate) fn app(&self) -> Arc<dyn Path2> {
        self.socket(Some(65534))
    }

    /// Root's socket on the same route, not intercepted: this row's floor.
    pub(crate) fn direct(&self) -> Arc<dyn Path2> {
        self.socket(None)
    }
}
