"""The randomness plan: every random draw of the self-guided mask, made once, shared by all backends.

SMA's mask has three sources of randomness (docs/design.md, "The randomness plan"): which query
rows are summed, which head each row reads under ``head_mix="random"``, and which tokens the
curriculum noise ``noise`` (eta) picks at random. A :class:`MaskPlan` holds all three as small
int32 tensors (O(B*Q + B*L)), drawn from one ``torch.Generator`` in one call. Every backend reads
the same plan, so with a fixed plan the reference, the C++ kernel and the Triton kernels return
the same mask, and a seed reproduces a run.

How each backend reads the plan:

* ``query_rank[b, i]`` is a priority of query row ``i``: the chosen rows of sample ``b`` are the
  ``k_q`` rows of the query pool with the smallest (priority, index). Uniform random int32
  priorities make that a uniform draw without replacement, with no sort (two equal draws, rare,
  go to the lower index).
* ``head[b, i]`` is the head that row ``i`` reads under ``head_mix="random"``: every backend reads
  it as ``head mod H`` (floor modulo, non-negative for any int32), so a plan drawn inside a call
  (:func:`draw_plan`) carries the raw draw and costs no remainder op; :func:`make_plan` and the
  range check of a caller's plan keep the public plans' heads in [0, H), where mod H changes
  nothing.
* ``token_rank[b, j]`` is a priority of token ``j``: the ``k_rand`` random picks are the free valid
  tokens with the smallest (priority, index).

Ranks may hold any int32 values, so any plan with the right shapes gives exactly the documented
counts; only ``head`` must lie in [0, H) (checked in a caller's plan). The helpers below derive
the per-sample counts and the chosen rows from a plan, vectorized over the batch, for the
reference; the C++ and Triton kernels re-derive them per sample and are tested against them.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

# The plan draws int32 in [INT32_MIN, INT32_MAX): randint excludes its upper bound.
INT32_MIN, INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max


class MaskPlan(NamedTuple):
    """Random draws for one call of the self-guided mask (see the module docstring)."""

    query_rank: torch.Tensor  # (B, Q) int32 priorities of the query rows (smallest first)
    head: torch.Tensor  # (B, Q) int32 in [0, H); read mod H by the backends
    token_rank: torch.Tensor  # (B, L) int32 priorities of the tokens (smallest first)

    def to(self, device: torch.device | str) -> MaskPlan:
        return MaskPlan(*(t.to(device) for t in self))


class MaskCounts(NamedTuple):
    """Per-sample counts (docs/design.md, "The computation", steps 4 and 6); each is (B,) int64."""

    num_masked: torch.Tensor  # k: tokens masked in total
    num_rows: torch.Tensor  # k_q: query rows summed into the token score
    num_forced: torch.Tensor  # f: chosen query tokens forced in under mask_self, else 0
    num_top: torch.Tensor  # k - f - k_rand: tokens taken by score
    num_random: torch.Tensor  # k_rand: uniform random picks (curriculum noise)


def make_plan(batch_size: int, num_queries: int, num_tokens: int, num_heads: int, *,
              generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> MaskPlan:
    """Draw a :class:`MaskPlan` for inputs of shape q (B, H, Q, d) and k (B, H, L, d).

    The sizes come in the plan's own order, B, Q, L, H, not the tensors' (B, H, Q, L): pass them
    by name (``make_plan(batch_size=B, num_queries=Q, num_tokens=L, num_heads=H)``), or use
    :func:`make_plan_for`, which reads them off q and k. A plan drawn for the wrong sizes is
    refused by the ops with an error naming the field and the shape it needs. Its heads lie in
    [0, H): the middle block of the draw mod H (a bias below 2^-31 * H).

    Args:
        batch_size, num_queries, num_tokens, num_heads: B, Q, L and H of the call it is for.
        generator: source of randomness; a seeded generator reproduces the plan.
        device: where the plan's tensors live (default: the generator's device, else CPU).
    """
    for name, value in (("batch_size", batch_size), ("num_queries", num_queries),
                        ("num_tokens", num_tokens), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"make_plan: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"make_plan: {name} must be >= 1, got {value}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"make_plan: generator must be a torch.Generator, got {type(generator).__name__}")
    plan = draw_plan(int(batch_size), int(num_queries), int(num_tokens), generator=generator, device=device)
    return plan._replace(head=plan.head.remainder(int(num_heads)))


def draw_plan(batch_size: int, num_queries: int, num_tokens: int, *,
              generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> MaskPlan:
    """The draw behind :func:`make_plan` (arguments already checked), with ``head`` left as raw
    int32 draws.

    The ops draw their own plan with it: the backends read ``head`` mod H, which gives the heads
    of :func:`make_plan` for the same generator, without a launch for the remainder.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    # One draw of uniform int32 for all three fields, on the generator's device, so that a CPU
    # generator gives the same plan for any target device.
    draw_device = generator.device if generator is not None else device
    draws = torch.randint(INT32_MIN, INT32_MAX, (batch_size, 2 * num_queries + num_tokens),
                          generator=generator, dtype=torch.int32, device=draw_device)
    if draw_device != device:
        draws = draws.to(device)
    # split_with_sizes, not split: the Python wrapper of split costs more than the views (this
    # runs on every call without a plan).
    return MaskPlan(*draws.split_with_sizes([num_queries, num_queries, num_tokens], dim=1))


def make_plan_for(q: torch.Tensor, k: torch.Tensor, *, generator: torch.Generator | None = None) -> MaskPlan:
    """A :class:`MaskPlan` for these q (B, H, Q, d) and k (B, H, L, d), on q's device."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"make_plan_for: {name} must be a torch.Tensor (B, H, n, d), got "
                            f"{type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"make_plan_for: {name} must be a 4-d tensor (B, H, n, d), got {tuple(x.shape)}")
    batch, heads, num_queries, _ = q.shape
    return make_plan(batch_size=batch, num_queries=num_queries, num_tokens=k.shape[2], num_heads=heads,
                     generator=generator, device=q.device)


def query_pool_argument(valid: torch.Tensor | None, query_valid: torch.Tensor | None,
                        mask_self: bool) -> torch.Tensor | None:
    """(B, Q) bool or None (every row): the ``query_pool`` argument of the backends'
    ``self_guided_mask``.

    ``query_valid`` when given, else ``valid`` under ``mask_self``, else every row. It is not
    intersected with ``valid`` under ``mask_self``: each backend does that itself
    (:func:`restrict_query_pool`), so that a call issues no op for it.
    """
    if query_valid is not None:
        return query_valid
    return valid if mask_self else None


def all_set_if_none(flags: torch.Tensor | None, batch: int, size: int,
                    device: torch.device) -> torch.Tensor:
    """``flags`` (B, size) bool, or all True for None: a ``valid`` or ``query_pool`` a call
    leaves at its all-set default."""
    if flags is not None:
        return flags
    return torch.ones(batch, size, dtype=torch.bool, device=device)


def materialized_flags(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                       query_pool: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A backend's ``valid`` (B, L) and ``query_pool`` (B, Q) as tensors (None: all True), for
    a backend that reads them as tensors."""
    batch = q.shape[0]
    return (all_set_if_none(valid, batch, k.shape[2], k.device),
            all_set_if_none(query_pool, batch, q.shape[2], q.device))


def kept_tokens(valid: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """keep = valid & ~mask (None: every token valid) in one op: the mask never marks padding,
    so valid ^ mask is the same."""
    return ~mask if valid is None else valid ^ mask


def restrict_query_pool(valid: torch.Tensor, query_pool: torch.Tensor, mask_self: bool) -> torch.Tensor:
    """(B, Q) bool: the pool of docs/design.md, "The computation", step 4, from a backend's
    ``query_pool`` argument: under ``mask_self`` only its real tokens (a chosen query token is
    masked itself, so a padded one must never be chosen)."""
    return query_pool & valid if mask_self else query_pool


def default_query_pool(valid: torch.Tensor, num_queries: int, query_valid: torch.Tensor | None,
                       mask_self: bool) -> torch.Tensor:
    """(B, Q) bool: the query rows that may be chosen.

    ``query_valid`` when given, else every row; under ``mask_self`` only real tokens (a chosen
    query token is masked itself), so ``valid`` is the default and is intersected with.
    """
    pool = query_pool_argument(valid, query_valid, mask_self)
    return restrict_query_pool(valid, all_set_if_none(pool, valid.shape[0], num_queries, valid.device),
                               mask_self)


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    """Round half-to-even (Python's and torch's rule) and return int64."""
    return torch.round(x).long()


def mask_counts(valid: torch.Tensor, query_pool: torch.Tensor, *, ratio: float,
                num_per_query: int, mask_self: bool, noise: float) -> MaskCounts:
    """The counts of docs/design.md, "The computation", for every sample at once.

    ``valid`` is (B, L) bool, ``query_pool`` (B, Q) bool (already intersected with ``valid``
    under ``mask_self``). k = clamp(round(r*n), 1, n-1) for n >= 2, else 0;
    k_q = clamp(round(n*r/npq), 1, pool size), and under ``mask_self`` also at most k so that
    the forced tokens never exceed the masked count.
    """
    n = valid.sum(dim=1)
    pool = query_pool.sum(dim=1)
    # Products in float64, as in Python, so every backend rounds the same values.
    n_float = n.double()
    k = torch.minimum(round_half_even(n_float * ratio).clamp_min(1), n - 1).clamp_min(0)
    k_q = torch.minimum(round_half_even(n_float * ratio / num_per_query).clamp_min(1), pool)
    if mask_self:
        k_q = torch.minimum(k_q, k)
        forced = k_q
    else:
        forced = torch.zeros_like(k)
    num_random = round_half_even((k - forced).double() * noise)
    return MaskCounts(k, k_q, forced, k - forced - num_random, num_random)


def take_smallest(keys: torch.Tensor, eligible: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per row, a bool mask of the ``count`` eligible entries with the smallest (key, index).

    ``keys`` are any int32 values (priorities); equal keys break toward the lower index. Used for
    the chosen query rows (keys = query_rank) and for the random picks (keys = token_rank).
    """
    width = keys.shape[1]
    # One int64 sort key: ineligible entries after every eligible one, then the int32 key; a
    # stable sort breaks equal keys by index.
    composite = keys.long() - torch.iinfo(torch.int32).min + (~eligible).long() * 2**32
    ordered = composite.argsort(dim=1, stable=True)
    take_sorted = torch.arange(width, device=keys.device)[None, :] < count[:, None]
    return torch.zeros_like(eligible).scatter(1, ordered, take_sorted)


def chosen_rows(plan: MaskPlan, query_pool: torch.Tensor, num_rows: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool: the query rows whose attention is summed into the token score."""
    return take_smallest(plan.query_rank, query_pool, num_rows)
