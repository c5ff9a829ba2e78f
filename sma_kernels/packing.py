"""MAE-style repacking of the tokens a mask keeps."""

from __future__ import annotations

import torch

from .checks import check_mask_tensor


def drop_masked(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE-style repack: move each sample's kept tokens to the front, in order, and re-pad.

    Args:
        x: (B, L, ...) token features.
        keep: (B, L) bool, True = keep (e.g. ``valid & ~mask``); the dropped tokens may sit anywhere.

    Returns:
        ``x_packed`` (B, L', ...) with L' = the largest kept count (zeros past each sample's count),
        ``valid_packed`` (B, L') bool, and ``index`` (B, L') int64: the position in ``x`` of each
        packed token (0 where ``valid_packed`` is False). Differentiable with respect to ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, L, ...), got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, L, ...), got {tuple(x.shape)}")
    keep = check_mask_tensor("keep", keep, tuple(x.shape[:2]), "(B, L)", x.device, on="x",
                             meaning="True = keep")
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    # A stable sort of "dropped" flags puts the kept tokens first, in their original order.
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices[:, :width]
    valid_packed = torch.arange(width, device=x.device)[None, :] < counts[:, None]
    index = order.masked_fill(~valid_packed, 0)
    gather_index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    fill = valid_packed.view(*valid_packed.shape, *([1] * (x.dim() - 2)))
    x_packed = torch.where(fill, torch.gather(x, 1, gather_index), torch.zeros((), dtype=x.dtype,
                                                                                device=x.device))
    return x_packed, valid_packed, index
