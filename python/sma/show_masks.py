"""Render the masks the first layer chooses, one row per input, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import TokenSet
from .model import SMAPretrainer
from .tokens import decode_token

MASKED_COLOUR = "#e6550d"
VISIBLE_COLOUR = "#c6dbef"


def choose_masks(model: SMAPretrainer, data: TokenSet, count: int, *, noise: float = 0.0,
                 seed: int = 0, device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, valid, mask) of the first ``count`` examples, masked by ``model``'s strategy."""
    inputs, valid = data.batch(np.arange(min(count, len(data))), device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, mask = model(inputs, valid, noise=noise, generator=generator)
    return inputs.cpu(), valid.cpu(), mask.cpu()


def render(inputs: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor, kind: str, path: Path,
           title: str, feature_names: tuple[str, ...] | None = None) -> None:
    """Draw one row per sample: masked tokens orange, visible blue, padding blank. Byte tokens
    are labelled with their character, feature tokens with their feature index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    rows, length = inputs.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.14 * length + 1.0), 0.42 * rows + 1.2))
    for row in range(rows):
        y = rows - 1 - row
        for col in range(length):
            if not valid[row, col]:
                continue
            colour = MASKED_COLOUR if mask[row, col] else VISIBLE_COLOUR
            ax.add_patch(Rectangle((col, y + 0.1), 0.95, 0.8, color=colour, linewidth=0))
            label = decode_token(int(inputs[row, col])) if kind == "bytes" else str(col)
            if kind == "bytes" and label.startswith("["):
                label = "·"  # the trailing [SEP]
            ax.text(col + 0.47, y + 0.5, label, ha="center", va="center", fontsize=6,
                    family="monospace")
    ax.set_xlim(0, length)
    ax.set_ylim(0, rows)
    ax.set_yticks([rows - 1 - r + 0.5 for r in range(rows)], [f"#{r}" for r in range(rows)])
    if feature_names is not None:
        ax.set_xticks(np.arange(length) + 0.5, feature_names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("token position")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=MASKED_COLOUR, label="masked"),
                       Patch(color=VISIBLE_COLOUR, label="visible")],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
