"""The ``sma`` command end to end on tiny synthetic data: pretrain, finetune, evaluate,
show-masks, and resume through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
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
    # Bit for bit needs a deterministic run: one CPU thread (multi-threaded reductions are not
    # bitwise reproducible from run to run).
    args = ["pretrain", "--data", "synthetic-bytes", "--steps", "8", "--seed", "2", *TINY,
            "--threads", "1"]
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


# ------------------------------------------------------------------ errors at the command line

def _refused(capsys, argv: list[str]) -> list[str]:
    """Run ``sma argv``, which must stop with status 2 and no traceback; its stderr lines."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


PRETRAIN = ["pretrain", "--data", "synthetic-bytes", "--steps", "2", *TINY]


@pytest.mark.parametrize(("command", "bad", "message"), [
    (PRETRAIN, ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (PRETRAIN, ["--steps", "-5"], "argument --steps: must be >= 1, got -5"),
    (PRETRAIN, ["--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
    (PRETRAIN, ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (PRETRAIN, ["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (PRETRAIN, ["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    (PRETRAIN, ["--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0, got -0.1"),
    (PRETRAIN, ["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (PRETRAIN, ["--grad-clip", "0"], "argument --grad-clip: must be > 0, got 0"),
    (PRETRAIN, ["--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
    (PRETRAIN, ["--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 0, got -1"),
    (PRETRAIN, ["--stop-at", "0"], "argument --stop-at: must be >= 1, got 0"),
    (PRETRAIN, ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (PRETRAIN, ["--ratio", "1.5"], "argument --ratio: must be in (0, 1), got 1.5"),
    (PRETRAIN, ["--ratio", "0"], "argument --ratio: must be in (0, 1), got 0"),
    (PRETRAIN, ["--num-per-query", "0"], "argument --num-per-query: must be >= 1, got 0"),
    (PRETRAIN, ["--curriculum", "1.5"], "argument --curriculum: must be in [0, 1], got 1.5"),
    (PRETRAIN, ["--backend", "foo"], "argument --backend: invalid choice: 'foo'"),
    (PRETRAIN, ["--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    (PRETRAIN, ["--width", "0"], "argument --width: must be >= 1, got 0"),
    (PRETRAIN, ["--depth", "-1"], "argument --depth: must be >= 0, got -1"),
    (PRETRAIN, ["--heads", "0"], "argument --heads: must be >= 1, got 0"),
    (PRETRAIN, ["--latents", "0"], "argument --latents: must be >= 1, got 0"),
    (PRETRAIN, ["--widening", "0"], "argument --widening: must be >= 1, got 0"),
    (PRETRAIN, ["--width", "15"], "--width 15 must be divisible by --heads 2"),
    (["finetune", "--data", "synthetic-bytes", "--steps", "2", *TINY], ["--dropout", "1"],
     "argument --dropout: must be in [0, 1), got 1"),
    (["show-masks", "--checkpoint", "unused.pt"], ["--num", "0"], "argument --num: must be >= 1, got 0"),
    (["show-masks", "--checkpoint", "unused.pt"], ["--max-len", "0"],
     "argument --max-len: must be >= 1, got 0"),
    (["analyze-masks", "--checkpoint", "unused.pt"], ["--num", "0"], "argument --num: must be >= 1, got 0"),
    (["analyze-masks", "--checkpoint", "unused.pt"], ["--draws", "-1"],
     "argument --draws: must be >= 1, got -1"),
    (["analyze-masks", "--checkpoint", "unused.pt"], ["--bootstrap", "x"],
     "argument --bootstrap: expected an integer, got 'x'"),
    (["analyze-masks", "--checkpoint", "unused.pt"], ["--data", "imagenet"],
     "argument --data: invalid choice: 'imagenet'"),
])
def test_bad_values_are_refused_when_parsed(tmp_path, capsys, command: list[str], bad: list[str],
                                            message: str) -> None:
    lines = _refused(capsys, [*command, "--out", str(tmp_path / "out"), *bad])
    assert lines[0].startswith(f"usage: sma {command[0]}")
    assert lines[-1].startswith(f"sma {command[0]}: error: {message}")
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_warmup_longer_than_the_run_warns(tmp_path, capsys) -> None:
    assert main([*PRETRAIN, "--steps", "2", "--warmup", "5", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "sma pretrain: warning: --warmup 5 exceeds --steps 2" in err
    assert "Traceback" not in err


def test_help_shows_defaults_choices_and_every_flag(capsys) -> None:
    import argparse

    from sma.cli import build_parser

    import sma_kernels

    backends = "{" + ",".join(["auto", *sma_kernels.backends()]) + "}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"sma {name} {action.option_strings} has no help line"
        with pytest.raises(SystemExit) as stopped:
            main([name, "--help"])
        assert stopped.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # undo the help formatter's line wrapping
        assert "(default: " in text
        if name != "show-masks":
            assert "--device {auto,cpu,cuda}" in text
        if name in ("pretrain", "finetune"):
            assert f"--backend {backends}" in text
            assert "(default: 64)" in text  # --batch-size


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(tmp_path, capsys) -> None:
    lines = _refused(capsys, [*PRETRAIN, "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert lines[-1].startswith("sma pretrain: error: --device cuda: CUDA is not available")


def test_backend_that_cannot_run_is_refused(tmp_path, capsys, monkeypatch) -> None:
    import sma.cli

    info = {"reference": {"available": True, "device": "any", "reason": None},
            "cpp": {"available": True, "device": "cpu", "reason": None},
            "triton": {"available": False, "device": "cuda", "reason": "no CUDA GPU here"}}
    monkeypatch.setattr(sma.cli.sma_kernels, "backends", lambda: info)
    args = [*PRETRAIN, "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert _refused(capsys, [*args, "--backend", "triton"])[-1] == \
        "sma pretrain: error: --backend triton is not available here: no CUDA GPU here"
    info["triton"] = {"available": True, "device": "cuda", "reason": None}
    assert _refused(capsys, [*args, "--backend", "triton"])[-1] == \
        "sma pretrain: error: --backend triton runs on cuda, but --device is cpu"


def test_missing_data_packages_are_refused(tmp_path, capsys, monkeypatch) -> None:
    from sma import data

    monkeypatch.setitem(data.REQUIRES, "synthetic-bytes", ("no_such_package_sma",))
    lines = _refused(capsys, [*PRETRAIN, "--out", str(tmp_path / "run")])
    assert lines[-1] == ("sma pretrain: error: --data synthetic-bytes needs the packages "
                         "no_such_package_sma: pip install .[data]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A pretraining and a fine-tuned checkpoint (bytes), and files that are not sma checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    args = ["--data", "synthetic-bytes", "--steps", "2", *TINY]
    assert main(["pretrain", *args, "--out", str(root / "pre")]) == 0
    assert main(["finetune", *args, "--init", str(root / "pre" / "checkpoint.pt"),
                 "--out", str(root / "fine")]) == 0
    (root / "text.pt").write_text("not a checkpoint\n")
    torch.save({"weight": torch.zeros(2)}, root / "plain.pt")
    return {"pre": root / "pre" / "checkpoint.pt", "fine": root / "fine" / "checkpoint.pt",
            "missing": root / "missing.pt", "text": root / "text.pt", "plain": root / "plain.pt",
            "root": root}


FINETUNED = "a fine-tuned one (from `sma finetune`)"
PRETRAINED = "a pretraining one (from `sma pretrain`)"


@pytest.mark.parametrize(("command", "checkpoint", "message"), [
    ("evaluate", "pre", f"{{path}} is a pretraining checkpoint; evaluate needs {FINETUNED}"),
    ("show-masks", "fine", f"{{path}} is a fine-tuned checkpoint; show-masks needs {PRETRAINED}"),
    ("finetune", "fine", f"{{path}} is a fine-tuned checkpoint; finetune --init needs {PRETRAINED}"),
    ("evaluate", "missing", "{path} does not exist; evaluate needs " + FINETUNED),
    ("show-masks", "text", "{path} is not a torch checkpoint (UnpicklingError: "),
    ("evaluate", "plain", "{path} is not an sma checkpoint; evaluate needs " + FINETUNED),
    ("finetune", "root", "{path} is a directory; finetune --init needs " + PRETRAINED),
])
def test_wrong_checkpoint_is_one_line(tmp_path, capsys, runs: dict, command: str, checkpoint: str,
                                      message: str) -> None:
    path = runs[checkpoint]
    out = tmp_path / "out.png"
    argv = {"evaluate": ["evaluate", "--checkpoint", str(path)],
            "show-masks": ["show-masks", "--checkpoint", str(path), "--out", str(out)],
            "finetune": ["finetune", "--data", "synthetic-bytes", "--init", str(path), "--steps", "2",
                         *TINY, "--out", str(tmp_path / "fine")]}[command]
    lines = _refused(capsys, argv)
    assert len(lines) == 1
    assert lines[0].startswith(f"sma {command}: error: " + message.format(path=path))
    assert not out.exists() and not (tmp_path / "fine").exists()


def test_checkpoint_for_other_inputs_is_refused(tmp_path, capsys, runs: dict) -> None:
    lines = _refused(capsys, ["finetune", "--data", "synthetic-features", "--init", str(runs["pre"]),
                              "--steps", "2", *TINY, "--out", str(tmp_path / "fine")])
    assert lines == [(f"sma finetune: error: {runs['pre']} is a model of bytes inputs; "
                     "--data synthetic-features has 8 features")]
    lines = _refused(capsys, ["show-masks", "--checkpoint", str(runs["pre"]), "--data",
                              "synthetic-features", "--out", str(tmp_path / "masks.png")])
    assert lines == [(f"sma show-masks: error: {runs['pre']} is a model of bytes inputs; "
                     "--data synthetic-features has 8 features")]


def test_analyze_masks_without_checkpoints_is_refused(tmp_path, capsys, runs: dict) -> None:
    out = tmp_path / "analysis"
    missing = tmp_path / "missing.pt"
    assert _refused(capsys, ["analyze-masks", "--checkpoint", str(missing), "--out", str(out)]) == \
        [f"sma analyze-masks: error: --checkpoint {missing} does not exist"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _refused(capsys, ["analyze-masks", "--checkpoint", str(empty), "--out", str(out)]) == \
        [(f"sma analyze-masks: error: --checkpoint {empty} holds no checkpoint (steps/step-*.pt or "
         "checkpoint.pt); pretrain with --checkpoint-every N to keep step snapshots")]
    assert _refused(capsys, ["analyze-masks", "--checkpoint", str(runs["fine"]), "--out", str(out)]) == \
        [(f"sma analyze-masks: error: {runs['fine']} is a fine-tuned checkpoint; analyze-masks needs "
         f"{PRETRAINED}")]
    assert _refused(capsys, ["analyze-masks", "--checkpoint", str(runs["pre"]), "--data",
                             "synthetic-features", "--out", str(out)]) == \
        [(f"sma analyze-masks: error: {runs['pre']} is a model of bytes inputs; --data "
         "synthetic-features has 8 features")]
    assert not out.exists()


def test_resume_without_checkpoint_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    lines = _refused(capsys, [*PRETRAIN, "--out", str(out), "--resume"])
    assert lines == [(f"sma pretrain: error: --resume: {out / 'checkpoint.pt'} does not exist "
                     "(leave out --resume to start a new run)")]
    assert not out.exists()


def test_resume_from_the_wrong_checkpoint_is_refused(tmp_path, capsys, runs: dict) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(runs["fine"].read_bytes())
    lines = _refused(capsys, [*PRETRAIN, "--out", str(out), "--resume"])
    assert lines == [(f"sma pretrain: error: {out / 'checkpoint.pt'} is a fine-tuned checkpoint; "
                     f"pretrain --resume needs {PRETRAINED}")]
    (out / "checkpoint.pt").write_bytes(runs["pre"].read_bytes())
    lines = _refused(capsys, [*PRETRAIN, "--out", str(out), "--resume", "--width", "32"])
    assert lines == [(f"sma pretrain: error: {out / 'checkpoint.pt'} holds a different model "
                     "(width 16, not 32); resume with the flags of the run that wrote it")]
    lines = _refused(capsys, [*PRETRAIN, "--out", str(out), "--resume", "--data", "synthetic-features"])
    assert lines == [(f"sma pretrain: error: {out / 'checkpoint.pt'} is a run on --data "
                      "synthetic-bytes, not synthetic-features")]


def test_errors_through_the_entry_point(tmp_path) -> None:
    def sma(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sma", *argv], capture_output=True, text=True,
                              check=False)

    result = sma("evaluate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [(f"sma evaluate: error: {tmp_path / 'missing.pt'} does not "
                                          f"exist; evaluate needs {FINETUNED}")]
    result = sma("pretrain", "--data", "synthetic-bytes", "--out", str(tmp_path / "run"),
                 "--batch-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == \
        "sma pretrain: error: argument --batch-size: must be >= 1, got 0"
    assert not (tmp_path / "run").exists()
