// The arithmetic of the attention over kept keys (kept_attention.cpp), on packed buffers: one block of
// query rows against every key of its (sample, head) in the forward, one block of keys against every
// query row in the backward. kept_attention.cpp gathers the kept keys into these buffers, in fp32
// (fp64 for fp64 inputs), and writes the results back in the tensors' dtype and strides; only the
// functions here are compiled per instruction set (attention_blocks.cpp).
//
// Buffers are row-major; rows that the products read as registers are padded with zeros to a
// multiple of kAlign elements: dim_pad = round_up(d, kAlign), dim_v_pad = round_up(dv, kAlign).
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

// Forward: `rows` query rows of one (sample, head) against its `count` kept keys.
template <typename T>
struct ForwardBlock {
  int64_t rows, count, dim, dim_v_pad;
  const T* queries;  // (rows, dim) at stride dim_pad, already multiplied by the scale
  int64_t dim_pad;
  // Key step s holds keys s * kForwardKeys .. of width w = min(kForwardKeys, count - s * kForwardKeys):
  // transposed at keys_t + s * dim * kForwardKeys, (dim, round_up(w, kAlign)), zero past w, and as
  // rows of values at values + s * kForwardKeys * dim_v_pad.
  const T* keys_t;
  const T* values;
  T* scores;  // scratch (rows, kForwardKeys)
  T* acc;     // out: (rows, dim_v_pad), the normalized output
  T* lse;     // out: (rows) log-sum-exp of the logits
  T* row_max;  // scratch (rows)
  T* row_sum;  // scratch (rows)
};

// Backward: one block of `count` <= kBackwardKeys kept keys of one (sample, head) against all its
// `queries` query rows, FlashAttention-2's recomputation: P = exp(S - lse), dV += P^T dO,
// dP = dO V^T, dS = P (dP - D), dK += dS^T Qs, dQ' += dS K. With Qs = scale * q, dK is the gradient of
// the keys and scale * dQ' that of the queries.
template <typename T>
struct BackwardBlock {
  int64_t queries, count, dim, dim_pad, dim_v, dim_v_pad;
  const T* q_scaled;  // (queries, dim_pad)
  const T* grad_out;  // dO (queries, dim_v_pad)
  const T* delta;     // D = rowsum(dO * out) (queries)
  const T* lse;       // (queries), finite
  const T* keys_t;    // (dim, kBackwardKeys), zero past count
  const T* keys;      // (count, dim_pad)
  const T* values_t;  // (dim_v, kBackwardKeys), zero past count
  T* probs;           // scratch (kBackwardRows, kBackwardKeys)
  T* grad_logits;     // scratch (kBackwardRows, kBackwardKeys)
  T* grad_keys;       // out: dK (count, dim_pad)
  T* grad_values;     // out: dV (count, dim_v_pad)
  T* grad_queries;    // in/out: dQ' (queries, dim_pad), accumulated over the key blocks in order
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
