/*
 * Attention over the kept keys only, on the CPU (declared in kept_attention.h): what the self-guided
 * mask removes is never computed, so the mask pays for itself. The ops are the forward and backward
 * of sma_kernels.reference.attention_forward / attention_backward (the cpp backend's masked_attention).
 *
 * Each sample's kept keys are listed once (O(B * L)); every (sample, head) then works on exactly its
 * own count of keys, with no padding to the batch's largest count. This file gathers the operands
 * into packed fp32 buffers (fp64 for fp64 inputs), read through any strides and converted once, and
 * writes the results back; the arithmetic on those buffers is attention_blocks.h.
 *
 * Forward, FlashAttention style, one (sample, head, chunk of kForwardChunk query rows) per work
 * item: the item gathers the kept keys and values of its (sample, head), then each block of
 * kForwardRows query rows runs an online softmax over steps of kForwardKeys keys and writes its output
 * rows and their log-sum-exp.
 *
 * Backward, FlashAttention-2's recomputation, one (sample, head) per work item: the item gathers its
 * kept keys and values, packs its queries and dO (as rows and transposed) and D = rowsum(dO * out),
 * then for each block of kBackwardKeys kept keys recomputes P = exp(S - lse) against all the query
 * rows and accumulates dK, dV of the block and dQ of every row. dQ is summed over the key blocks in
 * order inside the item, so no two threads ever add into one value: no atomics, and nothing depends
 * on the thread count.
 *
 * Masked and padded keys are never read: their gradients are written as zeros, and whatever they
 * hold (NaN, Inf) cannot reach an output. A sample with no kept key gets zero outputs and gradients.
 *
 * Scheduling: items are handed out one at a time from a shared counter, largest first in the
 * backward, so that samples of different lengths still keep every thread busy; each item is always
 * computed the same way by whichever thread takes it, which keeps the results bitwise the same for
 * any number of threads.
 *
 * Memory: the kept-key lists (B * L int32) and, per thread, the packed keys and values of one
 * (sample, head) and O((Q + kBackwardKeys) * (d + dv)) scratch; never a (Q, L) block.
 */
#include "kept_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention_blocks.h"
#include "common.h"

namespace sma_kernels::cpu {
namespace {

using detail::BackwardBlock;
using detail::ForwardBlock;
using detail::kAlign;
using detail::kBackwardKeys;
using detail::kBackwardRows;
using detail::kForwardChunk;
using detail::kForwardKeys;
using detail::kForwardRows;
using detail::round_up;

// Below this many multiply-adds in all, one thread does the work: a parallel region costs
// microseconds on an idle machine and a scheduler time slice on a busy one.
constexpr int64_t kParallelWork = int64_t{1} << 20;

// The arithmetic type: fp32, or fp64 for fp64 inputs.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A 4-d tensor's data and strides, in elements; row(b, h, i) is the start of x[b, h, i, :].
template <typename scalar_t>
struct View {
  scalar_t* data;
  int64_t sb, sh, si, sc;
  scalar_t* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * si; }
};

template <typename scalar_t>
View<scalar_t> view(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<scalar_t>>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Each sample's kept keys in ascending order: index[b * L .. b * L + count[b]).
struct KeptKeys {
  std::vector<int32_t> index;
  std::vector<int64_t> count;
  int64_t tokens;
  const int32_t* of(int64_t b) const { return index.data() + b * tokens; }
};

KeptKeys kept_keys(const at::Tensor& keep_in) {
  const at::Tensor keep = keep_in.contiguous();
  const int64_t batch = keep.size(0), tokens = keep.size(1);
  const bool* flags = keep.data_ptr<bool>();
  KeptKeys kept{std::vector<int32_t>(batch * tokens), std::vector<int64_t>(batch), tokens};
  for (int64_t b = 0; b < batch; ++b) {
    int64_t n = 0;
    for (int64_t j = 0; j < tokens; ++j) {
      if (flags[b * tokens + j]) {
        kept.index[b * tokens + n++] = static_cast<int32_t>(j);
      }
    }
    kept.count[b] = n;
  }
  return kept;
}

// Runs body(item, scratch) for every item in [0, items), each exactly once, handing items out in
// order from a shared counter to the threads of one parallel region; `order` (if not empty) maps
// the hand-out position to the item. Each thread makes its own scratch with make_scratch().
template <typename MakeScratch, typename Body>
void for_each_item(int64_t items, int64_t work, const std::vector<int64_t>& order, MakeScratch make_scratch,
                   Body body) {
  int64_t threads = std::min<int64_t>(at::get_num_threads(), items);
  if (work < kParallelWork || at::in_parallel_region()) {
    threads = 1;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
      body(order.empty() ? i : order[i], scratch);
    }
  });
}

// dst[c] = src[c * stride] * mul for c < n, then zeros up to `padded`. The unit-stride case is its
// own loop so that it vectorizes.
template <typename scalar_t, typename T>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, int64_t padded, T mul, T* dst) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) {
      dst[c] = static_cast<T>(src[c]) * mul;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      dst[c] = static_cast<T>(src[c * stride]) * mul;
    }
  }
  std::fill(dst + n, dst + padded, T(0));
}

// Column `col` of a transposed block with `ld` columns: dst[c * ld + col] = src[c * stride] * mul.
template <typename scalar_t, typename T>
inline void load_column(const scalar_t* src, int64_t stride, int64_t n, T* dst, int64_t ld, int64_t col,
                        T mul) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c * ld + col] = static_cast<T>(src[c * stride]) * mul;
  }
}

// dst[c * stride] = src[c] * mul, rounded to the output dtype, for c < n.
template <typename scalar_t, typename T>
inline void store_row(const T* src, int64_t n, T mul, scalar_t* dst, int64_t stride) {
  if (stride == 1) {
    for (int64_t c = 0; c < n; ++c) {
      dst[c] = static_cast<scalar_t>(src[c] * mul);
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      dst[c * stride] = static_cast<scalar_t>(src[c] * mul);
    }
  }
}

template <typename scalar_t>
inline void zero_row(scalar_t* dst, int64_t n, int64_t stride) {
  for (int64_t c = 0; c < n; ++c) {
    dst[c * stride] = scalar_t(0);
  }
}

struct Shape {
  int64_t batch, heads, queries, tokens, dim, dim_v, dim_pad, dim_v_pad;
};

Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& keep, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be (B, H, Q, d), (B, H, L, d), (B, H, L, dv), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q, k, v must be floating point, got ",
              q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op, ": k ",
              k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v ",
              v.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 2 && keep.size(0) == q.size(0) &&
                  keep.size(1) == k.size(2),
              op, ": keep must be bool (B, L) = (", q.size(0), ", ", k.size(2), "), got ", keep.scalar_type(),
              " ", keep.sizes());
  for (const at::Tensor* t : {&q, &k, &v, &keep}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got ", t->device());
  }
  TORCH_CHECK(k.size(2) < std::numeric_limits<int32_t>::max(), op, ": L must be below 2^31 - 1");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  return {q.size(0), q.size(1),  q.size(2),  k.size(2), q.size(3), v.size(3), round_up(q.size(3), kAlign),
          round_up(v.size(3), kAlign)};
}

// The kept keys and values of (b, h) as rows: keys (n, ld_keys), values (n, dim_v_pad).
template <typename scalar_t, typename T>
void gather_keys(const View<const scalar_t>& k, const View<const scalar_t>& v, const Shape& s, int64_t b,
                 int64_t h, const int32_t* index, int64_t n, T* keys, int64_t ld_keys, T* values) {
  for (int64_t j = 0; j < n; ++j) {
    load_row(k.row(b, h, index[j]), k.sc, s.dim, ld_keys, T(1), keys + j * ld_keys);
    load_row(v.row(b, h, index[j]), v.sc, s.dim_v, s.dim_v_pad, T(1), values + j * s.dim_v_pad);
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, const KeptKeys& kept,
                  const Shape& s, double scale_in, const at::Tensor& out_t, const at::Tensor& lse_t) {
  using T = acc_t<scalar_t>;
  const T scale = static_cast<T>(scale_in);
  const View<const scalar_t> q = view<const scalar_t>(q_t), k = view<const scalar_t>(k_t);
  const View<const scalar_t> v = view<const scalar_t>(v_t);
  const View<scalar_t> out = view<scalar_t>(out_t);
  T* lse = lse_t.data_ptr<T>();  // contiguous (B, H, Q)

  const int64_t most = std::accumulate(kept.count.begin(), kept.count.end(), int64_t{0},
                                      [](int64_t x, int64_t y) { return std::max(x, y); });
  const int64_t total = std::accumulate(kept.count.begin(), kept.count.end(), int64_t{0});
  const int64_t chunks = (s.queries + kForwardChunk - 1) / kForwardChunk;
  struct Scratch {
    std::vector<T> keys, values, queries_t, scores, acc, lse;
  };
  const auto make_scratch = [&] {
    Scratch w;
    w.keys.resize(most * s.dim);
    w.values.resize(most * s.dim_v_pad);
    w.queries_t.resize(s.dim * kForwardRows);
    w.scores.resize(kForwardKeys * kForwardRows);
    w.acc.resize(kForwardRows * s.dim_v_pad);
    w.lse.resize(kForwardRows);
    return w;
  };
  const std::vector<int64_t> in_order;
  for_each_item(
      s.batch * s.heads * chunks, total * s.heads * s.queries * (s.dim + s.dim_v), in_order, make_scratch,
      [&](int64_t item, Scratch& w) {
        const int64_t bh = item / chunks, b = bh / s.heads, h = bh % s.heads, n = kept.count[b];
        const int64_t begin = (item % chunks) * kForwardChunk;
        const int64_t end = std::min(s.queries, begin + kForwardChunk);
        T* lse_rows = lse + bh * s.queries;
        if (n == 0) {  // no kept key: out = 0, lse = +inf
          for (int64_t i = begin; i < end; ++i) {
            zero_row(out.row(b, h, i), s.dim_v, out.sc);
            lse_rows[i] = std::numeric_limits<T>::infinity();
          }
          return;
        }
        gather_keys(k, v, s, b, h, kept.of(b), n, w.keys.data(), s.dim, w.values.data());
        for (int64_t first = begin; first < end; first += kForwardRows) {
          const int64_t rows = std::min(kForwardRows, end - first);
          for (int64_t r = 0; r < rows; ++r) {
            load_column(q.row(b, h, first + r), q.sc, s.dim, w.queries_t.data(), kForwardRows, r, scale);
          }
          ForwardBlock<T> block;
          block.rows = rows;
          block.count = n;
          block.dim = s.dim;
          block.dim_v_pad = s.dim_v_pad;
          block.queries_t = w.queries_t.data();
          block.keys = w.keys.data();
          block.values = w.values.data();
          block.scores = w.scores.data();
          block.acc = w.acc.data();
          block.lse = w.lse.data();
          detail::forward_block(block);
          for (int64_t r = 0; r < rows; ++r) {
            store_row(w.acc.data() + r * s.dim_v_pad, s.dim_v, T(1), out.row(b, h, first + r), out.sc);
            lse_rows[first + r] = w.lse[r];
          }
        }
      });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& grad_out_t, const at::Tensor& q_t, const at::Tensor& k_t,
                   const at::Tensor& v_t, const at::Tensor& keep_t, const at::Tensor& out_t,
                   const at::Tensor& lse_t, const KeptKeys& kept, const Shape& s, double scale_in,
                   const at::Tensor& dq_t, const at::Tensor& dk_t, const at::Tensor& dv_t) {
  using T = acc_t<scalar_t>;
  const T scale = static_cast<T>(scale_in);
  const View<const scalar_t> q = view<const scalar_t>(q_t), k = view<const scalar_t>(k_t);
  const View<const scalar_t> v = view<const scalar_t>(v_t), out = view<const scalar_t>(out_t);
  const View<const scalar_t> grad_out = view<const scalar_t>(grad_out_t);
  const View<scalar_t> dq = view<scalar_t>(dq_t), dk = view<scalar_t>(dk_t), dv = view<scalar_t>(dv_t);
  const bool* keep = keep_t.data_ptr<bool>();  // contiguous (B, L)
  const T* lse_in = lse_t.data_ptr<T>();       // contiguous (B, H, Q)

  // Largest (sample, head) first, so that the last items to run are short ones.
  std::vector<int64_t> order(s.batch * s.heads);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return kept.count[x / s.heads] > kept.count[y / s.heads];
  });

  const int64_t most = std::accumulate(kept.count.begin(), kept.count.end(), int64_t{0},
                                      [](int64_t x, int64_t y) { return std::max(x, y); });
  const int64_t queries_pad = round_up(s.queries, kBackwardRows);
  struct Scratch {
    std::vector<T> q_scaled, q_scaled_t, grad_out, grad_out_t, delta, lse, grad_queries, keys, values, probs,
        grad_logits, grad_keys, grad_values;
  };
  const auto make_scratch = [&] {
    Scratch w;
    w.q_scaled.resize(s.queries * s.dim_pad);
    w.q_scaled_t.resize(s.dim * queries_pad);
    w.grad_out.resize(s.queries * s.dim_v_pad);
    w.grad_out_t.resize(s.dim_v * queries_pad);
    w.delta.resize(queries_pad);
    w.lse.resize(queries_pad);
    w.grad_queries.resize(s.queries * s.dim_pad);
    w.keys.resize(most * s.dim_pad);
    w.values.resize(most * s.dim_v_pad);
    w.probs.resize(kBackwardKeys * kBackwardRows);
    w.grad_logits.resize(kBackwardKeys * kBackwardRows);
    w.grad_keys.resize(kBackwardKeys * s.dim_pad);
    w.grad_values.resize(kBackwardKeys * s.dim_v_pad);
    // The padding query columns, never written by the items: zero queries and dO (as resized), D = 0
    // and lse = +inf, so that P = 0 there.
    std::fill(w.lse.begin(), w.lse.end(), std::numeric_limits<T>::infinity());
    return w;
  };
  const int64_t total = std::accumulate(kept.count.begin(), kept.count.end(), int64_t{0});
  for_each_item(
      s.batch * s.heads, 5 * total * s.heads * s.queries * std::max(s.dim, s.dim_v), order, make_scratch,
      [&](int64_t bh, Scratch& w) {
        const int64_t b = bh / s.heads, h = bh % s.heads, n = kept.count[b];
        const int32_t* index = kept.of(b);
        const bool* kept_flags = keep + b * s.tokens;
        for (int64_t j = 0; j < s.tokens; ++j) {  // keys not kept: zero gradients
          if (n == 0 || !kept_flags[j]) {
            zero_row(dk.row(b, h, j), s.dim, dk.sc);
            zero_row(dv.row(b, h, j), s.dim_v, dv.sc);
          }
        }
        if (n == 0) {
          for (int64_t i = 0; i < s.queries; ++i) {
            zero_row(dq.row(b, h, i), s.dim, dq.sc);
          }
          return;
        }
        for (int64_t i = 0; i < s.queries; ++i) {
          const scalar_t* q_row = q.row(b, h, i);
          load_row(q_row, q.sc, s.dim, s.dim_pad, scale, w.q_scaled.data() + i * s.dim_pad);
          const int64_t block = i / kBackwardRows * kBackwardRows, column = i % kBackwardRows;
          load_column(q_row, q.sc, s.dim, w.q_scaled_t.data() + block * s.dim, kBackwardRows, column, scale);
          T* d_out = w.grad_out.data() + i * s.dim_v_pad;
          load_row(grad_out.row(b, h, i), grad_out.sc, s.dim_v, s.dim_v_pad, T(1), d_out);
          load_column(grad_out.row(b, h, i), grad_out.sc, s.dim_v, w.grad_out_t.data() + block * s.dim_v,
                      kBackwardRows, column, T(1));
          const scalar_t* o = out.row(b, h, i);
          double delta = 0.0;  // in fp64: dS = P (dP - D) subtracts it from values close to it
          for (int64_t c = 0; c < s.dim_v; ++c) {
            delta += static_cast<double>(d_out[c]) * static_cast<double>(o[c * out.sc]);
          }
          w.delta[i] = static_cast<T>(delta);
          w.lse[i] = lse_in[bh * s.queries + i];
        }
        gather_keys(k, v, s, b, h, index, n, w.keys.data(), s.dim_pad, w.values.data());
        std::fill(w.grad_queries.begin(), w.grad_queries.end(), T(0));
        for (int64_t first = 0; first < n; first += kBackwardKeys) {
          const int64_t count = std::min(kBackwardKeys, n - first);
          BackwardBlock<T> block;
          block.queries = s.queries;
          block.count = count;
          block.dim = s.dim;
          block.dim_pad = s.dim_pad;
          block.dim_v = s.dim_v;
          block.dim_v_pad = s.dim_v_pad;
          block.q_scaled = w.q_scaled.data();
          block.q_scaled_t = w.q_scaled_t.data();
          block.grad_out = w.grad_out.data();
          block.grad_out_t = w.grad_out_t.data();
          block.delta = w.delta.data();
          block.lse = w.lse.data();
          block.keys = w.keys.data() + first * s.dim_pad;
          block.values = w.values.data() + first * s.dim_v_pad;
          block.probs = w.probs.data();
          block.grad_logits = w.grad_logits.data();
          block.grad_keys = w.grad_keys.data();
          block.grad_values = w.grad_values.data();
          block.grad_queries = w.grad_queries.data();
          detail::backward_block(block);
          for (int64_t j = 0; j < count; ++j) {
            const int64_t key = index[first + j];
            store_row(w.grad_keys.data() + j * s.dim_pad, s.dim, T(1), dk.row(b, h, key), dk.sc);
            store_row(w.grad_values.data() + j * s.dim_v_pad, s.dim_v, T(1), dv.row(b, h, key), dv.sc);
          }
        }
        for (int64_t i = 0; i < s.queries; ++i) {
          store_row(w.grad_queries.data() + i * s.dim_pad, s.dim, scale, dq.row(b, h, i), dq.sc);
        }
      });
}

at::ScalarType lse_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> kept_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& keep,
                                                          double scale) {
  const Shape s = check_inputs("kept_attention_forward", q, k, v, keep, scale);
  const KeptKeys kept = kept_keys(keep);
  at::Tensor out = at::empty({s.batch, s.heads, s.queries, s.dim_v}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(lse_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kept_attention_forward", [&] {
    forward_impl<scalar_t>(q, k, v, kept, s, scale, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& keep, const at::Tensor& out, const at::Tensor& lse, double scale) {
  const char* op = "kept_attention_backward";
  const Shape s = check_inputs(op, q, k, v, keep, scale);
  const std::vector<int64_t> out_shape{s.batch, s.heads, s.queries, s.dim_v};
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == out_shape && t->scalar_type() == q.scalar_type() && t->device().is_cpu(), op,
                ": grad_out and out must be CPU ", q.scalar_type(), " ", at::IntArrayRef(out_shape),
                ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  const std::vector<int64_t> lse_shape{s.batch, s.heads, s.queries};
  const at::ScalarType lse_type = lse_dtype(q.scalar_type());
  TORCH_CHECK(lse.sizes() == lse_shape && lse.scalar_type() == lse_type && lse.device().is_cpu(), op,
              ": lse must be CPU ", lse_type, " (B, H, Q), got ", lse.scalar_type(), " ", lse.sizes());
  const KeptKeys kept = kept_keys(keep);
  const at::Tensor keep_c = keep.contiguous(), lse_c = lse.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kept_attention_backward", [&] {
    backward_impl<scalar_t>(grad_out, q, k, v, keep_c, out, lse_c, kept, s, scale, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace sma_kernels::cpu
