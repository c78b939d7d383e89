// Argument checks and work partitioning shared by the torch-facing op files
// (sample_timesteps.cpp, sample_and_noise.cpp, weighted_mse.cpp).
//
// Every check raises ValueError on the Python side (TORCH_CHECK_VALUE) and names the bad
// value and what was expected. The Python layer (speed_fast/ops) validates first; these
// checks make the ops safe when called directly through torch.ops.speed_fast.
#pragma once

#include <omp.h>

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace speed_fast {

inline void check_cpu(const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got device ", x.device());
}

// Whether every sample x[b] is contiguous (any batch stride: e.g. the eps half of a
// learned-sigma output, model_out[:, :C]).
inline bool samples_contiguous(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

inline DType check_batch(const char* name, const at::Tensor& x) {
  check_cpu(name, x);
  TORCH_CHECK_VALUE(x.dim() >= 2, name, " must be a batch [B, ...] with at least 2 dims, got shape ", x.sizes());
  TORCH_CHECK_VALUE(samples_contiguous(x), name, " must be contiguous within each sample, got strides ",
                    x.strides(), " for shape ", x.sizes());
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kBFloat16:
      return DType::bf16;
    case at::kHalf:
      return DType::f16;
    default:
      TORCH_CHECK_VALUE(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return DType::f32;
}

inline void check_table(const char* name, const at::Tensor& v, at::ScalarType dtype, int64_t T) {
  check_cpu(name, v);
  TORCH_CHECK_VALUE(v.dim() == 1 && v.scalar_type() == dtype, name, " must be a 1-D ", dtype, " tensor, got ",
                    v.scalar_type(), " of shape ", v.sizes());
  TORCH_CHECK_VALUE(T < 0 || v.size(0) == T, name, " must have length T=", T, ", got ", v.size(0));
  TORCH_CHECK_VALUE(v.is_contiguous(), name, " must be contiguous, got stride ", v.strides());
}

inline void check_alias_table(const at::Tensor& prob, const at::Tensor& alias) {
  check_table("prob", prob, at::kFloat, -1);
  check_table("alias", alias, at::kInt, prob.size(0));
  TORCH_CHECK_VALUE(prob.size(0) > 0, "alias table is empty");
  TORCH_CHECK_VALUE(prob.size(0) < (int64_t(1) << 31), "alias tables hold at most 2^31 - 1 entries, got ",
                    prob.size(0));
}

// seed is the uint64 seed's bit pattern in an int64 (torch schemas have no unsigned ints).
inline RngKey rng_key(int64_t seed, int64_t step, int64_t offset) {
  TORCH_CHECK_VALUE(step >= 0 && step < (int64_t(1) << 32), "step must be in [0, 2^32), got ", step);
  TORCH_CHECK_VALUE(offset >= 0, "offset must be >= 0, got ", offset);
  return RngKey{uint64_t(seed), uint32_t(step)};
}

// A batch [B, D] split into items (sample b, piece p) of at most kPiece elements, so one
// large sample still spreads over all threads. The split depends on the shape only, which
// keeps per-sample sums (weighted_mse) independent of the thread count.
struct Segments {
  static constexpr int64_t kPiece = 16384;
  int64_t B, D, pieces;
  Segments(int64_t B_, int64_t D_, int64_t offset) : B(B_), D(D_), pieces(D_ > kPiece ? (D_ + kPiece - 1) / kPiece : 1) {
    int64_t last = 0;
    TORCH_CHECK_VALUE(!__builtin_add_overflow(offset, B, &last) && !__builtin_mul_overflow(last, D, &last),
                      "(offset + B) * numel_per_sample must be < 2^63, got offset=", offset, ", B=", B, ", D=", D);
  }
  int64_t items() const { return B * pieces; }
  int64_t begin(int64_t p) const { return p * kPiece; }
  int64_t length(int64_t p) const { return (p + 1 == pieces ? D : (p + 1) * kPiece) - p * kPiece; }
  // Below this many elements a parallel region costs more than it saves.
  bool parallel() const { return B * D >= 4 * kPiece && omp_get_max_threads() > 1; }
  // Items per dynamic-schedule grab (about 8k elements): dynamic rather than static so a
  // thread that the OS preempts (other jobs on a small machine) does not stall the region.
  int64_t grain() const { return D >= 8192 ? 1 : 8192 / (D > 0 ? D : 1); }
};

// t[i] for draws offset .. offset + n - 1 (sample_timesteps.cpp); raises ValueError if
// an alias entry that was drawn lies outside [0, T).
void draw_timesteps(const at::Tensor& prob, const at::Tensor& alias, int64_t n, RngKey key, int64_t offset,
                    int64_t* t);

inline size_t element_size(DType d) { return d == DType::f32 ? 4 : 2; }

}  // namespace speed_fast
