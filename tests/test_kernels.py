"""Native fused modulated conv (rt_engine._kernels): CPU twin parity, the custom op, the build.

The module is built on demand from rt_engine/kernels/ with CMake (cached under ~/.cache/rt_engine/kernels or
$RT_ENGINE_KERNEL_CACHE); the first run takes ~20 s on one core. GPU checks are marked ``gpu``.
"""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rt_engine.models import fused_modconv as fm
from rt_engine.models.modconv import modulated_conv2d_ref

REPO = Path(__file__).resolve().parents[1]

# (B, Cin, Cout, H, W): odd sizes, channel counts off the 8 / 32 tiles, 1x1 planes
SHAPES = [
    (3, 20, 40, 13, 9),
    (2, 8, 32, 7, 7),
    (4, 5, 3, 1, 1),
    (1, 33, 17, 16, 16),
    (2, 16, 70, 17, 20),
    (5, 3, 9, 2, 31),
]


def make_inputs(shape, noise_mode="batch", dtype=torch.float32, device="cpu", seed=0):
    """x [B,Cin,H,W], style [B,Cin] (different per sample), weight [Cout,Cin,3,3], noise, bias [Cout]."""
    b, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    style = torch.randn(b, cin, generator=g) * 0.5 + 1.0
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5
    noise = {
        "none": None,
        "broadcast": torch.randn(1, 1, h, w, generator=g),
        "batch": torch.randn(b, 1, h, w, generator=g),
    }[noise_mode]
    bias = torch.randn(cout, generator=g) * 0.1

    def cv(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cv(x), style.to(device), cv(weight), cv(noise), bias.to(device)


def assert_close_rel(out, ref, rel):
    """Max error within rel * max|ref| (elementwise relative error is meaningless near zero)."""
    out, ref = out.float(), ref.float()
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out - ref).abs().max()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.fixture(scope="module")
def native():
    try:
        return fm.load_native()
    except RuntimeError as err:  # not installed and no way to build it here: skip; a failed build fails
        if shutil.which("cmake") is None or shutil.which("c++") is None:
            pytest.skip(f"rt_engine._kernels unavailable: {err}")
        raise


def test_native_not_imported_at_import():
    code = (
        "import sys, rt_engine.models.fused_modconv as f; "
        "assert 'rt_engine._kernels' not in sys.modules; assert f._native_module is None"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noise_mode", ["batch", "broadcast", "none"])
def test_cpu_twin_matches_reference_fp32(native, shape, noise_mode):
    x, s, w, n, b = make_inputs(shape, noise_mode)
    out = fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cpu")
    assert out.shape == (shape[0], shape[2], shape[3], shape[4]) and out.dtype == torch.float32
    assert_close_rel(out, fm.modulated_conv2d_fused_ref(x, s, w, n, 0.3, b, form="static"), 1e-5)
    assert_close_rel(out, fm.modulated_conv2d_fused_ref(x, s, w, n, 0.3, b, form="ref"), 1e-5)


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("activate", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_twin_options(native, demodulate, activate, with_bias):
    x, s, w, n, b = make_inputs((2, 12, 20, 9, 11), "broadcast", seed=1)
    b = b if with_bias else None
    out = fm.modulated_conv2d(x, s, w, n, -0.7, b, demodulate=demodulate, activate=activate, impl="cpu")
    ref = fm.modulated_conv2d_fused_ref(x, s, w, n, -0.7, b, demodulate=demodulate, activate=activate)
    assert_close_rel(out, ref, 1e-5)


def test_cpu_twin_conv_only_equals_grouped_reference(native):
    x, s, w, _, _ = make_inputs((3, 10, 14, 8, 5), "none", seed=2)
    out = fm.modulated_conv2d(x, s, w, None, 0.0, None, activate=False, impl="cpu")
    assert_close_rel(out, modulated_conv2d_ref(x, s, w), 1e-5)


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_cpu_twin_half_storage(native, dtype, rel, shape):
    x, s, w, n, b = make_inputs(shape, "batch", dtype=dtype)
    out = fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cpu")
    assert out.dtype == dtype
    # the maths in fp32 on the same rounded inputs; the only extra error is the final rounding
    ref = fm.modulated_conv2d_fused_ref(x.float(), s, w.float(), n.float(), 0.3, b)
    assert_close_rel(out, ref, rel)


def test_demod_cpu_matches_reference(native):
    from rt_engine.models.modconv import demodulation

    _, s, w, _, _ = make_inputs((3, 37, 11, 1, 1), "none")
    d = torch.empty(3, 11)
    native.demod_cpu(0, s.data_ptr(), w.data_ptr(), d.data_ptr(), 3, 37, 11)
    torch.testing.assert_close(d, demodulation(s, w), rtol=1e-6, atol=0)


def test_bad_arguments_raise():
    x, s, w, n, b = make_inputs((2, 4, 6, 5, 5))
    with pytest.raises(ValueError, match="unknown impl"):
        fm.modulated_conv2d(x, s, w, impl="triton")
    with pytest.raises(ValueError, match="style must be"):
        fm.modulated_conv2d(x, s[:1], w, impl="cpu")
    with pytest.raises(ValueError, match="weight must be"):
        fm.modulated_conv2d(x, s, w[:, :, :1], impl="cpu")
    with pytest.raises(ValueError, match="noise must be"):
        fm.modulated_conv2d(x, s, w, n[:, :, :2], 0.1, impl="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fm.fused_modconv_op(x, s, w, None, 0.0, None, True, True, "cuda")
    with pytest.raises(ValueError, match="unsupported dtype"):
        fm.modulated_conv2d(x.double(), s, w.double(), impl="cpu")


def test_auto_on_cpu_is_reference():
    x, s, w, n, b = make_inputs((2, 4, 6, 5, 5))
    assert fm._resolve_impl("auto", x, w) == "ref"
    ref = fm.modulated_conv2d_fused_ref(x, s, w, n, 0.2, b)
    torch.testing.assert_close(fm.modulated_conv2d(x, s, w, n, 0.2, b), ref)


def test_cuda_without_cuda_module_is_clear_error(monkeypatch):
    class CpuOnly:
        __file__ = "/fake/_kernels.so"

        @staticmethod
        def has_cuda():
            return False

    monkeypatch.setattr(fm, "_native_module", CpuOnly())
    with pytest.raises(RuntimeError, match="built without CUDA"):
        fm._cuda_module()


def test_custom_op_opcheck(native):
    x, s, w, n, b = make_inputs((2, 6, 5, 4, 3), "batch")
    torch.library.opcheck(
        fm.fused_modconv_op, (x, s, w, n, 0.3, b, True, True, "cpu"), test_utils=("test_schema", "test_faketensor")
    )


def test_custom_op_under_torch_compile(native):
    x, s, w, n, b = make_inputs((2, 6, 5, 4, 3), "batch")

    def layer(x, s):
        return fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cpu") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_close_rel(compiled(x, s), layer(x, s), 1e-6)


def test_custom_op_in_torch_export(native):
    x, s, w, n, b = make_inputs((2, 6, 5, 4, 3), "none")

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w)
            self.bias = torch.nn.Parameter(b)

        def forward(self, x, s):
            return fm.modulated_conv2d(x, s, self.weight, None, 0.0, self.bias, impl="cpu")

    ep = torch.export.export(Layer(), (x, s))
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert targets == [torch.ops.rt_engine.fused_modconv.default], targets
    assert_close_rel(ep.module()(x, s), fm.modulated_conv2d_fused_ref(x, s, w, None, 0.0, b), 1e-5)


@pytest.mark.slow
def test_custom_op_under_torch_compile_inductor(native):
    x, s, w, n, b = make_inputs((2, 6, 5, 4, 3), "batch")

    def layer(x, s):
        return torch.relu(fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cpu")) + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    assert_close_rel(compiled(x, s), layer(x, s), 1e-6)


# ----------------------------------------------------------------------------- build
def fatbin_entries(so_path: Path) -> list[tuple[str, int]]:
    """(kind, sm) of every image in the .nv_fatbin section: kind 'elf' (SASS) or 'ptx'."""
    data = so_path.read_bytes()
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]

    def name(off):
        return data[strtab + off : data.index(b"\0", strtab + off)].decode()

    out = []
    for sec in secs:
        if name(sec[0]) != ".nv_fatbin":
            continue
        blob = data[sec[4] : sec[4] + sec[5]]
        pos = 0
        while pos + 16 <= len(blob):
            magic, _, hsz, fsz = struct.unpack_from("<IHHQ", blob, pos)
            if magic != 0xBA55ED50:
                pos += 8
                continue
            e, end = pos + hsz, pos + hsz + fsz
            while e < end:
                kind, _, ehs, psz = struct.unpack_from("<HHIQ", blob, e)
                (arch,) = struct.unpack_from("<I", blob, e + 28)
                out.append(({1: "ptx", 2: "elf"}.get(kind, str(kind)), arch))
                e += ehs + psz
            pos = end
    return out


def find_cuobjdump() -> str | None:
    for cand in (os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if cand and Path(cand).is_file():
            return cand
    return None


def test_module_contains_sm80_sm90(native):
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("nvcc not found: the module is built CPU-only")
    if not native.has_cuda():
        pytest.skip("the loaded rt_engine._kernels was built without CUDA")
    so = Path(native.__file__)
    entries = fatbin_entries(so)
    assert ("elf", 80) in entries and ("elf", 90) in entries, entries
    assert ("ptx", 90) in entries, entries
    tool = find_cuobjdump()
    if tool:  # cross-check with NVIDIA's tool when it is there
        elf = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True, check=True).stdout
        assert "sm_80" in elf and "sm_90" in elf, elf


# ----------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible (torch.cuda.is_available() is False)"
)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noise_mode", ["batch", "broadcast", "none"])
def test_cuda_matches_reference_fp32(native, shape, noise_mode):
    x, s, w, n, b = make_inputs(shape, noise_mode, device="cuda")
    out = fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = fm.modulated_conv2d_fused_ref(x, s, w, n, 0.3, b)
    assert_close_rel(out, ref, 1e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_cuda_half_storage(native, dtype, rel):
    x, s, w, n, b = make_inputs((4, 64, 96, 23, 17), "batch", dtype=dtype, device="cuda")
    out = fm.modulated_conv2d(x, s, w, n, 0.3, b, impl="cuda")
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = fm.modulated_conv2d_fused_ref(x.float(), s, w.float(), n.float(), 0.3, b)
    assert_close_rel(out, ref, rel)


@pytest.mark.gpu
@needs_gpu
def test_cuda_auto_and_speed(native):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rt_bench_kernels", REPO / "benchmarks" / "kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    x, s, w, n, b = make_inputs((8, 256, 256, 32, 32), "broadcast", device="cuda")
    assert fm._resolve_impl("auto", x, w) == "cuda"
    res = bk.benchmark_kernels("cuda")
    assert res["gpu"] and all(r["cuda_tflops"] > 0 for r in res["layers"])
