// The integer side of the CPU mask: how many tokens each sample masks and in which way (step 0), and
// which tokens those are once the scores are known (step 3). All of it runs in O(Q + L) per sample
// with no sort: std::nth_element for the chosen rows, the best scores and the random picks.
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

// plan.take_smallest for one sample: calls take(i) on the `count` indices i that eligible(i) accepts
// with the smallest (rank[i], i); ranks are any int32 values (equal ranks go to the lower index).
// std::nth_element on the eligible indices: O(n). `scratch` holds at least n entries.
template <typename Eligible, typename Take>
void take_smallest_ranks(const int32_t* rank, int64_t n, int64_t count, std::vector<int32_t>& scratch,
                         Eligible eligible, Take take) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (eligible(static_cast<int32_t>(i))) {
      scratch[m++] = static_cast<int32_t>(i);
    }
  }
  count = std::min(count, m);
  const auto before = [rank](int32_t x, int32_t y) { return rank[x] < rank[y] || (rank[x] == rank[y] && x < y); };
  std::nth_element(scratch.begin(), scratch.begin() + count, scratch.begin() + m, before);
  for (int64_t r = 0; r < count; ++r) {
    take(scratch[r]);
  }
}

// Step 3 for sample b, on its rows of the (B, L) inputs: sets taken[j] (all false on entry) for the
// masked tokens. First the forced tokens (the num_rows chosen rows under mask_self); then the num_top
// best scores among the other valid tokens, ties to the lower index; then the num_random still-free
// valid tokens of smallest token_rank. `candidates` is scratch of L entries.
void select_tokens(const Counts& counts, const int32_t* chosen, bool mask_self, const bool* valid,
                   const float* score, const int32_t* token_rank, int64_t tokens,
                   std::vector<int32_t>& candidates, bool* taken);

}  // namespace detail
}  // namespace sma_kernels::cpu
