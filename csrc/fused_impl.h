// The CPU kernels of the fused SpeeD step, written once over a SIMD interface `V`.
//
// Included by isa_avx512.cpp, isa_avx2.cpp and isa_scalar.cpp after each has defined its
// `V` (lane width W, float vector F, 32-bit integer vector I, lane mask M). Everything here
// lives in an anonymous namespace on purpose: each copy is compiled for a different
// instruction set, and shared (inline / template) symbols would let the linker merge an
// AVX-512 copy into the scalar path. Include only standard headers before this one.
//
// The semantics are those of speed_fast/rng.py and speed_fast/ops/_torch.py:
// Philox4x32-10 as Triton computes it, Triton's uint_to_uniform_float, and its
// pair_uniform_to_normal (Box-Muller). log/sin/cos are float32 polynomial approximations
// (Cephes), within a few ulp of libm, evaluated with the same fused multiply-adds on every
// instruction set, so the three tables produce bit-identical noise.
#pragma once

namespace {  // NOLINT: see above, one private copy per instruction set

using speed_fast::DType;
using speed_fast::RngKey;

constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kStreamNoise = 0;
constexpr uint32_t kStreamTimesteps = 1;
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kMinU = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;
// Elements per chunk of normals: 4 KiB of float32, so a chunk stays in L1 between
// generation and use. Chunk boundaries are multiples of kChunk in global element space.
constexpr int64_t kChunk = 1024;

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}

// Scalar conversions, used for segment tails and by the scalar table. Rounding is
// round-to-nearest-even, as torch's .to(bfloat16 / float16) does.
inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float f = float(man) * 0x1p-24f;
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = float_to_bits(f);
  if (f != f) return bf16_t{0x7fc0};
  return bf16_t{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <>
inline f16_t from_float<f16_t>(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return f16_t{uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (x >= 0x477ff000u) return f16_t{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                          // below 2^-14: subnormal half
    return f16_t{uint16_t(sign | uint16_t(__builtin_nearbyintf(bits_to_float(x) * 0x1p24f)))};
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias the exponent by -112, round to nearest even
  return f16_t{uint16_t(sign | (x >> 13))};
}

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The ten round keys of Philox4x32-10 for one seed.
struct Keys {
  uint32_t k0[10], k1[10];
  uint32_t step;
  explicit Keys(RngKey key) : step(key.step) {
    uint32_t a = uint32_t(key.seed), b = uint32_t(key.seed >> 32);
    for (int r = 0; r < 10; ++r) {
      k0[r] = a;
      k1[r] = b;
      a += kKeyA;
      b += kKeyB;
    }
  }
};

// Whether V brings its own Philox4x32-10 (a faster lane layout for its instruction set);
// the result must be the same words.
template <class V, class = void>
struct HasOwnPhilox {
  static constexpr bool value = false;
};
template <class V>
struct HasOwnPhilox<V, decltype(void(&V::philox10))> {
  static constexpr bool value = true;
};

template <class V>
struct Rng {
  using F = typename V::F;
  using I = typename V::I;

  // Counter words (lo, hi) of index base + offs[lane], carrying into the high word.
  static inline void counter(uint64_t base, I offs, uint32_t max_off, I& lo, I& hi) {
    const uint32_t b_lo = uint32_t(base);
    lo = V::add(V::iset(b_lo), offs);
    if (b_lo > 0xffffffffu - max_off) {  // rare: some lanes wrap into the high word
      alignas(64) uint32_t o[V::W], h[V::W];
      V::istore(o, offs);
      for (int l = 0; l < V::W; ++l) h[l] = uint32_t((base + o[l]) >> 32);
      hi = V::iload(h);
    } else {
      hi = V::iset(uint32_t(base >> 32));
    }
  }

  static inline void philox(I& c0, I& c1, I& c2, I& c3, const Keys& k) {
    if constexpr (HasOwnPhilox<V>::value) {
      V::philox10(c0, c1, c2, c3, k.k0, k.k1);
      return;
    }
    for (int r = 0; r < 10; ++r) {
      I hi_b, lo_b, hi_a, lo_a;
      V::mulhilo(kRoundB, c2, hi_b, lo_b);
      V::mulhilo(kRoundA, c0, hi_a, lo_a);
      c0 = V::ixor(V::ixor(hi_b, c1), V::iset(k.k0[r]));
      c1 = lo_b;
      c2 = V::ixor(V::ixor(hi_a, c3), V::iset(k.k1[r]));
      c3 = lo_a;
    }
  }

  // Triton's uint_to_uniform_float: int32 view, negatives x -> ~x, times 4.6566127342e-10.
  static inline F uniform(I r) {
    const I folded = V::ixor(r, V::template srai<31>(r));
    return V::mul(V::cvt(folded), V::fset(kUniformScale));
  }

  // Cephes logf for x in [1e-7, 1) (positive normal floats).
  static inline F log(F x) {
    const I xi = V::as_i(x);
    F e = V::cvt(V::isub(V::template srli<23>(xi), V::iset(126)));
    F m = V::as_f(V::ior(V::iand(xi, V::iset(0x007fffffu)), V::iset(0x3f000000u)));  // [0.5, 1)
    const typename V::M small = V::lt(m, V::fset(0.707106781186547524f));
    e = V::select(small, V::sub(e, V::fset(1.0f)), e);
    m = V::sub(V::select(small, V::add(m, m), m), V::fset(1.0f));
    const F z = V::mul(m, m);
    F y = V::fset(7.0376836292e-2f);
    y = V::fma(y, m, V::fset(-1.1514610310e-1f));
    y = V::fma(y, m, V::fset(1.1676998740e-1f));
    y = V::fma(y, m, V::fset(-1.2420140846e-1f));
    y = V::fma(y, m, V::fset(1.4249322787e-1f));
    y = V::fma(y, m, V::fset(-1.6668057665e-1f));
    y = V::fma(y, m, V::fset(2.0000714765e-1f));
    y = V::fma(y, m, V::fset(-2.4999993993e-1f));
    y = V::fma(y, m, V::fset(3.3333331174e-1f));
    y = V::mul(V::mul(y, m), z);
    y = V::fma(e, V::fset(-2.12194440e-4f), y);
    y = V::fma(z, V::fset(-0.5f), y);
    return V::fma(e, V::fset(0.693359375f), V::add(m, y));
  }

  // sin and cos of x in [0, 2 pi]: quadrant reduction (Cody-Waite, 3 parts), Cephes polynomials.
  static inline void sincos(F x, F& s, F& c) {
    const F q = V::round(V::mul(x, V::fset(0.636619772367581343f)));
    const I qi = V::cvt_int(q);
    F r = V::fma(q, V::fset(-1.5703125f), x);
    r = V::fma(q, V::fset(-4.837512969970703125e-4f), r);
    r = V::fma(q, V::fset(-7.54978995489188216e-8f), r);
    const F z = V::mul(r, r);
    F ps = V::fma(V::fset(-1.9515295891e-4f), z, V::fset(8.3321608736e-3f));
    ps = V::fma(ps, z, V::fset(-1.6666654611e-1f));
    const F sin_r = V::fma(ps, V::mul(z, r), r);
    F pc = V::fma(V::fset(2.443315711809948e-5f), z, V::fset(-1.388731625493765e-3f));
    pc = V::fma(pc, z, V::fset(4.166664568298827e-2f));
    const F cos_r = V::fma(pc, V::mul(z, z), V::fma(z, V::fset(-0.5f), V::fset(1.0f)));
    const typename V::M swap = V::ieq(V::iand(qi, V::iset(1)), V::iset(1));
    const I sin_sign = V::template slli<30>(V::iand(qi, V::iset(2)));
    const I cos_sign = V::template slli<30>(V::iand(V::add(qi, V::iset(1)), V::iset(2)));
    s = V::as_f(V::ixor(V::as_i(V::select(swap, cos_r, sin_r)), sin_sign));
    c = V::as_f(V::ixor(V::as_i(V::select(swap, sin_r, cos_r)), cos_sign));
  }

  // Triton's pair_uniform_to_normal.
  static inline void box_muller(F ua, F ub, F& n0, F& n1) {
    ua = V::max(ua, V::fset(kMinU));
    const F th = V::mul(V::fset(kTwoPi), ub);
    const F r = V::sqrt(V::mul(V::fset(-2.0f), log(ua)));
    F s, c;
    sincos(th, s, c);
    n0 = V::mul(r, c);
    n1 = V::mul(r, s);
  }

  // The 4 W normals of counters c .. c + W - 1, in element order: out[4 j + k] = n_k(c + j).
  static inline void normals_block(uint64_t c, const Keys& k, float* out) {
    I c0, c1;
    counter(c, V::perm4(), V::W - 1, c0, c1);
    I c2 = V::iset(k.step), c3 = V::iset(kStreamNoise);
    philox(c0, c1, c2, c3, k);
    F n0, n1, n2, n3;
    box_muller(uniform(c0), uniform(c1), n0, n1);
    box_muller(uniform(c2), uniform(c3), n2, n3);
    V::store4(out, n0, n1, n2, n3);
  }

  // buf[j] = eps of global element 4 (g0 >> 2) + j, covering [g0, g0 + n); buf must hold
  // n + 4 W + 4 floats. The caller reads eps(g0 + i) at buf[(g0 & 3) + i].
  static inline void normals_range(uint64_t g0, int64_t n, const Keys& k, float* buf) {
    const uint64_t c_begin = g0 >> 2, c_end = (g0 + uint64_t(n) + 3) >> 2;
    for (uint64_t c = c_begin; c < c_end; c += V::W) normals_block(c, k, buf + 4 * (c - c_begin));
  }
};

template <class V>
int64_t sample_timesteps_kernel(const float* prob, const int32_t* alias, uint32_t T, uint64_t first, int64_t n,
                                RngKey key, int64_t* t) {
  using R = Rng<V>;
  const Keys k(key);
  // Two passes over batches of draws: the first computes columns and coins and prefetches
  // prob[column], the second reads the tables. With a large T the tables live in L3 or DRAM,
  // and the misses of one batch then overlap the Philox work instead of following it.
  constexpr int64_t kBatch = 512;
  alignas(64) int32_t column[kBatch];
  alignas(64) float coin[kBatch];
  alignas(64) int32_t pick[kBatch];
  for (int64_t i0 = 0; i0 < n; i0 += kBatch) {
    const int64_t m = imin(kBatch, n - i0);
    for (int64_t i = 0; i < m; i += V::W) {
      typename V::I c0, c1;
      R::counter(first + uint64_t(i0 + i), V::iota(), V::W - 1, c0, c1);
      typename V::I c2 = V::iset(k.step), c3 = V::iset(kStreamTimesteps);
      R::philox(c0, c1, c2, c3, k);
      typename V::I hi, lo;
      V::mulhilo(T, c0, hi, lo);  // column = floor(r0 * T / 2^32) < T
      V::istore(column + i, hi);
      V::fstore(coin + i, R::uniform(c1));
      for (int l = 0; l < V::W; ++l) __builtin_prefetch(prob + column[i + l]);
    }
    for (int64_t i = 0; i < m; i += V::W) {
      const typename V::I col = V::iload(reinterpret_cast<const uint32_t*>(column + i));
      // alias[c] is read only by the lanes that need it: most draws of a typical P keep c.
      const typename V::M keep = V::lt(V::fload(coin + i), V::gather(prob, col));
      V::istore(pick + i, V::igather_unless(keep, col, alias, col));
    }
    for (int64_t j = 0; j < m; ++j) {
      if (uint32_t(pick[j]) >= T) return i0 + j;
      t[i0 + j] = pick[j];
    }
  }
  return -1;
}

template <class V>
void normals_kernel(uint64_t g0, int64_t n, RngKey key, float* eps) {
  const Keys k(key);
  alignas(64) float buf[kChunk + 4 * V::W + 4];
  for (int64_t i = 0; i < n;) {
    const uint64_t g = g0 + uint64_t(i);
    const int64_t m = imin(n - i, kChunk - int64_t(g % kChunk));
    Rng<V>::normals_range(g, m, k, buf);
    __builtin_memcpy(eps + i, buf + (g & 3), size_t(m) * sizeof(float));
    i += m;
  }
}

template <class V, class T>
void add_noise_segment(const T* x0, T* xt, float* eps_out, int64_t n, uint64_t g0, float a, float s, const Keys& k) {
  alignas(64) float buf[kChunk + 4 * V::W + 4];
  const typename V::F va = V::fset(a), vs = V::fset(s);
  for (int64_t i = 0; i < n;) {
    const uint64_t g = g0 + uint64_t(i);
    const int64_t m = imin(n - i, kChunk - int64_t(g % kChunk));
    Rng<V>::normals_range(g, m, k, buf);
    const float* e = buf + (g & 3);
    if (eps_out != nullptr) __builtin_memcpy(eps_out + i, e, size_t(m) * sizeof(float));
    const T* x = x0 + i;
    T* y = xt + i;
    int64_t j = 0;
    for (; j + V::W <= m; j += V::W) {
      V::store(y + j, V::add(V::mul(va, V::load(x + j)), V::mul(vs, V::fload(e + j))));
    }
    for (; j < m; ++j) y[j] = from_float<T>(a * to_float(x[j]) + s * e[j]);
    i += m;
  }
}

template <class V, class T>
double weighted_mse_segment(const T* pred, T* grad, const float* eps_in, int64_t n, uint64_t g0, float c, float w,
                            const Keys& k) {
  alignas(64) float buf[kChunk + 4 * V::W + 4];
  const typename V::F vc = V::fset(c), vw = V::fset(w);
  double total = 0.0;
  for (int64_t i = 0; i < n;) {
    const uint64_t g = g0 + uint64_t(i);
    const int64_t m = imin(n - i, kChunk - int64_t(g % kChunk));
    const float* e = eps_in + i;
    if (eps_in == nullptr) {
      Rng<V>::normals_range(g, m, k, buf);
      e = buf + (g & 3);
    }
    const T* p = pred + i;
    T* gr = grad + i;
    typename V::F acc = V::fset(0.0f);
    int64_t j = 0;
    for (; j + V::W <= m; j += V::W) {
      const typename V::F d = V::sub(V::load(p + j), V::fload(e + j));
      acc = V::fma(d, d, acc);
      V::store(gr + j, V::mul(V::mul(d, vc), vw));
    }
    float tail = 0.0f;
    for (; j < m; ++j) {
      const float d = to_float(p[j]) - e[j];
      tail += d * d;
      gr[j] = from_float<T>((d * c) * w);
    }
    total += double(V::hsum(acc)) + double(tail);
    i += m;
  }
  return total;
}

template <class V>
void add_noise_kernel(DType dtype, const void* x0, void* xt, float* eps_out, int64_t n, uint64_t g0, float a, float s,
                      RngKey key) {
  const Keys k(key);
  switch (dtype) {
    case DType::f32:
      return add_noise_segment<V>(static_cast<const float*>(x0), static_cast<float*>(xt), eps_out, n, g0, a, s, k);
    case DType::bf16:
      return add_noise_segment<V>(static_cast<const bf16_t*>(x0), static_cast<bf16_t*>(xt), eps_out, n, g0, a, s, k);
    case DType::f16:
      return add_noise_segment<V>(static_cast<const f16_t*>(x0), static_cast<f16_t*>(xt), eps_out, n, g0, a, s, k);
  }
}

template <class V>
double weighted_mse_kernel(DType dtype, const void* pred, void* grad, const float* eps_in, int64_t n, uint64_t g0,
                           float c, float w, RngKey key) {
  const Keys k(key);
  switch (dtype) {
    case DType::f32:
      return weighted_mse_segment<V>(static_cast<const float*>(pred), static_cast<float*>(grad), eps_in, n, g0, c, w,
                                     k);
    case DType::bf16:
      return weighted_mse_segment<V>(static_cast<const bf16_t*>(pred), static_cast<bf16_t*>(grad), eps_in, n, g0, c,
                                     w, k);
    case DType::f16:
      return weighted_mse_segment<V>(static_cast<const f16_t*>(pred), static_cast<f16_t*>(grad), eps_in, n, g0, c, w,
                                     k);
  }
  return 0.0;
}

template <class V>
speed_fast::KernelTable make_kernel_table(const char* name) {
  return speed_fast::KernelTable{name, &sample_timesteps_kernel<V>, &normals_kernel<V>, &add_noise_kernel<V>,
                                 &weighted_mse_kernel<V>};
}

}  // namespace
