"""Do the lips of a rendered demo open and close with the speech? (No ground truth needed.)

    python -m rt_engine.render --identity rt_engine/assets/identity.jpg --audio rt_engine/assets/speech.flac \\
        --aligned --pose still --save-raw runs/demo.npz
    python -m benchmarks.demo_lipsync runs/demo.npz rt_engine/assets/speech.flac --out benchmarks/out/demo_lipsync

From the raw frames of ``render --save-raw``: 68-point landmarks (benchmarks.metrics), the
mouth-opening curve (inner-lip gap / eye width), its range, and the audio-to-mouth offset found by
cross-correlating it with the speech-band energy of the audio (with a z-score against circularly
shifted audio: how far the real alignment stands above chance). Writes ``result.json``,
``lipsync.png`` (mouth crops over time above the two curves) and ``closed_open.png`` (the most
closed and the most open frames, at least 0.2 s apart: what the lips do, at a glance).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from benchmarks import metrics as M

log = logging.getLogger(__name__)
FPS = 25


def analyse(
    frames_u8: np.ndarray,
    frame_inds: np.ndarray,
    wav: np.ndarray,
    sr: int = 16000,
    analyzer: M.FaceAnalyzer | None = None,
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """frames [N,H,W,3] u8 at video indices ``frame_inds``; wav mono. -> (result, lm, mouth, energy)."""
    analyzer = analyzer or M.FaceAnalyzer()
    lm = analyzer.landmarks(frames_u8)  # [N,68,2]
    mouth = M.mouth_opening(lm)  # [N]
    n_video = int(frame_inds.max()) + 1
    energy = M.speech_energy(wav, sr, n_video)[frame_inds]  # [N]
    found = np.isfinite(mouth)
    res = {"frames": int(len(frames_u8)), "face_found": float(found.mean())}
    if found.sum() >= 10:
        m = mouth[found]
        res.update(
            {
                "mouth_open_p10": float(np.percentile(m, 10)),
                "mouth_open_p90": float(np.percentile(m, 90)),
                "mouth_open_std": float(m.std()),
            }
        )
        res["av"] = M.av_offset(energy, mouth)
    return res, lm, mouth, energy


def plot(path: Path, frames_u8: np.ndarray, mouth: np.ndarray, energy: np.ndarray, n_strip: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rt_engine.config import mouth_box

    y0, y1, x0, x1 = mouth_box(frames_u8.shape[1])
    crops = [frames_u8[k, y0:y1, x0:x1] for k in range(min(n_strip, len(frames_u8)))]
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.5), gridspec_kw={"height_ratios": [1, 1.4]})
    axes[0].imshow(np.concatenate(crops, axis=1))
    axes[0].set_axis_off()
    axes[0].set_title(f"mouth box, frames 0-{len(crops) - 1} ({len(crops) / FPS:.1f} s)", fontsize=9)
    t = np.arange(len(mouth)) / FPS
    z = (energy - np.nanmean(energy)) / max(np.nanstd(energy), 1e-9)
    zm = (mouth - np.nanmean(mouth)) / max(np.nanstd(mouth), 1e-9)
    axes[1].plot(t, z, lw=0.8, label="speech-band energy (z)")
    axes[1].plot(t, zm, lw=0.8, label="mouth opening (z)")
    axes[1].set_xlabel("s")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def pick_extremes(mouth: np.ndarray, n: int = 5, gap: int = 5) -> tuple[list[int], list[int]]:
    """Mouth opening [N] (NaN: no face) -> (indices of the n most closed frames, of the n most open),
    each list in time order, frames of one list at least ``gap`` apart."""

    def greedy(order: np.ndarray) -> list[int]:
        picked: list[int] = []
        for i in order:
            if np.isfinite(mouth[i]) and all(abs(int(i) - j) >= gap for j in picked):
                picked.append(int(i))
                if len(picked) == n:
                    break
        return sorted(picked)

    return greedy(np.argsort(mouth)), greedy(np.argsort(-mouth))  # NaN sorts last; greedy skips it


def closed_open_sheet(path: Path, frames_u8: np.ndarray, mouth: np.ndarray, n: int = 5, size: int = 160) -> None:
    """Two rows: the n most closed frames, the n most open ones, each labelled with its time and opening."""
    import cv2

    rows = []
    for name, idx in zip(("closed", "open"), pick_extremes(mouth, n), strict=True):
        cells = [M.labelled_cell(frames_u8[i], f"{name} {i / FPS:.2f}s {mouth[i]:.3f}", size) for i in idx]
        cells += [np.zeros((size, size, 3), np.uint8)] * (n - len(cells))
        rows.append(np.concatenate(cells, 1))
    cv2.imwrite(str(path), np.concatenate(rows, 0)[..., ::-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_lipsync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("raw", help=".npz written by python -m rt_engine.render --save-raw")
    ap.add_argument("audio", help="the audio the demo was rendered with")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from rt_engine.inputs.audio import load_audio

    d = np.load(args.raw)
    frames = M.to_uint8_frames(d["frames"])  # [N,H,W,3]
    wav = load_audio(args.audio)
    res, _, mouth, energy = analyse(frames, d["frame_inds"], wav)
    res.update({"raw": args.raw, "audio": args.audio})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=1))
    plot(out / "lipsync.png", frames, mouth, energy)
    closed_open_sheet(out / "closed_open.png", frames, mouth)
    log.info("%s", json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
