"""Building blocks of the SMA network: the pre-LN attention layer and its GELU MLP.

Every attention layer of the model has the same pre-LN shape:

    h = LN(x_q);  y = x_q + W_o attention(W_q h, W_k x_kv, W_v x_kv);  out = y + MLP(LN(y))

The latent or token self-attention layers, the reconstruction decoder and the fine-tuning head
are :class:`AttentionLayer`; the first, masking layer is :class:`MaskingLayer`, whose attention
is the library's module ``sma_kernels.nn.SelfGuidedAttention`` (projections, mask and attention
in one op).

Only the queries are normalized (as in the published Perceiver/SMA code); callers normalize the
keys/values themselves where they need it (the decoder and the head read LN(encoder output), the
first layer reads the already-normalized input embedding); a self-attention layer attends over its
normalized queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sma_kernels.nn import SelfGuidedAttention, SelfGuidedAttentionOutput


class MLP(nn.Module):
    """Linear(D -> wD), GELU, Linear(wD -> D)."""

    def __init__(self, width: int, widening: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, widening * width)
        self.fc2 = nn.Linear(widening * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class AttentionLayer(nn.Module):
    """Pre-LN (queries only) multi-head attention with a query residual, then a pre-LN MLP block.

    Args:
        width: channels of the queries and of the output (the residual stream).
        heads: attention heads; ``qk_width`` and ``width`` must be divisible by it.
        kv_width: channels of the keys/values input (default ``width``).
        qk_width: channels of the query/key projections (default ``width``).
        widening: MLP widening factor.
        dropout: dropout on the attention output and the MLP output.
    """

    def __init__(self, width: int, heads: int, *, kv_width: int | None = None,
                 qk_width: int | None = None, widening: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        kv_width = width if kv_width is None else kv_width
        qk_width = width if qk_width is None else qk_width
        if qk_width % heads or width % heads:
            raise ValueError(f"qk_width={qk_width} and width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.norm_q = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, qk_width)
        self.to_k = nn.Linear(kv_width, qk_width)
        self.to_v = nn.Linear(kv_width, width)
        self.to_out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, widening, dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        return x.view(batch, length, self.heads, channels // self.heads).transpose(1, 2)

    def project(self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q (B, H, Q, d), k (B, H, L, d), v (B, H, L, dv) for these inputs.

        ``x_kv=None`` is self-attention: keys and values come from the normalized queries.
        """
        h = self.norm_q(x_q)
        kv = h if x_kv is None else x_kv
        return self._split(self.to_q(h)), self._split(self.to_k(kv)), self._split(self.to_v(kv))

    def finish(self, x_q: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residual and MLP block, given the per-head attention output (B, H, Q, dv)."""
        batch, _, num_queries, _ = attended.shape
        merged = attended.transpose(1, 2).reshape(batch, num_queries, -1)
        return residual_mlp(self, x_q, self.to_out(merged))

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None,
                kv_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x_q`` (B, Q, width) to ``x_kv`` (B, L, kv_width), or to LN(x_q) itself
        when ``x_kv`` is None; ``kv_valid`` (B, L) bool marks the real keys."""
        q, k, v = self.project(x_q, x_kv)
        attn_mask = None if kv_valid is None else kv_valid[:, None, None, :]
        return self.finish(x_q, F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))


class MaskingLayer(nn.Module):
    """The first layer: :class:`AttentionLayer`'s shape around ``SelfGuidedAttention``.

    Its queries are N learned latents (``num_latents``, cross-attention) or the tokens themselves
    (``num_latents=None``); keys and values read the token embedding as given. ``attention_options``
    are SelfGuidedAttention's masking options (ratio, num_per_query, head_mix, mask_self, noise,
    backend, masking).
    """

    def __init__(self, width: int, heads: int, *, num_latents: int | None = None, widening: int = 1,
                 dropout: float = 0.0, **attention_options: object) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.attention = SelfGuidedAttention(width, heads, num_latents=num_latents, **attention_options)
        self.dropout = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, widening, dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, *, masking: bool, noise: float | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, SelfGuidedAttentionOutput]:
        """(out (B, Q, width), the attention's output with its mask and keep mask) for tokens
        ``x`` (B, L, width) with ``valid`` (B, L) bool; Q = L for self-attention."""
        latents = self.attention.latents
        x_q = x if latents is None else latents.expand(x.shape[0], -1, -1)
        attended = self.attention(x, valid, queries=self.norm_q(x_q), noise=noise, masking=masking,
                                  generator=generator)
        return residual_mlp(self, x_q, attended.out), attended


def residual_mlp(layer: AttentionLayer | MaskingLayer, x_q: torch.Tensor,
                 update: torch.Tensor) -> torch.Tensor:
    """y = x_q + dropout(update); y + MLP(LN(y)), with the layer's dropout, norm_mlp and mlp."""
    y = x_q + layer.dropout(update)
    return y + layer.mlp(layer.norm_mlp(y))
