// exp for the softmax sums of the mask, written as a branch-free polynomial so that the loops that
// call it vectorize. libm's expf is a call that the compiler only vectorizes under -ffast-math,
// which would also break the -inf logits of padding; the polynomial is plain arithmetic, and its
// clamps become vector selects under -fno-trapping-math, which setup.py and CMakeLists.txt pass.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

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

}  // namespace detail
}  // namespace sma_kernels::cpu
