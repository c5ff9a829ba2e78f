"""Masking settings of the first layer and the random -> guided curriculum.

Guided and random masking go through the same op, ``sma_kernels.self_guided_attention``: random
masking is curriculum noise eta = 1, which makes the mask a uniform random k-subset of the valid
tokens (docs/design.md, "The computation", step 7), so the two strategies differ in nothing but
the choice.

With ``teacher_ema`` the guided mask is chosen by a teacher: an exponential moving average of
the weights that the mask reads (the input embedding and the first layer's query/key path), while
the layer itself attends with its own weights (python/sma/README.md, "What the mask learns").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

STRATEGIES = ("guided", "random")


@dataclass(frozen=True)
class MaskingConfig:
    """How the first layer masks during pretraining.

    Attributes:
        strategy: "guided" (self-guided from attention) or "random" (uniform, same op at eta = 1).
        ratio: fraction r of each sample's valid tokens that is masked.
        num_per_query: npq; k_q = round(n * r / npq) query rows are summed into the token score.
        head_mix: "mean" over heads or "random" (one head per query row).
        mask_self: self-attention encoder only: the chosen query tokens are masked themselves.
        curriculum: fraction of the pretraining steps over which eta decays from 1 to 0 by a
            cosine (0 = guided from the first step). Ignored for random masking.
        teacher_ema: 0 = the layer's own attention chooses the mask; d in (0, 1) = an EMA
            teacher with decay d per optimizer step chooses it. Ignored for random masking.
    """

    strategy: str = "guided"
    ratio: float = 0.15
    num_per_query: int = 4
    head_mix: str = "mean"
    mask_self: bool = False
    curriculum: float = 0.0
    teacher_ema: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not 0.0 <= self.curriculum <= 1.0:
            raise ValueError(f"curriculum must lie in [0, 1], got {self.curriculum}")
        if not 0.0 <= self.teacher_ema < 1.0:
            raise ValueError(f"teacher_ema must lie in [0, 1), got {self.teacher_ema}")

    @property
    def uses_teacher(self) -> bool:
        """Whether an EMA teacher chooses the mask (guided masking with teacher_ema > 0)."""
        return self.strategy == "guided" and self.teacher_ema > 0.0

    def noise(self, step: int, total_steps: int) -> float:
        """Curriculum eta at ``step`` of ``total_steps``: 1 for random masking, else a cosine
        decay from 1 to 0 over the first ``curriculum * total_steps`` steps, then 0."""
        if self.strategy == "random":
            return 1.0
        length = self.curriculum * total_steps
        if step >= length:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * step / length))

    def to_dict(self) -> dict:
        return asdict(self)
