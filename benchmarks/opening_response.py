"""How far does a warp_open model open the mouth when told to, from a closed and from an open photo?

    python -m benchmarks.opening_response --clips runs/holdout_clips --out benchmarks/out/opening_response
    python -m benchmarks.opening_response --clips runs/holdout_clips --checkpoint runs/model.safetensors ...

Per clip (its first ``--frames`` frames): the real mouth opening (inner-lip gap / eye width, dlib,
the network's view) and its spread. Then its most closed and its most open frame each serve as the
photo, and the model draws it with the opening channel held at z = -2 .. 3 (the photo's pose, fp32
torch). The slope of the drawn opening over z, divided by the real opening's standard deviation, is
the **response**: 1 means one unit of the channel moves the drawn mouth as far as one standard
deviation of the real speaker's. The mouth span of ``benchmarks.quality`` cannot exceed what the
photo's response allows, and most photos show a closed mouth. Writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import metrics as M
from benchmarks import quality as Q

log = logging.getLogger(__name__)

LEVELS = (-2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # opening channel values (z-score units)
DRAWN = 12  # frames drawn per level (their mean opening counts)


def drawn_opening(runner, photo: np.ndarray, wav: np.ndarray, analyzer, level: float) -> float:
    """photo [224,224,3] u8 aligned crop -> mean opening of DRAWN frames drawn at opening ``level``."""
    from rt_engine.render import render_arrays

    res = render_arrays(
        identity=photo,
        audio=wav[: 16000 * 2],  # 2 s: enough audio for DRAWN frames
        pose="still",
        runner=runner,
        aligned=True,
        max_frames=DRAWN,
        opening=np.full(64, level, np.float32),
    )
    return float(np.nanmean(M.mouth_opening(analyzer.landmarks(M.to_uint8_frames(res.frames)))))


def clip_response(runner, clip: Q.Clip, analyzer, frames: int) -> dict:
    """One clip -> its real opening spread and the response from its most closed / most open frame."""
    real = M.mouth_opening(analyzer.landmarks(Q.model_view(clip.frames[:frames])))  # [N]
    ok = np.isfinite(real)
    if ok.sum() < 10:
        raise Q.SkipClip(f"a face in only {int(ok.sum())} of {len(real)} frames")
    std = float(real[ok].std())
    out = {
        "frames": int(len(real)),
        "real_std": std,
        "real_p10_p90": [float(v) for v in np.percentile(real[ok], [10, 90])],
    }
    for name, pick in (("closed_photo", np.nanargmin), ("open_photo", np.nanargmax)):
        i = int(pick(real))
        drawn = [drawn_opening(runner, clip.frames[i], clip.wav, analyzer, z) for z in LEVELS]
        slope = float(np.polyfit(LEVELS, drawn, 1)[0])
        out[name] = {
            "frame": i,
            "photo_opening": float(real[i]),
            "drawn": dict(zip([f"{z:+g}" for z in LEVELS], drawn, strict=True)),
            "slope": slope,
            "response": slope / std if std > 0 else None,
        }
    return out


def pair_fit(model, store, analyzer, pairs: int, seed: int = 0) -> dict:
    """``pairs`` (reference, target) pairs of ``store`` (training.data.ClipStore, labelled clips), the
    target's opening told to ``model`` -> least squares drawn ~ a * target + b * reference + c over the
    measured openings (inner-lip gap / eye width), with the correlations and the pair count."""
    import torch

    from rt_engine.config import NoiseMode
    from training.data import Batcher

    batcher = Batcher(store, 8, 0, 5, seed, negatives=False)
    drawn, target, ref = [], [], []
    with torch.no_grad():
        for step in range(-(-pairs // 8)):
            b = batcher.batch(step)
            id0, id1 = model.encode_identity(b["ref"])  # [8,...]
            style = model.make_style(id0, model.encode_mouth(b["mel"]), model.encode_pose(b["target"]))  # [8,S]
            fake = model.generate(style, id1, NoiseMode.STORED, opening=torch.nan_to_num(b["opening"]))  # [8,3,S,S]
            for out, x in ((drawn, fake), (target, b["target"]), (ref, b["ref"])):
                out.append(M.to_uint8_frames(x.float().numpy()))  # [8,S,S,3]
    d, t, r = (M.mouth_opening(analyzer.landmarks(np.concatenate(x)[:pairs])) for x in (drawn, target, ref))
    return fit_openings(d, t, r)


def fit_openings(drawn: np.ndarray, target: np.ndarray, ref: np.ndarray) -> dict:
    """Openings [N] of drawn, target and reference frames (NaN: no face) -> least squares
    drawn ~ target * a + reference * b + intercept over the rows without NaN, with the correlations."""
    ok = np.isfinite(drawn) & np.isfinite(target) & np.isfinite(ref)
    d, t, r = (np.asarray(x, np.float64)[ok] for x in (drawn, target, ref))
    if len(d) < 10:
        raise Q.SkipClip(f"a face in only {len(d)} of {len(ok)} pairs")
    a, b, c = np.linalg.lstsq(np.stack([t, r, np.ones_like(t)], 1), d, rcond=None)[0]
    return {
        "pairs": int(len(d)),
        "target": float(a),
        "reference": float(b),
        "intercept": float(c),
        "corr_target": float(np.corrcoef(d, t)[0, 1]),
        "corr_reference": float(np.corrcoef(d, r)[0, 1]),
    }


def run_pairs(args: argparse.Namespace, model, analyzer) -> dict:
    """--pairs: pair_fit of ``model`` (fp32) on the trained identities and on the held-out ones of the
    cache; a group with too few faces found is reported as skipped."""
    from training.data import ClipStore, read_holdout, read_index

    held = read_holdout(args.holdout)
    clips = [e for e in read_index(args.pairs) if e["has_audio"]]
    out = {}
    for name, ids in (
        ("trained", {e["id"] for e in clips if e["identity"] not in held}),
        ("held_out", {e["id"] for e in clips if e["identity"] in held}),
    ):
        if not ids:
            continue
        store = ClipStore(args.pairs, only_ids=ids)
        if not store.has_opening:
            raise SystemExit(f"error: {args.pairs} has no mouth labels (python -m training.mouth_labels {args.pairs})")
        try:
            out[name] = pair_fit(model, store, analyzer, args.num_pairs)
        except Q.SkipClip as e:
            out[name] = {"skipped": str(e)}
        log.info("pairs %s: %s", name, out[name])
    return out


def run(args: argparse.Namespace, command: str) -> dict:
    from tqdm import tqdm

    from rt_engine.inputs.face import FaceCropper
    from rt_engine.render import make_runner

    t0 = time.time()
    runner = make_runner(args.checkpoint, "fp32", "torch")
    if not runner.cfg.has_opening:
        raise SystemExit("error: the model has no mouth-opening channel (a warp_open model is needed)")
    specs = Q.clip_specs(Path(args.clips))
    analyzer, cropper = M.FaceAnalyzer(), FaceCropper()
    clips: dict[str, dict] = {}
    for spec in tqdm(specs, desc="clips", unit="clip", disable=args.quiet):
        try:
            clips[spec.name] = clip_response(runner, Q.load_clip(spec, cropper, args.frames), analyzer, args.frames)
        except Q.SkipClip as e:
            clips[spec.name] = {"skipped": str(e)}
            log.warning("%s skipped: %s", spec.name, e)
    pairs = run_pairs(args, runner.model, analyzer) if args.pairs else None  # the torch runner's fp32 model
    done = [c for c in clips.values() if "skipped" not in c]
    summary = {
        k: float(np.mean([c[k]["response"] for c in done])) if done else None for k in ("closed_photo", "open_photo")
    }
    result = {
        "command": command,
        "checkpoint": args.checkpoint or "bundled",
        "model": runner.describe(),
        "levels": list(LEVELS),
        "mean_response": summary,
        "clips": clips,
        **({"pairs": pairs} if pairs is not None else {}),
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.opening_response",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--clips", required=True, help="folder of clips (as benchmarks.quality) or a data CSV")
    ap.add_argument("--checkpoint", default=None, help="a warp_open model (default: the bundled model)")
    ap.add_argument("--out", required=True, help="output folder (results.json)")
    ap.add_argument("--frames", type=int, default=150, help="frames of each clip to measure (default 150)")
    ap.add_argument("--pairs", default=None, help="a training cache with mouth labels: also fit training pairs")
    ap.add_argument("--holdout", default="training/holdout.txt", help="identities held out of training (--pairs)")
    ap.add_argument("--num-pairs", type=int, default=160, help="pairs per group (--pairs; default 160)")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    res = run(args, " ".join(["python -m benchmarks.opening_response", *argv]))
    print(json.dumps({"mean_response": res["mean_response"], "pairs": res.get("pairs"), "seconds": res["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
