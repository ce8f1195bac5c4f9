"""``torch-cuda``: the PyTorch-on-CUDA runner with the fused modulated-conv kernel (rt_engine/kernels/modconv.cu).

Data flow of one streaming step for B frames of (possibly) B sessions, everything on one CUDA stream::

    pose img [B,3,224,224] --pose encoder (autocast)---> pose [B,12] ----\\
    mel [B,1,80,20] --audio encoder + mouth (autocast)--> mouth [B,500] --> var [B,512]
    id0 [B,2048] (fp32, once per session) --> modulation base [B,N] ------------v
    id1 [B,C,7,7] ----------------------------------------------> KernelGenerator --> [B,3,H,W] --> pinned host

:class:`KernelGenerator` is :class:`~rt_engine.models.fast_generator.FastGenerator` (static weights, stacked
modulation, fp32 demodulation and RGB skip chain) with one change of op per layer:

=====================  ============================================================================
layer                  op
=====================  ============================================================================
3x3 StyledConv         ``fused_modconv.modulated_conv2d(impl)``: one conv launch per layer for the
(conv1, each level's   whole batch (style scaling on load, fp32 accumulation, fp32 demodulation
second conv)           factors from a small launch before it, noise, bias, leaky ReLU and its
                       sqrt(2) gain in the epilogue)
upsampling StyledConv  library ops (cuDNN): transposed 3x3 conv stride 2, [1,3,3,1] blur, then
                       ``*d``, noise, bias, leaky ReLU; the sqrt(2) gain is folded into d, the
                       noise and the bias (leaky ReLU is positively homogeneous)
ToRGB (1x1, 3 ch.)     library conv, fp32 sum of the upsampled skip
=====================  ============================================================================

Activations carry the sqrt(2) gain as in the official generator (the fused epilogue applies it),
so, unlike FastGenerator, no layer folds it into its input scale.

Storage is fp16 (default) or bf16 with fp32 accumulation inside the kernel and fp32 demodulation;
``fp32`` runs everything in fp32. :class:`BucketGraphs` runs each per-frame stage (pose, audio,
generator) on buffers allocated once per batch bucket (1, 2, 4, ... ``max_batch``) and, on CUDA,
captures each bucket in one CUDA graph after a warm-up call, then replays it. Frames go out through
one pinned host buffer allocated at start-up.

On a machine without CUDA :func:`require_cuda` refuses the backend with one line naming what is
missing. The same classes run on the CPU with ``device="cpu"`` and ``impl="cpu"`` (the C++ twin of
the kernel) or ``impl="ref"`` (PyTorch), without graphs: that is how tests/test_cuda_backend.py
checks the structure (which op runs per layer, buckets, buffers) against the reference generator.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rt_engine.backends.base import Runner
from rt_engine.backends.tensorrt_backend import buckets_for
from rt_engine.config import NOISE_MODES, NoiseMode, noise_mode
from rt_engine.errors import ConfigError
from rt_engine.models import fused_modconv as fm
from rt_engine.models.fast_generator import FastGenerator
from rt_engine.models.generator import Generator
from rt_engine.models.modconv import DEMOD_EPS, LRELU_GAIN
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_PRECISION = "fp16"  # 10 mantissa bits against bf16's 7; gpu_check measures both against fp32
DEFAULT_MAX_BATCH = 64


# ----------------------------------------------------------------------------------------------- checks
def cuda_missing() -> str | None:
    """Why CUDA cannot be used here (one line), or None when a CUDA device is visible."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU (driver or device missing)"
    return None


def require_cuda() -> None:
    """Raise ConfigError naming the missing CUDA (torch build, GPU, or CUDA kernels in rt_engine._kernels)."""
    why = cuda_missing()
    if why is not None:
        raise ConfigError(
            f"the torch-cuda backend needs CUDA: {why}; on this machine use --backend auto, torch-fast or openvino"
        )
    try:
        fm._cuda_module()
    except RuntimeError as e:
        raise ConfigError(f"the torch-cuda backend needs the CUDA kernels: {str(e).splitlines()[0]}") from None


def resolve_precision(precision: str | None) -> str:
    """None / 'auto' -> fp16; else one of :data:`PRECISIONS`."""
    if precision in (None, "auto"):
        return DEFAULT_PRECISION
    if precision not in PRECISIONS:
        raise ConfigError(f"torch-cuda precision must be one of {sorted(PRECISIONS)} or auto, got {precision!r}")
    return precision


# ----------------------------------------------------------------------------------------------- generator
class KernelGenerator(FastGenerator):
    """FastGenerator with every modulated 3x3 (non-upsampling) conv through the fused op.

    ``forward(base [1|B,N], var [B,512], id_map [1|B,C,7,7], noise) -> [B,3,size,size]`` fp32.
    ``impl``: ``"cuda"`` (the kernel; CUDA tensors), ``"cpu"`` (its C++ twin) or ``"ref"`` (PyTorch).
    """

    def __init__(self, gen: Generator, dtype: torch.dtype = torch.float16, impl: str = "cuda"):
        if impl not in ("cuda", "cpu", "ref"):
            raise ValueError(f"impl must be 'cuda', 'cpu' or 'ref', got {impl!r}")
        super().__init__(gen, dtype, channels_last=False, upsample="transpose")
        self.impl = impl
        mods, acts = self.layers(gen)
        # fused: demodulated 3x3 convs without upsampling; the rest stay on the library path
        self.fused = [m.demodulate and m.k == 3 and not m.upsample for m in mods]
        with torch.no_grad():
            self.in_gain.fill_(1.0)  # activations keep their sqrt(2) gain (the fused epilogue applies it)
            k = 0
            for i, act in enumerate(acts):
                if act is None:
                    continue
                bias = act.activate.bias.reshape(-1).float()  # [Cout]
                noise = getattr(gen.noises, f"noise_{k}") * float(act.noise.weight)  # [1,1,R,R]
                if self.fused[i]:
                    self.register_buffer(f"bias_{i}", bias.contiguous())  # fp32, as the kernel reads it
                    self.register_buffer(f"noise_{k}", noise.to(dtype).contiguous())
                else:  # library path: fold the gain into d (styles), the noise and the bias
                    self.register_buffer(f"bias_{i}", (bias * LRELU_GAIN).reshape(1, -1, 1, 1).to(dtype))
                    self.register_buffer(f"noise_{k}", (noise * LRELU_GAIN).to(dtype).contiguous())
                    self.noise_w[k] *= LRELU_GAIN
                k += 1
                if self.fused[i]:
                    delattr(self, f"w2_{i}")  # the kernel demodulates from the weight itself
        self.requires_grad_(False)

    def ops(self) -> list[str]:
        """Which op runs each modulated conv, in execution order (for tests and reports)."""
        out = []
        for i in range(self.n_layers):
            if self.fused[i]:
                out.append(f"fused_modconv[{self.impl}]")
            elif self.up[i]:
                out.append("conv_transpose2d+blur")
            else:
                out.append("conv2d_1x1")
        return out

    def styles(self, base: Tensor, var: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per-layer scales and demodulation factors: fused layers get s [B,Cin] fp32 (the kernel
        demodulates), library layers s [B,Cin,1,1] in the storage dtype and d * sqrt(2) [B,Cout,1,1]."""
        s_all = base + var.float() @ self.mod_w_var  # [B,N] fp32
        scales: list[Tensor] = []
        demods: list[Tensor | None] = []
        for i, s in enumerate(torch.split(s_all, self.splits, dim=1)):
            if self.fused[i]:
                scales.append(s)
                demods.append(None)
                continue
            scales.append(s.to(self.dtype)[:, :, None, None])
            if self.demod[i]:
                d = torch.rsqrt(s.square() @ getattr(self, f"w2_{i}") + DEMOD_EPS) * LRELU_GAIN  # [B,Cout] fp32
                demods.append(d[:, :, None, None].to(self.dtype))
            else:
                demods.append(None)
        return scales, demods

    def _styled(self, i: int, x: Tensor, s: Tensor, d: Tensor | None, noise: Tensor | None) -> Tensor:
        if not self.fused[i]:
            return super()._styled(i, x, s, d, noise)  # cuDNN; gain folded into d, noise and bias
        # x [B,Cin,H,W] -> [B,Cout,H,W]; noise is pre-scaled by its weight
        return fm.modulated_conv2d(
            x, s, getattr(self, f"w_{i}"), noise, 1.0, getattr(self, f"bias_{i}"), impl=self.impl
        )


# ----------------------------------------------------------------------------------------------- graphs
@dataclass
class _Slot:
    """Fixed input buffers, the output and (on CUDA) the captured graph of one batch bucket."""

    inputs: list[Tensor]
    output: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    calls: int = 0


@dataclass
class BucketGraphs:
    """``fn(*inputs) -> Tensor`` run on buffers allocated once per batch bucket.

    A call with batch B copies its inputs into the first B rows of the smallest bucket >= B (rows
    past B keep earlier values: every stage computes each sample on its own, so they never reach the
    first B rows), runs ``fn`` on the whole bucket and returns the first B rows of the bucket's
    output, valid until the next call of that bucket. With ``use_graphs`` (CUDA only), the bucket's
    ``warmup``-th call is followed by the capture of ``fn`` in a CUDA graph on ``stream``; later
    calls replay it.
    """

    fn: Callable[..., Tensor]
    max_batch: int
    use_graphs: bool = False
    stream: torch.cuda.Stream | None = None
    warmup: int = 2
    name: str = "stage"
    slots: dict[int, _Slot] = field(default_factory=dict)

    def bucket(self, b: int) -> int:
        for k in buckets_for(self.max_batch):
            if k >= b:
                return k
        raise ValueError(f"{self.name}: batch {b} exceeds max_batch {self.max_batch}")

    def __call__(self, *inputs: Tensor) -> Tensor:
        b = inputs[0].shape[0]
        if any(t.shape[0] != b for t in inputs):
            raise ValueError(f"{self.name}: inputs disagree on the batch size: {[tuple(t.shape) for t in inputs]}")
        k = self.bucket(b)
        slot = self.slots.get(k)
        if slot is None:
            bufs = [torch.zeros((k, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in inputs]
            slot = self.slots[k] = _Slot(bufs)
        for buf, t in zip(slot.inputs, inputs, strict=True):
            if buf.shape[1:] != t.shape[1:] or buf.dtype != t.dtype:
                raise ValueError(
                    f"{self.name}: input {tuple(t.shape)} {t.dtype} does not fit the bucket buffer "
                    f"{tuple(buf.shape)} {buf.dtype}"
                )
            buf[:b].copy_(t, non_blocking=True)
        if slot.graph is not None:
            slot.graph.replay()
        else:
            slot.output = self.fn(*slot.inputs)
            slot.calls += 1
            if self.use_graphs and slot.calls >= self.warmup:
                self._capture(k, slot)
        assert slot.output is not None
        return slot.output[:b]

    def _capture(self, k: int, slot: _Slot) -> None:
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
                out = self.fn(*slot.inputs)
        except RuntimeError as e:
            log.warning("%s bucket %d: CUDA graph capture failed (%s); launching directly", self.name, k, e)
            self.use_graphs = False
            return
        g.replay()  # the capture did not run the work: the returned output must hold this call's result
        slot.output, slot.graph = out, g
        log.debug("%s: captured a CUDA graph for batch bucket %d", self.name, k)


# ----------------------------------------------------------------------------------------------- runner
class TorchCudaRunner(Runner):
    """Runner on one CUDA device: fused-kernel generator, CUDA graphs per stage and batch bucket.

    ``precision``: fp16 (default), bf16 or fp32 storage. ``max_batch``: largest bucket (bigger
    batches run in chunks). ``device="cpu"`` with ``impl="cpu"|"ref"`` runs the same structure
    without graphs (tests); serving goes through ``make_backend("torch-cuda")``, which requires CUDA.
    """

    name = "torch-cuda"

    def __init__(
        self,
        model: PCAVS,
        precision: str | None = None,
        device: str = "cuda",
        max_batch: int = DEFAULT_MAX_BATCH,
        cuda_graphs: bool = True,
        impl: str | None = None,
    ):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            require_cuda()
        self.precision = resolve_precision(precision)
        self.dtype = PRECISIONS[self.precision]
        self.impl = impl or ("cuda" if on_cuda else "cpu")
        if (self.impl == "cuda") != on_cuda:
            raise ConfigError(f"impl {self.impl!r} does not run on device {self.device}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.cfg = model.cfg
        # the caller's model is left untouched (device and mode included)
        self.identity_encoder = self._prep(model.identity_encoder)
        self.pose_encoder = self._prep(model.pose_encoder)
        self.audio_encoder = self._prep(model.audio_encoder)
        if self.cfg.generator == "warp":  # the appearance-preserving variant: fused op on its plain 3x3 convs
            from rt_engine.models.warp import FastWarpGenerator

            gen = model.generator
            if any(p.device != self.device for p in gen.parameters()):
                gen = copy.deepcopy(gen).to(self.device)  # a copy only to move it: the caller's stays put
            self.generator = FastWarpGenerator(gen, self.dtype, form=f"fused-{self.impl}")
        else:
            self.generator = KernelGenerator(model.generator, self.dtype, self.impl).to(self.device).eval()
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        graphs = cuda_graphs and on_cuda
        self.cuda_graphs = graphs

        def stage(fn: Callable[..., Tensor], name: str, use_graphs: bool = graphs) -> BucketGraphs:
            return BucketGraphs(fn, max_batch, use_graphs, self.stream, name=name)

        self._pose = stage(self._pose_fn, "pose")
        self._audio = stage(self._audio_fn, "audio")
        # random noise is drawn eagerly (a graph would replay one draw); stored and zero are captured
        self._gen = {
            mode: stage(self._gen_fn(mode), f"generator[{mode}]", graphs and mode != NoiseMode.RANDOM)
            for mode in NOISE_MODES
        }
        size = self.cfg.size
        self._host = torch.empty((max_batch, 3, size, size), pin_memory=on_cuda)  # [max_batch,3,H,W] fp32
        log.info(
            "torch-cuda: %s on %s, impl %s, CUDA graphs %s, buckets %s",
            self.precision,
            self.device,
            self.impl,
            graphs,
            buckets_for(max_batch),
        )

    # -- set-up helpers
    def _prep(self, enc: nn.Module) -> nn.Module:
        # a copy: moved to the runner's device in place, and BN needs eval mode whatever the caller's
        return copy.deepcopy(enc).eval().requires_grad_(False).to(self.device)

    def _ctx(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)  # no cache under capture

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def describe(self) -> str:
        return (
            f"{self.name} ({self.precision}, kernel {self.impl}, CUDA graphs {self.cuda_graphs}, "
            f"model '{self.cfg.name}')"
        )

    def ops(self) -> list[str]:
        return self.generator.ops()

    # -- stage functions (captured per bucket)
    def _pose_fn(self, img: Tensor) -> Tensor:  # [B,3,224,224] -> [B,12] fp32
        with self._ctx():
            return self.pose_encoder(img).float()

    def _audio_fn(self, mel: Tensor) -> Tensor:  # [B,1,80,20] -> [B,500] fp32
        with self._ctx():
            return self.pose_encoder.mouth(self.audio_encoder(mel)).float()

    def _gen_fn(self, noise: str) -> Callable[..., Tensor]:
        def run(id0: Tensor, var: Tensor, id_map: Tensor) -> Tensor:  # [B,2048], [B,512], [B,C,7,7] -> [B,3,H,W]
            return self.generator(self.generator.identity_base(id0), var, id_map, noise)

        return run

    def _chunked(self, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
        b = inputs[0].shape[0]
        if b <= self.max_batch:
            return fn(*inputs)
        return torch.cat(
            [fn(*(t[i : i + self.max_batch] for t in inputs)).clone() for i in range(0, b, self.max_batch)]
        )

    def _dev(self, x: Tensor) -> Tensor:
        return x.to(self.device, torch.float32, non_blocking=True)

    # -- device-side API (inputs and outputs on self.device)
    def pose_device(self, img: Tensor) -> Tensor:
        """[B,3,224,224] -> [B,12], device tensors (a view of the bucket output: use it before the next call)."""
        return self._chunked(self._pose, img)

    def audio_device(self, mel: Tensor) -> Tensor:
        """[B,1,80,20] -> [B,500], device tensors (a view of the bucket output)."""
        return self._chunked(self._audio, mel)

    def generate_device(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> Tensor:
        """id0 [B|1,2048], id1 [B|1,C,7,7], mouth [B|1,500], pose [B|1,12] (device) -> [B,3,H,W] (device)."""
        noise = noise_mode(noise, error=ValueError)
        b = max(id0.shape[0], id1.shape[0], mouth.shape[0], pose.shape[0])
        var = torch.cat([mouth.expand(b, -1), pose.expand(b, -1)], dim=1)  # [B,512]
        return self._chunked(self._gen[noise], id0.expand(b, -1), var, id1.expand(b, -1, -1, -1))

    def _to_host(self, frames: Tensor) -> Tensor:
        """Device frames [B,3,H,W] -> CPU fp32 through the pinned buffer (a copy the caller owns)."""
        out = []
        for i in range(0, frames.shape[0], self.max_batch):
            part = frames[i : i + self.max_batch]
            host = self._host[: part.shape[0]]
            host.copy_(part, non_blocking=True)
            if self.stream is not None:
                self.stream.synchronize()
            out.append(host.clone())
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.inference_mode()
    def step(self, pose_img: Tensor, mel: Tensor, id0: Tensor, id1: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        """One streaming step (host in, host out): pose + audio + generator on the device, one
        upload of the inputs, one download of the frames. -> [B,3,H,W] fp32 CPU."""
        with self._on_stream():
            pose = self.pose_device(self._dev(pose_img))
            mouth = self.audio_device(self._dev(mel))
            frames = self.generate_device(self._dev(id0), self._dev(id1), mouth, pose, noise)
            return self._to_host(frames)

    # -- Runner interface (float32 CPU tensors in and out)
    @torch.inference_mode()
    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        with self._on_stream():  # once per session: eager fp32
            id0, id1 = self.identity_encoder(self._dev(img))
            return id0.float().cpu(), id1.float().cpu()

    @torch.inference_mode()
    def encode_pose(self, img: Tensor) -> Tensor:
        with self._on_stream():
            return self.pose_device(self._dev(img)).cpu()

    @torch.inference_mode()
    def encode_audio(self, mel: Tensor) -> Tensor:
        with self._on_stream():
            return self.audio_device(self._dev(mel)).cpu()

    @torch.inference_mode()
    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        with self._on_stream():
            frames = self.generate_device(self._dev(id0), self._dev(id1), self._dev(mouth), self._dev(pose), noise)
            return self._to_host(frames)


def fused_layer_shapes(cfg, batch: int) -> list[tuple[int, int, int, int, int]]:
    """(B, Cin, Cout, H, W) of the generator's fused layers (conv1, then each level's second conv)."""
    ch, r = cfg.gen_channels, cfg.start
    out = [(batch, ch[0], ch[0], r, r)]
    for j in range(cfg.n_up):
        r *= 2
        out.append((batch, ch[j + 1], ch[j + 1], r, r))
    return out
