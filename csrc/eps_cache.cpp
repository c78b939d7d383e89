// The kept-noise cache (eps_cache.h) and its two ops: cpp_keep_eps (switch) and
// cpp_eps_cache_hits (how many losses read kept noise).
#include <atomic>
#include <mutex>
#include <utility>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "eps_cache.h"

namespace speed_fast {
namespace {

std::mutex g_mutex;
EpsKey g_key{};
std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_hits{0};

// float32 [B * D] or undefined. Never destroyed: at exit torch's allocator may be gone first.
at::Tensor& kept() {
  static at::Tensor* eps = new at::Tensor();
  return *eps;
}

// -1 reports whether sample_and_noise keeps its noise for the loss; 0 / 1 switches it off / on
// (switching off drops what is kept).
int64_t cpp_keep_eps(int64_t enable) {
  TORCH_CHECK_VALUE(enable >= -1 && enable <= 1, "enable must be -1, 0 or 1, got ", enable);
  if (enable >= 0) {
    g_enabled.store(enable == 1);
    if (enable == 0) keep_eps(EpsKey{}, at::Tensor());
  }
  return g_enabled.load() ? 1 : 0;
}

int64_t cpp_eps_cache_hits() { return g_hits.load(); }

}  // namespace

void keep_eps(const EpsKey& key, at::Tensor eps) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  g_key = key;
  kept() = std::move(eps);
}

at::Tensor take_eps(const EpsKey& key) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  if (!kept().defined() || !(g_key == key)) return at::Tensor();
  g_hits.fetch_add(1);
  return std::exchange(kept(), at::Tensor());
}

bool keep_eps_enabled() { return g_enabled.load(); }

TORCH_LIBRARY_FRAGMENT(speed_fast, m) {
  m.def("cpp_keep_eps(int enable) -> int", &cpp_keep_eps);
  m.def("cpp_eps_cache_hits() -> int", &cpp_eps_cache_hits);
}

}  // namespace speed_fast
