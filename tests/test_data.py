"""Data loaders return the documented counts and well-formed examples, or skip with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from sma import data
from sma.tokens import SEP, VOCAB_SIZE


def _require(name: str) -> None:
    missing = data.missing_packages(name)
    if missing:
        pytest.skip(f"data set {name!r} needs {missing} (pip install .[data])")


def _check_examples(tokens: data.TokenSet) -> None:
    if tokens.kind == "bytes":
        assert all(1 < len(s) <= data.MAX_LEN and s[-1] == SEP for s in tokens.inputs)
        flat = np.concatenate(tokens.inputs)
        assert flat.min() >= 6 - 1 and flat.max() < VOCAB_SIZE  # bytes and [SEP], never [PAD]
        assert (flat != 0).all()
    else:
        assert tokens.inputs.dtype == np.float32 and np.isfinite(tokens.inputs).all()


@pytest.mark.parametrize("name", sorted(data.CORPORA))
def test_corpus_counts(name: str) -> None:
    _require(name)
    corpus = data.load_corpus(name)
    assert len(corpus) == data.CORPUS_SIZES[name]
    assert corpus.labels is None or name.startswith("synthetic")
    _check_examples(corpus)
    if name == "jets":
        assert corpus.inputs.shape == (data.CORPUS_SIZES["jets"], len(data.JET_FEATURES))
        # standardized on exactly these jets
        np.testing.assert_allclose(corpus.inputs.mean(0), 0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(data.TASKS))
def test_task_counts_and_splits(name: str) -> None:
    _require(name)
    task = data.load_task(name)
    sizes = tuple(len(task.splits[s]) for s in data.SPLITS)
    assert sizes == data.TASK_SIZES[name]
    for split in task.splits.values():
        _check_examples(split)
        assert split.labels.shape == (len(split),) and np.isfinite(split.labels).all()
        if task.problem == "binary":
            assert set(np.unique(split.labels)) == {0.0, 1.0}
    if task.splits["train"].kind == "bytes":  # no example appears in two splits
        texts = [set(task.splits[s].texts) for s in data.SPLITS]
        assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


@pytest.mark.parametrize("name", ["freesolv", "solubility"])
def test_scaffold_split_separates_scaffolds(name: str) -> None:
    _require(name)
    from rdkit import Chem
    from rdkit.Chem.Scaffolds.MurckoScaffold import MurckoScaffoldSmiles
    task = data.load_task(name)
    scaffolds = {s: {MurckoScaffoldSmiles(mol=Chem.MolFromSmiles(t), includeChirality=False)
                     for t in task.splits[s].texts} for s in data.SPLITS}
    assert not scaffolds["train"] & scaffolds["test"]
    assert not scaffolds["train"] & scaffolds["valid"]


def test_jet_budgets_share_the_test_split() -> None:
    _require("jets-1k")
    small, large = data.load_task("jets-1k"), data.load_task("jets-10k")
    np.testing.assert_array_equal(small.splits["test"].inputs, large.splits["test"].inputs)
    # the 1k budget is the first 1,000 jets of the 10k budget
    np.testing.assert_array_equal(small.splits["train"].inputs, large.splits["train"].inputs[:1000])
    assert 0.3 < large.splits["train"].labels.mean() < 0.7  # quark and gluon both well represented


def test_missing_package_is_reported(monkeypatch) -> None:
    monkeypatch.setitem(data.REQUIRES, "freesolv", ("no_such_package_xyz",))
    assert data.missing_packages("freesolv") == ["no_such_package_xyz"]
    with pytest.raises(RuntimeError, match="pip install"):
        data.load_task("freesolv")
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_task("imagenet")
