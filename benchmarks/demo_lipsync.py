"""Do the lips of a rendered demo open and close with the speech? (No ground truth needed.)

    python -m rt_engine.render --identity rt_engine/assets/identity.jpg --audio rt_engine/assets/speech.flac \\
        --aligned --pose still --save-raw runs/demo.npz
    python -m benchmarks.demo_lipsync runs/demo.npz rt_engine/assets/speech.flac --out benchmarks/out/demo_lipsync \\
        --photo rt_engine/assets/identity.jpg --aligned

From the raw frames of ``render --save-raw``: 68-point landmarks (benchmarks.metrics), the
mouth-opening curve (inner-lip gap / eye width), its range, and the audio-to-mouth offset found by
cross-correlating it with the speech-band energy of the audio (with a z-score against circularly
shifted audio: how far the real alignment stands above chance). Writes ``result.json``,
``lipsync.png`` (mouth crops over time above the two curves) and ``closed_open.png`` (the most
closed and the most open frames, at least 0.2 s apart: what the lips do, at a glance). With
``--photo`` (the identity image of the render; ``--aligned`` as given to render) also ``look.png``:
one row, the photo as the network sees it | the most closed mouth | the most open | the most turned
head (yaw proxy: nose tip off the eye-corner midpoint), picks at least 0.2 s apart. The picks are
in ``result.json`` under ``look`` either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from benchmarks import metrics as M
from rt_engine.inputs.landmarks import EYE_OUTER

NOSE_TIP = 30  # dlib 68-point nose tip

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


def yaw_proxy(lm: np.ndarray) -> np.ndarray:
    """Head turn per frame from 68-point landmarks [N,68,2] -> [N] (NaN where no face).

    The offset of the nose tip (point 30) from the midpoint of the outer eye corners (36, 45),
    measured along the eye axis and divided by the inter-ocular distance: 0 for a frontal face,
    positive when the nose is nearer point 45 (image right). Unaffected by in-plane roll, scale and
    position; a proxy, not degrees (it grows roughly like tan(yaw))."""
    lm = np.asarray(lm, np.float64)
    a, b, nose = lm[:, EYE_OUTER[0]], lm[:, EYE_OUTER[1]], lm[:, NOSE_TIP]
    axis = b - a
    d2 = np.maximum((axis**2).sum(-1), 1e-12)
    return ((nose - (a + b) / 2) * axis).sum(-1) / d2


def pick_look(mouth: np.ndarray, yaw: np.ndarray, gap: int = 5) -> dict[str, int | None]:
    """-> frame indices {"closed", "open", "turned"} (None: no frame with a face left): the most
    open mouth, then the most closed, then the largest |yaw|, each at least ``gap`` frames from the
    ones picked before it (falling back to any frame when none is that far)."""
    picks: dict[str, int | None] = {}

    def away(x: np.ndarray) -> np.ndarray:
        x = np.array(x, np.float64)
        for j in picks.values():
            if j is not None:
                x[max(0, j - gap + 1) : j + gap] = np.nan
        return x

    turn = np.where(np.isfinite(mouth), np.abs(yaw), np.nan)  # frames with a face on both counts
    for name, curve, which in (("open", mouth, 1), ("closed", mouth, 0), ("turned", turn, 1)):
        idx = pick_extremes(away(curve), 1, gap)[which] or pick_extremes(np.asarray(curve, np.float64), 1, gap)[which]
        picks[name] = idx[0] if idx else None
    return {k: picks[k] for k in ("closed", "open", "turned")}


def look_row(
    photo_u8: np.ndarray, frames_u8: np.ndarray, picks: list[tuple[int | None, str]], size: int | None = None
) -> np.ndarray:
    """Photo [h,w,3] u8 and frames [N,H,W,3] u8 -> one row [size, (1 + len(picks)) * size, 3] u8:
    the photo captioned "photo", then frame i captioned with its text for each (i, text) of
    ``picks`` (a black cell where i is None). ``size`` defaults to the frame height."""
    size = size or frames_u8.shape[1]
    cells = [M.labelled_cell(photo_u8, "photo", size)]
    for i, text in picks:
        frame = frames_u8[i] if i is not None else np.zeros((size, size, 3), np.uint8)
        cells.append(M.labelled_cell(frame, text, size))
    return np.concatenate(cells, 1)


def look(
    frames_u8: np.ndarray, frame_inds: np.ndarray, mouth: np.ndarray, yaw: np.ndarray
) -> tuple[dict, list[tuple[int | None, str]]]:
    """-> (the picks for result.json, (index, caption) per cell of ``look_row``)."""
    picks = pick_look(mouth, yaw)
    res: dict = {"yaw_proxy": "nose tip off the outer eye-corner midpoint / eye distance"}
    cells: list[tuple[int | None, str]] = []
    for name, i in picks.items():
        if i is None:
            res[name] = None
            cells.append((None, f"{name}: no face"))
            continue
        t = float(frame_inds[i]) / FPS
        res[name] = {
            "index": i,
            "frame": int(frame_inds[i]),
            "t": round(t, 3),
            "mouth": float(mouth[i]),
            "yaw": float(yaw[i]),
        }
        value = f"{mouth[i]:.3f}" if name != "turned" else f"yaw {yaw[i]:+.2f}"
        cells.append((i, f"{name} {value} {t:.2f}s"))
    return res, cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.demo_lipsync",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("raw", help=".npz written by python -m rt_engine.render --save-raw")
    ap.add_argument("audio", help="the audio the demo was rendered with")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--photo", help="the identity image (or video) the demo was rendered from: writes look.png")
    ap.add_argument("--aligned", action="store_true", help="as given to render: the photo is an aligned 224 crop")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    from rt_engine.inputs.audio import load_audio

    d = np.load(args.raw)
    frames = M.to_uint8_frames(d["frames"])  # [N,H,W,3]
    wav = load_audio(args.audio)
    res, lm, mouth, energy = analyse(frames, d["frame_inds"], wav)
    res.update({"raw": args.raw, "audio": args.audio})
    res["look"], cells = look(frames, d["frame_inds"], mouth, yaw_proxy(lm))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.photo:
        import cv2

        from rt_engine.inputs.image import official_crop
        from rt_engine.render import load_identity

        photo = official_crop(load_identity(args.photo, args.aligned))  # what the identity encoder sees
        cv2.imwrite(str(out / "look.png"), look_row(photo, frames, cells)[..., ::-1])
        res["look"]["photo"] = args.photo
    (out / "result.json").write_text(json.dumps(res, indent=1))
    plot(out / "lipsync.png", frames, mouth, energy)
    closed_open_sheet(out / "closed_open.png", frames, mouth)
    log.info("%s", json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
