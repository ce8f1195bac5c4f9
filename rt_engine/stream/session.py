"""A streaming session and the engine that owns the shared model worker.

Data flow of one session (on the asyncio loop, except the input work, which runs in the engine's
one input thread, and the model, which runs in the :class:`~rt_engine.stream.scheduler.Scheduler`
thread):

    audio (file feeder or accept_audio) -> AudioInput -> StreamingMel windows of frames i
        -> FrameJob(i, window, pose_source.code_for(i), due = clock.frame_due(i)) -> Scheduler
        -> deliver(i, image) -> _frames[i]
    pose frames (set_pose_frame, e.g. a webcam) -> latest one, webcam_fps per second -> pose code
    video out: next_video_frame() sleeps until frame_due(i), sends frame i, or holds the previous
                 image when i is not ready (pts stays i * 3600: the video never drifts)
    audio out: next_audio_chunk() sends input samples [m, m+960) at clock.wall_of(m / 48000)

``Engine`` holds the runner, the scheduler, the metrics, a face cropper and a cache of identity
features, and creates sessions from :class:`SessionOptions`.

Threads (each with a fixed budget; see docs/serving.md): the asyncio loop (HTTP, pacing, RTP),
one input thread for all sessions (resampling, gain, mel, job submission: per-packet work kept off
the loop, in arrival order), the model's lane threads (``threads`` torch intra-op threads; OpenVINO's
own pool is sized by its backend, one stream per lane) and the loop's default executor (face crops,
file decoding).
Pushed speech (``audio='push'``, :mod:`rt_engine.stream.avatar`) is the exception: its 20 ms feeder
and :meth:`Session.barge_in` both run on the loop, so a barge-in never interleaves with a feed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rt_engine.assets import DEFAULT_SPEECH
from rt_engine.backends.base import Runner
from rt_engine.config import FIRST_FRAME, FPS, SAMPLE_RATE
from rt_engine.errors import ConfigError, InputError
from rt_engine.inputs.audio import silence_window
from rt_engine.inputs.image import official_crop, to_tensor
from rt_engine.stream import sources
from rt_engine.stream.capacity import ObservedLoad, Plan, PlanConfig, RunningQuantile, plan_output, wants_frame
from rt_engine.stream.clock import (
    AUDIO_PTIME_S,
    FRAME_S,
    LOOKAHEAD_S,
    OUT_RATE,
    SAMPLES_PER_FRAME,
    ClockConfig,
    MediaClock,
)
from rt_engine.stream.scheduler import FrameJob, Metrics, Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

AUDIO_MODES = ("file", "mic", "push")
POSE_MODES = ("still", "idle", "webcam", "file")
CHUNK_OUT = int(OUT_RATE * AUDIO_PTIME_S)  # 960 samples per outgoing audio frame
CHUNK_IN = int(SAMPLE_RATE * AUDIO_PTIME_S)  # 320 samples per file-feeder step
OUT_PER_FRAME = OUT_RATE // FPS  # 1920 outgoing samples per video frame


# ------------------------------------------------------------------------------ frame stamp
STAMP_BITS = 24  # 20 bits of frame index + 4 bits checksum, 12 blocks per row, 2 rows


def _stamp_bits(i: int) -> list[int]:
    idx = i & 0xFFFFF
    check = (sum((idx >> k) & 1 for k in range(20)) + (idx & 0xF)) & 0xF
    word = idx | (check << 20)
    return [(word >> k) & 1 for k in range(STAMP_BITS)]


def stamp_index(img: np.ndarray, i: int) -> None:
    """Paint frame index ``i`` as black/white blocks into the bottom rows of [H,W,3] u8 (in place).
    Used by tests and benchmarks to identify received frames (option ``stamp``)."""
    h, w = img.shape[:2]
    b = w // 12
    for k, bit in enumerate(_stamp_bits(i)):
        r, c = divmod(k, 12)
        y0 = h - 2 * b + r * b
        img[y0 : y0 + b, c * b : (c + 1) * b] = 255 if bit else 0


def read_stamp(img: np.ndarray) -> int | None:
    """Inverse of :func:`stamp_index` on a decoded [H,W,3] u8 frame; None if the checksum fails."""
    h, w = img.shape[:2]
    b = w // 12
    word = 0
    for k in range(STAMP_BITS):
        r, c = divmod(k, 12)
        y0 = h - 2 * b + r * b
        m = b // 4
        v = float(img[y0 + m : y0 + b - m, c * b + m : (c + 1) * b - m].mean())
        word |= (1 if v > 127 else 0) << k
    idx = word & 0xFFFFF
    return idx if _stamp_bits(idx) == [(word >> k) & 1 for k in range(STAMP_BITS)] else None


# ------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class SessionOptions:
    """What a client asks for. Paths are server-side files (uploads are stored by the server)."""

    identity: str | None = None  # image path; None: bundled default
    audio: str = "mic"  # 'mic' (live input: accept_audio), 'file', or 'push' (speech queue, see push_speech)
    audio_file: str | None = None  # for audio='file'; None: bundled speech
    pose: str = "idle"  # still | idle | webcam | file
    pose_file: str | None = None
    stamp: bool = False  # paint the frame index into the frames (tests, benchmarks)
    loop_audio: bool = True  # a file source loops
    webcam_fps: float = 5.0  # pose updates per second from a webcam (smoothed in between)

    def validate(self) -> SessionOptions:
        if self.audio not in AUDIO_MODES:
            raise ConfigError(f"audio must be one of {AUDIO_MODES}, got {self.audio!r}")
        if self.pose not in POSE_MODES:
            raise ConfigError(f"pose must be one of {POSE_MODES}, got {self.pose!r}")
        if self.pose == "file" and not self.pose_file:
            raise ConfigError("pose='file' needs pose_file (upload a pose video first)")
        if not 1.0 <= self.webcam_fps <= 30.0:
            raise ConfigError(f"webcam_fps must be in [1, 30], got {self.webcam_fps}")
        for name in ("identity", "audio_file", "pose_file"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                raise InputError(f"{name}: file not found: {p}")
        return self


@dataclass
class SessionStats:
    frames_sent: int = 0
    frames_fresh: int = 0  # sent frames that were generated for their own index
    frames_held: int = 0  # sent frames that repeat the previous image (compute was late)
    frames_skipped: int = 0  # indices never sent because the sender itself was late
    frames_dropped: int = 0  # computed too late or not at all
    frames_thinned: int = 0  # not computed by plan: the model is too slow for every frame (sub-rate)
    audio_chunks: int = 0
    audio_underruns: int = 0
    first_frame_s: float | None = None  # from session start to the first sent frame
    latency_sum: float = 0.0  # sum over fresh frames of (send wall - media time - t0)
    latency_max: float = 0.0


async def _sleep_until(when) -> float:
    """Sleep until the wall time ``when()`` (re-read after each sleep: the output delay may have
    grown meanwhile); returns it."""
    while (t := when()) > (now := time.monotonic()):
        await asyncio.sleep(t - now)
    return t


# ------------------------------------------------------------------------------ session
class _Lane:
    """The scheduler's handle on a session (its job owner). :meth:`Session.barge_in` replaces it, so a
    frame that an older lane still delivers for an index from the cut on (computed from speech that was
    dropped) is recognised and ignored."""

    def __init__(self, session: Session):
        self.session = session
        self.sid = session.sid
        self.id0, self.id1 = session.id0, session.id1

    def deliver(self, i: int, image: np.ndarray, computed_at: float) -> None:
        self.session.deliver(i, image, computed_at, lane=self)

    def dropped(self, i: int, reason: str) -> None:
        self.session.dropped(i, reason)


class Session:
    def __init__(
        self,
        engine: Engine,
        opts: SessionOptions,
        id0: torch.Tensor,
        id1: torch.Tensor,
        pose_source: sources.PoseSource,
        file_audio: sources.FileAudio | None,
        loop: asyncio.AbstractEventLoop,
    ):
        self.sid = engine.sid_prefix + uuid.uuid4().hex[:12]
        self.engine = engine
        self.opts = opts
        self.id0, self.id1 = id0, id1  # [1,id_dim], [1,C,7,7]
        self.pose = pose_source
        self.file_audio = file_audio
        self.loop = loop
        self.speech = sources.SpeechQueue() if opts.audio == "push" else None
        self.clock = MediaClock(engine.clock_cfg)
        self.audio = sources.AudioInput(self.clock, gain=file_audio.gain if file_audio else None)
        self.metrics = engine.metrics
        self.stats = SessionStats()
        self.created = time.monotonic()
        self.closed = False
        self._frames: dict[int, np.ndarray] = {}  # generated, not yet sent
        self._frame_event = asyncio.Event()
        self._started = asyncio.Event()
        self._last_image: np.ndarray | None = None
        self._next_frame: int | None = None
        self._next_chunk: int | None = None
        self.first_audio_sample: int | None = None  # 48 kHz index of the first outgoing audio chunk
        self.first_video_frame: int | None = None
        self._tasks: list[asyncio.Task] = []
        self.last_input = time.monotonic()  # last inbound media (watchdog)
        self._pose_latest: np.ndarray | None = None  # newest pushed pose frame, not yet encoded
        self._pose_task: asyncio.Task | None = None
        engine.sessions.add(self.sid)
        self.clock.aim_margin(engine.plan().margin_s, now=True)
        self._lane = _Lane(self)
        self._submitted_end = FIRST_FRAME  # frames [FIRST_FRAME, _submitted_end) were handed to the scheduler
        self._cut = 0  # barge-in: frames [_cut, _silent_below) are made from the silence window
        self._silent_below = 0
        self._segment_ends: list[int] = []  # 48 kHz media samples where pushed utterances end
        self.barge_ins = 0

    # --- start / stop
    def start(self) -> None:
        """Begin the media clock for file and pushed audio (live audio starts it with its first packet).
        From here on the session counts in the engine's output plan."""
        if self.closed:
            return
        self.engine.sessions.add(self.sid)
        if (self.file_audio is not None or self.speech is not None) and not self.clock.started:
            self.clock.start_at(time.monotonic())
            self._started.set()
            feed = self._feed_file() if self.file_audio is not None else self._feed_speech()
            self._tasks.append(asyncio.ensure_future(feed))

    def add_task(self, coro) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.engine.sessions.discard(self.sid)
        self.engine.scheduler.forget(self._lane)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        self.pose.close()
        self._frames.clear()
        self._frame_event.set()
        self._started.set()

    # --- audio in
    async def _feed_file(self) -> None:
        """Plays the file on the media clock: 20 ms chunks at their real-time instants."""
        fa = self.file_audio
        assert fa is not None
        t0 = self.clock.t0
        k = 0
        n = fa.wav16.size
        while not self.closed:
            if not fa.loop and k * CHUNK_IN >= n + SAMPLE_RATE:  # one second of padding, then stop
                self.engine.run_input(self._ingest_end)
                return
            x16, x48 = fa.chunk(k * CHUNK_IN, CHUNK_IN)
            self.engine.run_input(self._ingest_file, x16, x48)
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * AUDIO_PTIME_S - time.monotonic()))

    async def _feed_speech(self) -> None:
        """audio='push': 20 ms of the speech queue at each real-time instant, silence when it is empty
        (the video goes on at 25 fps between utterances). Speech starts no earlier than the first
        generated frame, so none of it plays without a face."""
        assert self.speech is not None
        t0 = self.clock.t0
        k = 0
        while not self.closed:
            m = k * CHUNK_OUT
            if m < FIRST_FRAME * OUT_PER_FRAME:
                x, ends = np.zeros(CHUNK_OUT, np.float32), []
            else:
                x, _, ends = self.speech.read(CHUNK_OUT)
            self._segment_ends.extend(m + e for e in ends)
            self.audio.push48(x, None, observe=False)
            self._pump()
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * AUDIO_PTIME_S - time.monotonic()))

    def push_speech(self, samples: np.ndarray, rate: int) -> None:
        """audio='push': queue speech [N] or [N,C] (float or int16) at any rate; it plays after what
        is queued, or at once when the queue is empty."""
        if self.speech is None:
            raise ConfigError(f"push_speech needs audio='push', this session has audio={self.opts.audio!r}")
        self.last_input = time.monotonic()
        self.speech.push(samples, rate)

    def end_speech(self) -> None:
        """audio='push': the speech pushed so far is one complete utterance (see take_segment_ends)."""
        if self.speech is not None:
            self.speech.end_segment()

    def take_segment_ends(self, upto48: int) -> int:
        """How many utterance ends play before 48 kHz media sample ``upto48`` (each is counted once)."""
        n = sum(1 for e in self._segment_ends if e < upto48)
        if n:
            self._segment_ends = [e for e in self._segment_ends if e >= upto48]
        return n

    def barge_in(self) -> int:
        """Stop speaking at once: drop the queued speech and silence what was already fed. From frame
        ``cut`` = the next frame to send + 1 on, the outgoing audio is silence and the frames are made
        again from the silence window (mouth closed); idle motion and the clock go on untouched.
        Returns ``cut``. Call on the event loop's thread."""
        if self.speech is not None:
            self.speech.clear()
        self._segment_ends.clear()
        cut = (FIRST_FRAME if self._next_frame is None else self._next_frame) + 1
        cut48 = cut * OUT_PER_FRAME
        end = self.audio.out.end
        if end > cut48:
            self.audio.out.write(cut48, np.zeros(end - cut48, np.float32))
        # frames whose 0.2 s window reaches into what was fed so far (+ 25 ms of resampler delay)
        fed16 = self.audio.samples48 // sources.RATIO + 400
        self._cut = cut
        self._silent_below = max(cut, -(-(fed16 + 2 * SAMPLES_PER_FRAME) // SAMPLES_PER_FRAME) + 1)
        old, self._lane = self._lane, _Lane(self)
        self.engine.scheduler.forget(old)
        for i in [i for i in self._frames if i >= cut]:
            del self._frames[i]
        if self._submitted_end > cut:
            self._submit(range(cut, self._submitted_end), None, self.engine.plan())
        self.barge_ins += 1
        self.metrics.inc("barge_ins_total")
        return cut

    def accept_audio(
        self,
        samples: np.ndarray,
        rate: int,
        arrival: float | None = None,
        start_s: float | None = None,
        fmt: str | None = None,
    ) -> None:
        """Live input audio: samples [N] or [N,C] (float or int16) at ``rate`` Hz that arrived at wall
        time ``arrival`` (default now; it drives the media clock). ``start_s``: the chunk's media time,
        if the source knows it (gaps become silence). ``fmt`` describes the source (stats only).
        Call on the event loop's thread."""
        if self.speech is not None:
            raise ConfigError("accept_audio is for live input; a session with audio='push' takes push_speech")
        now = time.monotonic() if arrival is None else arrival
        self.last_input = now
        if fmt is not None and fmt != self.audio.input_format:
            if self.audio.input_format is not None:
                log.info("session %s: audio input changed from %s to %s", self.sid, self.audio.input_format, fmt)
            self.audio.input_format = fmt
        start48 = None if start_s is None else int(round(start_s * OUT_RATE))
        self.engine.run_input(self._ingest, samples, rate, now, start48)

    # --- input thread (one per engine: the calls of a session run in order)
    def _ingest(self, samples: np.ndarray, rate: int, arrival: float, start48: int | None) -> None:
        if self.closed:
            return
        self.audio.push(samples, rate, arrival, start48)
        if not self._started.is_set():
            self._call_soon(self._mark_started, f"{rate} Hz")
        self._pump()

    def _ingest_file(self, x16: np.ndarray, x48: np.ndarray) -> None:
        if not self.closed:
            self.audio.push_file_chunk(x16, x48)
            self._pump()

    def _ingest_end(self) -> None:
        if not self.closed:
            self.audio.mel.finish()
            self._pump()

    def _mark_started(self, rate: str) -> None:  # on the loop
        if not self.closed:
            self.engine.sessions.add(self.sid)
        if not self._started.is_set():
            self._started.set()
            log.info("session %s: audio input %s", self.sid, self.audio.input_format or rate)

    def _pump(self) -> None:
        """Turn newly complete mel windows into model jobs (input thread)."""
        plan = self.engine.plan()
        self.clock.aim_margin(plan.margin_s)
        idx, wins = self.audio.windows()
        if len(idx):
            self._submit(idx.tolist(), wins, plan)

    def _submit(self, idx, wins: np.ndarray | None, plan: Plan) -> None:
        """Frames ``idx`` with their mel windows [F,1,80,20] (None: all silent) to the scheduler."""
        now = time.monotonic()
        silence = silence_window()  # [1,80,20]
        jobs = []
        for k, i in enumerate(idx):
            if i not in (FIRST_FRAME, self._cut) and not wants_frame(i, plan.fraction):  # the cut: see barge_in
                if wins is not None:
                    self.stats.frames_thinned += 1  # held by plan: the model cannot make every frame
                continue
            due = self.clock.frame_due(i)
            if wins is not None:
                into = now - (due - (self.clock.delay - LOOKAHEAD_S))  # how far into the margin it is complete
                self.metrics.observe("stage_latency_seconds", max(0.0, into), stage="mel")
                self.engine.arrival.update(into)
            w = silence if wins is None or self._cut <= i < self._silent_below else wins[k]
            jobs.append(FrameJob(self._lane, i, w, self.pose.code_for(i), due))
            self._submitted_end = max(self._submitted_end, i + 1)
        self.engine.scheduler.submit(jobs)

    # --- pushed pose frames (webcam)
    def set_pose_frame(self, image: np.ndarray) -> None:
        """A video frame [H,W,3] u8 RGB for the pose (pose='webcam'). The latest frame wins: at most
        ``webcam_fps`` frames per second are cropped and encoded, in the background. Call on the loop."""
        if not isinstance(self.pose, sources.WebcamPose):
            raise ConfigError(f"set_pose_frame needs pose='webcam', this session has pose={self.opts.pose!r}")
        self.last_input = time.monotonic()
        self._pose_latest = image
        if self._pose_task is None and not self.closed:
            self._pose_task = asyncio.ensure_future(self._pose_loop())
            self._tasks.append(self._pose_task)

    async def _pose_loop(self) -> None:
        pose = self.pose
        assert isinstance(pose, sources.WebcamPose)
        period = 1.0 / self.opts.webcam_fps
        while not self.closed:
            t = time.monotonic()
            img, self._pose_latest = self._pose_latest, None
            if img is not None:
                crop = await self.loop.run_in_executor(None, self.engine.faces.crop_or_none, img, "webcam")
                if crop is None:
                    pose.misses += 1
                else:
                    x = to_tensor(official_crop(crop)).numpy()  # [1,3,224,224]
                    code = await asyncio.wrap_future(self.engine.scheduler.call("encode_pose", x))  # [1,12]
                    pose.update(code[0])
            await asyncio.sleep(max(0.0, t + period - time.monotonic()))

    # --- model output (called from the model thread)
    def deliver(self, i: int, image: np.ndarray, computed_at: float, lane: _Lane | None = None) -> None:
        if self.closed:
            return
        if self.opts.stamp:
            image = image.copy()
            stamp_index(image, i)
        self._call_soon(self._store, i, image, lane)

    def dropped(self, i: int, reason: str) -> None:
        self._call_soon(self._count_drop)

    def _call_soon(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone: the session is over
            self.closed = True

    def _count_drop(self) -> None:
        self.stats.frames_dropped += 1

    def _store(self, i: int, image: np.ndarray, lane: _Lane | None = None) -> None:
        if lane is not None and lane is not self._lane and i >= self._cut:
            return  # made from speech that barge_in() dropped; its silent twin is on the way
        if self.closed or (self._next_frame is not None and i < self._next_frame):
            self.stats.frames_dropped += 1  # arrived after its slot was sent
            self.metrics.inc("frames_dropped_total", reason="late_arrival")
            return
        self._frames[i] = image
        self._frame_event.set()

    # --- paced output (called by the outgoing tracks)
    async def next_video_frame(self) -> tuple[int, np.ndarray, bool]:
        """-> (frame index i, image [H,W,3] u8, fresh). Returns at the frame's send time."""
        await self._started.wait()
        if self.closed:
            raise ConnectionError("session closed")
        if self._next_frame is None:
            self._next_frame = FIRST_FRAME
        if self._last_image is None:  # first frame: wait for it, however long the first batch takes
            while FIRST_FRAME not in self._frames and not self.closed:
                self._frame_event.clear()
                await self._frame_event.wait()
                if self._frames and FIRST_FRAME not in self._frames:  # first frames dropped: take the oldest
                    self._next_frame = min(self._frames)
                    break
            if self.closed:
                raise ConnectionError("session closed")
        now = time.monotonic()
        cur = self.clock.frame_at(now)
        if self._last_image is not None and cur > self._next_frame:
            skipped = cur - self._next_frame  # the sender fell behind: never send a burst of old frames
            self.stats.frames_skipped += skipped
            self.metrics.inc("frames_dropped_total", skipped, reason="late_send")
            self._next_frame = cur
        i = self._next_frame
        due = await _sleep_until(lambda: self.clock.frame_due(i))
        deadline = due + self.clock.cfg.hold_grace_s
        while i not in self._frames and time.monotonic() < deadline and not self.closed:
            self._frame_event.clear()
            try:
                await asyncio.wait_for(self._frame_event.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        for k in [k for k in self._frames if k < i]:
            del self._frames[k]
        img = self._frames.pop(i, None)
        fresh = img is not None
        if fresh:
            self._last_image = img
            self.stats.frames_fresh += 1
            self.metrics.inc("frames_fresh_total")
            lat = time.monotonic() - self.clock.t0 - i * FRAME_S
            self.stats.latency_sum += lat
            self.stats.latency_max = max(self.stats.latency_max, lat)
            self.metrics.observe("stage_latency_seconds", lat, stage="media_to_send")
        else:
            self.stats.frames_held += 1
            self.metrics.inc("frames_held_total")
            img = self._last_image
        if img is None:  # first frame dropped entirely: wait for any
            raise ConnectionError("no frame available")
        if self.stats.first_frame_s is None:
            self.stats.first_frame_s = time.monotonic() - self.created
            self.first_video_frame = i
        self.stats.frames_sent += 1
        self.metrics.inc("frames_sent_total")
        self._next_frame = i + 1
        return i, img, fresh

    async def next_audio_chunk(self) -> tuple[int, np.ndarray]:
        """-> (first 48 kHz sample index m, samples [960]) at the chunk's send time."""
        await self._started.wait()
        if self.closed:
            raise ConnectionError("session closed")
        now = time.monotonic()
        cur = int((now - self.clock.wall_of(0.0)) / AUDIO_PTIME_S) if self.clock.started else 0
        if self._next_chunk is None or cur > self._next_chunk + 1:
            self._next_chunk = max(0, cur)  # start (or resync) at the current chunk, no burst
        k = self._next_chunk
        m = k * CHUNK_OUT
        if self.first_audio_sample is None:
            self.first_audio_sample = m
        await _sleep_until(lambda: self.clock.wall_of(m / OUT_RATE))
        x, missing = self.audio.out.read(m, CHUNK_OUT)
        if missing:
            self.stats.audio_underruns += 1
            self.metrics.inc("audio_underruns_total")
        self.stats.audio_chunks += 1
        self._next_chunk = k + 1
        return m, x

    def describe(self) -> dict:
        s = self.stats
        age = time.monotonic() - self.created
        sending_s = max(age - (s.first_frame_s or age), 1e-6)
        return {
            "session": self.sid,
            "age_s": round(age, 2),
            "audio": self.opts.audio,
            "audio_input": self.file_audio.describe() if self.file_audio is not None else self.audio.input_format,
            "pose": self.pose.kind,
            "pose_updates": getattr(self.pose, "updates", None),
            "frames_sent": s.frames_sent,
            "frames_fresh": s.frames_fresh,
            "frames_held": s.frames_held,
            "frames_skipped": s.frames_skipped,
            "frames_dropped": s.frames_dropped,
            "frames_thinned": s.frames_thinned,
            "fps": round(s.frames_sent / sending_s, 2) if s.first_frame_s else 0.0,
            "fresh_fps": round(s.frames_fresh / sending_s, 2) if s.first_frame_s else 0.0,
            "latency_ms": round(1e3 * s.latency_sum / s.frames_fresh, 1) if s.frames_fresh else None,
            "latency_max_ms": round(1e3 * s.latency_max, 1),
            "algorithmic_latency_ms": round(1e3 * self.clock.delay, 1),
            "first_frame_s": None if s.first_frame_s is None else round(s.first_frame_s, 3),
            "audio_underruns": s.audio_underruns,
            "speech_queued_s": None if self.speech is None else round(self.speech.queued_s, 3),
            "barge_ins": self.barge_ins,
            "agc_gain": round(self.audio.agc.gain, 3) if self.audio.agc else None,
            "first_audio_sample": self.first_audio_sample,
            "first_video_frame": self.first_video_frame,
        }


# ------------------------------------------------------------------------------ engine
class Engine:
    """Runner + scheduler + shared helpers; makes sessions.

    ``scheduler``: an already running scheduler to use instead of making one over ``runner`` (a
    :class:`~rt_engine.stream.remote.SchedulerClient` of a model process; ``runner`` then only needs
    ``cfg`` and ``describe()``). ``sid_prefix`` starts every session id (which media worker owns it)."""

    def __init__(
        self,
        runner: Runner,
        scheduler_cfg: SchedulerConfig | None = None,
        clock_cfg: ClockConfig | None = None,
        threads: int = 0,
        metrics: Metrics | None = None,
        plan_cfg: PlanConfig | None = None,
        scheduler: Scheduler | None = None,
        sid_prefix: str = "",
    ):
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.clock_cfg = (clock_cfg or ClockConfig()).validate()
        if scheduler is None:
            scheduler = Scheduler(runner, scheduler_cfg, self.metrics, threads=threads).start()
        self.scheduler = scheduler
        self.sid_prefix = sid_prefix
        self.plan_cfg = plan_cfg or PlanConfig()
        self.sessions: set[str] = set()  # ids of the open sessions (what the output plan is made for)
        self._plan: tuple[float, int, Plan] | None = None  # (made at, sessions, plan)
        self.load = ObservedLoad()  # the model's utilisation in service (admission checks it)
        # p95 of how far past its media time + lookahead a frame's window is complete (packet arrival,
        # jitter buffer, a busy loop): the plan's arrival allowance follows it
        self.arrival = RunningQuantile(0.95, self.plan_cfg.arrival_s)
        self._inputs = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rt-engine-input")
        self.faces = sources.FaceService()
        self._id_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = OrderedDict()
        self._id_locks: dict[str, asyncio.Lock] = {}
        self._pose_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # (identity key, kind) -> codes

    async def _run(self, name: str, *args: np.ndarray):
        """A named model call (scheduler.MODEL_CALLS) in the model thread or process."""
        return await asyncio.wrap_future(self.scheduler.call(name, *args))

    def run_input(self, fn, *args) -> None:
        """Run per-packet input work ``fn(*args)`` in the input thread (in call order); errors are logged."""

        def guarded() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("input processing failed")

        try:
            self._inputs.submit(guarded)
        except RuntimeError:  # shut down: the engine is closing
            pass

    def plan(self, sessions: int | None = None) -> Plan:
        """The output plan (sub-rate fraction, compute margin) for the open sessions, from the measured
        model cost (remade at most every 0.25 s); with ``sessions``, the plan predicted for that many
        (admission: warm-up times scaled by the measured contention per session)."""
        pc = self.plan_cfg
        pc = dataclasses.replace(pc, arrival_s=min(pc.max_arrival_s, max(pc.arrival_s, self.arrival.value)))
        cost = self.scheduler.cost
        if sessions is not None:  # admission: the load those sessions would bring (capacity.py)
            return plan_output(cost.predicted(sessions), sessions, self.clock_cfg.margin_s, LOOKAHEAD_S, pc)
        n, now = self.scheduler.sessions_total(len(self.sessions)), time.monotonic()
        cost.load = n
        if self._plan is None or self._plan[1] != n or now - self._plan[0] > 0.25:
            self._plan = (now, n, plan_output(cost, n, self.clock_cfg.margin_s, LOOKAHEAD_S, pc))
            self.load.update(now, self.scheduler.busy_s, n, self._plan[2].fraction)
        return self._plan[2]

    def refusal(self, sessions: int) -> str | None:
        """Why ``sessions`` sessions would not all get every frame fresh, or None when they would: the
        plan predicted for them must be full rate, and the utilisation measured in service, scaled to
        them, must stay within the plan's (capacity.py, :class:`ObservedLoad`)."""
        plan = self.plan(sessions)
        if not plan.full_rate:
            return (
                f"the model makes {plan.model_fps:.0f} frames/s, short of {sessions} sessions at {FPS} fresh frames/s"
            )
        util = self.load.predicted(sessions, self.scheduler.cost)
        if util is not None and util > self.plan_cfg.observed_utilisation:
            return (
                f"{sessions} sessions would keep the model {util:.0%} busy, as measured in service "
                f"(at most {self.plan_cfg.observed_utilisation:.0%})"
            )
        return None

    def admits(self, sessions: int) -> bool:
        """Whether ``sessions`` sessions would all get every frame fresh (:meth:`refusal` says why not)."""
        return self.refusal(sessions) is None

    async def identity(self, path: str | None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, str]:
        """Identity features (cached by file content) -> (id0 [1,D], id1 [1,C,7,7], aligned crop, cache key)."""
        data = Path(path).read_bytes() if path else None
        key = hashlib.sha1(data).hexdigest() if data is not None else "default"
        lock = self._id_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._id_cache:
                self._id_cache.move_to_end(key)
                return (*self._id_cache[key], key)
            loop = asyncio.get_running_loop()
            crop = await loop.run_in_executor(
                None, sources.identity_crop, self.faces, data, Path(path).name if path else "identity"
            )
            x = to_tensor(official_crop(crop)).numpy()  # [1,3,224,224]
            ids = await self._run("encode_identity", x)
            id0, id1 = torch.from_numpy(ids[0]), torch.from_numpy(ids[1])  # [1,id_dim], [1,C,7,7]
            self._id_cache[key] = (id0, id1, crop)
            while len(self._id_cache) > 16:
                self._id_cache.popitem(last=False)
        self._id_locks.pop(key, None)
        return id0, id1, crop, key

    async def create_session(self, opts: SessionOptions) -> Session:
        opts = opts.validate()
        loop = asyncio.get_running_loop()
        id0, id1, crop, key = await self.identity(opts.identity)
        still = await self._still_code(key, crop)  # [1,12]
        pose: sources.PoseSource
        if opts.pose == "still":
            pose = sources.StillPose(still[0])
        elif opts.pose == "webcam":
            if not self.runner.cfg.pose_mouth_mask:
                log.info(
                    "model '%s' reads pose from the whole face (no pose_mouth_mask): the webcam's mouth "
                    "can weakly move the output through the 12-number pose code",
                    self.runner.cfg.name,
                )
            pose = sources.WebcamPose(still[0])
        elif opts.pose == "idle":
            pose = sources.CodesPose(await self._idle_codes(key, crop), "idle")
        else:
            assert opts.pose_file is not None
            pf = opts.pose_file
            crops = await loop.run_in_executor(None, lambda: _pose_crops(self.faces, pf))
            codes = await self._run("encode_poses", crops)  # [N,12]
            pose = sources.CodesPose(codes, "file")
        file_audio = None
        if opts.audio == "file":
            path = opts.audio_file or str(DEFAULT_SPEECH)
            file_audio = await loop.run_in_executor(None, lambda: sources.FileAudio(path, loop=opts.loop_audio))
        return Session(self, opts, id0, id1, pose, file_audio, loop)

    async def _still_code(self, key: str, crop: np.ndarray) -> np.ndarray:
        still = self._pose_cache.get((key, "still"))
        if still is None:
            still = await self._run("encode_pose", to_tensor(official_crop(crop)).numpy())  # [1,12]
            self._cache_pose((key, "still"), still)
        return still

    async def _idle_codes(self, key: str, crop: np.ndarray) -> np.ndarray:
        codes = self._pose_cache.get((key, "idle"))
        if codes is None:  # 10 s of idle motion (51 key poses), played forward and backward
            codes = await self._run("idle_codes", crop)  # [250,12]
            self._cache_pose((key, "idle"), codes)
        return codes

    async def prepare_default(self) -> None:
        """Compute the bundled identity's features and its still and idle pose codes ahead (server
        start-up), so that the first session with the defaults does not wait for them."""
        t0 = time.perf_counter()
        id0, id1, crop, key = await self.identity(None)
        await self._still_code(key, crop)
        await self._idle_codes(key, crop)
        t1 = time.perf_counter()
        await asyncio.wrap_future(self.scheduler.warm_up(id0, id1))
        log.info(
            "default identity and idle motion ready in %.2f s; model warmed up for batches 1-%d in %.2f s",
            t1 - t0,
            self.scheduler.cfg.max_batch,
            time.perf_counter() - t1,
        )

    def _cache_pose(self, key: tuple, codes: np.ndarray) -> None:
        self._pose_cache[key] = codes
        while len(self._pose_cache) > 64:
            self._pose_cache.popitem(last=False)

    def close(self) -> None:
        self._inputs.shutdown(wait=True, cancel_futures=True)
        self.scheduler.stop()
        self.faces.close()


def _pose_crops(faces: sources.FaceService, path: str) -> np.ndarray:
    from rt_engine.inputs import pose as pose_in

    frames = pose_in.read_frames(path, max_frames=750)
    crops = faces.crop_video(frames, name=Path(path).name)
    return np.stack([official_crop(c) for c in crops])
