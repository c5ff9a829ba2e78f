// The arithmetic of the attention over kept keys (kept_attention.cpp), on packed buffers: one block of
// query rows against every kept key of its (sample, head) in the forward, one block of keys against
// every query row in the backward. kept_attention.cpp gathers the operands into these buffers, in
// fp32 (fp64 for fp64 inputs), and writes the results back in the tensors' dtype and strides; only
// the functions here are compiled per instruction set (attention_blocks.cpp).
//
// The logits are computed transposed, S^T = K Qs^T (keys by query rows), so that the keys and values
// stay rows as gathered, only the queries (a block at a time) are transposed, and the softmax runs
// down the columns of S^T: its max and sum over keys are element-wise vector operations across query
// rows, with no horizontal reduction.
//
// Buffers are row-major; rows that the products read as registers are padded with zeros to a
// multiple of kAlign elements: dim_pad = round_up(d, kAlign), dim_v_pad = round_up(dv, kAlign), and
// query columns to round_up(rows, kAlign).
#pragma once

#include <cstdint>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

constexpr int64_t kAlign = 16;  // one AVX-512 register of fp32

constexpr int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

constexpr int64_t kForwardRows = 64;    // query rows per forward block
constexpr int64_t kForwardChunk = 256;  // query rows per forward work item (a multiple of kForwardRows)
constexpr int64_t kForwardKeys = 128;   // keys per forward step (online softmax)
constexpr int64_t kBackwardRows = 64;   // query rows per backward step
constexpr int64_t kBackwardKeys = 64;   // keys per backward block (the dK, dV accumulators)

// Forward: `rows` <= kForwardRows query rows of one (sample, head) against its `count` kept keys, an
// online softmax over steps of kForwardKeys keys.
template <typename T>
struct ForwardBlock {
  int64_t rows, count, dim, dim_v_pad;
  const T* queries_t;  // Qs^T (dim, kForwardRows): scale * q; any finite values past `rows`
  const T* keys;       // (count, dim)
  const T* values;     // (count, dim_v_pad)
  T* scores;           // scratch (kForwardKeys, kForwardRows)
  T* acc;              // out: (rows, dim_v_pad), the normalized output
  T* lse;              // out: (rows) log-sum-exp of the logits
};

// Backward: one block of `count` <= kBackwardKeys kept keys of one (sample, head) against all its
// `queries` query rows, FlashAttention-2's recomputation, transposed: P^T = exp(S^T - lse),
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Qs, dQ' += dS K. With Qs = scale * q,
// dK is the gradient of the keys and scale * dQ' that of the queries. Query columns run to
// queries_pad = round_up(queries, kBackwardRows); past `queries`, lse = +inf (so P = 0) and the rest
// is 0.
template <typename T>
struct BackwardBlock {
  int64_t queries, count, dim, dim_pad, dim_v, dim_v_pad;
  // Qs and dO as rows, and transposed by blocks of kBackwardRows query rows: block t at
  // q_scaled_t + t * dim * kBackwardRows is (dim, kBackwardRows) (short rows, so that a product
  // reads them from a few cache lines each), dO^T likewise with dim_v.
  const T* q_scaled;    // (queries, dim_pad)
  const T* q_scaled_t;  // (queries_pad / kBackwardRows blocks, dim, kBackwardRows)
  const T* grad_out;    // (queries, dim_v_pad)
  const T* grad_out_t;  // (queries_pad / kBackwardRows blocks, dim_v, kBackwardRows)
  const T* delta;       // D = rowsum(dO * out) (queries_pad)
  const T* lse;         // (queries_pad)
  const T* keys;        // (count, dim_pad)
  const T* values;      // (count, dim_v_pad)
  T* probs;             // scratch (kBackwardKeys, kBackwardRows)
  T* grad_logits;       // scratch (kBackwardKeys, kBackwardRows)
  T* grad_keys;         // out: dK (count, dim_pad)
  T* grad_values;       // out: dV (count, dim_v_pad)
  T* grad_queries;      // in/out: dQ' (queries, dim_pad), accumulated over the key blocks in order
};

// Defined for T = float (AVX-512, AVX2 + FMA or plain C++, by the CPU) and T = double (plain C++).
template <typename T>
void forward_block(const ForwardBlock<T>& p);
template <typename T>
void backward_block(const BackwardBlock<T>& p);

// The fp32 copies compiled for AVX2 + FMA and for AVX-512 (attention_blocks_avx2.cpp,
// attention_blocks_avx512.cpp), which forward_block and backward_block choose between. Built with
// GCC, whose target pragma those files use.
#if defined(SMA_X86_DISPATCH) && !defined(__clang__)
#define SMA_ATTENTION_SIMD 1
void forward_block_avx2(const ForwardBlock<float>& p);
void backward_block_avx2(const BackwardBlock<float>& p);
void forward_block_avx512(const ForwardBlock<float>& p);
void backward_block_avx512(const BackwardBlock<float>& p);
#endif

}  // namespace detail
}  // namespace sma_kernels::cpu
