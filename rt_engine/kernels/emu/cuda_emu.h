// CPU emulation of the CUDA subset used by rt_engine/kernels/modconv.cu, so that the SAME kernel source
// compiles with g++ (-DRT_EMU) and runs on a machine without a GPU, for correctness tests.
//
// Model
//   * Every CUDA thread is a ucontext fiber with its own stack. A block's fibers run on one OS
//     thread under a per-block scheduler; blocks are spread over `os_threads` OS threads.
//   * Fibers are cooperative: one runs until it reaches __syncthreads, a warp shuffle or its end.
//     Between two barriers the scheduler runs the ready fibers in a seeded random order (a new
//     order each interval), so code that relies on an ordering the barriers do not give sees
//     adversarial interleavings.
//   * __syncthreads releases the block once every live fiber waits at it; a barrier reached by only
//     part of the block, or a block where nothing can run, is reported (divergence / deadlock).
//   * Warp shuffles exchange values through per-warp slots with two warp-level rendezvous.
//   * __shared__ is `static thread_local`: one copy per OS thread, which runs one block at a time,
//     i.e. per-block storage. Shared arrays are declared as rt_smem_array<T, N>; here that is an
//     instrumented array whose element accesses feed a race detector: within one barrier interval
//     (epoch), an element written by one thread and read or written by another is a hazard
//     (read-after-write, write-after-read, write-after-write), and out-of-bounds indices are errors.
//   * Every problem is recorded (count + first messages) and makes cudaGetLastError() return
//     cudaErrorLaunchFailure, which the caller sees as a failed launch.
//   * __syncthreads is a macro carrying __LINE__, so a test can drop the barrier of one source line
//     at run time (configure(drop_sync_line=...)) and check that the detector reports the race.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../half_convert.h"

// ---------------------------------------------------------------- CUDA keywords and basic types
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return rt_half::f16_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{rt_half::float_to_f16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return rt_half::bf16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{rt_half::float_to_bf16(f)}; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }

namespace rt_emu {

enum class FState : uint8_t { Ready, AtBlock, AtWarp, Done };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0;
  FState state = FState::Done;
};

struct Config {
  std::atomic<int> os_threads{1};
  std::atomic<unsigned> seed{1};
  std::atomic<int> race_check{1};
  std::atomic<int> shuffle{1};
  std::atomic<int> drop_sync_line{-1};
};
inline Config g_config;

struct Report {
  std::mutex mu;
  std::atomic<long long> count{0};
  std::vector<std::string> messages;
  std::atomic<bool> failed{false};
};
inline Report g_report;
constexpr size_t kMaxMessages = 20;

// Record one problem; `make_msg()` builds its text only for the first kMaxMessages problems.
template <class F>
void report_lazy(F make_msg) {
  g_report.failed = true;
  const long long n = g_report.count.fetch_add(1);
  if (n < static_cast<long long>(kMaxMessages)) {
    std::string msg = make_msg();
    std::lock_guard<std::mutex> lock(g_report.mu);
    g_report.messages.push_back(std::move(msg));
  }
}

inline void report(const std::string& msg) {
  report_lazy([&]() { return msg; });
}

struct LaunchCfg {
  dim3 grid;
  dim3 block;
  const std::function<void()>* body = nullptr;
};
inline LaunchCfg g_launch;  // read-only while the blocks of a launch run

struct Block;
inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;
inline thread_local uint32_t t_epoch = 1;  // barrier interval stamp of this OS thread's current block

inline void fiber_entry() {
  (*g_launch.body)();
  t_fiber->state = FState::Done;  // returning resumes the scheduler through uc_link
}

struct Block {
  static constexpr size_t kStack = 128 * 1024;
  dim3 idx;
  int nthreads;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<uint64_t> shfl;  // per-thread slot for warp shuffles
  ucontext_t sched;
  std::mt19937 rng;
  int last_sync_line = 0;

  explicit Block(int n) : nthreads(n), fibers(n), shfl(n) {
    for (int i = 0; i < n; ++i) stacks.emplace_back(new char[kStack]);
  }

  std::string where() const {
    return "block (" + std::to_string(idx.x) + "," + std::to_string(idx.y) + "," + std::to_string(idx.z) + ")";
  }

  // Make the waiting fibers runnable again; false when all are done or nothing can run.
  bool release() {
    int live = 0, at_block = 0, done = 0;
    for (const Fiber& f : fibers) {
      if (f.state == FState::Done) {
        ++done;
      } else {
        ++live;
        if (f.state == FState::AtBlock) ++at_block;
      }
    }
    if (live == 0) return false;
    bool any = false;
    for (int w0 = 0; w0 < nthreads; w0 += 32) {
      int live_w = 0, at_warp = 0;
      for (int i = w0; i < std::min(nthreads, w0 + 32); ++i) {
        if (fibers[i].state != FState::Done) ++live_w;
        if (fibers[i].state == FState::AtWarp) ++at_warp;
      }
      if (live_w > 0 && at_warp == live_w) {
        for (int i = w0; i < std::min(nthreads, w0 + 32); ++i)
          if (fibers[i].state == FState::AtWarp) fibers[i].state = FState::Ready;
        any = true;
      }
    }
    if (any) return true;
    if (at_block == live) {
      if (done > 0)
        report("barrier divergence: __syncthreads at line " + std::to_string(last_sync_line) + " reached by " +
               std::to_string(live) + " of " + std::to_string(nthreads) + " threads of " + where() +
               " (the others exited)");
      for (Fiber& f : fibers)
        if (f.state == FState::AtBlock) f.state = FState::Ready;
      ++t_epoch;
      return true;
    }
    report("deadlock in " + where() + ": " + std::to_string(at_block) + " threads wait at __syncthreads, " +
           std::to_string(live - at_block) + " at a warp shuffle");
    return false;
  }

  void run(dim3 bidx, unsigned seed) {
    idx = bidx;
    t_block = this;
    ++t_epoch;
    last_sync_line = 0;
    rng.seed(seed);
    const dim3 bd = g_launch.block;
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[i];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[i].get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &sched;
      makecontext(&f.ctx, fiber_entry, 0);
      f.tid = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
      f.linear = i;
      f.state = FState::Ready;
    }
    std::vector<int> order;
    order.reserve(nthreads);
    for (;;) {
      order.clear();
      for (int i = 0; i < nthreads; ++i)
        if (fibers[i].state == FState::Ready) order.push_back(i);
      if (order.empty()) {
        if (!release()) break;
        continue;
      }
      if (g_config.shuffle.load(std::memory_order_relaxed)) std::shuffle(order.begin(), order.end(), rng);
      for (int i : order) {
        t_fiber = &fibers[i];
        swapcontext(&sched, &fibers[i].ctx);
      }
      t_fiber = nullptr;
    }
    t_block = nullptr;
  }
};

inline void yield_as(FState s) {
  Fiber* f = t_fiber;
  f->state = s;
  swapcontext(&f->ctx, &t_block->sched);
}

inline void syncthreads(int line) {
  if (line == g_config.drop_sync_line.load(std::memory_order_relaxed)) return;
  t_block->last_sync_line = line;
  yield_as(FState::AtBlock);
}

// Value of lane `src` (in this warp) after every lane of the warp has published its own.
template <class T>
T shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Block* b = t_block;
  const int me = t_fiber->linear;
  const int base = me - me % 32;
  const int width = std::min(32, b->nthreads - base);
  const unsigned full = width == 32 ? 0xffffffffu : ((1u << width) - 1u);
  if ((mask & full) != full) report("warp shuffle with a partial mask is not emulated (" + b->where() + ")");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b->shfl[me] = bits;
  yield_as(FState::AtWarp);
  const int s = (src >= 0 && src < width) ? base + src : me;
  T r;
  std::memcpy(&r, &b->shfl[s], sizeof(T));
  yield_as(FState::AtWarp);  // nobody overwrites its slot before every lane has read
  return r;
}

inline uint32_t epoch() { return t_epoch; }

// Instrumented __shared__ array (rt_smem_array<T, N> in kernel code).
template <class T, int N>
struct Shared {
  T v[N];
  uint32_t w_ep[N] = {};
  uint32_t r_ep[N] = {};
  int32_t w_tid[N] = {};
  int32_t r_tid[N] = {};  // the one reader of this epoch, or -1 for several

  void hazard(const char* kind, int i, int other, int me) {
    report_lazy([&]() {
      const std::string who = other < 0 ? std::string("several threads") : "thread " + std::to_string(other);
      return std::string(kind) + " hazard on __shared__ array (" + std::to_string(N) + " x " +
             std::to_string(sizeof(T)) + " B) at index " + std::to_string(i) + ": " + who + " and thread " +
             std::to_string(me) + " of " + t_block->where() +
             " with no __syncthreads in between (last barrier passed: line " +
             std::to_string(t_block->last_sync_line) + ")";
    });
  }

  T read(int i) {
    if (g_config.race_check.load(std::memory_order_relaxed)) {
      const uint32_t ep = epoch();
      const int me = t_fiber->linear;
      if (w_ep[i] == ep && w_tid[i] != me) hazard("read-after-write", i, w_tid[i], me);
      if (r_ep[i] != ep) {
        r_ep[i] = ep;
        r_tid[i] = me;
      } else if (r_tid[i] != me) {
        r_tid[i] = -1;
      }
    }
    return v[i];
  }

  void write(int i, T x) {
    if (g_config.race_check.load(std::memory_order_relaxed)) {
      const uint32_t ep = epoch();
      const int me = t_fiber->linear;
      if (w_ep[i] == ep && w_tid[i] != me) hazard("write-after-write", i, w_tid[i], me);
      if (r_ep[i] == ep && r_tid[i] != me) hazard("write-after-read", i, r_tid[i], me);
      w_ep[i] = ep;
      w_tid[i] = me;
    }
    v[i] = x;
  }

  struct Ref {
    Shared* s;
    int i;
    operator T() const { return s->read(i); }
    Ref& operator=(T x) {
      s->write(i, x);
      return *this;
    }
    Ref& operator=(const Ref& o) {
      s->write(i, static_cast<T>(o));
      return *this;
    }
    Ref& operator+=(T x) {
      s->write(i, s->read(i) + x);
      return *this;
    }
  };

  Ref operator[](int i) {
    if (i < 0 || i >= N) {
      report("out-of-bounds __shared__ index " + std::to_string(i) + " (size " + std::to_string(N) + ") in " +
             t_block->where());
      i = 0;
    }
    return Ref{this, i};
  }
};

// Run every block of a launch to completion (synchronously; launches are serialised).
inline void launch(dim3 grid, dim3 block, std::function<void()> body) {
  static std::mutex launch_mu;
  std::lock_guard<std::mutex> lock(launch_mu);
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  if (nthreads <= 0 || nthreads > 1024 || nblocks <= 0) {
    report("invalid launch configuration");
    return;
  }
  g_launch.grid = grid;
  g_launch.block = block;
  g_launch.body = &body;
  std::atomic<long long> next{0};
  const unsigned seed = g_config.seed.load();
  auto worker = [&]() {
    Block blk(static_cast<int>(nthreads));
    for (;;) {
      const long long i = next.fetch_add(1);
      if (i >= nblocks) break;
      const dim3 bidx(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                      static_cast<unsigned>(i / (static_cast<long long>(grid.x) * grid.y)));
      blk.run(bidx, seed * 2654435761u + static_cast<unsigned>(i));  // order depends on the block, not the thread
    }
  };
  const int n_os = std::max(1, std::min(64, g_config.os_threads.load()));
  std::vector<std::thread> pool;
  for (int t = 0; t < n_os; ++t) pool.emplace_back(worker);
  for (std::thread& t : pool) t.join();
  g_launch.body = nullptr;
}

}  // namespace rt_emu

template <class T, int N>
using rt_smem_array = ::rt_emu::Shared<T, N>;

inline cudaError_t cudaGetLastError() {
  return ::rt_emu::g_report.failed.exchange(false) ? cudaErrorLaunchFailure : cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error (emulated)";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated)";
    default:
      return "emulated launch failed: race, divergence, deadlock or out-of-bounds access (see messages)";
  }
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::rt_emu::t_fiber->linear % 32;
  return ::rt_emu::shfl(mask, v, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::rt_emu::t_fiber->linear % 32;
  return ::rt_emu::shfl(mask, v, (lane & ~(width - 1)) + ((lane ^ lane_mask) & (width - 1)));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::rt_emu::t_fiber->linear % 32;
  const int src = (lane & (width - 1)) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return ::rt_emu::shfl(mask, v, src);
}

#define threadIdx (::rt_emu::t_fiber->tid)
#define blockIdx (::rt_emu::t_block->idx)
#define blockDim (::rt_emu::g_launch.block)
#define gridDim (::rt_emu::g_launch.grid)
#define warpSize 32
#define __syncthreads() ::rt_emu::syncthreads(__LINE__)
