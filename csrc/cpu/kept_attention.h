// Attention over the kept keys only, on the CPU: the forward and the backward of
// sma_kernels.reference.attention_forward / attention_backward, without computing the masked keys.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sma_kernels::cpu {

// (out (B, H, Q, dv) in q's dtype, lse (B, H, Q) fp32, fp64 for fp64 inputs): softmax(scale q k^T over
// the keys with keep[b, j]) v. A sample with no kept key gets out = 0 and lse = +inf. q (B, H, Q, d),
// k (B, H, L, d), v (B, H, L, dv) of one float dtype, any strides; keep (B, L) bool.
std::tuple<at::Tensor, at::Tensor> kept_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& keep,
                                                          double scale);

// (dq, dk, dv) of the forward above given grad_out = dL/dout and its (out, lse). Keys not kept get
// exactly zero gradients, and so does everything of a sample with no kept key.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kept_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& keep, const at::Tensor& out, const at::Tensor& lse, double scale);

}  // namespace sma_kernels::cpu
