// C interface of the fused modulated 3x3 convolution ("static" form), shared by the CUDA kernel
// (modconv.cu), its CPU twin (modconv_cpu.cpp), the pybind11 binding (binding.cpp) and the CPU
// emulation of the CUDA source (emu/emu_shim.cpp). No CUDA or torch header is needed to use it.
//
// Per sample b, output channel o, pixel p (padding 1, fp32 accumulation):
//   acc      = sum_{i,k} w[o,i,k] * (x[b,i,p+k] * style[b,i])
//   y        = acc * demod[b,o]                       (demod == nullptr: no demodulation)
//   y       += noise_weight * noise[nb,0,p]           (noise == nullptr: no noise; nb = b or 0)
//   y        = activate ? leaky_relu(y + bias[o], 0.2) * sqrt(2) : y + bias[o]
//   demod[b,o] = rsqrt(sum_i style[b,i]^2 * sum_k w[o,i,k]^2 + 1e-8)   (rt_demod_*)
//
// Storage dtype (dtype code): x, w, noise and out. style, demod and bias are always fp32.
// Layouts are contiguous: x [B,Cin,H,W], w [Cout,Cin,3,3], noise [1 or B,1,H,W],
// out [B,Cout,H,W], style [B,Cin], demod [B,Cout], bias [Cout].
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

enum rt_dtype { RT_FP32 = 0, RT_FP16 = 1, RT_BF16 = 2 };

enum rt_modconv_flags { RT_MODCONV_ACTIVATE = 1 };

#define RT_DEMOD_EPS 1e-8f
#define RT_LRELU_SLOPE 0.2f
#define RT_LRELU_GAIN 1.4142135623730951f

// CPU twin. Returns 0 on success, a negative value on bad arguments.
int rt_modconv3x3_cpu(int dtype, const void* x, const float* style, const void* w, const float* demod,
                      const void* noise, int noise_batched, float noise_weight, const float* bias,
                      void* out, int B, int Cin, int Cout, int H, int W, int flags, int n_threads);
int rt_demod_cpu(int dtype, const float* style, const void* w, float* demod, int B, int Cin, int Cout);

// CUDA kernels (modconv.cu): asynchronous on `stream` (a cudaStream_t); pointers are device
// pointers. Returns a cudaError_t value (0 = success); rt_cuda_error_string() explains it.
int rt_modconv3x3_cuda(int dtype, const void* x, const float* style, const void* w, const float* demod,
                       const void* noise, int noise_batched, float noise_weight, const float* bias,
                       void* out, int B, int Cin, int Cout, int H, int W, int flags, void* stream);
int rt_demod_cuda(int dtype, const float* style, const void* w, float* demod, int B, int Cin, int Cout,
                  void* stream);
const char* rt_cuda_error_string(int err);
int rt_cuda_device_count(void);

#ifdef __cplusplus
}
#endif
