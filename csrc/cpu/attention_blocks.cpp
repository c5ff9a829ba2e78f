// The attention blocks (attention_blocks.h) in plain C++, for fp64 and for CPUs without AVX2, and the
// choice, per call, of the fp32 copy for the CPU running it: AVX-512, else AVX2 + FMA, else plain C++.
#include "attention_blocks.h"

#include "attention_block_bodies.h"
#include "common.h"
#include "gemm_tiles.h"
#include "vector_isa.h"

namespace sma_kernels::cpu {
namespace detail SMA_HIDDEN {

template <>
void forward_block<float>(const ForwardBlock<float>& p) {
#ifdef SMA_ATTENTION_SIMD
  if (has_avx512()) {
    return forward_block_avx512(p);
  }
  if (has_avx2_fma()) {
    return forward_block_avx2(p);
  }
#endif
  forward_body<ScalarIsa<float>>(p);
}

template <>
void forward_block<double>(const ForwardBlock<double>& p) {
  forward_body<ScalarIsa<double>>(p);
}

template <>
void backward_block<float>(const BackwardBlock<float>& p) {
#ifdef SMA_ATTENTION_SIMD
  if (has_avx512()) {
    return backward_block_avx512(p);
  }
  if (has_avx2_fma()) {
    return backward_block_avx2(p);
  }
#endif
  backward_body<ScalarIsa<float>>(p);
}

template <>
void backward_block<double>(const BackwardBlock<double>& p) {
  backward_body<ScalarIsa<double>>(p);
}

}  // namespace detail
}  // namespace sma_kernels::cpu
