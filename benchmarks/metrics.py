"""Talking-face quality metrics (PC-AVS paper, Tables 1 and 3), computed offline.

Pure functions over numpy arrays; the heavy optional tools are imported lazily:

* SSIM / PSNR: scikit-image.
* CPBD sharpness: ``cpbd-py312``.
* 68-point landmarks, a face-identity embedding and the mouth opening:
  :mod:`rt_engine.inputs.landmarks` (training labels use them too), re-exported here.
* Lip sync without SyncNet: mouth-opening curves (inner-lip gap / outer eye-corner distance),
  their correlation and lag, and the audio-to-mouth offset found by cross-correlating speech-band
  energy with mouth opening (z-score against circularly shifted audio).
* LSE-C / LSE-D (Prajwal et al. 2020) with SyncNet (Chung & Zisserman 2016) when its weights
  (``syncnet_v2.model``, a state dict) are given: the network is defined here in plain torch.

Frames are RGB uint8 ``[N,H,W,3]``; landmark arrays ``[N,68,2]`` hold NaN where no face was found.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

# re-exported: the evaluation scripts use them as metrics.FaceAnalyzer, metrics.MOUTH, ...
from rt_engine.inputs.landmarks import JAW, MOUTH, FaceAnalyzer, as_video, mouth_opening  # noqa: F401

log = logging.getLogger(__name__)

FPS = 25
SAMPLE_RATE = 16000


# ------------------------------------------------------------------ image metrics
def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames of two [N,H,W,3] uint8 videos (scikit-image, 7x7 window)."""
    from skimage.metrics import structural_similarity

    a, b = as_video(a), as_video(b)
    vals = [structural_similarity(x, y, channel_axis=2, data_range=255) for x, y in zip(a, b, strict=True)]
    return float(np.mean(vals))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [N,H,W,3] uint8 videos (MSE over all frames; inf if identical)."""
    a, b = as_video(a), as_video(b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def cpbd_sharpness(frames: np.ndarray, max_frames: int = 25) -> float:
    """Mean CPBD sharpness (cpbd-py312) over up to ``max_frames`` evenly spaced frames [N,H,W,3]."""
    try:
        import cpbd
    except ImportError as e:  # pragma: no cover
        raise ImportError("CPBD needs: pip install cpbd-py312") from e
    frames = as_video(frames)
    idx = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    gray = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames[idx]]  # uint8
    return float(np.mean([cpbd.compute(g) for g in gray]))


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """[N,3,H,W] float in [-1,1] (generator output) -> [N,H,W,3] uint8."""
    x = np.asarray(frames, np.float32)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def labelled_cell(frame: np.ndarray, text: str, size: int) -> np.ndarray:
    """RGB frame [H,W,3] u8 -> [size,size,3] u8 with ``text`` written top left (for contact sheets)."""
    cell = cv2.resize(np.ascontiguousarray(frame), (size, size), interpolation=cv2.INTER_AREA)
    cv2.putText(cell, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 0), 1, cv2.LINE_AA)
    return cell


# ------------------------------------------------------------------ landmarks
def lmd(lm_a: np.ndarray, lm_b: np.ndarray, points: Sequence[int] | None = None) -> float:
    """Landmark distance: mean Euclidean distance (pixels) over the given points and the frames
    where both [N,68,2] sets have a face; NaN when no frame has both."""
    a, b = np.asarray(lm_a, np.float64), np.asarray(lm_b, np.float64)
    if points is not None:
        a, b = a[:, list(points)], b[:, list(points)]
    ok = np.isfinite(a).all((1, 2)) & np.isfinite(b).all((1, 2))
    if not ok.any():
        return math.nan
    return float(np.linalg.norm(a[ok] - b[ok], axis=-1).mean())


def opening_span_ratio(gen: np.ndarray, ref: np.ndarray) -> float:
    """How far the generated mouth moves, relative to the real one: (p90 - p10) of the generated
    opening curve over (p90 - p10) of the real one, each over its finite frames (1 = as far as the
    real speaker, 0 = a still mouth; NaN with fewer than 3 frames or a real mouth that never moves)."""

    def span(x: np.ndarray) -> float:
        x = np.asarray(x, np.float64)
        x = x[np.isfinite(x)]
        return float(np.percentile(x, 90) - np.percentile(x, 10)) if len(x) >= 3 else math.nan

    g, r = span(gen), span(ref)
    return g / r if math.isfinite(g) and math.isfinite(r) and r > 1e-9 else math.nan


def cosine_similarity(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """Mean cosine similarity of paired embedding rows [N,D] (rows with NaN ignored)."""
    a, b = np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64)
    ok = np.isfinite(a).all(1) & np.isfinite(b).all(1)
    if not ok.any():
        return math.nan
    a, b = a[ok], b[ok]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.mean())


# ------------------------------------------------------------------ curves and sync
def _fill_nan(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN gaps (edges held); all-NaN stays NaN."""
    x = np.asarray(x, np.float64).copy()
    ok = np.isfinite(x)
    if ok.all() or not ok.any():
        return x
    idx = np.arange(len(x))
    x[~ok] = np.interp(idx[~ok], idx[ok], x[ok])
    return x


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def highpass(x: np.ndarray, width: int = 25) -> np.ndarray:
    """Removes slow trends: ``x`` minus its centred ``width``-frame moving average (edges held)."""
    x = _fill_nan(x)
    if width <= 1 or len(x) < 2:
        return x
    pad = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return x - np.convolve(pad, np.ones(width) / width, mode="valid")


def curve_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two curves [N] over frames where both are finite (NaN if < 3)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() < 1e-12 or b[ok].std() < 1e-12:
        return math.nan
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _shifted_correlations(
    g: np.ndarray, r: np.ndarray, min_shift: int, n_shuffle: int, rng: np.random.Generator
) -> np.ndarray:
    """Correlations of ``g`` with ``r`` [N] circularly shifted by ``n_shuffle`` random amounts in
    ``min_shift`` .. N - ``min_shift`` (NaN where undefined); [n_shuffle]."""
    shifts = rng.integers(min_shift, len(r) - min_shift, n_shuffle)
    return np.array([curve_correlation(g, np.roll(r, int(sh))) for sh in shifts])


def correlation_vs_shifted(
    gen: np.ndarray, ref: np.ndarray, min_shift: int = 16, n_shuffle: int = 200, seed: int = 0
) -> dict[str, float]:
    """How far the correlation of ``gen`` with ``ref`` [N] stands above chance: the same
    correlation against ``ref`` circularly shifted by ``min_shift`` .. N - ``min_shift`` frames (a
    mouth that moves like the real one, out of step with it; a still mouth has no correlation at
    all). Returns ``corr``, ``z`` (vs the mean and std of the shifted correlations) and ``p``
    ((1 + shifted >= corr) / (1 + shifts), one-sided). z and p are NaN where the curves are too short
    to shift; all three where the correlation is undefined."""
    g, r = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    n = min(len(g), len(r))
    g, r = g[:n], r[:n]
    c = curve_correlation(g, r)
    nan = {"corr": c, "z": math.nan, "p": math.nan}
    if not math.isfinite(c) or n - min_shift <= min_shift:
        return nan
    null = _shifted_correlations(g, r, min_shift, n_shuffle, np.random.default_rng(seed))
    null = null[np.isfinite(null)]
    if len(null) < 3:
        return nan
    return {
        "corr": c,
        "z": float((c - null.mean()) / max(null.std(), 1e-6)),
        "p": float((1 + (null >= c).sum()) / (1 + len(null))),
    }


def pooled_correlation_vs_shifted(
    pairs: Sequence[tuple[np.ndarray, np.ndarray] | None], min_shift: int = 16, n_shuffle: int = 1000, seed: int = 0
) -> dict[str, float]:
    """One test over many clips: is the mean of their (generated, real) mouth correlations above
    what out-of-step mouths get?

    ``pairs``: per clip the curves (gen [N], ref [N]), or None for a clip that produced nothing. A
    clip whose correlation is undefined (no face drawn, a still mouth, None, too short to shift)
    counts as 0, in the observed mean and in every shuffled one: it cannot help the test, and it
    still weighs in the mean. The null draws every clip's ``ref`` circularly shifted by
    ``min_shift`` .. N - ``min_shift`` frames, independently per clip, ``n_shuffle`` times. Returns
    ``mean_corr``, ``z``, ``p`` ((1 + null >= observed) / (1 + draws), one-sided), ``clips`` and
    ``undefined`` (clips counted as 0); z and p are NaN when no clip has a defined correlation."""
    live: list[tuple[np.ndarray, np.ndarray]] = []
    obs = []
    for pair in pairs:
        if pair is None:
            continue
        g, r = (np.asarray(x, np.float64) for x in pair)
        n = min(len(g), len(r))
        c = curve_correlation(g[:n], r[:n])
        if math.isfinite(c) and n - min_shift > min_shift:
            live.append((g[:n], r[:n]))
            obs.append(c)
    n_clips = len(pairs)
    out = {
        "mean_corr": float(np.sum(obs) / n_clips) if n_clips else math.nan,
        "z": math.nan,
        "p": math.nan,
        "clips": n_clips,
        "undefined": n_clips - len(live),
    }
    if not live:
        return out
    rng = np.random.default_rng(seed)
    null = np.zeros(n_shuffle)
    for g, r in live:
        null += np.nan_to_num(_shifted_correlations(g, r, min_shift, n_shuffle, rng), nan=0.0)
    null /= n_clips
    out["z"] = float((out["mean_corr"] - null.mean()) / max(null.std(), 1e-6))
    out["p"] = float((1 + (null >= out["mean_corr"]).sum()) / (1 + n_shuffle))
    return out


def lagged_correlations(x: np.ndarray, y: np.ndarray, max_lag: int) -> np.ndarray:
    """Pearson correlation of ``y[t]`` with ``x[t - lag]`` for lag = -max_lag..max_lag; [2*max_lag+1].

    A positive lag means ``y`` follows ``x`` (is delayed by ``lag`` frames).
    """
    x, y = _fill_nan(x), _fill_nan(y)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    out = np.full(2 * max_lag + 1, np.nan)
    for k, lag in enumerate(range(-max_lag, max_lag + 1)):
        if lag >= 0:
            xs, ys = x[: n - lag], y[lag:]
        else:
            xs, ys = x[-lag:], y[: n + lag]
        out[k] = curve_correlation(xs, ys)
    return out


def curve_offset(gen: np.ndarray, ref: np.ndarray, max_lag: int = 8) -> tuple[float, float]:
    """(lag, correlation at that lag) maximising the correlation of ``gen[t]`` with ``ref[t-lag]``:
    a generated mouth curve delayed by 2 frames gives lag 2."""
    c = lagged_correlations(ref, gen, max_lag)
    if not np.isfinite(c).any():
        return math.nan, math.nan
    k = int(np.nanargmax(c))
    return k - max_lag, float(c[k])


def speech_energy(
    wav: np.ndarray,
    sr: int = SAMPLE_RATE,
    n_frames: int | None = None,
    fps: int = FPS,
    band: tuple[float, float] = (300.0, 3000.0),
) -> np.ndarray:
    """Log speech-band energy per video frame: [samples] -> [n_frames] (40 ms windows at 25 fps,
    centred on each frame's time span)."""
    wav = np.asarray(wav, np.float64).reshape(-1)
    hop = sr / fps
    win = int(round(2 * hop))
    n = int(len(wav) // hop) if n_frames is None else int(n_frames)
    fft_n = 1 << (win - 1).bit_length()
    freqs = np.fft.rfftfreq(fft_n, 1.0 / sr)
    sel = (freqs >= band[0]) & (freqs <= band[1])
    window = np.hanning(win)
    out = np.empty(n)
    for t in range(n):
        c = int(round((t + 0.5) * hop))
        seg = wav[max(0, c - win // 2) : c - win // 2 + win]
        if len(seg) < win:
            seg = np.pad(seg, (0, win - len(seg)))
        spec = np.abs(np.fft.rfft(seg * window, fft_n)) ** 2
        out[t] = np.log(spec[sel].sum() + 1e-8)
    return out


def av_offset(
    energy: np.ndarray, mouth: np.ndarray, max_lag: int = 8, n_shuffle: int = 100, seed: int = 0, detrend: int = 25
) -> dict[str, float]:
    """Audio-to-mouth offset from cross-correlating speech-band energy and mouth opening.

    Both curves are first high-passed (minus a ``detrend``-frame moving average): on the demo
    clip this raises the peak correlation from 0.10 to 0.27 (syllable rate, not loudness drift).

    Returns ``offset`` (frames; positive = the mouth lags the audio), ``corr`` (peak correlation)
    and ``z``: the peak against the peaks of ``n_shuffle`` circularly shifted energy curves (shifts
    of at least 2*max_lag frames), i.e. how far the real alignment stands above chance.
    """
    n = min(len(energy), len(mouth))
    e, m = highpass(energy[:n], detrend), highpass(mouth[:n], detrend)
    nan = {"offset": math.nan, "corr": math.nan, "z": math.nan}
    if n < 4 * max_lag or not np.isfinite(m).all() or not np.isfinite(e).all():
        return nan
    c = lagged_correlations(e, m, max_lag)
    if not np.isfinite(c).any():
        return nan
    k = int(np.nanargmax(c))
    rng = np.random.default_rng(seed)
    lo, hi = 2 * max_lag, n - 2 * max_lag
    peaks = []
    if hi > lo:
        for s in rng.integers(lo, hi, n_shuffle):
            cs = lagged_correlations(np.roll(e, int(s)), m, max_lag)
            if np.isfinite(cs).any():
                peaks.append(np.nanmax(cs))
    z = (c[k] - np.mean(peaks)) / max(np.std(peaks), 1e-6) if len(peaks) > 2 else math.nan
    return {"offset": float(k - max_lag), "corr": float(c[k]), "z": float(z)}


# ------------------------------------------------------------------ SyncNet (LSE-C / LSE-D)
def _syncnet_class():
    import torch
    from torch import nn

    def conv_bn(cin, cout, k, s=1, p=0, dims=2):
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        return [conv(cin, cout, kernel_size=k, stride=s, padding=p), bn(cout), nn.ReLU(inplace=True)]

    def fc(dim):
        return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, dim))

    class SyncNet(nn.Module):
        """SyncNet "S" of syncnet_python (state-dict keys netcnnaud.*, netfcaud.*, netcnnlip.*,
        netfclip.*). Audio: MFCC [B,1,13,20]; video: 5 BGR frames [B,3,5,224,224] in 0..255."""

        def __init__(self, dim: int = 1024) -> None:
            super().__init__()
            self.netcnnaud = nn.Sequential(
                *conv_bn(1, 64, 3, 1, 1),
                nn.MaxPool2d(1, 1),
                *conv_bn(64, 192, 3, 1, 1),
                nn.MaxPool2d(3, (1, 2)),
                *conv_bn(192, 384, 3, 1, 1),
                *conv_bn(384, 256, 3, 1, 1),
                *conv_bn(256, 256, 3, 1, 1),
                nn.MaxPool2d(3, 2),
                *conv_bn(256, 512, (5, 4), 1, 0),
            )
            self.netfcaud = fc(dim)
            self.netfclip = fc(dim)
            self.netcnnlip = nn.Sequential(
                *conv_bn(3, 96, (5, 7, 7), (1, 2, 2), 0, dims=3),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *conv_bn(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1), dims=3),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                *conv_bn(256, 256, (1, 3, 3), 1, (0, 1, 1), dims=3),
                *conv_bn(256, 256, (1, 3, 3), 1, (0, 1, 1), dims=3),
                *conv_bn(256, 256, (1, 3, 3), 1, (0, 1, 1), dims=3),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                *conv_bn(256, 512, (1, 6, 6), 1, 0, dims=3),
            )

        def forward_aud(self, x: torch.Tensor) -> torch.Tensor:  # [B,1,13,20] -> [B,dim]
            return self.netfcaud(self.netcnnaud(x).flatten(1))

        def forward_lip(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,5,224,224] -> [B,dim]
            return self.netfclip(self.netcnnlip(x).flatten(1))

    return SyncNet


def build_syncnet(weights: str | Path | None = None):
    """SyncNet in eval mode; loads a syncnet_python state dict (``syncnet_v2.model``) when given."""
    import torch

    net = _syncnet_class()()
    if weights is not None:
        state = torch.load(str(weights), map_location="cpu", weights_only=False)
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"SyncNet weights {weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.eval()


def mfcc_13(wav: np.ndarray, sr: int = SAMPLE_RATE) -> np.ndarray:
    """MFCC as python_speech_features.mfcc with its defaults (25 ms rectangular frames, 10 ms
    step, 512-point FFT, 26 mel filters, 13 cepstra, lifter 22, c0 = log frame energy), on
    int16-scaled samples like syncnet_python: [samples] float in [-1,1] -> [13,T]."""
    from scipy.fft import dct

    x = np.asarray(wav, np.float64).reshape(-1) * 32768.0
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])
    flen, step, nfft, nfilt = int(round(0.025 * sr)), int(round(0.01 * sr)), 512, 26
    nfr = 1 if len(x) <= flen else 1 + int(math.ceil((len(x) - flen) / step))
    x = np.pad(x, (0, max(0, (nfr - 1) * step + flen - len(x))))
    idx = np.arange(flen)[None] + step * np.arange(nfr)[:, None]
    frames = x[idx]  # [T,flen]
    pspec = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft  # [T,257]
    energy = np.where(pspec.sum(1) == 0, np.finfo(float).eps, pspec.sum(1))
    mel = np.linspace(0, 2595 * np.log10(1 + (sr / 2) / 700.0), nfilt + 2)
    bins = np.floor((nfft + 1) * (700 * (10 ** (mel / 2595.0) - 1)) / sr).astype(int)
    fb = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        for i in range(bins[j], bins[j + 1]):
            fb[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(bins[j + 1], bins[j + 2]):
            fb[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = pspec @ fb.T
    feat = np.log(np.where(feat == 0, np.finfo(float).eps, feat))
    cep = dct(feat, type=2, axis=1, norm="ortho")[:, :13]
    cep *= 1 + (22 / 2.0) * np.sin(np.pi * np.arange(13) / 22)
    cep[:, 0] = np.log(energy)
    return cep.T.astype(np.float32)


def lse(net, frames: np.ndarray, wav: np.ndarray, vshift: int = 15, batch: int = 20) -> dict[str, float]:
    """LSE-D (min mean distance) / LSE-C (confidence) / offset as syncnet_python's evaluate:
    frames [N,224,224,3] uint8 RGB face crops at 25 fps, wav [samples] float at 16 kHz."""
    import torch

    frames = as_video(frames)[..., ::-1]  # syncnet_python reads BGR frames
    cc = mfcc_13(wav)  # [13,T]
    last = min(len(frames), len(wav) // 640) - 5
    if last < 1:
        return {"lse_d": math.nan, "lse_c": math.nan, "offset": math.nan}
    vid = torch.from_numpy(np.ascontiguousarray(frames.transpose(3, 0, 1, 2))).float()  # [3,N,H,W]
    aud = torch.from_numpy(cc)  # [13,T]
    im_feat, cc_feat = [], []
    with torch.inference_mode():
        for i in range(0, last, batch):
            ks = range(i, min(last, i + batch))
            im_feat.append(net.forward_lip(torch.stack([vid[:, k : k + 5] for k in ks])))
            cc_feat.append(net.forward_aud(torch.stack([aud[None, :, 4 * k : 4 * k + 20] for k in ks])))
        f1, f2 = torch.cat(im_feat), torch.cat(cc_feat)
        win = 2 * vshift + 1
        f2p = torch.nn.functional.pad(f2, (0, 0, vshift, vshift))
        dists = torch.stack(
            [torch.nn.functional.pairwise_distance(f1[[i]].repeat(win, 1), f2p[i : i + win]) for i in range(len(f1))], 1
        )  # [win,L]
    mdist = dists.mean(1)
    minval, minidx = torch.min(mdist, 0)
    return {"lse_d": float(minval), "lse_c": float(mdist.median() - minval), "offset": float(vshift - int(minidx))}
