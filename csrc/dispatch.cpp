// Run-time choice of the kernel table (AVX-512, AVX2 or scalar) and the op that reports it.
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include <torch/library.h>

#include "kernels.h"

namespace speed_fast {

bool cpu_supports(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return std::strcmp(isa, "scalar") == 0;
}

namespace {

const KernelTable* best_table() {
  if (cpu_supports("avx512")) return &kernels_avx512();
  if (cpu_supports("avx2")) return &kernels_avx2();
  return &kernels_scalar();
}

std::atomic<const KernelTable*> g_selected{nullptr};

}  // namespace

const KernelTable& cpu_kernels() {
  const KernelTable* t = g_selected.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_selected.store(t, std::memory_order_release);
  }
  return *t;
}

const char* select_isa(const char* isa) {
  const KernelTable* t = nullptr;
  if (std::strcmp(isa, "auto") == 0) {
    t = best_table();
  } else if (std::strcmp(isa, "avx512") != 0 && std::strcmp(isa, "avx2") != 0 && std::strcmp(isa, "scalar") != 0) {
    throw std::invalid_argument(std::string("isa must be 'auto', 'avx512', 'avx2' or 'scalar', got '") + isa + "'");
  } else if (!cpu_supports(isa)) {
    throw std::invalid_argument(std::string("this CPU cannot run the '") + isa + "' kernels");
  } else {
    t = std::strcmp(isa, "avx512") == 0 ? &kernels_avx512()
        : std::strcmp(isa, "avx2") == 0 ? &kernels_avx2()
                                        : &kernels_scalar();
  }
  g_selected.store(t, std::memory_order_release);
  return t->name;
}

namespace {

std::string cpp_cpu_isa(std::string request) {
  if (request.empty()) return cpu_kernels().name;
  try {
    return select_isa(request.c_str());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  return "";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(speed_fast, m) {
  // "" reports the kernel table in use; "auto" | "avx512" | "avx2" | "scalar" selects one.
  m.def("cpp_cpu_isa(str request) -> str", &cpp_cpu_isa);
}

}  // namespace speed_fast
