// The bodies of the attention blocks (attention_blocks.h), templated on the instruction-set trait of
// gemm_tiles.h. Included by the file of each instruction set (attention_blocks.cpp for plain C++,
// attention_blocks_avx2.cpp, attention_blocks_avx512.cpp) after its target pragma, so that each copy
// is compiled for its own target. Everything here has internal linkage: the copies never merge.
//
// Determinism: every sum runs in a fixed order (each product's depth in order, each row's sums in
// the compiler's fixed vector order), the same on every call, whichever thread runs the block.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention_blocks.h"
#include "common.h"
#include "fast_exp.h"
#include "gemm_tiles.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {
namespace {

// exp(x) for x <= 0 (a logit minus its row's max or log-sum-exp): the vectorizable polynomial in fp32.
template <typename T>
SMA_ALWAYS_INLINE T exp_le0(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return exp_nonpositive_approx(x);
  } else {
    return std::exp(x);
  }
}

template <typename Isa>
SMA_ALWAYS_INLINE void forward_body(const ForwardBlock<typename Isa::Elem>& p) {
  using T = typename Isa::Elem;
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  const int64_t rows = p.rows, dim_v_pad = p.dim_v_pad;
  for (int64_t r = 0; r < rows; ++r) {
    p.row_max[r] = kMinusInf;
    p.row_sum[r] = T(0);
  }
  for (int64_t i = 0; i < rows * dim_v_pad; ++i) {
    p.acc[i] = T(0);
  }
  for (int64_t first = 0, step = 0; first < p.count; first += kForwardKeys, ++step) {
    const int64_t width = p.count - first < kForwardKeys ? p.count - first : kForwardKeys;
    const int64_t columns = round_up(width, kAlign);
    const T* keys_t = p.keys_t + step * p.dim * kForwardKeys;
    const T* values = p.values + step * kForwardKeys * dim_v_pad;
    // S = Qs K^T over the step's keys (rounded up to kAlign columns; the extra ones are not read).
    gemm<Isa>(rows, columns, p.dim, {p.queries, p.dim_pad, 1}, keys_t, columns, p.scores, kForwardKeys,
              false);
    for (int64_t r = 0; r < rows; ++r) {
      T* s = p.scores + r * kForwardKeys;
      T step_max = kMinusInf;
#pragma omp simd reduction(max : step_max)
      for (int64_t j = 0; j < width; ++j) {
        step_max = s[j] > step_max ? s[j] : step_max;
      }
      const T old_max = p.row_max[r];
      const T new_max = step_max > old_max ? step_max : old_max;
      T step_sum = T(0);
#pragma omp simd reduction(+ : step_sum)
      for (int64_t j = 0; j < width; ++j) {
        s[j] = exp_le0(s[j] - new_max);
        step_sum += s[j];
      }
      // The first step rescales an all-zero accumulator by exp(-inf) = 0.
      const T alpha = exp_le0(old_max - new_max);
      p.row_sum[r] = p.row_sum[r] * alpha + step_sum;
      p.row_max[r] = new_max;
      if (alpha != T(1)) {
        T* out = p.acc + r * dim_v_pad;
#pragma omp simd
        for (int64_t c = 0; c < dim_v_pad; ++c) {
          out[c] *= alpha;
        }
      }
    }
    // O += P V over the step's keys.
    gemm<Isa>(rows, dim_v_pad, width, {p.scores, kForwardKeys, 1}, values, dim_v_pad, p.acc, dim_v_pad,
              true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T inverse = T(1) / p.row_sum[r];
    T* out = p.acc + r * dim_v_pad;
#pragma omp simd
    for (int64_t c = 0; c < dim_v_pad; ++c) {
      out[c] *= inverse;
    }
    p.lse[r] = p.row_max[r] + std::log(p.row_sum[r]);
  }
}

template <typename Isa>
SMA_ALWAYS_INLINE void backward_body(const BackwardBlock<typename Isa::Elem>& p) {
  using T = typename Isa::Elem;
  const int64_t count = p.count, width = round_up(p.count, kAlign);
  for (int64_t i = 0; i < count * p.dim_pad; ++i) {
    p.grad_keys[i] = T(0);
  }
  for (int64_t i = 0; i < count * p.dim_v_pad; ++i) {
    p.grad_values[i] = T(0);
  }
  for (int64_t first = 0; first < p.queries; first += kBackwardRows) {
    const int64_t rows = p.queries - first < kBackwardRows ? p.queries - first : kBackwardRows;
    const T* q_scaled = p.q_scaled + first * p.dim_pad;
    const T* grad_out = p.grad_out + first * p.dim_v_pad;
    // P = exp(Qs K^T - lse); zero on the padding columns, which the transposed products read.
    gemm<Isa>(rows, width, p.dim, {q_scaled, p.dim_pad, 1}, p.keys_t, kBackwardKeys, p.probs, kBackwardKeys,
              false);
    for (int64_t r = 0; r < rows; ++r) {
      T* prob = p.probs + r * kBackwardKeys;
      const T lse = p.lse[first + r];
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        prob[j] = exp_le0(prob[j] - lse);
      }
      for (int64_t j = count; j < width; ++j) {
        prob[j] = T(0);
      }
    }
    // dV += P^T dO.
    gemm<Isa>(count, p.dim_v_pad, rows, {p.probs, 1, kBackwardKeys}, grad_out, p.dim_v_pad, p.grad_values,
              p.dim_v_pad, true);
    // dP = dO V^T, then dS = P (dP - D) in place; zero on the padding columns.
    gemm<Isa>(rows, width, p.dim_v, {grad_out, p.dim_v_pad, 1}, p.values_t, kBackwardKeys, p.grad_logits,
              kBackwardKeys, false);
    for (int64_t r = 0; r < rows; ++r) {
      const T* prob = p.probs + r * kBackwardKeys;
      T* grad = p.grad_logits + r * kBackwardKeys;
      const T delta = p.delta[first + r];
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        grad[j] = prob[j] * (grad[j] - delta);
      }
      for (int64_t j = count; j < width; ++j) {
        grad[j] = T(0);
      }
    }
    // dK += dS^T Qs; dQ' += dS K.
    gemm<Isa>(count, p.dim_pad, rows, {p.grad_logits, 1, kBackwardKeys}, q_scaled, p.dim_pad, p.grad_keys,
              p.dim_pad, true);
    gemm<Isa>(rows, p.dim_pad, count, {p.grad_logits, kBackwardKeys, 1}, p.keys, p.dim_pad,
              p.grad_queries + first * p.dim_pad, p.dim_pad, true);
  }
}

}  // namespace
}  // namespace detail
}  // namespace sma_kernels::cpu
