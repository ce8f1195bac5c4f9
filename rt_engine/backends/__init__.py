"""Backends: one :class:`~rt_engine.backends.base.Runner` interface, several implementations.

    make_backend(name, checkpoint=None, precision=None, model=None, **options) -> Runner
    make_runner(checkpoint=None, precision="fp32", backend="torch") -> Runner   (the CLIs' entry)

=================  ==========================================================================
name               what runs
=================  ==========================================================================
``torch``          fp32 reference, per-sample-weight modulated conv (the official computation);
                   ``precision="bf16"`` gives the autocast variant ``torch-bf16``
``torch-fast``     :class:`FastTorchRunner` (static weights, identity modulation cached, dense
                   upsampling, channels-last); bf16 where the CPU has native bf16, else fp32
``torch-compile``  ``torch-fast`` under ``torch.compile`` with frozen weights
``onnxruntime``    ONNX Runtime CPU over the ``export/`` graphs (fp32)
``openvino``       OpenVINO CPU over the same graphs (``INFERENCE_PRECISION_HINT`` bf16 or f32)
``tensorrt``       prebuilt engines on an NVIDIA GPU (``engine_dir=...``; needs a GPU)
``torch-cuda``     :class:`~rt_engine.backends.cuda_backend.TorchCudaRunner`: PyTorch on CUDA, every
                   modulated 3x3 conv through the fused kernel, CUDA graphs per batch bucket
                   (fp16 default, bf16, fp32; needs a CUDA GPU, refused otherwise)
``auto``           the first-listed (or a clearly faster) backend whose output passes a fidelity
                   check against the fp32 reference at start-up (PSNR of one frame); torch-cuda
                   is listed first where a CUDA GPU is visible
=================  ==========================================================================

``precision``: ``None`` (the backend's default), ``fp32``, ``bf16`` or ``auto``. Heavy runtimes
(onnxruntime, openvino, tensorrt) are imported only when their backend is made.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rt_engine.backends.base import Runner, compare
from rt_engine.config import NoiseMode
from rt_engine.errors import ConfigError
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-fast", "torch-compile", "onnxruntime", "openvino", "tensorrt", "torch-cuda", "auto")
AUTO_MARGIN = 1.25  # a later candidate must be this many times faster to be preferred
AUTO_CANDIDATES = ("torch-cuda", "openvino", "onnxruntime", "torch-fast")  # tried by 'auto' where available
DEFAULT_MIN_PSNR = 35.0  # dB of one generated frame against the fp32 reference


@functools.cache
def _importable(module: str) -> bool:
    """The module imports (not just exists: e.g. onnx fails to import next to protobuf < 5)."""
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception as e:  # broken installs raise anything from ImportError to TypeError
        log.warning("%s is installed but does not import: %s", module, e)
        return False
    return True


def available_backends() -> list[str]:
    """Backend names whose runtime imports here (tensorrt also needs a GPU at run time)."""
    out = ["torch", "torch-fast", "torch-compile"]
    if torch.cuda.is_available():
        out.append("torch-cuda")
    if _importable("onnx") and _importable("onnxruntime"):
        out.append("onnxruntime")
    if _importable("onnx") and _importable("openvino"):
        out.append("openvino")
    if torch.cuda.is_available() and (importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_rtx")):
        out.append("tensorrt")
    return out


def _load(checkpoint: str | Path | None, model: PCAVS | None) -> PCAVS:
    if model is not None:
        return model.eval()
    from rt_engine.models.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


def make_backend(
    name: str,
    checkpoint: str | Path | None = None,
    precision: str | None = None,
    model: PCAVS | None = None,
    **options: Any,
) -> Runner:
    """Build the runner ``name`` for a checkpoint (None: bundled default) or an in-memory ``model``.

    ``options`` go to the runner (e.g. ``compile``, ``upsample`` for torch-fast; ``onnx_dir``,
    ``threads`` for onnxruntime/openvino; ``engine_dir`` for tensorrt; ``candidates``, ``min_psnr``
    for auto).
    """
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose from {BACKENDS}")
    if name == "tensorrt":
        from rt_engine.backends.tensorrt_backend import TensorRTRunner

        engine_dir = options.pop("engine_dir", checkpoint)
        if engine_dir is None:
            raise ConfigError(
                "the tensorrt backend needs engine_dir= (a folder of .engine files from `python -m export trt`)"
            )
        return TensorRTRunner(engine_dir, **options)
    if name == "torch-cuda":
        from rt_engine.backends.cuda_backend import TorchCudaRunner, require_cuda

        require_cuda()  # before loading the checkpoint: refuse early, naming what is missing
        return TorchCudaRunner(_load(checkpoint, model), precision=precision, **options)
    m = _load(checkpoint, model)
    if name == "torch":
        from rt_engine.backends.torch_backend import TorchRunner

        # the runner picks the generator's form per call; a caller's model is shared, not copied, so
        # its encoders keep their memory format (channels-last weights only for a model loaded here)
        if model is not None:
            options.setdefault("channels_last", False)
        return TorchRunner(m, precision=precision or "fp32", **options)
    if name in ("torch-fast", "torch-compile"):
        from rt_engine.backends.torch_backend import FastTorchRunner

        if name == "torch-compile":
            options.setdefault("compile", True)
        return FastTorchRunner(m, precision=precision or "auto", **options)
    if name == "onnxruntime":
        from rt_engine.backends.onnx_backend import OnnxRuntimeRunner

        return OnnxRuntimeRunner(m, precision=precision or "fp32", **options)
    if name == "openvino":
        from rt_engine.backends.onnx_backend import OpenVINORunner

        return OpenVINORunner(m, precision=precision or "auto", **options)
    return select_backend(m, precision=precision, **options).runner


def make_runner(
    checkpoint: str | Path | None = None,
    precision: str = "fp32",
    backend: str = "torch",
    encoder_precision: str | None = None,
) -> Runner:
    """The command lines' runner: a checkpoint (None: the bundled default) in backend ``backend``;
    ``precision="auto"`` means the backend's default (fp32 for ``torch``). ``encoder_precision``
    (OpenVINO, also when ``auto`` picks it): the encoders' own precision under the generator's."""
    if backend == "torch":
        from rt_engine.backends.torch_backend import TorchRunner

        return TorchRunner(_load(checkpoint, None), precision="fp32" if precision == "auto" else precision)
    opts: dict[str, Any] = {}
    if encoder_precision and backend == "openvino":
        opts["encoder_precision"] = encoder_precision
    elif encoder_precision and backend == "auto":
        opts["options_for"] = {"openvino": {"encoder_precision": encoder_precision}}
    return make_backend(backend, checkpoint=checkpoint, precision=None if precision == "auto" else precision, **opts)


# ------------------------------------------------------------------------------------------ auto
def psnr(a: Tensor, b: Tensor, peak_to_peak: float = 2.0) -> float:
    """PSNR in dB of images in [-1,1] (peak-to-peak 2); inf when equal (:func:`compare`)."""
    return compare(a, b, value_range=peak_to_peak)["psnr_db"]


@dataclass
class Probe:
    """Inputs of the start-up check: one identity, pose frame and mel window (random if not given)."""

    id_img: Tensor  # [1,3,224,224] in [-1,1]
    pose_img: Tensor  # [1,3,224,224]
    mel: Tensor  # [1,1,80,20] in [0,1]

    @classmethod
    def random(cls, seed: int = 0) -> Probe:
        g = torch.Generator().manual_seed(seed)
        return cls(
            torch.rand(1, 3, 224, 224, generator=g) * 2 - 1,
            torch.rand(1, 3, 224, 224, generator=g) * 2 - 1,
            torch.rand(1, 1, 80, 20, generator=g),
        )


def run_frame(runner: Runner, probe: Probe) -> Tensor:
    """Full pipeline for one frame: identity, pose, audio, generator (stored noise). -> [1,3,H,W]"""
    id0, id1 = runner.encode_identity(probe.id_img)
    return runner.generate(
        id0, id1, runner.encode_audio(probe.mel), runner.encode_pose(probe.pose_img), NoiseMode.STORED
    )


@dataclass
class Candidate:
    name: str
    status: str  # "ok", "rejected" (fidelity), "failed" (could not build / run)
    psnr_db: float = float("nan")
    ms_per_frame: float = float("nan")
    reason: str = ""
    runner: Runner | None = field(default=None, repr=False)


@dataclass
class Selection:
    runner: Runner
    name: str
    candidates: list[Candidate]

    def summary(self) -> str:
        rows = [
            f"{c.name}: {c.status}, {c.ms_per_frame:.1f} ms/frame, {c.psnr_db:.1f} dB"
            + (f" ({c.reason})" if c.reason else "")
            for c in self.candidates
        ]
        return f"picked {self.name}; " + "; ".join(rows)


def _time_frame(runner: Runner, probe: Probe, repeats: int) -> float:
    id0, id1 = runner.encode_identity(probe.id_img)
    best = math.inf
    for _ in range(repeats):  # steady-state per-frame work: pose + audio + generator
        t = time.perf_counter()
        runner.generate(id0, id1, runner.encode_audio(probe.mel), runner.encode_pose(probe.pose_img), NoiseMode.STORED)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def select_backend(
    model: PCAVS,
    candidates: Sequence[str] | None = None,
    precision: str | None = None,
    min_psnr: float = DEFAULT_MIN_PSNR,
    probe: Probe | None = None,
    repeats: int = 3,
    factories: dict[str, Callable[[], Runner]] | None = None,
    options_for: dict[str, dict[str, Any]] | None = None,
) -> Selection:
    """Pick a candidate whose probe frame is within ``min_psnr`` dB of the fp32 reference: the first
    listed, unless a later one is faster by more than ``AUTO_MARGIN``.

    Each candidate is built, run once on the probe (warm-up + fidelity), then timed ``repeats``
    times (best time of pose + audio + generator). A candidate that cannot be built or run is
    'failed', one below the PSNR bound 'rejected'; the fp32 reference is the fallback when none
    passes. ``factories`` overrides how a candidate is built (tests inject broken backends);
    ``options_for`` gives one candidate's runner its own options (e.g. OpenVINO's encoder precision).
    """
    probe = probe or Probe.random()
    avail = set(available_backends())
    names = list(candidates) if candidates is not None else [c for c in AUTO_CANDIDATES if c in avail]
    ref_runner = make_backend("torch", model=model)
    ref = run_frame(ref_runner, probe)
    results: list[Candidate] = []
    for name in names:
        try:
            runner = (
                factories[name]()
                if factories and name in factories
                else make_backend(name, model=model, precision=precision, **(options_for or {}).get(name, {}))
            )
            out = run_frame(runner, probe)
        except Exception as e:  # any runtime may fail in its own way; auto must go on
            log.warning("auto: backend %s unavailable: %s", name, e)
            results.append(Candidate(name, "failed", reason=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        p = psnr(out, ref)
        if not p >= min_psnr:  # also catches NaN
            log.warning(
                "auto: backend %s rejected: PSNR %.1f dB < %.1f dB against the fp32 reference", name, p, min_psnr
            )
            results.append(Candidate(name, "rejected", psnr_db=p, reason=f"PSNR {p:.1f} dB < {min_psnr:.1f} dB"))
            continue
        results.append(
            Candidate(name, "ok", psnr_db=p, ms_per_frame=_time_frame(runner, probe, repeats), runner=runner)
        )
    ok = [c for c in results if c.status == "ok"]
    if ok:
        # The earliest-listed passing candidate wins unless another is faster by more than
        # AUTO_MARGIN: a few timed frames on a shared machine vary by more than that, and the
        # OpenMP runtimes (torch) slow down far more than OpenVINO's when a server's event loop
        # and codecs share the cores (measured: torch-fast 520 ms per model call in the server against
        # 30 ms standalone).
        best = ok[0]
        for c in ok[1:]:
            if c.ms_per_frame < best.ms_per_frame / AUTO_MARGIN:
                best = c
        sel = Selection(best.runner, best.name, results)
    else:
        results.append(
            Candidate("torch", "ok", psnr_db=math.inf, reason="fallback: no candidate passed", runner=ref_runner)
        )
        sel = Selection(ref_runner, "torch", results)
    for c in results:
        c.runner = None if c.name != sel.name else c.runner
    log.info("backend auto: %s", sel.summary())
    return sel
