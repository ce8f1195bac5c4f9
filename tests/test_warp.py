"""The appearance-preserving generator variant (models/warp.py): what it computes at start, its two
modulated-conv forms, the warp itself, every CPU backend, ONNX export, and training from a model of
the PC-AVS generator."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from rt_engine.backends import Probe, available_backends, make_backend, psnr, run_frame
from rt_engine.config import ModelConfig, model_preset, mouth_box
from rt_engine.errors import ConfigError
from rt_engine.models.pcavs import PCAVS
from rt_engine.models.warp import warp


def warp_config(**kw) -> ModelConfig:
    return dataclasses.replace(
        model_preset("tiny"),
        name="tiny-warp",
        generator="warp",
        warp_feat=8,
        warp_motion=16,
        warp_dec=(16, 8, 8),
        pose_mouth_mask=True,
        **kw,
    ).validate()


@pytest.fixture(scope="module")
def model() -> PCAVS:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = PCAVS(warp_config()).eval()
    with torch.no_grad():  # a moving, blending model: flow and mask away from their start values
        for name, p in m.generator.named_parameters():
            if name.endswith("noise.weight"):
                p.fill_(0.3)
            elif name in ("flow_head.weight", "mask_head.weight"):
                p.normal_(0, 0.05)
            elif name == "mask_head.bias":
                p.fill_(0.0)
    return m


def test_config_shapes_and_validation():
    off = model_preset("official")
    assert off.generator == "pcavs" and off.id_map_shape == (512, 7, 7)
    assert off.noise_sizes == [7, 14, 14, 28, 28, 56, 56, 112, 112, 224, 224]
    cfg = warp_config()
    assert cfg.id_map_shape == (8 + 48, 28, 28) and cfg.noise_sizes[0] == 7 and cfg.noise_sizes[-1] == 112
    with pytest.raises(ConfigError, match="generator"):
        dataclasses.replace(cfg, generator="gan").validate()
    with pytest.raises(ConfigError, match="divisible by 16"):
        dataclasses.replace(
            model_preset("official"), generator="warp", size=56, start=7, gen_channels=(8, 8, 8, 8)
        ).validate()
    for opt in ("warp_open", "warp_mouth_mask"):  # options of the warp generator alone
        with pytest.raises(ConfigError, match="belong to generator: warp"):
            dataclasses.replace(off, **{opt: True}).validate()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_fresh_model_returns_the_photo():
    torch.manual_seed(1)
    m = PCAVS(dataclasses.replace(warp_config(), size=224)).eval()
    img = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = m(img, img.flip(0), torch.rand(2, 1, 80, 20))
    # zero flow, blend 0.98 of the warped photo away from the mouth: within a few grey levels there
    y0, y1, x0, x1 = mouth_box(224)
    away = torch.ones(1, 1, 224, 224, dtype=torch.bool)
    away[..., y0 - 16 : y1 + 16, x0 - 16 : x1 + 16] = False
    assert (out - img).abs().masked_select(away).mean().item() < 0.03
    # over the mouth box the drawn image is blended in evenly: the mouth is the generator's to learn
    mask = {}
    with torch.no_grad():
        id0, id1 = m.encode_identity(img)
        style = m.make_style(id0, m.encode_mouth(torch.rand(2, 1, 80, 20)), m.encode_pose(img))
        m.generator(style, id1, taps=mask)
    centre = mask["mask"][0, 0, (y0 + y1) // 2, (x0 + x1) // 2].item()
    assert 0.4 < centre < 0.6 and mask["mask"][0, 0, 5, 5].item() > 0.97


def test_warp_shifts_by_the_flow():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)
    flow = torch.zeros(1, 2, 4, 4)
    flow[:, 0] = 2 / 4  # one pixel to the right in normalised units (width 4)
    y = warp(x, flow)
    assert torch.allclose(y[..., :3], x[..., 1:])  # output pixel (i, j) reads input (i, j + 1)
    assert torch.allclose(y[..., 3], x[..., 3])  # border padding


def test_static_and_ref_forms_equal(model):
    g = model.generator
    cfg = model.cfg
    style = torch.randn(3, cfg.style_dim)
    id1 = torch.randn(3, *cfg.id_map_shape)
    with torch.no_grad():
        a = g.set_form("ref")(style, id1)
        b = g.set_form("static")(style, id1)
    g.set_form("ref")
    assert a.shape == (3, 3, cfg.size, cfg.size)
    # 1e-6-level flow differences are amplified by sampling a random (unsmooth) map: 2e-4, not 1e-5
    assert (a - b).abs().max().item() < 2e-4


def test_mouth_code_reaches_the_image(model):
    cfg = model.cfg
    id0, id1 = model.encode_identity(torch.rand(1, 3, 224, 224) * 2 - 1)
    pose = torch.zeros(1, cfg.pose_dim)
    with torch.no_grad():
        a = model.generate(model.make_style(id0, torch.zeros(1, cfg.mouth_dim), pose), id1)
        b = model.generate(model.make_style(id0, torch.ones(1, cfg.mouth_dim), pose), id1)
    assert (a - b).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "name,precision,min_psnr",
    [
        ("torch-fast", "fp32", 80.0),
        ("onnxruntime", "fp32", 80.0),
        ("openvino", "fp32", 60.0),
        ("torch-fast", "bf16", 35.0),
        ("openvino", "bf16", 35.0),
    ],
)
def test_backends_match_reference(model, name, precision, min_psnr, onnx_cache):
    if name not in available_backends():
        pytest.skip(f"backend {name} not available here")
    probe = Probe.random(seed=3)
    ref = run_frame(make_backend("torch", model=model), probe)
    runner = make_backend(name, model=model, precision=precision)
    out = run_frame(runner, probe)
    assert out.shape == ref.shape
    assert psnr(out, ref) > min_psnr, f"{runner.describe()}: {psnr(out, ref):.1f} dB"
    # batched: three frames of one identity equal three single frames
    id0, id1 = runner.encode_identity(probe.id_img)
    mouth = runner.encode_audio(torch.cat([probe.mel, 1 - probe.mel, probe.mel * 0.5]))
    pose = runner.encode_pose(torch.cat([probe.pose_img, -probe.pose_img, probe.pose_img.flip(-1)]))
    batch = runner.generate(id0, id1, mouth, pose)
    for i in range(3):
        one = runner.generate(id0, id1, mouth[i : i + 1], pose[i : i + 1])
        assert psnr(batch[i : i + 1], one) > min_psnr


def test_onnx_graph_has_grid_sample_and_dynamic_batch(model, tmp_path):
    onnx = pytest.importorskip("onnx")
    from rt_engine.onnx_graphs import export_onnx

    export_onnx(model, tmp_path, stages=("generator",), verify=False)
    g = onnx.load(str(next(tmp_path.glob("generator*.onnx"))))
    assert "GridSample" in {n.op_type for n in g.graph.node}
    dims = g.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # symbolic batch axis


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="tensorrt_rtx not installed (pip install tensorrt-rtx-cu13)",
)
def test_tensorrt_rtx_builds_warp_graphs(model, tmp_path):
    """GridSample, DepthToSpace and SpaceToDepth parse and build in TensorRT (the RTX builder is the
    CPU stand-in; engines run only on a GPU), fp16 with the dynamic batch profile."""
    from export.trt_build import TrtBuildConfig, build_engines
    from rt_engine.backends.tensorrt_backend import read_sidecar
    from rt_engine.onnx_graphs import export_onnx

    export_onnx(model, tmp_path / "onnx", stages=("identity", "generator"), half=True, verify=False)
    cfg = TrtBuildConfig(runtime="rtx", precision="fp16", max_batch=4, opt_batch=2, compute_capability="SM89")
    engines = build_engines(tmp_path / "onnx", tmp_path / "e", cfg, stages=["identity", "generator"])
    gen = read_sidecar(engines["generator"])
    assert gen["inputs"][1]["shape"] == ["batch", *model.cfg.id_map_shape]
    assert gen["outputs"][0]["shape"] == ["batch", 3, model.cfg.size, model.cfg.size]


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_fused_modconv_runs_the_warp_generator(model, impl, monkeypatch):
    """The fused op serves the warp variant too: every plain 3x3 StyledConv goes through it (one call
    per layer for the whole batch), the upsampling ones stay on the library path, and the frame
    equals the reference generator's; the torch-cuda runner takes this path (here on the CPU)."""
    from rt_engine.backends import cuda_backend as cb
    from rt_engine.models import fused_modconv as fm
    from rt_engine.models.warp import FastWarpGenerator

    if impl == "cpu":
        try:
            fm.load_native()
        except Exception as e:  # no compiler / pybind11 here: the C++ twin cannot be built
            pytest.skip(f"native kernels unavailable: {e}")
    cfg = model.cfg
    gen = FastWarpGenerator(model.generator, torch.float32, form=f"fused-{impl}")
    ops = gen.ops()
    assert ops.count(f"fused_modconv[{impl}]") == 5 and ops.count("conv_transpose2d+blur") == 4
    calls = []
    real = fm.modulated_conv2d

    def spy(x, *args, **kw):
        calls.append(x.shape[0])
        return real(x, *args, **kw)

    monkeypatch.setattr(fm, "modulated_conv2d", spy)
    id0, id1 = model.encode_identity(torch.rand(1, 3, 224, 224) * 2 - 1)
    var = torch.randn(3, cfg.mouth_dim + cfg.pose_dim)
    with torch.no_grad():
        out = gen(gen.identity_base(id0), var, id1)
        ref = model.generator(torch.cat([id0.expand(3, -1), var], 1), id1.expand(3, -1, -1, -1))
    assert calls == [3] * 5
    assert psnr(out, ref) > 60
    runner = cb.TorchCudaRunner(model, "fp32", device="cpu", impl=impl, max_batch=4)
    probe = Probe.random(seed=5)
    assert psnr(run_frame(runner, probe), run_frame(make_backend("torch", model=model), probe)) > 60


def test_fast_runner_leaves_the_callers_warp_model_alone(model):
    """The inference twin holds the caller's generator (no copy) and changes neither its mode, its
    form nor its autograd state; the runner's encoders are eval-mode copies (BN), so a caller's
    train-mode model gives the same frames."""
    import copy

    from rt_engine.backends.torch_backend import FastTorchRunner

    mine = copy.deepcopy(model).train()
    forms = [m.form for m in mine.modules() if hasattr(m, "form")]
    runner = FastTorchRunner(mine, precision="fp32")
    assert runner.generator.gen is mine.generator
    assert all(m.training for m in mine.modules()) and all(p.requires_grad for p in mine.parameters())
    assert [m.form for m in mine.modules() if hasattr(m, "form")] == forms
    probe = Probe.random(seed=4)
    out = run_frame(runner, probe)  # [1,3,S,S]
    assert not out.requires_grad and all(m.training for m in mine.modules())
    assert psnr(out, run_frame(make_backend("torch", model=model), probe)) > 80.0


def test_mouth_mask_keeps_the_photos_mouth_out():
    """warp_mouth_mask: whatever the photo's mouth shows, the frame is the same (the box is blanked
    before the appearance encoder), and the drawn image owns the box from the start."""
    torch.manual_seed(2)
    m = PCAVS(dataclasses.replace(warp_config(), size=224, warp_mouth_mask=True)).eval()
    y0, y1, x0, x1 = mouth_box(224)
    a = torch.rand(1, 3, 224, 224) * 2 - 1
    b = a.clone()
    b[..., y0:y1, x0:x1] = torch.rand(1, 3, y1 - y0, x1 - x0)  # another mouth
    mel = torch.rand(1, 1, 80, 20)
    taps = {}
    with torch.no_grad():
        fa, fb = m(a, a, mel), m(b, a, mel)
        id0, id1 = m.encode_identity(a)
        m.generator(m.make_style(id0, m.encode_mouth(mel), m.encode_pose(a)), id1, taps=taps)
    assert torch.equal(fa, fb)
    assert taps["mask"][0, 0, (y0 + y1) // 2, (x0 + x1) // 2].item() < 0.05


@pytest.fixture(scope="module")
def open_model(model) -> PCAVS:
    """``model`` with the mouth-opening channel (warp_open), widened from it, with a live channel."""
    from training.train import widen_for_opening

    cfg = dataclasses.replace(model.cfg, warp_open=True)
    m = PCAVS(cfg).eval()
    m.load_state_dict(widen_for_opening(model.state_dict(), m.state_dict(), cfg))
    return m  # its opening columns are zero: it draws what ``model`` draws (next test)


@pytest.fixture(scope="module")
def live_open_model(open_model) -> PCAVS:
    """``open_model`` as if trained: non-zero opening columns in every modulation, non-zero templates."""
    import copy

    m = copy.deepcopy(open_model)
    with torch.no_grad():
        for name, p in m.generator.named_parameters():
            if name.endswith("modulation.weight"):
                p[:, m.cfg.style_dim :].normal_(0, 0.05)
            elif name.startswith("open_") and name != "open_head":  # the flow, blend and colour templates
                p.normal_(0, 0.05)
    return m


def test_widened_model_draws_what_the_old_one_drew(model, open_model):
    probe = Probe.random(seed=4)
    with torch.no_grad():
        a = model(probe.id_img, probe.pose_img, probe.mel)
        b = open_model(probe.id_img, probe.pose_img, probe.mel)
    assert (a - b).abs().max().item() < 1e-4
    # a state dict that cannot widen is refused, not silently padded
    from rt_engine.errors import RtEngineError
    from training.train import widen_for_opening

    bad = dict(model.state_dict())
    bad["generator.flow_head.weight"] = torch.zeros(1)
    with pytest.raises(RtEngineError, match="flow_head"):
        widen_for_opening(bad, open_model.state_dict(), open_model.cfg)


def test_opening_channel_reaches_the_image_and_defaults_to_the_head(live_open_model):
    m = live_open_model
    with torch.no_grad():
        probe = Probe.random(seed=6)
        id0, id1 = m.encode_identity(probe.id_img)
        style = m.make_style(id0, m.encode_mouth(probe.mel), m.encode_pose(probe.pose_img))
        own = m.generator.predict_opening(style)  # [1,1]
        assert own.shape == (1, 1)
        default = m.generate(style, id1)
        same = m.generate(style, id1, opening=own.reshape(1))
        wide = m.generate(style, id1, opening=torch.tensor([2.5]))
        shut = m.generate(style, id1, opening=torch.tensor([-2.5]))
    assert torch.equal(default, same)  # no opening given: the head's own
    assert (wide - shut).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "name,precision,min_psnr", [("torch-fast", "fp32", 80.0), ("onnxruntime", "fp32", 80.0), ("openvino", "fp32", 60.0)]
)
def test_backends_run_the_opening_channel(live_open_model, name, precision, min_psnr):
    """Every runner reads the opening off the mouth code inside the generator: no new input."""
    if name not in available_backends():
        pytest.skip(f"backend {name} not available here")
    probe = Probe.random(seed=7)
    ref = run_frame(make_backend("torch", model=live_open_model), probe)
    out = run_frame(make_backend(name, model=live_open_model, precision=precision), probe)
    assert psnr(out, ref) > min_psnr


def test_release_calibrates_the_opening_around_silence(live_open_model):
    """training.release --open-gain: the head's output is scaled around its value in silence."""
    import copy

    from rt_engine.inputs import audio as audio_in
    from training.release import calibrate_opening

    m = copy.deepcopy(live_open_model)
    sil = torch.from_numpy(audio_in.silence_window().copy())[None]  # [1,1,80,20]
    mel = torch.cat([sil, torch.rand(2, 1, 80, 20) * 4 - 2])

    def head_out(model):
        with torch.no_grad():
            return model.generator.open_head(model.encode_mouth(mel).float()).squeeze(1)  # [3]

    before = head_out(m)
    calibrate_opening(m, 2.0)
    after = head_out(m)
    assert torch.allclose(after[0], before[0], atol=1e-5)
    assert torch.allclose(after[1:] - after[0], 2.0 * (before[1:] - before[0]), atol=1e-5)
    with pytest.raises(ConfigError, match="warp_open"):
        calibrate_opening(PCAVS(warp_config()), 1.5)


def test_render_with_the_real_opening(live_open_model, model):
    """render_arrays(opening=...): the diagnostic of benchmarks.quality's true_opening method. Frame i
    draws opening[i] in place of the head's; the head's own values reproduce the default render;
    non-warp_open models and other backends are refused with a clear error."""
    import numpy as np

    from benchmarks.quality import Reference, true_opening
    from rt_engine.backends.torch_backend import TorchRunner
    from rt_engine.errors import InputError
    from rt_engine.render import render_arrays

    rng = np.random.default_rng(3)
    ident = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    wav = (rng.standard_normal(16000) * 0.1).astype(np.float32)  # 1 s: target frames 2..22
    runner = TorchRunner(live_open_model)
    kw = dict(identity=ident, audio=wav, pose="still", aligned=True, runner=runner, batch_size=4)
    base = render_arrays(**kw)
    n_video = int(base.frame_inds[-1]) + 1
    wide = render_arrays(**kw, opening=np.full(n_video, 2.5, np.float32))
    shut = render_arrays(**kw, opening=np.full(n_video, -2.5, np.float32))
    assert np.abs(wide.frames - shut.frames).max() > 1e-2
    ramp = np.linspace(-2.5, 2.5, n_video).astype(np.float32)
    mixed = render_arrays(**kw, opening=ramp)  # frame by frame: the first frame as shut, the last as wide
    assert np.allclose(mixed.frames[-1], wide.frames[-1], atol=1e-5)
    with pytest.raises(InputError, match="needs one"):
        render_arrays(**kw, opening=np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="warp_open"):
        render_arrays(**{**kw, "runner": TorchRunner(model)}, opening=np.zeros(n_video, np.float32))
    # quality's true opening: the real curve z-scored over the clip, at the evaluated frames only
    mouth = np.array([0.1, 0.3, np.nan, 0.2])
    ref = Reference(np.array([2, 3, 4, 6]), None, None, mouth, None, None, None, None)
    z = true_opening(ref)
    assert z.shape == (7,) and z[[0, 1, 4, 5]].tolist() == [0, 0, 0, 0]
    assert np.allclose(z[[2, 3, 6]], (mouth[[0, 1, 3]] - 0.2) / np.std(mouth[[0, 1, 3]]))


def test_release_recalibrates_a_released_file(live_open_model, tmp_path):
    """training.release on a .safetensors: only the opening head's last layer changes, fp16 stays fp16
    bit for bit, and the provenance multiplies the gains."""
    from safetensors.torch import load_file

    from rt_engine.models.checkpoint import read_single_meta, save_single
    from training.release import main as release_main

    src = save_single(live_open_model, tmp_path / "m.safetensors", half=True, provenance={"open_gain": 1.5})
    assert release_main([str(src), str(tmp_path / "same.safetensors"), "--open-gain", "1"]) == 0
    a, same = load_file(src), load_file(tmp_path / "same.safetensors")
    assert all(torch.equal(a[k], same[k]) and a[k].dtype == same[k].dtype for k in a)
    assert release_main([str(src), str(tmp_path / "wide.safetensors"), "--open-gain", "2"]) == 0
    wide = load_file(tmp_path / "wide.safetensors")
    changed = sorted(k for k in a if not torch.equal(a[k], wide[k]))
    assert changed == ["generator.open_head.2.bias", "generator.open_head.2.weight"]
    assert wide["generator.open_head.2.weight"].dtype == torch.float16
    assert read_single_meta(tmp_path / "wide.safetensors")["provenance"]["open_gain"] == 3.0
    assert release_main([str(src), str(tmp_path / "x.safetensors"), "--open-gain", "fit"]) == 2  # needs --data


def test_opening_response_measures_the_bundled_model_and_refuses_others(model, tmp_path):
    """benchmarks.opening_response: the bundled model opens the bundled photo's mouth when its opening
    channel says so (dlib on the drawn frames); a model without the channel is refused."""
    import cv2
    import numpy as np

    from benchmarks import metrics as M
    from benchmarks.opening_response import drawn_opening
    from benchmarks.opening_response import main as response_main
    from rt_engine.assets import DEFAULT_IDENTITY
    from rt_engine.models.checkpoint import save_single
    from rt_engine.render import make_runner

    photo = cv2.cvtColor(cv2.imread(str(DEFAULT_IDENTITY)), cv2.COLOR_BGR2RGB)  # [224,224,3] aligned
    wav = (np.random.default_rng(0).standard_normal(32000) * 0.05).astype(np.float32)
    runner, analyzer = make_runner(None, "fp32", "torch"), M.FaceAnalyzer()
    shut, wide = (drawn_opening(runner, photo, wav, analyzer, z) for z in (-2.0, 3.0))
    assert wide > shut + 0.05, (shut, wide)
    plain = save_single(model, tmp_path / "plain.safetensors")
    with pytest.raises(SystemExit, match="no mouth-opening channel"):
        response_main(["--clips", str(tmp_path), "--out", str(tmp_path / "out"), "--checkpoint", str(plain)])


def test_opening_pair_fit_separates_target_from_reference():
    """benchmarks.opening_response.fit_openings: the drawn opening's share of the target's and of the
    reference's opening, recovered from noisy rows; rows without a face are left out."""
    import numpy as np

    from benchmarks.opening_response import fit_openings

    rng = np.random.default_rng(0)
    t, r = rng.uniform(0.0, 0.15, 200), rng.uniform(0.0, 0.15, 200)  # [N] inner-lip gap / eye width
    d = 0.25 * t + 0.55 * r + 0.01 + rng.normal(0, 0.002, 200)
    d[:7] = np.nan
    fit = fit_openings(d, t, r)
    assert fit["pairs"] == 193
    assert abs(fit["target"] - 0.25) < 0.03 and abs(fit["reference"] - 0.55) < 0.03
    assert fit["corr_reference"] > fit["corr_target"]
    follows = fit_openings(t + rng.normal(0, 0.002, 200), t, r)
    assert abs(follows["target"] - 1.0) < 0.03 and abs(follows["reference"]) < 0.03
