// speed_fast::cpp_sample_and_noise and cpp_add_noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
// in one pass over x0, eps drawn on the fly (Philox + Box-Muller, SIMD). x0 may have any batch
// stride (each sample contiguous); x_t is contiguous. For float32 batches the noise is also
// kept, one batch at most, for the weighted_mse of the same step (eps_cache.h). Also
// cpp_normal, the bare noise (for tests and benchmarks of the generator).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "eps_cache.h"
#include "ops_common.h"

namespace speed_fast {
namespace {

void check_t_range(const int64_t* t, int64_t B, int64_t T) {
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(t[b] >= 0 && t[b] < T, "t must lie in [0, ", T, "), got t[", b, "] = ", t[b]);
  }
}

// xt = sqrt_ab[t] x0 + sqrt_1mab[t] eps for a validated batch (float32 eps kept for the loss).
void noise_batch(const at::Tensor& x0, at::Tensor& xt, DType dtype, const int64_t* t, const float* sqrt_ab,
                 const float* sqrt_1mab, RngKey key, int64_t offset) {
  const int64_t B = x0.size(0), D = B ? x0.numel() / B : 0;
  const Segments seg(B, D, offset);
  const KernelTable& k = cpu_kernels();
  at::Tensor eps;
  if (dtype == DType::f32 && keep_eps_enabled()) eps = at::empty({B * D}, x0.options());  // (B * D,)
  float* eps_out = eps.defined() ? eps.data_ptr<float>() : nullptr;
  const char* src = static_cast<const char*>(x0.data_ptr());
  char* dst = static_cast<char*>(xt.data_ptr());
  const size_t es = element_size(dtype);
  const int64_t stride = x0.stride(0);
#pragma omp parallel for schedule(dynamic, seg.grain()) if (seg.parallel())
  for (int64_t item = 0; item < seg.items(); ++item) {
    const int64_t b = item / seg.pieces, p = item % seg.pieces;
    const int64_t i0 = b * D + seg.begin(p);
    k.add_noise(dtype, src + (b * stride + seg.begin(p)) * es, dst + i0 * es, eps_out ? eps_out + i0 : nullptr,
                seg.length(p), uint64_t(offset + b) * uint64_t(D) + seg.begin(p), sqrt_ab[t[b]], sqrt_1mab[t[b]], key);
  }
  if (eps.defined()) keep_eps(EpsKey{key.seed, key.step, offset, B, D}, std::move(eps));
}

std::tuple<at::Tensor, at::Tensor> cpp_sample_and_noise(const at::Tensor& x0, const at::Tensor& prob,
                                                        const at::Tensor& alias, const at::Tensor& sqrt_ab,
                                                        const at::Tensor& sqrt_1mab, int64_t seed, int64_t step,
                                                        int64_t offset) {
  const DType dtype = check_batch("x0", x0);
  check_alias_table(prob, alias);
  check_table("sqrt_ab", sqrt_ab, at::kFloat, prob.size(0));
  check_table("sqrt_1mab", sqrt_1mab, at::kFloat, prob.size(0));
  const RngKey key = rng_key(seed, step, offset);
  const int64_t B = x0.size(0);
  TORCH_CHECK_VALUE(offset <= INT64_MAX - B, "offset + B must be < 2^63, got offset=", offset, ", B=", B);
  at::Tensor t = at::empty({B}, x0.options().dtype(at::kLong));  // (B,)
  draw_timesteps(prob, alias, B, key, offset, t.data_ptr<int64_t>());
  at::Tensor xt = at::empty(x0.sizes(), x0.options());  // (B, ...) contiguous
  noise_batch(x0, xt, dtype, t.data_ptr<int64_t>(), sqrt_ab.data_ptr<float>(), sqrt_1mab.data_ptr<float>(), key,
              offset);
  return {t, xt};
}

at::Tensor cpp_add_noise(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1mab, int64_t seed, int64_t step, int64_t offset) {
  const DType dtype = check_batch("x0", x0);
  check_table("sqrt_ab", sqrt_ab, at::kFloat, -1);
  check_table("sqrt_1mab", sqrt_1mab, at::kFloat, sqrt_ab.size(0));
  check_table("t", t, at::kLong, x0.size(0));
  check_t_range(t.data_ptr<int64_t>(), x0.size(0), sqrt_ab.size(0));
  const RngKey key = rng_key(seed, step, offset);
  at::Tensor xt = at::empty(x0.sizes(), x0.options());  // (B, ...) contiguous
  noise_batch(x0, xt, dtype, t.data_ptr<int64_t>(), sqrt_ab.data_ptr<float>(), sqrt_1mab.data_ptr<float>(), key,
              offset);
  return xt;
}

at::Tensor cpp_normal(int64_t numel, int64_t seed, int64_t step, int64_t first_element) {
  TORCH_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  TORCH_CHECK_VALUE(first_element >= 0 && first_element <= INT64_MAX - numel,
                    "first_element must be in [0, 2^63 - numel), got ", first_element);
  const RngKey key = rng_key(seed, step, 0);
  at::Tensor eps = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));  // (numel,)
  float* out = eps.data_ptr<float>();
  const KernelTable& k = cpu_kernels();
  constexpr int64_t kBlock = Segments::kPiece;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(dynamic) if (blocks >= 4 && omp_get_max_threads() > 1)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t i0 = blk * kBlock;
    k.normals(uint64_t(first_element + i0), std::min(kBlock, numel - i0), key, out + i0);
  }
  return eps;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(speed_fast, m) {
  m.def(
      "cpp_sample_and_noise(Tensor x0, Tensor prob, Tensor alias, Tensor sqrt_ab, Tensor sqrt_1mab, int seed, "
      "int step, int offset) -> (Tensor, Tensor)");
  m.def("cpp_add_noise(Tensor x0, Tensor t, Tensor sqrt_ab, Tensor sqrt_1mab, int seed, int step, int offset) -> Tensor");
  m.def("cpp_normal(int numel, int seed, int step, int first_element) -> Tensor");
}

TORCH_LIBRARY_IMPL(speed_fast, CPU, m) {
  m.impl("cpp_sample_and_noise", &cpp_sample_and_noise);
  m.impl("cpp_add_noise", &cpp_add_noise);
}

TORCH_LIBRARY_IMPL(speed_fast, CompositeExplicitAutograd, m) { m.impl("cpp_normal", &cpp_normal); }

}  // namespace speed_fast
