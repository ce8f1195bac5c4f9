// The CUDA source rt_engine/kernels/modconv.cu compiled as plain C++ against cuda_emu.h, plus a C interface
// for ctypes (tests/test_kernels_emu.py builds this file with g++ and loads it). The kernel entry
// points are the rt_modconv3x3_cuda / rt_demod_cuda functions of modconv.h, taking host pointers.
#define RT_EMU 1
#include "../modconv.cu"

extern "C" {

void rt_emu_configure(int os_threads, unsigned seed, int race_check, int shuffle, int drop_sync_line) {
  rt_emu::g_config.os_threads = os_threads;
  rt_emu::g_config.seed = seed;
  rt_emu::g_config.race_check = race_check;
  rt_emu::g_config.shuffle = shuffle;
  rt_emu::g_config.drop_sync_line = drop_sync_line;
}

long long rt_emu_error_count(void) { return rt_emu::g_report.count.load(); }

// First recorded messages joined by newlines into buf (cap bytes); returns the full length.
int rt_emu_messages(char* buf, int cap) {
  std::lock_guard<std::mutex> lock(rt_emu::g_report.mu);
  std::string all;
  for (const std::string& m : rt_emu::g_report.messages) all += m + "\n";
  if (buf && cap > 0) {
    const size_t n = std::min(all.size(), static_cast<size_t>(cap - 1));
    std::memcpy(buf, all.data(), n);
    buf[n] = '\0';
  }
  return static_cast<int>(all.size());
}

void rt_emu_reset(void) {
  std::lock_guard<std::mutex> lock(rt_emu::g_report.mu);
  rt_emu::g_report.messages.clear();
  rt_emu::g_report.count = 0;
  rt_emu::g_report.failed = false;
}

}  // extern "C"
