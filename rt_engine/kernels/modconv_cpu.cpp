// CPU twin of rt_engine/kernels/modconv.cu: the same fused static-form modulated 3x3 convolution (style
// scaling of the input, shared-weight conv with fp32 accumulation, demodulation, noise, bias,
// scaled leaky ReLU) in plain C++. It is the always-built reference for the native code path; on
// this hardware oneDNN (torch) is faster, so impl="auto" does not pick it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "half_convert.h"
#include "modconv.h"

namespace {

inline float load(int dtype, const void* p, long long i) {
  switch (dtype) {
    case RT_FP16:
      return rt_half::f16_to_float(static_cast<const uint16_t*>(p)[i]);
    case RT_BF16:
      return rt_half::bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

inline void store(int dtype, void* p, long long i, float v) {
  switch (dtype) {
    case RT_FP16:
      static_cast<uint16_t*>(p)[i] = rt_half::float_to_f16(v);
      break;
    case RT_BF16:
      static_cast<uint16_t*>(p)[i] = rt_half::float_to_bf16(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Run fn(i) for i in [0, n) on up to n_threads threads (contiguous ranges).
template <class F>
void parallel_for(long long n, int n_threads, F fn) {
  const int t = static_cast<int>(std::max(1LL, std::min<long long>(n_threads, n)));
  if (t <= 1) {
    for (long long i = 0; i < n; ++i) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  const long long per = (n + t - 1) / t;
  for (int k = 0; k < t; ++k) {
    const long long lo = k * per, hi = std::min(n, lo + per);
    pool.emplace_back([lo, hi, &fn]() {
      for (long long i = lo; i < hi; ++i) fn(i);
    });
  }
  for (std::thread& th : pool) th.join();
}

bool valid_dtype(int dtype) { return dtype == RT_FP32 || dtype == RT_FP16 || dtype == RT_BF16; }

}  // namespace

extern "C" int rt_demod_cpu(int dtype, const float* style, const void* w, float* demod, int B, int Cin, int Cout) {
  if (!valid_dtype(dtype) || !style || !w || !demod || B <= 0 || Cin <= 0 || Cout <= 0) return -1;
  std::vector<float> w2(static_cast<size_t>(Cout) * Cin);  // [Cout,Cin] = sum_k w^2
  for (long long oi = 0; oi < static_cast<long long>(Cout) * Cin; ++oi) {
    float acc = 0.f;
    for (int k = 0; k < 9; ++k) {
      const float v = load(dtype, w, oi * 9 + k);
      acc += v * v;
    }
    w2[oi] = acc;
  }
  for (int b = 0; b < B; ++b)
    for (int o = 0; o < Cout; ++o) {
      float acc = 0.f;
      for (int i = 0; i < Cin; ++i) {
        const float s = style[static_cast<long long>(b) * Cin + i];
        acc += s * s * w2[static_cast<long long>(o) * Cin + i];
      }
      demod[static_cast<long long>(b) * Cout + o] = 1.0f / std::sqrt(acc + RT_DEMOD_EPS);
    }
  return 0;
}

extern "C" int rt_modconv3x3_cpu(int dtype, const void* x, const float* style, const void* w, const float* demod,
                                 const void* noise, int noise_batched, float noise_weight, const float* bias,
                                 void* out, int B, int Cin, int Cout, int H, int W, int flags, int n_threads) {
  if (!valid_dtype(dtype) || !x || !style || !w || !out || B <= 0 || Cin <= 0 || Cout <= 0 || H <= 0 || W <= 0)
    return -1;
  const int HP = H + 2, WP = W + 2;
  const long long plane = static_cast<long long>(H) * W;
  const long long pplane = static_cast<long long>(HP) * WP;

  // fp32 copy of the shared weight [Cout][Cin][9]
  std::vector<float> wf(static_cast<size_t>(Cout) * Cin * 9);
  for (size_t i = 0; i < wf.size(); ++i) wf[i] = load(dtype, w, static_cast<long long>(i));

  // style-scaled, zero-padded input per sample: [B][Cin][H+2][W+2] (the CUDA kernel's shared tile)
  std::vector<float> xs(static_cast<size_t>(B) * Cin * pplane, 0.f);
  parallel_for(static_cast<long long>(B) * Cin, n_threads, [&](long long bc) {
    const float s = style[bc];
    float* dst = xs.data() + bc * pplane;
    for (int y = 0; y < H; ++y)
      for (int xx = 0; xx < W; ++xx) dst[(y + 1) * WP + xx + 1] = load(dtype, x, bc * plane + y * W + xx) * s;
  });

  // conv with the shared weight (fp32 accumulation), then the fused epilogue, per (sample, out channel)
  parallel_for(static_cast<long long>(B) * Cout, n_threads, [&](long long bo) {
    const int b = static_cast<int>(bo / Cout);
    const int o = static_cast<int>(bo % Cout);
    std::vector<float> acc(static_cast<size_t>(plane), 0.f);
    for (int i = 0; i < Cin; ++i) {
      const float* src = xs.data() + (static_cast<long long>(b) * Cin + i) * pplane;
      const float* wk = wf.data() + (static_cast<long long>(o) * Cin + i) * 9;
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx) {
          const float wv = wk[ky * 3 + kx];
          for (int y = 0; y < H; ++y) {
            const float* row = src + (y + ky) * WP + kx;
            float* arow = acc.data() + static_cast<long long>(y) * W;
            for (int xx = 0; xx < W; ++xx) arow[xx] += wv * row[xx];
          }
        }
    }
    const float d = demod ? demod[bo] : 1.f;
    const float bb = bias ? bias[o] : 0.f;
    const long long nb = noise_batched ? static_cast<long long>(b) * plane : 0;
    for (long long p = 0; p < plane; ++p) {
      float v = acc[p] * d;
      if (noise) v += noise_weight * load(dtype, noise, nb + p);
      v += bb;
      if (flags & RT_MODCONV_ACTIVATE) v = (v > 0.f ? v : v * RT_LRELU_SLOPE) * RT_LRELU_GAIN;
      store(dtype, out, bo * plane + p, v);
    }
  });
  return 0;
}
