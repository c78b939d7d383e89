// speed_fast::cpp_sample_timesteps: alias-method draws of the time steps, O(1) per draw.
//
// Draw i uses the Philox counter index offset + i of the TIMESTEPS stream, so the draws of a
// batch do not depend on how they are split over threads (or over data-parallel ranks).
#include <algorithm>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops_common.h"

namespace speed_fast {

void draw_timesteps(const at::Tensor& prob, const at::Tensor& alias, int64_t n, RngKey key, int64_t offset,
                    int64_t* t) {
  const KernelTable& k = cpu_kernels();
  const float* p = prob.data_ptr<float>();
  const int32_t* a = alias.data_ptr<int32_t>();
  const uint32_t T = uint32_t(prob.size(0));
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  int64_t bad = n;  // the first draw whose alias entry is out of range
  // A draw costs a few ns: below ~2^18 draws a parallel region (a thread wake-up, a barrier
  // that waits for a preempted thread on a busy machine) costs more than it saves.
#pragma omp parallel for schedule(dynamic) reduction(min : bad) if (blocks >= 64 && omp_get_max_threads() > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * kBlock, m = std::min(kBlock, n - i0);
    const int64_t j = k.sample_timesteps(p, a, T, uint64_t(offset + i0), m, key, t + i0);
    if (j >= 0 && i0 + j < bad) bad = i0 + j;
  }
  if (bad < n) {
    // Name the first corrupt entry; a broken table is rare, so an O(T) scan is fine here.
    int64_t c = 0;
    while (a[c] >= 0 && a[c] < int64_t(T)) ++c;
    TORCH_CHECK_VALUE(false, "alias entries must lie in [0, T=", T, "), got alias[", c, "] = ", a[c], " (draw ",
                      offset + bad, " picked an entry outside that range)");
  }
}

namespace {

at::Tensor cpp_sample_timesteps(const at::Tensor& prob, const at::Tensor& alias, int64_t n, int64_t seed,
                                int64_t step, int64_t offset) {
  check_alias_table(prob, alias);
  TORCH_CHECK_VALUE(n >= 0, "n must be >= 0, got ", n);
  const RngKey key = rng_key(seed, step, offset);
  TORCH_CHECK_VALUE(offset <= INT64_MAX - n, "offset + n must be < 2^63, got offset=", offset, ", n=", n);
  at::Tensor t = at::empty({n}, prob.options().dtype(at::kLong));  // (n,)
  draw_timesteps(prob, alias, n, key, offset, t.data_ptr<int64_t>());
  return t;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(speed_fast, m) {
  m.def("cpp_sample_timesteps(Tensor prob, Tensor alias, int n, int seed, int step, int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(speed_fast, CPU, m) { m.impl("cpp_sample_timesteps", &cpp_sample_timesteps); }

}  // namespace speed_fast
