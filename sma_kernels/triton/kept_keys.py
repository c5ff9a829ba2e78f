"""The kept keys of each sample, in order, for the attention kernels.

Masked keys are scattered over a row (the mask drops 15-30% of the valid keys, anywhere), so a
tile of consecutive keys almost never has all its keys dropped: a kernel that walks key tiles
computes nearly every dropped key and throws the result away. The attention kernels walk a
per-sample permutation of the keys instead, ``order[b]``: the kept key indices ascending, then
the dropped ones ascending (a stable partition of [0, L)), with ``kept[b]`` the number of kept
ones. The forward and dQ kernels gather the K and V rows of ``order[b, :kept[b]]`` block by
block, so a dropped key costs nothing, not even a load; the dK/dV kernel gives each program a
block of ``order[b]``, and the dropped entries, at the end, get their zero gradients written
there.

One program per sample sweeps its row of ``keep`` in chunks of CHUNK keys, twice: the first
sweep counts the kept keys, the second places each key, a kept one at the number of kept keys
before it (an exclusive prefix count, cumsum, carried across chunks), a dropped one after all
kept keys at ``kept + (its index - kept keys before it)``. Memory: O(B * L); deterministic (no
atomics).

The sweep is the ``@triton.jit`` function :func:`kept_key_order`, which runs in two places:
``_kept_keys_kernel`` here (one launch, before ``masked_attention``'s forward and again before
its backward), and the selection kernel (select.py), which writes the order of
keep = valid & ~mask right after the mask in the fused forward of ``self_guided_attention``, so
that neither ``keep`` nor the order costs a launch there, and the backward reuses the saved
order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_flags, next_power_of_2
from .launch import Static, launch, static_builder


@triton.jit
def _kept_in_chunk(keep_row, drop_row, cols, in_row, HAS_DROP: tl.constexpr):
    """1 where the key is kept, 0 elsewhere (int32): ``keep_row`` set (every key of a None row)
    and, under HAS_DROP, ``drop_row`` clear."""
    kept = load_flags(keep_row, cols, in_row)
    if HAS_DROP:
        kept = kept & (tl.load(drop_row + cols, mask=in_row, other=1) == 0)
    return kept.to(tl.int32)


@triton.jit
def kept_key_order(keep_row, drop_row, order_row, kept_out, NK, CHUNK: tl.constexpr,
                   HAS_DROP: tl.constexpr):
    """Writes the stable partition of the keys of ``keep_row`` (kept first) to ``order_row`` and
    the number of kept keys to ``kept_out``. Under HAS_DROP a key is kept where ``keep_row`` is
    set and ``drop_row`` is not (the selection passes the valid row and the mask it just built,
    so that keep = valid & ~mask costs no launch); without it ``drop_row`` is not read."""
    offs = tl.arange(0, CHUNK)
    num_kept = tl.zeros((), tl.int32)
    for start in range(0, NK, CHUNK):
        cols = start + offs
        num_kept += tl.sum(_kept_in_chunk(keep_row, drop_row, cols, cols < NK, HAS_DROP), axis=0)
    kept_before = tl.zeros((), tl.int32)
    for start in range(0, NK, CHUNK):
        cols = start + offs
        in_row = cols < NK
        kept = _kept_in_chunk(keep_row, drop_row, cols, in_row, HAS_DROP)
        rank = kept_before + tl.cumsum(kept, axis=0) - kept  # kept keys before each key
        tl.store(order_row + tl.where(kept != 0, rank, num_kept + cols - rank), cols,
                 mask=in_row)
        kept_before += tl.sum(kept, axis=0)
    tl.store(kept_out, num_kept)


def order_chunk(length: int) -> int:
    """The CHUNK of :func:`kept_key_order` for rows of ``length`` keys: the whole row up to 2048
    keys (one sweep each), blocks of 2048 beyond. (At 4096 the prefix count of a chunk can spill
    registers at 4 warps.)"""
    return max(32, min(2048, next_power_of_2(length)))


@triton.jit
def _kept_keys_kernel(KEEP, ORDER, KEPT, NK, stride_keep_b, stride_order_b,
                      CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # one program per sample
    keep_row = KEEP + b * stride_keep_b
    kept_key_order(keep_row, keep_row, ORDER + b * stride_order_b, KEPT + b, NK, CHUNK, False)


def kept_keys(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``order`` (B, L) int32, per sample the kept key indices ascending then the dropped ones
    ascending, and ``kept`` (B,) int32, the number of kept keys; ``keep`` is (B, L) bool."""
    batch, length = keep.shape
    order = torch.empty((batch, length), dtype=torch.int32, device=keep.device)
    kept = torch.empty((batch,), dtype=torch.int32, device=keep.device)
    keep = keep.contiguous()
    launch(_kept_keys_kernel, _kept_keys_static(batch, length, keep.stride(0), order.stride(0)),
           KEEP=keep, ORDER=order, KEPT=kept)
    return order, kept


@static_builder
def _kept_keys_static(batch: int, length: int, keep_stride: int, order_stride: int) -> Static:
    return Static((batch,), {"NK": length, "stride_keep_b": keep_stride,  # a program per sample
                             "stride_order_b": order_stride, "CHUNK": order_chunk(length)})
