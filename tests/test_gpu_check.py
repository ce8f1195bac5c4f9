"""``benchmarks/gpu_check.py --dry-run``: the GPU check's steps on the CPU at tiny size (the C++ twin and
the CPU emulator of modconv.cu), with what needs CUDA skipped and said so in the JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import gpu_check

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("g++") is None,
    reason="the dry run builds the native module and the emulator (cmake, g++)",
)


def test_dry_run_walks_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "dry.json"
    rc = gpu_check.main(["--dry-run", "--json", str(out)])
    res = json.loads(out.read_text())
    steps = res["steps"]
    assert rc == 0, {k: v.get("error") for k, v in steps.items() if v["status"] == "failed"}
    assert list(steps) == [name for name, _, _ in gpu_check.STEPS]
    assert res["dry_run"] and res["ok"] and res["config"] == "tiny"
    for name in ("env", "build", "op_parity", "generator_psnr", "racecheck", "frame_timing"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    # the fused op: the C++ twin on every fused-layer shape, the emulated CUDA source on the small ones
    worst = steps["op_parity"]["worst_rel_err"]
    assert {"cpu/fp32", "cpu/fp16", "cpu/bf16", "emulator/fp32", "emulator/fp16", "emulator/bf16"} <= set(worst)
    assert all(r["ok"] for r in steps["op_parity"]["rows"])
    gen = steps["generator_psnr"]["precisions"]
    assert gen["fp32"]["generator_psnr_min"] > 60 and gen["bf16"]["generator_psnr_min"] > 35
    assert gen["fp32"]["ops"].count("fused_modconv[cpu]") == 5  # tiny: conv1 + 4 levels
    # what needs CUDA is skipped, and the JSON says so
    assert "compute-sanitizer needs a CUDA GPU" in steps["racecheck"]["skipped_sanitizer"]
    assert steps["racecheck"]["emulator_hazards"] == 0
    assert steps["layer_timing"]["status"] == "skipped"
    assert "no times" in steps["frame_timing"]["skipped_timing"]
    assert all("ms_per_step" not in r for r in steps["frame_timing"]["precisions"]["fp16"]["graphs"])
    assert steps["onnxruntime_cuda"]["status"] == "skipped"
    md = out.with_suffix(".md").read_text()
    assert "| op_parity | ok |" in md and "dry run" in md


def test_refuses_without_cuda_unless_dry(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA GPU")
