"""The torch-cuda backend without a GPU: its structure on the CPU (the fused op with impl "ref" and the
C++ twin "cpu"), against the fp32 reference; the bucket buffers; the refusal without CUDA.

The CUDA-only parts (the kernel itself, graph capture, pinned memory) are checked by
``benchmarks/gpu_check.py`` on a GPU and by the ``gpu``-marked test at the end.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import shutil

import pytest
import torch

from rt_engine.backends import available_backends, make_backend, psnr, run_frame, select_backend
from rt_engine.backends import cuda_backend as cb
from rt_engine.config import NoiseMode
from rt_engine.errors import ConfigError
from rt_engine.models import fused_modconv as fm
from tests import test_backends as tb
from tests.test_backends import FP32_MAX_ABS, _style_inputs

model, probe, reference = tb.model, tb.probe, tb.reference  # the tiny model and probe fixtures of test_backends

NO_CUDA = not torch.cuda.is_available()


def _native_or_skip() -> None:
    try:
        fm.load_native()
    except RuntimeError as e:
        pytest.skip(f"rt_engine._kernels unavailable: {e}")


def _reference_generator(model, id0, id1, mouth, pose, noise=NoiseMode.STORED) -> torch.Tensor:
    style = model.make_style(id0, mouth, pose)
    with torch.no_grad():
        return model.generator.set_form("ref")(style, id1.expand(style.shape[0], -1, -1, -1), noise)


@pytest.mark.parametrize("impl", ["ref", "cpu"])
@pytest.mark.parametrize("noise", [NoiseMode.STORED, NoiseMode.ZERO])
def test_kernel_generator_matches_reference_fp32(model, impl, noise):
    if impl == "cpu":
        _native_or_skip()
    gen = cb.KernelGenerator(model.generator, torch.float32, impl)
    id0, id1, mouth, pose = _style_inputs(model.cfg, 3, seed=2)
    with torch.no_grad():
        out = gen(gen.identity_base(id0), torch.cat([mouth, pose], 1), id1, noise)
    ref = _reference_generator(model, id0, id1, mouth, pose, noise)
    assert out.shape == ref.shape == (3, 3, model.cfg.size, model.cfg.size)
    assert (out - ref).abs().max().item() < FP32_MAX_ABS


def test_kernel_generator_bf16_close_to_reference(model):
    _native_or_skip()
    gen = cb.KernelGenerator(model.generator, torch.bfloat16, "cpu")
    id0, id1, mouth, pose = _style_inputs(model.cfg, 2, seed=3)
    with torch.no_grad():
        out = gen(gen.identity_base(id0), torch.cat([mouth, pose], 1), id1, NoiseMode.STORED)
    assert psnr(out, _reference_generator(model, id0, id1, mouth, pose)) > 40.0


def test_every_3x3_styled_conv_is_one_fused_call_per_batch(model, monkeypatch):
    """The fused op runs conv1 and each level's second conv, once per layer for the whole batch;
    the upsampling convs stay on the library path."""
    cfg = model.cfg
    gen = cb.KernelGenerator(model.generator, torch.float32, "ref")
    ops = gen.ops()
    assert ops.count("fused_modconv[ref]") == 1 + cfg.n_up
    assert ops.count("conv_transpose2d+blur") == cfg.n_up
    assert ops.count("conv2d_1x1") == 1 + cfg.n_up
    calls = []
    real = fm.modulated_conv2d

    def spy(x, style, weight, *args, **kw):
        calls.append((tuple(x.shape), tuple(style.shape), kw.get("impl")))
        return real(x, style, weight, *args, **kw)

    monkeypatch.setattr(fm, "modulated_conv2d", spy)
    id0, id1, mouth, pose = _style_inputs(cfg, 5, seed=4)
    with torch.no_grad():
        gen(gen.identity_base(id0), torch.cat([mouth, pose], 1), id1, NoiseMode.STORED)
    want = [(5, c, c, r, r) for (_, c, _, r, _) in cb.fused_layer_shapes(cfg, 5)]
    assert [(x[0], x[1], s[1], x[2], x[3]) for x, s, _ in calls] == want
    assert {impl for _, _, impl in calls} == {"ref"}


def test_runner_on_cpu_matches_reference_frame(model, probe, reference):
    _native_or_skip()
    runner = cb.TorchCudaRunner(model, "fp32", device="cpu", impl="cpu", max_batch=4)
    assert runner.name == "torch-cuda" and not runner.cuda_graphs
    out = run_frame(runner, probe)
    assert (out - reference).abs().max().item() < FP32_MAX_ABS


def test_runner_buckets_buffers_and_chunks(model):
    """Batches go to the smallest bucket >= B, reuse that bucket's buffers, and batches above
    max_batch run in chunks; the frames returned are the caller's (not a view of a buffer)."""
    runner = cb.TorchCudaRunner(model, "fp32", device="cpu", impl="ref", max_batch=4)
    cfg = model.cfg
    id0, id1, mouth, pose = _style_inputs(cfg, 6, seed=5)
    ref = _reference_generator(model, id0, id1, mouth, pose)
    first = runner.generate(id0, id1, mouth[:3], pose[:3])  # bucket 4
    stage = runner._gen[NoiseMode.STORED]
    assert sorted(stage.slots) == [4]
    ptrs = [t.data_ptr() for t in stage.slots[4].inputs]
    again = runner.generate(id0, id1, mouth[3:6], pose[3:6])  # same bucket, other inputs
    assert [t.data_ptr() for t in stage.slots[4].inputs] == ptrs
    assert (first - ref[:3]).abs().max().item() < FP32_MAX_ABS  # not overwritten by the second call
    assert (again - ref[3:6]).abs().max().item() < FP32_MAX_ABS
    whole = runner.generate(id0, id1, mouth, pose)  # 6 > max_batch: chunks of 4 and 2
    assert sorted(stage.slots) == [2, 4]
    assert (whole - ref).abs().max().item() < FP32_MAX_ABS
    assert runner.encode_pose(torch.zeros(1, 3, 224, 224)).shape == (1, cfg.pose_dim)
    assert sorted(runner._pose.slots) == [1]


def test_bucket_graphs_checks_inputs():
    stage = cb.BucketGraphs(lambda a, b: a + b, max_batch=8, name="add")
    assert [stage.bucket(b) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    out = stage(torch.ones(3, 2), torch.ones(3, 2))
    assert out.shape == (3, 2) and torch.equal(out, torch.full((3, 2), 2.0))
    with pytest.raises(ValueError, match="exceeds max_batch"):
        stage(torch.ones(9, 2), torch.ones(9, 2))
    with pytest.raises(ValueError, match="disagree"):
        stage(torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        stage(torch.ones(3, 5), torch.ones(3, 5))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay() runs what the stage registered while 'capturing'."""

    work = None

    def replay(self):
        self.work()


def _fake_capture(monkeypatch, fail: bool = False) -> dict:
    state: dict = {"graph": None}

    @contextlib.contextmanager
    def graph(g, stream=None, capture_error_mode=None):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        state["graph"] = g
        try:
            yield
        finally:
            state["graph"] = None

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    return state


@pytest.mark.parametrize("fail", [False, True])
def test_bucket_graphs_warm_up_capture_once_then_replay(monkeypatch, fail):
    """Eager calls until the warm-up count, one capture, then replays that read the refreshed input
    buffers; a capture that fails leaves the stage launching eagerly."""
    state = _fake_capture(monkeypatch, fail)
    calls = []
    static_out = torch.empty(4, 2)

    def fn(a):  # [4,2] -> [4,2]
        g = state["graph"]
        calls.append("capture" if g is not None else "eager")
        if g is not None:  # a real capture records the work without running it
            g.work = lambda: torch.mul(a, 2, out=static_out)
            return static_out
        return a * 2

    stage = cb.BucketGraphs(fn, max_batch=4, use_graphs=True, warmup=2, name="double")
    for i in range(5):
        x = torch.full((3, 2), float(i + 1))
        assert torch.equal(stage(x), x * 2), (i, calls)
    if fail:
        assert calls == ["eager"] * 5 and not stage.use_graphs and stage.slots[4].graph is None
    else:
        assert calls == ["eager", "eager", "capture"] and stage.slots[4].graph is not None


def test_kernel_build_options(monkeypatch, tmp_path):
    """RT_ENGINE_CUDA_ARCHS picks another build (own hash); a build without pybind11 says so (a cached
    build does not need it)."""
    monkeypatch.delenv("RT_ENGINE_CUDA_ARCHS", raising=False)
    default = fm._source_hash()
    monkeypatch.setenv("RT_ENGINE_CUDA_ARCHS", "90")
    assert fm._source_hash() != default
    monkeypatch.setenv("RT_ENGINE_KERNEL_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pybind11" else real(name, *a))
    if shutil.which("cmake") is None:
        pytest.skip("cmake missing: build_native stops before the pybind11 check")
    with pytest.raises(RuntimeError, match="pybind11 is missing"):
        fm.build_native()
    cached = tmp_path / fm._source_hash() / f"_kernels{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert fm.build_native() == cached


def test_precision_names():
    assert cb.resolve_precision(None) == cb.resolve_precision("auto") == "fp16"
    assert cb.resolve_precision("bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        cb.resolve_precision("int8")


# ---------------------------------------------------------------------------------- no CUDA here
@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_refused_without_cuda_naming_cuda(model):
    assert "torch-cuda" not in available_backends()
    with pytest.raises(ConfigError, match="torch-cuda backend needs CUDA"):
        make_backend("torch-cuda", model=model)
    with pytest.raises(ConfigError, match="needs CUDA"):
        cb.TorchCudaRunner(model, device="cuda")


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("cli", ["serve", "render"])
def test_cli_refuses_torch_cuda_without_cuda(cli, capsys, tmp_path):
    if cli == "serve":
        from rt_engine.serve.__main__ import main

        argv = ["--backend", "torch-cuda", "--port", "0"]
    else:
        from rt_engine.render import main

        argv = [
            "--backend",
            "torch-cuda",
            "--identity",
            "rt_engine/assets/identity.jpg",
            "--audio",
            "rt_engine/assets/speech.flac",
            "--out",
            str(tmp_path / "x.mp4"),
            "-q",
        ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the torch-cuda backend needs CUDA"), err


@pytest.mark.skipif(not NO_CUDA, reason="checks auto without CUDA")
def test_auto_skips_torch_cuda_without_cuda(model, probe):
    sel = select_backend(model, candidates=["torch-cuda", "torch-fast"], precision="fp32", probe=probe, repeats=1)
    status = {c.name: c.status for c in sel.candidates}
    assert status["torch-cuda"] == "failed" and sel.name == "torch-fast"


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_cuda_runner_graph_replay_matches_eager(model, probe, reference):
    runner = make_backend("torch-cuda", model=model, precision="fp32", max_batch=4)
    eager = cb.TorchCudaRunner(model, "fp32", cuda_graphs=False, max_batch=4)
    for _ in range(3):  # warm-up, capture, replay
        out = run_frame(runner, probe)
    assert runner._gen[NoiseMode.STORED].slots[1].graph is not None
    assert psnr(out, run_frame(eager, probe)) > 80.0  # bit equality unless cuDNN picks non-deterministic algorithms
    assert psnr(out, reference) > 60.0  # cuDNN may use TF32 in the library layers


@pytest.mark.slow
def test_kernel_generator_official_size_matches_reference():
    """The structure at the official size (512..128 channels, five levels), fused op in PyTorch form."""
    from rt_engine.config import model_preset
    from rt_engine.models.generator import Generator

    torch.manual_seed(0)
    cfg = model_preset("official")
    g = Generator(cfg).eval()
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
            elif name.endswith("bias") and "modulation" not in name:
                p.normal_(0, 0.1)
        kg = cb.KernelGenerator(g, torch.float32, "ref")
        assert kg.ops().count("fused_modconv[ref]") == 6
        id0, id1, var = torch.rand(1, cfg.id_dim), torch.randn(1, 512, 7, 7), torch.randn(1, 512)
        out = kg(kg.identity_base(id0), var, id1, NoiseMode.STORED)
        ref = g.set_form("ref")(torch.cat([id0, var], 1), id1, NoiseMode.STORED)
    assert psnr(out, ref) > 100.0
