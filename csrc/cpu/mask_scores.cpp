// Steps 1 and 2 of the CPU mask (declared in mask_scores.h): per pair the max and the sum of the
// softmax over the valid tokens in one sweep over the key tiles (online softmax), then per tile of
// tokens the scores, recomputing the logits of every pair of the sample.
//
// Each step is written once as a body templated on kAvx2 and instantiated twice: as is, for the
// baseline ISA the build targets, and inside a function compiled with
// __attribute__((target("avx2,fma"))) on x86-64, chosen at run time by the CPU. The bodies and the
// arithmetic they call (exp_nonpositive, tile_logits) are forced inline, so the loops of each copy
// are compiled and vectorized for its own target; the tile transpose picks its AVX2 version through
// the loader's kAvx2 (key_tiles.h).
#include "mask_scores.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"
#include "fast_exp.h"
#include "key_tiles.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {
namespace {

constexpr int64_t kRunPairs = 16;  // pairs of one head that share a transposed tile in step 1
constexpr float kMaxFloat = std::numeric_limits<float>::max();

// The query row of a pair, in fp32.
template <typename scalar_t>
SMA_ALWAYS_INLINE void load_row(const Problem<scalar_t>& p, const Pair& pair, float* row) {
  const scalar_t* src = p.q + ((pair.sample * p.heads + pair.head) * p.queries + pair.row) * p.dim;
  for (int64_t c = 0; c < p.dim; ++c) {
    row[c] = static_cast<float>(src[c]);
  }
}

// Step 1 for pairs [begin, end): max and coef of each pair's softmax row.
template <typename scalar_t, bool kAvx2>
SMA_ALWAYS_INLINE void row_stats_body(const Problem<scalar_t>& p, Pair* pairs, int64_t begin, int64_t end) {
  TileLoader<scalar_t, kAvx2> loader(p.dim);
  std::vector<float> rows(kRunPairs * p.dim);
  float bias[kTile], s[kTile];
  for (int64_t first = begin; first < end;) {
    int64_t last = first + 1;
    while (last < end && last - first < kRunPairs && pairs[last].sample == pairs[first].sample &&
           pairs[last].head == pairs[first].head) {
      ++last;
    }
    const int64_t run = last - first;
    const Pair& lead = pairs[first];
    for (int64_t r = 0; r < run; ++r) {
      load_row(p, pairs[first + r], rows.data() + r * p.dim);
    }
    float row_max[kRunPairs], row_sum[kRunPairs];
    bool poisoned[kRunPairs];
    std::fill(row_max, row_max + run, kNegInf);
    std::fill(row_sum, row_sum + run, 0.f);
    std::fill(poisoned, poisoned + run, false);
    const scalar_t* keys = p.k + (int64_t{lead.sample} * p.heads + lead.head) * p.tokens * p.dim;
    const bool* valid = p.valid + int64_t{lead.sample} * p.tokens;
    for (int64_t t0 = 0; t0 < p.tokens; t0 += kTile) {
      loader.load(keys, valid, p.tokens, t0, bias);
      for (int64_t r = 0; r < run; ++r) {
        if (poisoned[r]) {
          continue;
        }
        tile_logits(rows.data() + r * p.dim, loader.tile(), bias, p.dim, p.scale, s);
        // The non-finite rule: a pair with a NaN or infinite logit on a real token contributes
        // nothing. !(|s| <= max) is true for NaN and +-Inf alike; padding has bias -inf.
        int nonfinite = 0;
#pragma omp simd reduction(| : nonfinite)
        for (int64_t j = 0; j < kTile; ++j) {
          nonfinite |= static_cast<int>(bias[j] == 0.f && !(std::fabs(s[j]) <= kMaxFloat));
        }
        if (nonfinite) {
          poisoned[r] = true;
          continue;
        }
        float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
        for (int64_t j = 0; j < kTile; ++j) {
          tile_max = s[j] > tile_max ? s[j] : tile_max;
        }
        if (tile_max == kNegInf) {
          continue;  // no valid token in this tile
        }
        const float m = std::max(row_max[r], tile_max);
        float tile_sum = 0.f;
#pragma omp simd reduction(+ : tile_sum)
        for (int64_t j = 0; j < kTile; ++j) {
          tile_sum += exp_nonpositive(s[j] - m);
        }
        row_sum[r] = row_sum[r] * exp_nonpositive(row_max[r] - m) + tile_sum;
        row_max[r] = m;
      }
    }
    for (int64_t r = 0; r < run; ++r) {
      pairs[first + r].max = row_max[r];
      // coef = 0 (no real token, or poisoned) makes step 2 skip the pair.
      pairs[first + r].coef = row_sum[r] > 0.f && !poisoned[r] ? p.weight / row_sum[r] : 0.f;
    }
    first = last;
  }
}

// Step 2 for global tiles [begin, end) (tile g is tokens (g % tiles) * kTile.. of sample g / tiles).
template <typename scalar_t, bool kAvx2>
SMA_ALWAYS_INLINE void token_scores_body(const Problem<scalar_t>& p, const Pair* pairs,
                                         const int64_t* pair_offset, float* scores, int64_t begin,
                                         int64_t end) {
  const int64_t tiles = (p.tokens + kTile - 1) / kTile;
  TileLoader<scalar_t, kAvx2> loader(p.dim);
  std::vector<float> row(p.dim);
  float bias[kTile], s[kTile], acc[kTile];
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b = g / tiles, t0 = (g % tiles) * kTile;
    if (pair_offset[b] == pair_offset[b + 1]) {
      continue;  // nothing is taken by score in this sample
    }
    std::fill(acc, acc + kTile, 0.f);
    int64_t loaded_head = -1;
    for (int64_t i = pair_offset[b]; i < pair_offset[b + 1]; ++i) {
      const Pair& pair = pairs[i];
      if (pair.coef == 0.f) {
        continue;  // contributes nothing; its logits may be NaN, and 0 * NaN is NaN
      }
      if (pair.head != loaded_head) {  // pairs are sorted by head: one tile load per head
        loader.load(p.k + (b * p.heads + pair.head) * p.tokens * p.dim, p.valid + b * p.tokens, p.tokens,
                    t0, bias);
        loaded_head = pair.head;
      }
      load_row(p, pair, row.data());
      tile_logits(row.data(), loader.tile(), bias, p.dim, p.scale, s);
      for (int64_t j = 0; j < kTile; ++j) {
        acc[j] += exp_nonpositive(s[j] - pair.max) * pair.coef;
      }
    }
    const int64_t width = std::min(kTile, p.tokens - t0);
    std::copy(acc, acc + width, scores + b * p.tokens + t0);
  }
}

#ifdef SMA_X86_DISPATCH
// The same bodies compiled for AVX2 + FMA, used where the CPU has them.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void row_stats_avx2(const Problem<scalar_t>& p, Pair* pairs,
                                                        int64_t begin, int64_t end) {
  row_stats_body<scalar_t, true>(p, pairs, begin, end);
}

template <typename scalar_t>
__attribute__((target("avx2,fma"))) void token_scores_avx2(const Problem<scalar_t>& p, const Pair* pairs,
                                                           const int64_t* pair_offset, float* scores,
                                                           int64_t begin, int64_t end) {
  token_scores_body<scalar_t, true>(p, pairs, pair_offset, scores, begin, end);
}
#endif

}  // namespace

// Each step runs its AVX2 + FMA copy where the CPU has both, else the baseline one.
template <typename scalar_t>
void row_stats(const Problem<scalar_t>& p, Pair* pairs, int64_t begin, int64_t end) {
#ifdef SMA_X86_DISPATCH
  if (has_avx2_fma()) {
    return row_stats_avx2(p, pairs, begin, end);
  }
#endif
  row_stats_body<scalar_t, false>(p, pairs, begin, end);
}

template <typename scalar_t>
void token_scores(const Problem<scalar_t>& p, const Pair* pairs, const int64_t* pair_offset, float* scores,
                  int64_t begin, int64_t end) {
#ifdef SMA_X86_DISPATCH
  if (has_avx2_fma()) {
    return token_scores_avx2(p, pairs, pair_offset, scores, begin, end);
  }
#endif
  token_scores_body<scalar_t, false>(p, pairs, pair_offset, scores, begin, end);
}

// The dtypes that the op dispatches on (AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16)).
#define SMA_INSTANTIATE(scalar_t)                                                                      \
  template void row_stats<scalar_t>(const Problem<scalar_t>&, Pair*, int64_t, int64_t);               \
  template void token_scores<scalar_t>(const Problem<scalar_t>&, const Pair*, const int64_t*, float*, \
                                       int64_t, int64_t);
SMA_INSTANTIATE(double)
SMA_INSTANTIATE(float)
SMA_INSTANTIATE(c10::Half)
SMA_INSTANTIATE(c10::BFloat16)
#undef SMA_INSTANTIATE

}  // namespace detail
}  // namespace sma_kernels::cpu
