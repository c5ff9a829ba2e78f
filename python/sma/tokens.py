"""Inputs: the 262-id byte vocabulary, batching, and the two input embeddings.

Byte sequences (proteins, SMILES) use SMA's vocabulary: ids 0-5 are the specials
``[PAD] [BOS] [EOS] [MASK] [CLS] [SEP]`` and byte value v is id v + 6; a sequence is its UTF-8
bytes followed by ``[SEP]`` (the published code appends only [SEP]).
Tabular inputs (jets) are one token per scalar feature: Linear(1 -> D) of the value plus a
learned embedding of the feature's position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
PAD, BOS, EOS, MASK, CLS, SEP = range(len(SPECIALS))
BYTE_OFFSET = len(SPECIALS)
VOCAB_SIZE = 256 + BYTE_OFFSET  # 262


def encode(text: str, max_len: int) -> np.ndarray:
    """Token ids of ``text``: its UTF-8 bytes (cut to ``max_len - 1``) + 6, then [SEP]."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)[: max_len - 1]
    return np.concatenate([data.astype(np.int64) + BYTE_OFFSET, [SEP]])


def decode_token(token: int) -> str:
    """A printable label for one token id (a character, or the special's name)."""
    if token < BYTE_OFFSET:
        return SPECIALS[token]
    value = token - BYTE_OFFSET
    return chr(value) if 32 <= value < 127 else f"\\x{value:02x}"


def pad_batch(sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad byte-id sequences: ids (B, L) int64 with [PAD] = 0, valid (B, L) bool."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
    return ids, ids != PAD


class ByteEmbedding(nn.Module):
    """Embedding(262, D) + learned absolute positions, then LayerNorm."""

    def __init__(self, width: int, max_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, width)
        self.positions = nn.Embedding(max_len, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.norm(self.tokens(ids) + self.positions(positions)))


class FeatureEmbedding(nn.Module):
    """One token per scalar feature: Linear(1 -> D) + a learned per-feature embedding, then LN."""

    def __init__(self, width: int, num_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.value = nn.Linear(1, width)
        self.positions = nn.Embedding(num_features, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(features.shape[1], device=features.device)
        return self.dropout(self.norm(self.value(features[..., None]) + self.positions(positions)))
