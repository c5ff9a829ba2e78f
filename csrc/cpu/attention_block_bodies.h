// The bodies of the attention blocks (attention_blocks.h), templated on the instruction-set trait of
// vector_isa.h. Included by the file of each instruction set (attention_blocks.cpp for plain C++,
// attention_blocks_avx2.cpp, attention_blocks_avx512.cpp) after its target pragma, so that each copy
// is compiled for its own target. Everything here has internal linkage: the copies never merge.
//
// Determinism: every sum runs in a fixed order (each product's depth in order, the softmax's max and
// sums down each column of S^T in key order), the same on every call, whichever thread runs it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "attention_blocks.h"
#include "common.h"
#include "gemm_tiles.h"
#include "vector_isa.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {
namespace {

// The forward of one block of query rows (attention_blocks.h, ForwardBlock).
template <typename Isa>
SMA_ALWAYS_INLINE void forward_body(const ForwardBlock<typename Isa::Elem>& p) {
  using T = typename Isa::Elem;
  using Reg = typename Isa::Reg;
  constexpr int64_t W = Isa::kWidth;
  constexpr int64_t R = kForwardRows;
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  static_assert(kAlign % W == 0, "query columns come in whole registers");
  const int64_t rows = p.rows, columns = round_up(rows, kAlign), dim_v_pad = p.dim_v_pad;
  // Per query column: the running max and sum of exp(s - max), and the step's rescaling factor.
  // Columns past `rows` (whatever queries_t holds there) are computed like the others, independently
  // of them, and not written out.
  T row_max[R], row_sum[R], alpha[R];
  for (int64_t i = 0; i < R; ++i) {
    row_max[i] = kMinusInf;
    row_sum[i] = T(0);
  }
  for (int64_t i = 0; i < rows * dim_v_pad; ++i) {
    p.acc[i] = T(0);
  }
  for (int64_t first = 0; first < p.count; first += kForwardKeys) {
    const int64_t width = p.count - first < kForwardKeys ? p.count - first : kForwardKeys;
    // S^T = K Qs^T over the step's keys.
    gemm<Isa>(width, columns, p.dim, {p.keys + first * p.dim, p.dim, 1}, p.queries_t, R, p.scores, R, false);
    // Down each column: the new max, the rescaling of the old sum, P^T = exp(S^T - max) and its sum.
    for (int64_t i = 0; i < columns; i += W) {
      Reg top = Isa::load(p.scores + i);
      for (int64_t k = 1; k < width; ++k) {
        top = Isa::max(top, Isa::load(p.scores + k * R + i));
      }
      const Reg old_max = Isa::load(row_max + i);
      const Reg new_max = Isa::max(top, old_max);
      const Reg rescale = Isa::exp(Isa::sub(old_max, new_max));  // 0 on the first step (-inf)
      // Four partial sums, keys k = 0, 1, 2, 3 (mod 4), added at the end: a quarter of the rounding
      // of one running sum, and independent additions.
      Reg sums[4] = {Isa::zero(), Isa::zero(), Isa::zero(), Isa::zero()};
      for (int64_t k = 0; k < width; ++k) {
        const Reg e = Isa::exp(Isa::sub(Isa::load(p.scores + k * R + i), new_max));
        Isa::store(p.scores + k * R + i, e);
        sums[k % 4] = Isa::add(sums[k % 4], e);
      }
      const Reg sum = Isa::add(Isa::add(sums[0], sums[1]), Isa::add(sums[2], sums[3]));
      Isa::store(row_max + i, new_max);
      Isa::store(alpha + i, rescale);
      Isa::store(row_sum + i, Isa::fmadd(Isa::load(row_sum + i), rescale, sum));
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (alpha[r] != T(1)) {
        T* out = p.acc + r * dim_v_pad;
        for (int64_t c = 0; c < dim_v_pad; ++c) {
          out[c] *= alpha[r];
        }
      }
    }
    // O += P V over the step's keys: P(r, k) is S^T[k][r].
    gemm<Isa>(rows, dim_v_pad, width, {p.scores, 1, R}, p.values + first * dim_v_pad, dim_v_pad, p.acc,
              dim_v_pad, true);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T inverse = T(1) / row_sum[r];
    T* out = p.acc + r * dim_v_pad;
    for (int64_t c = 0; c < dim_v_pad; ++c) {
      out[c] *= inverse;
    }
    p.lse[r] = row_max[r] + std::log(row_sum[r]);
  }
}

// The backward of one block of keys (attention_blocks.h, BackwardBlock).
template <typename Isa>
SMA_ALWAYS_INLINE void backward_body(const BackwardBlock<typename Isa::Elem>& p) {
  using T = typename Isa::Elem;
  using Reg = typename Isa::Reg;
  constexpr int64_t W = Isa::kWidth;
  constexpr int64_t R = kBackwardRows;
  const int64_t count = p.count;
  for (int64_t i = 0; i < count * p.dim_pad; ++i) {
    p.grad_keys[i] = T(0);
  }
  for (int64_t i = 0; i < count * p.dim_v_pad; ++i) {
    p.grad_values[i] = T(0);
  }
  for (int64_t first = 0; first < p.queries; first += R) {
    const int64_t rows = p.queries - first < R ? p.queries - first : R;
    const int64_t columns = round_up(rows, kAlign);
    // P^T = exp(K Qs^T - lse): exactly 0 in the padding columns, where lse = +inf.
    gemm<Isa>(count, columns, p.dim, {p.keys, p.dim_pad, 1}, p.q_scaled_t + first * p.dim, R, p.probs, R,
              false);
    for (int64_t k = 0; k < count; ++k) {
      T* prob = p.probs + k * R;
      for (int64_t i = 0; i < columns; i += W) {
        Isa::store(prob + i, Isa::exp(Isa::sub(Isa::load(prob + i), Isa::load(p.lse + first + i))));
      }
    }
    // dV += P^T dO.
    gemm<Isa>(count, p.dim_v_pad, rows, {p.probs, R, 1}, p.grad_out + first * p.dim_v_pad, p.dim_v_pad,
              p.grad_values, p.dim_v_pad, true);
    // dP^T = V dO^T, then dS^T = P^T (dP^T - D) in place.
    gemm<Isa>(count, columns, p.dim_v, {p.values, p.dim_v_pad, 1}, p.grad_out_t + first * p.dim_v, R,
              p.grad_logits, R, false);
    for (int64_t k = 0; k < count; ++k) {
      const T* prob = p.probs + k * R;
      T* grad = p.grad_logits + k * R;
      for (int64_t i = 0; i < columns; i += W) {
        const Reg d_prob = Isa::sub(Isa::load(grad + i), Isa::load(p.delta + first + i));
        Isa::store(grad + i, Isa::mul(Isa::load(prob + i), d_prob));
      }
    }
    // dK += dS^T Qs; dQ' += dS K.
    gemm<Isa>(count, p.dim_pad, rows, {p.grad_logits, R, 1}, p.q_scaled + first * p.dim_pad, p.dim_pad,
              p.grad_keys, p.dim_pad, true);
    gemm<Isa>(rows, p.dim_pad, count, {p.grad_logits, 1, R}, p.keys, p.dim_pad,
              p.grad_queries + first * p.dim_pad, p.dim_pad, true);
  }
}

}  // namespace
}  // namespace detail
}  // namespace sma_kernels::cpu
