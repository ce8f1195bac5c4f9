"""An aiortc client of the server, for tests, benchmarks and the soak run (not part of the runtime).

It sends a known signal as its microphone (48 kHz mono, paced like a real microphone: each 20 ms
chunk leaves when its last sample has "happened") and optionally webcam frames, receives the video
and audio, and records for every received frame the wall time at which its first RTP packet
arrived (hooked below the jitter buffer, so client-side buffering does not enter the numbers)
and when it was decoded.

With the session option ``stamp`` the server paints each frame's index i into the frame; the video
pts then gives every received slot's index, and ``analyse`` computes:

* glass-to-glass latency of fresh frames: arrival of frame i minus the time input sample
  ``1920 i`` (48 kHz; media time i/25 s) was captured;
* A/V offset: for each tone burst of the input, arrival of the video slot of the burst's media time
  minus arrival of the burst onset in the received audio (positive: video later); and the same on
  the stream timestamps (``av_offset_media_ms``: video pts of that slot minus the audio pts of the
  onset, using the server's first audio sample index from /stats), which is what a player syncs on;
* frame rate, pts gaps, held (repeated) frames, first-frame time after the answer.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from rt_engine.stream.clock import OUT_RATE, VIDEO_CLOCK
from rt_engine.stream.session import read_stamp

log = logging.getLogger(__name__)

CHUNK = 960  # 20 ms at 48 kHz
FRAME_TICKS = VIDEO_CLOCK // 25
SAMPLES_PER_FRAME_48 = OUT_RATE // 25  # 1920


def probe_signal(
    seconds: float,
    burst_every_s: float = 2.0,
    first_burst_s: float = 1.0,
    burst_s: float = 0.2,
    freq: float = 1000.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """Quiet noise with tone bursts (48 kHz mono) -> (signal [N], burst onset sample indices).
    Onsets fall on video frame boundaries (multiples of 1920 samples)."""
    n = int(seconds * OUT_RATE)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.003).astype(np.float32)
    onsets = []
    t = first_burst_s
    while t + burst_s < seconds:
        s = int(round(t * 25)) * SAMPLES_PER_FRAME_48
        m = int(burst_s * OUT_RATE)
        tt = np.arange(m) / OUT_RATE
        x[s : s + m] += (0.5 * np.sin(2 * np.pi * freq * tt)).astype(np.float32)
        onsets.append(s)
        t += burst_every_s
    return x, onsets


def burst_onsets(x: np.ndarray, threshold: float = 0.15, min_gap: int = OUT_RATE // 2) -> list[int]:
    """Sample indices where |x| first exceeds ``threshold`` after >= min_gap quiet samples."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    out: list[int] = []
    last = -min_gap - 1
    for k in loud:
        if k - last > min_gap:
            out.append(int(k))
        last = k
    return out


def _tracks():
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class SignalTrack(MediaStreamTrack):
        """Plays a 48 kHz mono signal as a microphone (optionally looping); records send times."""

        kind = "audio"

        def __init__(self, signal: np.ndarray, loop: bool = False, rate: int = OUT_RATE, channels: int = 1):
            super().__init__()
            self.signal = signal.astype(np.float32)
            self.loop = loop
            self.rate = rate
            self.channels = channels
            self.start: float | None = None
            self.k = 0
            self.chunk = rate // 50

        async def recv(self):
            import av

            if self.readyState != "live":
                raise MediaStreamError
            if self.start is None:
                self.start = time.monotonic()
            # a microphone hands out a chunk once its last sample has been captured
            await asyncio.sleep(max(0.0, self.start + (self.k + 1) * 0.02 - time.monotonic()))
            s = self.k * self.chunk
            idx = np.arange(s, s + self.chunk)
            if self.loop:
                idx %= self.signal.size
            x = np.where(idx < self.signal.size, self.signal[np.minimum(idx, self.signal.size - 1)], 0)
            pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
            if self.channels == 2:
                frame = av.AudioFrame.from_ndarray(np.repeat(pcm, 2)[None], format="s16", layout="stereo")
            else:
                frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            frame.sample_rate = self.rate
            frame.pts = s
            frame.time_base = fractions.Fraction(1, self.rate)
            self.k += 1
            return frame

    class FramesTrack(MediaStreamTrack):
        """Plays RGB frames [N,H,W,3] u8 at 25 fps as a webcam (looping)."""

        kind = "video"

        def __init__(self, frames: np.ndarray):
            super().__init__()
            self.frames = frames
            self.start: float | None = None
            self.k = 0

        async def recv(self):
            import av

            if self.readyState != "live":
                raise MediaStreamError
            if self.start is None:
                self.start = time.monotonic()
            await asyncio.sleep(max(0.0, self.start + self.k / 25 - time.monotonic()))
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.frames[self.k % len(self.frames)]), format="rgb24")
            f.pts = self.k * FRAME_TICKS
            f.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            self.k += 1
            return f

    return SignalTrack, FramesTrack


@dataclass
class ClientResult:
    session: str | None = None
    t_offer: float = 0.0
    t_answer: float = 0.0
    mic_start: float | None = None  # wall time of input sample 0
    mic_rate: int = OUT_RATE
    onsets_sent: list[int] = field(default_factory=list)
    # per received frame: pts, t_dec, t_arr, stamp, slot (frame index i from the pts and the first stamp)
    video: list[tuple[int, float, float | None, int | None, int | None]] = field(default_factory=list)
    slot_origin: int | None = None
    audio_pts: list[int] = field(default_factory=list)
    audio_t: list[float] = field(default_factory=list)  # arrival (or decode) time per audio frame
    audio_matched: int = 0  # audio frames whose packet arrival time was found
    audio: list[np.ndarray] = field(default_factory=list)
    frame_shape: tuple | None = None
    server_stats: dict | None = None

    def take_window(self) -> ClientResult:
        """Move the frames received so far into a new result (long runs analyse window by window)."""
        w = ClientResult(
            session=self.session,
            t_offer=self.t_offer,
            t_answer=self.t_answer,
            mic_start=self.mic_start,
            mic_rate=self.mic_rate,
            onsets_sent=self.onsets_sent,
            video=self.video,
            audio_pts=self.audio_pts,
            audio_t=self.audio_t,
            audio=self.audio,
            frame_shape=self.frame_shape,
            audio_matched=self.audio_matched,
            slot_origin=self.slot_origin,
        )
        self.video, self.audio_pts, self.audio_t, self.audio = [], [], [], []
        self.audio_matched = 0
        return w

    def analyse(self) -> dict:
        out: dict = {
            "session": self.session,
            "video_frames": len(self.video),
            "audio_frames": len(self.audio),
            "audio_arrivals_matched": self.audio_matched,
            "video_arrivals_matched": sum(v[2] is not None for v in self.video),
        }
        if len(self.video) < 2:
            return out
        pts = np.array([v[0] for v in self.video], np.int64)
        t_dec = np.array([v[1] for v in self.video])
        t_arr = np.array([v[2] if v[2] is not None else v[1] for v in self.video])
        stamps = [v[3] for v in self.video]
        slot_rel = (pts - pts[0]) // FRAME_TICKS  # [N] slot index relative to the first frame
        gaps = np.diff(slot_rel)
        dur = t_arr[-1] - t_arr[0]
        out.update(
            {
                "seconds": round(float(dur), 3),
                "fps": round(float((len(pts) - 1) / dur), 3) if dur > 0 else None,
                # slots (frame indices) advanced per second of arrival time: 25 exactly unless the stream drifts
                "slot_rate": round(float(slot_rel[-1] / dur), 3) if dur > 0 else None,
                "pts_gaps_over_1": int((gaps > 1).sum()),
                "slots_missing": int(np.clip(gaps - 1, 0, None).sum()),
                "max_pts_gap_frames": int(gaps.max()) if len(gaps) else 0,
                "non_monotonic": int((gaps <= 0).sum()),
                "max_arrival_gap_ms": round(float(np.diff(t_arr).max() * 1e3), 1),
                "first_frame_after_answer_s": round(float(t_dec[0] - self.t_answer), 3),
                "frame_shape": list(self.frame_shape) if self.frame_shape else None,
            }
        )
        if self.slot_origin is None or self.mic_start is None:
            return out
        slot = slot_rel + (self.video[0][4] if self.video[0][4] is not None else self.slot_origin)
        fresh = np.array(
            [
                s is not None and s == i and (k == 0 or stamps[k - 1] != s)
                for k, (s, i) in enumerate(zip(stamps, slot, strict=True))
            ]
        )
        bad_stamps = sum(1 for s in stamps if s is None)
        media_t = slot * (SAMPLES_PER_FRAME_48 / OUT_RATE)  # media time of each slot
        g2g = (t_arr - (self.mic_start + media_t))[fresh]
        g2g_dec = (t_dec - (self.mic_start + media_t))[fresh]
        out.update(
            {
                "frames_fresh": int(fresh.sum()),
                "frames_repeated": int(len(fresh) - fresh.sum()),
                "unreadable_stamps": bad_stamps,
                "glass_to_glass_ms": _pct(g2g),
                "glass_to_glass_decoded_ms": _pct(g2g_dec),
            }
        )
        # ---- A/V offset from the tone bursts
        if self.audio and self.onsets_sent:
            sizes = np.array([a.size for a in self.audio])
            x = np.concatenate(self.audio)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            offsets, audio_lat, media_offsets = [], [], []
            m_first = (self.server_stats or {}).get("first_audio_sample")
            for o in burst_onsets(x):
                k = int(np.searchsorted(starts, o, side="right") - 1)
                t_onset = self.audio_t[k] + (o - starts[k]) / OUT_RATE
                # which sent burst is this? the one whose capture time is closest before the arrival
                sent_t = [self.mic_start + s / OUT_RATE for s in self.onsets_sent]  # onsets: 48 kHz indices
                cand = [(t_onset - st, s) for st, s in zip(sent_t, self.onsets_sent, strict=True) if t_onset > st]
                if not cand:
                    continue
                lat, s_on = min(cand)
                i_b = s_on // SAMPLES_PER_FRAME_48
                hit = np.flatnonzero(slot == i_b)
                if not len(hit):
                    continue
                audio_lat.append(lat)
                offsets.append(float(t_arr[hit[0]] - t_onset))
                if m_first is not None:  # the same on the stream timestamps (the media clock)
                    m_onset = m_first + self.audio_pts[k] + (o - starts[k])  # 48 kHz media index
                    media_offsets.append(i_b / 25 - m_onset / OUT_RATE)
            out["audio_latency_ms"] = _pct(np.array(audio_lat))
            out["av_offset_ms"] = [round(1e3 * o, 1) for o in offsets]
            out["av_offset_max_abs_ms"] = round(1e3 * max(abs(o) for o in offsets), 1) if offsets else None
            out["av_offset_median_ms"] = round(1e3 * float(np.median(offsets)), 1) if offsets else None
            out["av_offset_media_ms"] = [round(1e3 * o, 1) for o in media_offsets]
        return out


def _pct(a: np.ndarray) -> dict | None:
    if a is None or len(a) == 0:
        return None
    return {
        "p50": round(float(np.percentile(a, 50)) * 1e3, 1),
        "p95": round(float(np.percentile(a, 95)) * 1e3, 1),
        "max": round(float(a.max()) * 1e3, 1),
        "min": round(float(a.min()) * 1e3, 1),
        "n": int(len(a)),
    }


def _hook_arrivals(receiver, table: dict[int, float]) -> None:
    """Record the wall time of the first RTP packet of each timestamp, below the jitter buffer.
    aiortc hands out decoded frames with pts relative to the first RTP timestamp, so the table is
    keyed by ``timestamp - first timestamp`` (mod 2**32)."""
    orig = receiver._handle_rtp_packet
    origin: list[int] = []

    async def hooked(packet, arrival_time_ms):
        if not origin:
            origin.append(packet.timestamp)
        table.setdefault((packet.timestamp - origin[0]) & 0xFFFFFFFF, time.monotonic())
        if len(table) > 4096:  # bounded memory on long runs
            for key in list(table)[:2048]:
                del table[key]
        return await orig(packet, arrival_time_ms=arrival_time_ms)

    receiver._handle_rtp_packet = hooked


async def run_client(
    url: str,
    seconds: float,
    signal: np.ndarray | None = None,
    onsets: list[int] | None = None,
    options: dict | None = None,
    webcam: np.ndarray | None = None,
    token: str | None = None,
    loop_signal: bool = False,
    mic_rate: int = OUT_RATE,
    mic_channels: int = 1,
    keep_audio: bool = True,
    stop: asyncio.Event | None = None,
    on_progress=None,
    result: ClientResult | None = None,
) -> ClientResult:
    """Connect to ``url`` (http://host:port), stream for ``seconds`` after the first video frame,
    close, and return what was received. ``signal`` (48 kHz mono) is sent as the microphone."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from rt_engine.serve.app import enable_loopback_candidates

    enable_loopback_candidates()
    SignalTrack, FramesTrack = _tracks()
    res = result if result is not None else ClientResult()
    res.onsets_sent, res.mic_rate = list(onsets or []), mic_rate
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = None
    if signal is not None:
        if mic_rate != OUT_RATE:
            import soxr

            signal = soxr.resample(signal, OUT_RATE, mic_rate).astype(np.float32)
        mic = SignalTrack(signal, loop=loop_signal, rate=mic_rate, channels=mic_channels)
        pc.addTrack(mic)
    else:
        pc.addTransceiver("audio", direction="recvonly")
    if webcam is not None:
        pc.addTrack(FramesTrack(webcam))
    else:
        pc.addTransceiver("video", direction="recvonly")
    arrivals = {"audio": {}, "video": {}}
    for t in pc.getTransceivers():
        _hook_arrivals(t.receiver, arrivals[t.kind])
    first_video = asyncio.Event()
    done = asyncio.Event()
    tasks = []

    async def read_video(track):
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            img = f.to_ndarray(format="rgb24")
            res.frame_shape = img.shape
            st = read_stamp(img) if (options or {}).get("stamp") else None
            rel = int(f.pts) // FRAME_TICKS
            if res.slot_origin is None and st is not None:
                res.slot_origin = st - rel  # the first frame is always a fresh one: its stamp is its slot
            slot = None if res.slot_origin is None else rel + res.slot_origin
            res.video.append((int(f.pts), now, arrivals["video"].get(int(f.pts) & 0xFFFFFFFF), st, slot))
            if res.mic_start is None and mic is not None:
                res.mic_start = mic.start
            first_video.set()
            if on_progress is not None:
                on_progress(res)

    async def read_audio(track):
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                f = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            if not first_video.is_set():
                continue
            x = f.to_ndarray()
            x = x.reshape(-1, len(f.layout.channels)).mean(axis=1) if x.size else x.reshape(-1)
            res.audio_pts.append(int(f.pts))
            t_arr = arrivals["audio"].get(int(f.pts) & 0xFFFFFFFF)
            res.audio_matched += t_arr is not None
            res.audio_t.append(now if t_arr is None else t_arr)
            res.audio.append((x.astype(np.float32) / 32768.0) if keep_audio else np.zeros(0, np.float32))

    @pc.on("track")
    def on_track(track):
        tasks.append(asyncio.ensure_future(read_video(track) if track.kind == "video" else read_audio(track)))

    @pc.on("connectionstatechange")
    async def on_state():
        if pc.connectionState in ("failed", "closed"):
            done.set()

    try:
        await pc.setLocalDescription(await pc.createOffer())
        res.t_offer = time.monotonic()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as http:
            body = {"sdp": pc.localDescription.sdp, "type": "offer", "options": options or {}}
            async with http.post(f"{url}/offer", json=body, headers=headers) as r:
                ans = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"offer rejected ({r.status}): {ans.get('error')}")
            res.session = ans["session"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=ans["sdp"], type=ans["type"]))
            res.t_answer = time.monotonic()
            await asyncio.wait_for(first_video.wait(), timeout=30.0)
            waits = [asyncio.ensure_future(asyncio.sleep(seconds)), asyncio.ensure_future(done.wait())]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for p in pending:
                p.cancel()
            try:
                async with http.get(f"{url}/stats/{res.session}") as r:
                    if r.status == 200:
                        res.server_stats = await r.json()
            except aiohttp.ClientError:
                pass
    finally:
        await pc.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return res
