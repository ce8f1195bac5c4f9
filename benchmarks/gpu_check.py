"""One prepared check of the GPU path (``torch-cuda`` backend + fused kernel), from the repository alone.

    python benchmarks/gpu_check.py                       # on a CUDA machine (about 5-8 min on one H200)
    python benchmarks/gpu_check.py --dry-run --json build/gpu_check_dry.json   # CPU: same steps, tiny sizes

Steps (each recorded in the JSON with its status ``ok`` / ``failed`` / ``skipped`` and why):

1. ``env``: torch, CUDA, GPU, nvcc, CMake, compute-sanitizer, onnxruntime providers, CPU flags.
2. ``build``: builds rt_engine._kernels for this GPU's SM (sm_90 on an H100/H200) through
   ``RT_ENGINE_CUDA_ARCHS`` (cached per source hash); dry run: the CPU twin and the CPU emulator.
3. ``op_parity``: the fused op against the fp32 PyTorch reference at the generator's real fused-layer
   shapes (official config) and batch 1, 8, 32, for fp32 / fp16 / bf16 storage; dry run: the tiny
   config's shapes at batch 1 and 2 with the C++ twin and the emulator (small planes only).
4. ``generator_psnr``: the whole ``torch-cuda`` runner against the fp32 reference runner (per-sample
   weights, TF32 off): PSNR of the generator alone (same codes) and of the whole frame, per precision,
   and CUDA-graph replay against eager launches.
5. ``layer_timing``: per fused layer, the fused kernel against the unfused library path (x*s, cuDNN
   conv, *d, noise, bias + leaky ReLU as separate ops) and against the cuDNN conv alone (NCHW and
   channels-last), CUDA events. GPU only.
6. ``frame_timing``: the official-size frame (pose + audio + generator, one upload, one pinned
   download) with CUDA graphs at batch 1..64: ms per step, frames/s, sessions at 25 fps (also the
   largest batch whose step fits the serve default 80 ms margin), eager launches at batch 1 and 8 for
   comparison. Dry run: walks the steps at tiny size and records no times.
7. ``racecheck``: ``compute-sanitizer --tool racecheck`` on two small launches (fp32 and fp16) in a
   child process (after the timings: CUDA starts slowly under the sanitizer); dry run: the
   emulator's shared-memory race detector on the same launches.
8. ``onnxruntime_cuda``: the ONNX graphs on onnxruntime's CUDA provider (pose, audio, generator),
   where that provider exists.

Steps after ``build`` are skipped once ``--budget-s`` (default 420 s) is spent. Scratch files (the ONNX
export) go to build/gpu_check/.
Writes one JSON (``--json``) and a markdown table beside it (same name, ``.md``). Exit 0 when no step
failed. Needs torch, numpy, CMake, a C++ compiler and pybind11 (and nvcc + a GPU for the real check);
no aiortc, OpenCV or audio libraries.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: make `rt_engine` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import _time_cuda  # noqa: E402  (CUDA-event timer, 3 warm-up calls)
from rt_engine.backends import DEFAULT_MIN_PSNR, psnr  # noqa: E402
from rt_engine.backends import cuda_backend as cb  # noqa: E402
from rt_engine.cli import cli_main  # noqa: E402
from rt_engine.config import ModelConfig, NoiseMode, model_preset  # noqa: E402
from rt_engine.errors import ConfigError  # noqa: E402
from rt_engine.models import fused_modconv as fm  # noqa: E402
from rt_engine.models.pcavs import PCAVS  # noqa: E402

log = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parents[1]
FRAME_BATCHES = (1, 2, 4, 8, 16, 32, 64)
OP_BATCHES = (1, 8, 32)
LAYER_BATCHES = (8, 32)
OP_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}  # max |err| / max |ref| (as tests/test_kernels*.py)
FP32_MIN_PSNR = 60.0
REPLAY_MIN_PSNR = 80.0  # a replayed CUDA graph against the eager first call of the same runner
LATENCY_MS = 80.0  # serve's default --margin-ms: a step must finish within it
FPS = 25.0
EMU_MAX_HW = 14  # emulated planes stay small (every block is 256 fibers)


@dataclass
class Ctx:
    dry: bool
    cfg: ModelConfig
    device: torch.device
    impl: str
    out_dir: Path
    budget_s: float
    precisions: tuple[str, ...]
    time_precisions: tuple[str, ...]
    checkpoint: str | None
    t0: float = field(default_factory=time.perf_counter)
    model: PCAVS | None = None
    emu: Any = None
    native_ok: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ----------------------------------------------------------------------------------------------- helpers
def _cmd_out(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    lines = (res.stdout or res.stderr).strip().splitlines()
    return lines[-1] if lines else ""


def _find_nvcc() -> str | None:
    if shutil.which("nvcc"):
        return shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


def _sanitizer() -> str | None:
    exe = shutil.which("compute-sanitizer")
    nvcc = _find_nvcc()
    if exe is None and nvcc:
        cand = Path(nvcc).parent / "compute-sanitizer"
        exe = str(cand) if cand.is_file() else None
    return exe


def _sync(ctx: Ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def _layer_inputs(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """x [B,Cin,H,W], style [B,Cin] fp32, weight [Cout,Cin,3,3], noise [1,1,H,W] (pre-scaled), bias [Cout] fp32."""
    b, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g).to(device, dtype)
    style = (torch.randn(b, cin, generator=g) * 0.5 + 1.0).to(device)
    weight = (torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5).to(device, dtype)
    noise = (torch.randn(1, 1, h, w, generator=g) * 0.3).to(device, dtype)
    bias = (torch.randn(cout, generator=g) * 0.1).to(device)
    return x, style, weight, noise, bias


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _reference_op(x, style, weight, noise, bias) -> torch.Tensor:
    """fp32 reference of the fused op on the (already rounded) inputs."""
    return fm.modulated_conv2d_fused_ref(x.float(), style, weight.float(), noise.float(), 1.0, bias)


def _model(ctx: Ctx) -> PCAVS:
    """The model under test: --checkpoint, else the config with random weights (non-zero noise weights
    and biases so every term of every layer counts)."""
    if ctx.model is None:
        if ctx.checkpoint:
            from rt_engine.models.checkpoint import load_checkpoint

            m = load_checkpoint(ctx.checkpoint)
        else:
            torch.manual_seed(0)
            m = PCAVS(ctx.cfg).eval()
            with torch.no_grad():
                for name, p in m.generator.named_parameters():
                    if name.endswith("noise.weight"):
                        p.fill_(0.3)
                    elif name.endswith("bias") and "modulation" not in name:
                        p.normal_(0, 0.1)
        ctx.model = m.eval()
        ctx.cfg = m.cfg
    return ctx.model


def _frame_inputs(cfg: ModelConfig, b: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "id_img": torch.rand(b, 3, 224, 224, generator=g) * 2 - 1,
        "pose_img": torch.rand(b, 3, 224, 224, generator=g) * 2 - 1,
        "mel": torch.rand(b, 1, 80, 20, generator=g),
    }


# ----------------------------------------------------------------------------------------------- steps
def step_env(ctx: Ctx) -> dict:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": _find_nvcc(),
        "nvcc_version": _cmd_out([_find_nvcc() or "nvcc", "--version"]),
        "cmake": _cmd_out(["cmake", "--version"]),
        "compute_sanitizer": _sanitizer(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    try:
        flags = set(re.findall(r"\b(avx512_bf16|amx_bf16|amx_tile|avx2)\b", Path("/proc/cpuinfo").read_text()))
        info["cpu_flags"] = sorted(flags)
    except OSError:
        info["cpu_flags"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(ctx.device)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            sm_count=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception as e:  # not installed or broken: the ORT step says so
        info["onnxruntime"] = f"unavailable: {type(e).__name__}: {e}"
    return info


def step_build(ctx: Ctx) -> dict:
    info: dict[str, Any] = {}
    if not ctx.dry:
        nvcc = _find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA kernels cannot be built")
        os.environ.setdefault("CUDACXX", nvcc)
        major, minor = torch.cuda.get_device_capability(ctx.device)
        os.environ.setdefault("RT_ENGINE_CUDA_ARCHS", f"{major}{minor}")
        os.environ.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        info["cuda_archs"] = os.environ["RT_ENGINE_CUDA_ARCHS"]
    info["cache"] = str(fm.kernel_cache_dir())
    t = time.perf_counter()
    built = fm.build_native()
    info["build_s"] = round(time.perf_counter() - t, 1)
    mod = fm.load_native()
    info.update(module=fm.native_path(), built=str(built), has_cuda=bool(mod.has_cuda()))
    if not ctx.dry:
        info["cuda_device_count"] = int(mod.cuda_device_count())
        if not mod.has_cuda():
            raise RuntimeError(f"rt_engine._kernels at {fm.native_path()} has no CUDA kernels (nvcc {_find_nvcc()})")
    else:
        from rt_engine.models import kernel_emu

        t = time.perf_counter()
        ctx.emu = kernel_emu.Emu(kernel_emu.build_emu())
        info["emulator_build_s"] = round(time.perf_counter() - t, 1)
    ctx.native_ok = True
    return info


def step_op_parity(ctx: Ctx) -> dict:
    batches = (1, 2) if ctx.dry else OP_BATCHES
    rows = [
        row
        for b in batches
        for shape in cb.fused_layer_shapes(ctx.cfg, b)
        for prec in ctx.precisions
        for row in _parity_rows(ctx, shape, prec, seed=b)
    ]
    worst: dict[str, float] = {}
    for r in rows:
        key = f"{r['impl']}/{r['precision']}"
        worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise AssertionError(f"{len(bad)} of {len(rows)} layer checks over tolerance {OP_TOL}; first: {bad[0]}")
    return {"tolerance": OP_TOL, "worst_rel_err": worst, "checks": len(rows), "rows": rows}


def _parity_rows(ctx: Ctx, shape: tuple[int, int, int, int, int], prec: str, seed: int) -> list[dict]:
    """The fused op (and, in the dry run, the emulated CUDA source on small planes) on one layer."""
    x, s, w, n, bias = _layer_inputs(shape, cb.PRECISIONS[prec], ctx.device, seed=seed)
    ref = _reference_op(x, s, w, n, bias)
    outs = {ctx.impl: fm.modulated_conv2d(x, s, w, n, 1.0, bias, impl=ctx.impl)}
    if ctx.dry and shape[3] <= EMU_MAX_HW:
        outs["emulator"] = _emulated(ctx, x, s, w, n, bias)
    rows = []
    for name, out in outs.items():
        err = _rel_err(out, ref)
        rows.append({"impl": name, "precision": prec, "shape": list(shape), "rel_err": err, "ok": err <= OP_TOL[prec]})
    return rows


def _emulated(ctx: Ctx, x, s, w, n, bias) -> torch.Tensor:
    ctx.emu.configure(seed=1)
    out, rc_d, rc = ctx.emu.run(x, s, w, n, 1.0, bias)
    if rc_d or rc or ctx.emu.error_count():
        raise AssertionError(f"emulated launch reported problems: {ctx.emu.messages()[:500]}")
    return out


def step_generator_psnr(ctx: Ctx) -> dict:
    from rt_engine.backends.torch_backend import TorchRunner

    model = _model(ctx)
    b = 2 if ctx.dry else 8
    inp = _frame_inputs(ctx.cfg, b)
    # per-sample weights, the official computation; TorchRunner moves and reshapes its model: give it a copy
    ref = TorchRunner(copy.deepcopy(model), "fp32", device=str(ctx.device))
    id0, id1 = ref.encode_identity(inp["id_img"])
    mouth, pose = ref.encode_audio(inp["mel"]), ref.encode_pose(inp["pose_img"])
    ref_frames = ref.generate(id0, id1, mouth, pose, NoiseMode.STORED)
    out: dict[str, Any] = {"batch": b, "reference": "torch fp32 (per-sample weights, TF32 off)", "precisions": {}}
    failures = []
    for prec in ctx.precisions:
        runner = cb.TorchCudaRunner(model, prec, device=str(ctx.device), impl=ctx.impl, max_batch=8)
        gen = [runner.generate(id0, id1, mouth, pose, NoiseMode.STORED) for _ in range(3)]  # eager, capture, replay
        frame = runner.step(inp["pose_img"], inp["mel"], id0, id1, NoiseMode.STORED)
        per = [psnr(gen[-1][i], ref_frames[i]) for i in range(b)]
        whole = [psnr(frame[i], ref_frames[i]) for i in range(b)]
        row = {
            "generator_psnr_min": min(per),
            "generator_psnr_mean": sum(per) / b,
            "frame_psnr_min": min(whole),
            "max_abs_err": float((gen[-1] - ref_frames).abs().max()),
            "ops": runner.ops(),
            "cuda_graphs": runner.cuda_graphs,
            "graph_captured": runner._gen[NoiseMode.STORED].slots[runner._gen[NoiseMode.STORED].bucket(b)].graph
            is not None,
            # the third call replays the graph (on CUDA); the first ran eagerly. Bit equality is likely but
            # not promised (cuDNN may pick non-deterministic algorithms), so the bound is a PSNR.
            "replay_equals_first_call": bool(torch.equal(gen[0], gen[-1])),
            "replay_vs_first_call_psnr": psnr(gen[-1], gen[0]),
        }
        if runner.cuda_graphs:
            eager = cb.TorchCudaRunner(
                model, prec, device=str(ctx.device), impl=ctx.impl, max_batch=8, cuda_graphs=False
            )
            row["graph_vs_eager_max_abs"] = float((eager.generate(id0, id1, mouth, pose) - gen[-1]).abs().max())
        need = FP32_MIN_PSNR if prec == "fp32" else DEFAULT_MIN_PSNR
        row["min_psnr_required"] = need
        replay_ok = row["replay_vs_first_call_psnr"] >= REPLAY_MIN_PSNR and row["graph_captured"] == runner.cuda_graphs
        if not row["generator_psnr_min"] >= need or not replay_ok:
            failures.append(prec)
        out["precisions"][prec] = row
        del runner
    if failures:
        raise AssertionError(f"generator fidelity below bound or replay mismatch for {failures}: {out['precisions']}")
    return out


SANITIZER_SHAPES = ((2, 20, 40, 13, 9), (1, 17, 33, 16, 16))


def sanitizer_child() -> int:
    """The small launches run under compute-sanitizer (also checks their results)."""
    dev = torch.device("cuda")
    for shape in SANITIZER_SHAPES:
        for prec in ("fp32", "fp16"):
            x, s, w, n, bias = _layer_inputs(shape, cb.PRECISIONS[prec], dev)
            out = fm.modulated_conv2d(x, s, w, n, 1.0, bias, impl="cuda")
            torch.cuda.synchronize()
            err = _rel_err(out, _reference_op(x, s, w, n, bias))
            print(json.dumps({"shape": shape, "precision": prec, "rel_err": err}), flush=True)
            if err > OP_TOL[prec]:
                return 4
    return 0


def step_racecheck(ctx: Ctx) -> dict:
    if ctx.dry:
        ctx.emu.configure(seed=7, race_check=True)
        rows = []
        for shape in SANITIZER_SHAPES:
            x, s, w, n, bias = _layer_inputs(shape, torch.float32, ctx.device)
            out, rc_d, rc = ctx.emu.run(x, s, w, n, 1.0, bias)
            rows.append(
                {"shape": list(shape), "rc": [rc_d, rc], "rel_err": _rel_err(out, _reference_op(x, s, w, n, bias))}
            )
        hazards = ctx.emu.error_count()
        if hazards:
            raise AssertionError(f"emulator race detector: {ctx.emu.messages()[:1000]}")
        return {
            "skipped_sanitizer": "compute-sanitizer needs a CUDA GPU; ran the CPU emulator's race detector "
            "on the same launches instead",
            "emulator_hazards": hazards,
            "launches": rows,
        }
    exe = _sanitizer()
    if exe is None:
        raise RuntimeError("compute-sanitizer not found (PATH or next to nvcc)")
    cmd = [
        exe,
        "--tool",
        "racecheck",
        "--error-exitcode",
        "3",
        sys.executable,
        str(Path(__file__).resolve()),
        "--sanitizer-child",
    ]
    env = {**os.environ, "CUDA_MODULE_LOADING": "LAZY", "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    limit = max(60.0, min(300.0, ctx.budget_s + 60.0 - ctx.elapsed()))  # keep the whole check near its budget
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"racecheck did not finish within {limit:.0f} s: {str(e.stdout)[-800:]}") from None
    text = res.stdout + res.stderr
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazard", text)
    info = {
        "command": " ".join(cmd),
        "rc": res.returncode,
        "seconds": round(time.perf_counter() - t, 1),
        "summary": m.group(0) if m else None,
        "tail": text[-1500:],
    }
    if res.returncode != 0 or m is None or int(m.group(1)) != 0:
        raise AssertionError(f"racecheck failed (rc {res.returncode}): {text[-1500:]}")
    return info


def step_layer_timing(ctx: Ctx) -> dict:
    if ctx.dry:
        return {"skipped": "timings need a CUDA GPU (dry run)"}
    iters = 20
    rows = [
        _layer_row(ctx, shape, prec, iters)
        for b in LAYER_BATCHES
        for shape in cb.fused_layer_shapes(ctx.cfg, b)
        for prec in ctx.time_precisions
    ]
    totals = {}
    for prec in ctx.time_precisions:
        for b in LAYER_BATCHES:
            sel = [r for r in rows if r["precision"] == prec and r["shape"][0] == b]
            totals[f"{prec}/b{b}"] = {
                k: round(sum(r[k] for r in sel), 3)
                for k in ("fused_ms", "unfused_ms", "cudnn_conv_nchw_ms", "cudnn_conv_nhwc_ms")
            }
    return {"iters": iters, "rows": rows, "totals": totals}


def _layer_row(ctx: Ctx, shape: tuple[int, int, int, int, int], prec: str, iters: int) -> dict:
    """ms of one fused layer: the kernel, the unfused library path, the cuDNN conv alone (NCHW, NHWC)."""
    import torch.nn.functional as F

    x, s, w, n, bias = _layer_inputs(shape, cb.PRECISIONS[prec], ctx.device)
    x_cl, w_cl = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ms = {
            "fused_ms": _time_cuda(lambda: fm.modulated_conv2d(x, s, w, n, 1.0, bias, impl="cuda"), iters),
            "unfused_ms": _time_cuda(lambda: fm.modulated_conv2d_fused_ref(x, s, w, n, 1.0, bias), iters),
            "cudnn_conv_nchw_ms": _time_cuda(lambda: F.conv2d(x, w, padding=1), iters),
            "cudnn_conv_nhwc_ms": _time_cuda(lambda: F.conv2d(x_cl, w_cl, padding=1), iters),
        }
    gflop = fm.flops((shape[0], shape[1], shape[3], shape[4]), shape[2]) / 1e9
    row = {"shape": list(shape), "precision": prec, "gflop": round(gflop, 3), **{k: round(v, 4) for k, v in ms.items()}}
    row["fused_tflops"] = round(gflop / ms["fused_ms"], 2)
    row["speedup_vs_unfused"] = round(ms["unfused_ms"] / ms["fused_ms"], 2)
    row["speedup_vs_cudnn_conv_nhwc"] = round(ms["cudnn_conv_nhwc_ms"] / ms["fused_ms"], 2)
    return row


def step_frame_timing(ctx: Ctx) -> dict:
    model = _model(ctx)
    batches = (1, 2) if ctx.dry else FRAME_BATCHES
    out: dict[str, Any] = {"batches": list(batches), "precisions": {}}
    if ctx.dry:
        out["skipped_timing"] = "dry run on the CPU: the steps ran at tiny size, no times are recorded"
    for prec in ctx.time_precisions:
        runner = cb.TorchCudaRunner(model, prec, device=str(ctx.device), impl=ctx.impl, max_batch=max(batches))
        rows = []
        for b in batches:
            if ctx.elapsed() > ctx.budget_s:
                rows.append({"batch": b, "skipped": "time budget"})
                continue
            inp = _frame_inputs(ctx.cfg, b, seed=b)
            id0, id1 = runner.encode_identity(inp["id_img"])
            frames = None
            for _ in range(3):  # eager, capture, replay
                frames = runner.step(inp["pose_img"], inp["mel"], id0, id1)
            assert frames is not None and frames.shape == (b, 3, ctx.cfg.size, ctx.cfg.size)
            if not bool(torch.isfinite(frames).all()):
                raise AssertionError(f"non-finite frames at batch {b}")
            if ctx.dry:
                rows.append({"batch": b, "ran": True})
                continue
            n = max(5, min(30, int(2000 / (b + 10))))
            t = time.perf_counter()
            for _ in range(n):
                runner.step(inp["pose_img"], inp["mel"], id0, id1)
            ms = (time.perf_counter() - t) * 1e3 / n
            row = {
                "batch": b,
                "iters": n,
                "ms_per_step": round(ms, 3),
                "frames_per_s": round(b * 1e3 / ms, 1),
                "sessions_at_25fps": round(b * 1e3 / ms / FPS, 1),
            }
            row.update(_stage_ms(runner, inp, id0, id1))
            rows.append(row)
        out["precisions"][prec] = {"graphs": rows, "describe": runner.describe()}
        if not ctx.dry:
            eager = cb.TorchCudaRunner(model, prec, device=str(ctx.device), max_batch=8, cuda_graphs=False)
            er = []
            for b in (1, 8):
                inp = _frame_inputs(ctx.cfg, b, seed=b)
                id0, id1 = eager.encode_identity(inp["id_img"])
                for _ in range(3):
                    eager.step(inp["pose_img"], inp["mel"], id0, id1)
                t = time.perf_counter()
                for _ in range(10):
                    eager.step(inp["pose_img"], inp["mel"], id0, id1)
                er.append({"batch": b, "ms_per_step": round((time.perf_counter() - t) * 1e2, 3)})
            out["precisions"][prec]["eager"] = er
            timed = [r for r in rows if "ms_per_step" in r]
            if timed:
                best = max(timed, key=lambda r: r["frames_per_s"])
                fits = [r for r in timed if r["ms_per_step"] <= LATENCY_MS]
                lat = max(fits, key=lambda r: r["frames_per_s"]) if fits else None
                out["precisions"][prec]["summary"] = {
                    "sessions_at_25fps_max": best["sessions_at_25fps"],
                    "at_batch": best["batch"],
                    "sessions_at_25fps_step_within_80ms": lat["sessions_at_25fps"] if lat else 0.0,
                    "at_batch_within_80ms": lat["batch"] if lat else None,
                }
        del runner
    return out


def _stage_ms(runner: cb.TorchCudaRunner, inp: dict[str, torch.Tensor], id0, id1) -> dict[str, float]:
    """Device time of each stage (CUDA events on the runner's stream), inputs already on the device."""
    dev = runner.device
    res = {}
    with torch.inference_mode(), torch.cuda.stream(runner.stream):
        pose_img, mel = inp["pose_img"].to(dev), inp["mel"].to(dev)
        d0, d1 = id0.to(dev), id1.to(dev)
        pose = runner.pose_device(pose_img).clone()
        mouth = runner.audio_device(mel).clone()
        for name, fn in (
            ("pose_ms", lambda: runner.pose_device(pose_img)),
            ("audio_ms", lambda: runner.audio_device(mel)),
            ("generator_ms", lambda: runner.generate_device(d0, d1, mouth, pose)),
        ):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fn()
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            res[name] = round(start.elapsed_time(end) / 5, 3)
    return res


def step_onnxruntime_cuda(ctx: Ctx) -> dict:
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"skipped": f"onnxruntime not importable: {type(e).__name__}: {e}"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "skipped": f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            f"(providers: {ort.get_available_providers()})"
        }
    if ctx.dry:
        return {"skipped": "dry run"}
    import numpy as np

    from rt_engine.backends.onnx_backend import ensure_graphs

    model = _model(ctx)
    t = time.perf_counter()
    d = ensure_graphs(model, ctx.out_dir / "onnx")
    info: dict[str, Any] = {
        "export_s": round(time.perf_counter() - t, 1),
        "graphs": "fp32, noise as inputs",
        "rows": [],
    }
    sess = {
        k: ort.InferenceSession(str(d / f"{k}.onnx"), providers=["CUDAExecutionProvider"])
        for k in ("pose", "audio", "generator")
    }
    info["providers"] = sess["generator"].get_providers()
    gen = model.generator
    for b in (1, 8, 32):
        if ctx.elapsed() > ctx.budget_s:
            info["rows"].append({"batch": b, "skipped": "time budget"})
            continue
        inp = _frame_inputs(ctx.cfg, b, seed=b)
        feeds = {
            "style": np.random.default_rng(0).standard_normal((b, ctx.cfg.style_dim), dtype=np.float32),
            "id_map": np.random.default_rng(1).standard_normal(
                (b, ctx.cfg.id_map_channels, ctx.cfg.start, ctx.cfg.start), dtype=np.float32
            ),
        }
        for i in range(ctx.cfg.num_noises):
            buf = getattr(gen.noises, f"noise_{i}").float().cpu().numpy()
            feeds[f"noise_{i}"] = np.ascontiguousarray(np.broadcast_to(buf, (b, *buf.shape[1:])))
        stage_feeds = {
            "pose": {"img": inp["pose_img"].numpy()},
            "audio": {"mel": inp["mel"].numpy()},
            "generator": feeds,
        }
        for _ in range(3):
            _ort_frame(sess, stage_feeds)
        n = 10
        t = time.perf_counter()
        for _ in range(n):
            _ort_frame(sess, stage_feeds)
        ms = (time.perf_counter() - t) * 1e3 / n
        info["rows"].append(
            {
                "batch": b,
                "ms_per_step": round(ms, 3),
                "frames_per_s": round(b * 1e3 / ms, 1),
                "sessions_at_25fps": round(b * 1e3 / ms / FPS, 1),
            }
        )
    return info


def _ort_frame(sessions: dict[str, Any], feeds: dict[str, dict]) -> None:
    for stage, f in feeds.items():  # pose, audio, generator; numpy in and out (host copies included)
        sessions[stage].run(None, f)


STEPS: list[tuple[str, Callable[[Ctx], dict], bool]] = [  # name, function, needs the native module
    ("env", step_env, False),
    ("build", step_build, False),
    ("op_parity", step_op_parity, True),
    ("generator_psnr", step_generator_psnr, True),
    ("layer_timing", step_layer_timing, True),
    ("frame_timing", step_frame_timing, True),
    ("racecheck", step_racecheck, True),  # after the timings: under the sanitizer, CUDA start-up is slow
    ("onnxruntime_cuda", step_onnxruntime_cuda, False),
]


# ----------------------------------------------------------------------------------------------- report
def _plain(o: Any) -> Any:
    """JSON-safe copy: inf / nan floats as strings (strict JSON has neither), other objects as str."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if o is None or isinstance(o, bool | int | float | str):
        return o
    return str(o)


def markdown(result: dict) -> str:
    """The JSON's main figures as markdown tables."""
    lines = [
        f"# GPU check ({'dry run, CPU' if result['dry_run'] else result['steps']['env'].get('gpu', '?')})",
        "",
        f"{result['finished']} · {result['seconds']:.0f} s · config `{result['config']}`",
        "",
        "| step | status | s | note |",
        "|---|---|---|---|",
    ]
    for name, st in result["steps"].items():
        note = st.get("error") or st.get("skipped") or st.get("skipped_timing") or st.get("skipped_sanitizer") or ""
        lines.append(f"| {name} | {st['status']} | {st.get('seconds', 0):.1f} | {str(note)[:120]} |")
    op = result["steps"].get("op_parity", {})
    if op.get("worst_rel_err"):
        lines += ["", "| fused op vs fp32 reference | worst rel. error |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in op["worst_rel_err"].items()]
    gp = result["steps"].get("generator_psnr", {}).get("precisions", {})
    if gp:
        lines += [
            "",
            "| precision | generator PSNR min (dB) | frame PSNR min (dB) | replay vs eager dB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {p} | {r['generator_psnr_min']:.1f} | {r['frame_psnr_min']:.1f} | "
            f"{r['replay_vs_first_call_psnr']:.1f} |"
            for p, r in gp.items()
        ]
    lt = result["steps"].get("layer_timing", {}).get("rows", [])
    if lt:
        lines += [
            "",
            "| B,Cin,Cout,H,W | prec | fused ms | unfused ms | cuDNN conv NHWC ms | fused TFLOP/s | x unfused |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {','.join(map(str, r['shape']))} | {r['precision']} | {r['fused_ms']} | {r['unfused_ms']} | "
            f"{r['cudnn_conv_nhwc_ms']} | {r['fused_tflops']} | {r['speedup_vs_unfused']} |"
            for r in lt
        ]
    ft = result["steps"].get("frame_timing", {}).get("precisions", {})
    for prec, d in ft.items():
        timed = [r for r in d.get("graphs", []) if "ms_per_step" in r]
        if timed:
            lines += [
                "",
                f"Whole frame, {prec}, CUDA graphs:",
                "",
                "| batch | ms/step | frames/s | sessions at 25 fps | pose ms | audio ms | generator ms |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['batch']} | {r['ms_per_step']} | {r['frames_per_s']} | {r['sessions_at_25fps']} | "
                f"{r.get('pose_ms')} | {r.get('audio_ms')} | {r.get('generator_ms')} |"
                for r in timed
            ]
        if d.get("summary"):
            s = d["summary"]
            lines += [
                "",
                f"Sessions per GPU at 25 fps ({prec}): {s['sessions_at_25fps_max']} (batch {s['at_batch']}); "
                f"with the step within {LATENCY_MS:.0f} ms: {s['sessions_at_25fps_step_within_80ms']} "
                f"(batch {s['at_batch_within_80ms']}).",
            ]
    ort_rows = [r for r in result["steps"].get("onnxruntime_cuda", {}).get("rows", []) if "ms_per_step" in r]
    if ort_rows:
        lines += [
            "",
            "onnxruntime CUDA provider (fp32 graphs):",
            "",
            "| batch | ms/step | frames/s | sessions |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch']} | {r['ms_per_step']} | {r['frames_per_s']} | {r['sessions_at_25fps']} |" for r in ort_rows
        ]
    return "\n".join(lines) + "\n"


def run_check(ctx: Ctx) -> dict:
    result: dict[str, Any] = {
        "dry_run": ctx.dry,
        "config": ctx.cfg.name,
        "device": str(ctx.device),
        "impl": ctx.impl,
        "precisions": list(ctx.precisions),
        "time_precisions": list(ctx.time_precisions),
        "steps": {},
    }
    if ctx.device.type == "cuda":  # the reference is fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    for name, fn, needs_native in STEPS:
        t = time.perf_counter()
        if needs_native and not ctx.native_ok:
            result["steps"][name] = {"status": "skipped", "skipped": "the native module did not build"}
            continue
        if name not in ("env", "build") and ctx.elapsed() > ctx.budget_s:
            result["steps"][name] = {"status": "skipped", "skipped": f"time budget {ctx.budget_s:.0f} s spent"}
            continue
        log.info("step %s", name)
        try:
            info = fn(ctx)
            status = "skipped" if "skipped" in info else "ok"
            result["steps"][name] = {"status": status, **info}
        except Exception as e:  # record and go on: one failed step must not hide the others' results
            log.error("step %s failed: %s", name, e)
            result["steps"][name] = {
                "status": "failed",
                "error": f"{type(e).__name__}: {str(e)[:2000]}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result["steps"][name]["seconds"] = round(time.perf_counter() - t, 1)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(ctx.elapsed(), 1)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["ok"] = all(s["status"] != "failed" for s in result["steps"].values())
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes, C++ twin and emulator, no timings")
    ap.add_argument(
        "--json",
        default=None,
        help="output JSON (default benchmarks/results/gpu_check.json, dry run build/gpu_check_dry.json); "
        "the markdown table goes beside it",
    )
    ap.add_argument("--checkpoint", default=None, help="model to check (default: random weights of --preset)")
    ap.add_argument("--preset", default=None, help="model preset (default official; dry run tiny)")
    ap.add_argument("--precisions", default="fp32,fp16,bf16", help="storage types checked for parity")
    ap.add_argument("--time-precisions", default="fp16", help="storage types timed (layers and frames)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip later timed work after this many seconds")
    ap.add_argument("--sanitizer-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.sanitizer_child:
        return sanitizer_child()
    if not args.dry_run and not torch.cuda.is_available():
        raise ConfigError(f"no CUDA GPU ({cb.cuda_missing()}); use --dry-run on a CPU machine")
    precisions = tuple(p for p in args.precisions.split(",") if p)
    time_precisions = tuple(p for p in args.time_precisions.split(",") if p)
    for p in precisions + time_precisions:
        if p not in cb.PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; choose from {sorted(cb.PRECISIONS)}")
    out_json = Path(args.json or ("build/gpu_check_dry.json" if args.dry_run else "benchmarks/results/gpu_check.json"))
    out_json.parent.mkdir(parents=True, exist_ok=True)
    work = REPO / "build" / "gpu_check"  # scratch (ONNX export): git-ignored
    work.mkdir(parents=True, exist_ok=True)
    cfg = model_preset(args.preset or ("tiny" if args.dry_run else "official"))  # ConfigError: one line
    ctx = Ctx(
        dry=args.dry_run,
        cfg=cfg,
        device=torch.device("cpu" if args.dry_run else "cuda"),
        impl="cpu" if args.dry_run else "cuda",
        out_dir=work.resolve(),
        budget_s=args.budget_s,
        precisions=precisions,
        time_precisions=time_precisions,
        checkpoint=args.checkpoint,
    )
    result = run_check(ctx)
    out_json.write_text(json.dumps(_plain(result), indent=1) + "\n")
    out_json.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s and %s (%s)", out_json, out_json.with_suffix(".md"), "ok" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
