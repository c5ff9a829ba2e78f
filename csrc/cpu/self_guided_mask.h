// The fused self-guided mask on the CPU; see self_guided_mask.cpp for the algorithm.
#pragma once

#include <ATen/core/Tensor.h>

namespace sma_kernels::cpu {

// (B, L) bool, True = masked: docs/design.md, "The computation", with the randomness of the plan
// (query_rank, head, token_rank). Same contract as sma_kernels.reference.self_guided_mask.
at::Tensor self_guided_mask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& valid,
                            const at::Tensor& query_pool, const at::Tensor& query_rank,
                            const at::Tensor& head, const at::Tensor& token_rank, double ratio,
                            int64_t num_per_query, bool head_mix_random, bool mask_self,
                            double noise, double scale);

}  // namespace sma_kernels::cpu
