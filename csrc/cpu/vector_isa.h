// Instruction-set traits of the attention over kept keys: the few vector operations that its blocks
// (attention_block_bodies.h) and their products (gemm_tiles.h) are written with, so that one body
// serves every instruction set.
//
// A trait has Elem (the element type), Reg (a register of kWidth elements), the register tile of the
// products (kRows rows by kVecs registers), and
//   zero(), set1(x), load(p), store(p, r), broadcast(p) (one element read and repeated),
//   add, sub, mul, max, fmadd(a, b, c) = a * b + c,
//   exp(r) for r <= 0 (a logit minus its max or its log-sum-exp; tiny positive values from rounding
//   are fine): exactly 0 at -inf (the backward's padding columns, where lse = +inf), NaN stays NaN.
// ScalarIsa below is plain C++ for any CPU (and fp64 everywhere). The AVX2 + FMA and AVX-512 traits
// live in the files compiled for those targets (attention_blocks_avx2.cpp, attention_blocks_avx512.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "fast_exp.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

// The exp of the SIMD traits: Cody-Waite reduction x = n ln2 + r, then Cephes' expf polynomial for
// e^r on |r| <= ln2 / 2 (as fast_exp.h), then the scaling by 2^n.
namespace exp_poly {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f;
constexpr float kP1 = 1.3981999507e-3f;
constexpr float kP2 = 8.3334519073e-3f;
constexpr float kP3 = 4.1665795894e-2f;
constexpr float kP4 = 1.6666665459e-1f;
constexpr float kP5 = 5.0000001201e-1f;
}  // namespace exp_poly

// Plain C++ for any CPU: with GCC or clang a "register" is a 16-byte vector of their vector
// extension, which becomes an SSE2 or NEON register; otherwise a single element. The 4 x 2 tile
// keeps its 8 accumulators, the row of B and the broadcast within 16 such registers.
template <typename T>
struct ScalarIsa {
  using Elem = T;
#if defined(__GNUC__) || defined(__clang__)
  typedef T Reg __attribute__((vector_size(16)));
  static constexpr int kWidth = static_cast<int>(16 / sizeof(T));
  static constexpr int kVecs = 2;
#else
  using Reg = T;
  static constexpr int kWidth = 1;
  static constexpr int kVecs = 4;
#endif
  static constexpr int kRows = 4;

  static SMA_ALWAYS_INLINE Reg zero() { return Reg{} + T(0); }
  static SMA_ALWAYS_INLINE Reg set1(T x) { return Reg{} + x; }
  static SMA_ALWAYS_INLINE Reg load(const T* p) {
    Reg r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  static SMA_ALWAYS_INLINE void store(T* p, Reg x) { std::memcpy(p, &x, sizeof(x)); }
  static SMA_ALWAYS_INLINE Reg broadcast(const T* p) { return Reg{} + *p; }
  static SMA_ALWAYS_INLINE Reg fmadd(Reg a, Reg b, Reg c) { return a * b + c; }
  static SMA_ALWAYS_INLINE Reg add(Reg a, Reg b) { return a + b; }
  static SMA_ALWAYS_INLINE Reg sub(Reg a, Reg b) { return a - b; }
  static SMA_ALWAYS_INLINE Reg mul(Reg a, Reg b) { return a * b; }
  static SMA_ALWAYS_INLINE Reg max(Reg a, Reg b) {
    T x[kWidth], y[kWidth];
    std::memcpy(x, &a, sizeof(a));
    std::memcpy(y, &b, sizeof(b));
    for (int i = 0; i < kWidth; ++i) {
      x[i] = y[i] > x[i] ? y[i] : x[i];
    }
    return load(x);
  }
  static SMA_ALWAYS_INLINE Reg exp(Reg a) {
    T x[kWidth];
    std::memcpy(x, &a, sizeof(a));
    for (int i = 0; i < kWidth; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        x[i] = exp_nonpositive(x[i]);
      } else {
        x[i] = std::exp(x[i]);
      }
    }
    return load(x);
  }
};

}  // namespace detail
}  // namespace sma_kernels::cpu
