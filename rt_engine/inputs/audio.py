"""Audio front end: decode -> 16 kHz mono -> RMS gain -> lws-equivalent STFT -> Slaney mel -> [0,1].

Offline (:func:`log_mel`) and streaming (:class:`StreamingMel`) share one per-frame function, so
any chunking of the input gives bit-identical numbers. STFT frame ``m`` covers samples
``[160m - 1120, 160m + 160)`` of the (gain-scaled) signal, zero outside; there are
``T = ceil(N / 160) + 7`` frames for ``N`` samples. Video frame ``i`` (25 fps) uses mel rows
``[4(i-2), 4(i-2) + 20)``, so it needs audio up to ``40 i + 120`` ms: that lookahead is the
algorithmic latency of the audio path.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from rt_engine.config import FIRST_FRAME, MEL_ROWS_PER_FRAME, MEL_WINDOW, SAMPLE_RATE
from rt_engine.errors import InputError

log = logging.getLogger(__name__)

N_FFT = 1280
HOP = 160
LEFT_PAD = N_FFT - HOP  # 1120 zeros before the signal (lws framing)
N_MELS = 80
FMIN, FMAX = 125.0, 7600.0
TARGET_RMS = 0.1
MIN_RMS = 1e-4
AMP_FLOOR = math.exp(-5 * math.log(10))  # official floor, 9.99999999999998e-06
SILENCE_RMS = 1e-4  # below this a clip counts as silent


# ---------------------------------------------------------------------------------------- decode
def load_audio(path: str | Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any common container (wav, flac, mp3, ogg, m4a, the audio of an mp4) to mono float32
    at ``sr``. Channels are averaged; resampling uses soxr HQ (as librosa.load). -> [N]"""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"audio file not found: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: the file is empty (0 bytes)")
    if p.suffix.lower() == ".mp3":
        # libsndfile's mp3 decoder prints "Note: ..." lines on stderr for a damaged file before it fails;
        # FFmpeg's probe rejects such a file quietly first (a readable mp3 is still decoded by
        # libsndfile below, the decoder of upstream's librosa.load, so its samples are unchanged)
        _probe_with_av(p)
    try:
        import soundfile as sf

        data, file_sr = sf.read(str(p), dtype="float32", always_2d=True)  # [N,C]
    except Exception:  # libsndfile does not read this container: fall back to FFmpeg (PyAV)
        data, file_sr = _decode_with_av(p)
    if data.size == 0:
        raise InputError(f"{p}: contains no audio samples")
    return resample_mono(data, file_sr, sr)


def _av_error(p: Path, e: Exception) -> InputError:
    """One readable line for an FFmpeg error (its message, not its raw error number)."""
    why = getattr(e, "strerror", None) or str(e)
    return InputError(f"{p}: not a readable audio file ({why})")


def _probe_with_av(p: Path) -> None:
    """Raise InputError unless FFmpeg finds an audio stream in ``p`` (reads the header only)."""
    import av

    try:
        with av.open(str(p)) as c:
            if not c.streams.audio:
                raise InputError(f"{p}: has no audio track")
    except InputError:
        raise
    except Exception as e:
        raise _av_error(p, e) from None


def _decode_with_av(p: Path) -> tuple[np.ndarray, int]:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a hard dependency
        raise InputError(f"{p}: cannot decode (install 'av')") from None
    try:
        with av.open(str(p)) as c:
            if not c.streams.audio:
                raise InputError(f"{p}: has no audio track")
            stream = c.streams.audio[0]
            rate = stream.rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            chunks = []
            for frame in c.decode(stream):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray().reshape(-1))
            for f in resampler.resample(None):
                chunks.append(f.to_ndarray().reshape(-1))
    except InputError:
        raise
    except Exception as e:
        raise _av_error(p, e) from None
    if not chunks:
        raise InputError(f"{p}: contains no audio samples")
    return np.concatenate(chunks).astype(np.float32)[:, None], int(rate)


def resample_mono(data: np.ndarray, from_sr: int, to_sr: int = SAMPLE_RATE) -> np.ndarray:
    """[N] or [N,C] float -> mono float32 [M] at ``to_sr`` (channel mean, soxr HQ)."""
    x = np.asarray(data, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if from_sr != to_sr:
        import soxr

        x = soxr.resample(x, from_sr, to_sr, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(x)


def rms_gain(x: np.ndarray) -> float:
    """Gain of the official RMS normalisation (float32 as NumPy computes it)."""
    x = np.asarray(x, dtype=np.float32)
    rms = max(np.float32(MIN_RMS), np.sqrt(np.mean(x * x)))
    return float(np.float32(TARGET_RMS) / np.float32(rms))


def normalize(x: np.ndarray) -> np.ndarray:
    """Official RMS normalisation: ``x * 0.1 / max(1e-4, rms(x))``, in float32."""
    x = np.asarray(x, dtype=np.float32)
    rms = max(np.float32(MIN_RMS), np.sqrt(np.mean(x * x)))
    return x * (np.float32(TARGET_RMS) / rms)


def is_silent(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) < SILENCE_RMS


# ------------------------------------------------------------------------------------- features
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=1)
def mel_basis() -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filterbank (as librosa.filters.mel). [80,641] f32"""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    w = np.zeros((N_MELS, fft_freqs.size), dtype=np.float32)
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        w[i] = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    w.setflags(write=False)
    return w


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    """lws 'perfect reconstruction' sqrt-Hann analysis window. [1280] f64"""
    return 0.5 * np.sin(np.pi * (np.arange(N_FFT) + 0.5) / N_FFT)


@lru_cache(maxsize=1)
def _basis64() -> np.ndarray:
    return mel_basis().astype(np.float64)


def frame_to_mel(segment: np.ndarray) -> np.ndarray:
    """One STFT frame (1280 samples, already gain-scaled) -> one normalised mel row. [80] f32

    Every mel row of the engine, offline or streaming, goes through this function.
    """
    spec = np.abs(np.fft.rfft(segment.astype(np.float64) * _window()))  # [641]
    mel = _basis64() @ spec  # [80]
    db = 20.0 * np.log10(np.maximum(mel, AMP_FLOOR)) - 20.0
    return np.clip((db + 100.0) / 100.0, 0.0, 1.0).astype(np.float32)


def num_mel_rows(n_samples: int) -> int:
    return math.ceil(n_samples / HOP) + 7


def log_mel(x: np.ndarray) -> np.ndarray:
    """Whole-clip normalised log-mel of an already normalised signal. [N] -> [T,80] f32"""
    x = np.asarray(x, dtype=np.float32)
    t = num_mel_rows(x.size)
    xp = np.concatenate([np.zeros(LEFT_PAD, np.float64), x.astype(np.float64), np.zeros(t * HOP + N_FFT, np.float64)])
    out = np.empty((t, N_MELS), np.float32)
    for m in range(t):
        out[m] = frame_to_mel(xp[m * HOP : m * HOP + N_FFT])
    return out


def num_video_frames(n_mel_rows: int) -> int:
    """Frames generated for T mel rows: i = 2 .. T//4 - 3 (official)."""
    return max(0, n_mel_rows // MEL_ROWS_PER_FRAME - 2 - FIRST_FRAME)


def target_frames(n_mel_rows: int) -> np.ndarray:
    """Target frame indices i = 2, ..., T//4 - 3. [F] int64"""
    return np.arange(FIRST_FRAME, n_mel_rows // MEL_ROWS_PER_FRAME - 2, dtype=np.int64)


def mel_window(mel: np.ndarray, i: int) -> np.ndarray:
    """Audio window of target frame i: rows [4(i-2), 4(i-2)+20) as [1,80,20]."""
    s = MEL_ROWS_PER_FRAME * (i - FIRST_FRAME)
    if s < 0 or s + MEL_WINDOW > mel.shape[0]:
        raise IndexError(f"frame {i} needs mel rows [{s},{s + MEL_WINDOW}) of {mel.shape[0]}")
    return np.ascontiguousarray(mel[s : s + MEL_WINDOW].T[None])


def mel_windows(mel: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """[T,80], [F] -> [F,1,80,20] f32"""
    return np.stack([mel_window(mel, int(i)) for i in frames]) if len(frames) else np.zeros((0, 1, 80, 20), np.float32)


@lru_cache(maxsize=1)
def silence_window() -> np.ndarray:
    """The mel window [1,80,20] of a video frame in silence (1 s of zeros): what the mouth sees when
    nothing is said (mouth-gain anchor, barge-in). Computed once; read-only."""
    win = mel_window(log_mel(np.zeros(SAMPLE_RATE, np.float32)), FIRST_FRAME + 2)  # [1,80,20]
    win.setflags(write=False)
    return win


def samples_needed(frame: int) -> int:
    """Samples of input needed before frame ``frame``'s window is complete."""
    last_row = MEL_ROWS_PER_FRAME * (frame - FIRST_FRAME) + MEL_WINDOW - 1
    return last_row * HOP + HOP


# ------------------------------------------------------------------------------------ streaming
class StreamingMel:
    """Chunked mel front end: ``accept(samples)`` / ``rows_ready()`` / ``get_rows()``.

    ``gain`` multiplies every input sample (use :func:`rms_gain` of the whole file for file input,
    which makes the result equal to :func:`log_mel` of :func:`normalize`). :meth:`get_rows` hands
    out mel rows (100/s); :meth:`get_windows` hands out the 20-row windows of video frames.

    ``outputs`` says which of the two a caller takes: "rows" (:meth:`get_rows`), "windows"
    (:meth:`get_windows`) or "both". Rows are held until they are taken, so an output nobody takes
    would grow without bound on a long stream: a live session asks for "windows" only.
    """

    OUTPUTS = ("rows", "windows", "both")

    def __init__(self, gain: float = 1.0, outputs: str = "both"):
        if outputs not in self.OUTPUTS:
            raise ValueError(f"outputs must be one of {self.OUTPUTS}, got {outputs!r}")
        self.outputs = outputs
        self.gain = np.float32(gain)
        self._buf = np.zeros(LEFT_PAD, np.float64)  # samples from 160 * next_row - 1120 on
        self._next_row = 0  # next mel row to compute
        self._rows: list[np.ndarray] = []  # computed, not yet taken rows
        self._all_rows: list[np.ndarray] = []  # history for windows
        self._rows_dropped = 0  # rows removed from the front of _all_rows
        self._next_frame = FIRST_FRAME
        self.samples_in = 0
        self.finished = False

    def accept(self, samples: np.ndarray) -> None:
        """Append float samples at 16 kHz (mono). Any chunk size, including 0."""
        if self.finished:
            raise RuntimeError("accept() after finish()")
        x = (np.asarray(samples, dtype=np.float32).reshape(-1) * self.gain).astype(np.float64)
        self.samples_in += x.size
        self._buf = np.concatenate([self._buf, x])
        self._compute()

    def finish(self) -> None:
        """End of stream: pad with zeros like the offline front end and compute the last rows."""
        if self.finished:
            return
        total = num_mel_rows(self.samples_in)
        need = (total - self._next_row) * HOP + N_FFT
        self._buf = np.concatenate([self._buf, np.zeros(max(0, need), np.float64)])
        self.finished = True
        self._compute(limit=total)

    def _compute(self, limit: int | None = None) -> None:
        n = (self._buf.size - N_FFT) // HOP + 1 if self._buf.size >= N_FFT else 0
        if limit is not None:
            n = min(n, limit - self._next_row)
        for m in range(max(0, n)):
            row = frame_to_mel(self._buf[m * HOP : m * HOP + N_FFT])
            if self.outputs != "windows":
                self._rows.append(row)
            if self.outputs != "rows":
                self._all_rows.append(row)
        if n > 0:
            self._buf = self._buf[n * HOP :]
            self._next_row += n

    @property
    def rows_held(self) -> int:
        """Mel rows kept in memory (untaken rows plus the history later windows still need)."""
        return len(self._rows) + len(self._all_rows)

    def _check(self, output: str) -> None:
        if self.outputs not in (output, "both"):
            raise RuntimeError(f"this StreamingMel was made with outputs={self.outputs!r}; it does not keep {output}")

    def rows_ready(self) -> int:
        """Mel rows computed and not yet taken by :meth:`get_rows`."""
        self._check("rows")
        return len(self._rows)

    def get_rows(self) -> np.ndarray:
        """Take the computed mel rows. -> [n,80] f32"""
        self._check("rows")
        out = np.stack(self._rows) if self._rows else np.zeros((0, N_MELS), np.float32)
        self._rows = []
        return out

    @property
    def rows_total(self) -> int:
        return self._next_row

    def windows_ready(self) -> int:
        """Video frames whose 20-row window is complete and not yet taken."""
        self._check("windows")
        last = FIRST_FRAME + (self._next_row - MEL_WINDOW) // MEL_ROWS_PER_FRAME
        if self.finished:  # the offline range ends at T//4 - 3
            last = min(last, self._next_row // MEL_ROWS_PER_FRAME - 3)
        return max(0, last - self._next_frame + 1)

    def get_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Take ready video-frame windows. -> (frame indices [F], windows [F,1,80,20])"""
        k = self.windows_ready()
        idx = np.arange(self._next_frame, self._next_frame + k, dtype=np.int64)
        wins = []
        for i in idx:
            s = MEL_ROWS_PER_FRAME * (int(i) - FIRST_FRAME) - self._rows_dropped
            wins.append(np.stack(self._all_rows[s : s + MEL_WINDOW]).T[None])
        self._next_frame += k
        # keep only the rows a future window can still use
        keep_from = MEL_ROWS_PER_FRAME * (self._next_frame - FIRST_FRAME) - self._rows_dropped
        if keep_from > 0:
            del self._all_rows[:keep_from]
            self._rows_dropped += keep_from
        return idx, (np.stack(wins).astype(np.float32) if wins else np.zeros((0, 1, N_MELS, MEL_WINDOW), np.float32))


def audio_features(path_or_wav: str | Path | np.ndarray, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """File (or raw 16 kHz samples) -> (normalised wav [N], mel [T,80]). Raises InputError for
    audio shorter than one 0.2 s window; warns for silence."""
    if isinstance(path_or_wav, (str, Path)):
        wav = load_audio(path_or_wav, sr)
        name = str(path_or_wav)
    else:
        wav = resample_mono(path_or_wav, sr)
        name = "audio"
    min_samples = samples_needed(FIRST_FRAME)
    if wav.size < int(0.2 * SAMPLE_RATE):
        raise InputError(f"{name}: audio is {wav.size / SAMPLE_RATE:.3f} s long; at least 0.2 s is needed")
    if is_silent(wav):
        log.warning("%s: audio is silent; the mouth will stay closed", name)
    wav = normalize(wav)
    mel = log_mel(wav)
    if num_video_frames(mel.shape[0]) < 1:
        raise InputError(f"{name}: audio too short for one video frame (need {min_samples} samples)")
    return wav, mel
