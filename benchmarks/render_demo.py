"""Offline render speed on the whole upstream PC-AVS demo, at the official model size.

    python -m benchmarks.render_demo [--backend torch-fast] [--ref-frames 8] [--out benchmarks/out]

Renders every frame of the demo (identity 517600055, pose clip 517600078 played forward and
backward, audio 681600002: 361 frames) through ``render_arrays``, i.e. the same path as
``python -m rt_engine.render``, and writes frames/s to JSON. Without ``--checkpoint`` it builds
official-format weights from the parity fixture's recipe (random but deterministic; speed does not
depend on the values). The fp32 reference is timed on the first ``--ref-frames`` frames of the
same run so the speed-up is a ratio measured on one machine state; the fidelity of the fast path
against the reference on those frames is reported as PSNR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.latency import recipe_checkpoint
from rt_engine.config import NoiseMode
from rt_engine.render import render_arrays

SHARED = Path(os.environ.get("RT_ENGINE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEMO = SHARED / "data" / "demo" / "pcavs" / "misc"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="official dir or .safetensors (default: fixture recipe)")
    ap.add_argument("--backend", default="torch-fast")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--ref-frames", type=int, default=8, help="frames timed with the fp32 reference (0: skip)")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rt_engine.backends import make_backend
    from rt_engine.backends.base import compare

    identity = DEMO / "Input_unz/Input/517600055/000000.jpg"
    pose = DEMO / "Pose_Source_unz/Pose_Source/517600078"
    audio = DEMO / "Audio_Source_unz/Audio_Source/681600002.flac"
    for p in (identity, pose, audio):
        if not p.exists():
            raise SystemExit(f"demo input missing: {p} (set RT_ENGINE_SHARED)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or recipe_checkpoint(Path(tmp))
        common = dict(aligned=True, pose_length=160, noise=NoiseMode.STORED, batch_size=args.batch_size)
        fast = make_backend(args.backend, checkpoint=ckpt, precision=args.precision)
        t0 = time.perf_counter()
        res = render_arrays(identity, audio, pose, runner=fast, max_frames=args.max_frames, progress=True, **common)
        wall = time.perf_counter() - t0
        result = {
            "backend": fast.describe(),
            "frames": int(len(res.frames)),
            "model_seconds": res.seconds,
            "wall_seconds_incl_preprocessing": wall,
            "fps": len(res.frames) / res.seconds,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor(),
            "batch_size": args.batch_size,
        }
        if args.ref_frames:
            ref = make_backend("torch", checkpoint=ckpt, precision="fp32")
            r = render_arrays(identity, audio, pose, runner=ref, max_frames=args.ref_frames, **common)
            c = compare(r.frames, res.frames[: args.ref_frames], value_range=2.0)  # images in [-1,1]
            result.update(
                ref_frames=args.ref_frames,
                ref_fps=args.ref_frames / r.seconds,
                speedup=result["fps"] / (args.ref_frames / r.seconds),
                psnr_vs_ref_db=c["psnr_db"],
                max_abs_vs_ref=c["max_abs"],
            )
    result["loadavg_1min_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "render_demo.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
