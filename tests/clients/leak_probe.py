"""Leak probes: every way an unprivileged user can make the kernel send a non-TCP packet.

Run as the user to test (setpriv), inside the client namespace:
    leak_probe.py TAG IFACE V4_SELF V4_PEER V4_SUBNET_BCAST V6_PEER V6_LINK_LOCAL_PEER

Each probe's payload starts with "veilprobe CLASS TAG", which a capture at the gateway looks
for: the capture, not this script, decides what leaked. This prints one line per probe,
"CLASS sent" or "CLASS refused ERRNO-NAME", for the failure message.
"""
import ctypes
import errno
import socket
import struct
import sys

tag, iface, self4, peer4, bcast4, peer6, ll6 = sys.argv[1:8]
ifindex = socket.if_nametoindex(iface)
PORT = 7000
IP_UNICAST_IF = 50
IPV6_UNICAST_IF = 76
UDP_SEGMENT = 103
IPPROTO_UDPLITE = 136
IP_PKTINFO = 8


def payload(cls):
    return ("veilprobe %s %s " % (cls, tag)).encode() + b"x" * 16


def probe(cls, fn):
    try:
        fn(cls)
        print(cls, "sent", flush=True)
    except OSError as e:
        print(cls, "refused", errno.errorcode.get(e.errno, str(e.errno)), flush=True)


def udp(family, proto=0):
    return socket.socket(family, socket.SOCK_DGRAM, proto)


def plain(family, peer, proto=0):
    def f(cls):
        udp(family, proto).sendto(payload(cls), (peer, PORT))
    return f


def bound_to_device(family, peer):
    def f(cls):
        s = udp(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        s.sendto(payload(cls), (peer, PORT))
    return f


def unicast_if(family, peer):
    def f(cls):
        s = udp(family)
        # The kernel reads both options' interface index in network byte order.
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, struct.pack("!I", ifindex))
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, struct.pack("!I", ifindex))
        s.sendto(payload(cls), (peer, PORT))
    return f


def pktinfo(family, peer):
    def f(cls):
        s = udp(family)
        if family == socket.AF_INET:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            cmsg = (socket.IPPROTO_IP, IP_PKTINFO, struct.pack("@i4s4s", ifindex, bytes(4), bytes(4)))
        else:
            # struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
            cmsg = (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, struct.pack("@16sI", bytes(16), ifindex))
        s.sendmsg([payload(cls)], [cmsg], 0, (peer, PORT))
    return f


def link_local(cls):
    udp(socket.AF_INET6).sendto(payload(cls), (ll6, PORT, 0, ifindex))


def multicast4(how):
    def f(cls):
        s = udp(socket.AF_INET)
        if how == "if":
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self4))
        elif how == "bound":
            s.bind((self4, 0))
        s.sendto(payload(cls), ("224.0.0.251", 5353))
    return f


def multicast6(with_if):
    def f(cls):
        s = udp(socket.AF_INET6)
        if with_if:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            s.sendto(payload(cls), ("ff02::fb", 5353))
        else:
            s.sendto(payload(cls), ("ff02::fb", 5353, 0, ifindex))
    return f


def multicast6_no_scope(cls):
    # A global-scope group needs no scope id: the default route picks the interface.
    udp(socket.AF_INET6).sendto(payload(cls), ("ff0e::fb", 5353))


def broadcast(addr):
    def f(cls):
        s = udp(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.sendto(payload(cls), (addr, PORT))
    return f


class Mmsghdr(ctypes.Structure):
    pass


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


Mmsghdr._fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


def sendmmsg(family, peer):
    def f(cls):
        libc = ctypes.CDLL(None, use_errno=True)
        s = udp(family)
        s.connect((peer, PORT))
        data = [ctypes.create_string_buffer(payload(cls)) for _ in range(2)]
        iovs = [Iovec(ctypes.cast(d, ctypes.c_void_p), len(d.raw) - 1) for d in data]
        msgs = (Mmsghdr * 2)()
        for i in range(2):
            msgs[i].hdr.iov = ctypes.pointer(iovs[i])
            msgs[i].hdr.iovlen = 1
        n = libc.sendmmsg(s.fileno(), msgs, 2, 0)
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, errno.errorcode.get(e, ""))
    return f


def gso(family, peer):
    def f(cls):
        s = udp(family)
        s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, 100)
        one = payload(cls).ljust(100, b"x")
        s.sendto(one * 3, (peer, PORT))
    return f


def echo(family, peer):
    def f(cls):
        if family == socket.AF_INET:
            s = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            kind = 8
        else:
            s = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
            kind = 128
        s.sendto(struct.pack("!BBHHH", kind, 0, 0, 0, 1) + payload(cls), (peer, 0))
    return f


probes = [
    ("udp4", plain(socket.AF_INET, peer4)),
    ("udp6", plain(socket.AF_INET6, peer6)),
    ("device4", bound_to_device(socket.AF_INET, peer4)),
    ("device6", bound_to_device(socket.AF_INET6, peer6)),
    ("unicast_if4", unicast_if(socket.AF_INET, peer4)),
    ("unicast_if6", unicast_if(socket.AF_INET6, peer6)),
    ("pktinfo4", pktinfo(socket.AF_INET, peer4)),
    ("pktinfo6", pktinfo(socket.AF_INET6, peer6)),
    ("link_local6", link_local),
    ("mcast4", multicast4("")),
    ("mcast4_if", multicast4("if")),
    ("mcast4_bound", multicast4("bound")),
    ("mcast6_scope", multicast6(False)),
    ("mcast6_if", multicast6(True)),
    ("mcast6_global", multicast6_no_scope),
    ("bcast4_limited", broadcast("255.255.255.255")),
    ("bcast4_subnet", broadcast(bcast4)),
    ("sendmmsg4", sendmmsg(socket.AF_INET, peer4)),
    ("sendmmsg6", sendmmsg(socket.AF_INET6, peer6)),
    ("gso4", gso(socket.AF_INET, peer4)),
    ("gso6", gso(socket.AF_INET6, peer6)),
    ("udplite4", plain(socket.AF_INET, peer4, IPPROTO_UDPLITE)),
    ("udplite6", plain(socket.AF_INET6, peer6, IPPROTO_UDPLITE)),
    ("ping4", echo(socket.AF_INET, peer4)),
    ("ping6", echo(socket.AF_INET6, peer6)),
]
for cls, fn in probes:
    probe(cls, fn)
