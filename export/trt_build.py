"""Build TensorRT engines from an ONNX export (``python -m export trt``).

Loader chain per stage (Polygraphy style)::

    manifest.json --read_manifest (version, sha256)--> <stage>[.fp16].onnx
      --OnnxParser.parse_from_file--> strongly typed INetworkDefinition (precision = the ONNX types)
      --IBuilderConfig (profile batch 1..N, workspace, timing cache)--> build_serialized_network
      --> <stage>.engine + <stage>.engine.json (sidecar) ; OUT/timing.cache updated
      --> [GPU present] run the engine and compare with ONNX Runtime (max abs, PSNR) -> sidecar

Two runtimes share this code (their Python APIs agree on everything used here):

* ``trt``: ``import tensorrt`` (10.x/11.x) for datacenter GPUs (H100). Engines are built on, and
  only valid for, the GPU they are built on (sidecar ``targets`` = that SM) and that exact
  TensorRT version. Networks are created strongly typed (TensorRT 11: always; 10.x: the
  ``STRONGLY_TYPED`` flag), so half precision comes from the fp16 ONNX variant, whose
  demodulation subgraph is fp32 by construction; there are no FP16/BF16 builder flags.
* ``rtx``: ``import tensorrt_rtx`` (TensorRT-RTX). It builds without a GPU (ahead-of-time for the
  listed compute capabilities; kernels are JIT-compiled at first run), which makes it the CPU
  stand-in that proves in CI that every graph parses and builds. Differences: it targets RTX /
  consumer GPUs (SM75..SM121, no SM90), takes the targets from
  ``IBuilderConfig.set_compute_capability`` instead of the build GPU, has no
  ``hardware_compatibility_level``, and ignores a timing cache (it picks kernels when the engine
  first runs; it has a runtime cache instead), so none is written for ``--runtime rtx``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rt_engine.backends.tensorrt_backend import ENGINE_FORMAT, import_trt, sidecar_path, sm_name
from rt_engine.onnx_graphs import NOISES, STAGES, ExportError, read_manifest, sha256_file

log = logging.getLogger(__name__)

RUNTIME_MODULES = {"trt": "tensorrt", "rtx": "tensorrt_rtx"}
PRECISIONS = ("fp16", "fp32")
MIN_PSNR = {"fp32": 60.0, "fp16": 35.0}  # dB against ONNX Runtime fp32 (fp32 engines may use TF32)
RTX_DEFAULT_TARGET = "SM89"  # builds without a GPU; any of trt.ComputeCapability works


@dataclass(frozen=True)
class TrtBuildConfig:
    runtime: str = "trt"  # trt | rtx
    precision: str = "fp16"  # picks the ONNX variant: fp16 -> <stage>.fp16.onnx, fp32 -> <stage>.onnx
    max_batch: int = 64  # optimization profile: batch 1..max_batch
    opt_batch: int = 0  # kernel selection batch; 0 = max_batch
    workspace_gib: float = 4.0
    timing_cache: str | None = None  # default OUT/timing.cache
    compute_capability: str | None = None  # rtx targets, e.g. "SM89" or "SM80,SM120"
    optimization_level: int = 3

    def validate(self) -> TrtBuildConfig:
        if self.runtime not in RUNTIME_MODULES:
            raise ExportError(f"runtime must be one of {sorted(RUNTIME_MODULES)}, got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch < 1:
            raise ExportError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.opt_batch <= self.max_batch:
            raise ExportError(f"opt_batch must be in 0..max_batch ({self.max_batch}), got {self.opt_batch}")
        if self.workspace_gib <= 0:
            raise ExportError(f"workspace_gib must be > 0, got {self.workspace_gib}")
        if not 0 <= self.optimization_level <= 5:
            raise ExportError(f"optimization_level must be 0..5, got {self.optimization_level}")
        if self.compute_capability and self.runtime != "rtx":
            raise ExportError("compute_capability is a TensorRT-RTX option; TensorRT builds for the GPU it runs on")
        return self

    @property
    def opt(self) -> int:
        return self.opt_batch or self.max_batch


class _Logger:
    """Collects TensorRT's errors so a failed parse/build can name them."""

    def __init__(self, trt: Any):
        self.trt = trt
        self.errors: list[str] = []
        outer = self

        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):  # noqa: D401  (TensorRT callback)
                if severity <= trt.ILogger.Severity.ERROR:
                    outer.errors.append(str(msg))
                    log.error("[TRT] %s", msg)
                elif severity <= trt.ILogger.Severity.WARNING:
                    log.warning("[TRT] %s", msg)
                else:
                    log.debug("[TRT] %s", msg)

        self.logger = L()


def _dtype_name(trt: Any, dt: Any) -> str:
    names = {
        trt.float32: "float32",
        trt.float16: "float16",
        trt.bfloat16: "bfloat16",
        trt.int32: "int32",
        trt.int64: "int64",
        trt.int8: "int8",
        trt.bool: "bool",
    }
    return names.get(dt, str(dt))


def _create_network(trt: Any, builder: Any) -> Any:
    """Strongly typed network: TensorRT 10.x needs the flag, 11.x and TensorRT-RTX accept it (or
    are strongly typed without it)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return builder.create_network(1 << int(flag) if flag is not None else 0)


def _targets(trt: Any, cfg: TrtBuildConfig) -> tuple[list[str], str | None]:
    """(targets, device description). TensorRT: the current GPU. RTX: the configured SMs."""
    if cfg.runtime == "rtx":
        return [s.strip().upper() for s in (cfg.compute_capability or RTX_DEFAULT_TARGET).split(",")], None
    import torch

    if not torch.cuda.is_available():
        raise ExportError(
            "TensorRT (--runtime trt) builds engines for the GPU it runs on and no CUDA GPU is "
            "visible; use --runtime rtx for a CPU build check"
        )
    cap = torch.cuda.get_device_capability()
    return [sm_name(cap)], torch.cuda.get_device_name()


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    stage: str,
    cfg: TrtBuildConfig,
    manifest: dict[str, Any],
    timing_cache: Path | None = None,
) -> dict[str, Any]:
    """Parse one ONNX graph, build a serialized engine, write it and its sidecar; returns the sidecar."""
    cfg = cfg.validate()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    module = RUNTIME_MODULES[cfg.runtime]
    trt = import_trt(module)
    logger = _Logger(trt)
    builder = trt.Builder(logger.logger)
    network = _create_network(trt, builder)
    parser = trt.OnnxParser(network, logger.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{onnx_path.name}: {module} cannot parse the graph: {'; '.join(errs) or logger.errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_gib * (1 << 30)))
    config.builder_optimization_level = cfg.optimization_level
    targets, device = _targets(trt, cfg)
    if cfg.runtime == "rtx":
        config.num_compute_capabilities = len(targets)
        for i, sm in enumerate(targets):
            if sm not in trt.ComputeCapability.__members__:
                raise ExportError(
                    f"compute capability {sm!r} unknown to {module}; choose from "
                    f"{[k for k in trt.ComputeCapability.__members__ if k.startswith('SM')]}"
                )
            config.set_compute_capability(trt.ComputeCapability.__members__[sm], i)

    profile = builder.create_optimization_profile()
    inputs, outputs = [], []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = list(t.shape)
        if dims[0] != -1:
            raise ExportError(f"{onnx_path.name}: input '{t.name}' has a static batch {dims[0]} (expected symbolic)")
        rest = tuple(int(d) for d in dims[1:])
        profile.set_shape(t.name, (1, *rest), (cfg.opt, *rest), (cfg.max_batch, *rest))
        inputs.append({"name": t.name, "shape": ["batch", *rest], "dtype": _dtype_name(trt, t.dtype)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        rest = [int(d) for d in list(t.shape)[1:]]
        outputs.append({"name": t.name, "shape": ["batch", *rest], "dtype": _dtype_name(trt, t.dtype)})
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None and cfg.runtime == "rtx":
        log.debug("TensorRT-RTX selects kernels at run time; no timing cache")  # it warns and ignores one
    elif timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        try:
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)
        except (AttributeError, RuntimeError, TypeError) as e:
            log.warning("timing cache not used (%s)", e)
            cache = None

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{onnx_path.name}: {module} failed to build the engine: {'; '.join(logger.errors[-5:])}")
    build_s = time.perf_counter() - t0
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))

    g = manifest["graphs"][onnx_path.name[: -len(".onnx")].replace(".fp32", "")]
    side = {
        "format": ENGINE_FORMAT,
        "runtime": module,
        "trt_version": trt.__version__,
        "stage": stage,
        "precision": cfg.precision,
        "targets": targets,
        "device": device,
        "profiles": [{"min_batch": 1, "opt_batch": cfg.opt, "max_batch": cfg.max_batch}],
        "inputs": inputs,
        "outputs": outputs,
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": g["sha256"],
        "onnx_export_format": manifest["format"],
        "rt_engine_version": manifest["rt_engine_version"],
        "model_config": manifest["model_config"],
        "weights_sha256": manifest["weights_sha256"],
        "noise": manifest["noise"],
        "engine_sha256": sha256_file(engine_path),
        "engine_bytes": engine_path.stat().st_size,
        "build_seconds": round(build_s, 2),
        "optimization_level": cfg.optimization_level,
        "timing_cache": str(timing_cache) if cache is not None else None,
        "verification": None,
    }
    sidecar_path(engine_path).write_text(json.dumps(side, indent=1))
    log.info(
        "built %s (%s, %s, %.1f s, %.1f MB)",
        engine_path.name,
        module,
        cfg.precision,
        build_s,
        side["engine_bytes"] / 1e6,
    )
    return side


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    cfg: TrtBuildConfig,
    stages: Sequence[str] | None = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Build ``<stage>.engine`` for every stage of the export in ``onnx_dir``; returns their paths.

    The export's manifest must match this rt_engine (format, version, graph sha256). With a GPU
    and ``verify``, every engine is run and compared with ONNX Runtime (written into its sidecar)."""
    cfg = cfg.validate()
    src, out = Path(onnx_dir), Path(out_dir)
    manifest = read_manifest(src)
    stages = list(stages or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ExportError(f"unknown stages {bad}; choose from {STAGES}")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.timing_cache) if cfg.timing_cache else out / "timing.cache"
    paths = {}
    for stage in stages:
        key = stage if cfg.precision == "fp32" else f"{stage}.{cfg.precision}"
        if key not in manifest["graphs"]:
            raise ExportError(
                f"{src}: the export has no {cfg.precision} graph for '{stage}' "
                f"(re-export with half=True, i.e. without --no-fp16, or build with --precision fp32)"
            )
        onnx_path = src / manifest["graphs"][key]["file"]
        engine = out / f"{stage}.engine"
        build_engine(onnx_path, engine, stage, cfg, manifest, cache)
        paths[stage] = engine
    (out / "onnx_manifest.json").write_text(json.dumps(manifest, indent=1))
    if manifest.get("noises"):  # stored noise maps for generator engines with noise inputs
        shutil.copyfile(src / manifest["noises"]["file"], out / NOISES)
    if verify:
        verify_engines(src, out, cfg, stages)
    return paths


def verify_engines(
    onnx_dir: Path, engine_dir: Path, cfg: TrtBuildConfig, stages: Sequence[str], batches: Sequence[int] = (1, 3)
) -> None:
    """Run each engine on the GPU and compare with ONNX Runtime on the fp32 graph (written into the
    sidecar). Without a GPU the sidecar records why it was skipped."""
    import torch

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU in the build process; engine not executed"
    elif cfg.runtime == "rtx" and sm_name(torch.cuda.get_device_capability()) not in _targets(None, cfg)[0]:
        reason = "the GPU is not among the engine's targets"
    if reason:
        for stage in stages:
            p = sidecar_path(engine_dir / f"{stage}.engine")
            s = json.loads(p.read_text())
            s["verification"] = {"skipped": reason}
            p.write_text(json.dumps(s, indent=1))
        log.info("engines not verified: %s", reason)
        return

    import numpy as np

    from rt_engine.backends.base import compare
    from rt_engine.backends.tensorrt_backend import TensorRTRunner
    from rt_engine.config import ModelConfig
    from rt_engine.onnx_graphs import example_inputs, ort_session, stage_io

    man = read_manifest(onnx_dir)
    mcfg = ModelConfig.from_dict(man["model_config"])
    runner = TensorRTRunner(engine_dir, runtime=RUNTIME_MODULES[cfg.runtime], cuda_graphs=False, stages=stages)
    min_psnr = MIN_PSNR[cfg.precision]
    failed = []
    for stage in stages:
        sess = ort_session(onnx_dir / man["graphs"][stage]["file"])
        _, outs = stage_io(mcfg, stage, man["noise"])
        recs = []
        for b in batches:
            if b > cfg.max_batch:
                continue
            feeds = example_inputs(mcfg, stage, b, man["noise"], seed=b)
            ref = sess.run([o.name for o in outs], {k: v.numpy() for k, v in feeds.items()})
            got = runner.stage(stage).run({k: v.to(runner.device) for k, v in feeds.items()})
            for spec, r in zip(outs, ref, strict=True):
                o = got[spec.name].float().cpu().numpy()
                c = compare(np.asarray(r), o, value_range=2.0 if spec.name == "image" else None)
                ok = c["finite"] and c["psnr_db"] >= min_psnr
                recs.append({"batch": b, "output": spec.name, **c, "min_psnr_db": min_psnr, "passed": ok})
                if not ok:
                    failed.append(f"{stage}/{spec.name} batch {b}: PSNR {c['psnr_db']:.1f} dB < {min_psnr}")
        p = sidecar_path(engine_dir / f"{stage}.engine")
        s = json.loads(p.read_text())
        s["verification"] = {"reference": "onnxruntime fp32", "records": recs}
        p.write_text(json.dumps(s, indent=1))
        log.info(
            "%s engine vs ONNX Runtime: worst PSNR %.1f dB, max abs %.3g",
            stage,
            min(r["psnr_db"] for r in recs),
            max(r["max_abs"] for r in recs),
        )
    if failed:
        raise ExportError(f"engines differ from ONNX Runtime: {'; '.join(failed)} (records in the sidecars)")
