"""The CUDA kernel source (rt_engine/kernels/modconv.cu) executed on the CPU through emu/cuda_emu.h.

g++ compiles the unmodified .cu against the emulation header (each CUDA thread a fiber, barriers
and warp shuffles yield to a per-block scheduler, instrumented __shared__ arrays with a race
detector); ctypes calls the same launcher functions the CUDA build exports. Checks: parity with
the PyTorch reference, order independence, and that every __syncthreads is needed (dropping one
is reported as a shared-memory race and, with the detector off, corrupts the result).
"""

import re
import shutil
from pathlib import Path

import pytest
import torch

from rt_engine.models import fused_modconv as fm
from rt_engine.models.kernel_emu import EMU_SOURCES, Emu, build_emu, compile_emu, cxx

KDIR = fm.KERNEL_DIR  # the kernel sources ship inside the package

pytestmark = pytest.mark.skipif(cxx() is None, reason="a C++ compiler (g++) is needed to build the emulator")


@pytest.fixture(scope="module")
def emu():
    return Emu(build_emu())


def inputs(shape, noise_mode="batch", dtype=torch.float32, seed=0):
    b, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g).to(dtype)  # [B,Cin,H,W]
    style = torch.randn(b, cin, generator=g) * 0.5 + 1.0  # [B,Cin]
    weight = (torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5).to(dtype)  # [Cout,Cin,3,3]
    noise = {
        "none": None,
        "broadcast": torch.randn(1, 1, h, w, generator=g),
        "batch": torch.randn(b, 1, h, w, generator=g),
    }[noise_mode]
    noise = None if noise is None else noise.to(dtype)
    bias = torch.randn(cout, generator=g) * 0.1  # [Cout]
    return x, style, weight, noise, bias


def reference(x, style, weight, noise, noise_weight, bias, demodulate=True, activate=True):
    n = None if noise is None else noise.float()
    return fm.modulated_conv2d_fused_ref(x.float(), style, weight.float(), n, noise_weight, bias, demodulate, activate)


def max_rel_err(out, ref) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def sync_lines(src: Path = KDIR / "modconv.cu") -> list[int]:
    lines = src.read_text().splitlines()
    return [i for i, line in enumerate(lines, 1) if re.search(r"__syncthreads\(\);", line)]


# small shapes: every block is 256 fibers; CK=8 input channels per chunk, TCO=32, 8x16 pixel tiles
SHAPES = [
    (3, 20, 40, 13, 9),
    (2, 8, 32, 7, 7),
    (4, 5, 3, 1, 1),
    (1, 17, 33, 16, 16),
    (2, 9, 7, 3, 19),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_matches_reference_fp32(emu, shape):
    emu.configure(seed=3)
    for noise_mode in ("batch", "broadcast"):
        x, s, w, n, b = inputs(shape, noise_mode)
        out, rc_d, rc = emu.run(x, s, w, n, 0.3, b)
        assert (rc_d, rc) == (0, 0), emu.messages()
        assert max_rel_err(out, reference(x, s, w, n, 0.3, b)) <= 1e-5
        ref_grouped = fm.modulated_conv2d_fused_ref(x, s, w, n, 0.3, b, form="ref")
        assert max_rel_err(out, ref_grouped) <= 1e-5
    assert emu.lib.rt_emu_error_count() == 0, emu.messages()


def test_emulated_cuda_options(emu):
    emu.configure(seed=4)
    x, s, w, _, b = inputs((2, 10, 12, 5, 6), "none")
    for demodulate, activate, bias in ((False, True, b), (True, False, None), (False, False, b)):
        out, rc_d, rc = emu.run(x, s, w, None, 0.0, bias, demodulate, activate)
        assert (rc_d, rc) == (0, 0), emu.messages()
        assert max_rel_err(out, reference(x, s, w, None, 0.0, bias, demodulate, activate)) <= 1e-5


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_emulated_cuda_half_storage(emu, dtype, rel):
    emu.configure(seed=5)
    x, s, w, n, b = inputs((2, 12, 36, 9, 18), "batch", dtype=dtype)
    out, rc_d, rc = emu.run(x, s, w, n, 0.3, b)
    assert (rc_d, rc) == (0, 0), emu.messages()
    assert out.dtype == dtype
    assert max_rel_err(out, reference(x, s, w, n, 0.3, b)) <= rel


def test_emulated_matches_cpu_twin(emu):
    """The CUDA source and the C++ twin agree closely (both fp32 accumulate, different orders)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is needed to build rt_engine._kernels")
    emu.configure(seed=6)
    x, s, w, n, b = inputs((2, 11, 13, 6, 7), "broadcast")
    out, _, _ = emu.run(x, s, w, n, 0.5, b)
    twin = fm.modulated_conv2d(x, s, w, n, 0.5, b, impl="cpu")
    assert max_rel_err(out, twin) <= 1e-5


def test_result_independent_of_schedule(emu):
    """A correctly synchronised kernel gives bit-identical results for any order and OS-thread count."""
    x, s, w, n, b = inputs((2, 20, 40, 9, 17), "batch", seed=7)
    outs = []
    for os_threads, seed, shuffle in ((1, 1, False), (2, 12345, True), (1, 999, True)):
        emu.configure(os_threads=os_threads, seed=seed, shuffle=shuffle)
        out, rc_d, rc = emu.run(x, s, w, n, 0.3, b)
        assert (rc_d, rc) == (0, 0), emu.messages()
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("line", sync_lines(), ids=lambda n: f"line{n}")
def test_dropped_syncthreads_is_reported(emu, line):
    # two or more input-channel chunks, so the end-of-chunk barrier matters too
    x, s, w, n, b = inputs((1, 20, 40, 9, 9), "batch", seed=8)
    emu.configure(seed=9, drop_sync_line=line)
    _, rc_d, rc = emu.run(x, s, w, n, 0.3, b)
    msgs = emu.messages()
    emu.configure()
    assert rc_d == 0
    assert rc != 0, f"dropping __syncthreads at line {line} went unnoticed"
    assert "hazard on __shared__" in msgs, msgs


@pytest.mark.parametrize("line", sync_lines(), ids=lambda n: f"line{n}")
def test_dropped_syncthreads_corrupts_result_under_adversarial_order(emu, line):
    """Detector off: the shuffled fiber order alone makes the missing barrier visible in the output."""
    x, s, w, n, b = inputs((1, 20, 40, 9, 9), "batch", seed=10)
    emu.configure(seed=11, race_check=False, drop_sync_line=line)
    out, _, rc = emu.run(x, s, w, n, 0.3, b)
    emu.configure()
    assert rc == 0  # nothing reported with the detector off ...
    assert max_rel_err(out, reference(x, s, w, n, 0.3, b)) > 1e-3  # ... but the numbers are wrong


def test_removed_syncthreads_in_source_copy_is_reported(tmp_path):
    """Text-edit a copy of the kernel source (delete its first barrier), build it, expect a race."""
    src = tmp_path / "kernels"
    for f in EMU_SOURCES:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(KDIR / f, src / f)
    first = sync_lines()[0]
    lines = (src / "modconv.cu").read_text().splitlines(keepends=True)
    assert "__syncthreads();" in lines[first - 1]
    lines[first - 1] = lines[first - 1].replace("__syncthreads();", "/* barrier removed by test */")
    (src / "modconv.cu").write_text("".join(lines))
    so = tmp_path / "emu_nosync.so"
    compile_emu(src, so)
    broken = Emu(so)
    broken.configure(seed=2)
    x, s, w, n, b = inputs((1, 12, 8, 5, 5), "none", seed=12)
    _, _, rc = broken.run(x, s, w, n, 0.0, b)
    assert rc != 0
    assert "read-after-write hazard" in broken.messages() or "write-after-read hazard" in broken.messages()


def test_demod_kernel_warp_shuffle(emu):
    """demod_kernel (one warp per (b, o), __shfl_xor_sync reduction) vs the fp32 reference."""
    from rt_engine.models.modconv import demodulation

    emu.configure(seed=13)
    _, s, w, _, _ = inputs((3, 70, 5, 1, 1), "none")  # Cin > 32: lanes loop; B*Cout = 15 warps
    d = torch.empty(3, 5)
    rc = emu.lib.rt_demod_cuda(0, s.data_ptr(), w.data_ptr(), d.data_ptr(), 3, 70, 5, None)
    assert rc == 0, emu.messages()
    torch.testing.assert_close(d, demodulation(s, w), rtol=2e-6, atol=0)
