// The fused kernels compiled for AVX2 + FMA + F16C: 8 float32 lanes per vector.
//
// `#pragma GCC target` rather than -march flags, so one build runs on any x86-64 CPU:
// dispatch.cpp calls kernels_avx2() only when the CPU reports these features.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace {

struct bf16_t;
struct f16_t;

struct V {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // all-ones lanes

  static I iset(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static I iload(const uint32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static void istore(void* p, I v) { _mm256_storeu_si256((__m256i*)p, v); }
  // Counter offsets: lane 4 k + j holds counter 2 j + k (see store4).
  static I perm4() { return _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static I ior(I a, I b) { return _mm256_or_si256(a, b); }
  template <int k>
  static I srai(I a) { return _mm256_srai_epi32(a, k); }
  template <int k>
  static I srli(I a) { return _mm256_srli_epi32(a, k); }
  template <int k>
  static I slli(I a) { return _mm256_slli_epi32(a, k); }
  static void mulhilo(uint32_t a, I b, I& hi, I& lo) {
    const I va = _mm256_set1_epi32(int(a));
    const I even = _mm256_mul_epu32(va, b);
    const I odd = _mm256_mul_epu32(va, _mm256_srli_epi64(b, 32));
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  static M ieq(I a, I b) { return _mm256_cmpeq_epi32(a, b); }
  // Lanes in `skip` keep `src`; the others load base[idx] (and touch only their own cache lines).
  static I igather_unless(M skip, I src, const int32_t* base, I idx) {
    return _mm256_mask_i32gather_epi32(src, base, idx, _mm256_xor_si256(skip, _mm256_set1_epi32(-1)), 4);
  }

  static F fset(float v) { return _mm256_set1_ps(v); }
  static F fload(const float* p) { return _mm256_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static I cvt_int(F a) { return _mm256_cvttps_epi32(a); }
  static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F as_f(I a) { return _mm256_castsi256_ps(a); }
  static I as_i(F a) { return _mm256_castps_si256(a); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static M lt(F a, F b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static F select(M m, F t, F f) { return _mm256_blendv_ps(f, t, _mm256_castsi256_ps(m)); }
  static F gather(const float* base, I idx) { return _mm256_i32gather_ps(base, idx, 4); }
  static float hsum(F a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }

  // 64-bit interleaves of float vectors (store4's second transpose step).
  static F lo_pd(F x, F y) { return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(x), _mm256_castps_pd(y))); }
  static F hi_pd(F x, F y) { return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(x), _mm256_castps_pd(y))); }
  static void store4(float* out, F a, F b, F c, F d) {
    const F ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
    const F cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
    _mm256_storeu_ps(out, lo_pd(ab_lo, cd_lo));
    _mm256_storeu_ps(out + 8, hi_pd(ab_lo, cd_lo));
    _mm256_storeu_ps(out + 16, lo_pd(ab_hi, cd_hi));
    _mm256_storeu_ps(out + 24, hi_pd(ab_hi, cd_hi));
  }

  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F load(const bf16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static void store(bf16_t* p, F v) {  // round to nearest even; NaN -> 0x7fc0 (torch's rule)
    const I u = _mm256_castps_si256(v);
    const I bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                    _mm256_set1_epi32(0x7fff));
    I r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const I packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // qwords 0 and 2
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
  }
  static F load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static void store(f16_t* p, F v) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace

#include "fused_impl.h"

namespace speed_fast {
const KernelTable& kernels_avx2() {
  static const KernelTable table = make_kernel_table<V>("avx2");
  return table;
}
}  // namespace speed_fast

#pragma GCC pop_options

#else  // not x86: cpu_supports("avx2") is false, so this table is never selected.

namespace speed_fast {
const KernelTable& kernels_avx2() { return kernels_scalar(); }
}  // namespace speed_fast

#endif
