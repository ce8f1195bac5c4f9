"""Backends against the fp32 reference on a tiny random model; the fast generator's rewrites;
auto-selection (including a backend that fails the fidelity check)."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rt_engine.backends import Probe, available_backends, make_backend, psnr, run_frame, select_backend
from rt_engine.backends.base import Runner
from rt_engine.backends.torch_backend import FastTorchRunner, TorchRunner, resolve_precision
from rt_engine.config import NoiseMode, model_preset
from rt_engine.errors import ConfigError
from rt_engine.models.fast_generator import FastGenerator, dense_upsample_weight
from rt_engine.models.modconv import blur_kernel, upfirdn2d
from rt_engine.models.pcavs import PCAVS

FP32_MAX_ABS = 1e-4  # images in [-1,1]
BF16_MIN_PSNR = 40.0  # dB against fp32 (measured ~77 dB on this tiny model)


@pytest.fixture(scope="module")
def model() -> PCAVS:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = PCAVS(model_preset("tiny")).eval()
    with torch.no_grad():  # non-zero noise weights and biases, so every term of the layers matters
        for name, p in m.generator.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
            elif name.endswith("bias") and "modulation" not in name:
                p.normal_(0, 0.1)
    return m


@pytest.fixture(scope="module")
def probe() -> Probe:
    return Probe.random(seed=1)


@pytest.fixture(scope="module")
def reference(model, probe) -> torch.Tensor:
    return run_frame(make_backend("torch", model=model), probe)


def _style_inputs(cfg, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    id0 = torch.rand(1, cfg.id_dim, generator=g)
    id1 = torch.randn(1, cfg.id_map_channels, cfg.start, cfg.start, generator=g)
    mouth = torch.randn(b, cfg.mouth_dim, generator=g)
    pose = torch.randn(b, cfg.pose_dim, generator=g) * 3
    return id0, id1, mouth, pose


# ---------------------------------------------------------------------------------- rewrites
def test_static_and_ref_forms_equal(model):
    cfg = model.cfg
    id0, id1, mouth, pose = _style_inputs(cfg, 3)
    style = torch.cat([id0.expand(3, -1), mouth, pose], 1)
    g = copy.deepcopy(model.generator)
    with torch.no_grad():
        a = g.set_form("ref")(style, id1.expand(3, -1, -1, -1))
        b = g.set_form("static")(style, id1.expand(3, -1, -1, -1))
    assert (a - b).abs().max().item() < 1e-5


def test_dense_upsample_weight_equals_transposed_conv_and_blur():
    torch.manual_seed(3)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, dtype=torch.float64)  # [Cout,Cin,3,3]
    ref = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)  # [B,Cout,2H+1,2W+1]
    ref = upfirdn2d(ref, blur_kernel().double(), pad=(1, 1))  # [B,Cout,2H,2W]
    dense = F.pixel_shuffle(F.conv2d(x, dense_upsample_weight(w), padding=1), 2)
    assert dense.shape == ref.shape == (2, 4, 10, 14)
    assert torch.allclose(dense, ref, atol=1e-12)


@pytest.mark.parametrize("upsample", ["dense", "transpose"])
@pytest.mark.parametrize("noise", [NoiseMode.STORED, NoiseMode.ZERO])
def test_fast_generator_fp32_matches_reference(model, upsample, noise):
    cfg = model.cfg
    id0, id1, mouth, pose = _style_inputs(cfg, 3)
    with torch.no_grad():
        ref = model.generator(torch.cat([id0.expand(3, -1), mouth, pose], 1), id1.expand(3, -1, -1, -1), noise)
        fg = FastGenerator(model.generator, torch.float32, channels_last=True, upsample=upsample)
        out = fg(fg.identity_base(id0), torch.cat([mouth, pose], 1), id1, noise)
    assert out.shape == ref.shape == (3, 3, cfg.size, cfg.size)
    assert (out - ref).abs().max().item() < FP32_MAX_ABS


def test_fast_generator_random_noise_changes_output(model):
    cfg = model.cfg
    id0, id1, mouth, pose = _style_inputs(cfg, 1)
    fg = FastGenerator(model.generator, torch.float32)
    with torch.no_grad():
        base, var = fg.identity_base(id0), torch.cat([mouth, pose], 1)
        a, b, z = (
            fg(base, var, id1, NoiseMode.RANDOM),
            fg(base, var, id1, NoiseMode.RANDOM),
            fg(base, var, id1, NoiseMode.ZERO),
        )
    assert a.shape == (1, 3, cfg.size, cfg.size) and not torch.equal(a, b)
    assert (a - z).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise"):
        fg(base, var, id1, "bogus")


def test_fast_runner_identity_cache_is_not_stale(model):
    cfg = model.cfg
    runner = FastTorchRunner(model, precision="fp32")
    ref = TorchRunner(copy.deepcopy(model))
    for seed in (0, 1, 0):  # switch identity and back: the cached modulation base must follow
        id0, id1, mouth, pose = _style_inputs(cfg, 2, seed)
        out, exp = runner.generate(id0, id1, mouth, pose), ref.generate(id0, id1, mouth, pose)
        assert (out - exp).abs().max().item() < FP32_MAX_ABS


@pytest.mark.parametrize("name", ["torch-fast", "onnxruntime", "openvino"])
def test_runner_batch_equals_single_frames(model, name, onnx_cache):
    _need(name)
    opts = {"static_batches": 3} if name == "openvino" else {}
    runner = make_backend(name, model=model, precision="fp32", **opts)
    for b in (3, 5):  # OpenVINO: a static-shape model for 3 (and 1), the dynamic-batch one for 5
        id0, id1, mouth, pose = _style_inputs(model.cfg, b, seed=b)
        batch = runner.generate(id0, id1, mouth, pose)
        single = torch.cat([runner.generate(id0, id1, mouth[i : i + 1], pose[i : i + 1]) for i in range(b)])
        assert (batch - single).abs().max().item() < 1e-4
    if name == "openvino":
        assert sorted(str(k[1]) for k in runner._sessions if k[0] == "generator") == ["1", "3", "dynamic"]
        runner.keep_batches(1)  # the scheduler forms no batch above 1: the static size-3 model goes
        assert sorted(str(k[1]) for k in runner._sessions if k[0] == "generator") == ["1", "dynamic"]


def test_openvino_lanes_run_at_once_and_match_one_lane(model, onnx_cache):
    """Two lanes (inference streams): two threads generate at once, each on its own requests, and
    get the frames one lane makes; a lane the runner does not have is refused."""
    _need("openvino")
    import threading

    runner = make_backend("openvino", model=model, precision="fp32", threads=2)
    id0, id1, mouth, pose = _style_inputs(model.cfg, 2, seed=3)
    one = runner.generate(id0, id1, mouth, pose)
    assert runner.set_lanes(2) == 2 and runner.set_lanes(8) == 2  # at most one lane per thread
    out: dict[int, list] = {0: [], 1: []}

    def lane(k: int) -> None:
        runner.use_lane(k)
        for _ in range(5):
            out[k].append(runner.generate(id0, id1, mouth, pose))

    threads = [threading.Thread(target=lane, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out[0]) == len(out[1]) == 5
    for got in out[0] + out[1]:
        assert (got - one).abs().max().item() < 1e-5
    assert all(len(reqs) == 2 for reqs in runner._sessions.values())  # one request per lane
    with pytest.raises(ValueError, match="lane 2 out of range"):
        runner.use_lane(2)


def test_openvino_encoders_can_run_fp32_under_a_bf16_generator(model, onnx_cache):
    """encoder_precision fp32: the identity, pose and audio codes equal the fp32 runner's, and the
    generator still runs in the runner's precision."""
    _need("openvino")
    from rt_engine.backends.onnx_backend import OpenVINORunner

    mixed = OpenVINORunner(model, "bf16", encoder_precision="fp32")
    f32 = OpenVINORunner(model, "fp32")
    img = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mel = torch.rand(1, 1, 80, 20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mixed.encode_pose(img), f32.encode_pose(img))
    assert torch.equal(mixed.encode_audio(mel), f32.encode_audio(mel))
    assert all(torch.equal(a, b) for a, b in zip(mixed.encode_identity(img), f32.encode_identity(img), strict=True))
    assert mixed._precision_of("generator") == mixed.precision and mixed._precision_of("pose") == "fp32"
    assert "encoders fp32" in mixed.describe()
    # the same through backend auto (serve --encoder-precision fp32): the option reaches OpenVINO only
    sel = select_backend(
        model, candidates=["openvino"], precision="bf16", options_for={"openvino": {"encoder_precision": "fp32"}}
    )
    assert sel.name == "openvino" and "encoders fp32" in sel.runner.describe()


@pytest.mark.parametrize("name", ["torch", "torch-fast", "openvino"])
def test_uint8_frames_from_the_model_call_equal_the_separate_conversion(model, name, onnx_cache):
    """generate_uint8 (the conversion folded into the call; for OpenVINO compiled into the graph)
    gives the same bytes as to_uint8(generate(...)), as a contiguous [B,H,W,3] uint8 array."""
    from rt_engine.inputs.image import to_uint8

    _need(name)
    runner = make_backend(name, model=model, precision="fp32")
    for b in (1, 3):
        id0, id1, mouth, pose = _style_inputs(model.cfg, b, seed=b)
        got = runner.generate_uint8(id0, id1, mouth, pose)
        ref = to_uint8(runner.generate(id0, id1, mouth, pose))
        assert got.dtype == np.uint8 and got.shape == ref.shape == (b, model.cfg.size, model.cfg.size, 3)
        assert got.flags["C_CONTIGUOUS"] and np.abs(got.astype(int) - ref.astype(int)).max() <= 1
        assert ref.std() > 1  # not a blank frame: the comparison means something


def test_resolve_precision():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int4")


# ---------------------------------------------------------------------------------- backends vs reference
FP32_VARIANTS = [("torch-fast", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32")]
BF16_VARIANTS = [("torch", "bf16"), ("torch-fast", "bf16"), ("openvino", "bf16")]


def _need(name: str) -> None:
    if name not in available_backends():
        pytest.skip(f"backend {name} not available here (runtime missing or does not import)")


@pytest.mark.parametrize("name,precision", FP32_VARIANTS)
def test_fp32_backend_matches_reference(model, probe, reference, name, precision, onnx_cache):
    _need(name)
    runner = make_backend(name, model=model, precision=precision)
    out = run_frame(runner, probe)
    assert out.shape == reference.shape and out.dtype == torch.float32
    assert (out - reference).abs().max().item() < FP32_MAX_ABS, runner.describe()
    assert psnr(out, reference) > 80
    id0, id1 = runner.encode_identity(probe.id_img)  # every stage, batched
    ref_runner = make_backend("torch", model=model)
    rid0, rid1 = ref_runner.encode_identity(probe.id_img)
    assert torch.allclose(id0, rid0, atol=1e-4, rtol=1e-4) and torch.allclose(id1, rid1, atol=1e-4, rtol=1e-4)
    imgs = torch.cat([probe.pose_img, -probe.pose_img])
    assert torch.allclose(runner.encode_pose(imgs), ref_runner.encode_pose(imgs), atol=1e-3, rtol=1e-4)
    mels = torch.cat([probe.mel, 1 - probe.mel])
    assert torch.allclose(runner.encode_audio(mels), ref_runner.encode_audio(mels), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,precision", BF16_VARIANTS)
def test_bf16_backend_within_psnr_bound(model, probe, reference, name, precision, onnx_cache):
    _need(name)
    out = run_frame(make_backend(name, model=model, precision=precision), probe)
    p = psnr(out, reference)
    assert p >= BF16_MIN_PSNR, f"{name} bf16: {p:.1f} dB"


def test_make_backend_errors(model):
    with pytest.raises(ConfigError, match="unknown backend"):
        make_backend("cuda-magic", model=model)
    with pytest.raises(ConfigError, match="engine_dir"):
        make_backend("tensorrt")


def test_make_backend_torch_leaves_callers_model_alone(model):
    forms = {m.form for m in model.modules() if hasattr(m, "form")}
    make_backend("torch", model=model, precision="bf16")  # switches a copy to the static form
    assert {m.form for m in model.modules() if hasattr(m, "form")} == forms


# ---------------------------------------------------------------------------------- auto
class _Wrapped(Runner):
    """A reference runner made slower and/or wrong, to drive the selection logic."""

    def __init__(self, model: PCAVS, delay: float = 0.0, corrupt: float = 0.0, name: str = "fake"):
        self.inner = TorchRunner(copy.deepcopy(model))
        self.cfg, self.delay, self.corrupt, self.name = model.cfg, delay, corrupt, name

    def encode_identity(self, img):
        return self.inner.encode_identity(img)

    def encode_pose(self, img):
        return self.inner.encode_pose(img)

    def encode_audio(self, mel):
        return self.inner.encode_audio(mel)

    def generate(self, id0, id1, mouth, pose, noise=NoiseMode.STORED):
        time.sleep(self.delay)
        out = self.inner.generate(id0, id1, mouth, pose, noise)
        return out + self.corrupt * torch.randn_like(out)


def test_auto_rejects_backend_failing_fidelity_and_picks_fastest_passing(model, probe):
    def broken() -> Runner:
        raise RuntimeError("runtime not installed")

    factories = {
        "fast-but-wrong": lambda: _Wrapped(model, delay=0.0, corrupt=0.2, name="fast-but-wrong"),
        "quick": lambda: _Wrapped(model, delay=0.01, name="quick"),
        "slow": lambda: _Wrapped(model, delay=0.15, name="slow"),
        "broken": broken,
    }
    sel = select_backend(model, candidates=list(factories), probe=probe, repeats=2, factories=factories)
    by = {c.name: c for c in sel.candidates}
    assert sel.name == "quick" and sel.runner.name == "quick"
    assert by["fast-but-wrong"].status == "rejected" and by["fast-but-wrong"].psnr_db < 35
    assert by["broken"].status == "failed" and "not installed" in by["broken"].reason
    assert by["slow"].status == "ok" and by["slow"].ms_per_frame > by["quick"].ms_per_frame
    assert "picked quick" in sel.summary()


def test_auto_falls_back_to_reference_when_nothing_passes(model, probe):
    factories = {"wrong": lambda: _Wrapped(model, corrupt=0.5)}
    sel = select_backend(model, candidates=["wrong"], probe=probe, repeats=1, factories=factories)
    assert sel.name == "torch" and isinstance(sel.runner, TorchRunner)
    assert sel.candidates[0].status == "rejected"


def test_auto_backend_real_candidates(model, probe, reference):
    runner = make_backend("auto", model=model, candidates=["torch-fast"], repeats=1)
    out = run_frame(runner, probe)
    assert math.isinf(psnr(out, reference)) or psnr(out, reference) > 35


@pytest.mark.parametrize("name", ["torch", "torch-fast", "onnxruntime", "openvino"])
def test_pose_code_never_sees_the_mouth(name, onnx_cache):
    """With ``pose_mouth_mask`` (the bundled model) a driving frame's mouth cannot reach the output:
    frames that differ only inside MOUTH_BOX give the same pose code on every backend, while a change
    outside the box does change it."""
    import dataclasses

    from rt_engine.config import MOUTH_BOX

    _need(name)
    torch.manual_seed(3)
    cfg = dataclasses.replace(model_preset("tiny"), pose_mouth_mask=True)
    m = PCAVS(cfg).eval()
    with torch.no_grad():
        m.pose_encoder.model.conv6.bias.fill_(1.0)  # at random init the ReLU after conv6 kills every input
    runner = make_backend(name, model=m, precision="fp32")
    y0, y1, x0, x1 = MOUTH_BOX
    a = torch.rand(1, 3, 224, 224) * 2 - 1
    talking = a.clone()
    talking[..., y0:y1, x0:x1] = torch.rand(1, 3, y1 - y0, x1 - x0) * 2 - 1  # another mouth
    moved = a.clone()
    moved[..., 10:60, 20:200] = -a[..., 10:60, 20:200]  # forehead / hair changes
    codes = runner.encode_pose(torch.cat([a, talking, moved]))  # [3,12]
    assert torch.equal(codes[0], codes[1]) or (codes[0] - codes[1]).abs().max().item() < 1e-6
    assert (codes[0] - codes[2]).abs().max().item() > 1e-4


def test_bundled_model_blanks_the_mouth_for_pose():
    from rt_engine.models.checkpoint import load_checkpoint

    assert load_checkpoint(None).cfg.pose_mouth_mask
