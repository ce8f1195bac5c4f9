"""Talking-face quality in the PC-AVS self-driven setting (paper Tables 1 and 3), offline.

    python -m benchmarks.quality --clips ../shared/data/demo.csv --checkpoint PATH --out benchmarks/out/q

For every clip (a ``talking_video`` / ``frames_dir`` row of a data CSV, or a video / frames folder
in a directory): face-crop to the VoxCeleb2 framing (rt_engine.inputs.face), 25 fps, 16 kHz; then
identity = the clip's first frame, audio = the clip's own, pose = the clip's own frames, and the
generated frames are compared with the ground-truth frames of the same index (official indexing:
target frames i = 2 .. T//4 - 3). Frames are compared in the network's view (rows 0:192 and
columns 16:208 of the aligned crop, resized to 224: what the generator outputs).

Methods in one run: ground truth vs itself (the metric ceiling), a still image (the identity frame
repeated), the model with the pose fixed to the identity frame's ("fixed pose") and the model.
Outputs under --out: report.md (paper-style table), results.json (per clip), plots/*.png
(mouth-opening curves) and plots/*_frames.jpg (a contact sheet: ground truth, then each method, at
the same evenly spaced frames). The sheets show the evaluated footage, so they are git-ignored: keep
them local unless the footage may be published. Clips without a detectable face or without audio
are skipped with a reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from benchmarks import metrics as M

log = logging.getLogger(__name__)

FPS = 25
SR = 16000
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".m4a", ".ogg")
METHODS = ("gt", "still", "fixed_pose", "model", "true_opening")
DEFAULT_METHODS = METHODS[:4]
METHOD_NAMES = {
    "gt": "Ground truth (ceiling)",
    "still": "Still image",
    "fixed_pose": "Ours, fixed pose",
    "model": "Ours",
    "true_opening": "Ours, driven by the real opening",
}
MIN_FRAMES = 10


class SkipClip(Exception):
    """A clip that cannot be evaluated; the message is the reason written to the report."""


@dataclass
class ClipSpec:
    name: str
    video: Path | None = None  # video file
    frames_dir: Path | None = None  # folder of frames (25 fps)
    audio: Path | None = None  # separate audio file (None: the video's own track)
    fps: float | None = None
    skip: str | None = None  # reason known before loading


@dataclass
class Clip:
    name: str
    frames: np.ndarray  # [N,224,224,3] uint8 RGB aligned crops at 25 fps
    wav: np.ndarray  # [S] float32 16 kHz mono
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------ clip discovery
def _companion_audio(row: dict, rows: list[dict], root: Path) -> Path | None:
    """The separate audio of a video/frames row, from notes like 'aligned 16k wav at X' / 'audio: X'."""
    m = re.search(r"(?:wav at|audio:)\s*([^\s;(,]+)", row.get("notes", ""))
    if not m:
        return None
    ref = m.group(1)
    stem = Path(ref.split("!")[-1]).stem
    cands = [r for r in rows if r["kind"] == "speech_audio" and r.get("repo") == row.get("repo")]
    for r in cands:
        if r.get("path_in_repo") == ref:
            return root / r["file"]
    for r in cands:
        if Path(r["file"]).stem == stem:
            return root / r["file"]
    return None


def clips_from_csv(path: Path) -> list[ClipSpec]:
    root = path.parent
    rows = []
    for p in sorted(root.glob("*.csv")):  # companion audio may be listed in a sibling CSV
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    with open(path, newline="") as f:
        mine = list(csv.DictReader(f))
    specs = []
    for r in mine:
        if r["kind"] not in ("talking_video", "frames_dir"):
            continue
        name = r["file"]
        fps = float(r["fps"]) if r.get("fps") else None
        spec = ClipSpec(name=name, fps=fps)
        if r["kind"] == "frames_dir":
            spec.frames_dir = root / r["file"]
        else:
            spec.video = root / r["file"]
        spec.audio = _companion_audio(r, rows, root)
        notes = r.get("notes", "")
        if spec.audio is None and (
            re.search(r"\bno audio\b|no usable audio|silent", notes, re.I)
            or (r["kind"] == "frames_dir" and not r.get("audio_sr"))
        ):
            spec.skip = f"no audio (CSV notes: {notes[:90]})"
        specs.append(spec)
    return specs


def clips_from_dir(path: Path) -> list[ClipSpec]:
    specs = []
    for p in sorted(path.iterdir()):
        audio = next((p.with_suffix(e) for e in AUDIO_EXTS if p.with_suffix(e).is_file()), None)
        if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
            specs.append(ClipSpec(name=p.name, video=p, audio=audio))
        elif p.is_dir() and any(f.suffix.lower() in IMAGE_EXTS for f in p.iterdir()):
            spec = ClipSpec(name=p.name + "/", frames_dir=p, audio=audio, fps=FPS)
            if audio is None:
                spec.skip = f"no audio: frames folder without {p.name}.wav/.flac beside it"
            specs.append(spec)
    return specs


def clip_specs(src: Path) -> list[ClipSpec]:
    """``--clips``: a folder of clips or a data CSV -> its clips."""
    if src.is_dir():
        return clips_from_dir(src)
    if src.is_file():
        return clips_from_csv(src)
    raise SystemExit(f"error: --clips {src} not found")


# ------------------------------------------------------------------ loading
def _video_frames_25fps(path: Path, max_frames: int | None) -> Iterator[np.ndarray]:
    """A video at 25 fps, decoded by the inference code (:func:`rt_engine.inputs.pose.iter_video`:
    nearest earlier frame); yields [H,W,3] RGB. Unreadable videos are skipped with the reason."""
    from rt_engine.errors import InputError
    from rt_engine.inputs.pose import iter_video

    try:
        yield from iter_video(path, FPS, max_frames)
    except InputError as e:
        raise SkipClip(str(e)) from None


def _dir_frames(path: Path, max_frames: int | None) -> Iterator[np.ndarray]:
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    for f in files[:max_frames]:
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is None:
            raise SkipClip(f"unreadable frame {f.name}")
        yield cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_audio(spec: ClipSpec) -> np.ndarray:
    """[S] float32 mono 16 kHz from the companion file or the video's audio track, decoded by the
    inference code (:func:`rt_engine.inputs.audio.load_audio`)."""
    from rt_engine.errors import InputError
    from rt_engine.inputs import audio as audio_in

    src = spec.audio if spec.audio is not None else spec.video
    if src is None:
        raise SkipClip("no audio")
    try:
        return audio_in.load_audio(src, SR)
    except InputError as e:
        raise SkipClip(f"unreadable audio: {e}") from None


def load_clip(spec: ClipSpec, cropper, max_frames: int | None) -> Clip:
    """Decode, face-crop (unless already aligned) and resample one clip."""
    from rt_engine.errors import InputError
    from rt_engine.inputs.face import looks_aligned

    if spec.skip:
        raise SkipClip(spec.skip)
    wav = load_audio(spec)
    rms = float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if len(wav) else 0.0
    if rms < 10 ** (-50 / 20):
        raise SkipClip(f"audio is silent (RMS {20 * math.log10(max(rms, 1e-12)):.0f} dBFS)")
    if spec.frames_dir is not None:
        src = _dir_frames(spec.frames_dir, max_frames)  # folders are 25 fps already
    else:
        src = _video_frames_25fps(spec.video, max_frames)
    first = next(src, None)
    if first is None:
        raise SkipClip("no frames")
    aligned = first.shape[:2] == (224, 224) and looks_aligned(first, cropper)

    def chain() -> Iterator[np.ndarray]:
        yield first
        yield from src

    try:
        if aligned:
            frames = np.stack(list(chain()))
        else:
            frames = cropper.crop_video(chain(), spec.name)
    except InputError as e:  # NoFaceError included
        raise SkipClip(str(e)) from e
    n_audio = len(wav) // (SR // FPS)
    return Clip(
        spec.name,
        frames,
        wav,
        {
            "n_frames": len(frames),
            "audio_s": round(len(wav) / SR, 2),
            "audio_frames": n_audio,
            "already_aligned": aligned,
        },
    )


# ------------------------------------------------------------------ evaluation
def model_view(frames: np.ndarray) -> np.ndarray:
    """Aligned crops [N,224,224,3] -> what the generator outputs: rows 0:192, cols 16:208, resized
    to 224 (cv2 bilinear on uint8, as the official preprocessing)."""
    return np.stack([cv2.resize(np.ascontiguousarray(f[0:192, 16:208]), (224, 224)) for f in frames])


def target_indices(n_samples: int, n_frames: int, max_frames: int | None) -> np.ndarray:
    """Official target frames i = 2 .. T//4 - 3 with T = ceil(S/160) + 7, limited to the clip."""
    t = math.ceil(n_samples / 160) + 7
    inds = np.arange(2, t // 4 - 2)
    inds = inds[inds < n_frames]
    return inds[:max_frames] if max_frames else inds


@dataclass
class Reference:
    inds: np.ndarray  # [M] target frame indices
    frames: np.ndarray  # [M,224,224,3] ground truth in the network view
    lm: np.ndarray  # [M,68,2]
    mouth: np.ndarray  # [M]
    energy: np.ndarray  # [M] speech-band log energy
    wav: np.ndarray  # [S]
    emb_idx: np.ndarray  # [K] positions (into inds) used for the identity embedding
    emb: np.ndarray  # [K,128]


@dataclass
class Options:
    cpbd_frames: int = 25
    csim_frames: int = 12
    max_lag: int = 8
    shuffles: int = 100


def make_reference(clip: Clip, analyzer: M.FaceAnalyzer, max_frames: int | None, opts: Options) -> Reference:
    inds = target_indices(len(clip.wav), len(clip.frames), max_frames)
    if len(inds) < MIN_FRAMES:
        raise SkipClip(
            f"too short: {len(inds)} target frames (audio {len(clip.wav) / SR:.2f} s, {len(clip.frames)} video frames)"
        )
    gt = model_view(clip.frames[inds])
    lm = analyzer.landmarks(gt)
    found = np.isfinite(lm[:, 0, 0]).mean()
    if found < 0.5:
        raise SkipClip(f"no detectable face in {100 * (1 - found):.0f}% of the ground-truth frames")
    emb_idx = np.unique(np.linspace(0, len(inds) - 1, min(opts.csim_frames, len(inds))).round().astype(int))
    energy = M.speech_energy(clip.wav, SR, len(clip.frames))[inds]
    return Reference(
        inds, gt, lm, M.mouth_opening(lm), energy, clip.wav, emb_idx, analyzer.embeddings(gt[emb_idx], lm[emb_idx])
    )


def evaluate(
    gen: np.ndarray, ref: Reference, analyzer: M.FaceAnalyzer, opts: Options, syncnet=None, identical: bool = False
) -> tuple[dict, np.ndarray]:
    """Metrics of generated frames [M,224,224,3] (aligned with ref.inds) -> (dict, mouth curve [M])."""
    lm = ref.lm if identical else analyzer.landmarks(gen)
    mouth = M.mouth_opening(lm)
    emb = ref.emb if identical else analyzer.embeddings(gen[ref.emb_idx], lm[ref.emb_idx])
    lag, lag_corr = M.curve_offset(mouth, ref.mouth, opts.max_lag)
    av = M.av_offset(ref.energy, mouth, opts.max_lag, opts.shuffles)
    vs = M.correlation_vs_shifted(mouth, ref.mouth, 2 * opts.max_lag, 2 * opts.shuffles)
    res = {
        "frames": int(len(gen)),
        "face_found": float(np.isfinite(lm[:, 0, 0]).mean()),
        "ssim": M.ssim(gen, ref.frames),
        "psnr": M.psnr(gen, ref.frames),
        "cpbd": M.cpbd_sharpness(gen, opts.cpbd_frames),
        "lmd_mouth": M.lmd(lm, ref.lm, M.MOUTH),
        "lmd_pose": M.lmd(lm, ref.lm, M.JAW),
        "csim_dlib": M.cosine_similarity(emb, ref.emb),
        "mouth_corr": vs["corr"],
        "mouth_corr_z": vs["z"],
        "mouth_corr_p": vs["p"],
        "mouth_span": M.opening_span_ratio(mouth, ref.mouth),
        "mouth_lag": lag,
        "mouth_lag_corr": lag_corr,
        "av_offset": av["offset"],
        "av_corr": av["corr"],
        "av_z": av["z"],
    }
    if syncnet is not None:
        seg = ref.wav[int(ref.inds[0]) * (SR // FPS) :]
        s = M.lse(syncnet, gen, seg)
        res.update({"lse_c": s["lse_c"], "lse_d": s["lse_d"], "lse_offset": s["offset"]})
    return res, mouth


def render_method(
    method: str, clip: Clip, ref: Reference, checkpoint: str | None, precision: str, mouth_gain: float = 1.0
) -> np.ndarray:
    """Runs the model; returns generated frames [M,224,224,3] aligned with ref.inds."""
    from rt_engine.config import NoiseMode
    from rt_engine.render import render_arrays

    pose = "still" if method == "fixed_pose" else clip.frames
    extra = {}
    if method == "true_opening":
        extra["opening"] = true_opening(ref)
    res = render_arrays(
        identity=clip.frames[0],
        audio=clip.wav,
        pose=pose,
        checkpoint=checkpoint,
        aligned=True,
        noise=NoiseMode.STORED,
        precision=precision,
        frontalize=False,
        max_frames=int(ref.inds[-1]) - 1,
        mouth_gain=mouth_gain,
        **extra,
    )
    out = M.to_uint8_frames(res.frames)  # [N,224,224,3]
    pos = {int(i): k for k, i in enumerate(res.frame_inds)}
    missing = [int(i) for i in ref.inds if int(i) not in pos]
    if missing:
        raise RuntimeError(f"model did not generate target frames {missing[:5]}")
    if out.shape[1:3] != ref.frames.shape[1:3]:
        out = np.stack([cv2.resize(f, ref.frames.shape[1:3][::-1], interpolation=cv2.INTER_AREA) for f in out])
    return out[[pos[int(i)] for i in ref.inds]]


def true_opening(ref: Reference) -> np.ndarray:
    """The real mouth opening of the clip's target frames, z-scored over the clip (the scale of the
    warp_open training labels) -> [ref.inds[-1] + 1] by video frame; 0 (average) where no face was found
    and at frames that are not evaluated."""
    z = np.zeros(int(ref.inds[-1]) + 1, np.float32)
    m = np.asarray(ref.mouth, np.float64)
    ok = np.isfinite(m)
    if ok.sum() >= 2 and m[ok].std() > 0:
        z[ref.inds[ok]] = (m[ok] - m[ok].mean()) / m[ok].std()
    return z


def plot_curves(path: Path, name: str, ref: Reference, curves: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, height_ratios=[3, 1])
    if "gt" not in curves:  # the real mouth, always: it is what every other curve is compared with
        ax.plot(ref.inds, ref.mouth, label="Ground truth", lw=1.8, color="k")
    for m, c in curves.items():
        ax.plot(ref.inds, c, label=METHOD_NAMES[m], lw=1.8 if m == "gt" else 1.0, color="k" if m == "gt" else None)
    ax.set_ylabel("mouth opening\n(inner-lip gap / eye width)")
    ax.set_title(name)
    ax.legend(fontsize=8, loc="upper right")
    ax2.plot(ref.inds, M.highpass(ref.energy), color="tab:gray", lw=0.8)
    ax2.set_ylabel("speech energy\n(high-passed)")
    ax2.set_xlabel("frame (25 fps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def contact_sheet(rows: dict[str, np.ndarray], inds: np.ndarray, n: int = 6, size: int = 128) -> np.ndarray:
    """One row per method (frames [M,H,W,3] aligned with ``inds``), ``n`` evenly spaced columns, each
    cell ``size`` px with its method and frame index written on it -> RGB uint8 [rows*size, n*size, 3]."""
    cols = np.linspace(0, len(inds) - 1, n).round().astype(int)
    out = []
    for name, frames in rows.items():
        out.append(np.concatenate([M.labelled_cell(frames[c], f"{name} {int(inds[c])}", size) for c in cols], 1))
    return np.concatenate(out, 0)


# ------------------------------------------------------------------ report
COLUMNS = [  # key, header, format
    ("ssim", "SSIM ↑", "{:.3f}"),
    ("psnr", "PSNR ↑", "{:.2f}"),
    ("cpbd", "CPBD ↑", "{:.3f}"),
    ("lmd_mouth", "LMD mouth ↓", "{:.2f}"),
    ("lmd_pose", "LMD pose (jaw) ↓", "{:.2f}"),
    ("csim_dlib", "dlib CSIM ↑", "{:.3f}"),
    ("mouth_corr", "Mouth corr ↑", "{:.3f}"),
    ("mouth_corr_z", "Mouth corr z ↑", "{:.2f}"),
    ("mouth_corr_p", "Mouth corr p ↓", "{:.3f}"),
    ("mouth_span", "Mouth span ×", "{:.2f}"),
    ("mouth_lag", "Mouth lag", "{:+.1f}"),
    ("av_offset", "AV offset", "{:+.1f}"),
    ("av_z", "AV z ↑", "{:.2f}"),
    ("lse_c", "LSE-C ↑", "{:.2f}"),
    ("lse_d", "LSE-D ↓", "{:.2f}"),
    ("face_found", "Face found", "{:.0%}"),
]


def _fmt(v, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f.format(v)


def _mean(vals: list) -> float:
    """Mean of the finite values; inf when all defined values are inf (identical frames' PSNR)."""
    vals = [float(v) for v in vals if v is not None and not math.isnan(float(v))]
    finite = [v for v in vals if math.isfinite(v)]
    if finite:
        return float(np.mean(finite))
    return math.inf if vals else math.nan


def _worst_p(vals: list) -> float:
    """The largest finite p-value (the weakest clip's), NaN if none."""
    ps = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    return max(ps) if ps else math.nan


SUMMARY = {"mouth_corr_p": _worst_p}  # columns averaged otherwise (_mean)


def summarize(clips: list[dict], methods: list[str]) -> dict:
    out = {}
    for m in methods:
        rows = [
            c["methods"][m] for c in clips if isinstance(c["methods"].get(m), dict) and "error" not in c["methods"][m]
        ]
        if rows:
            out[m] = {k: SUMMARY.get(k, _mean)([r.get(k) for r in rows]) for k, _, _ in COLUMNS} | {"clips": len(rows)}
    return out


def write_report(out: Path, result: dict) -> Path:
    cols = [c for c in COLUMNS if c[0] not in ("lse_c", "lse_d") or result["syncnet"]]
    gain = result.get("mouth_gain", 1.0)
    lines = [
        "# Talking-face quality (PC-AVS self-driven setting)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Checkpoint: {result['checkpoint']}{'' if gain == 1.0 else f', mouth gain {gain}'}. "
        f"Clips evaluated: {len(result['clips'])}, "
        f"skipped: {len(result['skipped'])}. Generated {result['date']} in {result['seconds']:.0f} s.",
        "",
        "## Averages over clips (paper Table 1 / Table 3 metrics)",
        "",
        "| Method | " + " | ".join(h for _, h, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for m, row in result["summary"].items():
        lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(_fmt(row.get(k), f) for k, _, f in cols) + " |")
    if result.get("pooled"):
        lines += [
            "",
            "## Mouth corr pooled over clips",
            "",
            "Mean of the per-clip mouth correlations, a clip without one (no face drawn, a still "
            "mouth) counting as 0, against the same mean with every clip's real curve shifted out "
            "of step (1000 draws).",
            "",
            "| Method | Mean mouth corr | z | p | Clips | Counted as 0 |",
            "|---|---|---|---|---|---|",
        ]
        for m, r in result["pooled"].items():
            lines.append(
                f"| {METHOD_NAMES[m]} | {_fmt(r['mean_corr'], '{:.3f}')} | {_fmt(r['z'], '{:.2f}')} | "
                f"{_fmt(r['p'], '{:.3f}')} | {r['clips']} | {r['undefined']} |"
            )
    lines += ["", "## Per clip", ""]
    for c in result["clips"]:
        lines += [
            f"### {c['name']}",
            "",
            f"{c['info'].get('n_frames')} frames at 25 fps, {c['n_target']} target frames "
            f"({c['inds'][0]}..{c['inds'][-1]}), audio {c['info'].get('audio_s')} s, "
            f"{'already aligned' if c['info'].get('already_aligned') else 'face-cropped'}; "
            f"plot: `{c['plot']}`, frames: `{c.get('frames_sheet', '-')}`",
            "",
            "| Method | " + " | ".join(h for _, h, _ in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for m, r in c["methods"].items():
            if "error" in r:
                lines.append(f"| {METHOD_NAMES[m]} | not run: {r['error']} |" + " |" * (len(cols) - 1))
            else:
                lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(_fmt(r.get(k), f) for k, _, f in cols) + " |")
        lines.append("")
    if result["skipped"]:
        lines += ["## Skipped clips", ""] + [f"- `{s['name']}`: {s['reason']}" for s in result["skipped"]] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


NOTES = [
    "Self-driven setting: identity = first frame of the clip, audio and pose = the clip's own; frames "
    "compared in the network view (aligned crop rows 0:192, cols 16:208, resized to 224).",
    "SSIM / PSNR: scikit-image, vs the ground-truth frame of the same index. CPBD: cpbd-py312 on up to "
    "25 evenly spaced frames.",
    "LMD: mean distance in pixels (224x224) of dlib 68-point landmarks (mouth 48-67; pose = jaw 0-16), "
    "faces located with mediapipe boxes.",
    "dlib CSIM: cosine similarity of dlib ResNet face descriptors (generated vs ground-truth frame), "
    "not the ArcFace CSIM of the paper.",
    "Mouth corr: correlation of the mouth-opening curves (inner-lip gap / outer eye-corner distance) of "
    "generated and ground-truth frames; Mouth lag: frames by which the generated curve trails the "
    "ground truth (best lag within ±8). Mouth corr z / p: that correlation against the ground-truth "
    "curve circularly shifted by 16 frames or more (200 shifts): a mouth that moves like the real one "
    "but out of step; p is one-sided, and the averages row shows the largest p of its clips. Mouth "
    "span ×: how far the mouth moves, (p90 - p10) of the generated opening over that of the ground "
    "truth (1 = as far as the real speaker, 0 = still).",
    "AV offset: lag (frames, + = mouth after audio) maximising the correlation of high-passed "
    "300-3000 Hz speech energy with mouth opening; AV z: that peak vs 100 circularly shifted audio "
    "curves (z-score). A still image has no mouth motion: AV/corr undefined (–).",
]


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clips", required=True, help="data CSV (train.csv / demo.csv) or a folder of clips")
    ap.add_argument("--checkpoint", default=None, help="model checkpoint (default: the bundled model)")
    ap.add_argument("--out", required=True, help="output folder (report.md, results.json, plots/)")
    ap.add_argument("--max-clips", type=int, default=None, help="evaluate at most N clips")
    ap.add_argument("--max-frames", type=int, default=None, help="at most N target frames per clip")
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma list of {', '.join(METHODS)} (true_opening: warp_open models only, fp32 torch; the "
        "real clip's mouth opening, z-scored over the clip, replaces the one read off the speech: how far "
        "the generator opens the mouth when told exactly how far)",
    )
    ap.add_argument("--syncnet", default=None, help="SyncNet weights (syncnet_v2.model) for LSE-C / LSE-D")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--mouth-gain", type=float, default=1.0, help="the model's mouth gain (1: as trained)")
    ap.add_argument("--cpbd-frames", type=int, default=25)
    ap.add_argument("--csim-frames", type=int, default=12)
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def run(args: argparse.Namespace, command: str) -> dict:
    from tqdm import tqdm

    from rt_engine.inputs.face import FaceCropper

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"error: unknown method(s) {bad}; choose from {METHODS}")
    specs = clip_specs(Path(args.clips))
    opts = Options(cpbd_frames=args.cpbd_frames, csim_frames=args.csim_frames)
    notes = list(NOTES)
    syncnet = None
    if args.syncnet:
        syncnet = M.build_syncnet(args.syncnet)
        notes.append(f"LSE-C / LSE-D: SyncNet weights {args.syncnet} (syncnet_python evaluation, vshift 15).")
    else:
        notes.append(
            "LSE-C / LSE-D not computed: no SyncNet weights given (--syncnet PATH to "
            "syncnet_v2.model); the SyncNet-free mouth corr / AV offset columns stand in."
        )
    model_error = None
    if any(m in methods for m in ("fixed_pose", "model", "true_opening")):
        try:
            from rt_engine.render import render_arrays  # noqa: F401
        except Exception as e:  # noqa: BLE001 - reported, the baselines still run
            model_error = f"rt_engine.render.render_arrays unavailable: {e}"
            notes.append(model_error)
    cropper = FaceCropper()
    analyzer = M.FaceAnalyzer(cropper)
    clips, skipped = [], []
    pairs: dict[str, list] = {m: [] for m in methods}  # per method, per clip: (gen mouth, real mouth) or None
    bar = tqdm(specs, unit="clip", disable=args.quiet)
    for spec in bar:
        if args.max_clips is not None and len(clips) >= args.max_clips:
            break
        bar.set_postfix_str(spec.name[-40:])
        try:
            clip = load_clip(spec, cropper, None if args.max_frames is None else args.max_frames + 8)
            ref = make_reference(clip, analyzer, args.max_frames, opts)
        except SkipClip as e:
            skipped.append({"name": spec.name, "reason": str(e)})
            log.info("skip %s: %s", spec.name, e)
            continue
        except Exception as e:  # noqa: BLE001 - one bad clip never stops the run
            skipped.append({"name": spec.name, "reason": f"error: {type(e).__name__}: {e}"})
            log.exception("skip %s", spec.name)
            continue
        entry = {
            "name": spec.name,
            "info": clip.info,
            "inds": [int(ref.inds[0]), int(ref.inds[-1])],
            "n_target": len(ref.inds),
            "methods": {},
        }
        curves, sheet = {}, {"gt": ref.frames}
        for m in methods:
            try:
                if m == "gt":
                    gen = ref.frames
                elif m == "still":
                    gen = np.repeat(model_view(clip.frames[:1]), len(ref.inds), 0)
                else:
                    if model_error:
                        raise RuntimeError(model_error)
                    t1 = time.time()
                    gen = render_method(m, clip, ref, args.checkpoint, args.precision, args.mouth_gain)
                    entry["info"][f"{m}_render_s"] = round(time.time() - t1, 1)
                res, curves[m] = evaluate(gen, ref, analyzer, opts, syncnet, identical=(m == "gt"))
                entry["methods"][m] = res
                sheet[m] = gen
                pairs[m].append((curves[m], ref.mouth))
            except Exception as e:  # noqa: BLE001
                entry["methods"][m] = {"error": f"{type(e).__name__}: {e}"[:300]}
                log.warning("%s / %s failed: %s", spec.name, m, e)
                pairs[m].append(None)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name).strip("_")
        plot = out / "plots" / f"{safe}.png"
        try:
            plot_curves(plot, spec.name, ref, curves)
            entry["plot"] = str(plot.relative_to(out))
        except Exception as e:  # noqa: BLE001
            entry["plot"] = f"failed: {e}"
        frames_png = out / "plots" / f"{safe}_frames.jpg"
        cv2.imwrite(str(frames_png), contact_sheet(sheet, ref.inds)[..., ::-1])
        entry["frames_sheet"] = str(frames_png.relative_to(out))
        clips.append(entry)
    cropper.close()
    result = {
        "command": command,
        "checkpoint": args.checkpoint or "bundled default",
        "mouth_gain": args.mouth_gain,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.time() - t0,
        "syncnet": bool(syncnet),
        "methods": methods,
        "summary": summarize(clips, methods),
        "pooled": {m: M.pooled_correlation_vs_shifted(pairs[m], 2 * opts.max_lag) for m in methods if pairs[m]},
        "clips": clips,
        "skipped": skipped,
        "notes": notes,
    }
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=1))
    write_report(out, result)
    return result


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):
        x = float(x)
        return None if math.isnan(x) else ("inf" if math.isinf(x) else x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    command = "python -m benchmarks.quality " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = run(args, command)
    print(f"wrote {Path(args.out) / 'report.md'} ({len(result['clips'])} clips, {len(result['skipped'])} skipped)")
    for m, row in result["summary"].items():
        print(f"  {METHOD_NAMES[m]:24s} " + "  ".join(f"{k}={_fmt(row.get(k), f)}" for k, _, f in COLUMNS[:10]))
    for m, r in result["pooled"].items():
        print(
            f"  pooled {METHOD_NAMES[m]:17s} mean_corr={_fmt(r['mean_corr'], '{:.3f}')} z={_fmt(r['z'], '{:.2f}')} "
            f"p={_fmt(r['p'], '{:.3f}')} ({r['undefined']} of {r['clips']} clips counted as 0)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
