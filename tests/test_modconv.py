"""The two forms of the modulated convolution are equal (plain and upsampling layers)."""

import pytest
import torch
import torch.nn.functional as F

from rt_engine.models.modconv import blur_kernel, demodulation, modulated_conv2d_ref, modulated_conv2d_static, upfirdn2d


@pytest.mark.parametrize("upsample,k", [(False, 3), (True, 3), (False, 1)])  # 1x1: ToRGB; upsampling is 3x3
@pytest.mark.parametrize("shape", [(1, 8, 16, 7), (3, 16, 8, 5), (4, 5, 7, 13)])  # B, Cin, Cout, H
def test_static_equals_ref(upsample, k, shape):
    torch.manual_seed(0)
    b, cin, cout, h = shape
    x = torch.randn(b, cin, h, h + 2, dtype=torch.float64)
    s = torch.randn(b, cin, dtype=torch.float64) + 1.0
    w = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    for demod in (True, False):
        a = modulated_conv2d_ref(x, s, w, demod, upsample)
        c = modulated_conv2d_static(x, s, w, demod, upsample)
        assert a.shape == c.shape == (b, cout, h * (2 if upsample else 1), (h + 2) * (2 if upsample else 1))
        assert torch.allclose(a, c, rtol=1e-9, atol=1e-10), (a - c).abs().max()


def test_static_equals_ref_fp32_tolerance():
    torch.manual_seed(1)
    x, s = torch.randn(2, 64, 14, 14), torch.randn(2, 64) + 1
    w = torch.randn(32, 64, 3, 3) / 24
    for up in (False, True):
        a, c = modulated_conv2d_ref(x, s, w, True, up), modulated_conv2d_static(x, s, w, True, up)
        assert ((a - c).abs().max() / a.abs().max()).item() < 1e-5


def test_demodulation_matches_per_sample_weights():
    torch.manual_seed(2)
    s, w = torch.randn(3, 6), torch.randn(4, 6, 3, 3)
    per_sample = torch.rsqrt((w[None] * s[:, None, :, None, None]).square().sum((2, 3, 4)) + 1e-8)
    assert torch.allclose(demodulation(s, w), per_sample, rtol=1e-6)


def test_upfirdn2d_matches_direct_definition():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    k = blur_kernel().double()
    # direct: zero insertion, pad (2,1), correlate with flipped kernel (symmetric)
    z = torch.zeros(2, 3, 10, 12, dtype=torch.float64)
    z[:, :, ::2, ::2] = x
    z = F.pad(z, (2, 1, 2, 1))
    ref = torch.zeros(2, 3, 10, 12, dtype=torch.float64)
    for i in range(10):
        for j in range(12):
            ref[:, :, i, j] = (z[:, :, i : i + 4, j : j + 4] * k.flip(0, 1)).sum((2, 3))
    assert torch.allclose(upfirdn2d(x, k, up=2, pad=(2, 1)), ref)
    assert blur_kernel().sum().item() == 4.0
