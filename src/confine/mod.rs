//! Confined network views: a calling app run in one sees no address of the machine, so it can
//! neither put one in its signalling (ICE host candidates, SDP, SIP headers) nor send from one.
//!
//! A view is a named network namespace (`/run/netns/PREFIXUSER`, which `ip netns exec` and
//! systemd's `NetworkNamespacePath=` join) holding `lo` and `eth0`, one end of a veth pair.
//! `eth0` has the same placeholder addresses, MAC and MTU on every machine ([`APP_V4`],
//! [`APP_V6`]): they name no one (the Whonix principle). The other end, `vc-UID`, is on the
//! host with [`HOST_V4`] and [`HOST_V6`], the view's default gateway. The MTU (1280, IPv6's
//! minimum) keeps every datagram small enough for a QUIC datagram to the relay.
//!
//! Nothing is forwarded from a view. The firewall ([`crate::firewall`]) gives its UDP to veil's
//! TPROXY listener for the view in prerouting (TPROXY's native hook) and drops everything else;
//! a policy-routing rule blackholes whatever arrives from it unmarked, so with the nftables
//! table flushed and forwarding switched on, nothing leaves either; and IPv4 forwarding is off
//! on the host end. With veil dead, its packets meet no socket and are dropped.
//!
//! [`View`] says what a view is, as data ([`View::commands`]: the `ip` command lines that build
//! it, checked by unit tests); [`ensure`] runs them where something is missing.

pub mod launch;

use crate::command;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// The app's IPv4 address in every view.
pub const APP_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 2);
/// The host end's IPv4 address (the view's gateway, and later its resolver).
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 1);
/// The IPv4 prefix of the link.
pub const PREFIX_V4: u8 = 30;
/// The app's IPv6 address in every view: a ULA (`fd`, then "veil" in ASCII), never global.
pub const APP_V6: Ipv6Addr = Ipv6Addr::new(0xfd76, 0x6569, 0x6c00, 0, 0, 0, 0, 2);
/// The host end's IPv6 address.
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd76, 0x6569, 0x6c00, 0, 0, 0, 0, 1);
/// The IPv6 prefix of the link.
pub const PREFIX_V6: u8 = 64;
/// The link's MTU: IPv6's minimum, which fits a QUIC datagram to the relay.
pub const MTU: u16 = 1280;
/// The app end's MAC address (its IPv6 link-local address derives from it): the same everywhere.
const APP_MAC: &str = "02:76:65:69:6c:02";
/// The host end's MAC address.
const HOST_MAC: &str = "02:76:65:69:6c:01";
/// The device's name inside a view.
pub const APP_DEVICE: &str = "eth0";
/// The default prefix of views' namespace names.
pub const DEFAULT_PREFIX: &str = "veil-";

/// Why a view cannot be named or built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace name would not be a plain file name in `/run/netns`.
    #[error(
        "confined view {0:?}: a namespace name is 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    Name(String),
    /// An `ip` command failed.
    #[error(transparent)]
    Command(#[from] command::Error),
    /// The view's resolv.conf could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A sysctl of the host end could not be set.
    #[error("setting {path}: {source}")]
    Sysctl {
        /// The file under `/proc/sys`.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One user's confined view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The user whose apps run in it: everything sent from it is theirs.
    pub user: String,
    /// That user's uid.
    pub uid: u32,
    /// The namespace's name in `/run/netns`.
    pub netns: String,
    /// The host end's device name.
    pub device: String,
    /// veil's TPROXY listener port for the view, on 127.0.0.1 and ::1.
    pub port: u16,
}

impl View {
    /// The view of `user` (uid `uid`), its namespace named `prefix` + `user`, served on `port`.
    pub fn new(user: &str, uid: u32, prefix: &str, port: u16) -> Result<Self, Error> {
        let netns = format!("{prefix}{user}");
        let valid = !netns.is_empty()
            && netns.len() <= 64
            && !netns.starts_with('.')
            && netns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(Error::Name(netns));
        }
        Ok(Self {
            user: user.to_owned(),
            uid,
            netns,
            // At most 13 bytes, under IFNAMSIZ.
            device: format!("vc-{uid}"),
            port,
        })
    }

    /// The namespace's path, to join it (`nsenter --net=`, `NetworkNamespacePath=`).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }

    /// The resolv.conf that `ip netns exec` (and `veil run`) mounts over `/etc/resolv.conf`
    /// for apps in the view.
    pub fn resolv_conf_path(&self) -> PathBuf {
        PathBuf::from("/etc/netns")
            .join(&self.netns)
            .join("resolv.conf")
    }

    /// The `ip` command lines that create the veth pair, its end moved into the namespace
    /// (which must exist).
    pub fn link_commands(&self) -> Vec<Vec<String>> {
        let mtu = MTU.to_string();
        vec![argv(&[
            "link",
            "add",
            &self.device,
            "address",
            HOST_MAC,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            APP_DEVICE,
            "address",
            APP_MAC,
            "mtu",
            &mtu,
            "netns",
            &self.netns,
        ])]
    }

    /// The command lines (`ip` and `sysctl`, the latter run inside the namespace) that give
    /// both ends their addresses and routes; each may be run again.
    pub fn commands(&self) -> Vec<Vec<String>> {
        let ns = self.netns.as_str();
        let app4 = format!("{APP_V4}/{PREFIX_V4}");
        let app6 = format!("{APP_V6}/{PREFIX_V6}");
        let host4 = format!("{HOST_V4}/{PREFIX_V4}");
        let host6 = format!("{HOST_V6}/{PREFIX_V6}");
        let (gw4, gw6) = (HOST_V4.to_string(), HOST_V6.to_string());
        let mut out = vec![
            // No router advertisement, no autoconfigured or temporary address: the view's
            // addresses are the placeholders and nothing else.
            {
                let mut v = argv(&["netns", "exec", ns, "sysctl", "-q", "-w"]);
                for key in ["all", "default", APP_DEVICE] {
                    v.push(format!("net.ipv6.conf.{key}.accept_ra=0"));
                    v.push(format!("net.ipv6.conf.{key}.autoconf=0"));
                    v.push(format!("net.ipv6.conf.{key}.use_tempaddr=0"));
                }
                v
            },
            argv(&["-n", ns, "link", "set", "lo", "up"]),
            argv(&["-n", ns, "addr", "replace", &app4, "dev", APP_DEVICE]),
            argv(&[
                "-n", ns, "addr", "replace", &app6, "dev", APP_DEVICE, "nodad",
            ]),
            argv(&["-n", ns, "link", "set", APP_DEVICE, "up"]),
            argv(&[
                "-n", ns, "-4", "route", "replace", "default", "via", &gw4, "dev", APP_DEVICE,
            ]),
            argv(&[
                "-n", ns, "-6", "route", "replace", "default", "via", &gw6, "dev", APP_DEVICE,
            ]),
        ];
        out.extend([
            argv(&["addr", "replace", &host4, "dev", &self.device]),
            argv(&["addr", "replace", &host6, "dev", &self.device, "nodad"]),
            argv(&["link", "set", &self.device, "up"]),
        ]);
        out
    }

    /// The host end's sysctls (files under `/proc/sys`) and their values: nothing arriving on
    /// it is forwarded (IPv4; IPv6 has no per-device switch, the blackhole rule covers it),
    /// and it takes no router advertisement.
    pub fn host_sysctls(&self) -> Vec<(String, &'static str)> {
        let d = &self.device;
        vec![
            (format!("net/ipv4/conf/{d}/forwarding"), "0"),
            (format!("net/ipv6/conf/{d}/forwarding"), "0"),
            (format!("net/ipv6/conf/{d}/accept_ra"), "0"),
            (format!("net/ipv6/conf/{d}/autoconf"), "0"),
        ]
    }
}

/// The resolver an app in a view is given: the host end, port 53 ([`Resolver::ALIAS_PORT`]).
/// What the app sends there goes to `upstream` — a flow like any other, decided by the user's
/// policy (`direct` from the host, `relay` through the tunnel, `block`) and logged as one — and
/// the answers reach the app from the address it asked. Sans IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolver {
    /// Where queries go; None: nowhere (they are dropped and counted).
    pub upstream: Option<SocketAddr>,
}

impl Resolver {
    /// The port of the view's resolver.
    pub const ALIAS_PORT: u16 = 53;

    /// Whether `target` is the view's resolver (on either family).
    pub fn is_alias(target: SocketAddr) -> bool {
        target.port() == Self::ALIAS_PORT
            && (target.ip() == IpAddr::V4(HOST_V4) || target.ip() == IpAddr::V6(HOST_V6))
    }

    /// Where a datagram the app sends to `target` goes: `target` itself, or the upstream for
    /// the view's resolver; None if it is for the resolver and there is no upstream.
    pub fn outbound(&self, target: SocketAddr) -> Option<SocketAddr> {
        if Self::is_alias(target) {
            self.upstream
        } else {
            Some(target)
        }
    }

    /// The address the app at `app` hears a datagram from `peer` as, once it has asked the
    /// view's resolver (`asked`): the resolver of its own family for the upstream's answers.
    pub fn inbound(&self, peer: SocketAddr, app: SocketAddr, asked: bool) -> SocketAddr {
        if asked && Some(peer) == self.upstream {
            let host = if app.is_ipv4() {
                IpAddr::V4(HOST_V4)
            } else {
                IpAddr::V6(HOST_V6)
            };
            SocketAddr::new(host, Self::ALIAS_PORT)
        } else {
            peer
        }
    }
}

/// The first `nameserver` of resolv.conf text, port 53: the host's resolver.
pub fn host_resolver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// The resolv.conf an app in a view reads: the view's resolver, on both families.
pub fn view_resolv_conf() -> String {
    format!(
        "# written by veil: the confined view's resolver\nnameserver {HOST_V4}\nnameserver {HOST_V6}\n"
    )
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

fn ip(args: &[String]) -> Result<String, command::Error> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command::run("ip", &args, None)
}

/// What [`ensure`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// The view was there as it should be (its addresses applied again).
    Kept,
    /// Its namespace or its link was missing, and is there now.
    Built,
}

/// Makes `view` exist as [`View`] describes it: the namespace, the veth pair (built again if
/// either end is gone), the addresses, routes and sysctls. Apps already inside keep running.
pub fn ensure(view: &View) -> Result<Ensured, Error> {
    let mut ensured = Ensured::Kept;
    if !view.netns_path().exists() {
        ip(&argv(&["netns", "add", &view.netns]))?;
        ensured = Ensured::Built;
    }
    let app_end = ip(&argv(&["-n", &view.netns, "link", "show", APP_DEVICE])).is_ok();
    let host_end = ip(&argv(&["link", "show", &view.device])).is_ok();
    if !(app_end && host_end) {
        // One end without the other is no link: both go, and the pair is made again.
        let _ = ip(&argv(&["link", "del", &view.device]));
        let _ = ip(&argv(&["-n", &view.netns, "link", "del", APP_DEVICE]));
        for c in view.link_commands() {
            ip(&c)?;
        }
        ensured = Ensured::Built;
    }
    for (path, value) in view.host_sysctls() {
        let path = format!("/proc/sys/{path}");
        std::fs::write(&path, value).map_err(|source| Error::Sysctl { path, source })?;
    }
    for c in view.commands() {
        ip(&c)?;
    }
    let conf = view.resolv_conf_path();
    let written = conf
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&conf, view_resolv_conf()));
    written.map_err(|source| Error::Write {
        path: conf.display().to_string(),
        source,
    })?;
    Ok(ensured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_files_and_devices_fit_ifnamsiz() {
        let v = View::new("alice", 4_294_967_294, DEFAULT_PREFIX, 15_354).expect("view");
        assert_eq!(v.netns, "veil-alice");
        assert_eq!(v.netns_path(), PathBuf::from("/run/netns/veil-alice"));
        assert!(v.device.len() < 16, "{}", v.device);
        for bad in ["../etc", "a/b", "", ".hidden", "sp ace"] {
            assert!(View::new(bad, 1000, "", 1).is_err(), "{bad:?} accepted");
        }
        assert!(View::new(&"x".repeat(65), 1000, "", 1).is_err());
    }

    #[test]
    fn the_views_resolver_is_an_alias_for_the_upstream_both_ways() {
        let upstream: SocketAddr = "9.9.9.9:53".parse().expect("addr");
        let r = Resolver {
            upstream: Some(upstream),
        };
        let alias4: SocketAddr = "192.0.0.1:53".parse().expect("addr");
        let alias6: SocketAddr = "[fd76:6569:6c00::1]:53".parse().expect("addr");
        let peer: SocketAddr = "203.0.113.9:53".parse().expect("addr");
        assert_eq!(r.outbound(alias4), Some(upstream));
        assert_eq!(r.outbound(alias6), Some(upstream));
        assert_eq!(r.outbound(peer), Some(peer));
        // The host end on another port is not the resolver.
        let other: SocketAddr = "192.0.0.1:54".parse().expect("addr");
        assert_eq!(r.outbound(other), Some(other));
        assert_eq!(Resolver { upstream: None }.outbound(alias4), None);
        let app4: SocketAddr = "192.0.0.2:40000".parse().expect("addr");
        let app6: SocketAddr = "[fd76:6569:6c00::2]:40000".parse().expect("addr");
        assert_eq!(r.inbound(upstream, app4, true), alias4);
        assert_eq!(r.inbound(upstream, app6, true), alias6);
        // An app that talks to the upstream itself hears it as itself.
        assert_eq!(r.inbound(upstream, app4, false), upstream);
        assert_eq!(r.inbound(peer, app4, true), peer);
    }

    #[test]
    fn the_host_resolver_is_the_first_nameserver() {
        let conf = "# comment\nsearch example.org\nnameserver  fe80::1%eth0\nnameserver 10.0.0.53\nnameserver 10.0.0.54\n";
        assert_eq!(
            host_resolver(conf),
            Some("10.0.0.53:53".parse().expect("addr")),
            "a scoped address is skipped"
        );
        assert_eq!(host_resolver("search x\n"), None);
        assert!(
            view_resolv_conf().contains("nameserver 192.0.0.1\nnameserver fd76:6569:6c00::1\n")
        );
    }

    #[test]
    fn the_view_has_only_placeholders_and_routes_through_the_host_end() {
        let v = View::new("alice", 1000, "t-", 15_354).expect("view");
        let lines: Vec<String> = v
            .link_commands()
            .iter()
            .chain(&v.commands())
            .map(|c| c.join(" "))
            .collect();
        let text = lines.join("\n");
        // Every address given out is a placeholder or the host end's.
        assert!(text.contains("-n t-alice addr replace 192.0.0.2/30 dev eth0"));
        assert!(text.contains("-n t-alice addr replace fd76:6569:6c00::2/64 dev eth0 nodad"));
        assert!(text.contains("-n t-alice -4 route replace default via 192.0.0.1 dev eth0"));
        assert!(
            text.contains("-n t-alice -6 route replace default via fd76:6569:6c00::1 dev eth0")
        );
        assert!(text.contains("addr replace 192.0.0.1/30 dev vc-1000"));
        assert!(text.contains("peer name eth0 address 02:76:65:69:6c:02 mtu 1280 netns t-alice"));
        assert!(text.contains("net.ipv6.conf.eth0.accept_ra=0"));
        // No command forwards, masquerades or moves a host device into the view.
        for forbidden in ["masquerade", "forwarding=1", "nat"] {
            assert!(!text.contains(forbidden), "{forbidden}");
        }
        assert!(
            v.host_sysctls()
                .iter()
                .any(|(p, val)| p == "net/ipv4/conf/vc-1000/forwarding" && *val == "0")
        );
    }
}
