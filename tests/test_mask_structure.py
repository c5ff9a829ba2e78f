"""Mask-structure metrics, the synthetic planted-group corpus, the EMA mask teacher, step
snapshots, ``sma analyze-masks``, and what guided masking learns on planted pairs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from sma import mask_structure as ms
from sma.cli import main
from sma.data import GROUP_WORDS, synthetic_features, synthetic_groups
from sma.masking import MaskingConfig
from sma.model import ModelConfig, SMAPretrainer
from sma.train import SNAPSHOTS, load_checkpoint, snapshot_name

import sma_kernels

TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--latents", "4", "--widening", "1",
        "--batch-size", "16", "--warmup", "2", "--threads", "1"]
needs_cpp = pytest.mark.skipif(not sma_kernels.backends()["cpp"]["available"],
                               reason="the compiled cpp backend is not built")


def test_synthetic_groups_plant_whole_words() -> None:
    data = synthetic_groups(count=64)
    assert len(data) == 64 and set(np.unique(data.labels)) == {0.0, 1.0}
    for text, label in zip(data.texts, data.labels, strict=True):
        assert 24 <= len(text) <= 47 and re.fullmatch(r"[a-hA-Z]+", text)
        words = re.findall(r"[A-Z]+", text)
        assert 1 <= len(words) <= 3 and all(w in GROUP_WORDS for w in words)
        assert bool(label) == any(w in GROUP_WORDS[:6] for w in words)
    assert sorted({len(w) for w in GROUP_WORDS}) == [3, 4, 5, 6]
    assert synthetic_groups(count=8).texts == synthetic_groups(count=8).texts  # fixed
    assert synthetic_groups(count=8, seed=1).texts != synthetic_groups(count=8).texts


@pytest.mark.parametrize(("smiles", "anchors"), [
    ("CC(=O)Oc1ccccc1C(=O)O", [0, 1, 4, 6, 7, 9, 10, 11, 12, 13, 15, 18, 20]),
    ("ClC(Br)[NH3+]", [0, 2, 4, 8]),
    ("c1cc[nH]c1", [0, 2, 3, 5, 8]),
])
def test_smiles_atoms_follow_rdkit(smiles: str, anchors: list[int]) -> None:
    pytest.importorskip("rdkit")
    found = ms.smiles_atoms(smiles)
    assert found is not None and found[0] == anchors


def test_smiles_branches() -> None:
    pytest.importorskip("rdkit")
    anchors, branches = ms.smiles_atoms("CC(C)(C(O)N)O")
    assert anchors == [0, 1, 3, 6, 8, 10, 12]
    assert branches == [-1, -1, 0, 1, 2, 1, -1]
    assert ms.smiles_atoms("not a smiles") is None


def test_metric_sums_on_hand_made_masks() -> None:
    features = synthetic_features(count=2)
    relations = ms._relations("synthetic-features", features, 8)
    masks = torch.tensor([[[1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0]]], dtype=torch.bool)
    losses = torch.arange(16, dtype=torch.float32).view(1, 2, 8)
    num, den = ms._sums("pair_coverage", masks, losses, relations, None)
    assert num.tolist() == [2, 0] and den.tolist() == [2, 2]
    num, den = ms._sums("hidden_pair_loss", masks, losses, relations, None)
    assert num.tolist() == [0 + 1, 0] and den.tolist() == [2, 0]
    num, den = ms._sums("masked_loss", masks, losses, relations, None)
    assert num.tolist() == [1, 8 + 10] and den.tolist() == [2, 2]
    runs = torch.tensor([[[1, 1, 0, 1, 0, 1, 1, 1]]], dtype=torch.bool)
    num, den = ms._sums("run_length", runs, losses[:, :1], relations, None)
    assert num.tolist() == [6] and den.tolist() == [3]
    correlation = torch.zeros(8, 8)
    correlation[0, 2] = correlation[2, 0] = 0.5
    num, den = ms._sums("comasked_corr", masks, losses, relations, correlation)
    assert num.tolist() == [0, 0.5] and den.tolist() == [1, 1]


def test_group_relations_and_background() -> None:
    data = synthetic_groups(count=4)
    relations = ms._relations("synthetic-groups", data, data.length)
    related, eligible = relations["group_coverage"]
    for row, text in enumerate(data.texts):
        upper = torch.tensor([c.isupper() for c in text] + [False] * (data.length - len(text)))
        assert torch.equal(eligible[row], upper)
        for found in re.finditer(r"[A-Z]+", text):
            a, b = found.start(), found.end()
            assert related[row, a, a + 1:b].all() and not related[row, a, a]
            assert not related[row, a, :a].any() and not related[row, a, b:].any()
    background = relations["background"][1]
    assert all(background[r, :len(t)].tolist() == [c.islower() for c in t]
               for r, t in enumerate(data.texts))


def test_compare_is_a_paired_ratio_of_sums() -> None:
    rng = np.random.default_rng(0)
    den = np.full(200, 2.0)
    guided, random = (rng.binomial(2, 0.6, 200).astype(float), den), (rng.binomial(2, 0.2, 200).astype(float), den)
    result = ms.compare(guided, random, resamples=500)
    assert result["guided"]["value"] == pytest.approx(guided[0].sum() / 400)
    for key in ("guided", "random", "ratio", "difference"):
        lo, hi = result[key]["ci95"]
        assert lo <= result[key]["value"] <= hi
    assert result["ratio"]["ci95"][0] > 1.5  # 0.6 / 0.2 = 3 in expectation


def test_identity_kl_is_what_the_mask_says_about_the_hidden_bytes() -> None:
    ids = torch.tensor([[7, 8, 9, 10], [7, 8, 9, 10]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    prefers = torch.tensor([[[1, 0, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool)  # always byte 7
    spread = torch.tensor([[[1, 0, 0, 0], [0, 0, 1, 0]]], dtype=torch.bool)
    everything = ms._byte_counts(ids, valid)
    result = ms.compare_identity({"guided": ms._byte_counts(ids, prefers),
                                  "random": ms._byte_counts(ids, spread)}, everything, resamples=50)
    assert result["guided"]["value"] == pytest.approx(np.log(4))  # p(7) = 1/4 over all tokens
    assert result["random"]["value"] == pytest.approx(np.log(2))


def test_random_masks_cover_pairs_at_the_expected_rate() -> None:
    model = SMAPretrainer(ModelConfig(input_kind="features", max_len=8, encoder="cross", width=16,
                                      depth=1, heads=2, latents=4, widening=1),
                          MaskingConfig("guided", ratio=0.25, num_per_query=2))
    data, _ = ms.heldout("synthetic-features")
    result = ms.analyze(model, data, "synthetic-features", draws=4, resamples=300,
                        metrics=("pair_coverage",))["pair_coverage"]
    lo, hi = result["random"]["ci95"]
    assert lo <= 1 / 7 <= hi  # k = 2 of n = 8: (k - 1) / (n - 1)


@pytest.mark.parametrize("encoder", ["cross", "self"])
@pytest.mark.parametrize("head_mix", ["mean", "random"])
def test_teacher_with_the_layer_weights_chooses_the_layer_mask(encoder: str, head_mix: str) -> None:
    data = synthetic_groups(count=16)
    inputs, valid = data.batch(np.arange(16))
    config = ModelConfig(max_len=64, encoder=encoder, width=16, depth=1, heads=2, latents=4)
    masking = MaskingConfig("guided", 0.25, 2, head_mix, encoder == "self")
    plain = SMAPretrainer(config, masking)
    taught = SMAPretrainer(config, MaskingConfig(**{**masking.to_dict(), "teacher_ema": 0.9}))
    taught.load_state_dict({**plain.state_dict(), **{k: v for k, v in taught.state_dict().items()
                                                      if k.startswith("teacher.")}})
    taught.teacher.copy_from(taught.encoder)
    results = []
    for model in (plain, taught):
        loss, mask = model(inputs, valid, noise=0.3, generator=torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
        results.append((loss, mask, grads))
    assert torch.equal(results[0][1], results[1][1]) and torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2], strict=True))
    assert all(not p.requires_grad for p in taught.teacher.parameters())


def test_teacher_follows_the_encoder_by_ema() -> None:
    model = SMAPretrainer(ModelConfig(input_kind="features", max_len=8, width=16, depth=1, heads=2,
                                      latents=4), MaskingConfig("guided", teacher_ema=0.75))
    before = model.teacher.to_k.weight.clone()
    with torch.no_grad():
        model.encoder.first.attention.to_k.weight.add_(1.0)
    model.update_teacher()
    torch.testing.assert_close(model.teacher.to_k.weight, before + 0.25)
    assert MaskingConfig("random", teacher_ema=0.5).uses_teacher is False
    assert SMAPretrainer(ModelConfig(), MaskingConfig("random", teacher_ema=0.5)).teacher is None
    with pytest.raises(ValueError, match="teacher_ema"):
        MaskingConfig(teacher_ema=1.0)


def test_teacher_decay_out_of_range_is_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["pretrain", "--data", "synthetic-features", "--out", str(tmp_path / "run"),
              "--mask-teacher-ema", "1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "sma pretrain: error: argument --mask-teacher-ema: must be in [0, 1), got 1"


def test_teacher_run_resumes_bit_for_bit_and_keeps_snapshots(tmp_path) -> None:
    args = ["pretrain", "--data", "synthetic-features", "--steps", "6", "--seed", "1", *TINY,
            "--mask-teacher-ema", "0.9", "--checkpoint-every", "2"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-at", "3"]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["losses"] == whole["losses"]
    names = sorted(p.name for p in (tmp_path / "whole" / SNAPSHOTS).iterdir())
    assert names == [snapshot_name(s) for s in (0, 2, 4, 6)]
    state = load_checkpoint(tmp_path / "whole" / SNAPSHOTS / snapshot_name(4), "pretrain", "test")
    assert state["run"]["step"] == 4 and "optimizer" not in state["run"]
    assert any(k.startswith("teacher.") for k in state["run"]["model"])
    final = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["run"]["model"]
    last = load_checkpoint(tmp_path / "whole" / SNAPSHOTS / snapshot_name(6), "pretrain", "test")
    assert all(torch.equal(final[k], v) for k, v in last["run"]["model"].items())


def test_analyze_masks_command(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", "--data", "synthetic-groups", "--steps", "4", *TINY,
                 "--checkpoint-every", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert main(["analyze-masks", "--checkpoint", str(run), "--out", str(out), "--num", "32",
                 "--draws", "1", "--bootstrap", "50", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "group_coverage" in printed and "wrote" in printed
    result = json.loads((out / "masks.json").read_text())
    assert [r["step"] for r in result["records"]] == [0, 2, 4]
    assert set(result["records"][0]["metrics"]) == set(ms.METRICS["synthetic-groups"])
    assert (out / "masks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = tmp_path / "one"  # a single checkpoint: JSON, no plot
    assert main(["analyze-masks", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(one),
                 "--num", "16", "--draws", "1", "--bootstrap", "20"]) == 0
    assert (one / "masks.json").exists() and not (one / "masks.png").exists()


# ------------------------------------------------------------ what guided masking learns on pairs

def _pair_coverage(checkpoint) -> dict:
    model, _ = ms.load_pretrainer(checkpoint, "cpp")
    data, _ = ms.heldout("synthetic-features", 256)
    return ms.analyze(model, data, "synthetic-features", draws=2, resamples=200,
                      metrics=("pair_coverage",))["pair_coverage"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise reproducible CPU training
    yield
    torch.set_num_threads(threads)


@needs_cpp
def test_short_guided_pretraining_masks_planted_pairs_together(tmp_path, one_thread) -> None:
    # 300 steps, cross encoder with 8 latents, k = 2 of 8 features, npq 2, head mean: both
    # features of a planted pair are masked together >= 2x as often as under a random mask of
    # the same size (there 1/7 of the time).
    run = tmp_path / "guided"
    assert main(["pretrain", "--data", "synthetic-features", "--encoder", "cross", "--latents", "8",
                 "--ratio", "0.25", "--num-per-query", "2", "--steps", "300", "--seed", "0",
                 "--threads", "1", "--backend", "cpp", "--out", str(run)]) == 0
    coverage = _pair_coverage(run / "checkpoint.pt")
    assert coverage["random"]["ci95"][0] <= 1 / 7 <= coverage["random"]["ci95"][1]
    assert coverage["guided"]["value"] >= 2 * coverage["random"]["value"]


@needs_cpp
def test_teacher_keeps_the_pairs_where_plain_guided_masking_collapses(tmp_path, one_thread) -> None:
    # The "pairs-fast" setup of python -m sma.mask_experiments, seed 5: after its 400 steps the
    # plain guided mask has collapsed (it covers planted pairs less than 2x as often as a random
    # mask, 0.03 vs 0.13 in the experiment), while the EMA mask teacher keeps them (0.78 at decay
    # 0.999, 0.98 at 0.99).
    from dataclasses import replace

    from sma.mask_experiments import CONDITIONS, SETS
    from sma.train import Dist, pretrain

    spec = SETS["pairs-fast"]
    corpus = synthetic_features()

    def coverage(condition: str) -> dict:
        out = tmp_path / condition
        pretrain(corpus, "synthetic-features", spec["model"],
                 replace(spec["masking"], **CONDITIONS[condition]),
                 replace(spec["pretrain"], seed=5, checkpoint_every=0), out,
                 dist=Dist(0, 1, torch.device("cpu")), backend="cpp", progress=False)
        return _pair_coverage(out / "checkpoint.pt")

    plain = coverage("guided")
    assert plain["guided"]["value"] < 2 * plain["random"]["value"]
    for teacher in ("teacher-0.999", "teacher-0.99"):
        kept = coverage(teacher)
        assert kept["guided"]["value"] >= 2 * kept["random"]["value"], teacher
