"""Where the generator's time goes on OpenVINO, per part of the network, and this machine's peak
for the same runtime.

    generator_breakdown(runner, id0, id1, mouth, pose) -> parts: ms, share, GFLOP, achieved TFLOP/s
    openvino_peak(threads)                               -> best TFLOP/s of one 3x3 conv, per precision

The breakdown compiles the runner's batch-1 generator graph once more with OpenVINO's per-node
counters (``PERF_COUNT``), sums them per part (3x3 convs, transposed convs, blur, 1x1 convs,
modulation matmuls, fused elementwise, the rest) over several calls, and spreads the measured
wall time of a call without counters over the parts by their share (the counters add overhead of
their own). FLOPs per node come from the ONNX graph (shape inference at batch 1), matched by node
name; OpenVINO keeps the ONNX names of the convolutions.

The peak is the time of one 3x3 convolution at the generator's own large layer shapes, compiled by
the same runtime with the same threads: a chain of ``PEAK_DEPTH`` convolutions minus a chain of one
(which removes the f32 input/output conversions and layout reorders), each the best of ``reps``
warm calls. A peak the graph could reach, not torch's, and a best-of is stable from run to run.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rt_engine.backends.onnx_backend import openvino_config

log = logging.getLogger("benchmarks.breakdown")

# 3x3 layers of the official generator (channels, side) at batch 1: the shapes that hold its time
PEAK_SHAPES = ((512, 56), (256, 112), (128, 224))
PEAK_DEPTH = 4  # convs chained in the peak graph
PARTS = (
    "3x3 convs",
    "transposed convs",
    "blur (depthwise 4x4)",
    "1x1 convs (to RGB)",
    "modulation matmuls",
    "fused elementwise",
    "other (layout, padding)",
)


def _part(node_type: str, exec_type: str, name: str) -> str:
    if node_type == "ConvolutionBackpropData":
        return "transposed convs"
    if node_type == "GroupConvolution":
        return "blur (depthwise 4x4)"
    if node_type == "Convolution":
        return "1x1 convs (to RGB)" if "1x1" in exec_type or "to_rgb" in name else "3x3 convs"
    if node_type in ("FullyConnected", "MatMul"):
        return "modulation matmuls"
    if node_type in ("Subgraph", "Eltwise", "Multiply", "Add", "Sqrt", "Power", "Divide"):
        return "fused elementwise"
    return "other (layout, padding)"


def onnx_flops(path: str | Path) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of each Conv / ConvTranspose / Gemm / MatMul node at batch 1, by name."""
    import onnx
    from onnx import shape_inference

    m = onnx.load(str(path))
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = 1
    m = shape_inference.infer_shapes(m)
    vals = list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
    shape = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in vals}
    init = {t.name: list(t.dims) for t in m.graph.initializer}
    out: dict[str, float] = {}
    for n in m.graph.node:
        w = init.get(n.input[1]) if len(n.input) > 1 else None
        x, y = shape.get(n.input[0]), shape.get(n.output[0])
        if not w or not x or not y or 0 in x or 0 in y:
            continue
        if n.op_type == "Conv":  # w [Co, Ci/g, kh, kw]
            out[n.name] = 2.0 * float(np.prod(y)) * w[1] * w[2] * w[3]
        elif n.op_type == "ConvTranspose":  # w [Ci, Co/g, kh, kw]: every input pixel scatters a kernel
            out[n.name] = 2.0 * float(np.prod(x)) * w[1] * w[2] * w[3]
        elif n.op_type in ("Gemm", "MatMul") and len(w) == 2:
            out[n.name] = 2.0 * float(np.prod(x[:-1])) * w[0] * w[1]
    return out


def generator_breakdown(runner: Any, id0, id1, mouth, pose, reps: int = 5) -> dict[str, Any]:
    """Per-part time of the runner's batch-1 generator (an ``OpenVINORunner``), see module doc."""
    import openvino as ov

    feeds = {
        "style": runner._np(runner.style(id0, mouth, pose)),
        "id_map": runner._np(id1[:1]),
        **runner._noise_feeds(1, "stored"),
    }
    path = runner.dir / "generator.onnx"
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({k: list(v.shape) for k, v in feeds.items()})
    cfg = openvino_config(runner.precision, runner.threads)
    plain = core.compile_model(model, "CPU", cfg).create_infer_request()
    counted = core.compile_model(model, "CPU", {**cfg, "PERF_COUNT": "YES"}).create_infer_request()
    for req in (plain, counted):
        req.infer(feeds)  # first calls allocate
    wall = []
    for _ in range(reps):
        t = time.perf_counter()
        plain.infer(feeds)
        wall.append(time.perf_counter() - t)
    wall_ms = 1e3 * float(np.median(wall))
    flops = onnx_flops(path)
    us: dict[str, float] = defaultdict(float)
    fl: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for rep in range(reps):
        counted.infer(feeds)
        for p in counted.get_profiling_info():
            part = _part(p.node_type, p.exec_type, p.node_name)
            us[part] += p.real_time.total_seconds() * 1e6 / reps
            if rep == 0:  # names and FLOPs once
                fl[part] += flops.get(p.node_name, 0.0)
                nodes[part] += p.real_time.total_seconds() > 0
    total_us = sum(us.values()) or 1.0
    parts = {}
    for part in PARTS:
        if part not in us:
            continue
        share = us[part] / total_us
        ms = share * wall_ms
        parts[part] = {
            "ms": ms,
            "share": share,
            "gflop": fl[part] / 1e9,
            "tflops": fl[part] / (ms * 1e-3) / 1e12 if ms > 0 and fl[part] else None,
            "nodes": nodes[part],
        }
    matched = sum(fl.values())
    return {
        "runner": runner.describe(),
        "wall_ms": wall_ms,
        "counters_ms": total_us / 1e3,
        "gflop_matched": matched / 1e9,
        "gflop_graph": sum(flops.values()) / 1e9,
        "parts": parts,
    }


def openvino_peak(threads: int, precisions: tuple[str, ...] = ("bf16", "f32"), reps: int = 10) -> dict[str, Any]:
    """Best TFLOP/s of one 3x3 convolution (``PEAK_SHAPES``) compiled by OpenVINO, per precision."""
    import openvino as ov
    from openvino import opset13 as ops

    core = ov.Core()
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {"shapes": []}
    for prec in precisions:
        best = 0.0
        for c, r in PEAK_SHAPES:
            cfg = openvino_config("bf16" if prec == "bf16" else "fp32", threads)
            feed = {"x": rng.standard_normal((1, c, r, r), dtype=np.float32)}
            best_s = {}
            for depth in (1, PEAK_DEPTH):  # the difference removes the f32 in/out conversions and reorders
                x = ops.parameter([1, c, r, r], ov.Type.f32, name="x")
                y = x
                for _ in range(depth):
                    w = ops.constant(rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.02)
                    y = ops.convolution(y, w, [1, 1], [1, 1], [1, 1], [1, 1])
                req = core.compile_model(ov.Model([y], [x], "conv3x3"), "CPU", cfg).create_infer_request()
                for _ in range(3):
                    req.infer(feed)
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    req.infer(feed)
                    ts.append(time.perf_counter() - t)
                best_s[depth] = min(ts)
            per_conv = (best_s[PEAK_DEPTH] - best_s[1]) / (PEAK_DEPTH - 1)
            tf = 2.0 * c * c * 9 * r * r / per_conv / 1e12 if per_conv > 0 else 0.0
            res["shapes"].append({"precision": prec, "C": c, "H": r, "ms": 1e3 * per_conv, "tflops": tf})
            best = max(best, tf)
        res[prec] = best
    res["best_tflops"] = max(res[p] for p in precisions)
    return res
