"""The ``sma`` command end to end on tiny synthetic data: pretrain, finetune, evaluate,
show-masks, and resume through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sma.cli import main

TINY = ["--width", "16", "--depth", "1", "--heads", "2", "--latents", "4", "--widening", "1",
        "--batch-size", "16", "--warmup", "2", "--threads", "1"]


def _read(path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(("data", "extra"), [
    ("synthetic-bytes", ["--encoder", "cross", "--ratio", "0.3", "--num-per-query", "2"]),
    ("synthetic-features", ["--ratio", "0.25", "--num-per-query", "2", "--mask-self",
                            "--head-mix", "random", "--curriculum", "0.5"]),
])
def test_pretrain_finetune_evaluate_show(tmp_path, capsys, data: str, extra: list[str]) -> None:
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    assert main(["pretrain", "--data", data, "--out", str(pre), "--steps", "6", *TINY, *extra]) == 0
    metrics = _read(pre / "metrics.json")
    assert metrics["steps_done"] == 6 and len(metrics["losses"]) == 6
    assert (pre / "checkpoint.pt").exists()

    assert main(["finetune", "--data", data, "--init", str(pre / "checkpoint.pt"), "--out", str(fine),
                 "--steps", "6", *TINY]) == 0
    tuned = _read(fine / "metrics.json")
    assert tuned["pretrain"]["data"] == data and tuned["steps_done"] == 6
    assert 0.0 <= tuned["eval"]["test"]["roc_auc"] <= 1.0
    assert tuned["eval"]["test"]["count"] == 64

    assert main(["evaluate", "--checkpoint", str(fine / "checkpoint.pt"),
                 "--out", str(fine / "eval.json")]) == 0
    assert _read(fine / "eval.json")["eval"] == tuned["eval"]  # same weights, same numbers

    png = tmp_path / "masks.png"
    assert main(["show-masks", "--checkpoint", str(pre / "checkpoint.pt"), "--out", str(png),
                 "--num", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_finetune_from_scratch(tmp_path) -> None:
    out = tmp_path / "scratch"
    assert main(["finetune", "--data", "synthetic-features", "--out", str(out), "--steps", "4",
                 *TINY]) == 0
    metrics = _read(out / "metrics.json")
    assert metrics["init"] is None and metrics["model"]["encoder"] == "self"


def test_resume_continues_the_same_loss_curve(tmp_path) -> None:
    args = ["pretrain", "--data", "synthetic-bytes", "--steps", "8", "--seed", "2", *TINY]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-at", "3"]) == 0
    assert _read(tmp_path / "split" / "metrics.json")["steps_done"] == 3
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    assert _read(tmp_path / "split" / "metrics.json")["losses"] == \
        _read(tmp_path / "whole" / "metrics.json")["losses"]


def test_module_entry_point_help() -> None:
    result = subprocess.run([sys.executable, "-m", "sma", "--help"], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0
    for command in ("pretrain", "finetune", "evaluate", "show-masks"):
        assert command in result.stdout


def test_bad_data_name_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["pretrain", "--data", "imagenet", "--out", "unused"])
