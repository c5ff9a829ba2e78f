// Small matrix products for the attention over kept keys (attention_blocks.h): C (+)= A B on blocks
// of a few dozen rows and columns, with C held in registers one tile at a time.
//
// Why not a BLAS call: the blocks are small (64 x 64 x d), there is one per (query block, key block)
// pair, and the attention wants the same order of additions on every call and thread count. A
// register tile whose sum over the depth runs in order gives that, near the peak rate of the FMA
// units at these sizes.
//
// Layouts: B and C are row-major, their rows read and written as whole registers, so the number of
// columns is a multiple of the register width (the callers pad rows with zeros to kAlign elements);
// A is read one element at a time and broadcast, so it may have any strides: a transposed operand
// (P^T and dS^T in the backward) costs nothing more.
//
// The templates take an instruction-set trait (vector_isa.h) with a tile of kRows rows by kVecs
// registers. The files compiled for AVX2 + FMA and for AVX-512 include this header after their
// target pragma, so that every function here is compiled for their target there.
#pragma once

#include <cstdint>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

// A strided operand: element (i, k) at data[i * row + k * col].
template <typename T>
struct Strided {
  const T* data;
  int64_t row, col;
};

// One register tile: C[0..MR) x [0..NV * kWidth) (+)= sum over k < depth, in order, of
// A(i, k) * B[k][...]. b and c point at the tile's first column. The sum starts from zero and is
// added to C at the end: a product accumulated over many calls (a key block at a time) is then
// summed block by block, whose rounding error grows with the block size plus the number of blocks
// rather than with the whole length.
template <typename Isa, int MR, int NV>
SMA_ALWAYS_INLINE void gemm_tile(int64_t depth, const typename Isa::Elem* a, int64_t a_row, int64_t a_col,
                                 const typename Isa::Elem* b, int64_t b_row, typename Isa::Elem* c,
                                 int64_t c_row, bool accumulate) {
  using Reg = typename Isa::Reg;
  constexpr int W = Isa::kWidth;
  Reg acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = Isa::zero();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    Reg row[NV];
    for (int v = 0; v < NV; ++v) {
      row[v] = Isa::load(b + k * b_row + v * W);
    }
    const typename Isa::Elem* ak = a + k * a_col;
    for (int i = 0; i < MR; ++i) {
      const Reg x = Isa::broadcast(ak + i * a_row);
      for (int v = 0; v < NV; ++v) {
        acc[i][v] = Isa::fmadd(x, row[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      Reg sum = acc[i][v];
      if (accumulate) {
        sum = Isa::add(Isa::load(c + i * c_row + v * W), sum);
      }
      Isa::store(c + i * c_row + v * W, sum);
    }
  }
}

// The last `rows` < R + 1 rows of a strip: one tile of exactly that height.
template <typename Isa, int NV, int R>
SMA_ALWAYS_INLINE void gemm_last_rows(int64_t rows, int64_t depth, Strided<typename Isa::Elem> a,
                                      const typename Isa::Elem* b, int64_t b_row, typename Isa::Elem* c,
                                      int64_t c_row, bool accumulate) {
  if constexpr (R >= 1) {
    if (rows == R) {
      gemm_tile<Isa, R, NV>(depth, a.data, a.row, a.col, b, b_row, c, c_row, accumulate);
      return;
    }
    gemm_last_rows<Isa, NV, R - 1>(rows, depth, a, b, b_row, c, c_row, accumulate);
  }
}

// The tiles of one column strip: kRows rows at a time, then the rest.
template <typename Isa, int NV>
SMA_ALWAYS_INLINE void gemm_strip(int64_t m, int64_t depth, Strided<typename Isa::Elem> a,
                                  const typename Isa::Elem* b, int64_t b_row, typename Isa::Elem* c,
                                  int64_t c_row, bool accumulate) {
  constexpr int MR = Isa::kRows;
  int64_t i = 0;
  for (; i + MR <= m; i += MR) {
    gemm_tile<Isa, MR, NV>(depth, a.data + i * a.row, a.row, a.col, b, b_row, c + i * c_row, c_row,
                           accumulate);
  }
  const Strided<typename Isa::Elem> rest{a.data + i * a.row, a.row, a.col};
  gemm_last_rows<Isa, NV, MR - 1>(m - i, depth, rest, b, b_row, c + i * c_row, c_row, accumulate);
}

// C[m x n] (+)= A[m x depth] B[depth x n], n a multiple of Isa::kWidth; B and C row-major with row
// strides b_row and c_row. Column strips of kVecs registers, then strips of one register.
template <typename Isa>
SMA_ALWAYS_INLINE void gemm(int64_t m, int64_t n, int64_t depth, Strided<typename Isa::Elem> a,
                            const typename Isa::Elem* b, int64_t b_row, typename Isa::Elem* c, int64_t c_row,
                            bool accumulate) {
  constexpr int64_t strip = Isa::kWidth * Isa::kVecs;
  int64_t j = 0;
  for (; j + strip <= n; j += strip) {
    gemm_strip<Isa, Isa::kVecs>(m, depth, a, b + j, b_row, c + j, c_row, accumulate);
  }
  for (; j < n; j += Isa::kWidth) {
    gemm_strip<Isa, 1>(m, depth, a, b + j, b_row, c + j, c_row, accumulate);
  }
}

}  // namespace detail
}  // namespace sma_kernels::cpu
