#!/usr/bin/env python3
# Forges UDP with a raw socket (a managed user given `CAP_NET_RAW`), each datagram from a
# source port no socket owns.
import socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for i in range(n):
    payload = b"forged"
    # Source port, destination port, length, no checksum (IPv4 allows 0).
    s.sendto(struct.pack("!HHHH", 40000 + i, port, 8 + len(payload), 0) + payload, (host, 0))
