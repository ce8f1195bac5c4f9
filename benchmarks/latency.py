"""Latency, throughput, FLOPs and memory of every backend, with the fp32 reference in the same run.

    python -m benchmarks.latency --preset official [--backends torch,torch-fast:bf16,openvino:bf16] \\
        [--frames 20] [--batch 4] [--quick] [--memory-frames 10000] [--demo PATH] [--kernels] [--serve]

What one run measures (random weights are fine for speed; ``--checkpoint`` loads real ones):

1. The machine: CPU model and flags (AVX-512 BF16 / AMX), threads, load average at start and end
   (``os.getloadavg``: other processes make every number pessimistic), and a **peak** of its own:
   fp32 and bf16 3x3 channels-last convs at a few shapes (best TFLOP/s per dtype).
2. FLOPs per frame of each stage, counted on the reference networks with
   ``torch.utils.flop_counter.FlopCounterMode`` (the model's math: the dense-upsampling rewrite of
   ``torch-fast`` does more multiply-adds than this; achieved TFLOP/s uses the model's FLOPs).
3. Per variant (``backend:precision``; ``torch:fp32`` is the reference and always runs first):
   per-stage latency (identity, pose, audio, generator) at batch 1 and at ``--batch``; per-frame
   end to end, **ahead** (pose codes of a file pose source computed ahead: audio + generator per
   frame) and **live** (a pose frame encoded every frame: pose + audio + generator); p50/p95/p99,
   frames/s, speed-up over the reference, achieved TFLOP/s and fraction of the measured peak; the
   PSNR of one generated frame against the reference; peak RSS.
4. ``--memory-frames N``: N live frames on the fastest variant, RSS sampled every 500 frames, the
   slope of a line fit (MB per 1000 frames) reported; ``--demo PATH``: PSNR against the fp32
   reference on the real upstream demo inputs (with the parity-fixture recipe weights for the
   official size, written to a temp dir).

Writes ``latency_<preset>.json``, ``.md`` and ``.png`` (matplotlib Agg) into ``--out``
(default benchmarks/out/, git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: python benchmarks/latency.py
    sys.path.insert(0, str(REPO))

from rt_engine.backends import available_backends, make_backend, psnr  # noqa: E402
from rt_engine.backends.base import Runner, compare  # noqa: E402
from rt_engine.backends.torch_backend import native_bf16  # noqa: E402
from rt_engine.config import model_preset  # noqa: E402
from rt_engine.models.pcavs import PCAVS  # noqa: E402

log = logging.getLogger("benchmarks.latency")

DEFAULT_OUT = REPO / "benchmarks" / "out"
FIXTURE = "fixtures/pcavs_official_v1"
FPS_HALF = 12.5  # pose frames encoded per second in the half-rate live mode
DEMO_FILES = {  # relative to --demo (the upstream demo's misc/ folder)
    "identity": "Input_unz/Input/517600055/000000.jpg",
    "pose": "Pose_Source_unz/Pose_Source/517600078",
    "audio": "Audio_Source_unz/Audio_Source/681600002.flac",
}
ALL_VARIANTS = (
    "torch:fp32",
    "torch:bf16",
    "torch-fast:fp32",
    "torch-fast:bf16",
    "torch-compile:fp32",
    "torch-compile:bf16",
    "onnxruntime:fp32",
    "openvino:fp32",
    "openvino:bf16",
)
REFERENCE = "torch:fp32"


# ------------------------------------------------------------------------------------ helpers
def shared_dir() -> Path | None:
    p = Path(os.environ.get("RT_ENGINE_SHARED", REPO.parent / "shared"))
    return p if p.is_dir() else None


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "model": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "onednn_native_bf16": native_bf16(),
    }


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms, np.float64)
    return {
        "n": len(ms),
        "mean_ms": float(a.mean()),
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
    }


MIN_CALLS = 3  # timed calls per measurement even past the budget (2 with --quick)


def timed(fn: Callable[[], Any], reps: int, budget_s: float, warmup: int = 1) -> list[float]:
    """Latencies (ms) of ``reps`` calls after ``warmup``; stops early after ``budget_s`` (>= MIN_CALLS)."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(out) < reps and (len(out) < MIN_CALLS or time.perf_counter() < t_end):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


# ------------------------------------------------------------------------------------ peak
def measure_peak(quick: bool, threads: int) -> dict[str, Any]:
    """This machine's own 3x3-conv peak: OpenVINO's (``benchmarks.breakdown.openvino_peak``: a best-of
    over warm calls, stable from run to run) where OpenVINO is installed, else torch's channels-last
    convs at a few shapes (best TFLOP/s per dtype; it varies more between runs)."""
    if "openvino" in available_backends():
        from benchmarks.breakdown import openvino_peak

        res = openvino_peak(threads, reps=3 if quick else 10)
        res["source"] = "openvino"
        return res
    import torch.nn.functional as F

    shapes = [(64, 28)] if quick else [(128, 56), (256, 28), (512, 14), (512, 28)]
    res: dict[str, Any] = {"shapes": [], "source": "torch"}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for c, r in shapes:
            x = torch.randn(1, c, r, r).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                ms = min(timed(lambda x=x, w=w: F.conv2d(x, w, padding=1), 3 if quick else 6, 5.0))
            tf = 2 * c * c * 9 * r * r / (ms * 1e-3) / 1e12
            res["shapes"].append({"dtype": str(dtype).removeprefix("torch."), "C": c, "H": r, "ms": ms, "tflops": tf})
            best = max(best, tf)
        res[str(dtype).removeprefix("torch.")] = best
    res["best_tflops"] = max(res["float32"], res["bfloat16"])
    return res


# ------------------------------------------------------------------------------------ FLOPs
def count_flops(model: PCAVS) -> dict[str, float]:
    """FLOPs per frame (batch 1) of each stage, counted on the reference networks."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    img = torch.rand(1, 3, 224, 224) * 2 - 1
    mel = torch.rand(1, 1, 80, 20)
    id0, id1 = torch.rand(1, cfg.id_dim), torch.randn(1, *cfg.id_map_shape)
    style = torch.cat([id0, torch.randn(1, cfg.mouth_dim), torch.randn(1, cfg.pose_dim)], 1)
    out = {}
    calls = {
        "identity": lambda: model.encode_identity(img),
        "pose": lambda: model.encode_pose(img),
        "audio": lambda: model.encode_mouth(mel),
        "generator": lambda: model.generate(style, id1),
    }
    with torch.inference_mode():
        for name, fn in calls.items():
            fc = FlopCounterMode(display=False)
            with fc:
                fn()
            out[name] = float(fc.get_total_flops())
    out["frame_live"] = out["pose"] + out["audio"] + out["generator"]
    out["frame_ahead"] = out["audio"] + out["generator"]
    return out


# ------------------------------------------------------------------------------------ variants
def parse_variants(spec: str | None, quick: bool) -> list[str]:
    """Variants to time, reference first; ``none``: time nothing (e.g. a --demo-only run)."""
    avail = set(available_backends())
    if spec == "none":
        return []
    if spec:
        out = []
        for v in spec.split(","):
            v = v.strip()
            name, _, prec = v.partition(":")
            out.append(f"{name}:{prec or ('fp32' if name in ('torch', 'onnxruntime') else 'auto')}")
    elif quick:
        out = ["torch:fp32", "torch-fast:auto", "openvino:auto"]
    else:
        out = list(ALL_VARIANTS)
    out = [v for v in out if v.partition(":")[0] in avail or v.partition(":")[0] == "torch"]
    return [REFERENCE] + [v for v in out if v != REFERENCE]


def build(variant: str, model: PCAVS) -> Runner:
    """``backend:precision[:option]``: the third field picks torch-fast's upsampling form, or for
    OpenVINO the encoders' precision (``enc-fp32``: fp32 encoders, the generator in ``precision``)."""
    name, prec, *rest = variant.split(":")
    opts: dict[str, Any] = {}
    if rest and name == "openvino":
        opts["encoder_precision"] = rest[0].removeprefix("enc-")
    elif rest:
        opts["upsample"] = rest[0]
    return make_backend(name, model=model, precision=prec, **opts)


class Inputs:
    """Random benchmark inputs (or real ones with --demo) at batch 1 and batch B."""

    def __init__(self, cfg, batch: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.id_img = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1  # [1,3,224,224]
        self.pose = torch.rand(batch, 3, 224, 224, generator=g) * 2 - 1  # [B,3,224,224]
        self.mel = torch.rand(batch, 1, 80, 20, generator=g)  # [B,1,80,20]
        self.pose_codes = torch.randn(batch, cfg.pose_dim, generator=g) * 5  # [B,12] computed ahead


def bench_variant(
    runner: Runner, inp: Inputs, batch: int, reps: int, budget_s: float, flops: dict[str, float]
) -> dict[str, Any]:
    res: dict[str, Any] = {"describe": runner.describe(), "stages": {}, "batched": {}, "e2e": {}}
    with torch.inference_mode():
        id_ms = timed(lambda: runner.encode_identity(inp.id_img), max(MIN_CALLS, reps // 4), budget_s)
        id0, id1 = runner.encode_identity(inp.id_img)
        p1, m1, c1 = inp.pose[:1], inp.mel[:1], inp.pose_codes[:1]
        mouth1, pose1 = runner.encode_audio(m1), runner.encode_pose(p1)
        res["stages"]["identity"] = stats(id_ms)
        res["stages"]["pose"] = stats(timed(lambda: runner.encode_pose(p1), reps, budget_s))
        res["stages"]["audio"] = stats(timed(lambda: runner.encode_audio(m1), reps, budget_s))
        res["stages"]["generator"] = stats(timed(lambda: runner.generate(id0, id1, mouth1, pose1), reps, budget_s))
        ahead = timed(lambda: runner.generate(id0, id1, runner.encode_audio(m1), c1), reps, budget_s)
        live = timed(lambda: runner.generate(id0, id1, runner.encode_audio(m1), runner.encode_pose(p1)), reps, budget_s)

        def two_frames_half_pose() -> None:  # the pose frame of every second frame encoded; codes interpolated
            c = runner.encode_pose(p1)
            runner.generate(id0, id1, runner.encode_audio(m1), c)
            runner.generate(id0, id1, runner.encode_audio(m1), c)

        live_half = [ms / 2 for ms in timed(two_frames_half_pose, max(MIN_CALLS, reps // 2), budget_s)]
        fl_half = flops["frame_ahead"] + flops["pose"] / 2
        for key, ms, fl in (
            ("ahead", ahead, flops["frame_ahead"]),
            ("live", live, flops["frame_live"]),
            ("live_half_pose", live_half, fl_half),
        ):
            s = stats(ms)
            s["fps"] = 1e3 / s["mean_ms"]
            s["tflops"] = fl / (s["mean_ms"] * 1e-3) / 1e12
            res["e2e"][key] = s
        if batch > 1:
            mb, pb = runner.encode_audio(inp.mel), runner.encode_pose(inp.pose)
            bstage = {
                "pose": lambda: runner.encode_pose(inp.pose),
                "audio": lambda: runner.encode_audio(inp.mel),
                "generator": lambda: runner.generate(id0, id1, mb, pb),
                "live": lambda: runner.generate(id0, id1, runner.encode_audio(inp.mel), runner.encode_pose(inp.pose)),
            }
            for k, fn in bstage.items():
                s = stats(timed(fn, max(MIN_CALLS, reps // batch), budget_s))
                s["frames_per_s"] = batch * 1e3 / s["mean_ms"]
                res["batched"][k] = s
            res["batched"]["batch"] = batch
        res["frame"] = runner.generate(id0, id1, mouth1, pose1)  # [1,3,H,W], compared later
        if runner.name == "openvino":  # where the generator's time goes, per part of the network
            from benchmarks.breakdown import generator_breakdown

            res["breakdown"] = generator_breakdown(runner, id0, id1, mouth1, pose1)
    res["describe"] = runner.describe()  # after the calls: runtimes report what they compiled to
    res["rss_mb"] = rss_mb()
    return res


# ------------------------------------------------------------------------------------ memory
def memory_run(runner: Runner, inp: Inputs, frames: int, every: int = 500) -> dict[str, Any]:
    """RSS every ``every`` frames of a live loop; slope of a least-squares line (MB per 1000 frames)."""
    from tqdm import tqdm

    samples: list[tuple[int, float]] = []
    with torch.inference_mode():
        id0, id1 = runner.encode_identity(inp.id_img)
        p1, m1 = inp.pose[:1], inp.mel[:1]
        t0 = time.perf_counter()
        for i in tqdm(range(frames + 1), desc=f"memory {runner.name}", unit="frame", mininterval=10):
            if i % every == 0:
                gc.collect()
                samples.append((i, rss_mb()))
            if i < frames:
                runner.generate(id0, id1, runner.encode_audio(m1), runner.encode_pose(p1))
        seconds = time.perf_counter() - t0
    xs = np.array([s[0] for s in samples[1:]], np.float64)  # the first interval includes warm-up
    ys = np.array([s[1] for s in samples[1:]], np.float64)
    slope = float(np.polyfit(xs, ys, 1)[0] * 1000) if len(xs) >= 2 else float("nan")
    return {
        "runner": runner.describe(),
        "frames": frames,
        "every": every,
        "seconds": seconds,
        "rss_samples_mb": samples,
        "slope_mb_per_1000_frames": slope,
        "growth_mb_after_warmup": float(ys[-1] - ys[0]) if len(ys) >= 2 else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
    }


# ------------------------------------------------------------------------------------ demo
def recipe_checkpoint(out_dir: Path) -> Path:
    """Official-format checkpoints from the parity fixture's weight recipe (README section 2)."""
    sd_dir = shared_dir()
    fx = sd_dir / FIXTURE if sd_dir else None
    if fx is None or not (fx / "recipe.py").is_file():
        raise FileNotFoundError("parity fixture not found (set RT_ENGINE_SHARED)")
    spec = importlib.util.spec_from_file_location("pcavs_recipe", fx / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    man = json.loads((fx / "manifest.json").read_text())
    bn = np.load(fx / "bn_stats.npz")
    d = out_dir / "demo"
    d.mkdir(parents=True, exist_ok=True)
    for net, e in man["networks"].items():
        sd = recipe.state_dict(man["salt"], net, e["keys"], bn)
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, d / f"latest_net_{net}.pth")
    return d


def demo_fidelity(demo: Path, model: PCAVS, variants: list[str], frames: int) -> dict[str, Any]:
    """PSNR of each variant's frames against the fp32 reference on the real upstream demo inputs."""
    from rt_engine.render import render_arrays

    paths = {k: demo / v for k, v in DEMO_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"demo inputs missing: {missing}")
    out: dict[str, Any] = {"inputs": {k: str(v) for k, v in paths.items()}, "frames": frames, "variants": {}}
    ref = None
    for v in variants:
        runner = build(v, model)
        r = render_arrays(
            paths["identity"],
            paths["audio"],
            paths["pose"],
            aligned=True,
            runner=runner,
            max_frames=frames,
            batch_size=min(frames, 4),
        )
        fr = torch.from_numpy(r.frames)
        if ref is None:
            ref = fr
        per = [psnr(fr[i], ref[i]) for i in range(len(fr))]
        c = compare(ref, fr, value_range=2.0)
        out["variants"][v] = {"psnr_db": c["psnr_db"], "min_frame_psnr_db": min(per), "max_abs": c["max_abs"]}
        log.info("demo %s: PSNR %.2f dB (worst frame %.2f)", v, out["variants"][v]["psnr_db"], min(per))
        del runner
        gc.collect()
    return out


def pose_half_rate_fidelity(demo: Path, model: PCAVS, variant: str, frames: int) -> dict[str, Any]:
    """What encoding the pose of every second frame costs in quality, on the real demo pose video:
    the pose codes of odd frames interpolated from their even neighbours against encoded ones
    (error relative to the codes' own spread), and the PSNR of the frames they generate."""
    from rt_engine.inputs import audio as audio_in
    from rt_engine.inputs.image import official_crop, to_tensor
    from rt_engine.inputs.pose import interpolate_codes
    from rt_engine.render import PoseClip, load_identity

    paths = {k: demo / v for k, v in DEMO_FILES.items()}
    runner = build(variant, model)
    clip = PoseClip(paths["pose"], True, None)
    n = frames + (frames % 2 == 0)  # odd: the last frame is a key frame, every odd frame lies between two
    crops = to_tensor(np.stack([official_crop(clip.get(clip.index(i))) for i in range(n)]))  # [n,3,224,224]
    with torch.inference_mode():
        full = torch.cat([runner.encode_pose(crops[i : i + 4]) for i in range(0, n, 4)]).numpy()  # [n,12]
        half = interpolate_codes(full[::2], n, key_fps=FPS_HALF, fps=2 * FPS_HALF)  # [n,12]
        odd = slice(1, n, 2)
        err = np.sqrt(np.mean((half[odd] - full[odd]) ** 2)) / (np.std(full, axis=0).mean() + 1e-12)
        id0, id1 = runner.encode_identity(to_tensor(official_crop(load_identity(paths["identity"], True))))
        _, mel = audio_in.audio_features(audio_in.load_audio(paths["audio"]))
        wins = torch.from_numpy(audio_in.mel_windows(mel, audio_in.target_frames(mel.shape[0])[:n]))  # [n,1,80,20]
        per = []
        for i in range(1, n, 2):
            mouth = runner.encode_audio(wins[i : i + 1])
            a = runner.generate(id0, id1, mouth, torch.from_numpy(full[i : i + 1]))
            b = runner.generate(id0, id1, mouth, torch.from_numpy(half[i : i + 1]))
            per.append(psnr(b, a))
    out = {
        "variant": variant,
        "frames": n,
        "code_rms_error_rel": float(err),  # RMS error of interpolated codes / mean per-dim std of the codes
        "frame_psnr_db_mean": float(np.mean(per)),  # interpolated-pose frames vs encoded-pose frames (odd)
        "frame_psnr_db_min": float(np.min(per)),
    }
    log.info("pose at half rate (%s): code error %.3f of spread, frame PSNR %.1f dB", variant, err, np.mean(per))
    return out


# ------------------------------------------------------------------------------------ report
def fmt(x: float, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"# Latency, preset `{rep['preset']}`",
        "",
        f"CPU: {m['cpu']['model']} ({m['cpu']['cores']} cores, torch threads {m['threads']}), "
        f"native bf16: {m['cpu']['onednn_native_bf16']}, AMX: {m['cpu']['amx_bf16']}. "
        f"Load average at start {m['load_start'][0]:.2f}, end {m['load_end'][0]:.2f} "
        f"(> 0 means other processes shared the cores; numbers are then pessimistic).",
        "",
        f"FLOPs per frame: generator {rep['flops']['generator'] / 1e9:.2f} G, pose "
        f"{rep['flops']['pose'] / 1e9:.2f} G, audio {rep['flops']['audio'] / 1e9:.3f} G, identity "
        f"{rep['flops']['identity'] / 1e9:.2f} G (once). Measured peak (3x3 conv, {rep['peak']['source']}): "
        f"{rep['peak']['best_tflops']:.3f} TFLOP/s; % peak uses it.",
        "",
        "| variant | identity ms | pose ms | audio ms | generator ms | ahead p50/p95/p99 ms | ahead fps | "
        "live p50/p95/p99 ms | live fps | live fps, pose every 2nd frame | speed-up (live) | TFLOP/s | % peak "
        "| batched fps | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in rep["variants"].items():
        if "error" in r:
            lines.append(f"| {v} | failed: {r['error'][:80]} |" + " |" * 13)
            continue
        st, a, li = r["stages"], r["e2e"]["ahead"], r["e2e"]["live"]
        bf = r["batched"].get("live", {}).get("frames_per_s", float("nan"))
        lines.append(
            f"| {v} | {fmt(st['identity']['p50_ms'])} | {fmt(st['pose']['p50_ms'])} | {fmt(st['audio']['p50_ms'], 2)} "
            f"| {fmt(st['generator']['p50_ms'])} | {fmt(a['p50_ms'])}/{fmt(a['p95_ms'])}/{fmt(a['p99_ms'])} "
            f"| {fmt(a['fps'], 2)} | {fmt(li['p50_ms'])}/{fmt(li['p95_ms'])}/{fmt(li['p99_ms'])} | {fmt(li['fps'], 2)} "
            f"| {fmt(r['e2e'].get('live_half_pose', {}).get('fps', float('nan')), 2)} "
            f"| {fmt(r['speedup_live'], 2)}x | {fmt(li['tflops'], 3)} | {fmt(100 * r['peak_fraction'], 1)} "
            f"| {fmt(bf, 2)} | {fmt(r['psnr_vs_ref_db'])} |"
        )
    lines += ["", f"Peak RSS of the process: {rep['peak_rss_mb']:.0f} MB."]
    for v, r in rep["variants"].items():
        bd = r.get("breakdown")
        if not bd:
            continue
        lines += [
            "",
            f"Where the generator's time goes, {v} (batch 1, {bd['wall_ms']:.1f} ms; OpenVINO per-node counters, "
            f"spread over the wall time; peak {rep['peak']['best_tflops']:.3f} TFLOP/s):",
            "",
            "| part | ms | share | GFLOP | TFLOP/s | % peak |",
            "|---|---|---|---|---|---|",
        ]
        for part, d in bd["parts"].items():
            tf = d["tflops"]
            pk = 100 * tf / rep["peak"]["best_tflops"] if tf and rep["peak"]["best_tflops"] else None
            lines.append(
                f"| {part} | {d['ms']:.1f} | {100 * d['share']:.0f}% | {d['gflop']:.2f} "
                f"| {fmt(tf, 3) if tf else '-'} | {fmt(pk, 0) if pk else '-'} |"
            )
    if rep.get("memory"):
        mm = rep["memory"]
        lines.append(
            f"Memory run: {mm['frames']} live frames on {mm['runner']}: RSS slope "
            f"{mm['slope_mb_per_1000_frames']:.3f} MB per 1000 frames, growth after warm-up "
            f"{mm['growth_mb_after_warmup']:.1f} MB, peak RSS {mm['peak_rss_mb']:.0f} MB."
        )
    if rep.get("demo"):
        lines.append("")
        lines.append(f"Real inputs (upstream demo, {rep['demo']['frames']} frames, {rep['demo'].get('weights')}):")
        for v, d in rep["demo"]["variants"].items():
            worst = fmt(d["min_frame_psnr_db"], 2)
            lines.append(f"- {v}: PSNR {fmt(d['psnr_db'], 2)} dB vs fp32 (worst frame {worst})")
        ph = rep["demo"].get("pose_half_rate")
        if ph:
            lines.append(
                f"- pose of every second frame ({ph['variant']}): interpolated codes off by "
                f"{ph['code_rms_error_rel']:.3f} of their spread (RMS); their frames "
                f"{fmt(ph['frame_psnr_db_mean'], 1)} dB (worst {fmt(ph['frame_psnr_db_min'], 1)}) "
                "against frames from encoded codes"
            )
    return "\n".join(lines) + "\n"


def chart(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v for v, r in rep["variants"].items() if "error" not in r]
    ahead = [rep["variants"][v]["e2e"]["ahead"]["fps"] for v in names]
    live = [rep["variants"][v]["e2e"]["live"]["fps"] for v in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4.2))
    ax.bar(x - 0.2, ahead, 0.4, label="pose ahead (audio + generator)")
    ax.bar(x + 0.2, live, 0.4, label="live pose (pose + audio + generator)")
    ax.axhline(25, color="k", ls="--", lw=1, label="25 fps")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("frames/s (batch 1, log scale)")
    m = rep["machine"]
    ax.set_title(f"preset {rep['preset']}, {m['cpu']['model']}, load {m['load_start'][0]:.1f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.latency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--preset",
        default=None,
        choices=["official", "small", "tiny"],
        help="model size (default official; tiny with --quick)",
    )
    ap.add_argument("--checkpoint", default=None, help="real weights (default: random weights of the preset)")
    ap.add_argument(
        "--backends",
        default=None,
        help="comma list of backend[:precision[:option]] (option: torch-fast's upsampling form, or "
        f"openvino's enc-fp32 for fp32 encoders; default: all available of {', '.join(ALL_VARIANTS)})",
    )
    ap.add_argument("--frames", type=int, default=None, help="timed calls per measurement (default 20; 5 quick)")
    ap.add_argument("--batch", type=int, default=None, help="batch of the batched measurements (default 4; 2 quick)")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop a measurement after this many seconds (>= 3 calls; default 30, quick 2)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch / runtime threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="CI-cheap: tiny preset, few frames, no compile")
    ap.add_argument("--kernels", action="store_true", help="also run benchmarks/kernels.py: benchmark_kernels")
    ap.add_argument("--serve", action="store_true", help="also run benchmarks/serve_latency.py: main")
    ap.add_argument("--memory-frames", type=int, default=0, help="live frames of the RSS-growth run (0: skip)")
    ap.add_argument("--memory-every", type=int, default=500, help="RSS sample interval of the memory run (frames)")
    ap.add_argument("--memory-backend", default=None, help="variant of the memory run (default: the fastest)")
    ap.add_argument("--demo", default=None, help="upstream demo misc/ folder: PSNR on real inputs")
    ap.add_argument("--demo-frames", type=int, default=8)
    ap.add_argument(
        "--demo-backends",
        default=None,
        help="variants compared on the demo (default: the timed ones); the reference is added first",
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default benchmarks/out/)")
    ap.add_argument("--tag", default="", help="suffix of the output names: latency_<preset>_<tag>.*")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("export", "rt_engine.onnx_graphs", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    preset = args.preset or ("tiny" if args.quick else "official")
    global MIN_CALLS
    MIN_CALLS = 2 if args.quick else 3
    reps = args.frames or (3 if args.quick else 20)
    batch = args.batch or (2 if args.quick else 4)
    budget = args.budget_s or (0.5 if args.quick else 30.0)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rep: dict[str, Any] = {
        "preset": preset,
        "quick": args.quick,
        "frames": reps,
        "batch": batch,
        "budget_s": budget,
        "machine": {
            "cpu": cpu_info(),
            "threads": torch.get_num_threads(),
            "load_start": list(os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "host": platform.node(),
        },
        "variants": {},
    }
    log.info("machine: %s; load %s", rep["machine"]["cpu"], rep["machine"]["load_start"])
    torch.manual_seed(0)
    if args.checkpoint:
        from rt_engine.models.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        preset = rep["preset"] = model.cfg.name
    else:
        model = PCAVS(model_preset(preset)).eval()
    rep["weights"] = args.checkpoint or f"random (seed 0), preset {preset}"
    variants = parse_variants(args.backends, args.quick)
    rep["peak"] = measure_peak(args.quick, args.threads) if variants else {"best_tflops": 0.0, "source": "none"}
    log.info("peak 3x3 conv (%s): %.3f TFLOP/s", rep["peak"]["source"], rep["peak"]["best_tflops"])
    rep["flops"] = count_flops(model)
    log.info("GFLOP per frame: %s", {k: round(v / 1e9, 3) for k, v in rep["flops"].items()})
    inp = Inputs(model.cfg, batch)
    ref_frame = None
    for v in variants:
        log.info("variant %s", v)
        try:
            t = time.perf_counter()
            runner = build(v, model)
            build_s = time.perf_counter() - t
            r = bench_variant(
                runner,
                inp,
                batch,
                reps if v != REFERENCE or args.quick else max(MIN_CALLS, reps // 4),
                budget,
                rep["flops"],
            )
        except Exception as e:  # a backend failing must not lose the others' numbers
            log.exception("variant %s failed", v)
            rep["variants"][v] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r["build_s"] = build_s
        frame = r.pop("frame")
        if ref_frame is None:
            ref_frame = frame
        r["psnr_vs_ref_db"] = psnr(frame, ref_frame)
        rep["variants"][v] = r
        del runner
        gc.collect()
    ref = rep["variants"].get(REFERENCE, {})
    for r in rep["variants"].values():
        if "error" in r or "e2e" not in ref:
            continue
        r["speedup_live"] = ref["e2e"]["live"]["mean_ms"] / r["e2e"]["live"]["mean_ms"]
        r["speedup_ahead"] = ref["e2e"]["ahead"]["mean_ms"] / r["e2e"]["ahead"]["mean_ms"]
        r["peak_fraction"] = r["e2e"]["live"]["tflops"] / rep["peak"]["best_tflops"]
    ok = {v: r for v, r in rep["variants"].items() if "error" not in r}
    if ok:
        best = min(ok, key=lambda v: ok[v]["e2e"]["live"]["mean_ms"])
        rep["fastest"] = {
            "variant": best,
            "live_fps": ok[best]["e2e"]["live"]["fps"],
            "ahead_fps": ok[best]["e2e"]["ahead"]["fps"],
            "speedup_live": ok[best].get("speedup_live"),
        }
        log.info("fastest: %s", rep["fastest"])
    if args.memory_frames:
        v = args.memory_backend or rep.get("fastest", {}).get("variant", REFERENCE)
        rep["memory"] = memory_run(build(v, model), inp, args.memory_frames, args.memory_every)
        log.info("memory: slope %.3f MB/1000 frames", rep["memory"]["slope_mb_per_1000_frames"])
    if args.demo:
        demo_model, weights = model, rep["weights"]
        with tempfile.TemporaryDirectory(prefix="rt_latency_") as tmp:
            if not args.checkpoint and preset == "official":
                from rt_engine.models.checkpoint import load_official

                demo_model = load_official(recipe_checkpoint(Path(tmp)))
                weights = "parity-fixture recipe weights (official size)"
            dv = (
                [REFERENCE] + [v for v in args.demo_backends.split(",") if v != REFERENCE]
                if args.demo_backends
                else [v for v in variants if v in ok]
            )
            rep["demo"] = demo_fidelity(Path(args.demo), demo_model, dv, args.demo_frames)
            rep["demo"]["weights"] = weights
            best = rep.get("fastest", {}).get("variant", REFERENCE)
            rep["demo"]["pose_half_rate"] = pose_half_rate_fidelity(Path(args.demo), demo_model, best, args.demo_frames)
    if args.kernels:
        if importlib.util.find_spec("benchmarks.kernels"):
            kb = importlib.import_module("benchmarks.kernels")
            rep["kernels"] = kb.benchmark_kernels("cuda" if torch.cuda.is_available() else "cpu")
        else:
            rep["kernels"] = {"skipped": "benchmarks/kernels.py not present"}
    if args.serve:
        if importlib.util.find_spec("benchmarks.serve_latency"):
            sl = importlib.import_module("benchmarks.serve_latency")
            argv = ["--seconds", "5" if args.quick else "20"]
            argv += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else ["--preset", "bundled"]
            rep["serve"] = sl.main(argv)  # glass-to-glass latency through the real server
        else:
            rep["serve"] = {"skipped": "benchmarks/serve_latency.py not present"}
    rep["machine"]["load_end"] = list(os.getloadavg())
    rep["peak_rss_mb"] = peak_rss_mb()
    rep["seconds"] = time.perf_counter() - t_start
    stem = out_dir / (f"latency_{preset}" + (f"_{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=float))
    stem.with_suffix(".md").write_text(markdown(rep))
    try:
        chart(rep, stem.with_suffix(".png"))
    except ImportError as e:
        log.warning("no chart (matplotlib missing: %s)", e)
    log.info("wrote %s.{json,md,png} in %.0f s", stem, rep["seconds"])
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
