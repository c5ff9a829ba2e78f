"""Triton mask kernels (mask_scores.py, select.py) against the reference, under the same plan.

Without a GPU these run in Triton's interpreter on CPU (tests/conftest.py), at tiny shapes. On a
GPU the same tests run compiled, plus bf16 at the benchmark workloads (bench/README.md, "Workloads") (reduced batch),
determinism and torch.library.opcheck.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, import_triton_backend, needs_gpu

import sma_kernels as sk
from sma_kernels import reference
from sma_kernels.plan import chosen_rows, mask_counts
from sma_kernels.testing import assert_masks_match, padded_valid

triton_backend = import_triton_backend()

from sma_kernels.triton._common import META_FIRST, META_LAST, META_RANDOM, META_TOP
from sma_kernels.triton.mask_scores import (
    CANDIDATE_CONFIGS,
    MAX_PARTIALS,
    chosen_row_scores,
    max_chosen_rows,
    score_config,
    token_scores,
)
from sma_kernels.triton.select import select_tokens


def make_inputs(batch, heads, num_q, length, dim, dtype, seed, *, zero_q=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(batch, heads, num_q, dim) if zero_q else torch.randn(batch, heads, num_q, dim,
                                                                           generator=g)
    k = torch.randn(batch, heads, length, dim, generator=g)
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), valid.to(DEVICE), plan.to(DEVICE)


# (B, H, Q, L, d, dtype, head_mix, mask_self, self-attention pool, noise, ratio, npq)
MASK_CASES = {
    "cross-mean-L37": (7, 2, 5, 37, 16, torch.float32, "mean", False, False, 0.0, 0.3, 2),
    "cross-random-noise-fp16": (7, 3, 7, 70, 32, torch.float16, "random", False, False, 0.5, 0.3, 1),
    "higgs-like-self-random": (7, 2, 28, 28, 16, torch.float32, "random", True, True, 0.3, 0.2, 3),
    "self-mean-full-noise-fp16": (7, 2, 28, 28, 16, torch.float16, "mean", True, True, 1.0, 0.3, 3),
    "self-pool-no-mask-self": (7, 2, 37, 37, 64, torch.float32, "mean", False, True, 0.0, 0.4, 2),
    "cross-L1000": (7, 2, 4, 1000, 16, torch.float16, "mean", False, False, 0.0, 0.15, 4),
    "cross-pool-exhausted": (7, 2, 3, 45, 16, torch.float32, "random", False, False, 0.2, 0.9, 1),
}


@pytest.mark.parametrize("case", MASK_CASES.values(), ids=MASK_CASES.keys())
def test_mask_matches_reference(case, triton_path):
    batch, heads, num_q, length, dim, dtype, head_mix, mask_self, self_pool, noise, ratio, npq = case
    q, k, valid, plan = make_inputs(batch, heads, num_q, length, dim, dtype, seed=length + num_q)
    query_valid = valid if self_pool else None
    kwargs = {"ratio": ratio, "num_per_query": npq, "head_mix": head_mix, "mask_self": mask_self,
              "noise": noise, "query_valid": query_valid, "plan": plan}
    got = sk.self_guided_mask(q, k, valid, backend="triton", **kwargs)
    want = sk.self_guided_mask(q, k, valid, backend="reference", **kwargs)
    assert_masks_match(got, want, q, k, valid, **kwargs)

    pool = query_valid if query_valid is not None else torch.ones_like(plan.head, dtype=torch.bool)
    counts = mask_counts(valid, pool, ratio=ratio, num_per_query=npq, mask_self=mask_self,
                         noise=noise)
    chosen = chosen_rows(plan, pool, counts.num_rows)
    assert not (got & ~valid).any(), "padding masked"
    assert torch.equal(got.sum(dim=1), counts.num_masked)
    if mask_self:
        assert (got | ~chosen).all(), "a chosen query token is not masked"


def test_counts_round_exact_halves_to_even(triton_path):
    # n * ratio is exactly half an integer in fp64 for these n (e.g. 5 * 0.3 = 1.5, rounded to 2):
    # the kernels' count must round that product, not the exact one just below it (a multiply
    # fused with the rounding's subtraction into one FMA rounded 1.5 down to 1 on sm_90).
    ratio, lengths = 0.3, [5, 15, 25, 35, 45, 55, 65]
    assert all((n * ratio) % 1 == 0.5 for n in lengths)
    g = torch.Generator().manual_seed(5)
    length = 70
    valid = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    q = torch.randn(len(lengths), 1, 4, 16, generator=g)
    k = torch.randn(len(lengths), 1, length, 16, generator=g)
    plan = sk.make_plan(len(lengths), 4, length, 1, generator=g)
    got = sk.self_guided_mask(q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), ratio=ratio,
                              num_per_query=2, plan=plan.to(DEVICE), backend="triton")
    assert got.sum(dim=1).tolist() == [round(n * ratio) for n in lengths]  # Python: half to even


def test_ties_go_to_the_lower_index(triton_path):
    # q = 0 gives uniform attention: every valid token has the same score.
    q, k, valid, plan = make_inputs(7, 2, 3, 37, 16, torch.float32, seed=3, zero_q=True)
    kwargs = {"ratio": 0.3, "num_per_query": 1, "plan": plan}
    got = sk.self_guided_mask(q, k, valid, backend="triton", **kwargs)
    assert torch.equal(got, sk.self_guided_mask(q, k, valid, backend="reference", **kwargs))
    for b in range(valid.shape[0]):
        taken = got[b].nonzero().flatten()
        first_valid = valid[b].nonzero().flatten()[: taken.numel()]
        assert torch.equal(taken, first_valid)


@pytest.mark.parametrize("max_partials", [MAX_PARTIALS, 4, 1], ids=lambda n: f"partials{n}")
@pytest.mark.parametrize("head_mix", ["mean", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_scores_close_to_reference(head_mix, dtype, max_partials):
    # About 78 chosen rows: more than one block of 64 rows per head under "mean" (the other
    # block sizes run in test_triton_determinism.py). Blocks of 64 of up to 130 rows: 3 blocks
    # per head, 6 units; at most 4 partial rows sum 2, 2, 1 and 1 units, at most 1 all six.
    batch, heads, num_q, length, dim = 7, 2, 130, 50, 32
    q, k, valid, plan = make_inputs(batch, heads, num_q, length, dim, dtype, seed=11)
    g = torch.Generator().manual_seed(5)
    chosen = (torch.rand(batch, num_q, generator=g) < 0.6).to(DEVICE)
    chosen[0] = False  # a sample with no chosen row scores 0 on every valid token
    got = token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix, scale=0.3,
                       max_partials=max_partials)
    want = reference.token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix, scale=0.3)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert torch.equal(got[0][valid[0]], torch.zeros_like(got[0][valid[0]]))


# Valid ranges [first, last) against the key tiles of 64: aligned or not at either end, within
# one tile, one tile wide, across several tiles.
TILE_ALIGNMENTS = ((0, 200), (0, 128), (1, 127), (63, 65), (64, 192), (65, 130), (70, 100),
                   (130, 200))


# Under the interpreter NumPy warns where a kernel computes on NaN: none may compute on padding.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("hole", [False, True], ids=["contiguous", "hole"])
def test_token_scores_at_every_tile_alignment(hole):
    # The lse pass reads no flags on the tiles inside a contiguous valid range, only on its edge
    # tiles, and on every tile of a range with a hole. Padded keys hold NaN here: no score may
    # see them.
    length = 200
    cols = torch.arange(length)
    valid = torch.stack([(cols >= first) & (cols < last) for first, last in TILE_ALIGNMENTS])
    if hole:
        for b, (first, last) in enumerate(TILE_ALIGNMENTS):
            valid[b, (first + last) // 2] = False
    g = torch.Generator().manual_seed(2)
    batch, heads, num_q, dim = len(TILE_ALIGNMENTS), 2, 8, 16
    q = torch.randn(batch, heads, num_q, dim, generator=g)
    k = torch.randn(batch, heads, length, dim, generator=g)
    head = torch.randint(0, heads, (batch, num_q), generator=g, dtype=torch.int32)
    chosen = torch.ones(batch, num_q, dtype=torch.bool)
    want = reference.token_scores(q, k, valid, chosen, head, head_mix="mean", scale=0.3)
    k[~valid[:, None, :].expand(-1, heads, -1)] = float("nan")
    got = token_scores(q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), chosen.to(DEVICE),
                       head.to(DEVICE), head_mix="mean", scale=0.3).cpu()
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-6, atol=1e-6)


def selection_inputs(batch, length, seed, *, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: most decisions are ties
        scores = torch.randint(0, 3, (batch, length), generator=g).float()
    else:  # negative and positive: exercises the float -> ordered int key map on both signs
        scores = torch.randn(batch, length, generator=g) * 10.0 ** torch.randint(
            -30, 30, (batch, length), generator=g).float()
    valid = padded_valid(batch, length, g)
    plan = sk.make_plan(batch, length, length, 1, generator=g)
    return scores, valid, plan


# L = 9000 and 65,536 span several blocks of the select kernel (4096 under the interpreter).
@pytest.mark.parametrize(("length", "ties", "mask_self"), [
    (28, True, False), (28, False, True), (1000, True, True), (1000, False, False),
    (9000, False, True), (65536, True, True)])
def test_select_matches_reference(length, ties, mask_self):
    batch = 7 if length <= 9000 else 2
    scores, valid, plan = selection_inputs(batch, length, seed=length, ties=ties)
    counts = mask_counts(valid, valid, ratio=0.3, num_per_query=3, mask_self=mask_self, noise=0.4)
    forced = chosen_rows(plan, valid, counts.num_rows) if mask_self else torch.zeros_like(valid)
    want = reference.select_tokens(scores, valid, forced, counts, plan.token_rank)
    got = select_tokens(scores.to(DEVICE), valid.to(DEVICE), forced.to(DEVICE), counts._replace(
        **{name: c.to(DEVICE) for name, c in counts._asdict().items()}), plan.token_rank.to(DEVICE))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("max_partials", [MAX_PARTIALS, 2], ids=lambda n: f"partials{n}")
@pytest.mark.parametrize(("ratio", "npq", "noise", "mask_self", "head_mix"), [
    (0.5, 1, 0.5, False, "mean"), (0.3, 3, 0.5, True, "random")])
def test_score_kernel_plan_matches_plan_helpers(ratio, npq, noise, mask_self, head_mix,
                                                max_partials):
    # Every valid count 0..L-1 once: the float64 rounding of k, k_q and k_rand hits exact
    # halves (ratio 0.5, noise 0.5), which must round half-to-even as plan.mask_counts does.
    length, heads, dim = 40, 3, 16
    g = torch.Generator().manual_seed(7)
    valid = torch.rand(length, length, generator=g).argsort(dim=1) < torch.arange(length)[:, None]
    pool = valid if mask_self else torch.rand(length, length, generator=g) < 0.5
    plan = sk.make_plan(length, length, length, heads, generator=g)
    q, k = (torch.randn(length, heads, length, dim, generator=g).to(DEVICE) for _ in range(2))
    counts = mask_counts(valid, pool, ratio=ratio, num_per_query=npq, mask_self=mask_self,
                         noise=noise)
    want_chosen = chosen_rows(plan, pool, counts.num_rows)
    rows = chosen_row_scores(q, k, valid.to(DEVICE), pool.to(DEVICE), plan.to(DEVICE),
                             ratio=ratio, num_per_query=npq, mask_self=mask_self, noise=noise,
                             head_mix=head_mix, scale=0.25, max_partials=max_partials)
    meta = rows.meta.cpu().long()
    assert torch.equal(meta[:, META_TOP], counts.num_top)
    assert torch.equal(meta[:, META_RANDOM], counts.num_random)
    assert torch.equal(rows.chosen.cpu(), want_chosen)
    index = torch.arange(length)
    assert torch.equal(meta[:, META_FIRST], torch.where(valid, index, length).amin(dim=1))
    assert torch.equal(meta[:, META_LAST], torch.where(valid, index + 1, 0).amax(dim=1))
    # Each head's rows (its own under "random", all chosen rows under "mean") fill its row
    # blocks in order: full blocks, then the rest. Each block counts the rows that add to the
    # scores: all of them (finite inputs), none in a sample without valid tokens. Partial row p
    # sums units (head, block) p, p + R, ... of R rows (here 3 units: one a row, or with
    # max_partials = 2, 2 rows that sum 2 and 1).
    per_head = (want_chosen[:, None, :] & (plan.head[:, None, :] == torch.arange(heads)[:, None])
                if head_mix == "random" else want_chosen[:, None, :].expand(-1, heads, -1))
    max_rows = max_chosen_rows(length, length, ratio, npq)
    block = score_config(-(-max_rows // heads) if head_mix == "random" else max_rows).block_m
    starts = torch.arange(-(-max_rows // block)) * block
    unit_rows = (per_head.sum(dim=2, keepdim=True) - starts).clamp(0, block)
    unit_rows = (unit_rows * valid.any(dim=1)[:, None, None]).flatten(1)
    num_partials = min(unit_rows.shape[1], max_partials)
    want_rows = torch.zeros(length, num_partials, dtype=unit_rows.dtype)
    want_rows.index_add_(1, torch.arange(unit_rows.shape[1]) % num_partials, unit_rows)
    assert torch.equal(rows.block_rows.cpu(), want_rows.int())


def test_opcheck_mask_op():
    q, k, valid, plan = make_inputs(3, 2, 5, 20, 16, torch.float32, seed=1)
    args = (q, k, valid, torch.ones(3, 5, dtype=torch.bool, device=DEVICE), *plan, 0.3, 1,
            "random", False, 0.5, 0.25, "triton")
    torch.library.opcheck(torch.ops.sma_kernels.self_guided_mask.default, args)


# ----------------------------------------------------------------------------- non-finite inputs

def rule_scores(q, k, valid, chosen, head, *, head_mix, scale):
    """Token scores by the non-finite rule, in plain PyTorch, and the (B, H, Q) bad pairs.

    Logits are fp32. A (sample, head, row) whose logits over the sample's valid tokens are not
    all finite is bad and contributes nothing; the others contribute their softmax. Padded
    columns never enter a logit, whatever k holds there.
    """
    logits = scale * torch.matmul(q.float(), k.float().transpose(-1, -2))
    real = valid[:, None, None, :]
    bad = (~torch.isfinite(logits) & real).any(dim=-1)
    logits = logits.masked_fill(~real | bad[..., None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # bad rows and rows without tokens
    if head_mix == "mean":
        mixed = probs.mean(dim=1)
    else:
        index = head.long()[:, None, :, None].expand(-1, 1, -1, probs.shape[-1])
        mixed = probs.gather(1, index).squeeze(1)
    scores = torch.einsum("bq,bql->bl", chosen.float(), mixed)
    return scores.masked_fill(~valid, float("-inf")), bad


def corrupt(q, k, valid, value, g):
    """Copies of q and k with ``value`` in one coordinate of about a third of the q rows, of one
    valid k row of about a third of the (sample, head) pairs, and everywhere in the padded k
    rows."""
    batch, heads, num_q, dim = q.shape
    q, k = q.clone(), k.clone()
    rows = torch.rand(batch, heads, num_q, generator=g) < 0.3
    coordinate = torch.randint(dim, (batch, heads, num_q, 1), generator=g)
    q.scatter_(-1, coordinate, torch.where(rows[..., None], value, q.gather(-1, coordinate)))
    for b in range(batch):
        tokens = valid[b].nonzero().flatten()
        for h in range(heads):
            if tokens.numel() and torch.rand((), generator=g) < 0.3:
                j = tokens[torch.randint(tokens.numel(), (), generator=g)]
                k[b, h, j, torch.randint(dim, (), generator=g)] = value
    return q, k.masked_fill(~valid[:, None, :, None], value)


# (Q, L, head_mix, mask_self, self-attention pool, noise)
NON_FINITE_SETUPS = {
    "cross-mean": (5, 37, "mean", False, False, 0.0),
    "cross-random-noise": (7, 37, "random", False, False, 0.3),
    "self-mean-mask-self": (28, 28, "mean", True, True, 0.0),
    "self-random-mask-self-noise": (28, 28, "random", True, True, 0.5),
    "self-random": (28, 28, "random", False, True, 0.0),
}


# Under the interpreter NumPy warns about the overflows these inputs are made of.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "overflow"])
@pytest.mark.parametrize("setup", NON_FINITE_SETUPS.values(), ids=NON_FINITE_SETUPS.keys())
def test_mask_non_finite_inputs(setup, value, dtype, triton_path):
    num_q, length, head_mix, mask_self, self_pool, noise = setup
    batch, heads, dim = 7, 2, 16
    q, k, valid, plan = make_inputs(batch, heads, num_q, length, dim, torch.float32,
                                    seed=num_q + length)
    q, k, valid, plan = q.cpu(), k.cpu(), valid.cpu(), plan.to("cpu")
    g = torch.Generator().manual_seed(length)
    if value == "overflow":
        # Finite inputs (fp16 too) whose fp32 logits overflow for some (row, token) pairs: rows
        # with an overflow are bad, the others keep finite logits up to the top of fp32.
        q, k, scale = q * 6000.0, k * 6000.0, 1e30
    else:
        q, k = corrupt(q, k, valid, float(value), g)
        scale = dim ** -0.5
    q, k = q.to(dtype), k.to(dtype)
    pool = valid if self_pool else torch.ones(batch, num_q, dtype=torch.bool)
    counts = mask_counts(valid, pool, ratio=0.3, num_per_query=2, mask_self=mask_self,
                         noise=noise)
    chosen = chosen_rows(plan, pool, counts.num_rows)
    want_scores, bad = rule_scores(q, k, valid, chosen, plan.head, head_mix=head_mix,
                                   scale=scale)
    bad_chosen = bad & chosen[:, None, :]
    assert bad_chosen.any() and (chosen[:, None, :] & ~bad).any(), "case covers both kinds"
    forced = chosen if mask_self else torch.zeros_like(valid)
    want = reference.select_tokens(want_scores, valid, forced, counts, plan.token_rank)

    q, k, valid, pool, plan = q.to(DEVICE), k.to(DEVICE), valid.to(DEVICE), pool.to(DEVICE), \
        plan.to(DEVICE)
    scores = token_scores(q, k, valid, chosen.to(DEVICE), plan.head, head_mix=head_mix,
                          scale=scale).cpu()
    torch.testing.assert_close(scores, want_scores, rtol=2e-6, atol=1e-6)
    got = triton_backend.self_guided_mask(
        q, k, valid, pool, plan, ratio=0.3, num_per_query=2, head_mix=head_mix,
        mask_self=mask_self, noise=noise, scale=scale).cpu()
    assert torch.equal(got, want)
    assert not (got & ~valid.cpu()).any(), "padding masked"
    assert torch.equal(got.sum(dim=1), counts.num_masked)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_score_passes_compute_the_same_logits(dtype, block_m):
    """The score kernel's second pass computes its first pass's logits bit for bit
    (docs/design.md, "Kernels"). At logits of order 1e8 one ulp is 8 or more, so a row's top
    token gets P = 1 only then, and exp(-8) or less a ulp below. At d = 64 a 16-bit dot takes
    four MMA steps; on sm_90 BLOCK_M = 16 runs the passes on mma.sync and wgmma, 64 on wgmma."""
    batch, heads, num_q, length, dim = 3, 2, 12, 100, 64
    q, k, valid, plan = make_inputs(batch, heads, num_q, length, dim, dtype, seed=7)
    chosen = torch.ones(batch, num_q, dtype=torch.bool, device=DEVICE)
    scale = 1e7
    want, bad = rule_scores(q.cpu(), k.cpu(), valid.cpu(), chosen.cpu(), plan.head.cpu(),
                            head_mix="mean", scale=scale)
    assert not bad.any(), "the logits are finite"
    config = next(c for c in CANDIDATE_CONFIGS if c.block_m == block_m)
    got = token_scores(q, k, valid, chosen, plan.head, head_mix="mean", scale=scale,
                       config=config).cpu()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


# ----------------------------------------------------------------------------- GPU only

# The benchmark workloads (bench/README.md, "Workloads") at reduced batch:
# (B, H, Q, L, d, ratio, npq, head_mix, mask_self, noise)
WORKLOADS = {
    "proteins": (4, 8, 256, 1024, 32, 0.15, 4, "mean", False, 0.0),
    "molecules": (4, 12, 512, 512, 64, 0.3, 3, "random", True, 0.0),
    "higgs": (32, 8, 28, 28, 16, 0.2, 3, "random", True, 0.5),
    "pixels": (1, 8, 256, 36864, 32, 0.15, 4, "mean", False, 0.0),
}


def workload_inputs(name, dtype=torch.bfloat16, seed=0):
    batch, heads, num_q, length, dim, *_ = WORKLOADS[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, heads, num_q, dim, generator=g, device="cuda").to(dtype)
    k = torch.randn(batch, heads, length, dim, generator=g, device="cuda").to(dtype)
    # Ragged right padding: sample b keeps between half and all of its tokens.
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g, device="cuda")
    valid = torch.arange(length, device="cuda")[None, :] < lengths[:, None]
    plan = sk.make_plan(batch, num_q, length, heads, generator=g)
    return q, k, valid, plan


@needs_gpu
@pytest.mark.parametrize("name", WORKLOADS.keys())
def test_gpu_workload_mask_bf16(name):
    *_, dim, ratio, npq, head_mix, mask_self, noise = WORKLOADS[name]
    q, k, valid, plan = workload_inputs(name)
    pool = valid if mask_self else torch.ones_like(plan.head, dtype=torch.bool)
    counts = mask_counts(valid, pool, ratio=ratio, num_per_query=npq, mask_self=mask_self,
                         noise=noise)
    chosen = chosen_rows(plan, pool, counts.num_rows)
    got_scores = token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix, scale=dim ** -0.5)
    want_scores = reference.token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix,
                                         scale=dim ** -0.5)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-6)

    forced = chosen if mask_self else torch.zeros_like(valid)
    # Selection is exact given the scores ...
    assert torch.equal(select_tokens(got_scores, valid, forced, counts, plan.token_rank),
                       reference.select_tokens(got_scores, valid, forced, counts, plan.token_rank))
    # ... and the whole op matches the reference up to float near-ties of the scores.
    kwargs = {"ratio": ratio, "num_per_query": npq, "head_mix": head_mix, "mask_self": mask_self,
              "noise": noise, "plan": plan}
    got = sk.self_guided_mask(q, k, valid, backend="triton", **kwargs)
    want = sk.self_guided_mask(q, k, valid, backend="reference", **kwargs)
    assert_masks_match(got, want, q, k, valid, **kwargs)


@needs_gpu
def test_gpu_mask_is_deterministic():
    q, k, valid, plan = workload_inputs("pixels", seed=1)
    chosen = chosen_rows(plan, torch.ones_like(plan.head, dtype=torch.bool),
                         torch.full((q.shape[0],), 200, device="cuda"))
    for head_mix in ("mean", "random"):
        first, second = (token_scores(q, k, valid, chosen, plan.head, head_mix=head_mix, scale=0.2)
                         for _ in range(2))
        assert torch.equal(first.view(torch.int32), second.view(torch.int32)), head_mix
        masks = [sk.self_guided_mask(q, k, valid, ratio=0.15, num_per_query=4, head_mix=head_mix,
                                     plan=plan, backend="triton") for _ in range(2)]
        assert torch.equal(masks[0], masks[1]), head_mix


@needs_gpu
def test_gpu_auto_backend_is_triton():
    assert sk.backends()["triton"]["available"]
    q, k, valid, plan = workload_inputs("higgs")
    kwargs = {"ratio": 0.2, "num_per_query": 3, "head_mix": "random", "mask_self": True,
              "plan": plan}
    assert torch.equal(sk.self_guided_mask(q, k, valid, **kwargs),
                       sk.self_guided_mask(q, k, valid, backend="triton", **kwargs))
