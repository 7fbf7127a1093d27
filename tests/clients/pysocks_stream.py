"""PySocks UDP as a media-like sender: one numbered packet every INTERVAL seconds for DURATION
seconds through one association, printing `reply SECONDS SEQ` for each echo received (seconds
since start), `start SECONDS` first (the start on CLOCK_MONOTONIC, which the test's clock shares)
and `sent N` at the end.

usage: pysocks_stream.py PROXY_HOST PROXY_PORT TARGET_HOST TARGET_PORT DURATION INTERVAL
"""
import select
import socket
import sys
import time

import socks

host, port, thost, tport, duration, interval = sys.argv[1:7]
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, host, int(port))
start = time.monotonic()
print("start %.6f" % start, flush=True)
seq = 0
next_send = start
end = start + float(duration)
s.sendto(b"hello", (thost, int(tport)))
s.setblocking(False)
while time.monotonic() < end:
    now = time.monotonic()
    if now >= next_send:
        seq += 1
        try:
            s.sendto(b"seq-%d" % seq, (thost, int(tport)))
        except (BlockingIOError, OSError):
            pass
        next_send += float(interval)
    r, _, _ = select.select([s], [], [], max(0.0, min(next_send, end) - time.monotonic()))
    if r:
        try:
            data, frm = s.recvfrom(65535)
        except (BlockingIOError, OSError):
            continue
        if data.startswith(b"seq-"):
            print("reply %.3f %s" % (time.monotonic() - start, data[4:].decode()), flush=True)
print("sent", seq, flush=True)
