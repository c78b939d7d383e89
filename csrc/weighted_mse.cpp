// speed_fast::cpp_weighted_mse_fwd: loss = mean_b w(t_b) mean_i (pred - eps)^2, the per-sample
// mse and the gradient d loss / d pred, in one pass over pred. eps is read back when
// sample_and_noise kept it for this (seed, step, offset, shape) (eps_cache.h), else drawn
// again on the fly. pred may have any batch stride (each sample contiguous); grad is contiguous.
//
// Per-sample sums are accumulated per segment (Segments) and reduced in a fixed order, so
// the result does not depend on the number of threads.
#include <cmath>
#include <vector>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "eps_cache.h"
#include "ops_common.h"

namespace speed_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_weighted_mse_fwd(const at::Tensor& pred, const at::Tensor& t,
                                                                    const at::Tensor& weights, int64_t seed,
                                                                    int64_t step, int64_t offset) {
  const DType dtype = check_batch("pred", pred);
  check_table("weights", weights, at::kFloat, -1);
  const int64_t B = pred.size(0), D = B ? pred.numel() / B : 0, T = weights.size(0);
  check_table("t", t, at::kLong, B);
  const RngKey key = rng_key(seed, step, offset);
  const Segments seg(B, D, offset);
  const int64_t* tp = t.data_ptr<int64_t>();
  const float* wp = weights.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(tp[b] >= 0 && tp[b] < T, "t must lie in [0, ", T, "), got t[", b, "] = ", tp[b]);
    TORCH_CHECK_VALUE(std::isfinite(wp[tp[b]]), "weights must be finite, got weights[", tp[b], "] = ", wp[tp[b]]);
  }
  at::Tensor grad = at::empty(pred.sizes(), pred.options());      // (B, ...) contiguous
  at::Tensor mse = at::empty({B}, pred.options().dtype(at::kFloat));  // (B,)
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));  // ()
  // The reference's float32 factor 2 / (B D), applied before w(t_b), as (diff * c) * w.
  const float c = float(2.0 / double(B * D));
  const at::Tensor eps = take_eps(EpsKey{key.seed, key.step, offset, B, D});  // (B * D,) or undefined
  const float* eps_in = eps.defined() ? eps.data_ptr<float>() : nullptr;
  std::vector<double> partial(size_t(seg.items()));
  const KernelTable& k = cpu_kernels();
  const char* src = static_cast<const char*>(pred.data_ptr());
  char* dst = static_cast<char*>(grad.data_ptr());
  const size_t es = element_size(dtype);
  const int64_t stride = pred.stride(0);
#pragma omp parallel for schedule(dynamic, seg.grain()) if (seg.parallel())
  for (int64_t item = 0; item < seg.items(); ++item) {
    const int64_t b = item / seg.pieces, p = item % seg.pieces;
    const int64_t i0 = b * D + seg.begin(p);
    partial[size_t(item)] =
        k.weighted_mse(dtype, src + (b * stride + seg.begin(p)) * es, dst + i0 * es, eps_in ? eps_in + i0 : nullptr,
                       seg.length(p), uint64_t(offset + b) * uint64_t(D) + seg.begin(p), c, wp[tp[b]], key);
  }
  float* mp = mse.data_ptr<float>();
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t p = 0; p < seg.pieces; ++p) s += partial[size_t(b * seg.pieces + p)];
    mp[b] = float(s / double(D));
    total += double(wp[tp[b]]) * double(mp[b]);
  }
  *loss.data_ptr<float>() = float(total / double(B));
  return {loss, grad, mse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(speed_fast, m) {
  m.def(
      "cpp_weighted_mse_fwd(Tensor pred, Tensor t, Tensor weights, int seed, int step, int offset) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(speed_fast, CPU, m) { m.impl("cpp_weighted_mse_fwd", &cpp_weighted_mse_fwd); }

}  // namespace speed_fast
