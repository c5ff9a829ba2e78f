"""Lists of the key tiles that hold at least one kept key, for the attention kernels.

Masked attention drops the masked and padded keys, and a key tile where every key is dropped
would only add exact zeros, so the kernels skip it. They loop over a per-sample list of the
non-empty tiles instead of over all tiles with an "is this tile empty?" branch: a load inside a
branch of the loop body is not software-pipelined by Triton (the next tile's K and V could not
be prefetched), while a load whose address comes from the list is.

The tile size is the autotuned BLOCK_N of the attention kernel, unknown when the launcher runs,
so one launch (one program per sample) writes a list for every size in ``TILE_SIZES``; each
attention config names its list by ``TILE_LIST``, the index of its BLOCK_N there. For each size,
the row is swept in chunks of CHUNK keys viewed as (CHUNK / size, size): a max over the second
axis says which tiles are non-empty, and an exclusive prefix count (cumsum) carried across chunks
gives their positions in the list. Memory: (B, len(TILE_SIZES), ceil(L / 32)) int32, O(B * L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_power_of_2

# The BLOCK_N values the attention configs may use (powers of two, ascending).
TILE_SIZES = (32, 64, 128)


@triton.jit
def _list_tiles(keep_row, tiles, count, NK, SIZE: tl.constexpr, CHUNK: tl.constexpr):
    """Writes the indices of the SIZE-key tiles of ``keep_row`` with a kept key to ``tiles``."""
    tile_in_chunk = tl.arange(0, CHUNK // SIZE)
    key_in_tile = tl.arange(0, SIZE)
    listed = tl.zeros((), tl.int32)
    for start in range(0, NK, CHUNK):
        cols = start + tile_in_chunk[:, None] * SIZE + key_in_tile[None, :]
        keep = tl.load(keep_row + cols, mask=cols < NK, other=0) != 0
        non_empty = (tl.max(keep.to(tl.int32), axis=1) > 0).to(tl.int32)
        position = listed + tl.cumsum(non_empty, axis=0) - non_empty
        tl.store(tiles + position, start // SIZE + tile_in_chunk, mask=non_empty != 0)
        listed += tl.sum(non_empty, axis=0)
    tl.store(count, listed)


@triton.jit
def _key_tiles_kernel(KEEP, TILES, COUNTS, NK, stride_keep_b, stride_tiles_b, stride_tiles_list,
                      MIN_TILE: tl.constexpr, NUM_SIZES: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    for level in tl.static_range(NUM_SIZES):
        _list_tiles(KEEP + b * stride_keep_b, TILES + b * stride_tiles_b + level * stride_tiles_list,
                    COUNTS + b * NUM_SIZES + level, NK, MIN_TILE << level, CHUNK)


def key_tiles(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and tile size ``TILE_SIZES[i]``: ``tiles[b, i, :counts[b, i]]``, the ascending
    indices of the key tiles of that size with a kept key, and ``counts`` (B, len(TILE_SIZES))."""
    batch, length = keep.shape
    tiles = torch.empty((batch, len(TILE_SIZES), cdiv(length, TILE_SIZES[0])),
                        dtype=torch.int32, device=keep.device)
    counts = torch.empty((batch, len(TILE_SIZES)), dtype=torch.int32, device=keep.device)
    keep_u8 = keep.contiguous().view(torch.uint8)
    chunk = max(TILE_SIZES[-1], min(4096, next_power_of_2(length)))
    _key_tiles_kernel[(batch,)](  # one program per sample
        KEEP=keep_u8, TILES=tiles, COUNTS=counts, NK=length, stride_keep_b=keep_u8.stride(0),
        stride_tiles_b=tiles.stride(0), stride_tiles_list=tiles.stride(1),
        MIN_TILE=TILE_SIZES[0], NUM_SIZES=len(TILE_SIZES), CHUNK=chunk)
    return tiles, counts
