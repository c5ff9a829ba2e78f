// The fp32 attention blocks (attention_blocks.h) compiled for AVX2 + FMA: the bodies of
// attention_block_bodies.h with the instruction-set trait below (vector_isa.h). Its 6 x 16 tiles hold
// 12 accumulators in the 16 ymm registers, with 2 for the row of B and 1 for the broadcast.
//
// Every header with code of its own is included before the target pragma, so that only this file's
// functions, and the templates it instantiates with the trait, are compiled for AVX2; a shared
// inline function compiled here would otherwise be merged with the baseline copy of other files.
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
#pragma GCC target("avx2,fma")

#include "attention_block_bodies.h"
#include "gemm_tiles.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {
namespace {

struct Avx2Isa {
  using Elem = float;
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRows = 6;
  static constexpr int kVecs = 2;
  static SMA_ALWAYS_INLINE Reg zero() { return _mm256_setzero_ps(); }
  static SMA_ALWAYS_INLINE Reg set1(float x) { return _mm256_set1_ps(x); }
  static SMA_ALWAYS_INLINE Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static SMA_ALWAYS_INLINE void store(float* p, Reg x) { _mm256_storeu_ps(p, x); }
  static SMA_ALWAYS_INLINE Reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static SMA_ALWAYS_INLINE Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SMA_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
  static SMA_ALWAYS_INLINE Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  // x clamped to [ln(FLT_MIN), 0] (max and min pass NaN on as their second operand), 2^n built in the
  // exponent bits, and 0 where x was below ln(FLT_MIN).
  static SMA_ALWAYS_INLINE Reg exp(Reg x) {
    using namespace exp_poly;
    const Reg low = set1(-87.33654475f);
    const Reg xc = _mm256_min_ps(zero(), _mm256_max_ps(low, x));
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const Reg n = _mm256_round_ps(_mm256_mul_ps(xc, set1(kLog2e)), kNearest);
    Reg r = _mm256_fnmadd_ps(n, set1(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, set1(kLn2Lo), r);
    Reg p = set1(kP0);
    p = fmadd(p, r, set1(kP1));
    p = fmadd(p, r, set1(kP2));
    p = fmadd(p, r, set1(kP3));
    p = fmadd(p, r, set1(kP4));
    p = fmadd(p, r, set1(kP5));
    const Reg y = _mm256_add_ps(fmadd(p, _mm256_mul_ps(r, r), r), set1(1.f));
    const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    const __m256i bits = _mm256_slli_epi32(exponent, 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(bits)), _mm256_cmp_ps(x, low, _CMP_NLT_UQ));
  }
};

}  // namespace

void forward_block_avx2(const ForwardBlock<float>& p) { forward_body<Avx2Isa>(p); }

void backward_block_avx2(const BackwardBlock<float>& p) { backward_body<Avx2Isa>(p); }

}  // namespace detail
}  // namespace sma_kernels::cpu
#endif
