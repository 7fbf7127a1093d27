"""PySocks (pinned, unmodified) as a SOCKS5 UDP client, driven by the integration tests.

usage: pysocks_udp.py PROXY_HOST PROXY_PORT [--user U --password P] [--timeout S] TARGET_HOST:PORT:PAYLOAD ...

Sends each payload to its target through one UDP association, waits for an echo after each, and
prints one line per target: `reply <from_host>:<from_port> <payload>` or `timeout`.
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
p.add_argument("sends", nargs="+")
a = p.parse_args()

s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, a.proxy_host, a.proxy_port, rdns=True, username=a.user, password=a.password)
s.settimeout(a.timeout)
for send in a.sends:
    host, port, payload = send.rsplit(":", 2)
    host = host.strip("[]")
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
