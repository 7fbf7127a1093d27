"""One side of a WebRTC audio call with aiortc (real ICE, STUN, DTLS-SRTP, Opus).

usage: webrtc_peer.py ROLE SIGNAL_DIR STUN_URL SECONDS
(STUN_URL `none`: no STUN server, host candidates only.)
ROLE is `offer` or `answer`. Session descriptions are exchanged as files in SIGNAL_DIR (the
test harness is the signalling channel). Each side sends a 440/660 Hz tone and prints one JSON
line: ICE/connection state, set-up time, frames and RMS of the audio it received, and the
candidates it offered. Once connected it writes ROLE.connected in SIGNAL_DIR.
"""
import array
import asyncio
import fractions
import json
import math
import os
import sys
import time

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from av import AudioFrame

RATE = 48000
SAMPLES = 960  # 20 ms


class Tone(AudioStreamTrack):
    def __init__(self, hz):
        super().__init__()
        self.hz = hz
        self.pts = 0
        self.start = None

    async def recv(self):
        if self.start is None:
            self.start = time.time()
        wait = self.start + self.pts / RATE - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        samples = array.array(
            "h",
            (int(8000 * math.sin(2 * math.pi * self.hz * (self.pts + i) / RATE)) for i in range(SAMPLES)),
        )
        frame = AudioFrame(format="s16", layout="mono", samples=SAMPLES)
        frame.planes[0].update(samples.tobytes())
        frame.sample_rate = RATE
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, RATE)
        self.pts += SAMPLES
        return frame


async def wait_file(path, timeout):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(path)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)
    with open(path) as f:
        return json.load(f)


def write_file(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, path)


def started_wall():
    return round(time.time(), 3)


async def main():
    role, signal_dir, stun, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    servers = [] if stun == "none" else [RTCIceServer(urls=stun)]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
    pc.addTrack(Tone(440 if role == "offer" else 660))
    result = {"role": role, "frames": 0, "rms": 0.0, "start": started_wall()}
    received = asyncio.get_running_loop().create_future()
    started = time.time()
    connected_at = {}

    @pc.on("connectionstatechange")
    def on_state():
        if pc.connectionState == "connected" and "t" not in connected_at:
            connected_at["t"] = time.time()
            # For a harness that must act only once the call is up (faults *during* a call).
            write_file(os.path.join(signal_dir, role + ".connected"), {"t": connected_at["t"]})

    @pc.on("track")
    def on_track(track):
        async def consume():
            frames, squares, count = 0, 0.0, 0
            times = result.setdefault("times", [])
            end = None
            while True:
                try:
                    frame = await asyncio.wait_for(track.recv(), float(os.environ.get("PEER_FRAME_TIMEOUT", "5")))
                except (MediaStreamError, asyncio.TimeoutError):
                    break
                if end is None:
                    end = time.time() + seconds
                frames += 1
                times.append(round(time.time() - started, 3))
                pcm = array.array("h", bytes(frame.planes[0]))
                squares += sum(s * s for s in pcm)
                count += len(pcm)
                if time.time() > end:
                    break
            if not received.done():
                received.set_result((frames, math.sqrt(squares / count) if count else 0.0))

        asyncio.ensure_future(consume())

    mine = os.path.join(signal_dir, role + ".json")
    theirs = os.path.join(signal_dir, ("answer" if role == "offer" else "offer") + ".json")
    if role == "offer":
        await pc.setLocalDescription(await pc.createOffer())
        write_file(mine, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
        answer = await wait_file(theirs, 30)
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
    else:
        offer = await wait_file(theirs, 30)
        await pc.setRemoteDescription(RTCSessionDescription(**offer))
        await pc.setLocalDescription(await pc.createAnswer())
        write_file(mine, {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})
    result["candidates"] = [l for l in pc.localDescription.sdp.splitlines() if l.startswith("a=candidate")]
    try:
        frames, rms = await asyncio.wait_for(received, 30 + seconds)
        result["frames"], result["rms"] = frames, round(rms, 1)
    except asyncio.TimeoutError:
        pass
    result["state"] = pc.connectionState
    result["ice"] = pc.iceConnectionState
    if "t" in connected_at:
        result["setup_ms"] = round((connected_at["t"] - started) * 1000)
    print(json.dumps(result), flush=True)
    # Hang up only once the other peer has its result too: each stops receiving a moment after
    # its own first frame, and a hang-up it sees first would read as a call that did not last.
    write_file(os.path.join(signal_dir, role + ".done"), {"t": time.time()})
    other_done = os.path.join(signal_dir, ("answer" if role == "offer" else "offer") + ".done")
    deadline = time.time() + 10
    while not os.path.exists(other_done) and time.time() < deadline:
        await asyncio.sleep(0.05)
    await pc.close()


asyncio.run(main())
