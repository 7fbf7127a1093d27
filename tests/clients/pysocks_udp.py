"""PySocks (pinned, unmodified) as a SOCKS5 UDP client, driven by the integration tests.

usage: pysocks_udp.py PROXY_HOST PROXY_PORT [--user U --password P] [--timeout S] TARGET_HOST:PORT:PAYLOAD ...

Sends each payload to its target through one UDP association, waits for an echo after each, and
prints one line per target: `reply <from_host>:<from_port> <payload>` or `timeout`.

With `--burst N --size S`, sends N datagrams of S bytes to each target back to back (PAYLOAD, a
sequence number, padding), then reads N echoes and prints `burst <from> <got>/<N> <verdict>`:
`intact` if every echo is the datagram sent, in order; else `reordered` or `corrupt`.

With no TARGET arguments, reads them from standard input, one per line, and answers each before
reading the next (so a test can time each send; the association stays open in between).
"""
import argparse
import socket
import sys

import socks

p = argparse.ArgumentParser()
p.add_argument("proxy_host")
p.add_argument("proxy_port", type=int)
p.add_argument("--user")
p.add_argument("--password")
p.add_argument("--timeout", type=float, default=1.0)
p.add_argument("--burst", type=int, default=0)
p.add_argument("--size", type=int, default=1200)
p.add_argument("sends", nargs="*")
a = p.parse_intermixed_args()  # options may come between the positionals

s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, a.proxy_host, a.proxy_port, rdns=True, username=a.user, password=a.password)
s.settimeout(a.timeout)
def burst(host, port, payload):
    sent = [f"{payload}#{i:05d}#".encode().ljust(a.size, b"x") for i in range(a.burst)]
    for d in sent:
        s.sendto(d, (host, int(port)))
    got, frm = [], ("-", 0)
    try:
        while len(got) < len(sent):
            data, frm = s.recvfrom(65535)
            got.append(data)
    except socket.timeout:
        pass
    if got == sent[: len(got)]:
        verdict = "intact"
    elif sorted(got) == sorted(sent[: len(got)]) or set(got) <= set(sent):
        verdict = "reordered"
    else:
        verdict = "corrupt"
    print(f"burst {frm[0]}:{frm[1]} {len(got)}/{len(sent)} {verdict}", flush=True)


for send in a.sends or (line.strip() for line in sys.stdin):
    host, port, payload = send.rsplit(":", 2)
    host = host.strip("[]")
    if a.burst:
        burst(host, port, payload)
        continue
    try:
        s.sendto(payload.encode(), (host, int(port)))
        data, frm = s.recvfrom(65535)
        print(f"reply {frm[0]}:{frm[1]} {data.decode(errors='replace')}", flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    except socks.ProxyError as e:
        print(f"proxy-error {e}", flush=True)
        sys.exit(3)
s.close()
