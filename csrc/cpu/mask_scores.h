// Steps 1 and 2 of the CPU mask: the softmax statistics of each (head, chosen row) pair, then the
// token scores. These are the only steps that read q and k, so they hold all the vectorized work.
//
// A "pair" is one (head, chosen row) whose softmax enters the token score: every head under
// head_mix="mean" (weight 1/H), the plan's head under "random" (weight 1). The logits are recomputed
// in step 2 rather than stored, which would take a (k_q, L) block.
#pragma once

#include <cstdint>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

// One (head, chosen row) softmax. max and coef (= weight / sum of exp(s - max)) come from step 1.
struct Pair {
  int32_t sample, row, head;
  float max, coef;
};

// Shapes and pointers shared by the steps; q and k are contiguous (B, H, Q, d) / (B, H, L, d).
template <typename scalar_t>
struct Problem {
  const scalar_t* q;
  const scalar_t* k;
  const bool* valid;  // (B, L)
  int64_t heads, queries, tokens, dim;
  float scale;
  float weight;  // of each pair: 1/H for the mean over heads, 1 for one random head
};

// Step 1 for pairs [begin, end), where adjacent pairs of one (sample, head) share each key tile:
// sets the max of each pair's logits s_j = scale * q.k_j over the valid tokens, and its coef,
// weight / Σ_j exp(s_j - max), or 0 when the pair has no valid token or a non-finite logit on a
// valid token (it then adds nothing).
template <typename scalar_t>
void row_stats(const Problem<scalar_t>& p, Pair* pairs, int64_t begin, int64_t end);

// Step 2 for global tiles [begin, end), tile g being tokens (g % tiles) * kTile.. of sample
// g / tiles: scores[b * L + j] = Σ over the pairs of b, in order, of exp(s_j - max) * coef. The
// pairs of sample b are pairs[pair_offset[b] .. pair_offset[b + 1]).
template <typename scalar_t>
void token_scores(const Problem<scalar_t>& p, const Pair* pairs, const int64_t* pair_offset, float* scores,
                  int64_t begin, int64_t end);

// Both are defined in mask_scores.cpp for the dtypes of AT_DISPATCH_FLOATING_TYPES_AND2(kHalf,
// kBFloat16): double, float, c10::Half and c10::BFloat16.

}  // namespace detail
}  // namespace sma_kernels::cpu
