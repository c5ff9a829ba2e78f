// The counts of step 0 and the selection of step 3 (declared in select.h). They follow
// sma_kernels.plan exactly (the same float64 products, rounding and tie-breaks), so that under the
// same plan the CPU mask is the reference's.
#include "select.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

Counts sample_counts(int64_t n, int64_t pool, double ratio, int64_t num_per_query, bool mask_self,
                     double noise) {
  // std::nearbyint rounds half-to-even in the default rounding mode, as torch.round does.
  const auto round = [](double x) { return static_cast<int64_t>(std::nearbyint(x)); };
  const double n_real = static_cast<double>(n);
  const int64_t k = n >= 2 ? std::clamp<int64_t>(round(n_real * ratio), 1, n - 1) : 0;
  int64_t rows = std::min(std::max<int64_t>(round(n_real * ratio / static_cast<double>(num_per_query)), 1),
                          pool);
  if (mask_self) {
    rows = std::min(rows, k);  // the forced tokens never exceed the masked count
  }
  const int64_t forced = mask_self ? rows : 0;
  const int64_t random = round(static_cast<double>(k - forced) * noise);
  return {rows, k - forced - random, random};
}

void select_tokens(const Counts& counts, const int32_t* chosen, bool mask_self, const bool* valid,
                   const float* score, const int32_t* token_rank, int64_t tokens,
                   std::vector<int32_t>& candidates, bool* taken) {
  if (mask_self) {
    for (int64_t r = 0; r < counts.num_rows; ++r) {
      taken[chosen[r]] = true;
    }
  }
  if (counts.num_top > 0) {
    int64_t free = 0;
    for (int64_t j = 0; j < tokens; ++j) {
      if (valid[j] && !taken[j]) {
        candidates[free++] = static_cast<int32_t>(j);
      }
    }
    TORCH_CHECK(counts.num_top <= free, "self_guided_mask: internal error, too few free tokens");
    // NaN (from non-finite inputs) ranks last, which keeps the order strict and weak.
    const auto key = [score](int32_t j) { return std::isnan(score[j]) ? kNegInf : score[j]; };
    const auto better = [&key](int32_t x, int32_t y) {
      const float kx = key(x), ky = key(y);
      return kx > ky || (kx == ky && x < y);
    };
    std::nth_element(candidates.begin(), candidates.begin() + counts.num_top, candidates.begin() + free,
                     better);
    for (int64_t r = 0; r < counts.num_top; ++r) {
      taken[candidates[r]] = true;
    }
  }
  if (counts.num_random > 0) {
    take_smallest_ranks(
        token_rank, tokens, counts.num_random, candidates, [&](int32_t j) { return valid[j] && !taken[j]; },
        [&](int32_t j) { taken[j] = true; });
  }
}

}  // namespace detail
}  // namespace sma_kernels::cpu
