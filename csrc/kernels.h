// The plain-pointer CPU kernels of the fused SpeeD step, one table per instruction set.
//
// The kernels are written once (fused_impl.h) over a small SIMD interface and compiled
// three times: isa_avx512.cpp, isa_avx2.cpp (each with `#pragma GCC target`, so the wheel
// needs no -march flag) and isa_scalar.cpp. dispatch.cpp picks the best table the CPU
// supports at run time. Nothing here includes torch: the op files (sample_timesteps.cpp,
// sample_and_noise.cpp, weighted_mse.cpp) validate tensors and split the work over OpenMP
// threads, then call these kernels on one segment at a time.
//
// RNG coordinates are those of speed_fast/rng.py: key = (seed lo32, seed hi32),
// counter = (index lo32, index hi32, step, stream).
#pragma once

#include <cstdint>

namespace speed_fast {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

struct RngKey {
  uint64_t seed;
  uint32_t step;
};

struct KernelTable {
  const char* name;
  // t[i] for draws first .. first+n-1 of the TIMESTEPS stream (counter index = first + i):
  // column c = (r0 * T) >> 32, coin u = uniform(r1), t = u < prob[c] ? c : alias[c].
  // Returns the index i of the first draw whose alias entry lies outside [0, T), or -1.
  int64_t (*sample_timesteps)(const float* prob, const int32_t* alias, uint32_t T, uint64_t first, int64_t n,
                              RngKey key, int64_t* t);
  // eps[i] = the standard normal of global element g0 + i (NOISE stream), i < n.
  void (*normals)(uint64_t g0, int64_t n, RngKey key, float* eps);
  // One segment of one sample: xt[i] = a * x0[i] + s * eps(g0 + i), fp32 arithmetic, in/out of
  // `dtype`; also writes eps[i] to eps_out unless it is null.
  void (*add_noise)(DType dtype, const void* x0, void* xt, float* eps_out, int64_t n, uint64_t g0, float a, float s,
                    RngKey key);
  // One segment of one sample: d = pred[i] - eps(g0 + i); grad[i] = (d * c) * w; returns sum d^2.
  // eps is read from eps_in when it is not null (the kept noise, eps_cache.h), else drawn.
  double (*weighted_mse)(DType dtype, const void* pred, void* grad, const float* eps_in, int64_t n, uint64_t g0,
                         float c, float w, RngKey key);
};

const KernelTable& kernels_scalar();
const KernelTable& kernels_avx2();    // call only when cpu_supports("avx2")
const KernelTable& kernels_avx512();  // call only when cpu_supports("avx512")

// "avx512" | "avx2" | "scalar": whether this CPU (and OS) can run that table.
bool cpu_supports(const char* isa);
// The table in use: the best supported one, unless select_isa() chose another.
const KernelTable& cpu_kernels();
// Force a table ("avx512" | "avx2" | "scalar") or go back to the best ("auto"); returns the
// name now in use. Throws std::invalid_argument for an unknown or unsupported name.
const char* select_isa(const char* isa);

}  // namespace speed_fast
