//! A whole sidecar, as the `veil sidecar` daemon (and `veil up`) runs it: bound, run until
//! shut down, reloaded, asked for status.
//!
//! The tasks of a running sidecar, on one runtime thread:
//!
//! - the tunnel's connection manager ([`Tunnel`]): keeps one QUIC connection to the relay,
//!   replaces it when the relay falls silent; one task per bind request stream;
//! - the SOCKS5 accept loop ([`Server::run`]), one task per client connection; a UDP
//!   ASSOCIATE's task runs its `Pipeline` (`crate::datapath::pipeline`) to the end;
//! - with `[transparent]`: the TPROXY listener ([`crate::intercept::run`]), one task per
//!   intercepted app socket (each its own pipeline), and the kill switch's guard
//!   ([`crate::firewall::guard`]); one more listener per confined view ([`crate::confine`]);
//! - the control socket and the metrics endpoint, if configured; the systemd watchdog and the
//!   readiness announcement.
//!
//! Every task stops on one cancellation token; [`Sidecar::run`] then waits for the SOCKS5
//! sessions' grace period and logs the final counts.

use super::config::SidecarConfig;
use super::managed;
use crate::confine::{Resolver, View};
use crate::datapath::state::Handle;
use crate::firewall::{self, Interception};
use crate::intercept::Apps;
use crate::policy::Policy;
use crate::socks5::passwords::{self, PasswordFile};
use crate::socks5::server::{self, Server};
use crate::tunnel::{Tunnel, TunnelConfig, TunnelState};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Why a sidecar cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The SOCKS5 password file.
    #[error(transparent)]
    Passwords(#[from] passwords::Error),
    /// A certificate or key of the tunnel.
    #[error(transparent)]
    Pki(#[from] crate::pki::Error),
    /// The managed users, groups or cgroups.
    #[error(transparent)]
    Managed(#[from] managed::Error),
    /// The kill switch could not be put in place.
    #[error(transparent)]
    Firewall(#[from] firewall::Error),
    /// The SOCKS5 listener.
    #[error(transparent)]
    Listen(#[from] server::Error),
    /// The tunnel's socket.
    #[error("starting the tunnel: {0}")]
    Tunnel(std::io::Error),
}

/// Everything a sidecar runs with, files already read and names resolved.
#[derive(Debug)]
pub struct Settings {
    /// The SOCKS5 listener.
    pub socks5: server::Config,
    /// The relay; without it, `relay` verdicts are dropped (fail closed).
    pub tunnel: Option<TunnelConfig>,
    /// Transparent interception: the firewall's managed set.
    pub interception: Option<Interception>,
    /// Where the transparent listener keeps each app socket's public port.
    pub ports_file: Option<PathBuf>,
    /// Confined views (their host ends are in `interception`).
    pub views: Vec<View>,
    /// Where confined apps' DNS queries go.
    pub confined_dns: Option<SocketAddr>,
    /// The `veil run` socket (with views only).
    pub launch: Option<PathBuf>,
    /// The `veil status` socket.
    pub control: Option<PathBuf>,
    /// The Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
    /// The managed users, groups and cgroups, as `veil status` names them.
    pub managed: Vec<String>,
}

impl Settings {
    /// A SOCKS5 listener on `listen`, nothing else.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            socks5: server::Config::new(listen),
            tunnel: None,
            interception: None,
            ports_file: None,
            views: Vec::new(),
            confined_dns: None,
            launch: None,
            control: None,
            metrics: None,
            managed: Vec::new(),
        }
    }

    /// What `config` says, with its password file and certificates read and its managed
    /// names resolved on this host.
    pub fn from_config(config: &SidecarConfig) -> Result<Self, Error> {
        let mut socks5 = server::Config::new(config.listen);
        socks5.max_clients = config.max_sessions;
        if let Some(path) = &config.passwords {
            socks5.passwords = Some(PasswordFile::load(path)?);
        }
        let tunnel = match &config.relay {
            Some(relay) => Some(TunnelConfig {
                relay: relay.address,
                server_name: relay.server_name.clone(),
                client: crate::pki::client_config_from_files(
                    &relay.ca,
                    &relay.certificate,
                    &relay.private_key,
                )?,
            }),
            None => None,
        };
        let own = managed::own_cgroup();
        let interception = match &config.transparent {
            Some(t) => Some(managed::resolve(t, &managed::System, &own)?),
            None => None,
        };
        let views = match &config.transparent {
            Some(t) => managed::views(t, &managed::System)?,
            None => Vec::new(),
        };
        let confined_dns = config.transparent.as_ref().and_then(|t| {
            t.confined_dns.or_else(|| {
                let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                crate::confine::host_resolver(&conf)
            })
        });
        let control = crate::control::socket_path(config.control.as_ref());
        let ports_file = config.transparent.as_ref().map(|t| {
            t.ports_file.clone().unwrap_or_else(|| {
                control
                    .parent()
                    .unwrap_or(Path::new("/run/veil"))
                    .join("ports")
            })
        });
        Ok(Self {
            socks5,
            tunnel,
            interception,
            ports_file,
            launch: config
                .transparent
                .as_ref()
                .filter(|_| !views.is_empty())
                .map(|t| t.launch.clone()),
            views,
            confined_dns,
            control: Some(control),
            metrics: config.metrics,
            managed: config
                .transparent
                .as_ref()
                .map(managed::names)
                .unwrap_or_default(),
        })
    }
}

/// A bound sidecar, ready to [`run`](Sidecar::run).
#[derive(Debug)]
pub struct Sidecar {
    server: Server,
    handle: Handle,
    interception: Option<Interception>,
    ports_file: Option<PathBuf>,
    views: Vec<View>,
    confined_dns: Option<SocketAddr>,
    launch: Option<PathBuf>,
    control: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    managed: Vec<String>,
    /// Stops every task of the sidecar.
    token: CancellationToken,
}

impl Sidecar {
    /// Starts the tunnel (it connects in the background), installs the kill switch (from here
    /// on managed users' UDP leaves only through veil) and binds the SOCKS5 listener.
    pub async fn bind(settings: Settings, policy: Policy) -> Result<Self, Error> {
        let token = CancellationToken::new();
        // Whatever fails below, the tunnel started here stops with the token.
        let guard = token.clone().drop_guard();
        let tunnel = match settings.tunnel {
            Some(config) => Some(Tunnel::start(config, token.clone()).map_err(Error::Tunnel)?),
            None => {
                warn!("no [relay] configured: `relay` verdicts are dropped (fail closed)");
                None
            }
        };
        if let Some(i) = &settings.interception {
            firewall::install(i)?;
            info!(managed = ?settings.managed, port = i.port, "firewall installed");
        }
        // After the firewall: a view's packets meet its rules from the moment it exists. A
        // view that cannot be built stops only its own apps (nothing of theirs leaves
        // without it), not everyone else's SOCKS5 and interception.
        for v in &settings.views {
            match crate::confine::ensure(v) {
                Ok(ensured) => {
                    info!(user = %v.user, netns = %v.netns_path().display(), device = %v.device, port = v.port, dns = ?settings.confined_dns, ?ensured, "confined view ready")
                }
                Err(e) => {
                    error!(user = %v.user, netns = %v.netns_path().display(), error = %e, "confined view not built: its apps cannot reach anything")
                }
            }
        }
        let handle = Handle::new(policy, tunnel);
        let server = Server::bind(settings.socks5, handle.clone()).await?;
        guard.disarm();
        Ok(Self {
            server,
            handle,
            interception: settings.interception,
            ports_file: settings.ports_file,
            views: settings.views,
            confined_dns: settings.confined_dns,
            launch: settings.launch,
            control: settings.control,
            metrics: settings.metrics,
            managed: settings.managed,
            token,
        })
    }

    /// The SOCKS5 listener's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// A handle for counters and status.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// What reloads this sidecar's policy (and its firewall with it).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            handle: self.handle.clone(),
            interception: self.interception.clone(),
        }
    }

    /// Runs every task until `shutdown` completes, then stops them, gives SOCKS5 sessions
    /// their grace period and logs the final counts.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            server,
            handle,
            interception,
            ports_file,
            views,
            confined_dns,
            launch,
            control,
            metrics,
            managed,
            token,
        } = self;
        if let Some(path) = launch {
            let (views, t) = (views.clone(), token.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::confine::launch::serve(path.clone(), views, t).await {
                    error!(socket = %path.display(), error = %e, "veil run is not available");
                }
            });
        }
        if let Some(i) = interception {
            for v in views {
                let (h, t) = (handle.clone(), token.clone());
                // Every view has the same app address: each keeps its own table of ports.
                let ports = crate::intercept::PublicPorts::load(
                    ports_file.as_ref().map(|p| p.with_extension(&v.user)),
                );
                let resolver = Resolver {
                    upstream: confined_dns,
                };
                let apps = Apps::View {
                    uid: v.uid,
                    device: v.device.clone(),
                    resolver,
                };
                {
                    let (h, t, user) = (handle.clone(), token.clone(), v.user.clone());
                    tokio::spawn(async move {
                        if let Err(e) =
                            crate::intercept::tcp::run(h, v.port, v.uid, resolver, t).await
                        {
                            error!(user = %user, "{e}; the confined view's TCP is dropped by the firewall");
                        }
                    });
                }
                tokio::spawn(async move {
                    if let Err(e) = crate::intercept::run(h, v.port, apps, ports, t).await {
                        error!(user = %v.user, "{e}; the confined view's UDP is dropped by the firewall");
                    }
                });
            }
            let (h, t) = (handle.clone(), token.clone());
            let ports = crate::intercept::PublicPorts::load(ports_file);
            tokio::spawn(async move {
                if let Err(e) = crate::intercept::run(h, i.port, Apps::Host, ports, t).await {
                    error!("{e}; managed users' UDP is dropped by the firewall");
                }
            });
            tokio::spawn(firewall::guard::run(i, token.clone()));
        }
        if let Ok(addr) = server.local_addr() {
            info!(listen = %addr, "veil sidecar ready (SOCKS5)");
        }
        if let Some(path) = control {
            match crate::control::bind_control(&path) {
                Ok(listener) => {
                    tokio::spawn(crate::control::serve_control(
                        listener,
                        handle.clone(),
                        managed,
                        token.clone(),
                    ));
                }
                // Status is for people; proxying goes on without it.
                Err(e) => {
                    warn!(socket = %path.display(), error = %e, "no control socket: veil status will not answer")
                }
            }
        }
        if let Some(addr) = metrics {
            let (h, t) = (handle.clone(), token.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::control::serve_metrics(addr, h, t).await {
                    error!(error = %e, "metrics endpoint failed");
                }
            });
        }
        let run = tokio::spawn(server.run(token.clone()));
        tokio::spawn(announce_ready(handle.tunnel().cloned()));
        tokio::spawn(crate::notify::watchdog(token.clone()));
        shutdown.await;
        info!("shutting down");
        let _ = crate::notify::notify("STOPPING=1");
        token.cancel();
        let _ = run.await;
        for (name, value) in handle.counters().snapshot() {
            info!(counter = name, value, "final count");
        }
    }
}

/// Tells systemd the sidecar is ready once the tunnel is up (or at once without a relay).
async fn announce_ready(tunnel: Option<Tunnel>) {
    if let Some(t) = tunnel {
        let _ = crate::notify::notify("STATUS=waiting for the relay; managed traffic is blocked");
        while !t
            .wait_for(TunnelState::Connected, std::time::Duration::from_secs(3600))
            .await
        {}
    }
    let _ = crate::notify::notify("READY=1\nSTATUS=serving");
}

/// Reloads a running sidecar: the firewall first, in one transaction, then the policy. If the
/// firewall cannot be applied the policy is not swapped either, so the running policy and
/// ruleset stay together.
#[derive(Debug, Clone)]
pub struct Reloader {
    handle: Handle,
    interception: Option<Interception>,
}

impl Reloader {
    /// Applies the firewall (with the managed users' session slices as they are now) and then
    /// `policy`; returns the policy's new generation.
    pub fn reload(&self, policy: Policy) -> Result<u64, firewall::Error> {
        if let Some(i) = &self.interception {
            let mut i = i.clone();
            i.inbound_cgroups = firewall::user_slices(&i.routed_uids);
            firewall::install(&i)?;
        }
        Ok(self.handle.reload(policy))
    }
}
