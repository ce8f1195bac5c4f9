"""Checkpoint formats: strict official loading, our single file, conversion both ways."""

import subprocess
import sys

import pytest
import torch

from rt_engine.config import model_preset
from rt_engine.errors import CheckpointError
from rt_engine.models.checkpoint import load_checkpoint, load_official, load_single, save_official, save_single
from rt_engine.models.pcavs import PCAVS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = PCAVS(model_preset("tiny")).eval()
    for mod in m.modules():  # non-trivial BN statistics, so a wrong load would show
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
    return m


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


@pytest.mark.parametrize("legacy", [False, True])
def test_official_roundtrip(tiny, tmp_path, legacy):
    save_official(tiny, tmp_path / "demo", legacy=legacy)
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert files == ["latest_net_A_sync.pth", "latest_net_E.pth", "latest_net_G.pth", "latest_net_V.pth"]
    _same(tiny, load_official(tmp_path, model_preset("tiny")))  # finds the demo/ subfolder


def test_single_roundtrip_and_half(tiny, tmp_path):
    p = save_single(tiny, tmp_path / "m.safetensors", provenance={"note": "test"})
    _same(tiny, load_single(p))
    h = load_checkpoint(save_single(tiny, tmp_path / "h.safetensors", half=True))
    for (k, a), b in zip(tiny.state_dict().items(), h.state_dict().values(), strict=True):
        if torch.is_floating_point(a):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), k


def _official_dir(tiny, tmp_path):
    return save_official(tiny, tmp_path / "ck")


def test_missing_key_names_file_key_and_shape(tiny, tmp_path):
    d = _official_dir(tiny, tmp_path)
    sd = torch.load(d / "latest_net_E.pth")
    del sd["headpose_embed.1.weight"]
    torch.save(sd, d / "latest_net_E.pth")
    with pytest.raises(
        CheckpointError,
        match=r"latest_net_E\.pth: missing key 'headpose_embed\.1\.weight' "
        r"\(expected shape \[12, 64\]\)",
    ):
        load_official(d, model_preset("tiny"))


def test_misshaped_key_names_both_shapes(tiny, tmp_path):
    d = _official_dir(tiny, tmp_path)
    sd = torch.load(d / "latest_net_G.pth")
    sd["conv1.conv.modulation.bias"] = torch.zeros(7)
    torch.save(sd, d / "latest_net_G.pth")
    with pytest.raises(
        CheckpointError,
        match=r"latest_net_G\.pth: key 'conv1\.conv\.modulation\.bias' has shape "
        r"\[7\].*expects \[32\]",
    ):
        load_official(d, model_preset("tiny"))


def test_unexpected_key_and_wrong_blur_kernel(tiny, tmp_path):
    d = _official_dir(tiny, tmp_path)
    sd = torch.load(d / "latest_net_A_sync.pth")
    sd["model.extra.weight"] = torch.zeros(3)
    torch.save(sd, d / "latest_net_A_sync.pth")
    with pytest.raises(CheckpointError, match="unexpected key 'model.extra.weight'"):
        load_official(d, model_preset("tiny"))
    d2 = save_official(tiny, tmp_path / "ck2")
    sd = torch.load(d2 / "latest_net_G.pth")
    sd["convs.0.conv.blur.kernel"] = torch.ones(4, 4)
    torch.save(sd, d2 / "latest_net_G.pth")
    with pytest.raises(CheckpointError, match="blur kernel"):
        load_official(d2, model_preset("tiny"))


def test_unused_keys_may_hold_nan(tiny, tmp_path):
    d = _official_dir(tiny, tmp_path)
    sd = torch.load(d / "latest_net_G.pth")
    for k in sd:
        if k.startswith(("style.", "input.")):
            sd[k] = torch.full_like(sd[k], float("nan"))
    torch.save(sd, d / "latest_net_G.pth")
    _same(tiny, load_official(d, model_preset("tiny")))


def test_config_mismatch_and_wrong_files(tiny, tmp_path):
    d = _official_dir(tiny, tmp_path)
    with pytest.raises(CheckpointError, match="shape"):  # tiny files into the official config
        load_official(d)
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "latest_net_G.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="latest_net_G.pth: cannot read"):
        load_official(bad, model_preset("tiny"))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_checkpoint(tmp_path / "x.safetensors")


def test_converter_cli(tiny, tmp_path):
    single = save_single(tiny, tmp_path / "a.safetensors")
    run = [sys.executable, "-m", "rt_engine.models.checkpoint", "convert"]
    r = subprocess.run(run + [str(single), str(tmp_path / "off")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        run + [str(tmp_path / "off"), str(tmp_path / "b.safetensors"), "--preset", "tiny"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    _same(tiny, load_checkpoint(tmp_path / "b.safetensors"))
    r = subprocess.run(run + [str(tmp_path / "off"), str(tmp_path / "c.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
