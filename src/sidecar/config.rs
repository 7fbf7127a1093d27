//! The sidecar's configuration file (`/etc/veil/sidecar.toml`), parsed and validated in one step.
//!
//! ```toml
//! listen = "127.0.0.1:1080"            # SOCKS5 listener
//! policy_dir = "/etc/veil/policies"
//! # passwords = "/etc/veil/socks-passwords"   # RFC 1929 logins (required beyond loopback)
//!
//! [relay]                              # without it, `relay` verdicts are dropped
//! address = "198.51.100.2:4433"
//! server_name = "relay.example.org"    # checked against the relay's certificate
//! ca = "ca.crt"                        # CA of the relay's certificate
//! certificate = "sidecar.crt"          # this sidecar's client certificate
//! private_key = "sidecar.key"
//!
//! # max_sessions = 16384               # SOCKS5 connections + app sockets held at once
//! # control = "/run/veil/control"     # `veil status` socket (root only)
//! # metrics = "127.0.0.1:9101"         # Prometheus text format; off by default, loopback only
//!
//! [transparent]                        # intercept these users' UDP in the kernel (TPROXY)
//! users = ["alice"]
//! groups = ["callers"]
//! cgroups = ["veil.slice"]             # and every process below these cgroups (per app)
//! # ports_file = "/run/veil/ports"     # each app socket's public port, kept across restarts
//! port = 15353                         # the listener on 127.0.0.1 and ::1
//! mark = 7697                          # fwmark and routing table (0x1e11)
//! confined = ["alice"]                 # a confined network view each (see `confine`), on
//!                                      # ports port+1, port+2… in this order
//! # netns_prefix = "veil-"             # alice's view is /run/netns/veil-alice
//! # confined_dns = "10.0.0.53:53"      # where their DNS goes, by policy like any flow
//!                                      # (default: the host's first resolv.conf nameserver)
//! # launch = "/run/veil/launch"        # where `veil run` asks (anyone may connect; the
//!                                      # kernel says who did)
//! ```
//! Relative paths are taken from the file's directory.

use crate::policy::load::line_column;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The relay a sidecar tunnels to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// The relay's QUIC address.
    pub address: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: String,
    /// CA certificate(s) of the relay (PEM).
    pub ca: PathBuf,
    /// The sidecar's client certificate (PEM).
    pub certificate: PathBuf,
    /// The sidecar's private key (PEM).
    pub private_key: PathBuf,
}

/// Who is intercepted transparently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransparentSettings {
    /// Managed user names.
    pub users: Vec<String>,
    /// Managed group names.
    pub groups: Vec<String>,
    /// Managed cgroups (v2), as paths below the cgroup root.
    pub cgroups: Vec<String>,
    /// Where each app socket's public port is kept (default: beside the control socket).
    pub ports_file: Option<PathBuf>,
    /// The TPROXY listener port.
    pub port: u16,
    /// The fwmark / routing table.
    pub mark: u32,
    /// Users whose apps run confined, each in a view of their own ([`crate::confine`]).
    pub confined: Vec<String>,
    /// The views' namespace names are this followed by the user's name.
    pub netns_prefix: String,
    /// Where confined apps' DNS queries go (None: the host's first resolver).
    pub confined_dns: Option<SocketAddr>,
    /// The socket `veil run` asks to start an app in the caller's view.
    pub launch: PathBuf,
}

impl TransparentSettings {
    /// The TPROXY listener port of the `index`th confined user's view (the ports after
    /// `port`), if it fits.
    pub fn view_port(&self, index: usize) -> Option<u16> {
        u16::try_from(index)
            .ok()
            .and_then(|i| self.port.checked_add(1)?.checked_add(i))
    }
}

/// A validated sidecar configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarConfig {
    /// The SOCKS5 listener.
    pub listen: SocketAddr,
    /// The policy directory.
    pub policy_dir: PathBuf,
    /// RFC 1929 password file.
    pub passwords: Option<PathBuf>,
    /// The relay, if any.
    pub relay: Option<RelaySettings>,
    /// Transparent interception, if any.
    pub transparent: Option<TransparentSettings>,
    /// The `veil status` control socket (default `/run/veil/control`).
    pub control: Option<PathBuf>,
    /// The Prometheus endpoint (loopback only); off when unset.
    pub metrics: Option<SocketAddr>,
    /// SOCKS5 connections served at once (each UDP association holds one); more wait.
    pub max_sessions: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<Spanned<String>>,
    policy_dir: Option<String>,
    passwords: Option<String>,
    relay: Option<RawRelay>,
    transparent: Option<RawTransparent>,
    control: Option<String>,
    metrics: Option<Spanned<String>>,
    max_sessions: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransparent {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    cgroups: Vec<String>,
    ports_file: Option<String>,
    port: Option<u16>,
    mark: Option<u32>,
    #[serde(default)]
    confined: Vec<Spanned<String>>,
    netns_prefix: Option<Spanned<String>>,
    confined_dns: Option<Spanned<String>>,
    launch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    address: Spanned<String>,
    server_name: Option<String>,
    ca: String,
    certificate: String,
    private_key: String,
}

impl SidecarConfig {
    /// Parses configuration text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let shown = path.display();
        let at = |span: std::ops::Range<usize>, field: &str, msg: &str| {
            let (line, column) = line_column(text, span.start);
            format!("{shown}:{line}:{column}: {field}: {msg}")
        };
        let raw: Raw = toml::from_str(text)
            .map_err(|e| at(e.span().unwrap_or(0..0), "(file)", e.message().trim()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let listen = match raw.listen {
            Some(l) => l.get_ref().parse().map_err(|_| {
                at(
                    l.span(),
                    "listen",
                    &format!("expected IP:PORT, found {:?}", l.get_ref()),
                )
            })?,
            None => SocketAddr::from(([127, 0, 0, 1], 1080)),
        };
        let relay = match raw.relay {
            Some(r) => {
                let address: SocketAddr = r.address.get_ref().parse().map_err(|_| {
                    at(
                        r.address.span(),
                        "relay.address",
                        &format!("expected IP:PORT, found {:?}", r.address.get_ref()),
                    )
                })?;
                Some(RelaySettings {
                    address,
                    server_name: r.server_name.unwrap_or_else(|| address.ip().to_string()),
                    ca: base.join(r.ca),
                    certificate: base.join(r.certificate),
                    private_key: base.join(r.private_key),
                })
            }
            None => None,
        };
        let transparent = match raw.transparent {
            Some(t) => {
                let confined_dns = match &t.confined_dns {
                    Some(d) => Some(d.get_ref().parse::<SocketAddr>().map_err(|_| {
                        at(
                            d.span(),
                            "transparent.confined_dns",
                            &format!("expected IP:PORT, found {:?}", d.get_ref()),
                        )
                    })?),
                    None => None,
                };
                let settings = TransparentSettings {
                    confined_dns,
                    launch: t.launch.as_ref().map_or_else(
                        || PathBuf::from(crate::confine::launch::DEFAULT_SOCKET),
                        |l| base.join(l),
                    ),
                    users: t.users,
                    groups: t.groups,
                    cgroups: t.cgroups,
                    ports_file: t.ports_file.map(|p| base.join(p)),
                    port: t.port.unwrap_or(crate::firewall::DEFAULT_PORT),
                    mark: t.mark.unwrap_or(crate::firewall::DEFAULT_MARK),
                    confined: t.confined.iter().map(|c| c.get_ref().clone()).collect(),
                    netns_prefix: t.netns_prefix.as_ref().map_or_else(
                        || crate::confine::DEFAULT_PREFIX.to_owned(),
                        |p| p.get_ref().clone(),
                    ),
                };
                // Each view's name and listener port, checked here so the error has a line.
                for (index, user) in t.confined.iter().enumerate() {
                    let port = settings.view_port(index).ok_or_else(|| {
                        at(
                            user.span(),
                            "transparent.confined",
                            &format!(
                                "no listener port left after {} for {:?}",
                                settings.port,
                                user.get_ref()
                            ),
                        )
                    })?;
                    if let Err(e) =
                        crate::confine::View::new(user.get_ref(), 1, &settings.netns_prefix, port)
                    {
                        let span = t.netns_prefix.as_ref().map_or(user.span(), Spanned::span);
                        return Err(at(span, "transparent.confined", &e.to_string()));
                    }
                }
                Some(settings)
            }
            None => None,
        };
        let metrics = match raw.metrics {
            Some(m) => match m.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => Some(a),
                _ => {
                    return Err(at(
                        m.span(),
                        "metrics",
                        &format!("expected a loopback IP:PORT, found {:?}", m.get_ref()),
                    ));
                }
            },
            None => None,
        };
        Ok(Self {
            max_sessions: raw.max_sessions.unwrap_or(16_384),
            transparent,
            control: raw.control.map(|c| base.join(c)),
            metrics,
            listen,
            policy_dir: base.join(
                raw.policy_dir
                    .unwrap_or_else(|| "/etc/veil/policies".to_owned()),
            ),
            passwords: raw.passwords.map(|p| base.join(p)),
            relay,
        })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults_and_relative_paths() {
        let text = "policy_dir = \"policies\"\n[relay]\naddress = \"198.51.100.2:4433\"\nca = \"ca.crt\"\ncertificate = \"s.crt\"\nprivate_key = \"s.key\"\n";
        let c = SidecarConfig::parse(Path::new("/etc/veil/sidecar.toml"), text).expect("valid");
        assert_eq!(c.listen, SocketAddr::from(([127, 0, 0, 1], 1080)));
        assert_eq!(c.policy_dir, Path::new("/etc/veil/policies"));
        let relay = c.relay.expect("relay");
        assert_eq!(relay.server_name, "198.51.100.2");
        assert_eq!(relay.ca, Path::new("/etc/veil/ca.crt"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = SidecarConfig::parse(Path::new("s.toml"), "[relay]\naddress = \"nowhere\"\nca = \"a\"\ncertificate = \"b\"\nprivate_key = \"c\"\n").expect_err("bad");
        assert_eq!(
            e,
            "s.toml:2:11: relay.address: expected IP:PORT, found \"nowhere\""
        );
        let e = SidecarConfig::parse(
            Path::new("s.toml"),
            "[transparent]\nconfined = [\"alice\", \"../x\"]\n",
        )
        .expect_err("bad");
        assert!(
            e.starts_with("s.toml:2:22: transparent.confined: confined view \"veil-../x\""),
            "{e}"
        );
        let e = SidecarConfig::parse(
            Path::new("s.toml"),
            "[transparent]\nport = 65535\nconfined = [\"alice\"]\n",
        )
        .expect_err("bad");
        assert!(e.contains("no listener port left after 65535"), "{e}");
        let c = SidecarConfig::parse(
            Path::new("s.toml"),
            "[transparent]\nconfined = [\"alice\", \"bob\"]\n",
        )
        .expect("valid");
        let t = c.transparent.expect("transparent");
        assert_eq!(
            (t.view_port(0), t.view_port(1)),
            (Some(15_354), Some(15_355))
        );
        assert_eq!((t.netns_prefix.as_str(), t.confined_dns), ("veil-", None));
        let e = SidecarConfig::parse(
            Path::new("s.toml"),
            "[transparent]\nconfined_dns = \"resolver\"\n",
        )
        .expect_err("bad");
        assert_eq!(
            e,
            "s.toml:2:16: transparent.confined_dns: expected IP:PORT, found \"resolver\""
        );
        let e = SidecarConfig::parse(Path::new("s.toml"), "lisen = \"x\"\n").expect_err("bad");
        assert!(
            e.starts_with("s.toml:1:1: (file): unknown field `lisen`"),
            "{e}"
        );
    }
}
