"""An independent MASQUE client on aioquic (its own QUIC and HTTP/3 stack), used to check veil's
relay against a stack nobody here wrote.

usage:
  masque_client.py RELAY_HOST RELAY_PORT --name NAME --ca CA [--cert C --key K] [--user U] MODE ...
modes:
  bind ECHO_HOST:PORT ...   one CONNECT-UDP bind (target *); per echo server: an uncompressed
                            datagram, then a compressed context (COMPRESSION_ASSIGN / ACK) and a
                            compressed datagram. Prints `public ADDR`, `reply CTX FROM PAYLOAD`,
                            `ack CTX`, `close CTX`.
  targets HOST:PORT ...     one unextended CONNECT-UDP request per target; prints
                            `target T STATUS PROXY-STATUS`.
  binds N                   N bind requests at once; prints `bind I STATUS PROXY-STATUS`.
  paths PATH ...            one unextended CONNECT-UDP request per raw PATH (sent as given);
                            prints `path P STATUS PROXY-STATUS`.
  bigheaders MB             a request stream whose HEADERS frame announces 2^40 bytes, then MB
                            megabytes of it; prints `stopped` if the relay stopped the stream,
                            else `sent MB`.
  closes N                  one bind, then N COMPRESSION_CLOSE capsules; prints `ended` if the
                            relay ended the request, else `open`.
  unfinished N [ROUNDS [B]] per round, N requests whose HEADERS frame (B bytes of it sent)
                            never completes on one connection, then --linger seconds; prints
                            `round I done`.
  capsules ECHO SIZE ...    one bind; per size, a datagram of SIZE bytes sent as a DATAGRAM
                            capsule on the request stream (RFC 9297 §3.5); prints
                            `echo SIZE frame|capsule intact|corrupt` or `no-echo SIZE`.
On a failed handshake prints `handshake-failed ERROR`.
"""
import argparse
import asyncio
import ipaddress
import socket
import struct
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


def varint(v):
    return encode_uint_var(v)


def read_varint(data, at=0):
    buf = Buffer(data=data[at:])
    v = buf.pull_uint_var()
    return v, at + buf.tell()


def address(host_port):
    host, port = host_port.rsplit(":", 1)
    ip = ipaddress.ip_address(host.strip("[]"))
    return ip, int(port)


def uncompressed(ip, port, payload):
    version = 4 if ip.version == 4 else 6
    return bytes([version]) + ip.packed + struct.pack(">H", port) + payload


def capsule(ctype, value):
    return varint(ctype) + varint(len(value)) + value


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # enable_webtransport makes aioquic announce SETTINGS_H3_DATAGRAM.
        self.http = H3Connection(self._quic, enable_webtransport=True)
        self.headers = {}
        self.waiters = {}
        self.data = {}
        self.datagrams = asyncio.Queue()

    def quic_event_received(self, event):
        for e in self.http.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.headers[e.stream_id] = dict(e.headers)
                w = self.waiters.pop(e.stream_id, None)
                if w and not w.done():
                    w.set_result(dict(e.headers))
            elif isinstance(e, DataReceived):
                self.data.setdefault(e.stream_id, bytearray()).extend(e.data)
            elif isinstance(e, DatagramReceived):
                self.datagrams.put_nowait((e.stream_id, e.data))

    async def request(self, path, user, bind, preferred=None):
        sid = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
            (b"capsule-protocol", b"?1"),
        ]
        if bind:
            headers.append((b"connect-udp-bind", b"?1"))
        if user:
            headers.append((b"veil-user", user.encode()))
        if preferred:
            headers.append((b"veil-preferred-port", str(preferred).encode()))
        self.http.send_headers(sid, headers)
        fut = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        self.transmit()
        return sid, fut

    def send_capsule(self, sid, data):
        self.http.send_data(sid, data, end_stream=False)
        self.transmit()

    def send_datagram(self, sid, data):
        self.http.send_datagram(sid, data)
        self.transmit()

    def capsules(self, sid):
        """Decodes and consumes the complete capsules received on a stream."""
        buf = self.data.get(sid, bytearray())
        out = []
        while True:
            try:
                ctype, at = read_varint(bytes(buf))
                length, at = read_varint(bytes(buf), at)
            except Exception:
                break
            if len(buf) < at + length:
                break
            out.append((ctype, bytes(buf[at:at + length])))
            del buf[:at + length]
        return out


async def recv_datagram(client, timeout=2.0):
    try:
        return await asyncio.wait_for(client.datagrams.get(), timeout)
    except asyncio.TimeoutError:
        return None


async def run(a):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.load_verify_locations(a.ca)
    config.server_name = a.name
    if a.cert:
        config.load_cert_chain(a.cert, a.key)
    try:
        async with connect(a.host, a.port, configuration=config, create_protocol=Client, wait_connected=True) as client:
            client.authority = a.name
            if a.mode == "bind":
                await bind(client, a)
            elif a.mode == "burst":
                await burst(client, a)
            elif a.mode == "paths":
                for path in a.args:
                    sid, fut = await client.request(path, a.user, False)
                    try:
                        h = await asyncio.wait_for(fut, 5)
                        print("path", path, h.get(b":status", b"").decode(), h.get(b"proxy-status", b"").decode(), flush=True)
                    except asyncio.TimeoutError:
                        print("path", path, "no-response", flush=True)
            elif a.mode == "bigheaders":
                await bigheaders(client, int(a.args[0]))
            elif a.mode == "closes":
                await closes(client, a, int(a.args[0]))
            elif a.mode == "unfinished":
                quic = client._quic
                rounds = int(a.args[1]) if len(a.args) > 1 else 1
                for r in range(rounds):
                    for _ in range(int(a.args[0])):
                        sid = quic.get_next_available_stream_id()
                        body = int(a.args[2]) if len(a.args) > 2 else 20
                        quic.send_stream_data(sid, varint(0x01) + varint(body + 100) + bytes(body), end_stream=False)
                        client.transmit()
                        await asyncio.sleep(0)
                    await asyncio.sleep(a.linger)
                    print("round", r + 1, "done", flush=True)
                # The next line is read after the test measured the relay.
                await asyncio.sleep(0.5)
            elif a.mode == "capsules":
                await capsules(client, a)
            elif a.mode == "targets":
                for t in a.args:
                    ip, port = address(t)
                    host = str(ip).replace(":", "%3A")
                    sid, fut = await client.request(f"/.well-known/masque/udp/{host}/{port}/", a.user, False)
                    h = await asyncio.wait_for(fut, 5)
                    print("target", t, h.get(b":status", b"").decode(), h.get(b"proxy-status", b"").decode(), flush=True)
            elif a.mode == "binds":
                futs = []
                for i in range(int(a.args[0])):
                    futs.append(await client.request("/.well-known/masque/udp/%2A/%2A/", a.user, True))
                for i, (sid, fut) in enumerate(futs):
                    h = await asyncio.wait_for(fut, 5)
                    print("bind", i, h.get(b":status", b"").decode(), h.get(b"proxy-status", b"").decode(), flush=True)
    except (ConnectionError, asyncio.TimeoutError, OSError) as e:
        print("handshake-failed", type(e).__name__, e, flush=True)


async def burst(client, a):
    """Sends N datagrams to TARGET at once through a bind; reports how many came back."""
    target, count = a.args[0], int(a.args[1])
    sid, fut = await client.request("/.well-known/masque/udp/%2A/%2A/", a.user, True)
    client.send_capsule(sid, capsule(0x11, varint(2) + b"\x00"))
    h = await asyncio.wait_for(fut, 5)
    print("status", h.get(b":status", b"").decode(), flush=True)
    ip, port = address(target)
    for i in range(count):
        client.send_datagram(sid, varint(2) + uncompressed(ip, port, f"burst-{i}".encode()))
    replies = 0
    while await recv_datagram(client, 2.0):
        replies += 1
    print("sent", count, "replies", replies, flush=True)


async def bigheaders(client, mb):
    quic = client._quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, varint(0x01) + varint(1 << 40), end_stream=False)
    client.transmit()
    chunk = bytes(65536)
    stopped = False
    for i in range(mb * 16):
        try:
            quic.send_stream_data(sid, chunk, end_stream=False)
        except Exception:
            stopped = True
            break
        client.transmit()
        await asyncio.sleep(0.001)
        stream = quic._streams.get(sid)
        if stream is None or getattr(stream.sender, "reset_pending", False) or getattr(stream.sender, "_reset_error_code", None) is not None:
            stopped = True
            break
    await asyncio.sleep(1)
    print("stopped" if stopped else f"sent {mb}", flush=True)


async def closes(client, a, n):
    sid, fut = await client.request("/.well-known/masque/udp/%2A/%2A/", a.user, True)
    client.send_capsule(sid, capsule(0x11, varint(2) + b"\x00"))
    h = await asyncio.wait_for(fut, 5)
    ended = False
    for i in range(0, n, 500):
        batch = b"".join(capsule(0x13, varint(2 * (j + 2))) for j in range(i, min(n, i + 500)))
        try:
            client.send_capsule(sid, batch)
        except Exception:
            ended = True
            break
        await asyncio.sleep(0.002)
    await asyncio.sleep(1)
    stream = client._quic._streams.get(sid)
    ended = ended or stream is None or stream.receiver.is_finished or getattr(stream.sender, "_reset_error_code", None) is not None
    print("ended" if ended else "open", flush=True)


async def capsules(client, a):
    sid, fut = await client.request("/.well-known/masque/udp/%2A/%2A/", a.user, True)
    client.send_capsule(sid, capsule(0x11, varint(2) + b"\x00"))
    h = await asyncio.wait_for(fut, 5)
    print("status", h.get(b":status", b"").decode(), flush=True)
    ip, port = address(a.args[0])
    header = len(uncompressed(ip, port, b""))
    for size in map(int, a.args[1:]):
        payload = (b"c%d#" % size).ljust(size, b"x")
        client.send_capsule(sid, capsule(0x00, varint(2) + uncompressed(ip, port, payload)))
        got = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 3
        while got is None and loop.time() < deadline:
            d = await recv_datagram(client, 0.05)
            if d:
                ctx, at = read_varint(d[1])
                got = ("frame", d[1][at + header:])
                break
            for ctype, value in client.capsules(sid):
                if ctype == 0x00:
                    ctx, at = read_varint(value)
                    got = ("capsule", value[at + header:])
        if got:
            print("echo", size, got[0], "intact" if got[1] == payload else "corrupt", flush=True)
        else:
            print("no-echo", size, flush=True)


async def bind(client, a):
    sid, fut = await client.request("/.well-known/masque/udp/%2A/%2A/", a.user, True, a.preferred_port)
    # Register the uncompressed context (ID 2) right away.
    client.send_capsule(sid, capsule(0x11, varint(2) + b"\x00"))
    h = await asyncio.wait_for(fut, 5)
    print("status", h.get(b":status", b"").decode(), "bind", h.get(b"connect-udp-bind", b"").decode(), flush=True)
    if h.get(b":status") != b"200":
        print("proxy-status", h.get(b"proxy-status", b"").decode(), flush=True)
        return
    print("public", h.get(b"proxy-public-address", b"").decode(), flush=True)
    next_ctx = 4
    for i, target in enumerate(a.args):
        ip, port = address(target)
        client.send_datagram(sid, varint(2) + uncompressed(ip, port, f"plain-{i}".encode()))
        got = await recv_datagram(client)
        if got:
            _, data = got
            ctx, at = read_varint(data)
            body = data[at:]
            version = body[0]
            n = 4 if version == 4 else 16
            frm = ipaddress.ip_address(body[1:1 + n])
            fport = struct.unpack(">H", body[1 + n:3 + n])[0]
            print("reply", ctx, f"{frm}:{fport}", body[3 + n:].decode(errors="replace"), flush=True)
        else:
            print("no-reply", target, flush=True)
        # A compressed context for this target.
        ctx = next_ctx
        next_ctx += 2
        version = 4 if ip.version == 4 else 6
        client.send_capsule(sid, capsule(0x11, varint(ctx) + bytes([version]) + ip.packed + struct.pack(">H", port)))
        for _ in range(50):
            await asyncio.sleep(0.02)
            done = [c for c in client.capsules(sid)]
            for ctype, value in done:
                cid, _ = read_varint(value)
                print("ack" if ctype == 0x12 else "close" if ctype == 0x13 else f"capsule-{ctype:x}", cid, flush=True)
            if done:
                break
        client.send_datagram(sid, varint(ctx) + f"compressed-{i}".encode())
        got = await recv_datagram(client)
        if got:
            _, data = got
            rctx, at = read_varint(data)
            print("reply", rctx, target, data[at:].decode(errors="replace"), flush=True)
        else:
            print("no-reply", target, flush=True)
    if a.linger > 0:
        print("listening", flush=True)
        deadline = asyncio.get_running_loop().time() + a.linger
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            got = await recv_datagram(client, left)
            if got:
                print("unexpected", got[1].hex(), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--name", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--user", default="alice")
    p.add_argument("--preferred-port", type=int, help="bind mode: ask for this public port (veil-preferred-port)")
    p.add_argument("--linger", type=float, default=0.0, help="bind mode: then wait this long and report any datagram")
    p.add_argument("mode", choices=["bind", "targets", "binds", "burst", "capsules", "paths", "bigheaders", "closes", "unfinished"])
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    asyncio.run(run(a))


if __name__ == "__main__":
    main()
