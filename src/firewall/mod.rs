//! The kernel side of transparent interception: an nftables table, policy routing, and an
//! eBPF egress lock ([`lock`]) that holds when the other two are gone.
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
//! killswitch (filter, postrouting) anything but TCP from a managed user's socket that would
//!                                 leave on any interface but lo (UDP, UDP-Lite, ICMP echo…):
//!                                 DROP (postrouting, because only there is the device the one
//!                                 chosen after the mark re-routed the packet)
//! input    (filter, input)        UDP from outside to a flow veil intercepted (its conntrack
//!                                 mark): DROP — replies must come through veil
//! ```
//!
//! Policy routing: `fwmark MARK lookup MARK`, table MARK `local default dev lo`, which delivers
//! marked packets to the TPROXY listener. Without it nothing is relayed (and nothing leaks:
//! the lock and the killswitch still drop).
//!
//! The second lock, independent of nftables, of routing and of any device's link state, is a
//! cgroup egress program ([`lock`]): it drops the same packets the killswitch drops, wherever
//! routing sent them. [`ensure`] compares all three with what veil wrote — the table's whole
//! listing, the rules and routes, the programs' tags — and puts back whatever differs; the
//! sidecar runs it every 2 s.
//!
//! All of it stays when the daemon stops, crashes or is killed: only `veil firewall remove`
//! takes it away.

pub mod guard;
pub mod lock;

use std::fmt::Write as _;

/// The nftables table veil owns (family `inet`).
pub const TABLE: &str = "veil";
/// The default fwmark of intercepted packets (also the policy-routing table number).
pub const DEFAULT_MARK: u32 = 0x1e11;
/// The device earlier versions routed managed users' UDP to (a veth whose peer stayed down);
/// the lock replaced it, and [`install`] takes it away.
const LEGACY_DISCARD_DEVICE: &str = "veil0";
/// The default TPROXY listener port.
pub const DEFAULT_PORT: u16 = 15_353;

/// Who is intercepted and where their UDP goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    /// Managed users by uid (never 0).
    pub uids: Vec<u32>,
    /// Managed groups by gid (never 0).
    pub gids: Vec<u32>,
    /// Every uid the egress lock covers: the managed users and the members of the managed
    /// groups (it sees a socket's owner, not its groups).
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
    /// Confined views ([`crate::confine`]), by their host ends.
    pub views: Vec<ViewEnd>,
}

/// The host end of a confined view, as the firewall sees it: what arrives on `device` goes to
/// veil's listener on `port`, or nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewEnd {
    /// The host end's device.
    pub device: String,
    /// veil's TPROXY listener for the view, on 127.0.0.1 and ::1.
    pub port: u16,
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
    /// `nft` or `ip` did not succeed.
    #[error(transparent)]
    Command(#[from] crate::command::Error),
    /// The egress lock could not be put in place.
    #[error(transparent)]
    Lock(#[from] lock::Error),
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
    out.push_str(
        "  chain prerouting {\n    type filter hook prerouting priority mangle; policy accept;\n",
    );
    // A confined view's UDP and TCP to veil's listeners for it; its neighbour discovery with
    // the host end (addressed to the link, never forwarded); everything else from it (ICMP,
    // SCTP, UDP-Lite…) is dropped.
    for v in &i.views {
        let (dev, vport) = (&v.device, v.port);
        for proto in ["udp", "tcp"] {
            let _ = writeln!(
                out,
                "    iifname \"{dev}\" meta l4proto {proto} meta nfproto ipv4 tproxy ip to 127.0.0.1:{vport} meta mark set {mark} accept\n    \
                 iifname \"{dev}\" meta l4proto {proto} meta nfproto ipv6 tproxy ip6 to [::1]:{vport} meta mark set {mark} accept"
            );
        }
        let _ = writeln!(
            out,
            "    iifname \"{dev}\" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} ip6 hoplimit 255 accept\n    \
             iifname \"{dev}\" drop"
        );
    }
    let _ = writeln!(
        out,
        "    meta l4proto udp meta mark {mark} meta nfproto ipv4 tproxy ip to 127.0.0.1:{port} accept\n    \
         meta l4proto udp meta mark {mark} meta nfproto ipv6 tproxy ip6 to [::1]:{port} accept\n    \
         meta l4proto udp meta mark {mark} drop\n  }}"
    );
    out.push_str(
        "  chain killswitch {\n    type filter hook postrouting priority filter; policy accept;\n",
    );
    // nftables' socket match does not run in postrouting; managed cgroups' UDP is covered by
    // the mark it got in output (it should be on its way to lo).
    // Not only UDP: UDP-Lite and ICMP echo (ping sockets) need no privilege either, and
    // carry the user's address as well.
    for who in managed.iter().take(2) {
        let _ = writeln!(out, "    meta l4proto != tcp {who} oifname != \"lo\" drop");
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
    Ok(crate::command::run(program, args, stdin)?)
}

/// The listing of veil's table as this process last wrote it, to compare the live one with.
static WRITTEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// What the last [`ensure`] of this process found, for `veil status`.
#[derive(Default)]
struct Checked {
    at: Option<std::time::Instant>,
    error: Option<String>,
    repair: Option<(std::time::Instant, Damage)>,
}

static CHECKED: std::sync::Mutex<Checked> = std::sync::Mutex::new(Checked {
    at: None,
    error: None,
    repair: None,
});

/// The kill switch's state as the last check found it (None: never checked here).
pub fn last_check() -> Option<String> {
    let c = CHECKED.lock().ok()?;
    let at = c.at?;
    let mut out = match &c.error {
        Some(e) => format!("CHECK FAILED {:.0?} ago: {e}", at.elapsed()),
        None => format!(
            "intact (table, routing, egress lock) at the check {:.0?} ago",
            at.elapsed()
        ),
    };
    if let Some((when, damage)) = &c.repair {
        out.push_str(&format!(
            "; last repaired {:.0?} ago: {}",
            when.elapsed(),
            damage.join("; ")
        ));
    }
    Some(out)
}

fn record(outcome: &Result<Damage, Error>) {
    if let Ok(mut c) = CHECKED.lock() {
        let now = std::time::Instant::now();
        c.at = Some(now);
        c.error = outcome.as_ref().err().map(ToString::to_string);
        if let Ok(d) = outcome
            && !d.is_empty()
        {
            c.repair = Some((now, d.clone()));
        }
    }
}

/// The live listing of veil's table, if it exists.
fn listing() -> Option<String> {
    run("nft", &["list", "table", "inet", TABLE], None).ok()
}

/// The egress lock for `i`, in this thread's network namespace.
fn egress_lock(i: &Interception) -> Result<lock::Lock, Error> {
    let cgroups: Vec<(String, std::path::PathBuf)> = i
        .cgroups
        .iter()
        .map(|c| {
            (
                c.nft_path.clone(),
                std::path::Path::new("/sys/fs/cgroup").join(&c.nft_path),
            )
        })
        .collect();
    Ok(lock::Lock::new(&i.routed_uids, &cgroups)?)
}

/// Installs (or replaces, in one transaction) the table, the policy routing and the egress
/// lock. The lock goes in first, so that managed users' traffic is held from the start; if it
/// cannot, the table and the routing still go in (they hold on their own while nothing removes
/// them) and the lock's error is returned after them.
pub fn install(i: &Interception) -> Result<(), Error> {
    let locked = egress_lock(i).and_then(|lock| Ok(lock.ensure()?));
    routing(i)?;
    remove_legacy(i.mark);
    apply(i)?;
    locked.map(drop)
}

fn apply(i: &Interception) -> Result<(), Error> {
    run("nft", &["-f", "-"], Some(&ruleset(i)))?;
    let written = listing();
    if let Ok(mut w) = WRITTEN.lock() {
        *w = written;
    }
    Ok(())
}

/// What [`ensure`] found wrong (and put right).
pub type Damage = Vec<String>;

/// Compares the kill switch in the kernel with what veil wrote — the egress lock's programs,
/// the policy routing, the nftables table's whole listing — and puts back whatever differs.
/// Returns what was wrong (empty: all intact).
pub fn ensure(i: &Interception) -> Result<Damage, Error> {
    let outcome = check_and_repair(i);
    record(&outcome);
    outcome
}

fn check_and_repair(i: &Interception) -> Result<Damage, Error> {
    let mut damage = Damage::new();
    let lock = egress_lock(i)?;
    for r in lock.ensure()? {
        damage.push(format!("egress lock {}: {}", r.pin.display(), r.problem));
    }
    damage.extend(routing(i)?);
    let written = WRITTEN.lock().ok().and_then(|w| w.clone());
    match (listing(), written) {
        (None, _) => damage.push(format!("nftables table inet {TABLE}: removed")),
        (Some(live), Some(written)) if live != written => {
            let line = live
                .lines()
                .zip(written.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| live.lines().count().min(written.lines().count()));
            let got = live.lines().nth(line).unwrap_or("(end)").trim();
            let want = written.lines().nth(line).unwrap_or("(end)").trim();
            damage.push(format!(
                "nftables table inet {TABLE}: differs from what veil wrote at line {}: {got:?} instead of {want:?}",
                line + 1
            ));
        }
        (Some(_), _) => {}
    }
    if damage.iter().any(|d| d.starts_with("nftables")) {
        apply(i)?;
    }
    Ok(damage)
}

/// The priority of the rules that blackhole what arrives unmarked from a confined view: after
/// the fwmark rule (marked packets are veil's), before the main table.
fn view_rule_priority(mark: u32) -> String {
    mark.saturating_add(1).to_string()
}

/// Puts the policy routing in place where it is missing; says what was missing.
fn routing(i: &Interception) -> Result<Damage, Error> {
    let mut damage = Damage::new();
    let mark = i.mark;
    let hex = format!("{mark:#x}");
    let table = mark.to_string();
    for (family, all) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        // `ip` fails on a table that does not exist: that is a missing route too.
        let routes =
            run("ip", &[family, "route", "show", "table", &table], None).unwrap_or_default();
        if !routes.contains("local default dev lo") {
            damage.push(format!(
                "route {family} local default dev lo table {table}: missing"
            ));
            run(
                "ip",
                &[
                    family, "route", "replace", "local", all, "dev", "lo", "table", &table,
                ],
                None,
            )?;
        }
        let rules = run("ip", &[family, "rule", "show"], None)?;
        if !rules.contains(&format!("fwmark {hex} lookup {table}")) {
            damage.push(format!(
                "rule {family} fwmark {hex} lookup {table}: missing"
            ));
            run(
                "ip",
                &[
                    family, "rule", "add", "fwmark", &hex, "lookup", &table, "priority", &table,
                ],
                None,
            )?;
        }
        for v in &i.views {
            if !rules.contains(&format!("iif {} blackhole", v.device)) {
                damage.push(format!("rule {family} iif {} blackhole: missing", v.device));
                run(
                    "ip",
                    &[
                        family,
                        "rule",
                        "add",
                        "iif",
                        &v.device,
                        "blackhole",
                        "priority",
                        &view_rule_priority(mark),
                    ],
                    None,
                )?;
            }
        }
    }
    Ok(damage)
}

/// Takes away what earlier versions installed instead of the egress lock: the discard device
/// and the `uidrange` rules to its table (the table after the mark's).
fn remove_legacy(mark: u32) {
    let table = (mark + 1).to_string();
    for family in ["-4", "-6"] {
        while run("ip", &[family, "rule", "del", "lookup", &table], None).is_ok() {}
        let _ = run("ip", &[family, "route", "flush", "table", &table], None);
    }
    if run("ip", &["link", "show", LEGACY_DISCARD_DEVICE], None).is_ok() {
        let _ = run("ip", &["link", "del", LEGACY_DISCARD_DEVICE], None);
    }
}

/// Removes the table, the policy routing and the egress lock (`veil firewall remove`).
pub fn remove(mark: u32) -> Result<(), Error> {
    let _ = run("nft", &["delete", "table", "inet", TABLE], None);
    for family in ["-4", "-6"] {
        let table = mark.to_string();
        while run("ip", &[family, "rule", "del", "lookup", &table], None).is_ok() {}
        let _ = run("ip", &[family, "route", "flush", "table", &table], None);
        let views = view_rule_priority(mark);
        while run("ip", &[family, "rule", "del", "priority", &views], None).is_ok() {}
    }
    remove_legacy(mark);
    lock::Lock::new(&[], &[])?.remove()?;
    if listing().is_some() {
        return Err(crate::command::Error::Failed {
            command: format!("nft delete table inet {TABLE}"),
            stderr: "the table is still there".to_owned(),
        }
        .into());
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
            views: vec![],
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
            lines.contains(&"meta l4proto != tcp meta skuid @managed_uids oifname != \"lo\" drop")
        );
        assert!(lines.contains(&"meta l4proto udp iifname != \"lo\" ct mark 0x1e11 drop"));
        // Without views, nothing matches an incoming device.
        assert!(!text.contains("iifname \"vc-"));
        // The kernel's ICMP errors about intercepted flows stay in too.
        assert!(
            lines.contains(
                &"meta l4proto { icmp, ipv6-icmp } ct mark 0x1e11 oifname != \"lo\" drop"
            )
        );
    }

    #[test]
    fn a_view_gets_udp_to_its_listener_and_nothing_else_out() {
        let text = ruleset(&Interception {
            uids: vec![],
            gids: vec![],
            routed_uids: vec![],
            cgroups: vec![],
            inbound_cgroups: vec![],
            port: 15353,
            mark: 0x1e11,
            views: vec![ViewEnd {
                device: "vc-1000".into(),
                port: 15354,
            }],
        });
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let first = lines
            .iter()
            .position(|l| l.starts_with("iifname \"vc-1000\""))
            .expect("view rules");
        assert_eq!(
            &lines[first..first + 6],
            [
                "iifname \"vc-1000\" meta l4proto udp meta nfproto ipv4 tproxy ip to 127.0.0.1:15354 meta mark set 0x1e11 accept",
                "iifname \"vc-1000\" meta l4proto udp meta nfproto ipv6 tproxy ip6 to [::1]:15354 meta mark set 0x1e11 accept",
                "iifname \"vc-1000\" meta l4proto tcp meta nfproto ipv4 tproxy ip to 127.0.0.1:15354 meta mark set 0x1e11 accept",
                "iifname \"vc-1000\" meta l4proto tcp meta nfproto ipv6 tproxy ip6 to [::1]:15354 meta mark set 0x1e11 accept",
                "iifname \"vc-1000\" icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
                "iifname \"vc-1000\" drop",
            ]
        );
        // In prerouting, before anything that could accept the view's packets.
        assert!(lines[first - 1].starts_with("type filter hook prerouting"));
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
            views: vec![ViewEnd {
                device: "vc-65534".into(),
                port: 15354,
            }],
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
            views: vec![],
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
