"""``SelfGuidedAttention``: the first attention layer of an SMA encoder, as a module.

It is what a model adds around :func:`sma_kernels.self_guided_attention`: the q/k/v/out
projections and the head split, the op itself, the keep mask, and optionally the MAE repack with
:func:`sma_kernels.drop_masked`. Two variants, as in SMA:

* self-attention (``num_latents=None``): the tokens are their own queries (Q = L); the pool of
  query rows is the real tokens, and ``mask_self`` may mask the chosen query tokens;
* cross-attention (``num_latents=N``): N learned latents query the tokens (Perceiver).

In training mode it masks; in eval mode, or with ``masking=False``, it is plain attention with the
padding mask (same backend, nothing masked). ``forward(..., masking=True)`` masks in eval mode
too (e.g. to look at the masks of a trained model).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import api, backends, ops
from .checks import check_mask_tensor, check_positive_int, check_tensor
from .packing import drop_masked
from .plan import MaskPlan, kept_tokens


class SelfGuidedAttentionOutput(NamedTuple):
    """What :class:`SelfGuidedAttention` returns.

    Attributes:
        out: (B, Q, out_dim) attention output after the out projection (Q = L for self-attention).
        mask: (B, L) bool, True = masked (all False when not masking).
        keep: (B, L) bool, ``valid & ~mask``: the tokens the encoder sees.
        packed: with ``return_packed=True``, ``drop_masked`` of the kept tokens: the layer's output
            tokens under self-attention, the input tokens ``x`` under cross-attention (whose
            outputs are the latents). A tuple (x_packed, valid_packed, index), else None.
    """

    out: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class SelfGuidedAttention(nn.Module):
    """Multi-head attention whose own attention map chooses the SMA mask, in one op.

    Args:
        embed_dim: channels of the input tokens (keys and values read them).
        num_heads: attention heads; ``qk_dim`` and ``value_dim`` must be divisible by it.
        num_latents: None for self-attention; N for cross-attention from N learned latents.
        query_dim: channels of the query inputs (the latents; default ``embed_dim``).
        qk_dim: channels of the q/k projections (default ``embed_dim``).
        value_dim: channels of the v projection (default ``embed_dim``).
        out_dim: channels of the output (default ``query_dim``).
        bias: whether the projections have biases.
        ratio, num_per_query, head_mix, mask_self, noise, backend: the options of
            :func:`sma_kernels.self_guided_attention` (``noise`` may be overridden per call, for
            the random -> guided curriculum; ``mask_self`` needs self-attention).
        masking: False makes the layer plain attention with the padding mask in every mode.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_latents: int | None = None,
                 query_dim: int | None = None, qk_dim: int | None = None,
                 value_dim: int | None = None, out_dim: int | None = None, bias: bool = True,
                 ratio: float = 0.15, num_per_query: int = 4, head_mix: str = "mean",
                 mask_self: bool = False, noise: float = 0.0, masking: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        query_dim = embed_dim if query_dim is None else query_dim
        qk_dim = embed_dim if qk_dim is None else qk_dim
        value_dim = embed_dim if value_dim is None else value_dim
        out_dim = query_dim if out_dim is None else out_dim
        embed_dim, num_heads, query_dim, qk_dim, value_dim, out_dim = (
            check_positive_int(name, value) for name, value in (
                ("embed_dim", embed_dim), ("num_heads", num_heads), ("query_dim", query_dim),
                ("qk_dim", qk_dim), ("value_dim", value_dim), ("out_dim", out_dim)))
        if qk_dim % num_heads or value_dim % num_heads:
            raise ValueError(f"qk_dim={qk_dim} and value_dim={value_dim} must be divisible by "
                             f"num_heads={num_heads}")
        if num_latents is not None:
            num_latents = check_positive_int("num_latents", num_latents)
            if mask_self:
                raise ValueError("mask_self=True needs self-attention (num_latents=None)")
        if query_dim != embed_dim and num_latents is None:
            raise ValueError(f"query_dim={query_dim} must equal embed_dim={embed_dim}: self-attention "
                             f"reads its queries from the tokens")
        self.num_heads = num_heads
        self.ratio, self.num_per_query, self.head_mix = ratio, num_per_query, head_mix
        self.mask_self, self.noise, self.masking, self.backend = mask_self, noise, masking, backend
        self.latents = (None if num_latents is None
                        else nn.Parameter(torch.randn(num_latents, query_dim) * 0.02))
        self.to_q = nn.Linear(query_dim, qk_dim, bias=bias)
        self.to_k = nn.Linear(embed_dim, qk_dim, bias=bias)
        self.to_v = nn.Linear(embed_dim, value_dim, bias=bias)
        self.to_out = nn.Linear(value_dim, out_dim, bias=bias)

    @property
    def self_attention(self) -> bool:
        return self.latents is None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        return x.view(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, *,
                queries: torch.Tensor | None = None, noise: float | None = None,
                masking: bool | None = None, generator: torch.Generator | None = None,
                plan: MaskPlan | None = None, return_packed: bool = False) -> SelfGuidedAttentionOutput:
        """Attend from the queries to the tokens ``x``, masking as configured.

        Args:
            x: (B, L, embed_dim) tokens.
            valid: (B, L) bool, True = real token (default: all real).
            queries: (B, Q, query_dim) query inputs instead of the default (the tokens ``x`` for
                self-attention, Q = L; the learned latents for cross-attention), e.g. a
                normalized copy.
            noise: curriculum eta for this call (default: the module's ``noise``).
            masking: mask in this call (default: ``self.masking and self.training``).
            generator, plan: the randomness of the mask, as in the op.
            return_packed: also return the MAE repack of the kept tokens.
        """
        x = check_tensor("x", x, 3, "(B, L, embed_dim)")
        batch, num_tokens, _ = x.shape
        if valid is not None:  # None reaches the op as it is: every token, and no fill
            valid = check_mask_tensor("valid", valid, (batch, num_tokens), "(B, L)", x.device, on="x")
        if queries is None:
            queries = x if self.self_attention else self.latents.expand(batch, -1, -1)
        else:
            queries = check_tensor("queries", queries, 3, "(B, Q, query_dim)")
            if self.self_attention and queries.shape[:2] != x.shape[:2]:
                raise ValueError(f"self-attention queries must have shape (B, L, query_dim) = "
                                 f"({batch}, {num_tokens}, ...), got {tuple(queries.shape)}")
        q, k, v = self._split(self.to_q(queries)), self._split(self.to_k(x)), self._split(self.to_v(x))
        masking = self.masking and self.training if masking is None else masking
        if masking:
            attended, mask = api.self_guided_attention(
                q, k, v, valid, ratio=self.ratio, num_per_query=self.num_per_query,
                head_mix=self.head_mix, query_valid=valid if self.self_attention else None,
                mask_self=self.mask_self, noise=self.noise if noise is None else noise,
                generator=generator, plan=plan, backend=self.backend)
            keep = kept_tokens(valid, mask)
        else:
            if valid is None:
                valid = torch.ones(batch, num_tokens, dtype=torch.bool, device=x.device)
            mask, keep = torch.zeros_like(valid), valid
            attended = _padded_attention(q, k, v, valid, self.backend)
        out = self.to_out(attended.transpose(1, 2).reshape(batch, attended.shape[2], -1))
        packed = None
        if return_packed:
            packed = drop_masked(out if self.self_attention else x, keep)
        return SelfGuidedAttentionOutput(out, mask, keep, packed)


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                      backend: str) -> torch.Tensor:
    """Attention over the real tokens only, on the backend a masked call would use."""
    (q, k, v), autocast_off = api.autocast_inputs(q, k, v)
    with autocast_off:
        name = backends.resolve(backend, q.device, q.dtype)
        return ops.masked_attention(q, k, v, valid, scale=q.shape[-1] ** -0.5, backend=name)
