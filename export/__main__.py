"""``python -m export``: ONNX graphs, TensorRT engines, torch-tensorrt modules.

    python -m export onnx --checkpoint PATH --out DIR [--preset NAME] [--noise stored|input|zero]
                          [--batch 1] [--opset 17] [--no-fp16] [--no-verify]
    python -m export trt --onnx DIR --out DIR [--runtime trt|rtx] [--precision fp16|fp32]
                         [--max-batch 64] [--opt-batch 16] [--timing-cache FILE]
    python -m export torch-trt --checkpoint PATH --out DIR [--preset NAME] [--max-batch 64]   (GPU only)
    python -m export check --onnx DIR | --engines DIR

Errors caused by inputs (bad checkpoint, stale export, engine for another GPU) print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rt_engine.cli import cli_main
from rt_engine.config import model_preset


def _load_model(checkpoint: str | None, preset: str | None):
    from rt_engine.models.checkpoint import load_checkpoint

    cfg = model_preset(preset) if preset else None
    return load_checkpoint(checkpoint, cfg)


def cmd_onnx(a: argparse.Namespace) -> int:
    import torch

    from rt_engine.onnx_graphs import export_onnx

    if a.threads:
        torch.set_num_threads(a.threads)
    model = _load_model(a.checkpoint, a.preset)
    paths = export_onnx(
        model, a.out, batch=a.batch, noise=a.noise, opset=a.opset, half=a.fp16, verify=a.verify, checkpoint=a.checkpoint
    )
    for stage, p in paths.items():
        print(f"{stage}: {p}")
    if a.verify:
        print(f"verification: {Path(a.out) / 'verification.json'}")
    return 0


def cmd_trt(a: argparse.Namespace) -> int:
    from export.trt_build import TrtBuildConfig, build_engines

    cfg = TrtBuildConfig(
        runtime=a.runtime,
        precision=a.precision,
        max_batch=a.max_batch,
        opt_batch=a.opt_batch,
        workspace_gib=a.workspace_gib,
        timing_cache=a.timing_cache,
        compute_capability=a.compute_capability,
        optimization_level=a.opt_level,
    ).validate()
    engines = build_engines(a.onnx, a.out, cfg, stages=a.stages.split(",") if a.stages else None)
    for stage, p in engines.items():
        print(f"{stage}: {p}")
    return 0


def cmd_torch_trt(a: argparse.Namespace) -> int:
    from export.torch_trt import compile_torch_trt

    model = _load_model(a.checkpoint, a.preset)
    out = compile_torch_trt(model, a.out, precision=a.precision, max_batch=a.max_batch, opt_batch=a.opt_batch)
    for stage, p in out.items():
        print(f"{stage}: {p}")
    return 0


def cmd_check(a: argparse.Namespace) -> int:
    from rt_engine.onnx_graphs import read_manifest

    if a.onnx:
        man = read_manifest(a.onnx)
        print(
            json.dumps({k: {"file": g["file"], "sha256": g["sha256"][:16]} for k, g in man["graphs"].items()}, indent=1)
        )
    if a.engines:
        from rt_engine.backends.tensorrt_backend import read_sidecar

        for side in sorted(Path(a.engines).glob("*.json")):
            if side.name.endswith(".engine.json"):
                s = read_sidecar(side.with_suffix(""))
                print(
                    f"{side.name[:-5]}: {s['runtime']} {s['trt_version']} {s['precision']} "
                    f"targets={s['targets']} profiles={s['profiles']}"
                )
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    o = sub.add_parser("onnx", help="export the four stages to ONNX and verify them with ONNX Runtime")
    o.add_argument("--checkpoint", default=None, help="official dir or .safetensors (default: bundled weights)")
    o.add_argument("--preset", default=None, help="model config the checkpoint must match (official/small/tiny)")
    o.add_argument("--out", required=True)
    o.add_argument("--noise", default="stored", choices=("stored", "input", "zero"))
    o.add_argument("--batch", type=int, default=1, help="tracing batch (the batch axis stays dynamic)")
    o.add_argument("--opset", type=int, default=17)
    o.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 variants for TensorRT")
    o.add_argument("--no-verify", dest="verify", action="store_false")
    o.add_argument("--threads", type=int, default=0)
    o.set_defaults(func=cmd_onnx)

    t = sub.add_parser("trt", help="build TensorRT (or TensorRT-RTX) engines from an ONNX export")
    t.add_argument("--onnx", required=True, help="directory written by `python -m export onnx`")
    t.add_argument("--out", required=True)
    t.add_argument(
        "--runtime",
        default="trt",
        choices=("trt", "rtx"),
        help="trt: `import tensorrt` (datacenter GPUs); rtx: `import tensorrt_rtx` (CPU stand-in)",
    )
    t.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    t.add_argument("--max-batch", type=int, default=64)
    t.add_argument("--opt-batch", type=int, default=0, help="profile opt batch (default: max-batch)")
    t.add_argument("--workspace-gib", type=float, default=4.0)
    t.add_argument("--timing-cache", default=None, help="timing cache file (default: OUT/timing.cache)")
    t.add_argument("--compute-capability", default=None, help="rtx only: target such as SM80, SM89, SM120")
    t.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0..5")
    t.add_argument("--stages", default=None, help="comma-separated subset of identity,pose,audio,generator")
    t.set_defaults(func=cmd_trt)

    c = sub.add_parser("torch-trt", help="compile the torch stages with torch-tensorrt (GPU only)")
    c.add_argument("--checkpoint", default=None)
    c.add_argument("--preset", default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    c.add_argument("--max-batch", type=int, default=64)
    c.add_argument("--opt-batch", type=int, default=0)
    c.set_defaults(func=cmd_torch_trt)

    k = sub.add_parser("check", help="check an ONNX export against this rt_engine, or list engine sidecars")
    k.add_argument("--onnx", default=None)
    k.add_argument("--engines", default=None)
    k.set_defaults(func=cmd_check)

    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
