"""PyTorch runners.

* ``torch`` (reference): fp32, per-sample-weight modulated conv: the official computation.
* ``torch-bf16``: the same networks under CPU bf16 autocast, static-weight modulated conv and
  channels-last memory (AMX on recent Intel CPUs). Demodulation stays fp32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from rt_engine.backends.base import Runner
from rt_engine.models.pcavs import PCAVS


class TorchRunner(Runner):
    def __init__(self, model: PCAVS, precision: str = "fp32", form: str | None = None,
                 channels_last: bool | None = None, device: str = "cpu"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model.eval().to(device)
        self.cfg = model.cfg
        self.precision = precision
        self.device = torch.device(device)
        fast = precision == "bf16"
        self.model.generator.set_form(form or ("static" if fast else "ref"))
        self.channels_last = fast if channels_last is None else channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
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
        with self._ctx():
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
    def generate(self, id0: Tensor, id1: Tensor, mouth: Tensor, pose: Tensor, noise: str = "stored") -> Tensor:
        style = self.style(id0, mouth, pose).to(self.device)
        with self._ctx():
            out = self.model.generate(style, self._in(id1), noise)
        return self._out(out)
