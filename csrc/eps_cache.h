// The kept-noise cache of the cpp backend: sample_and_noise keeps the float32 noise of one
// batch for the weighted_mse of the same step (eps_cache.cpp).
//
// On a CPU drawing normals costs more than a pass over memory (on the 2-core CI machine,
// torch.randn_like of 1M floats takes ~2.6 ms, a memory pass over them ~0.1 ms), so reading eps
// back is faster than drawing it again; the values are the same either way. At most one batch is kept, only for float32
// batches (for 16-bit ones it would take two latent-sized buffers), and weighted_mse takes it
// out. torch.ops.speed_fast.cpp_keep_eps switches the cache off and on (to measure both ways),
// cpp_eps_cache_hits counts the losses that read kept noise (to test that they do); the Python
// side wraps both in speed_fast.ops._cpp.keep_noise / eps_cache_hits.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace speed_fast {

// What a kept batch was drawn for: the RNG coordinates and the batch shape [B, D].
struct EpsKey {
  uint64_t seed;
  uint32_t step;
  int64_t offset, B, D;
  bool operator==(const EpsKey& o) const {
    return seed == o.seed && step == o.step && offset == o.offset && B == o.B && D == o.D;
  }
};

// Keep eps (float32 [B * D]) for `key`, replacing whatever was kept.
void keep_eps(const EpsKey& key, at::Tensor eps);
// The kept noise of `key`, removed from the cache (a hit); undefined if none is kept for it.
at::Tensor take_eps(const EpsKey& key);
// Whether sample_and_noise should keep its noise (cpp_keep_eps switches it).
bool keep_eps_enabled();

}  // namespace speed_fast
