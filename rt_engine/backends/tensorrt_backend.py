"""TensorRT runner: the four stages as serialized TensorRT engines on one CUDA stream (GPU only).

Engines come from ``python -m export trt`` (one ``<stage>.engine`` + ``<stage>.engine.json``
sidecar each). Data flow of one streaming step for a batch of B frames from many sessions::

    pose img [B,3,224,224] --pose.engine-->  pose [B,12]  ----------------------\\
    mel [B,1,80,20]       --audio.engine--> mouth [B,500] ---> style [B,S] ---> generator.engine --> [B,3,H,W]
    id0 [B,2048] (per session, cached) --------------------------/                ^
    id1 [B,512,7,7] (per session, cached) ----------------------------------------/

Everything between the stages stays in CUDA memory (torch tensors); the host sees only the inputs
and the final frames. Per stage and *batch bucket* (1, 2, 4, ... up to the profile's max) the
runner allocates its device buffers once, binds them with ``set_tensor_address`` and, after one
warm-up ``execute_async_v3``, captures the launch in a CUDA graph that later steps replay.

Before any engine is deserialized its sidecar is checked against the running TensorRT version,
the GPU's compute capability and the model config, so a stale or foreign engine raises
:class:`EngineError` naming the mismatch instead of failing inside TensorRT.

``tensorrt`` / ``tensorrt_rtx`` are imported lazily; importing this module needs neither (nor CUDA).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rt_engine.backends.base import Runner
from rt_engine.config import ModelConfig, NoiseMode, noise_mode
from rt_engine.errors import RtEngineError

log = logging.getLogger(__name__)

ENGINE_FORMAT = "rt_engine.trt/1"  # sidecar schema; bump with incompatible changes
STAGES = ("identity", "pose", "audio", "generator")
RUNTIMES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}  # sidecar runtime -> python module


class EngineError(RtEngineError):
    """An engine or its sidecar is missing, or was built for another GPU, TensorRT or model."""


# ----------------------------------------------------------------------------------------------
# sidecars


def sidecar_path(engine: str | Path) -> Path:
    p = Path(engine)
    return p.with_name(p.name + ".json")


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """Read and schema-check ``<engine>.json``."""
    side = sidecar_path(engine)
    if not side.is_file():
        raise EngineError(f"{side}: engine sidecar missing (engines must be built by `python -m export trt`)")
    try:
        s = json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{side}: unreadable sidecar ({e})") from None
    if s.get("format") != ENGINE_FORMAT:
        raise EngineError(
            f"{side}: sidecar format {s.get('format')!r}, this rt_engine reads {ENGINE_FORMAT!r}; rebuild the engines"
        )
    missing = [
        k
        for k in (
            "runtime",
            "trt_version",
            "stage",
            "precision",
            "targets",
            "profiles",
            "inputs",
            "outputs",
            "model_config",
            "source_onnx_sha256",
        )
        if k not in s
    ]
    if missing:
        raise EngineError(f"{side}: sidecar lacks {missing}")
    return s


def sm_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'SM90'."""
    return f"SM{capability[0]}{capability[1]}"


def check_sidecar(
    side: dict[str, Any],
    *,
    runtime: str,
    trt_version: str,
    capability: tuple[int, int] | None,
    cfg: ModelConfig | None = None,
    stage: str | None = None,
    where: str = "engine",
) -> None:
    """Raise :class:`EngineError` if an engine described by ``side`` cannot run here.

    ``runtime``/``trt_version``: the imported TensorRT flavour and version (TensorRT engines are
    only valid for the exact version that built them). ``capability``: the GPU's compute capability;
    a ``tensorrt`` engine must have been built on the same SM, a ``tensorrt_rtx`` engine must list
    it among its targets. ``cfg``/``stage``: what the runner expects."""
    if side["runtime"] != runtime:
        raise EngineError(f"{where}: built with {side['runtime']}, but this process uses {runtime}")
    if side["trt_version"] != trt_version:
        raise EngineError(
            f"{where}: built with {side['runtime']} {side['trt_version']}, this process has "
            f"{trt_version}; engines are tied to the TensorRT version that built them, rebuild "
            "with `python -m export trt`"
        )
    if capability is not None:
        sm = sm_name(capability)
        targets = side["targets"]
        if sm not in targets:
            raise EngineError(
                f"{where}: built for GPU architecture {'/'.join(targets)} "
                f"({side.get('device') or 'no device'}), this GPU is {sm}; rebuild on this GPU"
            )
    if stage is not None and side["stage"] != stage:
        raise EngineError(f"{where}: is the '{side['stage']}' engine, expected '{stage}'")
    if cfg is not None and ModelConfig.from_dict(side["model_config"]) != cfg:
        raise EngineError(
            f"{where}: built for model config '{side['model_config'].get('name')}', the runner expects '{cfg.name}'"
        )


def import_trt(runtime: str = "tensorrt"):
    """Import ``tensorrt`` or ``tensorrt_rtx`` with an actionable error."""
    import importlib

    if runtime not in RUNTIMES:
        raise EngineError(f"unknown TensorRT runtime {runtime!r}; choose from {sorted(RUNTIMES)}")
    try:
        return importlib.import_module(RUNTIMES[runtime])
    except ImportError as e:
        pkg = "tensorrt-cu13" if runtime == "tensorrt" else "tensorrt-rtx-cu13"
        raise EngineError(f"python module {runtime!r} not importable ({e}); install `{pkg}`") from None


# ----------------------------------------------------------------------------------------------
# one engine with per-bucket bindings and CUDA graphs


def buckets_for(max_batch: int) -> list[int]:
    """Batch buckets: powers of two below ``max_batch``, then ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class _Binding:
    """Device buffers and (optionally) a captured CUDA graph for one bucket of one engine."""

    batch: int
    context: Any  # IExecutionContext
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    warm: bool = False


_TORCH_DTYPE = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}


@dataclass
class TrtStage:
    """One deserialized engine. Buffers, contexts and graphs are made per bucket on first use."""

    name: str
    path: Path
    side: dict[str, Any]
    engine: Any
    stream: torch.cuda.Stream
    device: torch.device
    use_graphs: bool = True
    trt: Any = None
    bindings: dict[int, _Binding] = field(default_factory=dict)
    scratch: Tensor | None = None  # activation memory shared by this engine's contexts (one stream)

    @property
    def max_batch(self) -> int:
        return int(self.side["profiles"][0]["max_batch"])

    def bucket(self, b: int) -> int:
        for k in buckets_for(self.max_batch):
            if k >= b:
                return k
        raise EngineError(f"{self.name}: batch {b} exceeds the engine's profile max {self.max_batch}")

    def _binding(self, bucket: int) -> _Binding:
        bd = self.bindings.get(bucket)
        if bd is not None:
            return bd
        ctx = self._create_context()
        if ctx is None:
            raise EngineError(f"{self.path}: cannot create an execution context (out of GPU memory?)")
        ins, outs = {}, {}
        for spec in self.side["inputs"]:
            shape = [bucket if d == "batch" else int(d) for d in spec["shape"]]
            t = torch.zeros(shape, dtype=_TORCH_DTYPE[spec["dtype"]], device=self.device)
            if not ctx.set_input_shape(spec["name"], tuple(shape)):
                raise EngineError(f"{self.path}: input '{spec['name']}' rejects shape {shape}")
            ctx.set_tensor_address(spec["name"], t.data_ptr())
            ins[spec["name"]] = t
        for spec in self.side["outputs"]:
            shape = [bucket if d == "batch" else int(d) for d in spec["shape"]]
            t = torch.empty(shape, dtype=_TORCH_DTYPE[spec["dtype"]], device=self.device)
            ctx.set_tensor_address(spec["name"], t.data_ptr())
            outs[spec["name"]] = t
        bd = self.bindings[bucket] = _Binding(bucket, ctx, ins, outs)
        return bd

    def _create_context(self) -> Any:
        """One context per bucket. Their activation memory is one user-managed buffer per engine
        (the contexts run one after another on one stream), sized for the profile's max batch.
        Versions with ``ICudaEngine.create_runtime_config`` (later 10.x, 11.x, TensorRT-RTX) take the
        allocation strategy through an ``IRuntimeConfig``, earlier 10.x in ``create_execution_context``."""
        strategy = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
        size = getattr(self.engine, "device_memory_size_v2", None)
        if strategy is None or size is None:
            return self.engine.create_execution_context()
        if self.scratch is None:
            self.scratch = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)  # 512-B aligned
        if hasattr(self.engine, "create_runtime_config"):
            rc = self.engine.create_runtime_config()
            rc.set_execution_context_allocation_strategy(strategy.USER_MANAGED)
            ctx = self.engine.create_execution_context(rc)
        else:
            ctx = self.engine.create_execution_context(strategy.USER_MANAGED)
        if ctx is not None:
            ctx.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        return ctx

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on device tensors ``feeds`` (same batch B, any dtype; on ``self.device``).

        Returns views ``[:B]`` of the bucket's output buffers: valid until the next run of this
        bucket, so consumers on the same stream must use (or copy) them before that."""
        b = next(iter(feeds.values())).shape[0]
        bd = self._binding(self.bucket(b))
        with torch.cuda.stream(self.stream):
            for name, buf in bd.inputs.items():
                if name not in feeds:
                    raise EngineError(f"{self.name}: missing input '{name}'")
                buf[:b].copy_(feeds[name], non_blocking=True)
                if b < bd.batch:
                    buf[b:].zero_()
            if bd.graph is not None:
                bd.graph.replay()
            else:
                self._launch(bd)
                if self.use_graphs and bd.warm:
                    self._capture(bd)
                bd.warm = True
        return {k: v[:b] for k, v in bd.outputs.items()}

    def _launch(self, bd: _Binding) -> None:
        if not bd.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError(f"{self.name}: execute_async_v3 failed (see the TensorRT log)")

    def _capture(self, bd: _Binding) -> None:
        """Capture the (already warmed-up) launch of this bucket in a CUDA graph."""
        capturable = getattr(bd.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.stream.cuda_stream):
            log.info(
                "%s bucket %d: TensorRT says the stream is not capturable; launching directly", self.name, bd.batch
            )
            self.use_graphs = False
            return
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
                self._launch(bd)
        except RuntimeError as e:  # some engines (e.g. with data-dependent shapes) cannot be captured
            log.warning("%s bucket %d: CUDA graph capture failed (%s); launching directly", self.name, bd.batch, e)
            return
        bd.graph = g
        log.debug("%s: captured CUDA graph for batch bucket %d", self.name, bd.batch)


# ----------------------------------------------------------------------------------------------
# the runner


class TensorRTRunner(Runner):
    """Runner over ``<engine_dir>/{identity,pose,audio,generator}.engine``.

    ``runtime``: ``tensorrt`` (datacenter GPUs such as H100) or ``tensorrt_rtx``. ``cfg``: the model
    config the engines must have been built for (default: whatever the sidecars say, all equal).
    ``cuda_graphs``: capture one CUDA graph per stage and batch bucket.
    """

    name = "tensorrt"

    def __init__(
        self,
        engine_dir: str | Path,
        cfg: ModelConfig | None = None,
        device: str = "cuda:0",
        runtime: str = "tensorrt",
        cuda_graphs: bool = True,
        stages: Sequence[str] = STAGES,
    ):
        self.dir = Path(engine_dir)
        if not self.dir.is_dir():
            raise EngineError(f"engine directory not found: {self.dir}")
        if not stages or any(s not in STAGES for s in stages):
            raise EngineError(f"stages must be a non-empty subset of {STAGES}, got {list(stages)}")
        self.sides: dict[str, dict[str, Any]] = {}
        for stage in stages:
            p = self.dir / f"{stage}.engine"
            if not p.is_file():
                raise EngineError(f"{self.dir}: missing {p.name} (build with `python -m export trt`)")
            self.sides[stage] = read_sidecar(p)
        cfgs = {json.dumps(s["model_config"], sort_keys=True) for s in self.sides.values()}
        if len(cfgs) > 1:
            raise EngineError(f"{self.dir}: engines were built for different model configs")
        self.cfg = cfg or ModelConfig.from_dict(next(iter(self.sides.values()))["model_config"])
        self.runtime = runtime
        main = self.sides.get("generator") or next(iter(self.sides.values()))
        self.precision = main["precision"]
        self.noise_mode = main.get("noise", NoiseMode.STORED.value)
        self.cuda_graphs = cuda_graphs
        if not torch.cuda.is_available():
            raise EngineError(
                "the TensorRT runner needs an NVIDIA GPU with a working driver; none is visible "
                "(use the torch or onnx backend on this machine)"
            )
        self.device = torch.device(device)
        self.trt = import_trt(runtime)
        cap = torch.cuda.get_device_capability(self.device)
        for stage, s in self.sides.items():  # every check before TensorRT reads a byte of an engine
            check_sidecar(
                s,
                runtime=runtime,
                trt_version=self.trt.__version__,
                capability=cap,
                cfg=self.cfg,
                stage=stage,
                where=str(self.dir / f"{stage}.engine"),
            )
        self.stream = torch.cuda.Stream(device=self.device)
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._rt = None
        self._stages: dict[str, TrtStage] = {}
        self._noises: dict[str, Tensor] | None = None
        self.name = f"tensorrt-{self.precision}"

    # -- engines, loaded on first use
    def stage(self, name: str) -> TrtStage:
        st = self._stages.get(name)
        if st is None:
            if name not in self.sides:
                raise EngineError(f"{self.dir}: the runner was opened without the '{name}' engine")
            path = self.dir / f"{name}.engine"
            if self._rt is None:
                self._rt = self.trt.Runtime(self._logger)
            engine = self._rt.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(f"{path}: TensorRT could not deserialize the engine (see its log above)")
            st = self._stages[name] = TrtStage(
                name, path, self.sides[name], engine, self.stream, self.device, self.cuda_graphs, self.trt
            )
            log.info("loaded %s (%s, max batch %d)", path.name, self.sides[name]["precision"], st.max_batch)
        return st

    @property
    def max_batch(self) -> int:
        return min(int(s["profiles"][0]["max_batch"]) for s in self.sides.values())

    # -- device-side API (no host round trips)
    def _dev(self, x: Tensor) -> Tensor:
        return x.to(self.device, torch.float32, non_blocking=True)

    def _chunks(self, b: int) -> list[slice]:
        m = self.max_batch
        return [slice(i, min(i + m, b)) for i in range(0, b, m)]

    def pose_device(self, img: Tensor) -> Tensor:
        """[B,3,224,224] (device) -> [B,12] (device)."""
        return torch.cat([self.stage("pose").run({"img": img[s]})["pose"].clone() for s in self._chunks(len(img))])

    def audio_device(self, mel: Tensor) -> Tensor:
        """[B,1,80,20] (device) -> [B,500] (device)."""
        return torch.cat([self.stage("audio").run({"mel": mel[s]})["mouth"].clone() for s in self._chunks(len(mel))])

    def generate_device(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> Tensor:
        """Device tensors: id0 [B|1,2048], id1 [B|1,C,7,7], mouth [B,500], pose [B,12] -> [B,3,H,W] (device)."""
        style = self.style(id0, mouth, pose)  # [B,S]
        b = style.shape[0]
        id1 = id1.expand(b, -1, -1, -1)
        frames = []
        for s in self._chunks(b):
            feeds = {"style": style[s], "id_map": id1[s]}
            feeds.update(self._noise_feeds(s.stop - s.start, noise))
            frames.append(self.stage("generator").run(feeds)["image"].clone())
        return torch.cat(frames)

    def _noise_feeds(self, b: int, noise: str) -> dict[str, Tensor]:
        """Noise inputs of a generator engine exported with ``--noise input`` (none otherwise)."""
        if self.noise_mode != "input":
            if noise != self.noise_mode:
                raise EngineError(
                    f"generator engine has noise '{self.noise_mode}' built in; noise='{noise}' needs "
                    "an export with `--noise input`"
                )
            return {}
        noise = noise_mode(noise, error=EngineError)
        feeds = {}
        for spec in self.sides["generator"]["inputs"]:
            name = spec["name"]
            if not name.startswith("noise_"):
                continue
            shape = [b] + [int(d) for d in spec["shape"][1:]]  # [B,1,r,r]
            if noise == NoiseMode.RANDOM:
                feeds[name] = torch.randn(shape, device=self.device)
            elif noise == NoiseMode.ZERO:
                feeds[name] = torch.zeros(shape, device=self.device)
            else:
                feeds[name] = self._stored_noise()[name].expand(shape)
        return feeds

    def _stored_noise(self) -> dict[str, Tensor]:
        """The checkpoint's noise maps (``noises.npz`` beside the engines), on the device, loaded once."""
        if self._noises is None:
            p = self.dir / "noises.npz"
            if not p.is_file():
                raise EngineError(
                    f"{p} missing: noise='stored' with a noise-input generator engine needs the "
                    "noise maps written by `python -m export onnx --noise input`"
                )
            import numpy as np

            with np.load(p) as z:
                self._noises = {k: torch.from_numpy(z[k]).to(self.device) for k in z.files}
        return self._noises

    def step(self, pose_img: Tensor, mel: Tensor, id0: Tensor, id1: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        """One streaming step for B frames of (possibly) B different sessions, host in -> host out:
        pose + audio + generator on the device, one upload of the inputs and one download of the frames."""
        with torch.cuda.stream(self.stream):
            pose = self.pose_device(self._dev(pose_img))
            mouth = self.audio_device(self._dev(mel))
            out = self.generate_device(self._dev(id0), self._dev(id1), mouth, pose, noise)
            host = out.float().to("cpu", non_blocking=False)
        return host

    # -- Runner interface (float32 CPU tensors in and out)
    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        with torch.cuda.stream(self.stream):
            x = self._dev(img)
            id0, id1 = [], []
            for s in self._chunks(len(x)):
                o = self.stage("identity").run({"img": x[s]})
                id0.append(o["id_feature0"].float().cpu())
                id1.append(o["id_feature1"].float().cpu())
        return torch.cat(id0), torch.cat(id1)

    def encode_pose(self, img: Tensor) -> Tensor:
        with torch.cuda.stream(self.stream):
            return self.pose_device(self._dev(img)).float().cpu()

    def encode_audio(self, mel: Tensor) -> Tensor:
        with torch.cuda.stream(self.stream):
            return self.audio_device(self._dev(mel)).float().cpu()

    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        with torch.cuda.stream(self.stream):
            out = self.generate_device(self._dev(id0), self._dev(id1), self._dev(mouth), self._dev(pose), noise)
            return out.float().cpu()
