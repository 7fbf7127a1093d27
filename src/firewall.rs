//! The kernel side of transparent interception: an nftables table and policy routing.
//!
//! The ruleset *text* is made by a pure function from the managed users and groups; a thin shell
//! applies it with `nft -f` in **one transaction** (create-if-missing, delete, recreate — the old
//! table is replaced atomically or not at all). What the table does:
//!
//! ```text
//! output   (route hook, mangle)   managed user's/group's UDP, not to loopback:
//!                                 mark it (policy routing then delivers it locally) and mark its
//!                                 conntrack entry
//! prerouting (filter, mangle)     marked UDP: TPROXY to veil's listener on 127.0.0.1 / ::1;
//!                                 then DROP — tproxy falls through when nothing listens, so with
//!                                 the daemon dead the packet is dropped, never sent
//! killswitch (filter, postrouting) managed user's UDP that would leave on any interface but
//!                                 lo: DROP (postrouting, because only there is the device the
//!                                 one chosen after the mark re-routed the packet)
//! input    (filter, input)        UDP from outside to a flow veil intercepted (its conntrack
//!                                 mark): DROP — replies must come through veil
//! ```
//!
//! Policy routing adds a second lock that does not depend on nftables: managed users' UDP
//! (`ip rule uidrange … ipproto udp`) is routed to `veil0`, one end of a veth pair whose other
//! end (`veil0x`) stays down, so everything sent there is discarded (a veth rather than a dummy
//! device, because veth is in every kernel that runs network namespaces). Intercepted packets are re-routed by their mark before that matters; if another
//! tool flushes the nftables ruleset, they fall to `veil0` instead of the real interface — so
//! even a flushed firewall leaks nothing while veil reinstalls its table.
//!
//! The table stays when the daemon stops, crashes or is killed: only `veil firewall remove`
//! takes it away.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// The nftables table veil owns (family `inet`).
pub const TABLE: &str = "veil";
/// The default fwmark of intercepted packets (also the policy-routing table number).
pub const DEFAULT_MARK: u32 = 0x1e11;
/// The device that swallows managed users' UDP if it is ever routed normally.
pub const DISCARD_DEVICE: &str = "veil0";
/// Its veth peer, which stays down.
const DISCARD_PEER: &str = "veil0x";
/// The default TPROXY listener port.
pub const DEFAULT_PORT: u16 = 15_353;

/// Who is intercepted and where their UDP goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// Managed users by uid (never 0).
    pub uids: Vec<u32>,
    /// Managed groups by gid (never 0).
    pub gids: Vec<u32>,
    /// Every uid the discard route covers: the managed users and the members of the managed
    /// groups (policy routing matches users only).
    pub routed_uids: Vec<u32>,
    /// Managed cgroups (v2): every process below one is managed, whoever runs it — how IT
    /// manages one app rather than a whole user.
    pub cgroups: Vec<ManagedCgroup>,
    /// Cgroups whose sockets get no UDP from the network except through veil, without their
    /// own UDP being managed: the session slices of managed users (see [`user_slices`]).
    pub inbound_cgroups: Vec<ManagedCgroup>,
    /// The TPROXY listener port on 127.0.0.1 and ::1.
    pub port: u16,
    /// The fwmark (and routing table) for intercepted packets.
    pub mark: u32,
}

/// A cgroup v2 whose processes' UDP is managed, as nftables' `socket cgroupv2` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedCgroup {
    /// The path below the cgroup v2 root, as configured (`veil.slice/zoom.scope`).
    pub path: String,
    /// The path nft resolves, relative to `/sys/fs/cgroup` (nft's fixed base), which differs
    /// from `path` on hosts that mount cgroup v2 elsewhere below it (`unified/` in hybrid mode).
    nft_path: String,
    /// Its depth below the root: nft matches the socket's ancestor at this level.
    level: usize,
}

impl ManagedCgroup {
    /// Resolves `path` (below the cgroup v2 root) against the mount table `mounts` (the text
    /// of `/proc/self/mounts`). Does not check that the cgroup exists.
    pub fn from_mounts(path: &str, mounts: &str) -> Result<Self, String> {
        let trimmed = path.trim_matches('/');
        let parts: Vec<&str> = trimmed.split('/').collect();
        if trimmed.is_empty()
            || parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == "..")
            || trimmed.contains(['"', '\\', '\n', ' '])
        {
            return Err(format!(
                "cgroup {path:?}: expected a path below the cgroup v2 root, like \"veil.slice\""
            ));
        }
        let mount = mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
                (kind == "cgroup2").then_some(at)
            })
            .next()
            .ok_or_else(|| "no cgroup v2 hierarchy is mounted".to_owned())?;
        let below = mount
            .strip_prefix("/sys/fs/cgroup")
            .ok_or_else(|| {
                format!("cgroup v2 is mounted at {mount}; nftables resolves cgroups only below /sys/fs/cgroup")
            })?
            .trim_matches('/');
        let nft_path = if below.is_empty() {
            trimmed.to_owned()
        } else {
            format!("{below}/{trimmed}")
        };
        Ok(Self {
            path: trimmed.to_owned(),
            nft_path,
            level: parts.len(),
        })
    }

    /// Resolves `path` on this host and checks that the cgroup exists (nft refuses a ruleset
    /// naming a missing one, and a cgroup created later would not be matched by its old id).
    pub fn resolve(path: &str) -> Result<Self, String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
        let cgroup = Self::from_mounts(path, &mounts)?;
        let dir = std::path::Path::new("/sys/fs/cgroup").join(&cgroup.nft_path);
        if !dir.is_dir() {
            return Err(format!(
                "cgroup {path:?} does not exist ({} is missing): create it before veil starts, for example as a systemd slice",
                dir.display()
            ));
        }
        Ok(cgroup)
    }

    /// Whether a process in cgroup `own` (a path below the root) would be managed.
    pub fn contains(&self, own: &str) -> bool {
        let own = own.trim_matches('/');
        own == self.path || own.starts_with(&format!("{}/", self.path))
    }

    fn selector(&self) -> String {
        format!("socket cgroupv2 level {} \"{}\"", self.level, self.nft_path)
    }
}

/// The systemd session slices (`user.slice/user-UID.slice`) of these users that exist now.
/// nftables cannot match a socket's owner on input, but it can match its cgroup: with these,
/// a managed user's apps hear the network only through veil, as cgroup-managed apps do. A
/// slice appears at login; the sidecar looks again every few seconds.
pub fn user_slices(uids: &[u32]) -> Vec<ManagedCgroup> {
    uids.iter()
        .filter_map(|uid| ManagedCgroup::resolve(&format!("user.slice/user-{uid}.slice")).ok())
        .collect()
}

/// Why the firewall could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command could not be run.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// What it printed.
        stderr: String,
    },
}

fn set(out: &mut String, name: &str, kind: &str, ids: &[u32]) {
    let _ = writeln!(out, "  set {name} {{\n    type {kind}");
    if !ids.is_empty() {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        let _ = writeln!(out, "    elements = {{ {} }}", list.join(", "));
    }
    out.push_str("  }\n");
}

/// The complete `nft -f` input that installs (or atomically replaces) veil's table.
pub fn ruleset(i: &Interception) -> String {
    let mark = format!("{:#x}", i.mark);
    let port = i.port;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );
    set(&mut out, "managed_uids", "uid", &i.uids);
    set(&mut out, "managed_gids", "gid", &i.gids);
    let mut managed = vec![
        "meta skuid @managed_uids".to_owned(),
        "meta skgid @managed_gids".to_owned(),
    ];
    managed.extend(i.cgroups.iter().map(ManagedCgroup::selector));
    out.push_str("  chain output {\n    type route hook output priority mangle; policy accept;\n");
    for who in &managed {
        let _ = writeln!(
            out,
            "    meta l4proto udp {who} ip daddr 127.0.0.0/8 return"
        );
        let _ = writeln!(out, "    meta l4proto udp {who} ip6 daddr ::1 return");
        let _ = writeln!(
            out,
            "    meta l4proto udp {who} meta mark set {mark} ct mark set {mark}"
        );
    }
    out.push_str("  }\n");
    let _ = writeln!(
        out,
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         meta l4proto udp meta mark {mark} meta nfproto ipv4 tproxy ip to 127.0.0.1:{port} accept\n    \
         meta l4proto udp meta mark {mark} meta nfproto ipv6 tproxy ip6 to [::1]:{port} accept\n    \
         meta l4proto udp meta mark {mark} drop\n  }}"
    );
    out.push_str(
        "  chain killswitch {\n    type filter hook postrouting priority filter; policy accept;\n",
    );
    // nftables' socket match does not run in postrouting; managed cgroups' UDP is covered by
    // the mark it got in output (it should be on its way to lo).
    for who in managed.iter().take(2) {
        let _ = writeln!(out, "    meta l4proto udp {who} oifname != \"lo\" drop");
    }
    let _ = writeln!(
        out,
        "    meta l4proto udp meta mark {mark} oifname != \"lo\" drop"
    );
    // An ICMP error the kernel sends about an intercepted flow (port unreachable when veil's
    // reply meets an app socket that is gone) would carry the user's address to the peer: it
    // belongs to the flow's conntrack entry, so its mark finds it.
    let _ = writeln!(
        out,
        "    meta l4proto {{ icmp, ipv6-icmp }} ct mark {mark} oifname != \"lo\" drop"
    );
    out.push_str("  }\n");
    let _ = writeln!(
        out,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    \
         meta l4proto udp iifname != \"lo\" ct mark {mark} drop"
    );
    // The socket a packet is for, looked up: a managed app gets UDP only through veil (over
    // lo), never straight from the network. (Sockets of managed *users* cannot be told apart
    // here: nftables has no socket-owner match on input.)
    for c in i.cgroups.iter().chain(&i.inbound_cgroups) {
        let _ = writeln!(
            out,
            "    meta l4proto udp iifname != \"lo\" {} drop",
            c.selector()
        );
    }
    out.push_str("  }\n}\n");
    out
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Installs or replaces the table in one transaction, then the policy routing: marked packets
/// are delivered locally (to the TPROXY listener), and managed users' other UDP goes to the
/// discard device.
pub fn install(i: &Interception) -> Result<(), Error> {
    // Routing first: the discard route must be in place before anything is marked.
    if run("ip", &["link", "show", DISCARD_DEVICE], None).is_err() {
        run(
            "ip",
            &[
                "link",
                "add",
                DISCARD_DEVICE,
                "type",
                "veth",
                "peer",
                "name",
                DISCARD_PEER,
            ],
            None,
        )?;
        run("ip", &["link", "set", DISCARD_PEER, "down"], None)?;
    }
    run("ip", &["link", "set", DISCARD_DEVICE, "up"], None)?;
    let mark = format!("{:#x}", i.mark);
    let local_table = i.mark.to_string();
    let discard_table = (i.mark + 1).to_string();
    for (family, all) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        run(
            "ip",
            &[
                family,
                "route",
                "replace",
                "local",
                all,
                "dev",
                "lo",
                "table",
                &local_table,
            ],
            None,
        )?;
        run(
            "ip",
            &[
                family,
                "route",
                "replace",
                "default",
                "dev",
                DISCARD_DEVICE,
                "table",
                &discard_table,
            ],
            None,
        )?;
        let rules = run("ip", &[family, "rule", "show"], None)?;
        if !rules.contains(&format!("fwmark {mark} lookup {local_table}")) {
            run(
                "ip",
                &[
                    family,
                    "rule",
                    "add",
                    "fwmark",
                    &mark,
                    "lookup",
                    &local_table,
                    "priority",
                    &local_table,
                ],
                None,
            )?;
        }
        for uid in &i.routed_uids {
            let range = format!("{uid}-{uid}");
            if !rules.contains(&format!(
                "uidrange {range} ipproto udp lookup {discard_table}"
            )) {
                run(
                    "ip",
                    &[
                        family,
                        "rule",
                        "add",
                        "uidrange",
                        &range,
                        "ipproto",
                        "udp",
                        "lookup",
                        &discard_table,
                        "priority",
                        &discard_table,
                    ],
                    None,
                )?;
            }
        }
    }
    run("nft", &["-f", "-"], Some(&ruleset(i)))?;
    Ok(())
}

/// True if veil's table is installed and has every chain.
pub fn is_intact() -> bool {
    run("nft", &["list", "table", "inet", TABLE], None).is_ok_and(|listing| {
        [
            "chain output",
            "chain prerouting",
            "chain killswitch",
            "chain input",
            "tproxy",
        ]
        .iter()
        .all(|part| listing.contains(part))
    })
}

/// Removes the table and the policy routing (`veil firewall remove`).
pub fn remove(mark: u32) -> Result<(), Error> {
    let _ = run("nft", &["delete", "table", "inet", TABLE], None);
    for table in [mark.to_string(), (mark + 1).to_string()] {
        for family in ["-4", "-6"] {
            while run("ip", &[family, "rule", "del", "lookup", &table], None).is_ok() {}
            let _ = run("ip", &[family, "route", "flush", "table", &table], None);
        }
    }
    let _ = run("ip", &["link", "del", DISCARD_DEVICE], None);
    if is_intact() {
        return Err(Error::Failed {
            command: format!("nft delete table inet {TABLE}"),
            stderr: "the table is still there".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_replaces_atomically_and_drops_behind_tproxy() {
        let text = ruleset(&Interception {
            uids: vec![1001, 1002],
            gids: vec![],
            routed_uids: vec![1001, 1002],
            cgroups: vec![],
            inbound_cgroups: vec![],
            port: 15353,
            mark: 0x1e11,
        });
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(
            &lines[..3],
            [
                "table inet veil",
                "delete table inet veil",
                "table inet veil {"
            ]
        );
        assert!(lines.contains(&"elements = { 1001, 1002 }"));
        // An empty set has no elements line (nft rejects `{ }`).
        let gids = lines
            .iter()
            .position(|l| *l == "set managed_gids {")
            .expect("gid set");
        assert_eq!(lines[gids + 2], "}");
        // Every tproxy rule is followed by a drop of the same mark.
        let v6 = lines
            .iter()
            .position(|l| l.contains("tproxy ip6 to [::1]:15353 accept"))
            .expect("v6 tproxy");
        assert!(lines[v6 - 1].contains("tproxy ip to 127.0.0.1:15353 accept"));
        assert_eq!(lines[v6 + 1], "meta l4proto udp meta mark 0x1e11 drop");
        assert!(
            lines.contains(&"meta l4proto udp meta skuid @managed_uids oifname != \"lo\" drop")
        );
        assert!(lines.contains(&"meta l4proto udp iifname != \"lo\" ct mark 0x1e11 drop"));
        // The kernel's ICMP errors about intercepted flows stay in too.
        assert!(
            lines.contains(
                &"meta l4proto { icmp, ipv6-icmp } ct mark 0x1e11 oifname != \"lo\" drop"
            )
        );
    }

    #[test]
    fn ruleset_is_accepted_by_nft() {
        // `nft -c` checks syntax without touching the kernel's ruleset; it needs nftables
        // installed (tests/run.sh does) and CAP_NET_ADMIN for the netlink cache.
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (tests/run.sh runs as root in CI)"
        );
        let text = ruleset(&Interception {
            uids: vec![65534],
            gids: vec![65534],
            routed_uids: vec![65534],
            cgroups: vec![],
            inbound_cgroups: vec![],
            port: 15353,
            mark: 0x1e11,
        });
        let out = run("nft", &["-c", "-f", "-"], Some(&text));
        assert!(out.is_ok(), "{out:?}\n{text}");
    }

    #[test]
    fn cgroups_resolve_against_the_v2_mount_and_match_both_ways() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let c = ManagedCgroup::from_mounts("/veil.slice/zoom.scope/", hybrid).expect("hybrid");
        assert_eq!(
            (c.path.as_str(), c.nft_path.as_str(), c.level),
            ("veil.slice/zoom.scope", "unified/veil.slice/zoom.scope", 2)
        );
        let c = ManagedCgroup::from_mounts("veil.slice", pure).expect("pure");
        assert_eq!((c.nft_path.as_str(), c.level), ("veil.slice", 1));
        assert!(c.contains("veil.slice/app-1.scope") && c.contains("/veil.slice"));
        assert!(!c.contains("veil.slice2") && !c.contains("/"));
        for bad in ["", "/", "a/../b", "a//b", "x\"y", "a b"] {
            assert!(ManagedCgroup::from_mounts(bad, pure).is_err(), "{bad:?}");
        }
        assert!(ManagedCgroup::from_mounts("a", "cgroup2 /mnt/cg cgroup2 rw 0 0\n").is_err());
        assert!(ManagedCgroup::from_mounts("a", "").is_err());

        let text = ruleset(&Interception {
            uids: vec![],
            gids: vec![],
            routed_uids: vec![],
            cgroups: vec![c],
            inbound_cgroups: vec![],
            port: 15353,
            mark: 0x1e11,
        });
        let sel = "socket cgroupv2 level 1 \"veil.slice\"";
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for rule in [
            format!("meta l4proto udp {sel} meta mark set 0x1e11 ct mark set 0x1e11"),
            "meta l4proto udp meta mark 0x1e11 oifname != \"lo\" drop".to_owned(),
            format!("meta l4proto udp iifname != \"lo\" {sel} drop"),
        ] {
            assert!(lines.contains(&rule.as_str()), "{rule}\n{text}");
        }
    }
}
