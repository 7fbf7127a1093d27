"""Sends hand-made SOCKS5 handshakes to a server and prints each raw answer in hex.

usage: socks5_probe.py HOST PORT TARGET_PORT

TARGET_PORT is a closed loopback port used as the CONNECT target of the well-formed requests.
One line per probe: `NAME HEX` (HEX is empty when the server closed without answering).
"""
import socket
import sys

host, port, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = target.to_bytes(2, "big")


def probe(data):
    c = socket.create_connection((host, port))
    c.settimeout(3)
    c.sendall(data)
    try:
        c.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    out = b""
    try:
        while True:
            d = c.recv(100)
            if not d:
                break
            out += d
    except socket.timeout:
        out += b"<timeout>"
    c.close()
    return out.hex()


probes = {
    "bind": bytes([5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1]) + t,
    "unknown-command": bytes([5, 1, 0, 5, 9, 0, 1, 127, 0, 0, 1]) + t,
    "unknown-address-type": bytes([5, 1, 0, 5, 1, 0, 5, 1]),
    "trailing-bytes": bytes([5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1]) + t + b"\xde\xad",
    "truncated-domain": bytes([5, 1, 0, 5, 1, 0, 3, 9]) + b"localhos",
    "password-only-offered": bytes([5, 1, 2]),
}
for name, data in probes.items():
    print(name, probe(data), flush=True)
