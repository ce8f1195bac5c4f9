"""The WebRTC side of a session: its outgoing tracks (aiortc ``MediaStreamTrack`` subclasses) and the
loops that read the client's tracks into the transport-free :class:`~rt_engine.stream.session.Session`.

Both tracks are paced by the session's media clock (:mod:`rt_engine.stream.clock`):

* video: frame i carries pts ``i * 3600`` on the 90 kHz clock and leaves at ``t0 + i/25 + delay``;
* audio: 20 ms chunks of the input audio at 48 kHz, pts = sample index, leaving at
  ``t0 + m/48000 + delay``: the input delayed by exactly the video path latency.

aiortc writes RTCP sender reports from the wall time at which each packet is sent, so a browser
lines the two tracks up as they left the server: in sync.

Inbound: :func:`run_audio_track` decodes the microphone (``av.AudioFrame``, any rate / layout / format)
to 48 kHz mono and hands it to ``Session.accept_audio`` with its place on the media clock (from the
frame pts); :func:`run_webcam_track` hands webcam frames to ``Session.set_pose_frame``.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from rt_engine.stream.clock import OUT_RATE, VIDEO_CLOCK, frame_pts
from rt_engine.stream.session import Session

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, OUT_RATE)


class _SessionTrack(MediaStreamTrack):
    """A track fed by one engine session; ends when the session's media ends."""

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    async def _pull(self, get):
        if self.readyState != "live":
            raise MediaStreamError
        self.session.start()
        try:
            return await get()
        except ConnectionError:
            self.stop()
            raise MediaStreamError from None


class EngineVideoTrack(_SessionTrack):
    kind = "video"

    async def recv(self):
        import av

        i, img, _fresh = await self._pull(self.session.next_video_frame)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")  # [H,W,3]
        frame.pts = frame_pts(i)
        frame.time_base = VIDEO_TIME_BASE
        return frame


class EngineAudioTrack(_SessionTrack):
    kind = "audio"

    async def recv(self):
        import av

        m, x = await self._pull(self.session.next_audio_chunk)
        pcm = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)[None]  # [1,960]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = OUT_RATE
        frame.pts = m
        frame.time_base = AUDIO_TIME_BASE
        return frame


# ---------------------------------------------------------------------------------- inbound
class AvAudioReader:
    """av.AudioFrame (any rate, layout, sample format) -> 48 kHz mono float32 and its media start time."""

    def __init__(self):
        self._resampler = None
        self.fmt: str | None = None
        self._pts0: int | None = None
        self._tb = None

    def read(self, frame) -> tuple[np.ndarray, float | None]:  # -> (samples [N] at 48 kHz, start s or None)
        import av

        fmt = f"{frame.format.name} {frame.layout.name} {frame.sample_rate} Hz"
        if self.fmt != fmt:
            self.fmt = fmt
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=OUT_RATE)
        start = None
        if frame.pts is not None and frame.time_base is not None:
            if self._pts0 is None:
                self._pts0, self._tb = frame.pts, frame.time_base
            start = float((frame.pts - self._pts0) * self._tb)
        chunks = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return x, start


def feed_av_audio(session: Session, reader: AvAudioReader, frame, arrival: float) -> None:
    """One decoded frame of the client's microphone into the session."""
    x, start = reader.read(frame)
    session.accept_audio(x, OUT_RATE, arrival, start_s=start, fmt=reader.fmt)


async def run_audio_track(session: Session, track) -> None:
    """Consume the client's microphone track (aiortc RemoteStreamTrack)."""
    reader = AvAudioReader()
    while not session.closed:
        try:
            frame = await track.recv()
        except MediaStreamError:
            log.info("session %s: audio track ended", session.sid)
            return
        feed_av_audio(session, reader, frame, time.monotonic())


async def run_webcam_track(session: Session, track) -> None:
    """The client's webcam frames as pose input; only the newest frame is decoded to RGB, at most
    ``webcam_fps`` times per second (the session encodes at that rate anyway)."""
    latest: list = [None]

    async def reader() -> None:
        while not session.closed:
            try:
                latest[0] = await track.recv()
            except MediaStreamError:
                latest[0] = None
                return
            session.last_input = time.monotonic()

    rd = asyncio.ensure_future(reader())
    period = 1.0 / session.opts.webcam_fps
    try:
        while not session.closed and not rd.done():
            t = time.monotonic()
            frame, latest[0] = latest[0], None
            if frame is not None:
                session.set_pose_frame(frame.to_ndarray(format="rgb24"))  # [H,W,3]
            await asyncio.sleep(max(0.0, t + period - time.monotonic()))
    finally:
        rd.cancel()


async def drain(track) -> None:
    """Read and discard an inbound track nobody uses (or aiortc queues it forever)."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        return
