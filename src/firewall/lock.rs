//! The kill switch's lock outside nftables and routing: an eBPF program on the cgroup egress
//! hook that drops every packet a managed socket would send out of any interface but `lo`,
//! unless it is TCP.
//!
//! nftables and policy routing can both be taken away by another root tool (`nft flush
//! ruleset`, which Debian's `nftables.service` runs at every reload), and routing has ways
//! around it that a user controls: a socket bound to a device, `IP_UNICAST_IF` or a `PKTINFO`
//! interface make the kernel skip routes that do not use that device, and multicast and
//! broadcast are answered by the `local` table or by no rule at all. The cgroup egress hook
//! sits where every IPv4 and IPv6 packet from a socket passes last (`ip_finish_output`,
//! `ip6_finish_output`, before fragmentation), whatever routing chose, whatever the link
//! state, whatever nftables holds:
//!
//! ```text
//! out of lo?            no  -> pass   (TPROXY delivers intercepted UDP over lo)
//! socket's uid managed? no  -> pass   (only in the program on the root cgroup; a program on a
//!                                      managed cgroup covers every socket made in it)
//! veil's netns?         no  -> pass   (the table and routes veil owns are this namespace's)
//! TCP?                  yes -> pass   (not intercepted; see the README)
//! anything else (UDP, UDP-Lite, ICMP echo, SCTP, IPv6 with extension headers)  -> drop
//! ```
//!
//! A dropped packet fails the send with `EPERM`. The program is attached with
//! `BPF_F_ALLOW_MULTI` (beside systemd's own `IPAddressDeny=` programs), pinned in bpffs as
//! `/sys/fs/bpf/veil/net<INODE>-users` (or `-cg-<PATH>` for a managed cgroup; INODE names
//! veil's network namespace) so that the daemon, a restart of it and `veil firewall remove`
//! find it, and replaced atomically (`BPF_F_REPLACE`) when the managed set changes. It stays
//! attached when the daemon dies: the cgroup holds it. Kernels without
//! `bpf_get_netns_cookie` for this hook (before 6.15) get the program without the namespace
//! test: then it covers the managed users in every namespace of the machine.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::platform::{self, Insn};

/// Where the lock's programs are pinned.
pub const PIN_DIR: &str = "/sys/fs/bpf/veil";
/// The programs' name as `bpftool prog` shows it.
const NAME: &str = "veil_lock";

/// What one program drops: packets of this namespace (`Some(cookie)`) or of every one, from
/// sockets of these uids (`Some`) or from every socket below the cgroup it is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Program {
    /// `bpf_get_netns_cookie` of veil's namespace.
    pub(crate) netns: Option<u64>,
    /// Managed uids (not empty: with none, no program on the root cgroup is needed).
    pub(crate) uids: Option<Vec<u32>>,
}

// Helper functions and `__sk_buff` offsets from <linux/bpf.h>.
const SKB_LOAD_BYTES: i32 = 26;
const GET_SOCKET_UID: i32 = 47;
const GET_NETNS_COOKIE: i32 = 122;
const SKB_PROTOCOL: i16 = 16;
const SKB_IFINDEX: i16 = 40;
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: i32 = 1;
/// `skb->protocol` (big-endian 16 bits) as a little-endian load sees it.
const ETH_P_IP: i32 = u16::from_ne_bytes(0x0800u16.to_be_bytes()) as i32;
const ETH_P_IPV6: i32 = u16::from_ne_bytes(0x86ddu16.to_be_bytes()) as i32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Allow,
    Drop,
    Managed,
    Load,
}

/// A few-instruction assembler: instructions, and jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
        self
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm)
    }
    fn label(&mut self, l: Label) -> &mut Self {
        self.labels.push((l, self.insns.len()));
        self
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| l == to)
                .map_or(*at + 1, |(_, i)| *i);
            // Programs here are a few dozen instructions: offsets fit.
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

// Opcodes (class | operation | source).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const LDX_B: u8 = 0x71;
const LD_IMM64: u8 = 0x18;
const JA: u8 = 0x05;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JNE_REG: u8 = 0x5d;
/// 32-bit compare, so that uids above 2^31 are not sign-extended.
const JEQ32_IMM: u8 = 0x16;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const IPPROTO_TCP: i32 = 6;

impl Program {
    /// The instructions (return 1 passes the packet, 0 drops it).
    pub(crate) fn instructions(&self) -> Vec<Insn> {
        let mut a = Asm::default();
        a.op(MOV64_REG, 6, 1, 0, 0)
            .op(LDX_W, 0, 6, SKB_IFINDEX, 0)
            .jump(JEQ_IMM, 0, 0, LOOPBACK_IFINDEX, Label::Allow);
        if let Some(uids) = &self.uids {
            a.op(MOV64_REG, 1, 6, 0, 0)
                .op(CALL, 0, 0, 0, GET_SOCKET_UID);
            for uid in uids {
                a.jump(JEQ32_IMM, 0, 0, *uid as i32, Label::Managed);
            }
            a.jump(JA, 0, 0, 0, Label::Allow);
        }
        a.label(Label::Managed);
        if let Some(cookie) = self.netns {
            a.op(MOV64_REG, 1, 6, 0, 0)
                .op(CALL, 0, 0, 0, GET_NETNS_COOKIE)
                .op(LD_IMM64, 1, 0, 0, cookie as u32 as i32)
                .op(0, 0, 0, 0, (cookie >> 32) as u32 as i32)
                .jump(JNE_REG, 0, 1, 0, Label::Allow);
        }
        // The L4 protocol: byte 9 of an IPv4 header, 6 of an IPv6 one (its first next-header).
        a.op(LDX_W, 0, 6, SKB_PROTOCOL, 0)
            .op(MOV64_IMM, 2, 0, 0, 9)
            .jump(JEQ_IMM, 0, 0, ETH_P_IP, Label::Load)
            .op(MOV64_IMM, 2, 0, 0, 6)
            .jump(JEQ_IMM, 0, 0, ETH_P_IPV6, Label::Load)
            .jump(JA, 0, 0, 0, Label::Drop)
            .label(Label::Load)
            .op(MOV64_REG, 1, 6, 0, 0)
            .op(MOV64_REG, 3, 10, 0, 0)
            .op(ADD64_IMM, 3, 0, 0, -8)
            .op(MOV64_IMM, 4, 0, 0, 1)
            .op(CALL, 0, 0, 0, SKB_LOAD_BYTES)
            .jump(JNE_IMM, 0, 0, 0, Label::Drop)
            .op(LDX_B, 0, 10, -8, 0)
            .jump(JEQ_IMM, 0, 0, IPPROTO_TCP, Label::Allow)
            .label(Label::Drop)
            .op(MOV64_IMM, 0, 0, 0, 0)
            .op(EXIT, 0, 0, 0, 0)
            .label(Label::Allow)
            .op(MOV64_IMM, 0, 0, 0, 1)
            .op(EXIT, 0, 0, 0, 0);
        a.finish()
    }
}

/// Why the lock could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel call failed.
    #[error("egress lock: {what}: {cause}")]
    Kernel {
        /// What was being done.
        what: String,
        /// Why (in the message, not a source, so that it is printed once).
        cause: std::io::Error,
    },
    /// The cgroup v2 hierarchy is not mounted.
    #[error("no cgroup v2 hierarchy is mounted: the kill switch's egress lock needs one")]
    NoCgroup2,
}

fn kernel(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |cause| Error::Kernel { what, cause }
}

/// One program the lock wants: where it is attached, where it is pinned, what it does.
struct Attachment {
    cgroup: PathBuf,
    pin: PathBuf,
    program: Program,
}

/// A difference between the lock in the kernel and the one wanted, as repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The pin concerned.
    pub pin: PathBuf,
    /// What was wrong.
    pub problem: &'static str,
}

/// The lock veil's namespace has: managed `uids` (on the cgroup v2 root) and managed cgroups
/// (their directories below `/sys/fs/cgroup`).
pub(crate) struct Lock {
    prefix: String,
    netns: Option<u64>,
    root: PathBuf,
    uids: Vec<u32>,
    cgroups: Vec<(String, PathBuf)>,
}

/// The pin name of a managed cgroup: `%`, `/` and `.` escaped (bpffs refuses names with dots).
fn escape(path: &str) -> String {
    path.replace('%', "%25")
        .replace('/', "%2F")
        .replace('.', "%2E")
}

/// The first cgroup v2 mount in a mount table.
pub(crate) fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(at))
    })
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is (systemd does at boot), and makes veil's pin
/// directory.
fn bpffs() -> Result<(), Error> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(kernel("reading mounts"))?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        matches!(
            (f.next(), f.next(), f.next()),
            (Some(_), Some("/sys/fs/bpf"), Some("bpf"))
        )
    });
    if !mounted {
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .map_err(|e| Error::Kernel {
            what: "mounting bpffs at /sys/fs/bpf".into(),
            cause: e.into(),
        })?;
    }
    match std::fs::create_dir(PIN_DIR) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(kernel(format!("creating {PIN_DIR}"))(e)),
    }
}

/// Whether this kernel lets the lock test a packet's namespace (6.15 and later).
fn netns_supported(cookie: u64) -> bool {
    let probe = Program {
        netns: Some(cookie),
        uids: None,
    };
    platform::load_cgroup_egress(NAME, &probe.instructions()).is_ok()
}

impl Lock {
    /// The lock for these managed uids and cgroups (paths relative to `/sys/fs/cgroup`, as
    /// nftables takes them), in the calling thread's network namespace.
    pub(crate) fn new(uids: &[u32], cgroups: &[(String, PathBuf)]) -> Result<Self, Error> {
        let inode = std::fs::metadata("/proc/self/ns/net")
            .map_err(kernel("reading /proc/self/ns/net"))?
            .ino();
        let mounts =
            std::fs::read_to_string("/proc/self/mounts").map_err(kernel("reading mounts"))?;
        let root = cgroup2_root(&mounts).ok_or(Error::NoCgroup2)?;
        let cookie = platform::netns_cookie().map_err(kernel("reading the netns cookie"))?;
        let netns = netns_supported(cookie).then_some(cookie);
        if netns.is_none() && !uids.is_empty() {
            tracing::warn!(
                "this kernel cannot scope the egress lock to veil's network namespace: managed users' non-TCP traffic is held in every namespace"
            );
        }
        Ok(Self {
            prefix: format!("net{inode}-"),
            netns,
            root,
            uids: uids.to_vec(),
            cgroups: cgroups.to_vec(),
        })
    }

    fn wanted(&self) -> Vec<Attachment> {
        let dir = Path::new(PIN_DIR);
        let mut out = Vec::new();
        if !self.uids.is_empty() {
            out.push(Attachment {
                cgroup: self.root.clone(),
                pin: dir.join(format!("{}users", self.prefix)),
                program: Program {
                    netns: self.netns,
                    uids: Some(self.uids.clone()),
                },
            });
        }
        for (name, cgroup) in &self.cgroups {
            out.push(Attachment {
                cgroup: cgroup.clone(),
                pin: dir.join(format!("{}cg-{}", self.prefix, escape(name))),
                program: Program {
                    netns: self.netns,
                    uids: None,
                },
            });
        }
        out
    }

    /// Puts every wanted program in place and takes away this namespace's programs that are
    /// no longer wanted; returns what had to change (nothing when the lock was intact).
    pub(crate) fn ensure(&self) -> Result<Vec<Repair>, Error> {
        bpffs()?;
        let wanted = self.wanted();
        let mut repairs = Vec::new();
        for a in &wanted {
            if let Some(problem) = ensure_one(a)? {
                repairs.push(Repair {
                    pin: a.pin.clone(),
                    problem,
                });
            }
        }
        for pin in self.pins()? {
            if !wanted.iter().any(|a| a.pin == pin) {
                self.take_away(&pin)?;
                repairs.push(Repair {
                    pin,
                    problem: "no longer managed",
                });
            }
        }
        Ok(repairs)
    }

    /// This namespace's pins.
    fn pins(&self) -> Result<Vec<PathBuf>, Error> {
        let entries = match std::fs::read_dir(PIN_DIR) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(kernel(format!("reading {PIN_DIR}"))(e)),
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(&self.prefix))
            .map(|e| e.path())
            .collect())
    }

    /// The cgroup a pin of this namespace belongs to.
    fn cgroup_of(&self, pin: &Path) -> Option<PathBuf> {
        let name = pin.file_name()?.to_str()?.strip_prefix(&self.prefix)?;
        // A pin staged by an `ensure` that stopped half-way belongs to the same cgroup.
        let name = name.strip_suffix("-new").unwrap_or(name);
        if name == "users" {
            return Some(self.root.clone());
        }
        let path = name
            .strip_prefix("cg-")?
            .replace("%2F", "/")
            .replace("%2E", ".")
            .replace("%25", "%");
        Some(Path::new("/sys/fs/cgroup").join(path))
    }

    fn take_away(&self, pin: &Path) -> Result<(), Error> {
        let program =
            platform::pinned(pin).map_err(kernel(format!("opening {}", pin.display())))?;
        if let Some(cgroup) = self.cgroup_of(pin)
            && let Ok(dir) = std::fs::File::open(&cgroup)
        {
            // Already detached (the cgroup was removed and made again): nothing to undo.
            let _ = platform::detach_egress(dir.as_fd(), program.as_fd());
        }
        std::fs::remove_file(pin).map_err(kernel(format!("removing {}", pin.display())))
    }

    /// Detaches and unpins every program of this namespace (`veil firewall remove`).
    pub(crate) fn remove(&self) -> Result<(), Error> {
        for pin in self.pins()? {
            self.take_away(&pin)?;
        }
        Ok(())
    }
}

/// Makes one attachment right; says what was wrong, if anything.
fn ensure_one(a: &Attachment) -> Result<Option<&'static str>, Error> {
    let cgroup = std::fs::File::open(&a.cgroup)
        .map_err(kernel(format!("opening cgroup {}", a.cgroup.display())))?;
    let fresh = platform::load_cgroup_egress(NAME, &a.program.instructions())
        .map_err(kernel("loading the egress lock"))?;
    let want = platform::program_info(fresh.as_fd()).map_err(kernel("reading a program"))?;
    let attached =
        platform::egress_programs(cgroup.as_fd()).map_err(kernel("listing a cgroup's programs"))?;
    let old: Option<OwnedFd> = platform::pinned(&a.pin).ok();
    let old_info = old
        .as_ref()
        .and_then(|fd| platform::program_info(fd.as_fd()).ok());
    let old_attached = old_info.is_some_and(|i| attached.contains(&i.id));
    let problem = match old_info {
        Some(i) if i.tag == want.tag && old_attached => return Ok(None),
        Some(_) if old_attached => "differs from what veil wrote",
        Some(_) => "detached",
        None => "missing",
    };
    // Pinned first, beside the old pin: a program is never attached without a pin that finds
    // it again (one that could not be pinned would hold forever, and nothing could remove it).
    // Then it goes in, in the old one's place where that is still attached, so there is no
    // moment without a lock; then the pin takes the old one's name.
    let mut staged = a.pin.clone().into_os_string();
    staged.push("-new");
    let staged = PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    platform::pin(fresh.as_fd(), &staged)
        .map_err(kernel(format!("pinning {}", staged.display())))?;
    let replace = old.as_ref().filter(|_| old_attached).map(AsFd::as_fd);
    if let Err(e) = platform::attach_egress(cgroup.as_fd(), fresh.as_fd(), replace) {
        let _ = std::fs::remove_file(&staged);
        return Err(kernel(format!(
            "attaching the egress lock to {}",
            a.cgroup.display()
        ))(e));
    }
    std::fs::rename(&staged, &a.pin).map_err(kernel(format!("pinning {}", a.pin.display())))?;
    Ok(Some(problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels_and_the_program_ends_in_exits() {
        let p = Program {
            netns: Some(0x1_0000_0002),
            uids: Some(vec![1000, 4_294_967_294]),
        };
        let insns = p.instructions();
        assert_eq!(insns.last().map(|i| i.code), Some(EXIT));
        for (at, i) in insns.iter().enumerate() {
            if matches!(i.code, JA | JEQ_IMM | JNE_IMM | JNE_REG | JEQ32_IMM) {
                let target = at as i64 + 1 + i64::from(i.off);
                assert!(
                    target > at as i64 && (target as usize) < insns.len(),
                    "{at}"
                );
            }
        }
        // The cookie is split over the two halves of the 64-bit load.
        let ld = insns
            .iter()
            .position(|i| i.code == LD_IMM64)
            .expect("ld_imm64");
        assert_eq!((insns[ld].imm, insns[ld + 1].imm), (2, 1));
        // A uid above 2^31 is compared in 32 bits.
        assert!(
            insns
                .iter()
                .any(|i| i.code == JEQ32_IMM && i.imm as u32 == 4_294_967_294)
        );
    }

    #[test]
    fn the_kernel_accepts_every_variant() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "needs root (tests/run.sh runs as root in CI)"
        );
        let cookie = platform::netns_cookie().expect("cookie");
        for netns in [None, Some(cookie)] {
            for uids in [None, Some(vec![65534, 1, 4_294_967_294])] {
                let p = Program { netns, uids };
                let fd = platform::load_cgroup_egress(NAME, &p.instructions());
                assert!(fd.is_ok(), "{p:?}: {fd:?}");
            }
        }
    }

    #[test]
    fn pin_names_round_trip_cgroup_paths() {
        let lock = Lock {
            prefix: "net7-".into(),
            netns: None,
            root: PathBuf::from("/sys/fs/cgroup/unified"),
            uids: vec![],
            cgroups: vec![],
        };
        let pin = Path::new(PIN_DIR).join(format!("net7-cg-{}", escape("unified/a%2Eb/c.scope")));
        assert_eq!(
            lock.cgroup_of(&pin),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a%2Eb/c.scope"))
        );
        assert_eq!(
            lock.cgroup_of(&Path::new(PIN_DIR).join("net7-users")),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(lock.cgroup_of(&Path::new(PIN_DIR).join("net8-users")), None);
        assert_eq!(
            lock.cgroup_of(&Path::new(PIN_DIR).join("net7-users-new")),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let mounts = "cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }
}
