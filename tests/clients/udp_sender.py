#!/usr/bin/env python3
# A plain UDP sender (no proxy support): one datagram per payload, waits for each echo.
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
for p in sys.argv[4:]:
    if p.startswith("sleep:"):
        time.sleep(float(p[6:]))
        continue
    if p.startswith("burst:"):
        # burst:N:SIZE — N datagrams back to back, then their echoes, checked in order.
        _, n, size = p.split(":")
        sent = [b"%05d#" % i + b"x" * (int(size) - 6) for i in range(int(n))]
        for d in sent:
            s.sendto(d, (host, port))
        got, frm = [], ("-", 0)
        try:
            while len(got) < len(sent):
                data, frm = s.recvfrom(65535)
                got.append(data)
        except OSError:
            pass
        verdict = "intact" if got == sent[: len(got)] else "mangled"
        print("burst %s:%d %d/%d %s" % (frm[0], frm[1], len(got), len(sent), verdict), flush=True)
        continue
    try:
        s.sendto(p.encode(), (host, port))
        data, frm = s.recvfrom(2048)
        print("reply %s:%d %s" % (frm[0], frm[1], data.decode()), flush=True)
    except OSError as e:
        print("fail", type(e).__name__, flush=True)
