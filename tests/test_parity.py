"""Parity with the official PC-AVS code: ../shared/fixtures/pcavs_official_v1.

The fixture's recipe regenerates official-format checkpoints (random but deterministic weights);
golden.npz holds the official code's outputs per stage. Each stage is fed the golden input of
that stage, so an error is localised; the end-to-end check starts from the raw files through the
command line, exactly as a user would run it.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rt_engine.backends.torch_backend import TorchRunner
from rt_engine.config import NoiseMode
from rt_engine.inputs import audio as A
from rt_engine.inputs import image as I
from rt_engine.models.checkpoint import OFFICIAL_NETS, UNUSED_PREFIXES, load_official

from .shared_data import FIXTURE, need

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fx():
    need(FIXTURE / "golden.npz")
    return {"golden": np.load(FIXTURE / "golden.npz"), "manifest": json.loads((FIXTURE / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def official_dir(fx, tmp_path_factory):
    """Official checkpoint layout <dir>/demo/latest_net_*.pth built from the fixture's recipe."""
    spec = importlib.util.spec_from_file_location("pcavs_recipe", FIXTURE / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    man, bn = fx["manifest"], np.load(FIXTURE / "bn_stats.npz")
    d = tmp_path_factory.mktemp("official") / "demo"
    d.mkdir()
    for net, e in man["networks"].items():
        sd = recipe.state_dict(man["salt"], net, e["keys"], bn)
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, d / f"latest_net_{net}.pth")
    return d.parent


@pytest.fixture(scope="module")
def model(official_dir):
    return load_official(official_dir)


def _tol(fx, key, mode="fp32"):
    tol = fx["manifest"]["tolerances"][mode]
    return tol.get(key, tol["*"])


def check(fx, key, mine, mode="fp32", rows=None):
    """Compare with the golden array (its first ``rows`` frames; relative limits use the whole array's max)."""
    g_all = fx["golden"][key]
    g = g_all if rows is None else g_all[:rows]
    a = np.asarray(mine, dtype=np.float64).reshape(g.shape)
    kind, limit = _tol(fx, key, mode)
    err = np.abs(a - g).max()
    if kind == "rel_max":
        assert err <= limit * np.abs(g_all).max(), f"{key}: rel_max {err / np.abs(g_all).max():.3g} > {limit}"
    elif kind == "abs":
        assert err <= limit, f"{key}: abs {err:.3g} > {limit}"
    elif kind == "levels":
        assert err <= limit, f"{key}: {err} levels > {limit}"
    elif kind == "exact":
        assert np.array_equal(a, g), f"{key}: not exact"
    else:
        raise AssertionError(f"unhandled tolerance {kind}")


def test_manifest_keys_are_all_accounted_for(fx, model):
    """Every key the official code reads is a key of our networks; every key it ignores is declared unused."""
    for net, e in fx["manifest"]["networks"].items():
        ours = getattr(model, OFFICIAL_NETS[net]).state_dict()
        for key, info in e["keys"].items():
            if info["used"]:
                assert key in ours or key.endswith("kernel"), f"{net}/{key} used officially but not by us"
            else:
                assert key.endswith("num_batches_tracked") or key.startswith(UNUSED_PREFIXES[net]), f"{net}/{key}"
        extra = set(ours) - set(e["keys"])
        assert not extra, f"{net}: keys the official checkpoint lacks: {sorted(extra)[:5]}"


def test_preprocessing_exact(fx):
    g = fx["golden"]
    inp = FIXTURE / "inputs"
    wav = A.normalize(A.load_audio(inp / "Audio_Source/681600002.mp3"))
    check(fx, "wav", wav)
    check(fx, "mel_basis", A.mel_basis())
    mel = A.log_mel(wav)
    check(fx, "mel", mel)
    frames = A.target_frames(mel.shape[0])
    assert len(frames) == 361 and frames[0] == 2 and frames[-1] == 362
    check(fx, "target_frame_inds", frames[:8])
    check(fx, "mel_start_inds", 4 * (frames[:8] - 2))
    check(fx, "mel_windows", A.mel_windows(mel, frames[:8]))
    check(fx, "pose_frame_inds", [I.pingpong_index(int(i), 160) for i in frames[:8]])
    check(fx, "input_id_u8", I.official_crop(I.read_image(inp / "Input/517600055/000000.jpg"))[None])
    pose = [I.official_crop(I.read_image(inp / f"Pose_Source/517600078/{p:06d}.jpg")) for p in g["pose_frame_inds"]]
    check(fx, "pose_frames_u8", np.stack(pose))
    x = I.to_tensor(g["input_id_u8"]).numpy()
    assert np.array_equal(x, (g["input_id_u8"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32) * 2 - 1)


def test_pingpong_crosses_turns():
    n = 5
    assert [I.pingpong_index(i, n) for i in range(12)] == [0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 1]


@torch.inference_mode()
def test_encoder_stages(fx, model):
    g = fx["golden"]
    T = lambda k: torch.from_numpy(g[k])  # noqa: E731
    id0, id1 = model.encode_identity(I.to_tensor(g["input_id_u8"]))
    check(fx, "id_feature0", id0)
    check(fx, "id_feature1", id1)
    pe = model.pose_encoder
    check(fx, "ref_noid_feature", pe.noid_feature(I.to_tensor(g["input_id_u8"])))
    check(fx, "pose_noid_feature", pe.noid_feature(I.to_tensor(g["pose_frames_u8"])))
    check(fx, "headpose_hidden", pe.to_headpose(T("pose_noid_feature")))
    check(fx, "ref_headpose_hidden", pe.to_headpose(T("ref_noid_feature")))
    check(fx, "headpose", pe.headpose_embed(T("headpose_hidden")))
    check(fx, "ref_headpose", pe.headpose_embed(T("ref_headpose_hidden")))
    check(fx, "audio_content", model.audio_encoder(T("mel_windows")))
    check(fx, "mouth_embed", pe.mouth(T("audio_content")))
    check(fx, "style", model.make_style(T("id_feature0"), T("mouth_embed"), T("headpose")))
    check(fx, "style_ref", model.make_style(T("id_feature0"), T("mouth_embed"), T("ref_headpose")))


@pytest.mark.parametrize("form", ["ref", "static"])
@torch.inference_mode()
def test_generator(fx, model, form):
    g = fx["golden"]
    model.generator.set_form(form)
    taps = {}
    n = 8 if form == "ref" else 3  # the static form on fewer frames: it is proven equal in test_modconv
    id1 = torch.from_numpy(g["id_feature1"]).expand(8, -1, -1, -1)
    out = model.generator(torch.from_numpy(g["style"][:n]), id1[:n], NoiseMode.STORED, taps)
    check(fx, "out", out, rows=n)
    for k in ("conv1", "convs0", "convs1", "skip7", "skip14", "skip28", "skip56", "skip112", "skip224"):
        check(fx, f"g0_{k}", taps[k][0])
    check(fx, "out_uint8", I.to_uint8(out), rows=n)
    if form == "ref":
        check(
            fx, "out_ref_pose", model.generator(torch.from_numpy(g["style_ref"][:3]), id1[:3], NoiseMode.STORED), rows=3
        )
        # noise matters: zero noise must NOT pass (guards against a test that cannot fail)
        zero = model.generator(torch.from_numpy(g["style"][:2]), id1[:2], NoiseMode.ZERO)
        assert np.abs(zero.numpy() - g["out"][:2]).max() > 100 * 1e-4 * np.abs(g["out"]).max()


def _psnr(a, b):
    return 10 * np.log10(4.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


# bf16 is emulated (slow) on CPUs without AVX512-BF16/AMX: the default suite checks the first frame,
# the slow marker all eight.
@pytest.mark.parametrize("n", [1, pytest.param(8, marks=pytest.mark.slow)])
@torch.inference_mode()
def test_bf16_psnr(fx, model, n):
    g = fx["golden"]
    r = TorchRunner(model, precision="bf16")
    try:
        id0, id1 = r.encode_identity(I.to_tensor(g["input_id_u8"]))
        mouth = r.encode_audio(torch.from_numpy(g["mel_windows"][:n]))
        pose = r.encode_pose(I.to_tensor(g["pose_frames_u8"][:n]))
        out = r.generate(id0, id1, mouth, pose, NoiseMode.STORED).numpy()
    finally:
        for m in model.modules():  # back to the reference layout for the other tests
            if isinstance(m, torch.nn.Conv2d):
                m.weight.data = m.weight.data.contiguous()
        model.generator.set_form("ref")
    per_frame = [_psnr(o, t) for o, t in zip(out, g["out"][:n], strict=True)]
    assert _psnr(out, g["out"][:n]) >= 40.0, per_frame
    assert min(per_frame) >= 36.0, per_frame


def test_render_cli_reproduces_golden_frames(fx, official_dir, tmp_path):
    """The documented parity command, end to end from the raw files."""
    inp = FIXTURE / "inputs"
    raw = tmp_path / "x.npz"
    cmd = [
        sys.executable,
        "-m",
        "rt_engine.render",
        "--checkpoint",
        str(official_dir),
        "--aligned",
        "--identity",
        str(inp / "Input/517600055/000000.jpg"),
        "--pose",
        str(inp / "Pose_Source/517600078"),
        "--pose-length",
        "160",
        "--audio",
        str(inp / "Audio_Source/681600002.mp3"),
        "--noise",
        "stored",
        "--save-raw",
        str(raw),
        "--max-frames",
        "8",
        "-q",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    x = np.load(raw)
    check(fx, "target_frame_inds", x["frame_inds"])
    check(fx, "pose_frame_inds", x["pose_inds"])
    g = fx["golden"]["out"]
    assert np.abs(x["frames"] - g).max() <= _tol(fx, "e2e_out")[1] * np.abs(g).max()
    # the fixture's own checker agrees
    mine = tmp_path / "mine.npz"
    np.savez(mine, e2e_out=x["frames"])
    r = subprocess.run([sys.executable, str(FIXTURE / "compare.py"), str(mine)], capture_output=True, text=True)
    assert r.returncode == 0 and "0 failure(s)" in r.stdout, r.stdout + r.stderr
