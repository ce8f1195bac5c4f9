"""StyleGAN2 building blocks of the PC-AVS generator, in pure PyTorch.

The modulated convolution exists in two mathematically equal forms:

* ``ref`` (the official one): build a per-sample weight ``w' = w * s``, demodulate it by
  ``d = rsqrt(sum_{i,k} w'^2 + eps)`` and run one grouped convolution over the batch;
* ``static``: scale the input by the style, convolve with the weight shared by every sample,
  scale the output by ``d = rsqrt(s^2 @ W2 + eps)`` with ``W2[o, i] = sum_k w[o, i, k]^2``.

The static form keeps the weights constant, so it batches sessions with different styles,
exports to ONNX with a dynamic batch axis, and lets runtimes pre-pack the weights.
Demodulation is always computed in fp32 (eps 1e-8 underflows in half precision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEMOD_EPS = 1e-8
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
FORMS = ("ref", "static")
# Per-call forms that send every demodulated, non-upsampling 3x3 StyledConv through the fused op
# (models/fused_modconv.py, impl after the dash); every other modulated conv runs the static form.
FUSED_FORMS = ("fused-ref", "fused-cpu", "fused-cuda")


def library_form(form: str) -> str:
    """The plain form a modulated conv runs under ``form`` (a fused form falls back to "static")."""
    return "static" if form in FUSED_FORMS else form


def blur_kernel(device: torch.device | None = None) -> Tensor:
    """The StyleGAN2 [1,3,3,1] FIR kernel times 4 (sums to 4, compensating zero insertion). # [4,4]"""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    return torch.outer(k, k) / 16.0


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion, pad, and correlate with the flipped FIR ``kernel``.

    x: [B,C,H,W]; kernel: [kh,kw]. Returns [B,C,H*up+p0+p1-kh+1, W*up+p0+p1-kw+1].

    The channel count is read as a Python int: the TorchScript tracer (ONNX export) would otherwise
    record it as a graph value, the blur kernel ``expand(c, 1, kh, kw)`` would lose its static shape
    and the ONNX Conv symbolic would refuse it. The arithmetic is the same either way.
    """
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    c = int(x.shape[1])
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))  # [B,C,H,up,W,up]
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    x = F.pad(x, (p0, p1, p0, p1))
    k = torch.flip(kernel, (0, 1)).to(x.dtype)[None, None].expand(c, 1, -1, -1)  # [C,1,kh,kw]
    return F.conv2d(x, k, groups=c)


def fused_leaky_relu(x: Tensor, bias: Tensor) -> Tensor:
    """leaky_relu(x + bias, 0.2) * sqrt(2). x: [B,C,H,W]; bias: [C] or [1,C,1,1]."""
    return F.leaky_relu(x + bias.reshape(1, -1, 1, 1).to(x.dtype), LRELU_SLOPE) * LRELU_GAIN


def demodulation(style: Tensor, weight: Tensor) -> Tensor:
    """Demodulation factors of the static form, in fp32.

    style: [B,Cin] (modulation output); weight: [Cout,Cin,k,k] already scaled -> [B,Cout]
    """
    dt = torch.promote_types(style.dtype, torch.float32)  # never below fp32
    w2 = weight.to(dt).square().sum(dim=(2, 3))  # [Cout,Cin]
    return torch.rsqrt(style.to(dt).square() @ w2.t() + DEMOD_EPS)


def modulated_conv2d_ref(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    demodulate: bool = True,
    upsample: bool = False,
    padding: int | None = None,
) -> Tensor:
    """Per-sample-weight form (the official computation).

    x: [B,Cin,H,W]; style: [B,Cin]; weight: [Cout,Cin,k,k] (equalized-lr scale applied).
    Plain: conv2d with padding k//2 -> [B,Cout,H,W]. Upsample: conv_transpose2d stride 2 then
    the [1,3,3,1] blur -> [B,Cout,2H,2W].
    """
    b, cin, h, w_ = x.shape
    cout, _, k, _ = weight.shape
    wt = weight[None] * style[:, None, :, None, None]  # [B,Cout,Cin,k,k]
    if demodulate:
        d = torch.rsqrt(wt.square().sum(dim=(2, 3, 4)) + DEMOD_EPS)  # [B,Cout]
        wt = wt * d[:, :, None, None, None]
    xg = x.reshape(1, b * cin, h, w_)
    if upsample:
        wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)  # [B*Cin,Cout,k,k]
        out = F.conv_transpose2d(xg, wt, stride=2, padding=0, groups=b)
        out = out.reshape(b, cout, out.shape[-2], out.shape[-1])
        return upfirdn2d(out, blur_kernel(x.device), pad=(1, 1))
    pad = k // 2 if padding is None else padding
    out = F.conv2d(xg, wt.reshape(b * cout, cin, k, k), padding=pad, groups=b)
    return out.reshape(b, cout, h, w_)


def modulated_conv2d_static(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    demodulate: bool = True,
    upsample: bool = False,
    padding: int | None = None,
) -> Tensor:
    """Static-weight form: same arguments and result as :func:`modulated_conv2d_ref`."""
    k = weight.shape[-1]
    xs = x * style[:, :, None, None].to(x.dtype)  # [B,Cin,H,W]
    if upsample:
        out = F.conv_transpose2d(xs, weight.transpose(0, 1).to(x.dtype), stride=2, padding=0)
        out = upfirdn2d(out, blur_kernel(x.device), pad=(1, 1))  # [B,Cout,2H,2W]
    else:
        out = F.conv2d(xs, weight.to(x.dtype), padding=k // 2 if padding is None else padding)
    if demodulate:
        out = out * demodulation(style, weight)[:, :, None, None].to(out.dtype)
    return out


def modulated_conv2d(
    x: Tensor, style: Tensor, weight: Tensor, demodulate: bool = True, upsample: bool = False, form: str = "ref"
) -> Tensor:
    if form == "ref":
        return modulated_conv2d_ref(x, style, weight, demodulate, upsample)
    if form == "static":
        return modulated_conv2d_static(x, style, weight, demodulate, upsample)
    raise ValueError(f"unknown modulated conv form {form!r}; choose from {FORMS}")


class EqualLinear(nn.Module):
    """Linear layer with the equalized learning-rate scale 1/sqrt(in_dim) (modulation)."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = 1.0 / math.sqrt(in_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B,in] -> [B,out]
        # The style modulation is tiny and every layer's output scales with it: always fp32.
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float() * self.scale, self.bias.float())


class ModulatedConv2d(nn.Module):
    """Weight stored as the official ``[1,Cout,Cin,k,k]`` parameter (unscaled)."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.weight = nn.Parameter(torch.randn(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.demodulate = demodulate
        self.upsample = upsample
        self.form = "ref"

    def scaled_weight(self) -> Tensor:  # [Cout,Cin,k,k]
        return self.weight[0] * self.scale

    def forward(self, x: Tensor, style: Tensor, form: str | None = None) -> Tensor:
        """``form``: this call's form (None: the module's ``form``), so a runner never flips a shared model."""
        s = self.modulation(style)  # [B,Cin]
        return modulated_conv2d(
            x, s, self.scaled_weight(), self.demodulate, self.upsample, library_form(form or self.form)
        )


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor) -> Tensor:  # noise [1 or B,1,H,W]
        return x + self.weight.to(x.dtype) * noise.to(x.dtype)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias)


class StyledConv(nn.Module):
    """Modulated 3x3 conv (optionally upsampling) -> noise -> bias + scaled leaky ReLU."""

    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, 3, style_dim, demodulate=True, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor, form: str | None = None) -> Tensor:
        c = self.conv
        if form in FUSED_FORMS and c.k == 3 and c.demodulate and not c.upsample:
            from rt_engine.models import fused_modconv as fm  # it imports this module

            # x [B,Cin,H,W] -> [B,Cout,H,W]: conv, demodulation, noise, bias and scaled leaky ReLU in one op;
            # the noise is pre-scaled by its weight here (a tensor op: CUDA-graph safe)
            nz = self.noise.weight.to(x.dtype) * noise.to(x.dtype)
            return fm.modulated_conv2d(
                x,
                c.modulation(style),
                c.scaled_weight().to(x.dtype),
                nz,
                1.0,
                self.activate.bias.reshape(-1).float(),
                impl=form.split("-", 1)[1],
            )
        return self.activate(self.noise(c(x, style, form), noise))


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, plus bias, plus the upsampled previous skip."""

    def __init__(self, cin: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None, form: str | None = None) -> Tensor:
        # 1x1 conv to 3 channels and the skip sum are cheap; fp32 keeps the image precise under autocast.
        with torch.autocast(x.device.type, enabled=False):
            out = self.conv(x.float(), style, form) + self.bias.float()  # [B,3,H,W]
            if skip is not None:
                out = out + upfirdn2d(skip.float(), blur_kernel(x.device), up=2, pad=(2, 1))
        return out
