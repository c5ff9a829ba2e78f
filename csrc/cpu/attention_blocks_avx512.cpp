// The fp32 attention blocks (attention_blocks.h) compiled for AVX-512: the bodies of
// attention_block_bodies.h with the instruction-set trait below (vector_isa.h). Its 8 x 32 tiles hold
// 16 accumulators in the 32 zmm registers.
//
// Every header with code of its own is included before the target pragma, so that only this file's
// functions, and the templates it instantiates with the trait, are compiled for AVX-512; a shared
// inline function compiled here would otherwise be merged with the baseline copy of other files.
//
// GCC 12 warns "may be used uninitialized" inside its own AVX-512 intrinsics (the undefined
// pass-through operand of their masked forms, GCC bug 105593), at the intrinsics' lines, so the
// warning is silenced for this file before they are included.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention_blocks.h"
#include "common.h"
#include "fast_exp.h"
#include "vector_isa.h"

#ifdef SMA_ATTENTION_SIMD
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")

#include "attention_block_bodies.h"
#include "gemm_tiles.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {
namespace {

struct Avx512Isa {
  using Elem = float;
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRows = 8;
  static constexpr int kVecs = 2;
  static SMA_ALWAYS_INLINE Reg zero() { return _mm512_setzero_ps(); }
  static SMA_ALWAYS_INLINE Reg set1(float x) { return _mm512_set1_ps(x); }
  static SMA_ALWAYS_INLINE Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static SMA_ALWAYS_INLINE void store(float* p, Reg x) { _mm512_storeu_ps(p, x); }
  static SMA_ALWAYS_INLINE Reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static SMA_ALWAYS_INLINE Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static SMA_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  // x clamped to [-110, 0] (max and min pass NaN on as their second operand), then scaled by 2^n with
  // vscalefps, which underflows to exactly 0 for n <= -159, i.e. below -110 and at -inf.
  static SMA_ALWAYS_INLINE Reg exp(Reg x) {
    using namespace exp_poly;
    const Reg xc = _mm512_min_ps(zero(), _mm512_max_ps(set1(-110.f), x));
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const Reg n = _mm512_roundscale_ps(_mm512_mul_ps(xc, set1(kLog2e)), kNearest);
    Reg r = _mm512_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, set1(kLn2Lo), r);
    Reg p = set1(kP0);
    p = fmadd(p, r, set1(kP1));
    p = fmadd(p, r, set1(kP2));
    p = fmadd(p, r, set1(kP3));
    p = fmadd(p, r, set1(kP4));
    p = fmadd(p, r, set1(kP5));
    const Reg y = _mm512_add_ps(fmadd(p, _mm512_mul_ps(r, r), r), set1(1.f));
    return _mm512_scalef_ps(y, n);
  }
};

}  // namespace

void forward_block_avx512(const ForwardBlock<float>& p) { forward_body<Avx512Isa>(p); }

void backward_block_avx512(const BackwardBlock<float>& p) { backward_body<Avx512Isa>(p); }

}  // namespace detail
}  // namespace sma_kernels::cpu
#endif
