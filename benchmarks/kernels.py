"""Throughput of the fused modulated-conv kernel vs the PyTorch (cuDNN / oneDNN) static path.

``benchmark_kernels(device)`` times, per generator-like layer (3x3, Cin = Cout):

* ``cuda`` (GPU) or ``cpu`` (no GPU): the native fused op (conv + demod + noise + bias + lrelu);
* ``torch_static``: the static-form conv alone in PyTorch (x*s -> conv2d -> *d), i.e. cuDNN/oneDNN;
* ``torch_fused_ref``: the same full epilogue as the fused op, in eager PyTorch.

TFLOP/s count 2 FLOPs per multiply-add of the 3x3 conv. ``python benchmarks/kernels.py [cuda|cpu]``
prints the dict as JSON.
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `rt_engine` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rt_engine.models import fused_modconv as fm  # noqa: E402
from rt_engine.models.modconv import modulated_conv2d_static  # noqa: E402

# (B, C, H=W): PC-AVS-generator-like 3x3 layers (batch of concurrent sessions)
GPU_LAYERS = [(8, 512, 8), (8, 512, 16), (8, 512, 32), (8, 256, 64), (8, 128, 128), (4, 64, 256)]
CPU_LAYERS = [(2, 64, 14), (1, 128, 28)]  # the C++ twin is a plain loop nest: keep it small


def _time_cuda(fn: Callable[[], object], iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters  # ms


def _time_cpu(fn: Callable[[], object], iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters  # ms


Timer = Callable[[Callable[[], object], int], float]


def _time_layer(
    x: torch.Tensor,
    s: torch.Tensor,
    w: torch.Tensor,
    n: torch.Tensor,
    bias: torch.Tensor,
    impl: str,
    timer: Timer,
    iters: int,
) -> dict[str, float]:
    """ms per call of the native op and the two torch paths on one layer."""
    with torch.inference_mode():
        return {
            impl: timer(lambda: fm.modulated_conv2d(x, s, w, n, 0.1, bias, impl=impl), iters),
            "torch_static": timer(lambda: modulated_conv2d_static(x, s, w), iters),
            "torch_fused_ref": timer(lambda: fm.modulated_conv2d_fused_ref(x, s, w, n, 0.1, bias), iters),
        }


def benchmark_kernels(
    device: str | torch.device = "cuda",
    dtype: torch.dtype | None = None,
    layers: list[tuple[int, int, int]] | None = None,
    iters: int | None = None,
) -> dict:
    """Per-layer ms and TFLOP/s of the native fused op vs torch; on a machine without GPU, the CPU twin."""
    dev = torch.device(device)
    gpu = dev.type == "cuda" and torch.cuda.is_available()
    if not gpu:
        dev = torch.device("cpu")
    dtype = dtype or (torch.float16 if gpu else torch.float32)
    impl = "cuda" if gpu else "cpu"
    layers = layers or (GPU_LAYERS if gpu else CPU_LAYERS)
    iters = iters or (20 if gpu else 2)
    timer = _time_cuda if gpu else _time_cpu
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if gpu else "cpu",
        "gpu": gpu,
        "impl": impl,
        "dtype": str(dtype).removeprefix("torch."),
        "native_module": fm.native_path(),
        "layers": [],
    }
    if not gpu:
        result["note"] = (
            "no CUDA GPU: timing the C++ twin (a correctness twin, not tuned) against "
            "torch/oneDNN on the CPU; the CUDA kernel needs a GPU to be timed"
        )
    g = torch.Generator().manual_seed(0)
    for b, c, hw in layers:
        x = torch.randn(b, c, hw, hw, generator=g).to(dev, dtype)  # [B,C,H,W]
        s = (torch.randn(b, c, generator=g) * 0.5 + 1).to(dev)  # [B,C]
        w = (torch.randn(c, c, 3, 3, generator=g) / (c * 9) ** 0.5).to(dev, dtype)  # [C,C,3,3]
        n = torch.randn(1, 1, hw, hw, generator=g).to(dev, dtype)  # [1,1,H,W]
        bias = torch.zeros(c, device=dev)
        gflop = fm.flops((b, c, hw, hw), c) / 1e9
        ms = _time_layer(x, s, w, n, bias, impl, timer, iters)
        row = {"B": b, "C": c, "H": hw, "W": hw, "gflop": round(gflop, 3)}
        for k, v in ms.items():
            row[f"{k}_ms"] = round(v, 4)
            row[f"{k}_tflops"] = round(gflop / v, 4)  # GFLOP / ms = TFLOP/s
        result["layers"].append(row)
    return result


if __name__ == "__main__":
    print(json.dumps(benchmark_kernels(sys.argv[1] if len(sys.argv) > 1 else "cuda"), indent=2))
