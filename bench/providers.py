"""Everything the benchmark times: the sma-kernels backends and the pure-PyTorch routes they replace.

Every provider turns the same :class:`~bench.cases.Inputs` (q, k, v, valid and one shared plan)
into ``(out, mask)``: the first SMA layer's attention output with the self-guided mask applied.
Masking providers are checked against the reference mask before they are timed (:func:`check`).

* ``sdpa`` / ``sdpa+pad``: plain scaled-dot-product attention with no mask / the padding mask.
  They choose no mask: the floor that the fused op is measured against.
* ``published``: the published algorithm in eager PyTorch (docs/design.md, "Differences from the
  published code", says where ours departs from it): the (B, H, Q, L) logits and an fp32 softmax
  of them are materialized, heads mixed, then a Python loop over samples does the row draw, the
  row sum and ``topk``; masked SDPA follows. It reads the shared plan (rows and random picks
  ordered by the plan's ranks stand in for ``randperm``) and the counts of
  :func:`sma_kernels.plan.mask_counts`, so its mask equals the reference's. Its logits are fp32
  (the published code computes them in the model dtype, then copies them to fp32 for the
  softmax) so that half-precision runs can be checked too.
* ``vectorized``: the mask of ``sma_kernels`` with ``backend="reference"`` (the same math
  without the loop), then masked SDPA.
* ``compiled``: ``torch.compile`` of that (the reference mask math, then masked SDPA).
* ``flex``: the FlexAttention route, below.
* ``sma:<name>``: each sma-kernels backend that ``sma_kernels.backends()`` reports available,
  called as users call it (a generator on the device, the plan drawn inside), and
  ``sma:<name>+plan``: the same given the case's plan.

The FlexAttention route: call 1 attends the chosen rows to the valid tokens and returns each
row's log-sum-exp. Call 2 swaps queries and keys (tokens attend to the chosen rows), shifts every
score by its row's log-sum-exp and returns its own log-sum-exp, which is then
log(sum_i P[h, i, j]): the log column sums. "mean" averages exp of that over heads; "random" is
expressed by a ``mask_mod`` that lets row i through only in its plan head, so the sum over heads
picks P[head_i, i, j]. Both head mixes are supported. Top-k is the reference's selection; masked
SDPA gives the output. On the CPU FlexAttention runs unfused (torch.compile of it supports
neither the CPU with ``return_lse`` nor backward), so there it materializes like the eager routes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

import sma_kernels
from sma_kernels import reference
from sma_kernels.plan import MaskCounts, MaskPlan, chosen_rows, mask_counts
from sma_kernels.testing import compare_masks, reference_selection, selection_from_scores

from .cases import Inputs


class Provider:
    """One way to compute the first SMA layer. Subclasses override :meth:`forward` and,
    when they choose a mask, :meth:`mask`."""

    name = "provider"
    kind = "baseline"  # "floor", "baseline" or "sma-kernels"
    produces_mask = True

    def compiles_on(self, device: torch.device) -> bool:
        """Whether its first call of each mode compiles (timed apart, under a shared budget)."""
        return False

    def unavailable(self, device: torch.device) -> str | None:
        """Why this provider cannot run on ``device``, or None."""
        return None

    def countable(self, device: torch.device) -> bool:
        """Whether its launches can be counted (``bench.launches``): not through torch.compile,
        which a dispatch mode would send down another path."""
        return not self.compiles_on(device)

    def dense(self, device: torch.device) -> bool:
        """Whether it materializes (B, H, Q, L) tensors (guarded by the memory budget)."""
        return True

    def prepare(self, x: Inputs) -> None:
        """Per-case set-up before the first call (e.g. fresh compiled functions)."""

    def rewind(self, x: Inputs) -> None:
        """Reset the random state of a provider that draws its own plan, so that its next call
        draws ``x.plan`` and can be checked against the reference (others: nothing to reset)."""

    def mask(self, x: Inputs) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: Inputs, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def _masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                 scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=scale)


class Sdpa(Provider):
    """SDPA with no mask, or with the padding mask only."""

    kind = "floor"
    produces_mask = False

    def __init__(self, padding: bool) -> None:
        self.padding = padding
        self.name = "sdpa+pad" if padding else "sdpa"

    def dense(self, device: torch.device) -> bool:
        return False

    def forward(self, x, q, k, v):
        if self.padding:
            return _masked_sdpa(q, k, v, x.valid, x.options["scale"]), None
        return F.scaled_dot_product_attention(q, k, v, scale=x.options["scale"]), None


def published_mask(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, query_pool: torch.Tensor,
                   plan: MaskPlan, *, ratio: float, num_per_query: int, head_mix: str,
                   mask_self: bool, noise: float, scale: float) -> torch.Tensor:
    """The published masking algorithm, loop over samples included (see the module docstring)."""
    q, k = q.detach(), k.detach()
    logits = scale * torch.matmul(q.float(), k.float().transpose(-1, -2))  # (B, H, Q, L)
    # The published additive padding mask; exp() of it is exactly 0, as -inf is in the reference.
    logits = logits + torch.where(valid, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    probs = torch.softmax(logits, dim=-1)
    if head_mix == "mean":
        mixed = probs.mean(dim=1)
    else:
        mixed = probs.gather(1, plan.head.long()[:, None, :, None].expand(-1, 1, -1, probs.shape[-1]))
        mixed = mixed.squeeze(1)
    counts = mask_counts(valid, query_pool, ratio=ratio, num_per_query=num_per_query,
                         mask_self=mask_self, noise=noise)
    num_rows = counts.num_rows.tolist()
    num_taken = (counts.num_forced + counts.num_top).tolist()
    num_random = counts.num_random.tolist()
    mask = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        pool = query_pool[b].nonzero().squeeze(1)
        chosen = pool[plan.query_rank[b, pool].argsort()[:num_rows[b]]]  # randperm(pool)[:k_q]
        score = mixed[b, chosen].sum(dim=0)
        if mask_self:
            score[chosen] = float("inf")
        score = score.masked_fill(~valid[b], float("-inf"))
        mask[b, score.topk(num_taken[b]).indices] = True
        if num_random[b]:
            free = (valid[b] & ~mask[b]).nonzero().squeeze(1)
            mask[b, free[plan.token_rank[b, free].argsort()[:num_random[b]]]] = True
    return mask


class PublishedEager(Provider):
    name = "published"

    def mask(self, x):
        return published_mask(x.q, x.k, x.valid, x.query_pool, x.plan, **x.options)

    def forward(self, x, q, k, v):
        with torch.no_grad():
            mask = published_mask(q, k, x.valid, x.query_pool, x.plan, **x.options)
        return _masked_sdpa(q, k, v, x.valid & ~mask, x.options["scale"]), mask


class Vectorized(Provider):
    """The reference mask (``backend="reference"``: no loop), then masked SDPA. The reference's
    own attention is an fp32 oracle that materializes (B, H, Q, L); SDPA is what a user would
    call, so this is the stronger baseline."""

    name = "vectorized"

    def mask(self, x):
        return sma_kernels.self_guided_mask(x.q, x.k, x.valid, query_valid=x.query_pool, plan=x.plan,
                                            backend="reference", **x.options)

    def forward(self, x, q, k, v):
        with torch.no_grad():
            mask = self.mask(x)
        return _masked_sdpa(q, k, v, x.valid & ~mask, x.options["scale"]), mask


class SmaBackend(Provider):
    """An sma-kernels backend through the public op ``self_guided_attention(backend=...)``.

    ``sma:<backend>`` is called as users call it, with a generator on the inputs' device: the
    op draws its plan on every call (``make_plan``'s launches are timed). ``sma:<backend>+plan``
    (``plan_given=True``) is given the case's ready plan instead.
    """

    kind = "sma-kernels"

    def __init__(self, backend: str, *, plan_given: bool = False, allow_interpreter: bool = False) -> None:
        self.backend = backend
        self.plan_given = plan_given
        self.allow_interpreter = allow_interpreter
        self.name = f"sma:{backend}" + ("+plan" if plan_given else "")
        self._generator: torch.Generator | None = None

    def unavailable(self, device):
        info = sma_kernels.backends()[self.backend]
        if not info["available"]:
            return info["reason"]
        if info["device"] not in ("any", device.type):
            return f"runs on {info['device']} tensors only"
        if self.backend == "triton" and device.type == "cpu" and not self.allow_interpreter:
            return ("CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1): a correctness "
                    f"check, not a timing; name {self.name} in --providers to run it anyway")
        return None

    def dense(self, device):
        # The GPU backends never build (B, H, Q, L); on the CPU the attention itself may be the
        # reference math.
        return device.type == "cpu"

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        return self._generator

    def prepare(self, x):
        self.rewind(x)

    def rewind(self, x):
        if not self.plan_given and x.plan_seed is not None:
            self._generator_on(x.q.device).manual_seed(x.plan_seed)

    def _kwargs(self, x: Inputs) -> dict[str, Any]:
        plan = {"plan": x.plan} if self.plan_given else {"generator": self._generator_on(x.q.device)}
        return {"query_valid": x.query_pool, "backend": self.backend, **plan, **x.options}

    def mask(self, x):
        return sma_kernels.self_guided_mask(x.q, x.k, x.valid, **self._kwargs(x))

    def forward(self, x, q, k, v):
        return sma_kernels.self_guided_attention(q, k, v, x.valid, **self._kwargs(x))


class Compiled(Provider):
    """``torch.compile`` of :class:`Vectorized` (whole graph, static shapes), fresh per case."""

    name = "compiled"

    def compiles_on(self, device):
        return True

    def prepare(self, x):
        options = dict(x.options)

        def mask_fn(q, k, valid, query_pool, query_rank, head, token_rank):
            return reference.self_guided_mask(q, k, valid, query_pool,
                                              MaskPlan(query_rank, head, token_rank), **options)

        def forward_fn(q, k, v, valid, query_pool, query_rank, head, token_rank):
            mask = mask_fn(q, k, valid, query_pool, query_rank, head, token_rank)
            return _masked_sdpa(q, k, v, valid & ~mask, options["scale"]), mask

        # A reset per case keeps earlier shapes from filling dynamo's recompile limit.
        torch._dynamo.reset()
        self._mask = torch.compile(mask_fn, dynamic=False, fullgraph=True)
        self._forward = torch.compile(forward_fn, dynamic=False, fullgraph=True)

    def mask(self, x):
        return self._mask(x.q, x.k, x.valid, x.query_pool, *x.plan)

    def forward(self, x, q, k, v):
        return self._forward(q, k, v, x.valid, x.query_pool, *x.plan)


class Flex(Provider):
    """The FlexAttention route (see the module docstring)."""

    name = "flex"

    def __init__(self) -> None:
        try:
            from torch.nn.attention import flex_attention as module
        except ImportError as error:  # torch < 2.5
            self._module, self._missing = None, f"torch.nn.attention.flex_attention: {error}"
        else:
            self._module, self._missing = module, None

    def unavailable(self, device):
        return self._missing

    def dense(self, device):
        return device.type == "cpu"

    def compiles_on(self, device):
        # On the CPU torch.compile of flex_attention supports neither return_lse nor backward.
        return device.type == "cuda"

    def countable(self, device):
        # Even unfused, flex_attention runs through TorchDynamo, which a dispatch mode upsets.
        return False

    def prepare(self, x):
        module = self._module
        self.compiled = self.compiles_on(x.q.device)
        if self.compiled:
            torch._dynamo.reset()
            self._flex = torch.compile(module.flex_attention, dynamic=False)
        else:
            self._flex = module.flex_attention
        # Newer torch returns auxiliary outputs through AuxRequest, older through return_lse.
        if hasattr(module, "AuxRequest"):
            request = module.AuxRequest(lse=True)

            def flex_lse(*args, **kwargs):
                return self._flex(*args, return_aux=request, **kwargs)[1].lse
        else:
            def flex_lse(*args, **kwargs):
                return self._flex(*args, return_lse=True, **kwargs)[1]
        self._flex_lse = flex_lse

    def _block_mask(self, mask_mod, batch: int, heads: int | None, rows: int, cols: int,
                    device: torch.device):
        return self._module.create_block_mask(mask_mod, batch, heads, rows, cols, device=device,
                                              _compile=self.compiled)

    def scores(self, x: Inputs, chosen: torch.Tensor) -> torch.Tensor:
        """(B, L) fp32 token scores of the chosen rows, by the two FlexAttention calls."""
        q, k, valid, head = x.q.detach(), x.k.detach(), x.valid, x.plan.head
        batch, heads, num_queries, _ = q.shape
        num_tokens = k.shape[2]
        scale = x.options["scale"]

        def row_mod(b, h, i, j):
            return chosen[b, i] & valid[b, j]

        with warnings.catch_warnings():
            # On the CPU flex_attention warns that it runs unfused; the docstring says so.
            warnings.simplefilter("ignore", UserWarning)
            lse = self._flex_lse(q, k, k, scale=scale, block_mask=self._block_mask(
                row_mod, batch, None, num_queries, num_tokens, q.device))
            # Rows left out are fully masked (lse = -inf); zero them so no score_mod sees inf.
            row_lse = torch.where(chosen[:, None, :], lse.float(), 0.0)

            def shift(score, b, h, j, i):
                return score - row_lse[b, h, i]

            if x.options["head_mix"] == "mean":
                def col_mod(b, h, j, i):
                    return chosen[b, i] & valid[b, j]
                mask_heads = None
            else:
                def col_mod(b, h, j, i):
                    return chosen[b, i] & valid[b, j] & (head[b, i] == h)
                mask_heads = heads
            col_lse = self._flex_lse(k, q, q, score_mod=shift, scale=scale, block_mask=self._block_mask(
                col_mod, batch, mask_heads, num_tokens, num_queries, q.device))
        columns = col_lse.float().exp()  # (B, H, L): sum over chosen rows of P[h, i, j]
        mixed = columns.mean(dim=1) if x.options["head_mix"] == "mean" else columns.sum(dim=1)
        return mixed.masked_fill(~valid, float("-inf"))

    def mask(self, x):
        counts, chosen = counts_and_chosen_rows(x)
        forced = chosen if x.options["mask_self"] else torch.zeros_like(x.valid)
        return reference.select_tokens(self.scores(x, chosen), x.valid, forced, counts,
                                       x.plan.token_rank)

    def forward(self, x, q, k, v):
        with torch.no_grad():
            mask = self.mask(x)
        return _masked_sdpa(q, k, v, x.valid & ~mask, x.options["scale"]), mask


def default_providers() -> list[Provider]:
    """The floors, the eager baselines, every sma-kernels backend the public API knows of, then
    the routes that compile (last: under a time limit they are the ones left out)."""
    return [Sdpa(padding=False), Sdpa(padding=True), PublishedEager(), Vectorized(),
            *(SmaBackend(name, plan_given=plan_given) for name in sma_kernels.backends()
              if name != "reference" for plan_given in (False, True)),
            Compiled(), Flex()]


# ----------------------------------------------------------------------------- correctness

def counts_and_chosen_rows(x: Inputs) -> tuple[MaskCounts, torch.Tensor]:
    """The plan's per-sample counts and chosen query rows for one case (as the reference makes them)."""
    options = x.options
    counts = mask_counts(x.valid, x.query_pool, ratio=options["ratio"],
                         num_per_query=options["num_per_query"], mask_self=options["mask_self"],
                         noise=options["noise"])
    return counts, chosen_rows(x.plan, x.query_pool, counts.num_rows)


def reference_scores(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) fp32 token scores of the reference, for judging near-ties, and the forced tokens."""
    selection = reference_selection(x.q, x.k, x.valid, query_valid=x.query_pool, plan=x.plan, **x.options)
    return selection.scores, selection.forced


def check_mask(mask: torch.Tensor, ref_mask: torch.Tensor, ref_scores: torch.Tensor,
               valid: torch.Tensor, forced: torch.Tensor, rel_tol: float = 1e-5) -> str:
    """Compare a provider's mask with the reference (noise 0); raise AssertionError if wrong.

    The rule of :func:`sma_kernels.testing.compare_masks`: exact equality, or a different choice
    among the tokens whose reference scores lie within ``rel_tol`` (relative) of the score at the
    reference's cut. Returns "exact" or a note on the near-ties accepted.
    """
    result = compare_masks(mask, ref_mask, selection_from_scores(ref_mask, ref_scores, valid, forced),
                           rtol=rel_tol, atol=0.0)
    if not result.ok:
        raise AssertionError(result.problem)
    return "exact" if result.exact else f"{result.swaps} near-tie swap(s) within {rel_tol:g} relative"


def check_output(out: torch.Tensor, ref_out: torch.Tensor, same_mask: torch.Tensor) -> float:
    """Max abs error of ``out`` against the reference on samples whose masks agree exactly;
    raise AssertionError past the dtype's tolerance (fp32: 1e-4, half types: 3e-2, both
    relative to max(1, |ref|))."""
    if out.shape != ref_out.shape:
        raise AssertionError(f"out must have shape {tuple(ref_out.shape)}, got {tuple(out.shape)}")
    if not same_mask.any():
        return 0.0
    got, want = out[same_mask].float(), ref_out[same_mask].float()
    tolerance = 1e-4 if out.dtype in (torch.float32, torch.float64) else 3e-2
    error = (got - want).abs()
    if not torch.isfinite(got).all() or (error > tolerance * want.abs().clamp_min(1.0)).any():
        raise AssertionError(f"out differs from the reference by up to {float(error.max()):.3g} "
                             f"(tolerance {tolerance:g})")
    return float(error.max())
