#!/usr/bin/env python3
# Waits up to `secs` for one datagram on UDP port `port`; prints "got …" or "none".
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(float(sys.argv[2]))
try:
    data, frm = s.recvfrom(2048)
    print("got %s from %s" % (data.decode(), frm[0]), flush=True)
except OSError:
    print("none", flush=True)
