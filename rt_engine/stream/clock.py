"""The media clock: the input audio sample count is the master clock of a session.

Everything in a session is addressed in media time, i.e. in samples of the input audio:

* 16 kHz sample ``n`` (the mel front end) is media time ``n / 16000`` s; 48 kHz sample ``m``
  (the outgoing audio) is ``m / 48000`` s;
* video frame ``i`` shows media time ``i / 25`` s (PC-AVS frame indexing), RTP pts ``i * 3600`` on
  the 90 kHz video clock.

Frame ``i`` needs audio up to sample ``samples_needed(i) = 640 i + 1920`` (its 0.2 s mel window,
see :mod:`rt_engine.inputs.audio`): the 120 ms lookahead is the algorithmic latency. The
:class:`MediaClock` maps media time to wall time through one anchor ``t0`` (the wall time of
media time 0, estimated from when the audio arrives) and a fixed output delay ``delay``:

    frame i is sent at        t0 + i / 25 + delay
    audio sample m is sent at t0 + m / 48000 + delay

so the outgoing audio is the input audio delayed by exactly the video path latency, and video and
audio leave the server in sync. ``delay`` = lookahead (120 ms) + the compute margin: at least
``ClockConfig.margin_s``, more when the measured model time needs it (the session aims it with
:meth:`MediaClock.aim_margin`, see :mod:`rt_engine.stream.capacity`; it moves by at most a few
milliseconds per 20 ms chunk, so the output slows or speeds a little instead of jumping).
Because every output time is computed from the anchor and never accumulated, the output cannot
drift from the input, whatever the compute speed.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from rt_engine.config import FPS, SAMPLE_RATE
from rt_engine.errors import ConfigError
from rt_engine.inputs.audio import samples_needed

VIDEO_CLOCK = 90000  # RTP clock of video
OUT_RATE = 48000  # sample rate of the outgoing audio (Opus)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 input samples per video frame
FRAME_S = 1.0 / FPS
LOOKAHEAD_S = (samples_needed(10) - 10 * SAMPLES_PER_FRAME) / SAMPLE_RATE  # 0.12 s
AUDIO_PTIME_S = 0.02  # 20 ms audio packets
DELAY_UP_S = 0.002  # largest step of the output delay per aim_margin call (one per 20 ms chunk): 10% slower
DELAY_DOWN_S = 0.0005  # ... downwards (2.5% faster; the anchor itself slews by as much)


@dataclass(frozen=True)
class ClockConfig:
    """Output timing of a session. ``margin_s`` is the compute budget after the lookahead: the
    one frame of buffering the pipeline may add."""

    margin_s: float = FRAME_S
    hold_grace_s: float = 0.005  # how long a paced output waits past its due time before holding

    @property
    def delay_s(self) -> float:
        return LOOKAHEAD_S + self.margin_s

    def validate(self) -> ClockConfig:
        if not 0.0 <= self.margin_s <= 2.0:
            raise ConfigError(f"clock.margin_s must be in [0, 2] s, got {self.margin_s}")
        if not 0.0 <= self.hold_grace_s <= FRAME_S:
            raise ConfigError(f"clock.hold_grace_s must be in [0, {FRAME_S}] s, got {self.hold_grace_s}")
        return self


def frame_pts(i: int) -> int:
    """RTP pts of video frame i on the 90 kHz clock."""
    return i * (VIDEO_CLOCK // FPS)


def first_frame_needing(n_samples: int) -> int:
    """The first frame whose window is not complete with ``n_samples`` input samples."""
    # samples_needed(i) = 640 i + 1920  ->  complete iff 640 i + 1920 <= n
    return max(0, (n_samples - samples_needed(0)) // SAMPLES_PER_FRAME + 1)


class MediaClock:
    """Anchor between media time and wall time (``time.monotonic`` seconds). Thread-safe.

    ``observe(media_end_s, arrival)`` is called for every chunk of input audio: media time
    ``media_end_s`` (end of the chunk) arrived at wall time ``arrival``; ``arrival - media_end_s``
    is that chunk's estimate of the anchor. Chunks are late by a varying amount (network, jitter
    buffer, a busy event loop), so the anchor is the ``quantile`` (0.9) of the estimates of the last
    ``window`` chunks (5 s): 90% of the audio is on time for the output schedule, and a sender clock
    that runs slow or fast against ours is followed. The anchor slews towards that target by at most
    ``slew_s`` per chunk (after the first second), so jitter never jerks the output. The quantile is
    kept incrementally (a sorted copy of the window, one insert and one removal per chunk), the same
    number ``np.quantile`` gives (linear interpolation).
    """

    def __init__(self, cfg: ClockConfig | None = None, quantile: float = 0.9, window: int = 250, slew_s: float = 5e-4):
        self.cfg = (cfg or ClockConfig()).validate()
        self._t0: float | None = None
        self._lock = threading.Lock()
        self._est: deque[float] = deque()
        self._sorted: list[float] = []  # the same values, in order
        self.window = window
        self.quantile = quantile
        self.slew = slew_s
        self.observed = 0
        self.delay = self.cfg.delay_s  # current output delay (lookahead + margin)

    @property
    def started(self) -> bool:
        return self._t0 is not None

    @property
    def t0(self) -> float | None:
        return self._t0

    def start_at(self, t0: float) -> None:
        """Fix the anchor (file sources: media time 0 plays at ``t0``)."""
        with self._lock:
            self._t0 = t0

    def _window_quantile(self) -> float:
        v = self._sorted
        pos = self.quantile * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo)

    def observe(self, media_end_s: float, arrival: float | None = None) -> None:
        est = (time.monotonic() if arrival is None else arrival) - media_end_s
        with self._lock:
            self._est.append(est)
            bisect.insort(self._sorted, est)
            if len(self._est) > self.window:
                old = self._est.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]
            self.observed += 1
            target = self._window_quantile() if len(self._est) > 4 else est
            if self._t0 is None:
                self._t0 = target
            else:
                step = self.slew if self.observed > 50 else 10 * self.slew
                self._t0 += min(step, max(-step, target - self._t0))

    def aim_margin(self, margin_s: float, now: bool = False) -> None:
        """Move the output delay towards lookahead + ``margin_s`` (at least the configured margin):
        at once with ``now`` (before anything was sent), else by one bounded step."""
        target = LOOKAHEAD_S + max(self.cfg.margin_s, margin_s)
        with self._lock:
            if now:
                self.delay = target
            else:
                self.delay += min(DELAY_UP_S, max(-DELAY_DOWN_S, target - self.delay))

    def wall_of(self, media_s: float) -> float:
        """Wall time at which media time ``media_s`` is sent out."""
        if self._t0 is None:
            raise RuntimeError("media clock not started")
        return self._t0 + media_s + self.delay

    def frame_due(self, i: int) -> float:
        return self.wall_of(i * FRAME_S)

    def frame_at(self, wall: float) -> int:
        """The latest frame index whose send time is <= ``wall``."""
        if self._t0 is None:
            raise RuntimeError("media clock not started")
        return int((wall - self._t0 - self.delay) * FPS + 1e-9) if wall >= self._t0 else -1
