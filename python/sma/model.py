"""The SMA network: a Perceiver-style encoder whose first layer masks itself, a per-position
reconstruction decoder for pretraining, and a one-query head for fine-tuning.

Encoder (two variants of the first layer; python/sma/README.md, "The model"):

* ``"cross"`` (Perceiver): N learned latents cross-attend to the L input tokens; the following
  layers self-attend over the latents. The mask removes key columns, so no latent sees a masked
  token.
* ``"self"``: the tokens attend to themselves in layer 1; then the masked (and padded) tokens are
  dropped with ``sma_kernels.drop_masked`` and the following layers run on the visible tokens only,
  as in an MAE encoder.

The first layer's attention is the library's ``sma_kernels.nn.SelfGuidedAttention``: during
pretraining it picks the mask from its own attention map (detached) and attends with the masked
keys removed, in one op. Without masking (fine-tuning, evaluation) it is plain attention with the
padding mask.

With ``MaskingConfig.teacher_ema`` the mask is chosen instead by :class:`MaskTeacher`, an EMA copy
of the embedding and of the first layer's query/key path, and the first layer attends with the
teacher's mask applied (the same masked attention as in the op).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import sma_kernels

from .layers import AttentionLayer, MaskingLayer
from .masking import MaskingConfig
from .tokens import VOCAB_SIZE, ByteEmbedding, FeatureEmbedding

INPUT_KINDS = ("bytes", "features")
ENCODERS = ("cross", "self")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network.

    Attributes:
        input_kind: "bytes" (ids of the 262-token vocabulary) or "features" (one token per scalar).
        max_len: longest byte sequence (bytes) or number of features (features).
        encoder: "cross" (learned latents) or "self" (tokens as queries, MAE-style dropping).
        width: channels of every layer.
        depth: self-attention layers after the first layer.
        heads: attention heads of every layer.
        latents: number of learned latents (cross encoder only).
        widening: MLP widening factor.
        dropout: dropout in the embedding, attention outputs and MLPs.
    """

    input_kind: str = "bytes"
    max_len: int = 128
    encoder: str = "cross"
    width: int = 64
    depth: int = 2
    heads: int = 4
    latents: int = 32
    widening: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderOutput(NamedTuple):
    hidden: torch.Tensor  # (B, M, D): latents, or the visible tokens packed to the left
    valid: torch.Tensor  # (B, M) bool
    mask: torch.Tensor | None  # (B, L) bool, True = masked; None without masking


def _init_weights(model: nn.Module) -> None:
    # The published initialisation: N(0, 0.02) weights, latents and queries, zero biases,
    # unit LayerNorms.
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith(("latents", "queries")):
            nn.init.normal_(param, std=0.02)


class Encoder(nn.Module):
    """Input embedding, the (masking) first layer, then ``depth`` self-attention layers.

    ``masking`` sets the first layer's masking options (None: an encoder that never masks, as in
    fine-tuning); whether a call masks is the ``masking`` argument of :meth:`forward`.
    """

    def __init__(self, config: ModelConfig, backend: str = "auto", masking: MaskingConfig | None = None) -> None:
        super().__init__()
        self.config = config
        width = config.width
        if config.input_kind == "bytes":
            self.embed: nn.Module = ByteEmbedding(width, config.max_len, config.dropout)
        else:
            self.embed = FeatureEmbedding(width, config.max_len, config.dropout)
        cross = config.encoder == "cross"
        options = {"backend": backend, "masking": masking is not None}
        if masking is not None:
            options.update(ratio=masking.ratio, num_per_query=masking.num_per_query,
                           head_mix=masking.head_mix, mask_self=masking.mask_self and not cross,
                           noise=1.0 if masking.strategy == "random" else 0.0)
        self.first = MaskingLayer(width, config.heads, num_latents=config.latents if cross else None,
                                  widening=config.widening, dropout=config.dropout, **options)
        self.layers = nn.ModuleList(
            AttentionLayer(width, config.heads, widening=config.widening, dropout=config.dropout)
            for _ in range(config.depth))

    def forward(self, inputs: torch.Tensor, valid: torch.Tensor, *, masking: bool = False,
                noise: float | None = None, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> EncoderOutput:
        """Encode ``inputs`` ((B, L) ids or (B, L) feature values) with ``valid`` (B, L) bool.

        With ``masking`` the first layer masks itself (curriculum eta = ``noise``, default the
        layer's own: 1 for random masking, 0 for guided; randomness from ``generator``); with a
        given ``mask`` (B, L) bool it attends with those tokens removed; with neither nothing is
        masked.
        """
        if mask is not None:
            mask = mask & valid  # padding is never masked
            hidden, first = self.first(self.embed(inputs), valid & ~mask, masking=False)
            first = first._replace(mask=mask)
            masking = True
        else:
            hidden, first = self.first(self.embed(inputs), valid, masking=masking, noise=noise,
                                       generator=generator)
        if self.first.attention.self_attention:
            hidden, hidden_valid, _ = sma_kernels.drop_masked(hidden, first.keep)
        else:
            hidden_valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        for layer in self.layers:
            hidden = layer(hidden, kv_valid=hidden_valid)
        return EncoderOutput(hidden, hidden_valid, first.mask if masking else None)


class MaskTeacher(nn.Module):
    """What the first layer's mask reads, held apart from the trained encoder: the input embedding,
    the query LayerNorm, the latents (cross encoder) and the q/k projections.

    Its weights start as the encoder's and follow them as an exponential moving average
    (:meth:`update`, once per optimizer step); it has no gradient and never uses dropout. The mask
    it chooses is ``sma_kernels.self_guided_mask`` of its own q and k with the first layer's
    masking options, i.e. exactly the mask the first layer would choose with the teacher's weights.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        attention = encoder.first.attention
        self.embed = copy.deepcopy(encoder.embed)
        self.norm_q = copy.deepcopy(encoder.first.norm_q)
        self.to_q = copy.deepcopy(attention.to_q)
        self.to_k = copy.deepcopy(attention.to_k)
        self.latents = None if attention.latents is None else nn.Parameter(attention.latents.detach().clone())
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> MaskTeacher:
        return super().train(False)  # no dropout, whatever the model's mode

    def _pairs(self, encoder: Encoder) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        attention = encoder.first.attention
        for mine, theirs in ((self.embed, encoder.embed), (self.norm_q, encoder.first.norm_q),
                             (self.to_q, attention.to_q), (self.to_k, attention.to_k)):
            yield from zip(mine.parameters(), theirs.parameters(), strict=True)
        if self.latents is not None:
            yield self.latents, attention.latents

    @torch.no_grad()
    def copy_from(self, encoder: Encoder) -> None:
        """Set the teacher's weights to the encoder's."""
        for mine, theirs in self._pairs(encoder):
            mine.copy_(theirs)

    @torch.no_grad()
    def update(self, encoder: Encoder, decay: float) -> None:
        """teacher <- decay * teacher + (1 - decay) * encoder, weight by weight."""
        for mine, theirs in self._pairs(encoder):
            mine.lerp_(theirs.detach(), 1.0 - decay)

    @torch.no_grad()
    def mask(self, inputs: torch.Tensor, valid: torch.Tensor, encoder: Encoder, *,
             noise: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) bool, True = masked: the mask chosen from the teacher's attention, with the
        masking options (and default curriculum eta) of ``encoder``'s first layer."""
        attention = encoder.first.attention
        x = self.embed(inputs)
        x_q = x if self.latents is None else self.latents.expand(x.shape[0], -1, -1)
        q, k = attention._split(self.to_q(self.norm_q(x_q))), attention._split(self.to_k(x))
        return sma_kernels.self_guided_mask(
            q, k, valid, ratio=attention.ratio, num_per_query=attention.num_per_query,
            head_mix=attention.head_mix, query_valid=valid if self.latents is None else None,
            mask_self=attention.mask_self, noise=attention.noise if noise is None else noise,
            generator=generator, backend=attention.backend)


class Readout(nn.Module):
    """Learned queries cross-attending to LN(encoder output), then LN and a linear projection.

    With one query per input position it is the reconstruction decoder; with one query it is
    the fine-tuning head.
    """

    def __init__(self, width: int, heads: int, num_queries: int, out_features: int,
                 widening: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.empty(num_queries, width))
        self.norm_kv = nn.LayerNorm(width)
        self.layer = AttentionLayer(width, heads, widening=widening, dropout=dropout)
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_features)

    def forward(self, encoded: EncoderOutput, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, out_features): the outputs of the queries ``positions`` (B, P) int64."""
        out = self.layer(self.queries[positions], self.norm_kv(encoded.hidden), encoded.valid)
        return self.proj(self.norm_out(out))


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        input_kind: str) -> torch.Tensor:
    """Mean reconstruction loss over the masked positions only.

    Args:
        prediction: (B, L, 262) logits for bytes, (B, L, 1) values for features.
        target: (B, L) ids or values.
        mask: (B, L) bool, True = masked; every other position is ignored.
    """
    picked = prediction[mask]
    if picked.shape[0] == 0:  # nothing masked (all samples shorter than 2 tokens)
        return prediction.sum() * 0.0
    if input_kind == "bytes":
        return F.cross_entropy(picked.float(), target[mask])
    return F.mse_loss(picked[:, 0].float(), target[mask].float())


class SMAPretrainer(nn.Module):
    """Encoder + reconstruction decoder; the loss counts the masked positions only."""

    def __init__(self, config: ModelConfig, masking: MaskingConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.masking = masking
        self.encoder = Encoder(config, backend, masking)
        out = VOCAB_SIZE if config.input_kind == "bytes" else 1
        self.decoder = Readout(config.width, config.heads, config.max_len, out, config.widening)
        self.teacher = MaskTeacher(self.encoder) if masking.uses_teacher else None
        _init_weights(self)
        if self.teacher is not None:
            self.teacher.copy_from(self.encoder)

    def update_teacher(self) -> None:
        """One EMA step of the mask teacher towards the encoder (nothing without a teacher)."""
        if self.teacher is not None:
            self.teacher.update(self.encoder, self.masking.teacher_ema)

    def encode_masked(self, inputs: torch.Tensor, valid: torch.Tensor, *, noise: float | None = 0.0,
                      generator: torch.Generator | None = None) -> EncoderOutput:
        """The encoder's output under this model's masking (curriculum eta ``noise``; random
        masking always uses eta = 1); the mask comes from the teacher when there is one."""
        noise = None if self.masking.strategy == "random" else noise  # random masking: eta = 1
        if self.teacher is not None:
            mask = self.teacher.mask(inputs, valid, self.encoder, noise=noise, generator=generator)
            return self.encoder(inputs, valid, mask=mask)
        return self.encoder(inputs, valid, masking=True, noise=noise, generator=generator)

    def forward(self, inputs: torch.Tensor, valid: torch.Tensor, *, noise: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mask (B, L) bool) for one batch.

        The loss counts the masked positions only, so the decoder runs only their queries:
        they are packed to the left with ``drop_masked`` (the result is the same as decoding
        every position and discarding the others, since decoder queries do not interact).
        """
        encoded = self.encode_masked(inputs, valid, noise=noise, generator=generator)
        positions = torch.arange(inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)
        _, packed_valid, packed_positions = sma_kernels.drop_masked(positions, encoded.mask)
        prediction = self.decoder(encoded, packed_positions)
        target = torch.gather(inputs, 1, packed_positions)
        return reconstruction_loss(prediction, target, packed_valid, self.config.input_kind), \
            encoded.mask


class SMAPredictor(nn.Module):
    """Encoder (no masking) + one-query cross-attention head with ``num_outputs`` outputs."""

    def __init__(self, config: ModelConfig, num_outputs: int = 1, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, backend)
        self.head = Readout(config.width, config.heads, 1, num_outputs, config.widening,
                            config.dropout)
        _init_weights(self)

    def forward(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, num_outputs) predictions."""
        query = torch.zeros(inputs.shape[0], 1, dtype=torch.long, device=inputs.device)
        return self.head(self.encoder(inputs, valid), query)[:, 0]
