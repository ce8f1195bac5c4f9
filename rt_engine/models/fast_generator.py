"""Fast inference-only PC-AVS generator for CPUs (bf16 on AMX, channels-last, optional torch.compile).

:class:`FastGenerator` is built from a trained :class:`~rt_engine.models.generator.Generator` and
computes the same function (parity tests in tests/test_backends.py), rearranged so that nothing is
recomputed per frame that does not change per frame:

* **Modulation, split by style part.** Every modulated conv maps the style
  ``[id0 | mouth | pose]`` to its per-channel scale ``s = W_id @ id0 + W_mouth @ mouth + W_pose @ pose + b``.
  The weights of all 17 (official size) modulations are stacked into one matrix, and the identity
  part ``base = W_id @ id0 + b`` is computed **once per identity** (:meth:`FastGenerator.identity_base`).
  Per frame only ``[mouth | pose] @ W_var`` remains: 512 instead of 2560 input columns (the official
  2560 x 6.9k fp32 matrix is 70 MB, i.e. ~2 ms of memory traffic per frame on this machine).
* **Static-weight modulated conv.** ``conv(x * s, w) * d`` with ``d = rsqrt(s^2 @ W2 + 1e-8)`` in fp32
  (``W2[i, o] = sum_k w[o, i, k]^2`` precomputed), so the conv weights are constants that oneDNN can
  pre-pack (bf16, channels-last, AMX).
* **fp32 where it is cheap.** Modulation, demodulation and the 3-channel RGB skip chain stay fp32.
* **Fused constants.** ``noise_weight * noise_buffer`` is precomputed per layer (stored-noise mode);
  the sqrt(2) gain of each leaky ReLU is folded into the input scale ``s`` of the layers that
  read its output (demodulation still uses the unscaled ``s``).
* **Upsampling as a dense conv** (``upsample="dense"``): the stride-2 transposed 3x3 conv followed
  by the 4x4 blur equals, per output phase (row parity, column parity), a 3x3 conv of the input.
  The four phases become one 3x3 conv to ``4*Cout`` channels and a pixel shuffle. That is 4x the
  multiply-adds of the transposed conv, but oneDNN runs dense 3x3 convs ~5x faster per FLOP than
  stride-2 transposed convs on bf16 CPUs, so it can win; ``"transpose"`` keeps the original
  two-op form. ``benchmarks/latency.py`` measures both.

Data flow of one frame (official size)::

    base [1,N]  (once per identity)        var = [mouth | pose] [B,512]
    s_all = base + var @ W_var  [B,N]  -> per layer: s [B,Cin], d [B,Cout]
    id_map [1,512,7,7] -> conv1 -> ... 5 x (up conv, conv, to_rgb) ... -> tanh -> [B,3,224,224]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_engine.config import NoiseMode, noise_mode
from rt_engine.models.generator import Generator
from rt_engine.models.modconv import DEMOD_EPS, LRELU_GAIN, LRELU_SLOPE, ModulatedConv2d, blur_kernel

log = logging.getLogger(__name__)

UPSAMPLE_MODES = ("dense", "transpose")


def dense_upsample_weight(weight: Tensor) -> Tensor:
    """Transposed 3x3 stride-2 conv + [1,3,3,1] blur as one 3x3 conv to 4*Cout channels.

    weight: [Cout,Cin,3,3] (static-form layout, scale applied) -> [4*Cout,Cin,3,3] with output
    channel ``4*o + 2*ry + rx`` holding output phase (ry, rx), ready for ``pixel_shuffle(2)``.

    Derivation (1-D, then separable): the transposed conv gives ``t[2i+k] += x[i] w[k]``; the blur
    (pad 1, 4 taps K, K symmetric) gives ``z[y] = sum_t t[y+t-1] K[t]``. Together
    ``z[y] = sum_i x[i] g[y - 2i + 2]`` with ``g = w * K`` (full convolution, 6 taps). For
    ``y = 2q + r`` this is a 3-tap correlation over ``x[q-1..q+1]`` with taps ``g[r+4], g[r+2], g[r]``.
    """
    cout, cin, k, _ = weight.shape
    if k != 3:
        raise ValueError(f"dense upsampling needs a 3x3 weight, got {tuple(weight.shape)}")
    kern = blur_kernel(weight.device).to(weight.dtype)  # [4,4], symmetric
    # full 2-D convolution of every [3,3] slice with the [4,4] blur -> [Cout,Cin,6,6]
    g = F.conv2d(F.pad(weight.reshape(cout * cin, 1, 3, 3), (3, 3, 3, 3)), kern.flip(0, 1)[None, None])
    g = g.reshape(cout, cin, 6, 6)
    idx = torch.tensor([[4, 2, 0], [5, 3, 1]], device=weight.device)  # [r, j] -> tap g[r + 4 - 2j]
    out = weight.new_empty(cout, 2, 2, cin, 3, 3)  # [Cout,ry,rx,Cin,3,3]
    for ry in range(2):
        for rx in range(2):
            out[:, ry, rx] = g[:, :, idx[ry]][:, :, :, idx[rx]]
    return out.reshape(4 * cout, cin, 3, 3)


class FastGenerator(nn.Module):
    """Inference-only twin of ``Generator``: ``forward(base, var, id_map, noise) -> [B,3,size,size]``.

    base: [1|B,N] from :meth:`identity_base`; var: [B, mouth_dim + pose_dim] (mouth | pose);
    id_map: [1|B,C,7,7]; noise: 'stored' | 'zero' | 'random'. Output fp32 in [-1, 1].
    """

    def __init__(
        self, gen: Generator, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True, upsample: str = "dense"
    ):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        cfg = gen.cfg
        self.cfg = cfg
        self.dtype = dtype
        self.channels_last = channels_last
        self.upsample_mode = upsample
        mods, acts = self.layers(gen)
        with torch.no_grad():
            w_mod = torch.cat([m.modulation.weight * m.modulation.scale for m in mods])  # [N,S]
            b_mod = torch.cat([m.modulation.bias for m in mods])  # [N]
            self.register_buffer("mod_w_id", w_mod[:, : cfg.id_dim].t().contiguous().float())  # [id_dim,N]
            self.register_buffer("mod_w_var", w_mod[:, cfg.id_dim :].t().contiguous().float())  # [512,N]
            self.register_buffer("mod_b", b_mod.float())  # [N]
            # Input gain: every layer but conv1 reads a leaky-ReLU output whose sqrt(2) gain we skip.
            gain = torch.cat([torch.full((m.cin,), 1.0 if i == 0 else LRELU_GAIN) for i, m in enumerate(mods)])
            self.register_buffer("in_gain", gain)  # [N]
            self.splits = [m.cin for m in mods]
            self.demod = [m.demodulate for m in mods]
            self.up = [m.upsample for m in mods]
            self.n_layers = len(mods)
            self.noise_w: list[float] = []  # noise weight of each StyledConv, in noise-buffer order
            for i, (m, act) in enumerate(zip(mods, acts, strict=True)):
                w = m.scaled_weight().float()  # [Cout,Cin,k,k]
                if m.demodulate:
                    self.register_buffer(f"w2_{i}", w.square().sum(dim=(2, 3)).t().contiguous())  # [Cin,Cout]
                if m.upsample and upsample == "dense":
                    wc = dense_upsample_weight(w)  # [4*Cout,Cin,3,3]
                elif m.upsample:
                    wc = w.transpose(0, 1).contiguous()  # [Cin,Cout,3,3] conv_transpose layout
                else:
                    wc = w
                self.register_buffer(f"w_{i}", self._mem(wc.to(dtype)))
                if act is not None:  # StyledConv: noise then bias + leaky ReLU
                    self.register_buffer(f"bias_{i}", act.activate.bias.reshape(1, -1, 1, 1).to(dtype))
                    self.noise_w.append(float(act.noise.weight))
                else:  # ToRGB: bias only, fp32 (skip chain)
                    parent = gen.to_rgb1 if i == 1 else gen.to_rgbs[(i - 4) // 3]
                    self.register_buffer(f"bias_{i}", parent.bias.reshape(1, -1, 1, 1).float())
            stored = [getattr(gen.noises, f"noise_{k}") for k in range(cfg.num_noises)]
            for k, (nb, nw) in enumerate(zip(stored, self.noise_w, strict=True)):
                self.register_buffer(f"noise_{k}", self._mem((nb * nw).to(dtype)))  # [1,1,R,R] pre-scaled
            kern = blur_kernel().to(dtype)  # [4,4]
            self.register_buffer("blur", kern[None, None])  # [1,1,4,4]
            self.register_buffer("skip_up", blur_kernel()[None, None].expand(3, 1, 4, 4).contiguous())  # fp32
        self.requires_grad_(False)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def layers(gen: Generator) -> tuple[list[ModulatedConv2d], list[nn.Module | None]]:
        """The modulated convs in execution order (conv1, to_rgb1, then per level: up conv, conv,
        to_rgb) and, for each, its StyledConv (noise, bias, activation) or None for a ToRGB."""
        mods: list[ModulatedConv2d] = [gen.conv1.conv, gen.to_rgb1.conv]
        acts: list[nn.Module | None] = [gen.conv1, None]
        for j in range(gen.cfg.n_up):
            mods += [gen.convs[2 * j].conv, gen.convs[2 * j + 1].conv, gen.to_rgbs[j].conv]
            acts += [gen.convs[2 * j], gen.convs[2 * j + 1], None]
        return mods, acts

    def _mem(self, t: Tensor) -> Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.ndim == 4 else t

    @torch.no_grad()
    def identity_base(self, id0: Tensor) -> Tensor:
        """Identity part of every modulation, once per identity: [1|B,id_dim] -> [1|B,N] fp32."""
        return torch.addmm(self.mod_b, id0.float(), self.mod_w_id)

    def styles(self, base: Tensor, var: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per-layer input scales (gain folded in, compute dtype) and demodulation factors (fp32)."""
        s_all = base + var.float() @ self.mod_w_var  # [B,N] fp32
        gained = torch.split((s_all * self.in_gain).to(self.dtype), self.splits, dim=1)
        scales, demods = [], []
        for i, s in enumerate(torch.split(s_all, self.splits, dim=1)):
            scales.append(gained[i][:, :, None, None])  # [B,Cin,1,1]
            if self.demod[i]:
                d = torch.rsqrt(s.square() @ getattr(self, f"w2_{i}") + DEMOD_EPS)  # [B,Cout] fp32
                demods.append(d[:, :, None, None].to(self.dtype))
            else:
                demods.append(None)
        return scales, demods

    def _noise(self, k: int, mode: str, like: Tensor) -> Tensor | None:
        mode = noise_mode(mode, error=ValueError)
        if mode == NoiseMode.STORED:
            return getattr(self, f"noise_{k}")  # pre-scaled by its noise weight
        if mode == NoiseMode.ZERO:
            return None
        b, _, h, w = like.shape
        return torch.randn(b, 1, h, w, dtype=like.dtype, device=like.device) * self.noise_w[k]

    def _styled(self, i: int, x: Tensor, s: Tensor, d: Tensor, noise: Tensor | None) -> Tensor:
        """StyledConv i: modulated conv (upsampling or not) -> noise -> lrelu(x + b) (gain folded away)."""
        w = getattr(self, f"w_{i}")
        xs = x * s
        if not self.up[i]:
            y = F.conv2d(xs, w, padding=1)  # [B,Cout,H,W]
        elif self.upsample_mode == "dense":
            y = F.pixel_shuffle(F.conv2d(xs, w, padding=1), 2)  # [B,4*Cout,H,W] -> [B,Cout,2H,2W]
        else:
            y = F.conv_transpose2d(xs, w, stride=2)  # [B,Cout,2H+1,2W+1]
            c = y.shape[1]
            y = F.conv2d(F.pad(y, (1, 1, 1, 1)), self.blur.expand(c, 1, 4, 4), groups=c)  # [B,Cout,2H,2W]
        y = y * d
        if noise is not None:
            y = y + noise
        return F.leaky_relu(y + getattr(self, f"bias_{i}"), LRELU_SLOPE)

    def _to_rgb(self, i: int, x: Tensor, s: Tensor, skip: Tensor | None) -> Tensor:
        """ToRGB; the 3-channel skip chain is accumulated in fp32 (cheap, and bf16 rounding of the image
        summed over six levels cost ~3 dB of PSNR on the demo)."""
        out = F.conv2d(x * s, getattr(self, f"w_{i}")).float() + getattr(self, f"bias_{i}")  # [B,3,H,W] fp32
        if skip is not None:  # upfirdn2d(skip, K, up=2, pad=(2,1)) == transposed conv, stride 2, padding 1
            out = out + F.conv_transpose2d(skip, self.skip_up, stride=2, padding=1, groups=3)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, base: Tensor, var: Tensor, id_map: Tensor, noise: str = NoiseMode.STORED) -> Tensor:
        scales, demods = self.styles(base, var)
        b = var.shape[0]
        x = self._mem(id_map.to(self.dtype).expand(b, -1, -1, -1))  # [B,C,7,7]
        x = self._styled(0, x, scales[0], demods[0], self._noise(0, noise, x[:, :1]))
        skip = self._to_rgb(1, x, scales[1], None)  # [B,3,7,7]
        k = 1
        for j in range(self.cfg.n_up):
            i = 2 + 3 * j
            h = x.shape[-1] * 2
            like = x.new_empty(b, 1, h, h)
            x = self._styled(i, x, scales[i], demods[i], self._noise(k, noise, like))  # [B,C,2H,2W]
            x = self._styled(i + 1, x, scales[i + 1], demods[i + 1], self._noise(k + 1, noise, like))
            skip = self._to_rgb(i + 2, x, scales[i + 2], skip)  # [B,3,2H,2W]
            k += 2
        return torch.tanh(skip.float())


def generator_flops(cfg, batch: int = 1, upsample: str = "transpose") -> int:
    """Analytic multiply-add FLOPs (2 per MAC) of the generator's convolutions per ``batch`` frames."""
    ch, r = cfg.gen_channels, cfg.start
    macs = ch[0] * ch[0] * 9 * r * r + 3 * ch[0] * r * r
    for j in range(cfg.n_up):
        cin, cout = ch[j], ch[j + 1]
        up = cin * cout * 9 * r * r * (4 if upsample == "dense" else 1)
        r *= 2
        macs += up + cout * cout * 9 * r * r + 3 * cout * r * r
    return 2 * batch * macs
