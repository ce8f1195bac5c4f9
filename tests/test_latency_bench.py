"""benchmarks/latency.py --quick runs end to end and writes a valid report (JSON, markdown, PNG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_latency_quick_tiny_writes_valid_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RT_ENGINE_ONNX_CACHE": str(tmp_path / "onnx")}
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "latency.py"),
        "--quick",
        "--preset",
        "tiny",
        "--backends",
        "torch,torch-fast:fp32",
        "--threads",
        "1",
        "--memory-frames",
        "6",
        "--memory-every",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "latency_tiny.json").read_text())
    assert (tmp_path / "out" / "latency_tiny.md").read_text().startswith("# Latency")
    assert (tmp_path / "out" / "latency_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # machine and load are recorded, the peak and the FLOPs are measured, not assumed
    assert len(rep["machine"]["load_start"]) == 3 and len(rep["machine"]["load_end"]) == 3
    pk = rep["peak"]
    assert pk["source"] in ("openvino", "torch") and pk["best_tflops"] > 0
    assert pk["best_tflops"] == pytest.approx(max(s["tflops"] for s in pk["shapes"]))
    for stage in ("identity", "pose", "audio", "generator"):
        assert rep["flops"][stage] > 0
    assert rep["flops"]["frame_live"] == pytest.approx(
        rep["flops"]["pose"] + rep["flops"]["audio"] + rep["flops"]["generator"]
    )
    assert list(rep["variants"]) == ["torch:fp32", "torch-fast:fp32"]  # reference first
    for v in rep["variants"].values():
        assert "error" not in v, v
        for stage in ("identity", "pose", "audio", "generator"):
            s = v["stages"][stage]
            assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
        for mode in ("ahead", "live", "live_half_pose"):
            e = v["e2e"][mode]
            assert e["fps"] == pytest.approx(1e3 / e["mean_ms"]) and e["tflops"] > 0
        assert v["batched"]["batch"] == 2 and v["batched"]["live"]["frames_per_s"] > 0
        assert v["speedup_live"] > 0 and 0 < v["peak_fraction"]
    assert rep["variants"]["torch:fp32"]["speedup_live"] == pytest.approx(1.0)
    assert rep["variants"]["torch-fast:fp32"]["psnr_vs_ref_db"] > 80
    mem = rep["memory"]
    assert mem["frames"] == 6 and len(mem["rss_samples_mb"]) == 4 and rep["peak_rss_mb"] > 0
    assert mem["slope_mb_per_1000_frames"] == mem["slope_mb_per_1000_frames"]  # not NaN
    print(f"quick benchmark: {seconds:.1f} s")  # target < 60 s on an idle 2-core machine


def test_generator_breakdown_accounts_for_the_whole_graph(tmp_path):
    """The per-part breakdown (OpenVINO counters) covers every FLOP of the graph, shares sum to 1,
    and the convolutions carry nearly all FLOPs."""
    pytest.importorskip("openvino")
    import torch

    from benchmarks.breakdown import generator_breakdown, onnx_flops
    from rt_engine.backends.onnx_backend import OpenVINORunner
    from rt_engine.config import model_preset
    from rt_engine.models.pcavs import PCAVS

    torch.manual_seed(0)
    model = PCAVS(model_preset("tiny")).eval()
    r = OpenVINORunner(model, "fp32", onnx_dir=tmp_path / "g", threads=1)
    img = torch.rand(1, 3, 224, 224) * 2 - 1
    id0, id1 = r.encode_identity(img)
    bd = generator_breakdown(r, id0, id1, r.encode_audio(torch.rand(1, 1, 80, 20)), r.encode_pose(img), reps=2)
    assert bd["wall_ms"] > 0 and bd["counters_ms"] > 0
    assert sum(p["share"] for p in bd["parts"].values()) == pytest.approx(1.0)
    assert sum(p["ms"] for p in bd["parts"].values()) == pytest.approx(bd["wall_ms"])
    assert bd["gflop_graph"] == pytest.approx(sum(onnx_flops(r.dir / "generator.onnx").values()) / 1e9)
    assert bd["gflop_matched"] == pytest.approx(bd["gflop_graph"], rel=1e-6)  # every FLOP found a part
    convs = sum(bd["parts"][k]["gflop"] for k in ("3x3 convs", "transposed convs") if k in bd["parts"])
    assert convs > 0.8 * bd["gflop_graph"]
