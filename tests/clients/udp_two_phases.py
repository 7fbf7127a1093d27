#!/usr/bin/env python3
# Sends to two targets from one socket, waits for a go file, sends again.
import os, socket, sys, time
a, b, go = sys.argv[1], sys.argv[2], sys.argv[3]
def addr(t):
    h, p = t.rsplit(":", 1)
    return (h, int(p))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.7)
def ping(tag):
    for t in (a, b):
        try:
            s.sendto(tag.encode(), addr(t))
            data, frm = s.recvfrom(2048)
            print("reply %s:%d %s" % (frm[0], frm[1], data.decode()), flush=True)
        except OSError as e:
            print("fail %s %s" % (t, tag), flush=True)
ping("before")
deadline = time.time() + 20
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.05)
ping("after")
