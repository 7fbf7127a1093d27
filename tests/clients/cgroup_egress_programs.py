"""Prints how many eBPF programs are attached to the cgroup v2 root's egress hook (bpf(2)
BPF_PROG_QUERY, stdlib ctypes only): the tests' check that veil's egress lock is attached and
then detached, and that nothing is left behind."""
import ctypes
import os
import struct

root = next(
    line.split()[1]
    for line in open("/proc/self/mounts")
    if line.split()[2] == "cgroup2"
)
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
ids = (ctypes.c_uint32 * 256)()
# target_fd, attach_type (BPF_CGROUP_INET_EGRESS), query_flags, attach_flags, prog_ids, prog_cnt
attr = ctypes.create_string_buffer(struct.pack("<IIIIQI", fd, 1, 0, 0, ctypes.addressof(ids), 256), 128)
if libc.syscall(321, 16, attr, 128) != 0:  # SYS_bpf, BPF_PROG_QUERY
    raise OSError(ctypes.get_errno(), "BPF_PROG_QUERY")
print(struct.unpack_from("<I", attr.raw, 24)[0])
