//! The relay's configuration file (`/etc/veil/relay.toml`): parsed and validated in one step;
//! every error names the file, line, column and field. A malformed allow entry stops startup.

use crate::policy::load::line_column;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Which peers may send to a bind's public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InboundFilter {
    /// Only IP addresses the client has sent to (like TURN permissions). The default.
    AddressDependent,
    /// Anyone (full cone).
    EndpointIndependent,
}

/// Per-user and global limits. All are non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Open binds (CONNECT-UDP requests) per user.
    pub binds_per_user: u32,
    /// Open binds in all.
    pub binds_total: u32,
    /// Datagrams per second per user, both directions.
    pub packets_per_second_per_user: u32,
    /// Bytes per second per user, both directions.
    pub bytes_per_second_per_user: u32,
    /// A bind with no traffic for this long is closed (at least two minutes, RFC 9298 §3.1).
    pub idle_timeout: Duration,
    /// Compressed contexts per bind.
    pub contexts_per_bind: u32,
    /// Distinct peer addresses a bind may send to.
    pub peers_per_bind: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            binds_per_user: 64,
            binds_total: 20_000,
            packets_per_second_per_user: 20_000,
            bytes_per_second_per_user: 25_000_000,
            idle_timeout: Duration::from_secs(300),
            contexts_per_bind: 64,
            peers_per_bind: 1024,
        }
    }
}

/// A validated relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The QUIC listener.
    pub listen: SocketAddr,
    /// The address binds use and announce in `proxy-public-address`.
    pub public_address: IpAddr,
    /// The relay's certificate chain (PEM file).
    pub certificate: PathBuf,
    /// The relay's private key (PEM file).
    pub private_key: PathBuf,
    /// CA that signs sidecars' client certificates (PEM file).
    pub client_ca: PathBuf,
    /// Exceptions to the egress deny list.
    pub allow: Vec<IpNet>,
    /// Who may send to a bind.
    pub inbound_filter: InboundFilter,
    /// Limits.
    pub quotas: Quotas,
    /// Threads serving the QUIC port, each with its own socket and connections (1 to 64;
    /// default: one per CPU).
    pub threads: u8,
    /// Which users each sidecar certificate (by common name) may speak for; `None`: any
    /// certificate signed by `client_ca` may speak for any user.
    pub speaks_for: Option<std::collections::HashMap<String, Vec<String>>>,
}

impl RelayConfig {
    /// The relay `veil up` embeds: on an ephemeral loopback port, sending from 127.0.0.1, one
    /// thread (it shares the sidecar's), allowed to reach the special-purpose ranges in
    /// `allow`. Certificates are given to it directly, not read from files.
    pub fn embedded(allow: Vec<IpNet>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            public_address: [127, 0, 0, 1].into(),
            certificate: PathBuf::new(),
            private_key: PathBuf::new(),
            client_ca: PathBuf::new(),
            allow,
            inbound_filter: InboundFilter::AddressDependent,
            quotas: Quotas::default(),
            threads: 1,
            speaks_for: None,
        }
    }

    /// Whether a sidecar whose certificate's common name is `identity` may act for `user`.
    pub fn may_speak_for(&self, identity: Option<&str>, user: &str) -> bool {
        match (&self.speaks_for, identity) {
            (None, _) => true,
            (Some(map), Some(cn)) => map
                .get(cn)
                .is_some_and(|users| users.iter().any(|u| u == user || u == "*")),
            (Some(_), None) => false,
        }
    }
}

/// One thread per CPU the relay may run on, at most [`crate::reuseport::MAX_SHARDS`].
pub fn default_threads() -> u8 {
    std::thread::available_parallelism()
        .map_or(1, |n| {
            n.get().min(usize::from(crate::reuseport::MAX_SHARDS))
        })
        .try_into()
        .unwrap_or(1)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Spanned<String>,
    public_address: Option<Spanned<String>>,
    certificate: String,
    private_key: String,
    client_ca: String,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    inbound_filter: Option<InboundFilter>,
    threads: Option<Spanned<i64>>,
    quotas: Option<RawQuotas>,
    speaks_for: Option<std::collections::HashMap<String, Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    binds_per_user: Option<Spanned<i64>>,
    binds_total: Option<Spanned<i64>>,
    packets_per_second_per_user: Option<Spanned<i64>>,
    bytes_per_second_per_user: Option<Spanned<i64>>,
    idle_timeout_seconds: Option<Spanned<i64>>,
    contexts_per_bind: Option<Spanned<i64>>,
    peers_per_bind: Option<Spanned<i64>>,
}

/// Every error in a relay configuration, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigErrors(pub Vec<String>);

impl RelayConfig {
    /// Parses configuration text; `path` names the file in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let shown = path.display().to_string();
        let at = |span: std::ops::Range<usize>, field: &str, msg: String| {
            let (line, column) = line_column(text, span.start);
            format!("{shown}:{line}:{column}: {field}: {msg}")
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            ConfigErrors(vec![at(span, "(file)", e.message().trim().to_owned())])
        })?;
        let mut errors = Vec::new();
        let listen = match raw.listen.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                errors.push(at(
                    raw.listen.span(),
                    "listen",
                    format!("expected IP:PORT, found {:?}", raw.listen.get_ref()),
                ));
                None
            }
        };
        let public_address = match &raw.public_address {
            Some(p) => match p.get_ref().parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => Some(ip),
                _ => {
                    errors.push(at(
                        p.span(),
                        "public_address",
                        format!("expected a specific IP address, found {:?}", p.get_ref()),
                    ));
                    None
                }
            },
            None => match listen {
                Some(l) if l.ip().is_unspecified() => {
                    errors.push(at(
                        raw.listen.span(),
                        "public_address",
                        "required when listen is an unspecified address".to_owned(),
                    ));
                    None
                }
                Some(l) => Some(l.ip()),
                None => None,
            },
        };
        let allow = raw
            .allow
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.get_ref().parse::<IpNet>() {
                Ok(net) if net.trunc() == net => Some(net),
                _ => {
                    errors.push(at(
                        s.span(),
                        &format!("allow[{i}]"),
                        format!(
                            "expected a CIDR network without host bits, found {:?}",
                            s.get_ref()
                        ),
                    ));
                    None
                }
            })
            .collect();
        let max = crate::reuseport::MAX_SHARDS;
        let threads = match &raw.threads {
            None => default_threads(),
            Some(t) => match u8::try_from(*t.get_ref()) {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    errors.push(at(
                        t.span(),
                        "threads",
                        format!(
                            "expected a whole number from 1 to {max}, found {}",
                            t.get_ref()
                        ),
                    ));
                    1
                }
            },
        };
        let mut quotas = Quotas::default();
        if let Some(q) = raw.quotas {
            let mut set = |name: &str, v: Option<Spanned<i64>>, min: u32, slot: &mut u32| {
                if let Some(v) = v {
                    match u32::try_from(*v.get_ref()) {
                        Ok(n) if n >= min => *slot = n,
                        _ => errors.push(at(
                            v.span(),
                            &format!("quotas.{name}"),
                            format!(
                                "expected a whole number from {min} to {}, found {}",
                                u32::MAX,
                                v.get_ref()
                            ),
                        )),
                    }
                }
            };
            set(
                "binds_per_user",
                q.binds_per_user,
                1,
                &mut quotas.binds_per_user,
            );
            set("binds_total", q.binds_total, 1, &mut quotas.binds_total);
            set(
                "packets_per_second_per_user",
                q.packets_per_second_per_user,
                1,
                &mut quotas.packets_per_second_per_user,
            );
            set(
                "bytes_per_second_per_user",
                q.bytes_per_second_per_user,
                1500,
                &mut quotas.bytes_per_second_per_user,
            );
            set(
                "contexts_per_bind",
                q.contexts_per_bind,
                1,
                &mut quotas.contexts_per_bind,
            );
            set(
                "peers_per_bind",
                q.peers_per_bind,
                1,
                &mut quotas.peers_per_bind,
            );
            let mut idle = 300u32;
            set(
                "idle_timeout_seconds",
                q.idle_timeout_seconds,
                120,
                &mut idle,
            );
            quotas.idle_timeout = Duration::from_secs(u64::from(idle));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        match (listen, public_address) {
            (Some(listen), Some(public_address)) if errors.is_empty() => Ok(Self {
                listen,
                public_address,
                certificate: base.join(raw.certificate),
                private_key: base.join(raw.private_key),
                client_ca: base.join(raw.client_ca),
                allow,
                inbound_filter: raw
                    .inbound_filter
                    .unwrap_or(InboundFilter::AddressDependent),
                quotas,
                threads,
                speaks_for: raw.speaks_for,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        Self::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "listen = \"198.51.100.2:4433\"\ncertificate = \"relay.crt\"\nprivate_key = \"relay.key\"\nclient_ca = \"ca.crt\"\nallow = [\"203.0.113.0/24\"]\n[quotas]\nidle_timeout_seconds = 120\n";

    #[test]
    fn speaks_for_limits_each_certificate_to_its_users() {
        let open = RelayConfig::parse(Path::new("r.toml"), GOOD).expect("valid");
        assert!(open.may_speak_for(Some("laptop-17"), "alice"));
        assert!(open.may_speak_for(None, "alice"));
        let text = format!(
            "{GOOD}[speaks_for]\n\"laptop-17\" = [\"alice\", \"bob\"]\n\"kiosk\" = [\"*\"]\n"
        );
        let text = text.replace("[quotas]\nidle_timeout_seconds = 120\n", "");
        let c = RelayConfig::parse(Path::new("r.toml"), &text).expect("valid");
        assert!(c.may_speak_for(Some("laptop-17"), "bob"));
        assert!(!c.may_speak_for(Some("laptop-17"), "carol"));
        assert!(!c.may_speak_for(Some("laptop-18"), "alice"));
        assert!(c.may_speak_for(Some("kiosk"), "anyone"));
        assert!(!c.may_speak_for(None, "alice"));
    }

    #[test]
    fn parses_and_resolves_paths() {
        let c = RelayConfig::parse(Path::new("/etc/veil/relay.toml"), GOOD).expect("valid");
        assert_eq!(
            c.public_address,
            "198.51.100.2".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(c.certificate, Path::new("/etc/veil/relay.crt"));
        assert_eq!(c.quotas.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.inbound_filter, InboundFilter::AddressDependent);
        assert_eq!(c.threads, default_threads());
        let two = RelayConfig::parse(Path::new("r.toml"), &format!("threads = 2\n{GOOD}"));
        assert_eq!(two.expect("valid").threads, 2);
    }

    #[test]
    fn malformed_entries_stop_startup_with_their_position() {
        let bad = GOOD
            .replace(
                "[\"203.0.113.0/24\"]",
                "[\"203.0.113.0/24\", \"10.0.0.1/8\", \"nonsense\"]",
            )
            .replace("= 120", "= 60")
            .replace("[quotas]", "threads = 65\n[quotas]");
        let e = RelayConfig::parse(Path::new("r.toml"), &bad)
            .expect_err("invalid")
            .0;
        assert_eq!(
            e,
            vec![
                "r.toml:5:28: allow[1]: expected a CIDR network without host bits, found \"10.0.0.1/8\"",
                "r.toml:5:42: allow[2]: expected a CIDR network without host bits, found \"nonsense\"",
                "r.toml:6:11: threads: expected a whole number from 1 to 64, found 65",
                "r.toml:8:24: quotas.idle_timeout_seconds: expected a whole number from 120 to 4294967295, found 60",
            ]
        );
        let e = RelayConfig::parse(
            Path::new("r.toml"),
            &GOOD.replace("198.51.100.2:4433", "0.0.0.0:4433"),
        )
        .expect_err("invalid")
        .0;
        assert_eq!(
            e,
            vec!["r.toml:1:10: public_address: required when listen is an unspecified address"]
        );
        let e = RelayConfig::parse(Path::new("r.toml"), &format!("{GOOD}colour = 1\n"))
            .expect_err("invalid")
            .0;
        assert!(e[0].starts_with("r.toml:"), "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
    }
}
