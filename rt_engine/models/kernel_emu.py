"""The CUDA kernel source (rt_engine/kernels/modconv.cu) compiled for the CPU against emu/cuda_emu.h.

g++ builds ``rt_engine/kernels/emu/emu_shim.cpp`` (which includes the unmodified ``modconv.cu``) into a shared
library, cached per source hash next to the native module builds; :class:`Emu` calls the same
launchers the CUDA build exports (``rt_demod_cuda``, ``rt_modconv3x3_cuda``) through ctypes on host
tensors. Used by tests/test_kernels_emu.py and by ``benchmarks/gpu_check.py --dry-run``; details of
the emulator in rt_engine/kernels/README.md.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import shutil
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from rt_engine.models import fused_modconv as fm

KERNEL_DIR = fm.KERNEL_DIR  # the kernel sources ship inside the package
EMU_SOURCES = ("modconv.cu", "modconv.h", "half_convert.h", "emu/cuda_emu.h", "emu/emu_shim.cpp")
_P = ctypes.c_void_p


def cxx() -> str | None:
    """The C++ compiler the emulator is built with (None when there is none)."""
    return shutil.which("g++") or shutil.which("c++")


def compile_emu(src_dir: Path, out: Path) -> None:
    """Compile ``src_dir/emu/emu_shim.cpp`` into the shared library ``out``; RuntimeError on failure."""
    compiler = cxx()
    if compiler is None:
        raise RuntimeError("a C++ compiler (g++) is needed to build the CUDA emulator")
    cmd = [
        compiler,
        "-O2",
        "-std=c++17",
        "-fPIC",
        "-shared",
        "-pthread",
        "-Wall",
        "-Wno-unknown-pragmas",
        str(src_dir / "emu" / "emu_shim.cpp"),
        "-o",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed: {res.stderr[-3000:]}")


def build_emu(src_dir: Path = KERNEL_DIR) -> Path:
    """Compile the emulator once per source hash (under a lock) and return the library path."""
    h = hashlib.sha256(b"".join((src_dir / f).read_bytes() for f in EMU_SOURCES)).hexdigest()[:16]
    cache = fm.kernel_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"modconv_emu_{h}.so"
    with open(cache / "emu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            tmp = target.with_suffix(".tmp.so")
            compile_emu(src_dir, tmp)
            tmp.replace(target)
    return target


class Emu:
    """ctypes view of one emulator library."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i32 = ctypes.c_int
        lib.rt_emu_configure.argtypes = [i32, ctypes.c_uint, i32, i32, i32]
        lib.rt_emu_error_count.restype = ctypes.c_longlong
        lib.rt_emu_messages.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.rt_modconv3x3_cuda.argtypes = [i32, _P, _P, _P, _P, _P, i32, ctypes.c_float, _P, _P] + [i32] * 6 + [_P]
        lib.rt_demod_cuda.argtypes = [i32, _P, _P, _P, i32, i32, i32, _P]
        self.lib = lib

    def configure(
        self,
        os_threads: int = 1,
        seed: int = 1,
        race_check: bool = True,
        shuffle: bool = True,
        drop_sync_line: int = -1,
    ) -> None:
        """Reset the error log; set OS threads, the fiber-order seed, the race detector and a barrier to drop."""
        self.lib.rt_emu_reset()
        self.lib.rt_emu_configure(os_threads, seed, int(race_check), int(shuffle), drop_sync_line)

    def messages(self) -> str:
        buf = ctypes.create_string_buffer(1 << 14)
        self.lib.rt_emu_messages(buf, len(buf))
        return buf.value.decode()

    def error_count(self) -> int:
        return int(self.lib.rt_emu_error_count())

    def run(
        self,
        x: Tensor,
        style: Tensor,
        weight: Tensor,
        noise: Tensor | None = None,
        noise_weight: float = 0.0,
        bias: Tensor | None = None,
        demodulate: bool = True,
        activate: bool = True,
    ) -> tuple[Tensor, int, int]:
        """The launchers of modconv.cu on host tensors -> (out [B,Cout,H,W], rc_demod, rc_conv).

        x: [B,Cin,H,W] (fp32/fp16/bf16); style: [B,Cin]; weight: [Cout,Cin,3,3] in x.dtype;
        noise: [1 or B,1,H,W] in x.dtype; bias: [Cout] fp32.
        """
        b, cin, h, w = x.shape
        cout = weight.shape[0]
        code = fm._DTYPE_CODES[x.dtype]
        x, weight = x.contiguous(), weight.contiguous()
        style = style.float().contiguous()
        bias = None if bias is None else bias.float().reshape(-1).contiguous()
        noise = None if noise is None else noise.contiguous()
        out = torch.empty(b, cout, h, w, dtype=x.dtype)
        d = torch.empty(b, cout) if demodulate else None
        rc_d = (
            self.lib.rt_demod_cuda(code, style.data_ptr(), weight.data_ptr(), d.data_ptr(), b, cin, cout, None)
            if d is not None
            else 0
        )
        batched = int(noise is not None and noise.shape[0] == b and b > 1)
        rc = self.lib.rt_modconv3x3_cuda(
            code,
            x.data_ptr(),
            style.data_ptr(),
            weight.data_ptr(),
            None if d is None else d.data_ptr(),
            None if noise is None else noise.data_ptr(),
            batched,
            noise_weight,
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            b,
            cin,
            cout,
            h,
            w,
            int(activate),
            None,
        )
        return out, rc_d, rc
