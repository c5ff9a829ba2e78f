// The integer side of the CPU mask: how many tokens each sample masks and in which way (step 0), and
// which tokens those are once the scores are known (step 3). All of it runs in O(Q + L) per sample
// with no sort: a walk over the inverse of a rank permutation for the random picks, and
// std::nth_element for the best scores.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

struct Counts {
  int64_t num_rows;    // k_q
  int64_t num_top;     // k - f - k_rand
  int64_t num_random;  // k_rand
};

// The counts of one sample with n valid tokens and `pool` candidate query rows, exactly as
// sma_kernels.plan.mask_counts computes them (float64 products, round half-to-even).
Counts sample_counts(int64_t n, int64_t pool, double ratio, int64_t num_per_query, bool mask_self,
                     double noise);

// plan.take_smallest for one sample: walks `rank` (checked to be a permutation of 0..n-1) in rank
// order and calls take(i) on the first `count` indices i that eligible(i) accepts. `by_rank` is
// scratch of n entries.
template <typename Eligible, typename Take>
void take_smallest_ranks(const int32_t* rank, int64_t n, int64_t count, std::vector<int32_t>& by_rank,
                         const char* name, int64_t b, Eligible eligible, Take take) {
  std::fill(by_rank.begin(), by_rank.end(), -1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rank[i] >= 0 && rank[i] < n && by_rank[rank[i]] < 0, "self_guided_mask: ", name, "[", b,
                "] must be a permutation of 0..", n - 1);
    by_rank[rank[i]] = static_cast<int32_t>(i);
  }
  for (int64_t r = 0; r < n && count > 0; ++r) {
    if (eligible(by_rank[r])) {
      take(by_rank[r]);
      --count;
    }
  }
}

// Step 3 for sample b, on its rows of the (B, L) inputs: sets taken[j] (all false on entry) for the
// masked tokens. First the forced tokens (the num_rows chosen rows under mask_self); then the num_top
// best scores among the other valid tokens, ties to the lower index; then the num_random still-free
// valid tokens of smallest token_rank. `candidates` and `by_rank` are scratch of L entries.
void select_tokens(const Counts& counts, const int32_t* chosen, bool mask_self, const bool* valid,
                   const float* score, const int32_t* token_rank, int64_t tokens, int64_t b,
                   std::vector<int32_t>& candidates, std::vector<int32_t>& by_rank, bool* taken);

}  // namespace detail
}  // namespace sma_kernels::cpu
