// The fp32 attention blocks (attention_blocks.h) compiled for AVX-512: the bodies of
// attention_block_bodies.h with the instruction-set trait below. Its 8 x 32 tiles hold 16
// accumulators in the 32 zmm registers.
//
// Every header with code of its own is included before the target pragma, so that only this file's
// functions, and the templates it instantiates with the trait, are compiled for AVX-512; a shared
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
  static SMA_ALWAYS_INLINE Reg load(const float* x) { return _mm512_loadu_ps(x); }
  static SMA_ALWAYS_INLINE void store(float* x, Reg r) { _mm512_storeu_ps(x, r); }
  static SMA_ALWAYS_INLINE Reg broadcast(const float* x) { return _mm512_set1_ps(*x); }
  static SMA_ALWAYS_INLINE Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static SMA_ALWAYS_INLINE Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
};

}  // namespace

void forward_block_avx512(const ForwardBlock<float>& p) { forward_body<Avx512Isa>(p); }

void backward_block_avx512(const BackwardBlock<float>& p) { backward_body<Avx512Isa>(p); }

}  // namespace detail
}  // namespace sma_kernels::cpu
#endif
