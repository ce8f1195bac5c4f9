"""ONNX Runtime and OpenVINO runners over the stage graphs of ``rt_engine/onnx_graphs.py``.

    PCAVS (torch) --onnx_graphs.export_onnx(noise="input")--> <cache>/<weights sha>/{identity,pose,audio,generator}.onnx
                  --> onnxruntime.InferenceSession  (OnnxRuntimeRunner, fp32)
                  --> openvino.Core.compile_model   (OpenVINORunner, fp32 or bf16 inference precision)

The graphs are exported once per set of weights and cached (``RT_ENGINE_ONNX_CACHE`` or
``~/.cache/rt_engine/onnx``); an export whose manifest does not match the weights is redone.
The generator graph is exported with noise maps as inputs, so one graph serves every noise mode
(stored buffers, zero, fresh random noise). Inputs and outputs are float32 CPU tensors whatever the
runtime computes in. OpenVINO compiles one static model per stage and batch size, lazily, up to
``static_batches`` (default 8, the scheduler's largest batch), and one model with a dynamic batch
dimension beyond that. Static shapes matter: at the official size the dynamic model ran 12% slower
per frame at batch 2 and 4 than at batch 1 on an avx512_bf16 machine without AMX (static: 1-2%
faster), and on an AMX machine it made 11.5-12.9 frames/s against 18-20 for static models. A new
size costs a 0.3-0.5 s compile, so the server's warm-up runs every batch size once before the first
session.

Work avoidance here is coarser than in ``torch-fast``: the generator graph takes the whole style
vector, so the identity part of the modulation is recomputed per frame (a [B,2560]x[2560,N] matmul).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rt_engine.backends.base import Runner
from rt_engine.config import NoiseMode
from rt_engine.models.generator import noise_maps
from rt_engine.models.pcavs import PCAVS
from rt_engine.onnx_graphs import export_onnx, read_manifest, weights_sha256

log = logging.getLogger(__name__)

STAGE_NAMES = ("identity", "pose", "audio", "generator")


def onnx_cache_dir() -> Path:
    env = os.environ.get("RT_ENGINE_ONNX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rt_engine" / "onnx"


def ensure_graphs(model: PCAVS, out_dir: str | Path | None = None) -> Path:
    """Stage graphs of ``model`` (noise as inputs), built on first use and cached; returns their folder."""
    # the graphs depend on the weights and on config switches that hold no weights (pose_mouth_mask)
    key = hashlib.sha256((weights_sha256(model) + model.cfg.to_json()).encode()).hexdigest()[:16]
    d = Path(out_dir) if out_dir else onnx_cache_dir() / key
    try:
        man = read_manifest(d, model.cfg)
        if (
            man.get("noise") == "input"
            and man.get("weights_sha256") == weights_sha256(model)
            and all(s in man.get("graphs", {}) for s in STAGE_NAMES)
        ):
            return d
    except Exception as e:  # ExportError / missing: (re-)export below
        log.debug("no usable export in %s (%s)", d, e)
    log.info("exporting ONNX graphs of model '%s' to %s", model.cfg.name, d)
    export_onnx(model, d, batch=1, noise="input", verify=False)
    return d


def openvino_config(precision: str, threads: int, streams: int = 1) -> dict[str, str]:
    """The CPU plugin's compile options (``precision``: bf16 or fp32, as a runner's): what every
    OpenVINO model here, and the benchmarks' own, compiles with. One latency-bound inference stream
    over ``threads``, or ``streams`` streams sharing them (a runner's lanes), unpinned: the server's
    media threads share the cores, and a pinned stream could not move away from them."""
    cfg = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(threads),
        "NUM_STREAMS": "1",
    }
    if streams > 1:
        cfg.update(
            PERFORMANCE_HINT="THROUGHPUT",
            INFERENCE_NUM_THREADS=str(max(threads, streams)),
            NUM_STREAMS=str(streams),
            ENABLE_CPU_PINNING="NO",
        )
    return cfg


class _OnnxRunnerBase(Runner):
    """Shared logic: graph paths, noise feeds, identity/pose/audio/generator calls."""

    def __init__(self, model: PCAVS, onnx_dir: str | Path | None = None, threads: int | None = None):
        self.cfg = model.cfg
        self.dir = ensure_graphs(model, onnx_dir)
        self.threads = threads or torch.get_num_threads()
        gen = model.generator
        self._stored = [n.detach().float() for n in gen.stored_noise()]  # [1,1,r,r] each
        self._sessions: dict[Any, Any] = {}

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def _noise_feeds(self, b: int, noise: str) -> dict[str, np.ndarray]:
        return {f"noise_{i}": self._np(n) for i, n in enumerate(noise_maps(noise, self._stored, b))}

    @staticmethod
    def _np(x: Tensor) -> np.ndarray:
        return np.ascontiguousarray(x.detach().float().cpu().numpy())

    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        id0, id1 = self._run("identity", {"img": self._np(img)})
        return torch.from_numpy(id0), torch.from_numpy(id1)

    def encode_pose(self, img: Tensor) -> Tensor:
        return torch.from_numpy(self._run("pose", {"img": self._np(img)})[0])

    def encode_audio(self, mel: Tensor) -> Tensor:
        return torch.from_numpy(self._run("audio", {"mel": self._np(mel)})[0])

    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        style = self.style(id0, mouth, pose)  # [B,S]
        b = style.shape[0]
        feeds = {"style": self._np(style), "id_map": self._np(id1.expand(b, -1, -1, -1)), **self._noise_feeds(b, noise)}
        return torch.from_numpy(self._run("generator", feeds)[0])


class OnnxRuntimeRunner(_OnnxRunnerBase):
    """ONNX Runtime, CPU execution provider, fp32, all graph optimisations."""

    def __init__(
        self, model: PCAVS, precision: str = "fp32", onnx_dir: str | Path | None = None, threads: int | None = None
    ):
        if precision not in ("fp32", "auto"):
            raise ValueError(f"onnxruntime runs fp32 on the CPU; precision {precision!r} is not available")
        super().__init__(model, onnx_dir, threads)
        self.precision = "fp32"
        self.name = "onnxruntime"

    def _session(self, stage: str):
        if stage not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[stage] = ort.InferenceSession(
                str(self.dir / f"{stage}.onnx"), so, providers=["CPUExecutionProvider"]
            )
        return self._sessions[stage]

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session(stage).run(None, feeds)


class OpenVINORunner(_OnnxRunnerBase):
    """OpenVINO CPU plugin; ``precision`` bf16 sets ``INFERENCE_PRECISION_HINT`` (native on AMX /
    AVX512-BF16 CPUs), fp32 forces f32, auto lets the plugin use bf16 only where it is native.
    ``encoder_precision`` (default: the same) sets it for the identity, pose and audio encoders alone:
    their codes carry bf16's rounding into every frame. On the real demo inputs at the official size,
    bf16 codes put the frames 37-40 dB from the fp32 reference; fp32 codes into the bf16 generator,
    51-55 dB (the pose encoder then costs about twice its bf16 time; identity runs once per session)."""

    def __init__(
        self,
        model: PCAVS,
        precision: str = "auto",
        onnx_dir: str | Path | None = None,
        threads: int | None = None,
        static_batches: int = 8,
        encoder_precision: str | None = None,
    ):
        from rt_engine.backends.torch_backend import resolve_precision

        super().__init__(model, onnx_dir, threads)
        if static_batches < 1:
            raise ValueError(f"static_batches must be >= 1, got {static_batches}")
        self.static_batches = static_batches  # batch sizes up to this get a static-shape model each
        self.precision = resolve_precision(precision)
        self.encoder_precision = resolve_precision(encoder_precision) if encoder_precision else self.precision
        import openvino as ov

        self._core = ov.Core()
        self._models: dict[str, Any] = {}
        self.lanes = 1  # inference streams: threads that may call at once (set_lanes)
        self._lane = threading.local()  # .k: the calling thread's lane (use_lane; 0 by default)
        self._compile_lock = threading.Lock()
        self.effective_precision = "?"  # what the CPU plugin really runs (f32 where bf16 is not native)
        self.name = "openvino"

    def describe(self) -> str:
        enc = "" if self.encoder_precision == self.precision else f", encoders {self.encoder_precision}"
        return f"{self.name} ({self.precision}{enc}, plugin runs {self.effective_precision}, model '{self.cfg.name}')"

    def generate_uint8(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> np.ndarray:
        """The generator graph with the [-1,1] -> uint8 NHWC conversion compiled into it (an OpenVINO
        post-processing step: scale, clamp, truncate, convert, transpose) -> [B,H,W,3] uint8."""
        style = self.style(id0, mouth, pose)  # [B,S]
        b = style.shape[0]
        feeds = {"style": self._np(style), "id_map": self._np(id1.expand(b, -1, -1, -1)), **self._noise_feeds(b, noise)}
        req = self._compiled("generator", feeds, uint8=True)
        res = req.infer(feeds)
        return np.array(res[req.model_outputs[0]], dtype=np.uint8, copy=True)

    def set_lanes(self, n: int) -> int:
        """``n`` inference streams of ``threads / n`` threads each (at least one), and one inference
        request per stream and compiled shape; drops everything compiled before."""
        n = max(1, min(int(n), self.threads))
        with self._compile_lock:
            if n != self.lanes:
                self._sessions.clear()
                self.lanes = n
        return self.lanes

    def use_lane(self, lane: int) -> None:
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} out of range: the runner has {self.lanes} lane(s)")
        self._lane.k = lane

    def _precision_of(self, stage: str) -> str:
        return self.precision if stage == "generator" else self.encoder_precision

    def keep_batches(self, largest: int) -> None:
        """Drop the static models compiled for batch sizes above ``largest`` (at the official size each
        holds about 200-380 MB of buffers)."""
        with self._compile_lock:
            for key in [k for k in self._sessions if isinstance(k[1], int) and k[1] > largest]:
                del self._sessions[key]

    @staticmethod
    def _uint8_output(m):
        """Append [N,3,H,W] f32 in [-1,1] -> [N,H,W,3] u8 (truncating, as ``to_uint8``) to model ``m``."""
        import openvino as ov
        from openvino import opset13 as ops
        from openvino.preprocess import PrePostProcessor

        def convert(out):
            x = ops.multiply(ops.add(out, ops.constant(np.float32(1))), ops.constant(np.float32(127.5)))
            x = ops.floor(ops.clamp(x, 0.0, 255.0))  # >= 0, so floor truncates
            return ops.transpose(ops.convert(x, ov.Type.u8), ops.constant(np.array([0, 2, 3, 1], np.int64))).output(0)

        ppp = PrePostProcessor(m)
        ppp.output(0).postprocess().custom(convert)
        return ppp.build()

    def _compiled(self, stage: str, feeds: dict[str, np.ndarray], uint8: bool = False):
        b = next(iter(feeds.values())).shape[0]
        static = b <= self.static_batches
        key = (stage, b if static else "dynamic") + (("uint8",) if uint8 else ())
        requests = self._sessions.get(key)
        if requests is None:
            with self._compile_lock:
                requests = self._sessions.get(key) or self._compile(key, stage, feeds, static, uint8)
        return requests[getattr(self._lane, "k", 0)]

    def _compile(self, key: tuple, stage: str, feeds: dict[str, np.ndarray], static: bool, uint8: bool) -> list:
        """Compile ``stage`` for the shapes of ``feeds`` -> one inference request per lane (stream)."""
        import openvino as ov

        if stage not in self._models:
            self._models[stage] = self._core.read_model(str(self.dir / f"{stage}.onnx"))
        m = self._models[stage].clone()
        if static:  # id0/id1 of one session arrive as [1,...] and are expanded to b by the caller
            m.reshape({name: list(arr.shape) for name, arr in feeds.items()})
        else:  # every input's leading dimension is the batch (or 1, broadcast: id0/id1 of one session)
            m.reshape({name: ov.PartialShape([ov.Dimension(-1), *arr.shape[1:]]) for name, arr in feeds.items()})
        if uint8:
            m = self._uint8_output(m)
        cfg = openvino_config(self._precision_of(stage), self.threads, self.lanes)
        compiled = self._core.compile_model(m, "CPU", cfg)
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type
        if stage == "generator":  # what the plugin runs where the time goes
            self.effective_precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        # one request per lane (a request serves one call at a time); the plugin runs each on a free stream
        self._sessions[key] = [compiled.create_infer_request() for _ in range(self.lanes)]
        log.debug("openvino: compiled %s, batch %s (%s; runs %s)", stage, key[1], cfg, self.effective_precision)
        return self._sessions[key]

    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        req = self._compiled(stage, feeds)
        res = req.infer(feeds)
        return [np.array(res[out], dtype=np.float32, copy=True) for out in req.model_outputs]
