// The fused kernels compiled for AVX-512 (F, BW, DQ, VL): 16 float32 lanes per vector.
//
// `#pragma GCC target` rather than -march flags, so one build runs on any x86-64 CPU:
// dispatch.cpp calls kernels_avx512() only when the CPU reports these features.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")

namespace {

struct bf16_t;
struct f16_t;

struct V {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  static I iset(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static I iload(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void istore(void* p, I v) { _mm512_storeu_si512(p, v); }
  // Counter offsets: lane 4 k + j holds counter 4 j + k, so that store4's in-lane
  // transpose writes the four normals of consecutive counters to consecutive floats.
  static I perm4() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static I ior(I a, I b) { return _mm512_or_si512(a, b); }
  template <int k>
  static I srai(I a) { return _mm512_srai_epi32(a, k); }
  template <int k>
  static I srli(I a) { return _mm512_srli_epi32(a, k); }
  template <int k>
  static I slli(I a) { return _mm512_slli_epi32(a, k); }
  // 32x32 -> 64-bit products of a constant and every lane: even lanes and odd lanes separately.
  static void mulhilo(uint32_t a, I b, I& hi, I& lo) {
    const I va = _mm512_set1_epi32(int(a));
    const I even = _mm512_mul_epu32(va, b);
    const I odd = _mm512_mul_epu32(va, _mm512_srli_epi64(b, 32));
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  }
  // Philox4x32-10 on 16 counters held as two halves of 8 64-bit lanes (the low 32 bits
  // count): vpmuludq then gives hi and lo of each product without the blends that mulhilo
  // needs; the upper halves carry garbage that vpmuludq and the final pack ignore.
  static I lo8(I x) { return _mm512_cvtepu32_epi64(_mm512_castsi512_si256(x)); }
  static I hi8(I x) { return _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(x, 1)); }
  static void philox10(I& c0, I& c1, I& c2, I& c3, const uint32_t* k0, const uint32_t* k1) {
    const I A = _mm512_set1_epi64(0xD2511F53u), B = _mm512_set1_epi64(0xCD9E8D57u);
    I e0 = lo8(c0), e1 = lo8(c1), e2 = lo8(c2), e3 = lo8(c3);
    I o0 = hi8(c0), o1 = hi8(c1), o2 = hi8(c2), o3 = hi8(c3);
    for (int r = 0; r < 10; ++r) {
      const I ka = _mm512_set1_epi64(k0[r]), kb = _mm512_set1_epi64(k1[r]);
      const I pbe = _mm512_mul_epu32(B, e2), pae = _mm512_mul_epu32(A, e0);
      const I pbo = _mm512_mul_epu32(B, o2), pao = _mm512_mul_epu32(A, o0);
      e0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pbe, 32), e1, ka, 0x96);  // hi ^ c1 ^ k0
      e2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pae, 32), e3, kb, 0x96);
      o0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pbo, 32), o1, ka, 0x96);
      o2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pao, 32), o3, kb, 0x96);
      e1 = pbe;
      e3 = pae;
      o1 = pbo;
      o3 = pao;
    }
    const I pack = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    c0 = _mm512_permutex2var_epi32(e0, pack, o0);
    c1 = _mm512_permutex2var_epi32(e1, pack, o1);
    c2 = _mm512_permutex2var_epi32(e2, pack, o2);
    c3 = _mm512_permutex2var_epi32(e3, pack, o3);
  }
  static M ieq(I a, I b) { return _mm512_cmpeq_epi32_mask(a, b); }
  // Lanes in `skip` keep `src`; the others load base[idx] (and touch only their own cache lines).
  static I igather_unless(M skip, I src, const int32_t* base, I idx) {
    return _mm512_mask_i32gather_epi32(src, _knot_mask16(skip), idx, base, 4);
  }

  static F fset(float v) { return _mm512_set1_ps(v); }
  static F fload(const float* p) { return _mm512_loadu_ps(p); }
  static void fstore(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static I cvt_int(F a) { return _mm512_cvttps_epi32(a); }
  static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F as_f(I a) { return _mm512_castsi512_ps(a); }
  static I as_i(F a) { return _mm512_castps_si512(a); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static F select(M m, F t, F f) { return _mm512_mask_blend_ps(m, f, t); }
  static F gather(const float* base, I idx) { return _mm512_i32gather_ps(idx, base, 4); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }

  // 64-bit interleaves of float vectors (store4's second transpose step).
  static F lo_pd(F x, F y) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); }
  static F hi_pd(F x, F y) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); }
  static void store4(float* out, F a, F b, F c, F d) {
    const F ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
    const F cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
    _mm512_storeu_ps(out, lo_pd(ab_lo, cd_lo));
    _mm512_storeu_ps(out + 16, hi_pd(ab_lo, cd_lo));
    _mm512_storeu_ps(out + 32, lo_pd(ab_hi, cd_hi));
    _mm512_storeu_ps(out + 48, hi_pd(ab_hi, cd_hi));
  }

  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F load(const bf16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static void store(bf16_t* p, F v) {  // round to nearest even; NaN -> 0x7fc0 (torch's rule)
    const I u = _mm512_castps_si512(v);
    const I bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                    _mm512_set1_epi32(0x7fff));
    I r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
  }
  static F load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static void store(f16_t* p, F v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace

#include "fused_impl.h"

namespace speed_fast {
const KernelTable& kernels_avx512() {
  static const KernelTable table = make_kernel_table<V>("avx512");
  return table;
}
}  // namespace speed_fast

#pragma GCC pop_options

#else  // not x86: cpu_supports("avx512") is false, so this table is never selected.

namespace speed_fast {
const KernelTable& kernels_avx512() { return kernels_scalar(); }
}  // namespace speed_fast

#endif
