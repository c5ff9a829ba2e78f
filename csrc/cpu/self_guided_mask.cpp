/*
 * The fused self-guided mask on the CPU (DESIGN.md section 2), parallel with ATen's OpenMP pool.
 *
 * Per sample b, with the randomness of the plan (query_rank, head, token_rank):
 *   0. Counts n, k, k_q, f, num_top, num_random exactly as sma_kernels.plan.mask_counts (float64
 *      products, round half-to-even), and the chosen rows: the k_q rows of the query pool with the
 *      smallest query_rank.
 *   1. Row statistics. A "pair" is one (head, chosen row) whose softmax enters the token score:
 *      every head under head_mix="mean" (weight 1/H), the plan's head under "random" (weight 1).
 *      One sweep over the keys in tiles of kTile tokens gives each pair the max m and the sum
 *      Σ_j exp(s_j - m) of its logits s_j = scale * q·k_j over the valid tokens (online softmax).
 *      A pair with a non-finite logit on a valid token (NaN or Inf in q or k, or an fp32 overflow)
 *      contributes nothing to the scores, as in the reference.
 *   2. Token scores. For each tile of tokens, score[j] = Σ over the pairs, in (head, row) order, of
 *      exp(s_j - m) * weight / sum. The logits are recomputed rather than stored, which would
 *      take a (k_q, L) block.
 *   3. Selection in O(L): the forced tokens (chosen rows under mask_self); the num_top best scores
 *      among the other valid tokens by std::nth_element on (score desc, index asc), i.e. ties to
 *      the lower index; then the num_random still-free valid tokens of smallest token_rank, by a
 *      walk over the inverse permutation.
 *
 * Determinism: the work items (samples in steps 0 and 3, pairs in step 1, (sample, tile) in step 2)
 * are each computed by one thread in a fixed order, so the mask does not depend on the number of
 * threads or on how items are split between them.
 *
 * Memory: the (B, L) fp32 scores, 20 bytes per pair (B * k_q * H at most) and O(L + kTile * d)
 * scratch per thread; never a (Q, L) block, so L = 32768 runs in a few MB.
 *
 * Speed: a key tile is transposed to (d, kTile) fp32, so the dot products vectorize over tokens
 * with no horizontal sums, and each tile serves every pair of its head. When there are at least
 * as many samples as threads, a thread runs steps 1 and 2 of a sample back to back, so the keys
 * come from memory once, not twice. exp is a branch-free polynomial that the compiler vectorizes
 * when built with -fno-trapping-math (libm's expf is only vectorized under -ffast-math, which
 * would break the -inf of padding). On x86-64 the hot loops are also compiled for AVX2+FMA and
 * chosen at run time, so the build itself stays portable.
 */
#include "self_guided_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) || defined(__clang__)
#define SMA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SMA_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SMA_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace sma_kernels::cpu {
namespace {

constexpr int64_t kTile = 64;      // tokens per tile: 8 AVX2 accumulators for the dot products
constexpr int64_t kRunPairs = 16;  // pairs of one head that share a transposed tile in step 1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kMaxFloat = std::numeric_limits<float>::max();

struct Counts {
  int64_t num_rows;    // k_q
  int64_t num_top;     // k - f - k_rand
  int64_t num_random;  // k_rand
};

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

// exp(x) for x <= 0 (a logit minus its row max), branch-free so that loops over it vectorize.
// Cephes' expf polynomial after Cody-Waite reduction: within 2 ulp of expf, 0 below FLT_MIN.
SMA_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kLow = -87.33654475f;  // ln(FLT_MIN)
  const float xc = x < kLow ? kLow : (x > 0.f ? 0.f : x);
  // Round x * log2(e) to the nearest integer by adding and removing 1.5 * 2^23 (SSE2 has no round).
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < kLow ? 0.f : y * two_n;
}

// Transposes 8 rows of `dim` floats into columns j0 .. j0+7 of a (dim, kTile) tile.
void transpose8_generic(const float* const* rows, int64_t dim, float* tile) {
  for (int64_t c = 0; c < dim; ++c) {
    for (int64_t l = 0; l < 8; ++l) {
      tile[c * kTile + l] = rows[l][c];
    }
  }
}

#ifdef SMA_X86_DISPATCH
// The same with AVX in 8x8 blocks: 24 shuffles instead of 64 scalar stores per block.
__attribute__((target("avx2,fma"))) void transpose8_avx2(const float* const* rows, int64_t dim, float* tile) {
  int64_t c = 0;
  for (; c + 8 <= dim; c += 8) {
    __m256 r[8], t[8], u[8];
    for (int l = 0; l < 8; ++l) {
      r[l] = _mm256_loadu_ps(rows[l] + c);
    }
    for (int l = 0; l < 8; l += 2) {
      t[l] = _mm256_unpacklo_ps(r[l], r[l + 1]);
      t[l + 1] = _mm256_unpackhi_ps(r[l], r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
      u[l] = _mm256_shuffle_ps(t[l], t[l + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[l + 1] = _mm256_shuffle_ps(t[l], t[l + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[l + 2] = _mm256_shuffle_ps(t[l + 1], t[l + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[l + 3] = _mm256_shuffle_ps(t[l + 1], t[l + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int l = 0; l < 4; ++l) {  // u[l] holds columns l and l+4 of rows 0-3, u[l+4] of rows 4-7
      _mm256_storeu_ps(tile + (c + l) * kTile, _mm256_permute2f128_ps(u[l], u[l + 4], 0x20));
      _mm256_storeu_ps(tile + (c + l + 4) * kTile, _mm256_permute2f128_ps(u[l], u[l + 4], 0x31));
    }
  }
  for (; c < dim; ++c) {
    for (int64_t l = 0; l < 8; ++l) {
      tile[c * kTile + l] = rows[l][c];
    }
  }
}
#endif

// Loads keys t0 .. t0+kTile of one (sample, head) as a (d, kTile) fp32 tile, with a bias of 0 for
// valid tokens and -inf for padding and past the end. Padded keys are read as zeros so that whatever
// they hold (even NaN) cannot reach a logit.
template <typename scalar_t, bool kAvx2>
class TileLoader {
 public:
  explicit TileLoader(int64_t dim)
      : dim_(dim),
        tile_(dim * kTile),
        zeros_(dim, 0.f),
        staging_(std::is_same_v<scalar_t, float> ? 0 : 8 * dim) {}

  const float* tile() const { return tile_.data(); }

  void load(const scalar_t* keys, const bool* valid, int64_t tokens, int64_t t0, float* bias) {
    for (int64_t j0 = 0; j0 < kTile; j0 += 8) {
      const float* rows[8];
      for (int64_t l = 0; l < 8; ++l) {
        const int64_t j = t0 + j0 + l;
        const bool real = j < tokens && valid[j];
        bias[j0 + l] = real ? 0.f : kNegInf;
        rows[l] = real ? row(keys + j * dim_, l) : zeros_.data();
      }
#ifdef SMA_X86_DISPATCH
      if constexpr (kAvx2) {
        transpose8_avx2(rows, dim_, tile_.data() + j0);
        continue;
      }
#endif
      transpose8_generic(rows, dim_, tile_.data() + j0);
    }
  }

 private:
  const float* row(const scalar_t* key, int64_t lane) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return key;
    } else {
      float* out = staging_.data() + lane * dim_;
      for (int64_t c = 0; c < dim_; ++c) {
        out[c] = static_cast<float>(key[c]);
      }
      return out;
    }
  }

  int64_t dim_;
  std::vector<float> tile_, zeros_, staging_;
};

template <typename scalar_t>
SMA_ALWAYS_INLINE void load_row(const Problem<scalar_t>& p, const Pair& pair, float* row) {
  const scalar_t* src = p.q + ((pair.sample * p.heads + pair.head) * p.queries + pair.row) * p.dim;
  for (int64_t c = 0; c < p.dim; ++c) {
    row[c] = static_cast<float>(src[c]);
  }
}

// s[j] = scale * q . key_j + bias[j]. The sum over c runs in order for every token, so a token's
// logit does not depend on its lane or tile.
SMA_ALWAYS_INLINE void tile_logits(const float* q, const float* tile, const float* bias, int64_t dim,
                                   float scale, float* s) {
  float acc[kTile];
  for (int64_t j = 0; j < kTile; ++j) {
    acc[j] = 0.f;
  }
  for (int64_t c = 0; c < dim; ++c) {
    const float qc = q[c];
    const float* kc = tile + c * kTile;
    for (int64_t j = 0; j < kTile; ++j) {
      acc[j] += qc * kc[j];
    }
  }
  for (int64_t j = 0; j < kTile; ++j) {
    s[j] = acc[j] * scale + bias[j];
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

bool has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}
#endif

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

// Items per thread chunk so that a chunk does at least `work` units of work (tens of microseconds):
// small problems then run on one thread instead of waiting on a parallel region, which costs
// microseconds on an idle machine and a scheduler time slice on a busy one.
constexpr int64_t kScalarWork = 1 << 15;  // units: scalar steps (counting, selection)
constexpr int64_t kVectorWork = 1 << 20;  // units: multiply-adds of the vectorized dot products

int64_t grain(int64_t cost_per_item, int64_t work) {
  return std::max<int64_t>(1, work / std::max<int64_t>(cost_per_item, 1));
}

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

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid,
                  const at::Tensor& query_pool, const at::Tensor& query_rank, const at::Tensor& head,
                  const at::Tensor& token_rank, double ratio, int64_t num_per_query, bool mask_self,
                  double noise, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4,
              "self_guided_mask: q must be (B, H, Q, d) and k (B, H, L, d), got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "self_guided_mask: q and k must share a dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  const int64_t batch = q.size(0), queries = q.size(2), tokens = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "self_guided_mask: k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(q.size(1) >= 1, "self_guided_mask: q needs at least one head");
  const auto check = [](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                        int64_t cols) {
    TORCH_CHECK(t.scalar_type() == dtype, "self_guided_mask: ", name, " must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "self_guided_mask: ", name,
                " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  };
  check(valid, "valid", at::kBool, batch, tokens);
  check(query_pool, "query_pool", at::kBool, batch, queries);
  check(query_rank, "query_rank", at::kInt, batch, queries);
  check(head, "head", at::kInt, batch, queries);
  check(token_rank, "token_rank", at::kInt, batch, tokens);
  for (const at::Tensor* t : {&q, &k, &valid, &query_pool, &query_rank, &head, &token_rank}) {
    TORCH_CHECK(t->device().is_cpu(), "self_guided_mask: the CPU kernel needs CPU tensors, got ",
                t->device());
  }
  TORCH_CHECK(ratio > 0.0 && ratio < 1.0, "self_guided_mask: ratio must lie in (0, 1), got ", ratio);
  TORCH_CHECK(num_per_query >= 1, "self_guided_mask: num_per_query must be >= 1, got ", num_per_query);
  TORCH_CHECK(noise >= 0.0 && noise <= 1.0, "self_guided_mask: noise must lie in [0, 1], got ", noise);
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, "self_guided_mask: scale must be finite and > 0, got ",
              scale);
  TORCH_CHECK(!mask_self || queries == tokens, "self_guided_mask: mask_self needs Q == L, got Q=", queries,
              ", L=", tokens);
}

}  // namespace

at::Tensor self_guided_mask(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& valid_in,
                            const at::Tensor& query_pool_in, const at::Tensor& query_rank_in,
                            const at::Tensor& head_in, const at::Tensor& token_rank_in, double ratio,
                            int64_t num_per_query, bool head_mix_random, bool mask_self, double noise,
                            double scale) {
  check_inputs(q_in, k_in, valid_in, query_pool_in, query_rank_in, head_in, token_rank_in, ratio,
               num_per_query, mask_self, noise, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), valid_t = valid_in.contiguous();
  const at::Tensor pool_t = query_pool_in.contiguous(), query_rank_t = query_rank_in.contiguous();
  const at::Tensor head_t = head_in.contiguous(), token_rank_t = token_rank_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t tokens = k.size(2);
  const bool* valid = valid_t.data_ptr<bool>();
  const bool* pool = pool_t.data_ptr<bool>();
  const int32_t* query_rank = query_rank_t.data_ptr<int32_t>();
  const int32_t* head = head_t.data_ptr<int32_t>();
  const int32_t* token_rank = token_rank_t.data_ptr<int32_t>();

  at::Tensor mask = at::zeros({batch, tokens}, valid_t.options());
  bool* out = mask.data_ptr<bool>();

  // Step 0: counts and chosen rows (ascending row order, the first num_rows of each sample's Q slots).
  std::vector<Counts> counts(batch);
  std::vector<int32_t> chosen(batch * queries);
  at::parallel_for(0, batch, grain(queries + tokens, kScalarWork), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> by_rank(queries);
    std::vector<uint8_t> picked(queries);
    for (int64_t b = begin; b < end; ++b) {
      const bool* ok = valid + b * tokens;
      const bool* in_pool = pool + b * queries;
      const int64_t n = std::count(ok, ok + tokens, true);
      const int64_t pool_size = std::count(in_pool, in_pool + queries, true);
      if (mask_self) {  // a chosen query token is masked itself, so it must be a real token
        for (int64_t i = 0; i < queries; ++i) {
          TORCH_CHECK(!in_pool[i] || ok[i], "self_guided_mask: under mask_self, query_pool[", b, ", ", i,
                      "] is set on a padded token");
        }
      }
      counts[b] = sample_counts(n, pool_size, ratio, num_per_query, mask_self, noise);
      std::fill(picked.begin(), picked.end(), 0);
      take_smallest_ranks(query_rank + b * queries, queries, counts[b].num_rows, by_rank, "query_rank", b,
                          [&](int32_t i) { return in_pool[i]; }, [&](int32_t i) { picked[i] = 1; });
      int32_t* rows = chosen.data() + b * queries;
      for (int64_t i = 0, m = 0; i < queries; ++i) {
        if (picked[i]) {
          rows[m++] = static_cast<int32_t>(i);
        }
      }
    }
  });

  // The pairs of each sample, in (head, row) order; only samples that take tokens by score have any.
  std::vector<int64_t> pair_offset(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const Counts& c = counts[b];
    const int64_t num_pairs = c.num_top > 0 ? (head_mix_random ? c.num_rows : c.num_rows * heads) : 0;
    pair_offset[b + 1] = pair_offset[b] + num_pairs;
  }
  std::vector<Pair> pairs(pair_offset[batch]);
  at::parallel_for(0, batch, grain(queries, kScalarWork), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Pair* first = pairs.data() + pair_offset[b];
      const int64_t num_rows = counts[b].num_rows;
      const int32_t* rows = chosen.data() + b * queries;
      if (pair_offset[b] == pair_offset[b + 1]) {
        continue;
      }
      if (head_mix_random) {
        for (int64_t r = 0; r < num_rows; ++r) {
          const int32_t h = head[b * queries + rows[r]];
          TORCH_CHECK(h >= 0 && h < heads, "self_guided_mask: head[", b, ", ", rows[r], "] = ", h,
                      " is not in [0, ", heads, ")");
          first[r] = {static_cast<int32_t>(b), rows[r], h, 0.f, 0.f};
        }
        // Rows are ascending, so a stable sort by head gives (head, row) order.
        std::stable_sort(first, first + num_rows,
                         [](const Pair& x, const Pair& y) { return x.head < y.head; });
      } else {
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t r = 0; r < num_rows; ++r) {
            first[h * num_rows + r] = {static_cast<int32_t>(b), rows[r], static_cast<int32_t>(h), 0.f, 0.f};
          }
        }
      }
    }
  });

  // Steps 1 and 2: row statistics per pair, then the scores per (sample, tile).
  std::vector<float> scores(batch * tokens, 0.f);
  const int64_t tiles = (tokens + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sma_self_guided_mask", [&] {
    const Problem<scalar_t> problem{q.data_ptr<scalar_t>(),
                                    k.data_ptr<scalar_t>(),
                                    valid,
                                    heads,
                                    queries,
                                    tokens,
                                    dim,
                                    static_cast<float>(scale),
                                    head_mix_random ? 1.f : 1.f / static_cast<float>(heads)};
    const int64_t pairs_per_sample = std::max<int64_t>(pair_offset[batch] / std::max<int64_t>(batch, 1), 1);
    const int64_t tile_cost = kTile * dim * pairs_per_sample;
    if (batch >= at::get_num_threads()) {
      // Whole samples per thread, steps 1 and 2 back to back: step 2 finds in cache the keys that
      // step 1 has just read, and one parallel region serves the whole batch.
      at::parallel_for(0, batch, grain(2 * tiles * tile_cost, kVectorWork), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          row_stats(problem, pairs.data(), pair_offset[b], pair_offset[b + 1]);
          token_scores(problem, pairs.data(), pair_offset.data(), scores.data(), b * tiles, (b + 1) * tiles);
        }
      });
    } else {
      // Fewer samples than threads: split each sample's pairs, then its tiles, between threads.
      for (int64_t b = 0; b < batch; ++b) {
        at::parallel_for(pair_offset[b], pair_offset[b + 1], grain(tokens * dim, kVectorWork),
                         [&](int64_t begin, int64_t end) { row_stats(problem, pairs.data(), begin, end); });
        at::parallel_for(b * tiles, (b + 1) * tiles, grain(tile_cost, kVectorWork),
                         [&](int64_t begin, int64_t end) {
                           token_scores(problem, pairs.data(), pair_offset.data(), scores.data(), begin, end);
                         });
      }
    }
  });

  // Step 3: forced tokens, then the top scores, then the random picks.
  at::parallel_for(0, batch, grain(2 * tokens, kScalarWork), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> candidates(tokens), by_rank(tokens);
    for (int64_t b = begin; b < end; ++b) {
      const Counts& c = counts[b];
      const bool* ok = valid + b * tokens;
      bool* taken = out + b * tokens;
      if (mask_self) {
        for (int64_t r = 0; r < c.num_rows; ++r) {
          taken[chosen[b * queries + r]] = true;
        }
      }
      if (c.num_top > 0) {
        const float* score = scores.data() + b * tokens;
        int64_t free = 0;
        for (int64_t j = 0; j < tokens; ++j) {
          if (ok[j] && !taken[j]) {
            candidates[free++] = static_cast<int32_t>(j);
          }
        }
        TORCH_CHECK(c.num_top <= free, "self_guided_mask: internal error, too few free tokens");
        // NaN (from non-finite inputs) ranks last, which keeps the order strict and weak.
        const auto key = [score](int32_t j) { return std::isnan(score[j]) ? kNegInf : score[j]; };
        const auto better = [&key](int32_t x, int32_t y) {
          const float kx = key(x), ky = key(y);
          return kx > ky || (kx == ky && x < y);
        };
        std::nth_element(candidates.begin(), candidates.begin() + c.num_top, candidates.begin() + free,
                         better);
        for (int64_t r = 0; r < c.num_top; ++r) {
          taken[candidates[r]] = true;
        }
      }
      if (c.num_random > 0) {
        take_smallest_ranks(token_rank + b * tokens, tokens, c.num_random, by_rank, "token_rank", b,
                            [&](int32_t j) { return ok[j] && !taken[j]; }, [&](int32_t j) { taken[j] = true; });
      }
    }
  });
  return mask;
}

}  // namespace sma_kernels::cpu
