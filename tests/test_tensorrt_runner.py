"""The TensorRT runner's data flow on the CPU, with a fake TensorRT module.

The fake engine "executes" by reading its input buffers from the raw addresses the runner bound with
``set_tensor_address`` and writing the PyTorch model's results to the bound output addresses, so
this checks what the runner itself does: sidecar checks before deserialization, lazy loading,
per-bucket buffers and contexts, padding a batch up to its bucket, splitting batches above the
profile's max, the style assembled on the device, noise handling. CUDA streams and graphs are
stubbed (``cuda_graphs=False``); their real use is covered by the ``gpu`` tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math

import numpy as np
import pytest
import torch

from rt_engine.backends import tensorrt_backend as tb
from rt_engine.backends.tensorrt_backend import ENGINE_FORMAT, EngineError, TensorRTRunner
from rt_engine.backends.torch_backend import TorchRunner
from rt_engine.config import NoiseMode, model_preset
from rt_engine.models.modconv import NoiseInjection
from rt_engine.models.pcavs import PCAVS

MAX_BATCH = 4
FAKE_VERSION = "10.99.0"


def _io(cfg, stage, noise="stored"):
    B = "batch"
    img = {"name": "img", "shape": [B, 3, 224, 224], "dtype": "float32"}
    if stage == "identity":
        return [img], [
            {"name": "id_feature0", "shape": [B, cfg.id_dim], "dtype": "float32"},
            {"name": "id_feature1", "shape": [B, cfg.id_map_channels, 7, 7], "dtype": "float32"},
        ]
    if stage == "pose":
        return [img], [{"name": "pose", "shape": [B, cfg.pose_dim], "dtype": "float32"}]
    if stage == "audio":
        return (
            [{"name": "mel", "shape": [B, 1, 80, 20], "dtype": "float32"}],
            [{"name": "mouth", "shape": [B, cfg.mouth_dim], "dtype": "float32"}],
        )
    ins = [
        {"name": "style", "shape": [B, cfg.style_dim], "dtype": "float32"},
        {"name": "id_map", "shape": [B, cfg.id_map_channels, 7, 7], "dtype": "float32"},
    ]
    if noise == "input":
        ins += [
            {"name": f"noise_{i}", "shape": [B, 1, r, r], "dtype": "float32"}
            for i, r in enumerate(cfg.start * 2 ** ((i + 1) // 2) for i in range(cfg.num_noises))
        ]
    return ins, [{"name": "image", "shape": [B, 3, cfg.size, cfg.size], "dtype": "float32"}]


def _view(ptr: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor over ``prod(shape)`` floats at host address ``ptr``."""
    n = math.prod(shape)
    return torch.from_numpy(np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr))).view(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.launches = engine, {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        self.launches += 1
        ins, outs = self.engine.io
        x = {s["name"]: _view(self.addr[s["name"]], self.shapes[s["name"]]).clone() for s in ins}
        b = next(iter(x.values())).shape[0]
        m = self.engine.model
        with torch.inference_mode():
            if self.engine.stage == "identity":
                res = m.encode_identity(x["img"])
            elif self.engine.stage == "pose":
                res = (m.encode_pose(x["img"]),)
            elif self.engine.stage == "audio":
                res = (m.encode_mouth(x["mel"]),)
            elif self.engine.noise == "input":
                res = (m.generator(x["style"], x["id_map"], [x[f"noise_{i}"] for i in range(m.cfg.num_noises)]),)
            else:
                res = (m.generator(x["style"], x["id_map"], NoiseMode.STORED),)
        for spec, r in zip(outs, res, strict=True):
            shape = tuple(b if d == "batch" else d for d in spec["shape"])
            _view(self.addr[spec["name"]], shape).copy_(r)
        return True


class FakeEngine:
    def __init__(self, stage, model, noise):
        self.stage, self.model, self.noise = stage, model, noise
        self.io, self.contexts = _io(model.cfg, stage, noise), []

    def create_execution_context(self):
        c = FakeContext(self)
        self.contexts.append(c)
        return c


class FakeTrt:
    __version__ = FAKE_VERSION

    def __init__(self, model, noise="stored"):
        fake = self
        self.deserialized = []

        class Logger:
            WARNING = 1

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                stage = data.decode()
                fake.deserialized.append(stage)
                return FakeEngine(stage, model, noise)

        self.Logger, self.Runtime = Logger, Runtime


class FakeStream:
    cuda_stream = 0

    def __init__(self, device=None):
        pass


def _fake_gpu(monkeypatch, d, noise="stored"):
    """A tiny model, a fake TensorRT for it and a folder of fake engines with real-format sidecars."""
    torch.manual_seed(0)
    model = PCAVS(model_preset("tiny")).eval()
    model.generator.set_form("static")
    for m in model.modules():
        if isinstance(m, NoiseInjection):  # zero-initialised: make the noise inputs matter
            m.weight.data.fill_(0.3)
    fake = FakeTrt(model, noise)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(tb, "import_trt", lambda runtime="tensorrt": fake)
    for stage in tb.STAGES:
        ins, outs = _io(model.cfg, stage, noise)
        (d / f"{stage}.engine").write_bytes(stage.encode())
        side = {
            "format": ENGINE_FORMAT,
            "runtime": "tensorrt",
            "trt_version": FAKE_VERSION,
            "stage": stage,
            "precision": "fp32",
            "targets": ["SM90"],
            "device": "fake H100",
            "profiles": [{"min_batch": 1, "opt_batch": MAX_BATCH, "max_batch": MAX_BATCH}],
            "inputs": ins,
            "outputs": outs,
            "model_config": model.cfg.to_dict(),
            "noise": noise,
            "source_onnx_sha256": "0" * 64,
        }
        (d / f"{stage}.engine.json").write_text(json.dumps(side))
    return model, fake, d


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    return _fake_gpu(monkeypatch, tmp_path)


def test_runner_data_flow_matches_torch(fake_gpu):
    model, fake, d = fake_gpu
    runner = TensorRTRunner(d, device="cpu", cuda_graphs=False)
    assert fake.deserialized == []  # lazy: nothing loaded yet
    ref = TorchRunner(model, form="static")
    g = torch.Generator().manual_seed(1)
    img = torch.rand(6, 3, 224, 224, generator=g) * 2 - 1
    mel = torch.rand(6, 1, 80, 20, generator=g)
    id0, id1 = runner.encode_identity(img[:1])
    assert fake.deserialized == ["identity"]
    r0, r1 = ref.encode_identity(img[:1])
    torch.testing.assert_close(id0, r0)
    torch.testing.assert_close(id1, r1)

    # 6 frames: chunks of 4 (bucket 4) and 2 (bucket 2); one identity broadcast over all
    got = runner.step(img, mel, id0, id1)
    want = ref.generate(r0, r1, ref.encode_audio(mel), ref.encode_pose(img))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sorted(fake.deserialized) == ["audio", "generator", "identity", "pose"]
    assert sorted(runner.stage("generator").bindings) == [2, 4]

    # 3 frames of 3 different sessions: padded into bucket 4, padding rows zeroed
    ids = torch.cat([id0, id0 * 0.5, id0 * 2])
    maps = torch.cat([id1, -id1, id1 * 0.3])
    mouth, pose = ref.encode_audio(mel[:3]), ref.encode_pose(img[:3])
    got = runner.generate(ids, maps, mouth, pose)
    want = ref.generate(ids, maps, mouth, pose)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    bd = runner.stage("generator").bindings[4]
    assert float(bd.inputs["style"][3:].abs().sum()) == 0.0
    assert len(runner.stage("generator").engine.contexts) == 2  # one context per bucket, made once
    torch.testing.assert_close(runner.encode_pose(img[:1]), ref.encode_pose(img[:1]))
    torch.testing.assert_close(runner.encode_audio(mel[:5]), ref.encode_audio(mel[:5]))


def test_runner_noise_modes(fake_gpu):
    model, _, d = fake_gpu
    c = model.cfg
    runner = TensorRTRunner(d, device="cpu", cuda_graphs=False)
    args = (
        torch.rand(1, c.id_dim),
        torch.rand(1, c.id_map_channels, 7, 7),
        torch.rand(1, c.mouth_dim),
        torch.rand(1, c.pose_dim),
    )
    with pytest.raises(EngineError, match="noise 'stored' built in; noise='random' needs an export with"):
        runner.generate(*args, noise=NoiseMode.RANDOM)
    assert runner.generate(*args, noise=NoiseMode.STORED).shape == (1, 3, c.size, c.size)


def test_runner_checks_sidecars_before_deserializing(fake_gpu):
    model, fake, d = fake_gpu
    side = json.loads((d / "pose.engine.json").read_text())
    (d / "pose.engine.json").write_text(json.dumps(dict(side, trt_version="10.1.0")))
    with pytest.raises(EngineError, match="pose.engine: built with tensorrt 10.1.0, this process has 10.99.0"):
        TensorRTRunner(d, device="cpu")
    (d / "pose.engine.json").write_text(json.dumps(dict(side, targets=["SM80"], device="A100")))
    with pytest.raises(EngineError, match=r"built for GPU architecture SM80 \(A100\), this GPU is SM90"):
        TensorRTRunner(d, device="cpu")
    (d / "pose.engine.json").write_text(json.dumps(side))
    with pytest.raises(EngineError, match="built for model config 'tiny', the runner expects 'small'"):
        TensorRTRunner(d, cfg=model_preset("small"), device="cpu")
    assert fake.deserialized == []


def test_runner_noise_input_engine(monkeypatch, tmp_path):
    model, _, d = _fake_gpu(monkeypatch, tmp_path, noise="input")
    c = model.cfg
    g = torch.Generator().manual_seed(2)
    args = (
        torch.rand(3, c.id_dim, generator=g),
        torch.randn(1, c.id_map_channels, 7, 7, generator=g),
        torch.rand(3, c.mouth_dim, generator=g),
        torch.rand(3, c.pose_dim, generator=g),
    )
    runner = TensorRTRunner(d, device="cpu", cuda_graphs=False)
    with pytest.raises(EngineError, match="noises.npz missing"):
        runner.generate(*args, noise=NoiseMode.STORED)
    gen = model.generator
    np.savez(d / "noises.npz", **{f"noise_{i}": getattr(gen.noises, f"noise_{i}").numpy() for i in range(c.num_noises)})
    ref = TorchRunner(model, form="static")
    outs = {}
    for noise in (NoiseMode.STORED, NoiseMode.ZERO):
        outs[noise] = runner.generate(*args, noise=noise)
        torch.testing.assert_close(outs[noise], ref.generate(*args, noise=noise), atol=1e-5, rtol=0)
    assert (outs[NoiseMode.STORED] - outs[NoiseMode.ZERO]).abs().max() > 1e-2  # the noise inputs are really used
    a, b = runner.generate(*args, noise=NoiseMode.RANDOM), runner.generate(*args, noise=NoiseMode.RANDOM)
    assert a.shape == (3, 3, c.size, c.size) and not torch.equal(a, b)
