#!/usr/bin/env python3
# A tiny authoritative DNS server for tests: answers A and AAAA queries for NAME.test with the
# addresses given, NXDOMAIN for anything else; prints "query NAME TYPE from IP" per query.
# Usage: dns_server.py BIND_IP PORT NAME=IPV4[,IPV6] ...
import socket, struct, sys

bind, port = sys.argv[1], int(sys.argv[2])
records = {}
for arg in sys.argv[3:]:
    name, addrs = arg.split("=")
    records[name.lower().rstrip(".")] = addrs.split(",")

s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((bind, port))
print("listening", flush=True)
while True:
    data, frm = s.recvfrom(4096)
    if len(data) < 12:
        continue
    qid, flags, qd = struct.unpack("!HHH", data[:6])
    labels, i = [], 12
    while i < len(data) and data[i] != 0:
        labels.append(data[i + 1 : i + 1 + data[i]].decode("ascii", "replace"))
        i += 1 + data[i]
    qtype = struct.unpack("!H", data[i + 1 : i + 3])[0]
    question = data[12 : i + 5]
    name = ".".join(labels).lower()
    print("query %s %d from %s" % (name, qtype, frm[0]), flush=True)
    answers = []
    for a in records.get(name, []):
        if qtype == 1 and ":" not in a:
            answers.append(struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_pton(socket.AF_INET, a))
        if qtype == 28 and ":" in a:
            answers.append(struct.pack("!HHHIH", 0xC00C, 28, 1, 60, 16) + socket.inet_pton(socket.AF_INET6, a))
    rcode = 0 if name in records else 3
    header = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    s.sendto(header + question + b"".join(answers), frm)
