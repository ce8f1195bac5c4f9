"""Outgoing WebRTC tracks of a session (aiortc ``MediaStreamTrack`` subclasses).

Both tracks are paced by the session's media clock (:mod:`rt_engine.stream.clock`):

* video: frame i carries pts ``i * 3600`` on the 90 kHz clock and leaves at ``t0 + i/25 + delay``;
* audio: 20 ms chunks of the input audio at 48 kHz, pts = sample index, leaving at
  ``t0 + m/48000 + delay``: the input delayed by exactly the video path latency.

aiortc writes RTCP sender reports from the wall time at which each packet is sent, so a browser
lines the two tracks up as they left the server: in sync.
"""

from __future__ import annotations

import fractions
import logging

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
