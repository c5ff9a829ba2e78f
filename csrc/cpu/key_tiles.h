// Key tiles: kTile keys of one (sample, head) in fp32, transposed to (d, kTile), and the logits of one
// query row against such a tile.
//
// Why transposed: with the keys stored as columns, the logits of a tile are kTile independent dot
// products that advance together over c = 0..d-1, one broadcast query value times one contiguous
// row of the tile, so they vectorize over tokens with no horizontal sums; and one tile serves every
// (head, chosen row) pair of its head. Padding is handled here too, as a bias of 0 or -inf per
// token, so that the loops over a tile have no branches.
//
// The loader is a template on kAvx2 and everything here is header-inline: the AVX2 + FMA copies of
// steps 1 and 2 (mask_scores.cpp) must see these bodies to compile them for that target.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

#ifdef SMA_X86_DISPATCH
#include <immintrin.h>
#endif

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

// Transposes 8 rows of `dim` floats into columns j0 .. j0+7 of a (dim, kTile) tile.
inline void transpose8_generic(const float* const* rows, int64_t dim, float* tile) {
  for (int64_t c = 0; c < dim; ++c) {
    for (int64_t l = 0; l < 8; ++l) {
      tile[c * kTile + l] = rows[l][c];
    }
  }
}

#ifdef SMA_X86_DISPATCH
// The same with AVX in 8x8 blocks: 24 shuffles instead of 64 scalar stores per block.
inline __attribute__((target("avx2,fma"))) void transpose8_avx2(const float* const* rows, int64_t dim,
                                                                float* tile) {
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

}  // namespace detail
}  // namespace sma_kernels::cpu
