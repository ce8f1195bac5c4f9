// pybind11 module rt_engine._kernels: thin, torch-free wrappers over modconv.h. Tensors travel as
// raw addresses (tensor.data_ptr()) plus shapes and a dtype code; rt_engine/models/fused_modconv.py
// checks device, dtype, shape and contiguity before it calls in. The GIL is released while the
// CPU twin computes and while CUDA launches are queued.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "modconv.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(std::uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

void check_dims(int dtype, int B, int Cin, int Cout, int H, int W, std::uintptr_t x, std::uintptr_t style,
                std::uintptr_t w, std::uintptr_t out) {
  if (dtype != RT_FP32 && dtype != RT_FP16 && dtype != RT_BF16)
    throw py::value_error("dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  if (B <= 0 || Cin <= 0 || Cout <= 0 || H <= 0 || W <= 0) throw py::value_error("all dimensions must be positive");
  if (!x || !style || !w || !out) throw py::value_error("x, style, weight and out must be non-null addresses");
}

#ifdef RT_ENGINE_WITH_CUDA
void check_cuda(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + " failed: " + rt_cuda_error_string(err));
}
#endif

#ifndef RT_ENGINE_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "rt_engine._kernels was built without CUDA (nvcc was not found at build time); rebuild with the CUDA "
      "toolkit to use impl='cuda'");
}
#endif

}  // namespace

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "Native kernels of rt_engine (fused modulated convolution); see rt_engine/kernels/README.md";
  m.attr("DTYPE_FP32") = static_cast<int>(RT_FP32);
  m.attr("DTYPE_FP16") = static_cast<int>(RT_FP16);
  m.attr("DTYPE_BF16") = static_cast<int>(RT_BF16);
#ifdef RT_ENGINE_CUDA_ARCHS
  m.attr("CUDA_ARCHS") = std::string(RT_ENGINE_CUDA_ARCHS);
#else
  m.attr("CUDA_ARCHS") = std::string();
#endif

  m.def(
      "has_cuda",
      []() {
#ifdef RT_ENGINE_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels are compiled into this module.");

  m.def(
      "cuda_device_count",
      []() {
#ifdef RT_ENGINE_WITH_CUDA
        return rt_cuda_device_count();
#else
        return 0;
#endif
      },
      "Number of CUDA devices the module's runtime sees (0 without CUDA or driver).");

  m.def(
      "demod_cpu",
      [](int dtype, std::uintptr_t style, std::uintptr_t w, std::uintptr_t demod, int B, int Cin, int Cout) {
        check_dims(dtype, B, Cin, Cout, 1, 1, 1, style, w, demod);
        int rc;
        {
          py::gil_scoped_release release;
          rc = rt_demod_cpu(dtype, ptr<const float>(style), ptr<const void>(w), ptr<float>(demod), B, Cin, Cout);
        }
        if (rc != 0) throw py::value_error("rt_demod_cpu: invalid arguments");
      },
      py::arg("dtype"), py::arg("style"), py::arg("weight"), py::arg("demod"), py::arg("B"), py::arg("Cin"),
      py::arg("Cout"), "demod[B,Cout] (fp32) = rsqrt(style^2 @ sum_k weight^2 + 1e-8).");

  m.def(
      "modconv_cpu",
      [](int dtype, std::uintptr_t x, std::uintptr_t style, std::uintptr_t w, std::uintptr_t demod,
         std::uintptr_t noise, bool noise_batched, float noise_weight, std::uintptr_t bias, std::uintptr_t out, int B,
         int Cin, int Cout, int H, int W, bool activate, int n_threads) {
        check_dims(dtype, B, Cin, Cout, H, W, x, style, w, out);
        int rc;
        {
          py::gil_scoped_release release;
          rc = rt_modconv3x3_cpu(dtype, ptr<const void>(x), ptr<const float>(style), ptr<const void>(w),
                                 ptr<const float>(demod), ptr<const void>(noise), noise_batched ? 1 : 0,
                                 noise_weight, ptr<const float>(bias), ptr<void>(out), B, Cin, Cout, H, W,
                                 activate ? RT_MODCONV_ACTIVATE : 0, n_threads);
        }
        if (rc != 0) throw py::value_error("rt_modconv3x3_cpu: invalid arguments");
      },
      py::arg("dtype"), py::arg("x"), py::arg("style"), py::arg("weight"), py::arg("demod"), py::arg("noise"),
      py::arg("noise_batched"), py::arg("noise_weight"), py::arg("bias"), py::arg("out"), py::arg("B"),
      py::arg("Cin"), py::arg("Cout"), py::arg("H"), py::arg("W"), py::arg("activate"), py::arg("n_threads") = 1,
      "Fused modulated 3x3 conv on the CPU (addresses of contiguous host buffers; 0 = absent).");

  m.def(
      "demod_cuda",
      [](int dtype, std::uintptr_t style, std::uintptr_t w, std::uintptr_t demod, int B, int Cin, int Cout,
         std::uintptr_t stream) {
        check_dims(dtype, B, Cin, Cout, 1, 1, 1, style, w, demod);
#ifdef RT_ENGINE_WITH_CUDA
        int rc;
        {
          py::gil_scoped_release release;
          rc = rt_demod_cuda(dtype, ptr<const float>(style), ptr<const void>(w), ptr<float>(demod), B, Cin, Cout,
                             ptr<void>(stream));
        }
        check_cuda(rc, "demod_cuda");
#else
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("dtype"), py::arg("style"), py::arg("weight"), py::arg("demod"), py::arg("B"), py::arg("Cin"),
      py::arg("Cout"), py::arg("stream"), "CUDA demodulation factors, queued on `stream` (a cudaStream_t).");

  m.def(
      "modconv_cuda",
      [](int dtype, std::uintptr_t x, std::uintptr_t style, std::uintptr_t w, std::uintptr_t demod,
         std::uintptr_t noise, bool noise_batched, float noise_weight, std::uintptr_t bias, std::uintptr_t out, int B,
         int Cin, int Cout, int H, int W, bool activate, std::uintptr_t stream) {
        check_dims(dtype, B, Cin, Cout, H, W, x, style, w, out);
#ifdef RT_ENGINE_WITH_CUDA
        int rc;
        {
          py::gil_scoped_release release;
          rc = rt_modconv3x3_cuda(dtype, ptr<const void>(x), ptr<const float>(style), ptr<const void>(w),
                                  ptr<const float>(demod), ptr<const void>(noise), noise_batched ? 1 : 0,
                                  noise_weight, ptr<const float>(bias), ptr<void>(out), B, Cin, Cout, H, W,
                                  activate ? RT_MODCONV_ACTIVATE : 0, ptr<void>(stream));
        }
        check_cuda(rc, "modconv_cuda");
#else
        (void)noise;
        (void)noise_batched;
        (void)noise_weight;
        (void)bias;
        (void)demod;
        (void)activate;
        (void)stream;
        no_cuda();
#endif
      },
      py::arg("dtype"), py::arg("x"), py::arg("style"), py::arg("weight"), py::arg("demod"), py::arg("noise"),
      py::arg("noise_batched"), py::arg("noise_weight"), py::arg("bias"), py::arg("out"), py::arg("B"),
      py::arg("Cin"), py::arg("Cout"), py::arg("H"), py::arg("W"), py::arg("activate"), py::arg("stream"),
      "Fused modulated 3x3 conv on the GPU, queued on `stream` (device addresses; 0 = absent).");
}
