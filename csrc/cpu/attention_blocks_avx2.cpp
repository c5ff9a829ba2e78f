// The fp32 attention blocks (attention_blocks.h) compiled for AVX2 + FMA: the bodies of
// attention_block_bodies.h with the instruction-set trait below. Its 6 x 16 tiles hold 12
// accumulators in the 16 ymm registers, with 2 for the row of B and 1 for the broadcast.
//
// Every header with code of its own is included before the target pragma, so that only this file's
// functions, and the templates it instantiates with the trait, are compiled for AVX2 + FMA; a shared
// inline function compiled here would otherwise be merged with the baseline copy of other files.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention_blocks.h"
#include "common.h"
#include "fast_exp.h"

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
  static SMA_ALWAYS_INLINE Reg load(const float* x) { return _mm256_loadu_ps(x); }
  static SMA_ALWAYS_INLINE void store(float* x, Reg r) { _mm256_storeu_ps(x, r); }
  static SMA_ALWAYS_INLINE Reg broadcast(const float* x) { return _mm256_set1_ps(*x); }
  static SMA_ALWAYS_INLINE Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static SMA_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
};

}  // namespace

void forward_block_avx2(const ForwardBlock<float>& p) { forward_body<Avx2Isa>(p); }

void backward_block_avx2(const BackwardBlock<float>& p) { backward_body<Avx2Isa>(p); }

}  // namespace detail
}  // namespace sma_kernels::cpu
#endif
