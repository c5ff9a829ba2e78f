"""Benchmark cases: the four workloads (bench/README.md, "Workloads"), their small CPU versions, and sweeps.

A :class:`Case` is one shape plus the SMA options of the domain it comes from. Its inputs are
random q, k, v with realistic padding (right-padded, lengths drawn uniformly in
``[min_length_frac * L, L]``): proteins and SMILES vary in length, HIGGS rows are 28 fixed
features and image crops are all full, so those two have no padding but still pass ``valid``,
as a model would.

The work model (``flops`` / ``bytes``) is the dense attention of the case, the same for every
provider, so "achieved TFLOP/s" is an effective rate that orders providers exactly as time does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch

import sma_kernels
from sma_kernels.plan import MaskPlan


@dataclass(frozen=True)
class Case:
    """One benchmark shape (B, H, Q, L, d, dv) and its SMA options."""

    name: str
    group: str  # "workload" or "sweep-L" / "sweep-Q" / "sweep-B" / "sweep-d"
    batch: int
    heads: int
    queries: int
    tokens: int
    dim: int
    dim_v: int
    ratio: float
    num_per_query: int
    head_mix: str
    mask_self: bool
    min_length_frac: float = 1.0
    backward: bool = True  # also time forward+backward

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.batch, self.heads, self.queries, self.tokens, self.dim, self.dim_v)

    @property
    def dense_elements(self) -> int:
        """Elements of one (B, H, Q, L) tensor: what the unfused routes materialize."""
        return self.batch * self.heads * self.queries * self.tokens

    def options(self) -> dict[str, Any]:
        """Keyword arguments of the public ops for this case (noise 0: the guided regime)."""
        return {"ratio": self.ratio, "num_per_query": self.num_per_query, "head_mix": self.head_mix,
                "mask_self": self.mask_self, "noise": 0.0, "scale": self.dim ** -0.5}

    def flops(self, metric: str) -> float:
        """Nominal FLOPs: dense attention forward 2*B*H*Q*L*(d+dv); fwd+bwd 3.5x (FlashAttention
        convention); the mask alone is the logits 2*B*H*Q*L*d."""
        attention = 2.0 * self.dense_elements * (self.dim + self.dim_v)
        return {"mask": 2.0 * self.dense_elements * self.dim, "fwd": attention,
                "fwdbwd": 3.5 * attention}[metric]

    def bytes(self, metric: str, element_size: int) -> float:
        """Nominal bytes moved: read q, k (and v), write out; fwd+bwd also reads out and dout
        and writes dq, dk, dv."""
        b, h, q, n, d, dv = self.shape
        qk = (b * h * q * d + b * h * n * d) * element_size
        vo = (b * h * n * dv + b * h * q * dv) * element_size
        masks = 2 * b * n  # valid in, mask out (bool)
        return {"mask": qk + masks, "fwd": qk + vo + masks, "fwdbwd": 3 * (qk + vo) + masks}[metric]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Inputs(NamedTuple):
    """Everything a provider needs for one call; ``plan`` and ``query_pool`` are shared by all.
    ``plan`` is the first draw of a generator on the inputs' device seeded with ``plan_seed``
    (None: drawn otherwise), so a provider that draws its own plan, as users do, can draw it too."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    query_pool: torch.Tensor
    plan: MaskPlan
    options: dict[str, Any]
    plan_seed: int | None = None


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs of ``case`` with its padding, and one plan for every provider (drawn on
    ``device``, from a generator seeded with ``seed + 1``)."""
    gen = torch.Generator().manual_seed(seed)
    # Drawn on the device itself: the pixel workload's v alone is 0.3 G numbers.
    device_gen = torch.Generator(device=device).manual_seed(seed)
    b, h, q, n, d, dv = case.shape
    tensors = [torch.randn(shape, generator=device_gen, device=device).to(dtype)
               for shape in ((b, h, q, d), (b, h, n, d), (b, h, n, dv))]
    low = max(2, round(case.min_length_frac * n))
    lengths = torch.randint(low, n + 1, (b,), generator=gen)
    valid = (torch.arange(n)[None, :] < lengths[:, None]).to(device)
    query_pool = valid.clone() if case.mask_self else torch.ones(b, q, dtype=torch.bool, device=device)
    plan_seed = seed + 1
    plan = sma_kernels.make_plan(b, q, n, h, generator=torch.Generator(device=device).manual_seed(plan_seed))
    return Inputs(*tensors, valid, query_pool, plan, case.options(), plan_seed)


def _workload(name: str, shape: tuple[int, ...], ratio: float, npq: int, head_mix: str,
              mask_self: bool, min_length_frac: float) -> Case:
    return Case(name, "workload", *shape, ratio=ratio, num_per_query=npq, head_mix=head_mix,
                mask_self=mask_self, min_length_frac=min_length_frac)


# bench/README.md, "Workloads": each domain's shape with its published masking settings.
WORKLOADS = (
    _workload("proteins", (64, 8, 256, 1024, 32, 128), 0.15, 4, "mean", False, 0.25),
    _workload("molecules", (32, 12, 512, 512, 64, 64), 0.3, 3, "random", True, 0.5),
    _workload("higgs", (256, 8, 28, 28, 16, 16), 0.2, 3, "random", True, 1.0),
    _workload("pixels", (8, 8, 256, 36864, 32, 128), 0.15, 4, "mean", False, 1.0),
)
# The same workloads shrunk for 2 CPU cores: fewer samples, and fewer pixels. HIGGS keeps its
# batch of 256, since the per-sample loop of the published code is what it measures.
_CPU_SMALL = {"proteins": {"batch": 2}, "molecules": {"batch": 2}, "higgs": {},
              "pixels": {"batch": 1, "tokens": 4096}}
_CPU_FULL = {"proteins": {"batch": 8}, "molecules": {"batch": 8}, "higgs": {},
             "pixels": {"batch": 1}}


def workloads(device_type: str, full: bool) -> list[Case]:
    """The four workloads: full sizes on a GPU, shrunk versions on the CPU."""
    if device_type != "cpu":
        return list(WORKLOADS)
    sizes = _CPU_FULL if full else _CPU_SMALL
    return [replace(case, **sizes[case.name]) for case in WORKLOADS]


def sweeps(device_type: str, full: bool) -> list[Case]:
    """Sweeps around the proteins cross-attention setting: L always on a GPU and with ``--full``
    on the CPU; Q, B and head dim with ``--full`` only. Forward and mask times only."""
    base = replace(WORKLOADS[0], group="sweep", backward=False, min_length_frac=0.5,
                   batch=8 if device_type != "cpu" else 1)
    if not full and device_type == "cpu":
        return []
    cases = [replace(base, name=f"L={n}", group="sweep-L", tokens=n)
             for n in (256, 1024, 4096, 16384, 65536)]
    if full:
        cases += [replace(base, name=f"Q={q}", group="sweep-Q", queries=q, tokens=4096)
                  for q in (32, 128, 512, 1024)]
        cases += [replace(base, name=f"B={b}", group="sweep-B", batch=b)
                  for b in ((1, 4, 16, 64) if device_type != "cpu" else (1, 2, 4, 8))]
        cases += [replace(base, name=f"d={d}", group="sweep-d", dim=d, dim_v=d)
                  for d in (16, 32, 64, 128)]
    return cases


def tiny_cases() -> list[Case]:
    """Very small versions of the four workloads, for smoke tests, pytest-benchmark and the
    launch counts. Each takes the Triton path of its full size (sma_kernels/triton/
    short_sequence.py): HIGGS the short-sequence kernels, the others (L > 128) the general path."""
    sizes = {"proteins": (2, 2, 16, 160, 8, 8), "molecules": (2, 3, 136, 136, 8, 8),
             "higgs": (8, 2, 28, 28, 4, 4), "pixels": (1, 2, 16, 300, 8, 8)}
    return [replace(case, **dict(zip(("batch", "heads", "queries", "tokens", "dim", "dim_v"),
                                     sizes[case.name])))
            for case in WORKLOADS]
