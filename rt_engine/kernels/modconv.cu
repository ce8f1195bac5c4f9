// Fused modulated 3x3 convolution (static form) for a batch of samples with different styles over
// one shared weight, plus the demodulation-factor kernel. See rt_engine/kernels/README.md for the design.
//
// The same source compiles
//   * with nvcc into the CUDA part of rt_engine._kernels (RT_ENGINE_WITH_CUDA), and
//   * with g++ -DRT_EMU against emu/cuda_emu.h, which runs every CUDA thread as a fiber on the CPU
//     (tests/test_kernels_emu.py: parity with the PyTorch reference and the barrier race detector).
// Keep it to the subset the emulator maps: __global__/__device__/__shared__, threadIdx/blockIdx/
// blockDim/gridDim, __syncthreads, __shfl_xor_sync, __half/__nv_bfloat16 conversions, the
// RT_LAUNCH macro below instead of <<<>>>, and __shared__ arrays declared as rt_smem_array<T, N>.

#ifdef RT_EMU
#include "emu/cuda_emu.h"
#define RT_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::rt_emu::launch((grid), (block), [=]() { kernel(__VA_ARGS__); }))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)

// Plain __shared__ storage on the GPU; the emulator substitutes an instrumented array.
template <class T, int N>
struct rt_smem_array {
  T v[N];
  __device__ __forceinline__ T& operator[](int i) { return v[i]; }
};
#endif

#include "modconv.h"

namespace rt_modconv {

// Block tile: TH x TW output pixels x TCO output channels; the reduction (Cin x 9) is walked in
// chunks of CK input channels. 256 threads, each owning a PX-pixel (one row) x PC-channel
// micro-tile of fp32 accumulators (implicit GEMM: M = pixels, N = Cout, K = Cin*9).
constexpr int TH = 8;
constexpr int TW = 16;
constexpr int TCO = 32;
constexpr int CK = 8;
constexpr int NT = 256;
constexpr int PX = 4;
constexpr int PC = 4;
constexpr int IH = TH + 2;  // input tile with the 1-pixel halo of the 3x3 window
constexpr int IW = TW + 2;
static_assert((TH * TW / PX) * (TCO / PC) == NT, "micro-tiles must cover the block tile");
static_assert(TW % PX == 0, "a micro-tile lies in one row");

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }

// grid: (spatial tiles, B, ceil(Cout / TCO)); block: NT threads.
template <class T>
__global__ void __launch_bounds__(NT)
modconv3x3_kernel(const T* __restrict__ x, const float* __restrict__ style, const T* __restrict__ w,
                  const float* __restrict__ demod, const T* __restrict__ noise, int noise_batched,
                  float noise_weight, const float* __restrict__ bias, T* __restrict__ out, int Cin, int Cout,
                  int H, int W, int tiles_x, int flags) {
  __shared__ rt_smem_array<float, CK * IH * IW> s_in;  // style-scaled input chunk [CK][IH][IW]
  __shared__ rt_smem_array<float, CK * 9 * TCO> s_w;   // weight chunk [CK][9][TCO]

  const int tid = threadIdx.x;
  const int ty0 = (blockIdx.x / tiles_x) * TH;
  const int tx0 = (blockIdx.x % tiles_x) * TW;
  const int b = blockIdx.y;
  const int co0 = blockIdx.z * TCO;

  const int pg = tid % (TH * TW / PX);  // pixel group: lanes of a warp share the channel group
  const int cg = tid / (TH * TW / PX);
  const int prow = pg / (TW / PX);
  const int pcol = (pg % (TW / PX)) * PX;
  const int oc = cg * PC;

  float acc[PC][PX];
#pragma unroll
  for (int q = 0; q < PC; ++q)
#pragma unroll
    for (int j = 0; j < PX; ++j) acc[q][j] = 0.f;

  const T* xb = x + (long long)b * Cin * H * W;
  const float* sb = style + (long long)b * Cin;

  for (int c0 = 0; c0 < Cin; c0 += CK) {
    // (a) input chunk -> shared, scaled by this sample's style on the way (zero halo / channel pad)
    for (int e = tid; e < CK * IH * IW; e += NT) {
      const int ci = e / (IH * IW);
      const int r = e - ci * (IH * IW);
      const int iy = r / IW;
      const int ix = r - iy * IW;
      const int c = c0 + ci;
      const int gy = ty0 + iy - 1;
      const int gx = tx0 + ix - 1;
      float v = 0.f;
      if (c < Cin && gy >= 0 && gy < H && gx >= 0 && gx < W) v = ld(xb, ((long long)c * H + gy) * W + gx) * sb[c];
      s_in[e] = v;
    }
    // weight chunk -> shared, read along (ci, k) for contiguous global loads, stored [ci][k][co]
    for (int e = tid; e < CK * 9 * TCO; e += NT) {
      const int co = e / (CK * 9);
      const int r = e - co * (CK * 9);
      const int ci = r / 9;
      const int k = r - ci * 9;
      const int o = co0 + co;
      const int c = c0 + ci;
      float v = 0.f;
      if (o < Cout && c < Cin) v = ld(w, ((long long)o * Cin + c) * 9 + k);
      s_w[(ci * 9 + k) * TCO + co] = v;
    }
    __syncthreads();

    // (b) implicit GEMM over the chunk: K = CK * 9, outer products of PC weights x PX pixels
    for (int ci = 0; ci < CK; ++ci) {
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
        for (int kx = 0; kx < 3; ++kx) {
          float a[PX];
          float wv[PC];
#pragma unroll
          for (int j = 0; j < PX; ++j) a[j] = s_in[(ci * IH + prow + ky) * IW + pcol + j + kx];
#pragma unroll
          for (int q = 0; q < PC; ++q) wv[q] = s_w[(ci * 9 + ky * 3 + kx) * TCO + oc + q];
#pragma unroll
          for (int q = 0; q < PC; ++q)
#pragma unroll
            for (int j = 0; j < PX; ++j) acc[q][j] = fmaf(wv[q], a[j], acc[q][j]);
        }
      }
    }
    __syncthreads();
  }

  // (c) epilogue in fp32: demodulation, noise, bias, scaled leaky ReLU; one rounding to T at the store
  const int y = ty0 + prow;
  if (y >= H) return;
  const T* nb = noise ? noise + (noise_batched ? (long long)b * H * W : 0) : nullptr;
#pragma unroll
  for (int q = 0; q < PC; ++q) {
    const int o = co0 + oc + q;
    if (o >= Cout) continue;
    const float d = demod ? demod[(long long)b * Cout + o] : 1.f;
    const float bo = bias ? bias[o] : 0.f;
    T* ob = out + (((long long)b * Cout + o) * H + y) * W;
#pragma unroll
    for (int j = 0; j < PX; ++j) {
      const int xx = tx0 + pcol + j;
      if (xx >= W) continue;
      float v = acc[q][j] * d;
      if (nb) v = fmaf(noise_weight, ld(nb, (long long)y * W + xx), v);
      v += bo;
      if (flags & RT_MODCONV_ACTIVATE) v = (v > 0.f ? v : v * RT_LRELU_SLOPE) * RT_LRELU_GAIN;
      st(ob, xx, v);
    }
  }
}

// d[b,o] = rsqrt(sum_i style[b,i]^2 * sum_k w[o,i,k]^2 + eps) in fp32: one warp per (b, o), lanes
// stride over Cin, butterfly reduction with warp shuffles. blockDim.x is a multiple of 32.
template <class T>
__global__ void demod_kernel(const float* __restrict__ style, const T* __restrict__ w, float* __restrict__ d,
                             int B, int Cin, int Cout) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= B * Cout) return;  // whole warps leave together
  const int b = warp / Cout;
  const int o = warp - b * Cout;
  float sum = 0.f;
  for (int i = lane; i < Cin; i += 32) {
    const float s = style[(long long)b * Cin + i];
    float w2 = 0.f;
    for (int k = 0; k < 9; ++k) {
      const float wk = ld(w, ((long long)o * Cin + i) * 9 + k);
      w2 = fmaf(wk, wk, w2);
    }
    sum = fmaf(s * s, w2, sum);
  }
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) d[warp] = rsqrtf(sum + RT_DEMOD_EPS);
}

template <class T>
int launch_modconv(const void* x, const float* style, const void* w, const float* demod, const void* noise,
                   int noise_batched, float noise_weight, const float* bias, void* out, int B, int Cin, int Cout,
                   int H, int W, int flags, cudaStream_t stream) {
  const int tiles_x = (W + TW - 1) / TW;
  const int tiles_y = (H + TH - 1) / TH;
  const dim3 grid(tiles_x * tiles_y, B, (Cout + TCO - 1) / TCO);
  const dim3 block(NT);
  RT_LAUNCH(modconv3x3_kernel<T>, grid, block, stream, static_cast<const T*>(x), style, static_cast<const T*>(w),
            demod, static_cast<const T*>(noise), noise_batched, noise_weight, bias, static_cast<T*>(out), Cin,
            Cout, H, W, tiles_x, flags);
  return static_cast<int>(cudaGetLastError());
}

template <class T>
int launch_demod(const float* style, const void* w, float* d, int B, int Cin, int Cout, cudaStream_t stream) {
  const int threads = 128;
  const long long warps = (long long)B * Cout;
  const dim3 grid(static_cast<unsigned>((warps * 32 + threads - 1) / threads));
  const dim3 block(threads);
  RT_LAUNCH(demod_kernel<T>, grid, block, stream, style, static_cast<const T*>(w), d, B, Cin, Cout);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace rt_modconv

extern "C" int rt_modconv3x3_cuda(int dtype, const void* x, const float* style, const void* w, const float* demod,
                                  const void* noise, int noise_batched, float noise_weight, const float* bias,
                                  void* out, int B, int Cin, int Cout, int H, int W, int flags, void* stream) {
  using namespace rt_modconv;
  if (B <= 0 || Cin <= 0 || Cout <= 0 || H <= 0 || W <= 0 || B > 65535 || (Cout + TCO - 1) / TCO > 65535)
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case RT_FP32:
      return launch_modconv<float>(x, style, w, demod, noise, noise_batched, noise_weight, bias, out, B, Cin, Cout,
                                   H, W, flags, s);
    case RT_FP16:
      return launch_modconv<__half>(x, style, w, demod, noise, noise_batched, noise_weight, bias, out, B, Cin,
                                    Cout, H, W, flags, s);
    case RT_BF16:
      return launch_modconv<__nv_bfloat16>(x, style, w, demod, noise, noise_batched, noise_weight, bias, out, B,
                                           Cin, Cout, H, W, flags, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int rt_demod_cuda(int dtype, const float* style, const void* w, float* demod, int B, int Cin, int Cout,
                             void* stream) {
  using namespace rt_modconv;
  if (B <= 0 || Cin <= 0 || Cout <= 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case RT_FP32:
      return launch_demod<float>(style, w, demod, B, Cin, Cout, s);
    case RT_FP16:
      return launch_demod<__half>(style, w, demod, B, Cin, Cout, s);
    case RT_BF16:
      return launch_demod<__nv_bfloat16>(style, w, demod, B, Cin, Cout, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* rt_cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

extern "C" int rt_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}
