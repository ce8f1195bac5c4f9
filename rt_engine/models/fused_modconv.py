"""Fused modulated 3x3 convolution (static form) with a native CPU twin and a CUDA kernel.

One call computes, for a batch of samples that each have their own style but share one weight::

    y = conv2d(x * s, w, padding=1) * d          # d = rsqrt(s^2 @ W2 + 1e-8), fp32 (demodulate)
    y = y + noise_weight * noise                  # noise [1 or B,1,H,W] (optional)
    y = leaky_relu(y + bias, 0.2) * sqrt(2)       # activate=True; else y + bias

``impl`` picks the implementation (the pattern of stylegan3's ``torch_utils/ops``):

* ``"ref"``: pure PyTorch (:mod:`rt_engine.models.modconv`), exportable and differentiable;
* ``"cpu"``: the C++ twin of the CUDA kernel (rt_engine/kernels/modconv_cpu.cpp), a correctness twin;
* ``"cuda"``: the fused CUDA kernel (rt_engine/kernels/modconv.cu);
* ``"auto"``: ``"cuda"`` for CUDA tensors when the kernel is available, else ``"ref"``.

The native paths run through the custom op ``torch.ops.rt_engine.fused_modconv`` (with a fake
implementation, so torch.compile / torch.export trace it without running it). They are
inference-only: no autograd formula is registered. The native module ``rt_engine._kernels`` is
imported lazily on the first native call, never at import: an installed one is used when present,
otherwise it is built with CMake from the sources that ship inside the package
(``rt_engine/kernels/``) into ``~/.cache/rt_engine/kernels/<hash>`` (``RT_ENGINE_KERNEL_CACHE``
overrides the folder; a lock file serialises concurrent builds; ``RT_ENGINE_KERNELS_CUDA=0``
leaves the CUDA part out of that build; ``RT_ENGINE_CUDA_ARCHS``, e.g. ``90``, sets
``CMAKE_CUDA_ARCHITECTURES``). The build needs CMake, a C++ compiler and pybind11, not a particular
torch: the binding takes raw addresses, so any torch >= 2.4 (``torch.library.custom_op``) with or
without CUDA works, including a preinstalled CUDA build.
"""

import fcntl
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rt_engine.models.modconv import fused_leaky_relu, modulated_conv2d_ref, modulated_conv2d_static

log = logging.getLogger(__name__)

IMPLS = ("ref", "cpu", "cuda", "auto")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# package data, found through the package (installed wheel or checkout alike), never the repository root
KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels"
_SOURCES = ("CMakeLists.txt", "binding.cpp", "modconv_cpu.cpp", "modconv.cu", "modconv.h", "half_convert.h")

_native_lock = threading.Lock()
_native_module: ModuleType | None = None


# ----------------------------------------------------------------------------- reference
def modulated_conv2d_fused_ref(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    noise: Tensor | None = None,
    noise_weight: float | Tensor = 0.0,
    bias: Tensor | None = None,
    demodulate: bool = True,
    activate: bool = True,
    form: str = "static",
) -> Tensor:
    """Pure-PyTorch reference of the fused op. ``form`` is ``"static"`` or ``"ref"`` (grouped conv).

    x: [B,Cin,H,W]; style: [B,Cin]; weight: [Cout,Cin,3,3] (scaled); noise: [1 or B,1,H,W];
    bias: [Cout] -> [B,Cout,H,W]
    """
    conv = modulated_conv2d_static if form == "static" else modulated_conv2d_ref
    y = conv(x, style, weight, demodulate=demodulate, upsample=False)  # [B,Cout,H,W]
    if noise is not None:
        y = y + noise_weight * noise.to(y.dtype)
    if activate:
        b = bias if bias is not None else y.new_zeros(y.shape[1])
        return fused_leaky_relu(y, b)
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1).to(y.dtype)
    return y


# ----------------------------------------------------------------------------- native module
def _source_hash() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode())
        h.update((KERNEL_DIR / rel).read_bytes())
    h.update(sys.version.encode())
    h.update(os.environ.get("RT_ENGINE_KERNELS_CUDA", "1").encode())
    h.update(os.environ.get("RT_ENGINE_CUDA_ARCHS", "").encode())
    return h.hexdigest()[:16]


def kernel_cache_dir() -> Path:
    """Folder of the on-demand native builds."""
    env = os.environ.get("RT_ENGINE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rt_engine" / "kernels"


def build_native(verbose: bool = False) -> Path:
    """Build rt_engine._kernels from ``rt_engine/kernels/`` with CMake (once per source hash); return the .so path."""
    missing = [rel for rel in _SOURCES if not (KERNEL_DIR / rel).is_file()]
    if missing:
        raise RuntimeError(f"rt_engine._kernels is not installed and its sources are missing: {missing}")
    if shutil.which("cmake") is None:
        raise RuntimeError("rt_engine._kernels is not installed and cmake is not on PATH to build it")
    out_dir = kernel_cache_dir() / _source_hash()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = out_dir / f"_kernels{suffix}"
    if target.is_file():
        return target
    if importlib.util.find_spec("pybind11") is None:
        raise RuntimeError(
            "rt_engine._kernels is not installed and pybind11 is missing to build it (pip install 'pybind11>=2.13')"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same sources
        try:
            if target.is_file():
                return target
            build_dir = out_dir / "build"
            cfg = [
                "cmake",
                "-S",
                str(KERNEL_DIR),
                "-B",
                str(build_dir),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}",
                "-DRT_ENGINE_BUILD_KERNELS=ON",
            ]
            if os.environ.get("RT_ENGINE_KERNELS_CUDA", "1") == "0":
                cfg.append("-DRT_ENGINE_WITH_CUDA=OFF")
            if os.environ.get("RT_ENGINE_CUDA_ARCHS"):
                cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['RT_ENGINE_CUDA_ARCHS']}")
            if shutil.which("ninja"):
                cfg += ["-G", "Ninja"]
            jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "1")
            t0 = time.perf_counter()
            log.info("building rt_engine._kernels in %s", out_dir)
            for cmd in (cfg, ["cmake", "--build", str(build_dir), "-j", jobs]):
                res = subprocess.run(cmd, capture_output=True, text=True)
                if verbose or res.returncode != 0:
                    log.log(
                        logging.ERROR if res.returncode else logging.INFO,
                        "%s\n%s%s",
                        " ".join(cmd),
                        res.stdout[-4000:],
                        res.stderr[-4000:],
                    )
                if res.returncode != 0:
                    raise RuntimeError(
                        f"building rt_engine._kernels failed ({' '.join(cmd[:2])}): "
                        f"{(res.stderr or res.stdout)[-2000:]}"
                    )
            built = sorted(build_dir.glob("_kernels*" + suffix))
            if not built:
                raise RuntimeError(f"building rt_engine._kernels produced no _kernels{suffix} in {build_dir}")
            tmp = out_dir / f".tmp{os.getpid()}{suffix}"
            shutil.copy2(built[0], tmp)
            os.replace(tmp, target)
            log.info("built rt_engine._kernels in %.1f s", time.perf_counter() - t0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _load_from(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("rt_engine._kernels", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load native module from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["rt_engine._kernels"] = mod
    return mod


def load_native() -> ModuleType:
    """The native module rt_engine._kernels: installed, or built on demand (cached)."""
    global _native_module
    with _native_lock:
        if _native_module is None:
            try:
                _native_module = importlib.import_module("rt_engine._kernels")
                log.debug("using installed rt_engine._kernels")
            except ImportError:
                _native_module = _load_from(build_native())
        return _native_module


def native_path() -> str:
    """File the native module was loaded from (loads it)."""
    return str(getattr(load_native(), "__file__", "?"))


def cuda_kernels_available() -> bool:
    """True when a GPU is visible and the native module carries the CUDA kernels (may build it)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(load_native().has_cuda())
    except RuntimeError as err:
        log.warning("native kernels unavailable: %s", err)
        return False


def _cuda_module() -> ModuleType:
    mod = load_native()
    if not mod.has_cuda():
        raise RuntimeError(
            f"impl='cuda' on a CUDA tensor, but rt_engine._kernels ({native_path()}) "
            "was built without CUDA (nvcc not found at build time); rebuild it with the "
            "CUDA toolkit or use impl='ref'"
        )
    return mod


# ----------------------------------------------------------------------------- checks
def _check_args(x: Tensor, style: Tensor, weight: Tensor, noise: Tensor | None, bias: Tensor | None) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be [B,Cin,H,W], got {tuple(x.shape)}")
    b, cin, h, w = x.shape
    if weight.ndim != 4 or weight.shape[1] != cin or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [Cout,{cin},3,3], got {tuple(weight.shape)}")
    if tuple(style.shape) != (b, cin):
        raise ValueError(f"style must be [{b},{cin}], got {tuple(style.shape)}")
    if noise is not None and (noise.ndim != 4 or noise.shape[0] not in (1, b) or tuple(noise.shape[1:]) != (1, h, w)):
        raise ValueError(f"noise must be [1 or {b},1,{h},{w}], got {tuple(noise.shape)}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias must have {weight.shape[0]} elements, got {tuple(bias.shape)}")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"unsupported dtype {x.dtype}; native kernels take float32, float16, bfloat16")
    for name, t in (("style", style), ("weight", weight), ("noise", noise), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def _resolve_impl(impl: str, x: Tensor, weight: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose from {IMPLS}")
    if impl != "auto":
        return impl
    if x.is_cuda and x.dtype in _DTYPE_CODES and weight.ndim == 4 and tuple(weight.shape[2:]) == (3, 3):
        return "cuda" if cuda_kernels_available() else "ref"
    return "ref"


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("rt_engine::fused_modconv", mutates_args=())
def fused_modconv_op(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    noise: Tensor | None,
    noise_weight: float,
    bias: Tensor | None,
    demodulate: bool,
    activate: bool,
    impl: str,
) -> Tensor:
    """Native fused modulated 3x3 conv; impl is "cpu" or "cuda". Shapes as in :func:`modulated_conv2d`."""
    _check_args(x, style, weight, noise, bias)
    if impl == "cuda" and not x.is_cuda:
        raise ValueError(f"impl='cuda' needs CUDA tensors, x is on {x.device}")
    if impl == "cpu" and x.device.type != "cpu":
        raise ValueError(f"impl='cpu' needs CPU tensors, x is on {x.device}")
    if impl not in ("cpu", "cuda"):
        raise ValueError(f"fused_modconv_op runs impl 'cpu' or 'cuda', got {impl!r}")
    mod = _cuda_module() if impl == "cuda" else load_native()

    b, cin, h, w = x.shape
    cout = weight.shape[0]
    code = _DTYPE_CODES[x.dtype]
    xc = x.contiguous()  # [B,Cin,H,W]
    wc = weight.to(x.dtype).contiguous()  # [Cout,Cin,3,3]
    sc = style.float().contiguous()  # [B,Cin] fp32
    bc = bias.float().reshape(-1).contiguous() if bias is not None else None  # [Cout] fp32
    nc = noise.to(x.dtype).contiguous() if noise is not None else None  # [1 or B,1,H,W]
    out = torch.empty((b, cout, h, w), dtype=x.dtype, device=x.device)  # [B,Cout,H,W]
    d = torch.empty((b, cout), dtype=torch.float32, device=x.device) if demodulate else None  # [B,Cout]

    def addr(t: Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    args = dict(
        dtype=code,
        x=addr(xc),
        style=addr(sc),
        weight=addr(wc),
        demod=addr(d),
        noise=addr(nc),
        noise_batched=nc is not None and nc.shape[0] == b and b > 1,
        noise_weight=float(noise_weight),
        bias=addr(bc),
        out=addr(out),
        B=b,
        Cin=cin,
        Cout=cout,
        H=h,
        W=w,
        activate=activate,
    )
    if impl == "cpu":
        if d is not None:
            mod.demod_cpu(code, addr(sc), addr(wc), addr(d), b, cin, cout)
        mod.modconv_cpu(**args, n_threads=torch.get_num_threads())
    else:
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            if d is not None:
                mod.demod_cuda(code, addr(sc), addr(wc), addr(d), b, cin, cout, stream)
            mod.modconv_cuda(**args, stream=stream)
    return out


@fused_modconv_op.register_fake
def _fused_modconv_fake(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    noise: Tensor | None,
    noise_weight: float,
    bias: Tensor | None,
    demodulate: bool,
    activate: bool,
    impl: str,
) -> Tensor:
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))  # [B,Cout,H,W]


# ----------------------------------------------------------------------------- public entry point
def modulated_conv2d(
    x: Tensor,
    style: Tensor,
    weight: Tensor,
    noise: Tensor | None = None,
    noise_weight: float | Tensor = 0.0,
    bias: Tensor | None = None,
    demodulate: bool = True,
    activate: bool = True,
    impl: str = "auto",
) -> Tensor:
    """Modulated 3x3 conv + demodulation + noise + bias + scaled leaky ReLU, fused.

    x: [B,Cin,H,W]; style: [B,Cin] (modulation output, one per sample); weight: [Cout,Cin,3,3]
    with the equalized-lr scale applied, shared by all samples; noise: [1 or B,1,H,W] or None;
    noise_weight: scalar; bias: [Cout] (or [1,Cout,1,1]) or None (zero). Returns [B,Cout,H,W] in
    x.dtype (fp32 accumulation and fp32 demodulation on every path).
    """
    impl = _resolve_impl(impl, x, weight)
    if impl == "ref":
        return modulated_conv2d_fused_ref(x, style, weight, noise, noise_weight, bias, demodulate, activate)
    if impl == "cuda" and x.is_cuda:
        _cuda_module()  # clear error before the op if the module has no CUDA kernels
    nw = float(noise_weight) if noise is not None else 0.0
    return fused_modconv_op(x, style, weight, noise, nw, bias, demodulate, activate, impl)


def flops(x_shape: tuple[int, ...], cout: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the 3x3 conv on x [B,Cin,H,W] -> [B,Cout,H,W]."""
    b, cin, h, w = x_shape
    return 2 * b * cout * cin * 9 * h * w
