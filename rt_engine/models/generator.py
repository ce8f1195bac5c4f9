"""Generator ``G``: StyleGAN2 (rosinality layout) started from the 7x7 identity map.

style ``[B, id_dim + mouth_dim + pose_dim]`` (= [identity | mouth | pose]) drives every layer
(the 8-layer style MLP of the official checkpoint is unused). Output ``[B,3,size,size]`` in [-1,1].
Noise: ``stored`` uses the checkpoint buffers ``noises.noise_i``, ``random`` draws fresh noise
per layer and call (what upstream ``inference.py`` does), ``zero`` disables it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rt_engine.config import ModelConfig, NoiseMode, noise_mode
from rt_engine.models.modconv import FORMS, ModulatedConv2d, StyledConv, ToRGB


def noise_maps(mode: str, stored: list[Tensor], batch: int | None = None) -> list[Tensor]:
    """The noise maps of one generator call from the stored ``[1,1,r,r]`` maps (every runner uses this).

    ``batch``: None keeps the stored/zero maps at batch 1 (they broadcast, and a traced graph keeps
    them as constants); an int gives ``[batch,1,r,r]`` maps (runtimes that feed noise as inputs).
    ``random`` needs ``batch`` and draws fp32 normal noise on the stored maps' device.
    """
    mode = noise_mode(mode, error=ValueError)
    if mode == NoiseMode.STORED:
        return list(stored) if batch is None else [n.expand(batch, -1, -1, -1) for n in stored]
    if mode == NoiseMode.ZERO:
        return [torch.zeros_like(n) if batch is None else n.new_zeros(batch, *n.shape[1:]) for n in stored]
    if batch is None:
        raise ValueError("random noise needs the batch size")
    return [torch.randn(batch, *n.shape[1:], device=n.device) for n in stored]


class StyledGenerator(nn.Module):
    """What both generator variants share: noise buffers ``noises.noise_i`` of ``cfg.noise_sizes``,
    the modulated-conv form switch and the noise modes."""

    cfg: ModelConfig

    def _register_noises(self, cfg: ModelConfig) -> None:
        self.noises = nn.Module()
        for i, r in enumerate(cfg.noise_sizes):
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))

    def set_form(self, form: str) -> StyledGenerator:
        """Choose the modulated-conv form ('ref' per-sample weights, 'static' shared weights)."""
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {FORMS}")
        for m in self.modules():
            if isinstance(m, ModulatedConv2d):
                m.form = form
        return self

    def stored_noise(self) -> list[Tensor]:
        """The checkpoint's noise maps, [1,1,r,r] each."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.cfg.num_noises)]

    def noise_list(self, mode: str, like: Tensor) -> list[Tensor]:
        return noise_maps(mode, self.stored_noise(), like.shape[0] if mode == NoiseMode.RANDOM else None)


class Generator(StyledGenerator):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.gen_channels
        sd = cfg.style_dim
        self.cfg = cfg
        self.conv1 = StyledConv(ch[0], ch[0], sd)
        self.to_rgb1 = ToRGB(ch[0], sd)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for j in range(cfg.n_up):
            self.convs.append(StyledConv(ch[j], ch[j + 1], sd, upsample=True))
            self.convs.append(StyledConv(ch[j + 1], ch[j + 1], sd))
            self.to_rgbs.append(ToRGB(ch[j + 1], sd))
        self._register_noises(cfg)

    def forward(
        self,
        style: Tensor,
        id_map: Tensor,
        noise: str | list[Tensor] = NoiseMode.STORED,
        taps: dict[str, Tensor] | None = None,
        form: str | None = None,
    ) -> Tensor:
        """style [B,S], id_map [B,C,7,7] -> image [B,3,size,size]. ``taps`` collects intermediates.

        ``form``: the modulated-conv form of this call ("ref" or "static"; None: each layer's own,
        set by :meth:`set_form`). Runners pass it per call, so a shared model is never flipped."""
        if form is not None and form not in FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {FORMS}")
        noises = self.noise_list(noise, style) if isinstance(noise, str) else noise
        x = self.conv1(id_map, style, noises[0], form)  # [B,512,7,7]
        skip = self.to_rgb1(x, style, form=form)  # [B,3,7,7]
        if taps is not None:
            taps["conv1"], taps[f"skip{x.shape[-1]}"] = x, skip
        for j in range(self.cfg.n_up):
            x = self.convs[2 * j](x, style, noises[2 * j + 1], form)  # [B,C,2H,2W]
            if taps is not None:
                taps[f"convs{2 * j}"] = x
            x = self.convs[2 * j + 1](x, style, noises[2 * j + 2], form)
            if taps is not None:
                taps[f"convs{2 * j + 1}"] = x
            skip = self.to_rgbs[j](x, style, skip, form)
            if taps is not None:
                taps[f"skip{x.shape[-1]}"] = skip
        return torch.tanh(skip)
