"""torch-tensorrt path for the torch backend (GPU only; ``torch_tensorrt`` imported lazily).

``compile_torch_trt`` compiles the same four stage wrappers as the ONNX export
(:mod:`rt_engine.onnx_graphs`) with the dynamo frontend, a dynamic batch axis 1..max_batch and
explicit typing (the precision comes from the module's dtypes: a half copy of the model whose
demodulation computes in fp32, fp32 inputs/outputs), and saves each as a TensorRT-embedded
ExportedProgram ``<stage>.ep`` with a JSON sidecar. ``load_torch_trt`` loads them back as callables.

torch-tensorrt cannot be installed on the CPU machines (it needs the full ``tensorrt`` wheels), so
this module is exercised only on a GPU (tests marked ``gpu``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rt_engine.models.pcavs import PCAVS
from rt_engine.onnx_graphs import (
    STAGES,
    AudioStage,
    ExportError,
    GeneratorStage,
    IdentityStage,
    PoseStage,
    example_inputs,
    rt_engine_version,
    stage_io,
    weights_sha256,
)

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_TRT_FORMAT = "rt_engine.torch_trt/1"


def _import_torch_trt():
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ExportError(
            f"torch_tensorrt not importable ({e}); it needs a CUDA build of torch and the full "
            "`tensorrt` wheels (GPU machines only)"
        ) from None
    if not torch.cuda.is_available():
        raise ExportError("torch-tensorrt compiles for the local GPU and no CUDA GPU is visible")
    return torch_tensorrt


def compile_torch_trt(
    model: PCAVS,
    out_dir: str | Path,
    precision: str = "fp16",
    max_batch: int = 64,
    opt_batch: int = 0,
    noise: str = "stored",
) -> dict[str, Path]:
    """Compile the four stages; returns ``{stage: path of the saved program}``."""
    if precision not in DTYPES:
        raise ExportError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    if max_batch < 1 or not 0 <= opt_batch <= max_batch:
        raise ExportError(f"need 1 <= max_batch and 0 <= opt_batch <= max_batch, got {max_batch}, {opt_batch}")
    tt = _import_torch_trt()
    dtype = DTYPES[precision]
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a copy: moved and cast in place, its generator's form set below, encoders in eval mode (BN)
    m = copy.deepcopy(model).eval().to("cuda", dtype)
    m.generator.set_form("static")  # shared weights: one engine serves samples with different styles
    wrappers = {
        "identity": IdentityStage(m, dtype),
        "pose": PoseStage(m, dtype),
        "audio": AudioStage(m, dtype),
        "generator": GeneratorStage(m, dtype, noise),
    }
    opt = opt_batch or max_batch
    paths = {}
    for stage in STAGES:
        ins, outs = stage_io(cfg, stage, noise)
        spec = [
            tt.Input(
                min_shape=s.concrete(1),
                opt_shape=s.concrete(opt),
                max_shape=s.concrete(max_batch),
                dtype=torch.float32,
                name=s.name,
            )
            for s in ins
        ]
        example = [v.cuda() for v in example_inputs(cfg, stage, 1, noise).values()]
        log.info("torch-tensorrt: compiling %s (%s, batch 1..%d)", stage, precision, max_batch)
        trt_mod = tt.compile(wrappers[stage], ir="dynamo", inputs=spec, use_explicit_typing=True, min_block_size=1)
        path = out / f"{stage}.ep"
        tt.save(trt_mod, str(path), output_format="exported_program", inputs=example)
        side: dict[str, Any] = {
            "format": TORCH_TRT_FORMAT,
            "torch_tensorrt_version": tt.__version__,
            "torch_version": torch.__version__,
            "stage": stage,
            "precision": precision,
            "device": torch.cuda.get_device_name(),
            "compute_capability": list(torch.cuda.get_device_capability()),
            "profiles": [{"min_batch": 1, "opt_batch": opt, "max_batch": max_batch}],
            "inputs": [s.to_dict() for s in ins],
            "outputs": [s.to_dict() for s in outs],
            "model_config": cfg.to_dict(),
            "weights_sha256": weights_sha256(model),
            "rt_engine_version": rt_engine_version(),
            "noise": noise,
        }
        path.with_name(path.name + ".json").write_text(json.dumps(side, indent=1))
        paths[stage] = path
    return paths


def load_torch_trt(out_dir: str | Path) -> dict[str, torch.nn.Module]:
    """Load the saved stage programs (GPU); checks each sidecar's torch-tensorrt version and GPU."""
    tt = _import_torch_trt()
    mods = {}
    for stage in STAGES:
        path = Path(out_dir) / f"{stage}.ep"
        side_p = path.with_name(path.name + ".json")
        if not path.is_file() or not side_p.is_file():
            raise ExportError(f"{out_dir}: missing {path.name} or its sidecar (run `python -m export torch-trt`)")
        side = json.loads(side_p.read_text())
        if side.get("format") != TORCH_TRT_FORMAT:
            raise ExportError(f"{side_p}: format {side.get('format')!r}, expected {TORCH_TRT_FORMAT!r}")
        if side["torch_tensorrt_version"] != tt.__version__:
            raise ExportError(
                f"{path}: compiled with torch-tensorrt {side['torch_tensorrt_version']}, this is "
                f"{tt.__version__}; recompile"
            )
        cap = list(torch.cuda.get_device_capability())
        if side["compute_capability"] != cap:
            raise ExportError(
                f"{path}: compiled for compute capability {side['compute_capability']}, this GPU is {cap}; recompile"
            )
        mods[stage] = torch.export.load(str(path)).module()
    return mods
