// The fused kernels for any CPU: one lane per "vector", the same arithmetic as the SIMD
// tables (explicit fused multiply-adds), so its noise is bit-identical to theirs.
#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace {

struct bf16_t;
struct f16_t;
inline float to_float(float x);
inline float to_float(bf16_t x);
inline float to_float(f16_t x);
template <class T>
inline T from_float(float f);

struct V {
  static constexpr int W = 1;
  using F = float;
  using I = uint32_t;
  using M = bool;

  static I iset(uint32_t v) { return v; }
  static I iload(const uint32_t* p) { return *p; }
  static void istore(void* p, I v) { __builtin_memcpy(p, &v, 4); }
  static I perm4() { return 0; }
  static I iota() { return 0; }
  static I add(I a, I b) { return a + b; }
  static I isub(I a, I b) { return a - b; }
  static I ixor(I a, I b) { return a ^ b; }
  static I iand(I a, I b) { return a & b; }
  static I ior(I a, I b) { return a | b; }
  template <int k>
  static I srai(I a) { return uint32_t(int32_t(a) >> k); }
  template <int k>
  static I srli(I a) { return a >> k; }
  template <int k>
  static I slli(I a) { return a << k; }
  static void mulhilo(uint32_t a, I b, I& hi, I& lo) {
    const uint64_t p = uint64_t(a) * b;
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
  }
  static M ieq(I a, I b) { return a == b; }
  static I igather_unless(M skip, I src, const int32_t* base, I idx) { return skip ? src : uint32_t(base[idx]); }

  static F fset(float v) { return v; }
  static F fload(const float* p) { return *p; }
  static void fstore(float* p, F v) { *p = v; }
  static F cvt(I a) { return float(int32_t(a)); }
  static I cvt_int(F a) { return uint32_t(int32_t(a)); }
  static F round(F a) { return std::nearbyint(a); }
  static F as_f(I a) {
    float f;
    __builtin_memcpy(&f, &a, 4);
    return f;
  }
  static I as_i(F a) {
    uint32_t u;
    __builtin_memcpy(&u, &a, 4);
    return u;
  }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F fma(F a, F b, F c) { return std::fma(a, b, c); }
  static F sqrt(F a) { return std::sqrt(a); }
  static F max(F a, F b) { return a > b ? a : b; }
  static M lt(F a, F b) { return a < b; }
  static F select(M m, F t, F f) { return m ? t : f; }
  static F gather(const float* base, I idx) { return base[idx]; }
  static float hsum(F a) { return a; }
  static void store4(float* out, F a, F b, F c, F d) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
  }

  template <class T>
  static F load(const T* p) { return to_float(*p); }
  template <class T>
  static void store(T* p, F v) { *p = from_float<T>(v); }
};

}  // namespace

#include "fused_impl.h"

namespace speed_fast {
const KernelTable& kernels_scalar() {
  static const KernelTable table = make_kernel_table<V>("scalar");
  return table;
}
}  // namespace speed_fast
