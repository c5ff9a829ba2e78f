"""The downstream experiment (``python -m sma.experiments``): its conditions, one unit run end to
end, and the tables it writes."""

from __future__ import annotations

import json

import pytest
from sma import experiments
from sma.mask_structure import missing_packages

import sma_kernels


def test_conditions_differ_only_in_how_the_mask_is_chosen() -> None:
    for domain, spec in experiments.DOMAINS.items():
        guided = experiments.masking_for(domain, "guided")
        teacher = experiments.masking_for(domain, "teacher")
        random = experiments.masking_for(domain, "random")
        assert guided == spec["masking"] and not guided.uses_teacher
        assert teacher.uses_teacher and teacher.teacher_ema == experiments.TEACHER_EMA
        assert teacher.strategy == "guided" and random.strategy == "random"
        for other in (teacher, random):
            assert (other.ratio, other.num_per_query, other.head_mix, other.mask_self) == \
                (guided.ratio, guided.num_per_query, guided.head_mix, guided.mask_self)


@pytest.mark.skipif(bool(missing_packages("jets")), reason="needs the [data] extra (jets)")
@pytest.mark.skipif(not sma_kernels.backends()["cpp"]["available"],
                    reason="the compiled cpp backend is not built")
def test_a_unit_pretrains_measures_its_masks_and_finetunes(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(experiments.HELDOUT, "examples", 64)
    monkeypatch.setitem(experiments.HELDOUT, "resamples", 50)
    unit = ("jets", "teacher", 0, tmp_path, 0.01, "cpp")
    results = experiments.run_unit(unit)
    assert [r["task"] for r in results] == list(experiments.DOMAINS["jets"]["tasks"])
    structure = results[0]["structure"]
    entry = structure[experiments.STRUCTURE["jets"]]
    assert 0 < entry["guided"]["value"] < 1 and 0 < entry["random"]["value"] < 1
    saved = json.loads((tmp_path / "jets/teacher/seed0/pretrain/structure.json").read_text())
    assert saved["records"][0]["masking"]["teacher_ema"] == experiments.TEACHER_EMA
    # A finished unit is read back, not rerun.
    assert experiments.run_unit(unit) == results


def _record(domain: str, condition: str, seed: int, task: str, test: float, ratio: float) -> dict:
    metric = experiments.STRUCTURE[domain]
    entry = {"guided": {"value": 0.5 * ratio, "ci95": [0.0, 1.0]},
             "random": {"value": 0.5, "ci95": [0.4, 0.6]},
             "ratio": {"value": ratio, "ci95": [ratio - 0.1, ratio + 0.1]}}
    return {"domain": domain, "task": task, "condition": condition, "seed": seed,
            "metric": "roc_auc", "test": test, "pretrain_wall_s": 10.0 + seed,
            "structure": None if condition == "none" else
            {metric: entry, "masked_loss": {"guided": {"value": 1.0}}}}


def test_tables_summarize_over_seeds() -> None:
    results = [_record("proteins", condition, seed, "amp", test, ratio)
               for condition, test, ratio in (("guided", 0.9, 1.5), ("teacher", 0.8, 1.05),
                                              ("random", 0.7, 0.8), ("none", 0.6, 1.0))
               for seed in (0, 1)]
    rows = experiments.summarize(results)
    assert len(rows) == 1 and rows[0]["guided"]["mean"] == pytest.approx(0.9)
    structure = experiments.summarize_structure(results)
    assert [row["condition"] for row in structure] == ["guided", "teacher", "random"]
    assert [row["above_random"] for row in structure] == [2, 0, 0]  # CI lower ends 1.4, 0.95, 0.7
    assert structure[0]["pretrain_wall_s"]["mean"] == pytest.approx(10.5)
    table = experiments.markdown(rows, structure)
    assert "| proteins | amp (roc_auc ↑) | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.700 ± 0.000 | " \
           "0.600 ± 0.000 | +0.200 | +0.100 |" in table
    assert "| proteins | run_length | teacher 0.999 | 0.525 ± 0.000 | 0.500 ± 0.000 | 1.05 ± 0.00 " \
           "| 0 of 2 |" in table
