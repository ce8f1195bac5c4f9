"""PyTorch runners.

* ``torch`` (reference): fp32, per-sample-weight modulated conv: the official computation.
* ``torch-bf16``: the same networks under CPU bf16 autocast, static-weight modulated conv and
  channels-last memory (AMX on recent Intel CPUs). Demodulation stays fp32.
* ``torch-fast`` (:class:`FastTorchRunner`): the product CPU path. Generator replaced by
  :class:`~rt_engine.models.fast_generator.FastGenerator` (modulation of the identity part precomputed once
  per identity, static weights, dense-conv upsampling on AMX CPUs, channels-last); bf16 where the CPU has
  native bf16 (AVX512-BF16 / AMX), else fp32; optional ``torch.compile`` with frozen weights.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import torch
from torch import Tensor, nn

from rt_engine.backends.base import Runner
from rt_engine.config import NoiseMode
from rt_engine.inputs.image import to_uint8
from rt_engine.models.pcavs import PCAVS

log = logging.getLogger(__name__)
FAST_PRECISIONS = ("fp32", "bf16", "auto")


class TorchRunner(Runner):
    def __init__(
        self,
        model: PCAVS,
        precision: str = "fp32",
        form: str | None = None,
        channels_last: bool | None = None,
        device: str = "cpu",
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model.eval().to(device)
        self.cfg = model.cfg
        self.precision = precision
        self.device = torch.device(device)
        fast = precision == "bf16"
        self.form = form or ("static" if fast else "ref")  # passed per call: the model itself is not flipped
        self.channels_last = fast if channels_last is None else channels_last
        if self.channels_last:  # the encoders' 4-D conv weights; G's weights are 5-D [1,Cout,Cin,k,k]
            for enc in (self.model.identity_encoder, self.model.pose_encoder, self.model.audio_encoder):
                enc.to(memory_format=torch.channels_last)
        self.name = "torch" if not fast else "torch-bf16"

    def _ctx(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _in(self, x: Tensor) -> Tensor:
        x = x.to(self.device, torch.float32)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def _out(x: Tensor) -> Tensor:
        return x.float().cpu().contiguous()

    @torch.inference_mode()
    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        # once per identity, so always fp32: its error would otherwise reach every frame's style
        id0, id1 = self.model.encode_identity(self._in(img))
        return self._out(id0), self._out(id1)

    @torch.inference_mode()
    def encode_pose(self, img: Tensor) -> Tensor:
        with self._ctx():
            return self._out(self.model.encode_pose(self._in(img)))

    @torch.inference_mode()
    def encode_audio(self, mel: Tensor) -> Tensor:
        with self._ctx():
            return self._out(self.model.encode_mouth(self._in(mel)))

    @torch.inference_mode()
    def generate(
        self,
        id0: Tensor,
        id1: Tensor,
        mouth: Tensor,
        pose: Tensor,
        noise: str = NoiseMode.STORED,
        opening: Tensor | None = None,
    ) -> Tensor:
        """``opening`` [B] (warp generator with ``warp_open`` only; the reference backend only): the
        mouth opening to draw (z-score) in place of the one the model reads off ``mouth``. A diagnostic:
        it separates how far the generator opens the mouth from how well the mouth code predicts it."""
        style = self.style(id0, mouth, pose).to(self.device)
        if opening is not None:  # PCAVS.generate refuses it for a model without the opening channel
            opening = opening.to(self.device, torch.float32)  # [B]
        with self._ctx():
            out = self.model.generate(style, self._in(id1), noise, form=self.form, opening=opening)
        return self._out(out)

    def generate_uint8(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> np.ndarray:  # -> [B,H,W,3] u8
        return to_uint8(self.generate(id0, id1, mouth, pose, noise), inplace=True)  # a fresh tensor: scaled in place


def native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); else bf16 is emulated
    and slower than fp32 (e.g. AVX2-only CPUs)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on CPUs with native bf16, else 'fp32'."""
    if precision not in FAST_PRECISIONS:
        raise ValueError(f"precision must be one of {FAST_PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16() else "fp32"


class FastTorchRunner(Runner):
    """CPU product path in PyTorch (same interface and results as :class:`TorchRunner`).

    Work avoidance: :meth:`generate` caches the per-identity modulation base and the converted
    identity map, so a session pays for its identity once; only ``[mouth | pose]`` is modulated per
    frame. ``compile=True`` wraps the generator and the pose/audio encoders in ``torch.compile``
    with ``freezing`` (weights become constants: BN folded into convs, conv weights pre-packed);
    the first call per batch size compiles (tens of seconds at the official size).
    """

    def __init__(
        self,
        model: PCAVS,
        precision: str = "auto",
        compile: bool = False,
        upsample: str = "auto",
        channels_last: bool = True,
    ):
        from rt_engine.models.fast_generator import FastGenerator

        self.precision = resolve_precision(precision)
        if upsample == "auto":
            # The dense rewrite does 4x the multiply-adds of the transposed conv: it pays off where oneDNN's
            # dense convs are much faster per FLOP (AMX / AVX512-BF16: benchmarks/latency.py); on an AVX2-only CPU
            # the official-size benchmark measured the transposed form faster (benchmarks/results/latency_official_*).
            upsample = "dense" if native_bf16() else "transpose"
        if precision == "auto":
            log.info("torch-fast: precision %s (native bf16 on this CPU: %s)", self.precision, native_bf16())
        self.cfg = model.cfg
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.channels_last = channels_last
        self.compiled = compile
        self.upsample = upsample
        # the caller's model (often shared with the reference runner) is left untouched, mode included
        self.identity_encoder = self._prep(model.identity_encoder)
        self.pose_encoder = self._prep(model.pose_encoder)
        self.audio_encoder = self._prep(model.audio_encoder)
        if self.cfg.generator == "warp":
            from rt_engine.models.warp import FastWarpGenerator

            self.generator = FastWarpGenerator(model.generator, self.dtype)  # holds model.generator, no copy
        else:
            self.generator = FastGenerator(model.generator, self.dtype, channels_last, upsample).eval()
        self._gen = self.generator
        self._pose = self.pose_encoder
        self._audio = self._mouth
        if compile:
            opts = {"freezing": True}
            self._gen = torch.compile(self.generator, options=opts, dynamic=False)
            self._pose = torch.compile(self.pose_encoder, options=opts, dynamic=False)
            self._audio = torch.compile(self._mouth, options=opts, dynamic=False)
        self._id_key: Tensor | None = None  # id0 of the cached identity
        self._id_base: Tensor | None = None  # [1,N] modulation base of that identity
        self._map_key: Tensor | None = None
        self._id_map: Tensor | None = None  # [1,C,7,7] in compute dtype / memory format
        self.name = "torch-fast" + ("+compile" if compile else "")

    def _prep(self, enc: nn.Module) -> nn.Module:
        # a copy: its weights are re-laid out channels-last in place, and BN needs eval mode whatever the caller's
        enc = copy.deepcopy(enc).eval().requires_grad_(False)
        if self.channels_last:
            enc.to(memory_format=torch.channels_last)
        return enc

    def _ctx(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _in(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _mouth(self, mel: Tensor) -> Tensor:  # [B,1,80,20] -> [B,500]
        return self.pose_encoder.mouth(self.audio_encoder(mel))

    @staticmethod
    def _out(x: Tensor) -> Tensor:
        return x.float().contiguous()

    def describe(self) -> str:
        return f"{self.name} ({self.precision}, upsample {self.upsample}, model '{self.cfg.name}')"

    @torch.inference_mode()
    def encode_identity(self, img: Tensor) -> tuple[Tensor, Tensor]:
        with self._ctx():  # once per session: eager, never compiled
            id0, id1 = self.identity_encoder(self._in(img))
        return self._out(id0), self._out(id1)

    @torch.inference_mode()
    def encode_pose(self, img: Tensor) -> Tensor:
        with self._ctx():
            return self._out(self._pose(self._in(img)))

    @torch.inference_mode()
    def encode_audio(self, mel: Tensor) -> Tensor:
        with self._ctx():
            return self._out(self._audio(self._in(mel)))

    def identity_state(self, id0: Tensor, id1: Tensor) -> tuple[Tensor, Tensor]:
        """Per-identity constants, cached: modulation base [1|B,N] and identity map [1|B,C,7,7]."""
        if self._id_key is None or self._id_key.shape != id0.shape or not torch.equal(self._id_key, id0):
            self._id_key = id0.detach().clone()
            self._id_base = self.generator.identity_base(id0)
        if self._map_key is None or self._map_key.shape != id1.shape or not torch.equal(self._map_key, id1):
            self._map_key = id1.detach().clone()
            m = id1.to(self.dtype)
            self._id_map = m.contiguous(memory_format=torch.channels_last) if self.channels_last else m.contiguous()
        return self._id_base, self._id_map

    @torch.inference_mode()
    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        base, id_map = self.identity_state(id0, id1)
        b = max(id0.shape[0], id1.shape[0], mouth.shape[0], pose.shape[0])
        var = torch.cat([mouth.expand(b, -1), pose.expand(b, -1)], dim=1).float()  # [B,mouth+pose]
        if id_map.shape[0] not in (1, b):
            raise ValueError(f"id1 batch {id_map.shape[0]} does not match the frame batch {b}")
        return self._out(self._gen(base.expand(b, -1), var, id_map, noise))

    def generate_uint8(
        self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = NoiseMode.STORED
    ) -> np.ndarray:  # -> [B,H,W,3] u8
        return to_uint8(self.generate(id0, id1, mouth, pose, noise), inplace=True)  # a fresh tensor: scaled in place
