//! The one module with `unsafe`: the kernel interfaces that take raw pointers and that
//! neither nix nor socket2 wraps, and the one hook into `fork`.
//!
//! - `SO_ATTACH_REUSEPORT_CBPF`, a `setsockopt` whose value points at a classic BPF program
//!   (the relay's shard steering, [`crate::reuseport`]);
//! - `bpf(2)`, for the kill switch's egress lock ([`crate::firewall::lock`]): load an eBPF
//!   program, pin it in bpffs, attach it to a cgroup, list what a cgroup has attached;
//! - `pre_exec`, to start a confined app ([`crate::confine::launch`]): the forked child enters
//!   the view before it execs.
//!
//! Each function takes and returns plain Rust values; the `bpf_attr` unions are built here as
//! zeroed byte arrays with each field written at its offset from `<linux/bpf.h>` (the kernel
//! requires every byte past the fields a command reads to be zero).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Attaches a classic BPF program to `socket`'s `SO_REUSEPORT` group: it returns, for each
/// datagram, the index of the group's socket that gets it.
pub(crate) fn attach_reuseport_cbpf<S: AsFd>(
    socket: &S,
    program: &[libc::sock_filter],
) -> io::Result<()> {
    let mut program = program.to_vec();
    let fprog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel copies the
    // program and validates it, and reads exactly `size_of::<sock_fprog>()` bytes of `fprog`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Insn {
    /// Opcode.
    pub(crate) code: u8,
    /// Destination register in the low nibble, source register in the high one.
    pub(crate) regs: u8,
    /// Jump offset or memory offset.
    pub(crate) off: i16,
    /// Immediate.
    pub(crate) imm: i32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
/// `BPF_CGROUP_INET_EGRESS`.
const ATTACH_EGRESS: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_F_REPLACE: u32 = 4;

/// A `bpf_attr` being filled in: 128 zeroed bytes, fields written at their offsets.
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(mut self, at: usize, v: u32) -> Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, at: usize, v: u64) -> Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, at: usize, v: &[u8]) -> Self {
        self.0[at..at + v.len()].copy_from_slice(v);
        self
    }
    /// Runs `bpf(cmd, self)`; the kernel may write results back into it.
    fn call(&mut self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: the attribute is 128 initialised bytes, more than any command used here
        // reads or writes; every pointer stored in it points at memory that the caller keeps
        // alive and sized as the stored length says for the duration of this call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                self.0.len() as libc::c_uint,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    /// Runs a command that returns a new file descriptor.
    fn call_fd(&mut self, cmd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)?;
        let fd = i32::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// Loads a cgroup socket-buffer program for the egress hook, named `name` (at most 15
/// bytes). On a verifier refusal the error carries the verifier's log.
pub(crate) fn load_cgroup_egress(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 16 << 10];
    let mut name16 = [0u8; 16];
    let n = name.len().min(15);
    name16[..n].copy_from_slice(&name.as_bytes()[..n]);
    let mut attr = Attr::new()
        .u32(0, BPF_PROG_TYPE_CGROUP_SKB)
        .u32(
            4,
            u32::try_from(insns.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
        )
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .bytes(48, &name16)
        .u32(68, ATTACH_EGRESS);
    attr.call_fd(BPF_PROG_LOAD).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
        if last.is_empty() {
            e
        } else {
            io::Error::new(e.kind(), format!("{e}; verifier: {last}"))
        }
    })
}

/// Pins the object `fd` at `path` in a bpffs mount.
pub(crate) fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    Attr::new()
        .u64(0, p.as_ptr() as u64)
        .u32(8, fd.as_raw_fd() as u32)
        .call(BPF_OBJ_PIN)
        .map(drop)
}

/// Opens the object pinned at `path`.
pub(crate) fn pinned(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    Attr::new().u64(0, p.as_ptr() as u64).call_fd(BPF_OBJ_GET)
}

/// A loaded program's kernel id and tag (a hash of its instructions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProgramInfo {
    /// The id `bpftool prog` shows, and cgroup queries return.
    pub(crate) id: u32,
    /// The kernel's hash of the instructions: equal tags, equal programs.
    pub(crate) tag: [u8; 8],
}

/// The id and tag of the program `fd`.
pub(crate) fn program_info(fd: BorrowedFd<'_>) -> io::Result<ProgramInfo> {
    let mut info = [0u8; 64];
    Attr::new()
        .u32(0, fd.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64)
        .call(BPF_OBJ_GET_INFO_BY_FD)?;
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&info[8..16]);
    Ok(ProgramInfo {
        id: u32::from_ne_bytes([info[4], info[5], info[6], info[7]]),
        tag,
    })
}

/// The ids of the egress programs attached to the cgroup `cgroup` (a directory fd) itself.
pub(crate) fn egress_programs(cgroup: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, ATTACH_EGRESS)
        .u64(16, ids.as_mut_ptr() as u64)
        .u32(24, ids.len() as u32);
    attr.call(BPF_PROG_QUERY)?;
    let count = u32::from_ne_bytes([attr.0[24], attr.0[25], attr.0[26], attr.0[27]]) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// Attaches `program` to `cgroup`'s egress hook beside whatever else is attached there
/// (`BPF_F_ALLOW_MULTI`); with `replace`, in that program's place, atomically.
pub(crate) fn attach_egress(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, program.as_raw_fd() as u32)
        .u32(8, ATTACH_EGRESS);
    attr = match replace {
        Some(old) => attr
            .u32(12, BPF_F_ALLOW_MULTI | BPF_F_REPLACE)
            .u32(16, old.as_raw_fd() as u32),
        None => attr.u32(12, BPF_F_ALLOW_MULTI),
    };
    attr.call(BPF_PROG_ATTACH).map(drop)
}

/// Detaches `program` from `cgroup`'s egress hook.
pub(crate) fn detach_egress(cgroup: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    Attr::new()
        .u32(0, cgroup.as_raw_fd() as u32)
        .u32(4, program.as_raw_fd() as u32)
        .u32(8, ATTACH_EGRESS)
        .call(BPF_PROG_DETACH)
        .map(drop)
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`): a number the
/// kernel never gives to another namespace while it runs, and what an eBPF program's
/// `bpf_get_netns_cookie` returns for packets of that namespace.
pub(crate) fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given, for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a confined app is started as: everything prepared before the fork, so that the child
/// only makes system calls between fork and exec.
pub(crate) struct Confinement {
    /// The view's network namespace (`/run/netns/NAME`, opened).
    pub netns: OwnedFd,
    /// Files bind-mounted over others in the app's own mount namespace (the view's
    /// resolv.conf over `/etc/resolv.conf`, `/dev/null` over resolver sockets):
    /// `(source, target)`.
    pub binds: Vec<(CString, CString)>,
    /// Who the app runs as.
    pub uid: nix::unistd::Uid,
    /// Its primary group.
    pub gid: nix::unistd::Gid,
    /// Its supplementary groups.
    pub groups: Vec<nix::unistd::Gid>,
    /// Its working directory, entered as that user.
    pub cwd: CString,
}

/// Makes `command`'s child enter `c` before it execs: the view's network namespace, a mount
/// namespace of its own (a slave of the host's, so nothing it mounts reaches the host) with the
/// binds, a new session, then the user's groups, gid and uid — dropped
/// last, after everything that needs root — and its working directory as that user. Any step
/// failing fails the spawn: nothing runs half confined.
pub(crate) fn confine_child(command: &mut std::process::Command, c: Confinement) {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, setns, unshare};
    use std::os::unix::process::CommandExt as _;
    let step = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    let child = move || -> io::Result<()> {
        setns(&c.netns, CloneFlags::CLONE_NEWNET).map_err(step)?;
        unshare(CloneFlags::CLONE_NEWNS).map_err(step)?;
        mount(
            None::<&std::ffi::CStr>,
            c"/",
            None::<&std::ffi::CStr>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&std::ffi::CStr>,
        )
        .map_err(step)?;
        for (source, target) in &c.binds {
            mount(
                Some(source.as_c_str()),
                target.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND,
                None::<&std::ffi::CStr>,
            )
            .map_err(step)?;
        }
        // The daemon's raised open-file limit is not the app's: a login session's soft limit.
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(step)?;
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(1024), hard).map_err(step)?;
        nix::unistd::setsid().map_err(step)?;
        nix::unistd::setgroups(&c.groups).map_err(step)?;
        nix::unistd::setgid(c.gid).map_err(step)?;
        nix::unistd::setuid(c.uid).map_err(step)?;
        nix::unistd::chdir(c.cwd.as_c_str()).map_err(step)?;
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (setns, unshare, mount, getrlimit, setrlimit, setsid, setgroups, setgid, setuid, chdir)
    // on values prepared
    // before the fork, and allocates nothing; it takes no lock.
    unsafe {
        command.pre_exec(child);
    }
}

/// Takes ownership of a descriptor the kernel just passed to this process (`SCM_RIGHTS`).
pub(crate) fn received_fd(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` came from `recvmsg`'s `SCM_RIGHTS`: the kernel installed it in this
    // process for this call, and nothing else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
