"""`python -m rt_engine.render`: outputs, semantics and bad input (one error line, exit 2)."""

import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
import soundfile as sf
import torch

from rt_engine.config import NoiseMode, model_preset
from rt_engine.models.checkpoint import save_official, save_single
from rt_engine.models.pcavs import PCAVS
from rt_engine.render import render_arrays

from .shared_data import DEMO, need

SR = 16000


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("render")
    torch.manual_seed(0)
    model = PCAVS(model_preset("tiny")).eval()
    ckpt = save_single(model, d / "tiny.safetensors")
    rng = np.random.default_rng(0)
    face = (rng.random((224, 224, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(d / "id.png"), face)
    frames = d / "pose"
    frames.mkdir()
    for k in range(5):
        cv2.imwrite(str(frames / f"{k:06d}.jpg"), np.roll(face, 3 * k, axis=1))
    t = np.arange(int(1.2 * SR)) / SR
    sf.write(d / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t) * (t > 0.3)).astype(np.float32), SR)
    return {"dir": d, "model": model, "ckpt": ckpt, "id": d / "id.png", "pose": frames, "audio": d / "speech.wav"}


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "rt_engine.render", "-q", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_mp4_and_raw_output(assets, tmp_path):
    a = assets
    r = run(
        "--identity",
        a["id"],
        "--audio",
        a["audio"],
        "--pose",
        a["pose"],
        "--aligned",
        "--checkpoint",
        a["ckpt"],
        "--out",
        tmp_path / "o.mp4",
        "--save-raw",
        tmp_path / "o.npz",
    )
    assert r.returncode == 0, r.stderr
    raw = np.load(tmp_path / "o.npz")
    n_mel = int(np.ceil(1.2 * SR / 160)) + 7
    assert list(raw["frame_inds"]) == list(range(2, n_mel // 4 - 2))
    # ping-pong over the 5 pose frames
    assert list(raw["pose_inds"][:10]) == [2, 3, 4, 4, 3, 2, 1, 0, 0, 1]
    assert raw["frames"].shape == (len(raw["frame_inds"]), 3, 112, 112) and raw["frames"].dtype == np.float32
    with av.open(str(tmp_path / "o.mp4")) as c:
        v, au = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == "h264" and au.codec_context.name == "aac"
        n = sum(1 for _ in c.decode(v))
    assert n == raw["frame_inds"][-1] + 1  # frame i at i/25 s; frames 0 and 1 repeat frame 2


def test_pose_modes_and_noise(assets):
    a = assets
    kw = dict(checkpoint=a["ckpt"], aligned=True, max_frames=6)
    still = render_arrays(a["id"], a["audio"], "still", **kw)
    idle = render_arrays(a["id"], a["audio"], "idle", **kw)
    front = render_arrays(a["id"], a["audio"], "still", frontalize=True, **kw)
    assert still.frames.shape == idle.frames.shape == front.frames.shape == (6, 3, 112, 112)
    assert not np.allclose(still.frames, front.frames)
    assert np.abs(np.diff(idle.frames, axis=0)).mean() > 0
    z1 = render_arrays(a["id"], a["audio"], "still", noise=NoiseMode.ZERO, **kw)
    z2 = render_arrays(a["id"], a["audio"], "still", noise=NoiseMode.ZERO, **kw)
    assert np.array_equal(z1.frames, z2.frames)
    # bf16 stays close to fp32
    bf = render_arrays(a["id"], a["audio"], "still", precision="bf16", **kw)
    assert 10 * np.log10(4 / np.mean((bf.frames - still.frames) ** 2)) > 30


def test_mouth_gain(assets, tmp_path):
    """mouth_gain 1 is the trained model bit for bit; 0 holds every mouth code at silence's, so a
    still pose renders what silent audio renders; 2 doubles each code's distance from silence's;
    a value out of range is one error line."""
    from rt_engine.backends.base import MouthGain
    from rt_engine.backends.torch_backend import TorchRunner
    from rt_engine.inputs import audio as audio_in

    a = assets
    kw = dict(checkpoint=a["ckpt"], aligned=True, max_frames=8, noise=NoiseMode.ZERO)
    base = render_arrays(a["id"], a["audio"], "still", **kw)
    assert np.array_equal(base.frames, render_arrays(a["id"], a["audio"], "still", mouth_gain=1.0, **kw).frames)
    motion = np.abs(np.diff(base.frames, axis=0)).max()  # the speech moves the frames (a random
    assert motion > 0  # tiny model's outputs are small, so the checks below are relative to it)
    held = render_arrays(a["id"], a["audio"], "still", mouth_gain=0.0, **kw)
    silent = render_arrays(a["id"], np.zeros(int(1.2 * SR), np.float32), "still", **kw)
    assert np.abs(held.frames - silent.frames).max() < 1e-3 * motion
    assert np.abs(held.frames - held.frames[:1]).max() < 1e-3 * motion
    wider = render_arrays(a["id"], a["audio"], "still", mouth_gain=2.0, **kw)
    assert np.abs(wider.frames - base.frames).max() > 0.1 * motion

    runner = TorchRunner(a["model"])
    mel = torch.from_numpy(audio_in.mel_windows(audio_in.audio_features(a["audio"])[1], np.arange(2, 10)))
    m = runner.encode_audio(mel)  # [8,mouth_dim]
    gain = MouthGain(2.0)
    m0 = gain.silence_code(runner)  # [1,mouth_dim]
    assert m0.shape == (1, m.shape[1])
    torch.testing.assert_close(gain(runner, m), 2 * m - m0)
    assert MouthGain(1.0)(runner, m) is m
    other = TorchRunner(PCAVS(model_preset("tiny")).eval())  # another model: its own silence code
    assert not torch.allclose(gain.silence_code(other), m0)

    r = run(
        "--identity",
        a["id"],
        "--audio",
        a["audio"],
        "--aligned",
        "--checkpoint",
        a["ckpt"],
        "--out",
        tmp_path / "x.mp4",
        "--mouth-gain",
        "5",
    )
    assert "mouth_gain must be in [0, 3.0]" in _err(r)


def _err(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_bad_inputs(assets, tmp_path):
    a = assets
    base = ["--pose", "still", "--aligned", "--checkpoint", a["ckpt"], "--out", tmp_path / "x.mp4"]
    assert "not found" in _err(run("--identity", tmp_path / "none.jpg", "--audio", a["audio"], *base))
    (tmp_path / "bad.jpg").write_text("not an image")
    assert "not a readable image" in _err(run("--identity", tmp_path / "bad.jpg", "--audio", a["audio"], *base))
    assert "not found" in _err(run("--identity", a["id"], "--audio", tmp_path / "none.wav", *base))
    sf.write(tmp_path / "short.wav", np.full(int(0.1 * SR), 0.1, np.float32), SR)
    assert "0.2 s" in _err(run("--identity", a["id"], "--audio", tmp_path / "short.wav", *base))
    (tmp_path / "junk.wav").write_bytes(b"junk" * 100)
    assert "junk.wav" in _err(run("--identity", a["id"], "--audio", tmp_path / "junk.wav", *base))
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty (0 bytes)" in _err(run("--identity", a["id"], "--audio", tmp_path / "empty.wav", *base))
    (tmp_path / "bad.mp3").write_bytes(bytes(range(256)) * 12)  # _err: one line, no decoder "Note:" lines
    msg = _err(run("--identity", a["id"], "--audio", tmp_path / "bad.mp3", *base))
    assert "bad.mp3" in msg and "Errno" not in msg
    missing = ["--pose", "still", "--aligned", "--checkpoint", a["ckpt"], "--out", tmp_path / "no" / "x.mp4"]
    assert "output folder does not exist" in _err(run("--identity", a["id"], "--audio", a["audio"], *missing))
    assert not (tmp_path / "no").exists()
    assert "pose source not found" in _err(
        run(
            "--identity",
            a["id"],
            "--audio",
            a["audio"],
            "--pose",
            tmp_path / "nope",
            "--checkpoint",
            a["ckpt"],
            "--out",
            "x.mp4",
        )
    )


def test_silent_audio_warns_and_renders(assets, tmp_path):
    a = assets
    sf.write(tmp_path / "silent.wav", np.zeros(SR, np.float32), SR)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rt_engine.render",
            "--identity",
            a["id"],
            "--audio",
            tmp_path / "silent.wav",
            "--aligned",
            "--checkpoint",
            a["ckpt"],
            "--save-raw",
            tmp_path / "s.npz",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "silent" in r.stderr, r.stderr
    assert np.load(tmp_path / "s.npz")["frames"].shape[0] > 0


def test_bad_checkpoints(assets, tmp_path):
    a = assets
    args = ["--identity", a["id"], "--audio", a["audio"], "--aligned", "--out", tmp_path / "x.mp4"]
    d = save_official(a["model"], tmp_path / "off")
    sd = torch.load(d / "latest_net_V.pth")
    del sd["conv1x1.bias"]
    torch.save(sd, d / "latest_net_V.pth")
    msg = _err(run(*args, "--checkpoint", d))  # official layout loads into the official config
    assert "latest_net_" in msg and ("shape" in msg or "missing key" in msg)
    assert "checkpoint path not found" in _err(run(*args, "--checkpoint", tmp_path / "nothing"))
    (tmp_path / "x.safetensors").write_bytes(b"x" * 64)
    assert "x.safetensors" in _err(run(*args, "--checkpoint", tmp_path / "x.safetensors"))


def test_image_without_face(assets, tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe (face detection) not installed")
    a = assets
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((300, 300, 3), 128, np.uint8))
    msg = _err(
        run(
            "--identity",
            tmp_path / "flat.png",
            "--audio",
            a["audio"],
            "--checkpoint",
            a["ckpt"],
            "--out",
            tmp_path / "x.mp4",
        )
    )
    assert "no face" in msg and "flat.png" in msg


def test_raw_photo_is_detected_and_cropped(assets, tmp_path):
    pytest.importorskip("mediapipe", reason="mediapipe (face detection) not installed")
    img = cv2.imread(str(need(DEMO / "Input_unz/Input/517600055/000000.jpg")))
    canvas = cv2.copyMakeBorder(cv2.resize(img, (300, 300)), 80, 40, 120, 30, cv2.BORDER_REPLICATE)
    cv2.imwrite(str(tmp_path / "photo.jpg"), canvas)
    res = render_arrays(tmp_path / "photo.jpg", assets["audio"], "still", checkpoint=assets["ckpt"], max_frames=2)
    assert res.frames.shape == (2, 3, 112, 112)
