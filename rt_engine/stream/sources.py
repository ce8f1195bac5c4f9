"""Inputs of a streaming session: audio (file or live track), pose (file, webcam, idle, still), identity.

Audio path (both kinds end in :class:`AudioInput`):

    live audio: PCM at any rate (a WebRTC track decoded in serve/, pushed speech) --soxr--> 48 kHz mono
                --> outgoing-audio buffer (:class:`AudioBuffer`, sent back delayed)
                --soxr stream 48k->16k--> slow AGC --> StreamingMel --> 0.2 s windows per frame
    file:       16 kHz mono (whole-file RMS gain, identical to the offline front end) --> StreamingMel
                48 kHz mono --> outgoing-audio buffer

Live gain: the offline front end scales the whole clip to RMS 0.1. A live stream has no "whole
clip", so :class:`Agc` tracks the RMS of the voiced chunks with a slow (3 s) exponential average
and scales to the same 0.1 target; silence (RMS < 1e-3) does not update it, so pauses do not pump
the gain up, and the gain is clamped to [0.1, 100].

Pose sources hand out one pose code [12] per frame index (:meth:`PoseSource.code_for`). Only the
pose code is taken from a webcam, and the mouth code comes from the audio alone. Models trained here
(``pose_mouth_mask``, the bundled one) blank the mouth box before computing the pose code, so the
webcam's mouth cannot reach the output at all; with the official weights the 12 numbers see the
whole face.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rt_engine.assets import DEFAULT_IDENTITY
from rt_engine.config import SAMPLE_RATE
from rt_engine.errors import InputError, NoFaceError
from rt_engine.inputs import audio as audio_in
from rt_engine.inputs import pose as pose_in
from rt_engine.inputs.image import decode_image_bytes, official_crop, pingpong_index
from rt_engine.stream.clock import OUT_RATE, MediaClock

log = logging.getLogger(__name__)

RATIO = OUT_RATE // SAMPLE_RATE  # 3 outgoing samples per mel-rate sample


def to_mono_float(samples: np.ndarray) -> np.ndarray:
    """PCM [N] or [N,C] (float in [-1,1], or int16) -> mono float32 [N] (channels averaged)."""
    x = np.asarray(samples)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"audio samples must be float or int16, got {x.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1)
    elif x.ndim != 1:
        raise InputError(f"audio samples must be [N] or [N,channels], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------------------ gain
class Agc:
    """Slow automatic gain control towards the official RMS target (see module doc)."""

    def __init__(
        self,
        target_rms: float = audio_in.TARGET_RMS,
        time_constant_s: float = 3.0,
        gate_rms: float = 1e-3,
        min_gain: float = 0.1,
        max_gain: float = 100.0,
        init_gain: float = 2.0,
    ):
        self.target = target_rms
        self.tc = time_constant_s
        self.gate = gate_rms
        self.lo, self.hi = min_gain, max_gain
        self.power: float | None = None  # EMA of the voiced power
        self.init_gain = init_gain

    @property
    def gain(self) -> float:
        if self.power is None:
            return self.init_gain
        return float(np.clip(self.target / np.sqrt(self.power), self.lo, self.hi))

    def process(self, x: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
        """Scale a chunk [N] by the current gain, then update the estimate with it."""
        g = self.gain
        if x.size:
            p = float(np.mean(np.square(x, dtype=np.float64)))
            if p > self.gate**2:
                a = min(1.0, x.size / (sr * self.tc))
                self.power = p if self.power is None else (1 - a) * self.power + a * p
        return (x * np.float32(g)).astype(np.float32)


# ------------------------------------------------------------------------------- outgoing audio
class AudioBuffer:
    """48 kHz mono samples addressed by absolute sample index, in a fixed ring (``2 * keep_s``): a
    write copies only the new samples, never the buffer. Reads trim what is older than ``keep_s``
    before the read position; the ring keeps at most its size in any case."""

    def __init__(self, keep_s: float = 5.0):
        self._keep = int(keep_s * OUT_RATE)
        self._ring = np.zeros(max(1, 2 * self._keep), np.float32)
        self._base = 0  # absolute index of the oldest sample held
        self._end = 0  # absolute index one past the newest sample written
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self._end

    def _put(self, start: int, x: np.ndarray) -> None:  # x fits the ring; positions wrap
        size = self._ring.size
        p = start % size
        first = min(x.size, size - p)
        self._ring[p : p + first] = x[:first]
        self._ring[: x.size - first] = x[first:]

    def write(self, start: int, x: np.ndarray) -> None:
        """Write samples at absolute index ``start`` (gaps are zero-filled, overlaps overwrite)."""
        size = self._ring.size
        with self._lock:
            if start > self._end:  # a gap: silence (only the part the ring can still hold)
                gap0 = max(self._end, start - size)
                self._put(gap0, np.zeros(start - gap0, np.float32))
            if x.size > size:  # longer than the ring: only its tail fits
                start += x.size - size
                x = x[x.size - size :]
            if start < self._base:  # older than what we keep
                x = x[self._base - start :]
                start = self._base
            if x.size:
                self._put(start, x)
            self._end = max(self._end, start + x.size)
            self._base = max(self._base, self._end - size)

    def read(self, start: int, n: int) -> tuple[np.ndarray, int]:
        """Samples [start, start+n) (zeros where missing) and how many were missing."""
        out = np.zeros(n, np.float32)
        size = self._ring.size
        with self._lock:
            lo, hi = max(start, self._base), min(start + n, self._end)
            if hi > lo:
                p = lo % size
                first = min(hi - lo, size - p)
                out[lo - start : lo - start + first] = self._ring[p : p + first]
                out[lo - start + first : hi - start] = self._ring[: hi - lo - first]
            self._base = max(self._base, min(start - self._keep, self._end))  # trim older than keep_s
        return out, n - max(0, hi - lo)


# ---------------------------------------------------------------------------------- audio input
class AudioInput:
    """Feeds the mel front end and the outgoing-audio buffer; observes the media clock.

    ``windows()`` hands out (frame indices [F], windows [F,1,80,20]) as they become complete.
    """

    def __init__(self, clock: MediaClock, gain: float | None = None):
        self.clock = clock
        self.mel = audio_in.StreamingMel(gain=1.0 if gain is None else gain, outputs="windows")
        self.agc = Agc() if gain is None else None
        self.out = AudioBuffer()
        self.samples48 = 0  # next 48 kHz sample index
        self.samples16 = 0
        self._soxr = None  # 48 kHz -> 16 kHz
        self._in_soxr = None  # input rate -> 48 kHz
        self._in_rate: int | None = None
        self.input_format: str | None = None  # e.g. "s16 stereo 48000 Hz" of the live track (set by its reader)

    # --- live audio (any source: a WebRTC track in serve/, pushed speech, a test)
    def push(self, samples: np.ndarray, rate: int, arrival: float | None, start48: int | None = None) -> None:
        """Samples [N] or [N,C] (float in [-1,1] or int16) at ``rate`` Hz that arrived at wall time
        ``arrival`` (None: do not move the media clock). ``start48``: where the chunk starts on the
        48 kHz media timeline, when the source knows it (a jump of more than 10 ms is filled with
        silence: lost packets keep their place on the clock)."""
        x = to_mono_float(samples)
        if rate != OUT_RATE:
            if self._in_rate != rate:
                import soxr

                if self._in_rate is not None:
                    log.info("audio input rate changed from %s to %s Hz", self._in_rate, rate)
                self._in_rate = rate
                self._in_soxr = soxr.ResampleStream(rate, OUT_RATE, 1, dtype="float32", quality="HQ")
            x = self._in_soxr.resample_chunk(x)
        if start48 is not None and start48 > self.samples48 + OUT_RATE // 100:  # > 10 ms gap: fill silence
            self.push48(np.zeros(start48 - self.samples48, np.float32), arrival, observe=False)
        self.push48(x, arrival, observe=arrival is not None)

    def push48(self, x: np.ndarray, arrival: float | None, observe: bool = True) -> None:
        """48 kHz mono float samples that arrived at wall time ``arrival``."""
        import soxr

        if self._soxr is None:
            self._soxr = soxr.ResampleStream(OUT_RATE, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.out.write(self.samples48, x)
        self.samples48 += x.size
        if observe and arrival is not None and x.size:
            self.clock.observe(self.samples48 / OUT_RATE, arrival)
        y = self._soxr.resample_chunk(x)
        self._push16(y)

    # --- file
    def push_file_chunk(self, x16: np.ndarray, x48: np.ndarray, arrival: float | None = None) -> None:
        """Matching 16 kHz and 48 kHz chunks of a file source."""
        self.out.write(self.samples48, x48)
        self.samples48 += x48.size
        if arrival is not None:
            self.clock.observe(self.samples48 / OUT_RATE, arrival)
        self._push16(x16)

    def _push16(self, y: np.ndarray) -> None:
        if self.agc is not None:
            y = self.agc.process(y)
        self.samples16 += y.size
        self.mel.accept(y)

    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mel.get_windows()


class SpeechQueue:
    """Pushed speech (e.g. a TTS) waiting for its place on the media clock of a session.

    ``push(samples, rate)`` takes PCM at any rate, in chunks of any size, usually faster than real
    time; ``read(n)`` hands out the next ``n`` samples at 48 kHz, the speech first and silence when
    none is queued, so the session's media clock runs on at real time whether or not anyone speaks.
    ``end_segment()`` marks the end of an utterance: ``read`` reports where in its chunk each marked
    end falls. ``clear()`` drops everything queued (barge-in). Thread-safe.
    """

    def __init__(self):
        self._chunks: deque[np.ndarray] = deque()  # 48 kHz mono float32
        self._queued = 0  # samples in _chunks
        self._taken = 0  # samples handed out by read() so far (queue position)
        self._ends: deque[int] = deque()  # queue positions of segment ends
        self._rate: int | None = None
        self._soxr = None
        self._lock = threading.Lock()
        self.pushed = 0  # queue position of the end of the last pushed sample

    @property
    def queued_s(self) -> float:
        return self._queued / OUT_RATE

    def push(self, samples: np.ndarray, rate: int) -> None:
        """Speech samples [N] or [N,C] (float in [-1,1] or int16) at ``rate`` Hz."""
        if not 8000 <= rate <= 192000:
            raise InputError(f"audio sample rate must be in [8000, 192000] Hz, got {rate}")
        x = to_mono_float(samples)
        with self._lock:
            if rate != OUT_RATE:
                if self._rate != rate:
                    import soxr

                    self._flush_resampler()
                    self._rate = rate
                    self._soxr = soxr.ResampleStream(rate, OUT_RATE, 1, dtype="float32", quality="HQ")
                x = self._soxr.resample_chunk(x)
            self._append(x)

    def end_segment(self) -> None:
        """The utterance pushed so far is complete (its resampler tail is flushed now)."""
        with self._lock:
            self._flush_resampler()
            self._ends.append(self.pushed)

    def read(self, n: int) -> tuple[np.ndarray, int, list[int]]:
        """-> (samples [n] at 48 kHz, how many are speech (the first ones), offsets in [0, n] of the
        segment ends played in this chunk)."""
        out = np.zeros(n, np.float32)
        with self._lock:
            got = 0
            while got < n and self._chunks:
                c = self._chunks[0]
                k = min(n - got, c.size)
                out[got : got + k] = c[:k]
                got += k
                if k == c.size:
                    self._chunks.popleft()
                else:
                    self._chunks[0] = c[k:]
            self._queued -= got
            start = self._taken
            self._taken += got
            ends = []
            while self._ends and self._ends[0] <= self._taken:
                ends.append(max(0, self._ends.popleft() - start))
        return out, got, ends

    def clear(self) -> tuple[int, int]:
        """Drop all queued speech -> (samples dropped, segment ends dropped)."""
        with self._lock:
            dropped, n_ends = self._queued, len(self._ends)
            self._chunks.clear()
            self._ends.clear()
            self._queued = 0
            self._soxr, self._rate = None, None  # its buffered tail belongs to the dropped speech
            self.pushed = self._taken
        return dropped, n_ends

    def _append(self, x: np.ndarray) -> None:
        if x.size:
            self._chunks.append(x)
            self._queued += x.size
            self.pushed += x.size

    def _flush_resampler(self) -> None:
        if self._soxr is not None:
            self._append(self._soxr.resample_chunk(np.zeros(0, np.float32), last=True))
            self._soxr, self._rate = None, None


class FileAudio:
    """A whole audio file prepared for streaming: 16 kHz for the mel path, 48 kHz to send back."""

    def __init__(self, path: str | Path, loop: bool = True):
        self.path = Path(path)
        self.wav16 = audio_in.load_audio(self.path, SAMPLE_RATE)  # [N]
        if self.wav16.size < int(0.2 * SAMPLE_RATE):
            raise InputError(f"{self.path.name}: audio is {self.wav16.size / SAMPLE_RATE:.2f} s; need >= 0.2 s")
        self.wav48 = audio_in.load_audio(self.path, OUT_RATE)
        n = min(self.wav16.size, self.wav48.size // RATIO)  # exact 1:3 lengths
        self.wav16, self.wav48 = self.wav16[:n], self.wav48[: n * RATIO]
        self.gain = audio_in.rms_gain(self.wav16)  # whole-file RMS normalisation (offline semantics)
        self.loop = loop

    def describe(self) -> str:
        """What the page shows as the audio input, e.g. ``file speech.flac, 7.1 s, looped``."""
        return f"file {self.path.name}, {self.wav16.size / SAMPLE_RATE:.1f} s" + (", looped" if self.loop else "")

    def chunk(self, start16: int, n16: int) -> tuple[np.ndarray, np.ndarray]:
        """16 kHz samples [start16, start16+n16) (looping or zero past the end) and the 48 kHz match."""
        n = self.wav16.size
        idx = np.arange(start16, start16 + n16)
        if self.loop:
            idx16 = idx % n
            x16 = self.wav16[idx16]
            idx48 = np.repeat(idx16 * RATIO, RATIO) + np.tile(np.arange(RATIO), n16)
            return x16, self.wav48[idx48]
        x16 = np.where(idx < n, self.wav16[np.minimum(idx, n - 1)], 0).astype(np.float32)
        x48 = np.zeros(n16 * RATIO, np.float32)
        lo = max(0, min(n16, n - start16))
        x48[: lo * RATIO] = self.wav48[start16 * RATIO : (start16 + lo) * RATIO]
        return x16, x48


# ------------------------------------------------------------------------------------- identity
class FaceService:
    """One shared FaceCropper (mediapipe graphs are not thread-safe: a lock serialises calls)."""

    def __init__(self):
        self._cropper = None
        self._lock = threading.Lock()

    def crop(self, img_rgb: np.ndarray, name: str) -> np.ndarray:
        """[H,W,3] u8 -> aligned [224,224,3] u8; NoFaceError if none."""
        with self._lock:
            if self._cropper is None:
                from rt_engine.inputs.face import FaceCropper

                self._cropper = FaceCropper()
            return self._cropper.crop_image(img_rgb, name=name)

    def crop_or_none(self, img_rgb: np.ndarray, name: str) -> np.ndarray | None:
        try:
            return self.crop(img_rgb, name)
        except NoFaceError:
            return None

    def crop_video(self, frames: np.ndarray, name: str) -> np.ndarray:
        from rt_engine.inputs.face import FaceCropper

        with FaceCropper() as fc:  # its own instance: video smoothing keeps per-call state
            return fc.crop_video(frames, name=name)

    def close(self) -> None:
        with self._lock:
            if self._cropper is not None:
                self._cropper.close()
                self._cropper = None


def identity_crop(faces: FaceService, data: bytes | None, name: str = "identity") -> np.ndarray:
    """Identity image bytes (None: the bundled default) -> aligned crop [224,224,3] u8."""
    if data is None:
        if not DEFAULT_IDENTITY.is_file():
            raise InputError(f"bundled identity image missing: {DEFAULT_IDENTITY}")
        data = DEFAULT_IDENTITY.read_bytes()
        name = DEFAULT_IDENTITY.name
    img = decode_image_bytes(data, name)
    return faces.crop(img, name)


# ----------------------------------------------------------------------------------------- pose
class PoseSource:
    """Pose code per frame index."""

    kind = "abstract"

    def code_for(self, i: int) -> np.ndarray:  # [12]
        raise NotImplementedError

    def close(self) -> None:
        pass


class StillPose(PoseSource):
    kind = "still"

    def __init__(self, code: np.ndarray):
        self.code = np.asarray(code, np.float32).reshape(-1)

    def code_for(self, i: int) -> np.ndarray:
        return self.code


class CodesPose(PoseSource):
    """Precomputed codes [N,12] for frames 0..N-1, played forward then backward (official)."""

    def __init__(self, codes: np.ndarray, kind: str):
        if len(codes) == 0:
            raise InputError("pose source gave no pose codes")
        self.codes = np.asarray(codes, np.float32)
        self.kind = kind

    def code_for(self, i: int) -> np.ndarray:
        return self.codes[pingpong_index(i, len(self.codes))]


class WebcamPose(PoseSource):
    """Latest pose code of a live webcam, lightly smoothed; the still code until a face is seen."""

    kind = "webcam"

    def __init__(self, fallback: np.ndarray, smooth: float = 0.5):
        self.code = np.asarray(fallback, np.float32).reshape(-1)
        self.smooth = smooth
        self.updates = 0
        self.misses = 0
        self._seen = False

    def update(self, code: np.ndarray) -> None:
        code = np.asarray(code, np.float32).reshape(-1)
        self.code = code if not self._seen else self.smooth * self.code + (1 - self.smooth) * code
        self._seen = True
        self.updates += 1

    def code_for(self, i: int) -> np.ndarray:
        return self.code


Encode = Callable[[np.ndarray], np.ndarray]  # aligned crops [N,224,224,3] u8 -> codes [N,12]


def idle_codes(id_aligned: np.ndarray, encode: Encode, seconds: float = 20.0) -> np.ndarray:
    """Built-in idle motion as in ``render.py`` (pose='idle'): key poses at 5 fps interpolated to
    25 fps, ``seconds`` long (played forward/backward). -> [N,12]"""
    n_key = int(seconds * pose_in.IDLE_KEY_FPS) + 1
    keys = np.stack([official_crop(f) for f in pose_in.idle_frames(id_aligned, n_key)])
    key_codes = encode(keys)
    return pose_in.interpolate_codes(key_codes, int(seconds * 25))
