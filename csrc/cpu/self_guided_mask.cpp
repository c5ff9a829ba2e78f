/*
 * The fused self-guided mask on the CPU (docs/design.md, "The computation"), parallel with ATen's
 * OpenMP pool. This file is the op: it checks the inputs, runs step 0 and schedules the other steps,
 * which live beside their own explanations in select.h and mask_scores.h.
 *
 * Per sample b, with the randomness of the plan (query_rank, head, token_rank):
 *   0. Counts n, k, k_q, f, num_top, num_random exactly as sma_kernels.plan.mask_counts, and the
 *      chosen rows: the k_q rows of the query pool with the smallest query_rank (select.h). Under
 *      mask_self the pool is query_pool & valid, taken here (a chosen query token is masked
 *      itself, so it must be a real token). Under head_mix="random" a chosen row reads the head
 *      head mod H (floor modulo: any int32 names a head), as every backend does.
 *   1. Row statistics: for each (head, chosen row) pair whose softmax enters the token score, the
 *      max and the sum of exp of its logits over the valid tokens, in one sweep over the keys in
 *      tiles (online softmax); a pair with a non-finite logit on a valid token contributes nothing,
 *      as in the reference (mask_scores.h).
 *   2. Token scores: per tile of tokens, the sum of the pairs' softmax rows, in (head, row) order,
 *      weighted 1/H under head_mix="mean" and 1 under "random" (mask_scores.h).
 *   3. Selection in O(L): the forced tokens (chosen rows under mask_self), the num_top best scores
 *      among the other valid tokens, ties to the lower index, then the num_random still-free valid
 *      tokens of smallest token_rank (select.h).
 *
 * Determinism: the work items (samples in steps 0 and 3, pairs in step 1, (sample, tile) in step 2)
 * are each computed by one thread in a fixed order, so the mask does not depend on the number of
 * threads or on how items are split between them.
 *
 * Memory: the (B, L) fp32 scores, 20 bytes per pair (B * k_q * H at most) and O(L + kTile * d)
 * scratch per thread; never a (Q, L) block, so L = 32768 runs in a few MB.
 *
 * Speed: the layout of the key tiles (key_tiles.h), the exp (fast_exp.h) and the AVX2 + FMA copies
 * of the hot loops (mask_scores.cpp) each say why they are built as they are. The schedule below
 * adds one thing: when there are at least as many samples as threads, a thread runs steps 1 and 2
 * of a sample back to back, so the keys come from memory once, not twice.
 */
#include "self_guided_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "mask_scores.h"
#include "select.h"

namespace sma_kernels::cpu {
namespace {

using detail::Counts;
using detail::kTile;
using detail::Pair;
using detail::Problem;
using detail::row_stats;
using detail::sample_counts;
using detail::select_tokens;
using detail::take_smallest_ranks;
using detail::token_scores;

// Items per thread chunk so that a chunk does at least `work` units of work (tens of microseconds):
// small problems then run on one thread instead of waiting on a parallel region, which costs
// microseconds on an idle machine and a scheduler time slice on a busy one.
constexpr int64_t kScalarWork = 1 << 15;  // units: scalar steps (counting, selection)
constexpr int64_t kVectorWork = 1 << 20;  // units: multiply-adds of the vectorized dot products

int64_t grain(int64_t cost_per_item, int64_t work) {
  return std::max<int64_t>(1, work / std::max<int64_t>(cost_per_item, 1));
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
    std::vector<int32_t> scratch(queries);
    std::vector<uint8_t> picked(queries);
    for (int64_t b = begin; b < end; ++b) {
      const bool* ok = valid + b * tokens;
      const bool* in_pool = pool + b * queries;
      const int64_t n = std::count(ok, ok + tokens, true);
      const auto eligible = [&](int64_t i) { return in_pool[i] && (!mask_self || ok[i]); };
      int64_t pool_size = 0;
      for (int64_t i = 0; i < queries; ++i) {
        pool_size += eligible(i);
      }
      counts[b] = sample_counts(n, pool_size, ratio, num_per_query, mask_self, noise);
      std::fill(picked.begin(), picked.end(), 0);
      take_smallest_ranks(query_rank + b * queries, queries, counts[b].num_rows, scratch, eligible,
                          [&](int32_t i) { picked[i] = 1; });
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
          // Floor modulo, as torch.remainder: C++'s % keeps the sign of a negative draw.
          const int64_t rem = head[b * queries + rows[r]] % heads;
          const auto h = static_cast<int32_t>(rem < 0 ? rem + heads : rem);
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
    std::vector<int32_t> candidates(tokens);
    for (int64_t b = begin; b < end; ++b) {
      select_tokens(counts[b], chosen.data() + b * queries, mask_self, valid + b * tokens,
                    scores.data() + b * tokens, token_rank + b * tokens, tokens, candidates, out + b * tokens);
    }
  });
  return mask;
}

}  // namespace sma_kernels::cpu
