"""The ``sma`` command: pretrain, finetune, evaluate, show-masks, analyze-masks.

Examples (``--data`` names are listed in :mod:`sma.data`)::

    sma pretrain --data molecules --out runs/mol --encoder self --ratio 0.3 --num-per-query 3 \\
        --head-mix random --mask-self --steps 2000
    sma finetune --data freesolv --init runs/mol/checkpoint.pt --out runs/freesolv --steps 500
    sma evaluate --checkpoint runs/freesolv/checkpoint.pt --out runs/freesolv/eval.json
    sma show-masks --checkpoint runs/mol/checkpoint.pt --out runs/show_masks.png
    sma pretrain --data synthetic-features --out runs/pairs --checkpoint-every 100 --steps 1500
    sma analyze-masks --checkpoint runs/pairs --out runs/pairs/masks

Each training command writes ``checkpoint.pt`` and ``metrics.json`` to ``--out``; ``--resume``
continues from the checkpoint there where it stopped. The resumed run reproduces the loss curve of
an uninterrupted one bit for bit when the run is deterministic: on CPU that takes ``--threads 1``,
since multi-threaded reductions are not bitwise reproducible from run to run (see
:mod:`sma.train`). Under ``torchrun`` with WORLD_SIZE > 1 the commands train with
DistributedDataParallel.

Every flag value is checked when the arguments are parsed, and every checkpoint when it is read
(before any data set loads, where the check does not need the data): a mistake stops the command
with exit status 2 and a one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import torch

import sma_kernels

from . import data as datasets
from .mask_structure import DOMAIN
from .masking import MaskingConfig
from .model import ModelConfig, SMAPretrainer
from .train import (
    CHECKPOINT,
    CheckpointError,
    TrainConfig,
    check_inputs,
    evaluate,
    finetune,
    load_checkpoint,
    load_predictor,
    pretrain,
    setup,
)

DEVICES = ("auto", "cpu", "cuda")
SEED_MAX = 2**32 - 1  # the seed feeds numpy's SeedSequence, which takes non-negative integers


def _number(kind: type, low: float, *, low_open: bool = False, high: float | None = None,
            high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type``: a finite ``kind`` (int or float) within the bounds, or an error
    naming them."""
    what = "an integer" if kind is int else "a number"
    if high is None:
        bounds = f"{'>' if low_open else '>='} {low}"
    else:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


COUNT = _number(int, 1)
NATURAL = _number(int, 0)
SEED = _number(int, 0, high=SEED_MAX)
POSITIVE = _number(float, 0, low_open=True)
NON_NEGATIVE = _number(float, 0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default to each flag's help, except where there is none to show: a default
    of None (explained in the help), a switch's False, a required flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def _add_train_args(parser: argparse.ArgumentParser, steps: int, lr: float, warmup: int,
                    snapshots: bool = False) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="run directory: checkpoint.pt and metrics.json go here")
    parser.add_argument("--steps", type=COUNT, default=steps,
                        help="optimizer steps; the learning-rate schedule spans them all")
    parser.add_argument("--batch-size", type=COUNT, default=64,
                        help="global batch size (split across processes under torchrun)")
    parser.add_argument("--lr", type=POSITIVE, default=lr, help="peak learning rate of AdamW")
    parser.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.01,
                        help="AdamW weight decay (not on biases, norms, embeddings, latents)")
    parser.add_argument("--warmup", type=NATURAL, default=warmup,
                        help="linear warmup steps before the cosine decay")
    parser.add_argument("--grad-clip", type=POSITIVE, default=1.0, help="maximum gradient norm")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seeds the initial weights, the data order and the masks")
    parser.add_argument("--checkpoint-every", type=NATURAL, default=0,
                        help="checkpoint every N steps besides the end (0 = end only)"
                        + ("; also keep weights-only snapshots of step 0, every N steps and the "
                           "end in DIR/steps/ (for analyze-masks)" if snapshots else ""))
    parser.add_argument("--stop-at", type=COUNT, default=None,
                        help="stop after this step with a checkpoint (resume later with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from --out/checkpoint.pt, which must exist (bit for bit "
                             "as an uninterrupted run when deterministic, e.g. --threads 1 on CPU)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto = cuda when available, else cpu")
    parser.add_argument("--backend", choices=("auto", *sma_kernels.backends()), default="auto",
                        help="sma_kernels backend of the first layer (auto = the fastest "
                             "available for the device)")
    parser.add_argument("--threads", type=COUNT, default=None,
                        help="torch CPU threads (default: torch's choice); 1 makes CPU runs "
                             "bitwise reproducible")


def _add_model_args(parser: argparse.ArgumentParser, ignored: str = "") -> None:
    parser.add_argument("--encoder", choices=("cross", "self"), default=None,
                        help="first layer: learned latents (cross) or tokens (self); default "
                             "self for molecules and features, cross otherwise" + ignored)
    parser.add_argument("--width", type=COUNT, default=64,
                        help="channels of every layer; divisible by --heads" + ignored)
    parser.add_argument("--depth", type=NATURAL, default=2,
                        help="self-attention layers after layer 1" + ignored)
    parser.add_argument("--heads", type=COUNT, default=4,
                        help="attention heads of every layer" + ignored)
    parser.add_argument("--latents", type=COUNT, default=32,
                        help="learned latents of the cross encoder" + ignored)
    parser.add_argument("--widening", type=COUNT, default=2, help="MLP widening factor" + ignored)


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``sma`` parser and the parser of each command, by name."""
    parser = argparse.ArgumentParser(prog="sma", description=__doc__.split("\n")[0].replace("``", ""),
                                     formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, required: str) -> argparse.ArgumentParser:
        # A short usage line: an error then reads as two lines, and --help lists every flag.
        return commands.add_parser(name, help=summary, description=summary,
                                   usage=f"%(prog)s {required} [options]",
                                   formatter_class=_HelpFormatter)

    pre = command("pretrain", "masked-autoencoder pretraining", "--data CORPUS --out DIR")
    pre.add_argument("--data", required=True, choices=sorted(datasets.CORPORA),
                     help="pretraining corpus")
    _add_train_args(pre, steps=1000, lr=3e-4, warmup=100, snapshots=True)
    _add_model_args(pre)
    pre.add_argument("--masking", choices=("guided", "random"), default="guided",
                     help="mask chosen from the layer's attention (guided) or uniformly (random)")
    pre.add_argument("--ratio", type=_number(float, 0, low_open=True, high=1, high_open=True),
                     default=0.15, help="fraction of each input's tokens that is masked")
    pre.add_argument("--num-per-query", type=COUNT, default=4,
                     help="tokens chosen per attention row summed into the score")
    pre.add_argument("--head-mix", choices=("mean", "random"), default="mean",
                     help="attention mean over heads, or one random head per row")
    pre.add_argument("--mask-self", action="store_true", help="self encoder: mask chosen queries")
    pre.add_argument("--curriculum", type=_number(float, 0, high=1), default=0.0,
                     help="fraction of steps over which eta decays from 1 (random) to 0 (guided)")
    pre.add_argument("--mask-teacher-ema", type=_number(float, 0, high=1, high_open=True),
                     default=0.0, help="guided masking: choose the mask from an EMA teacher of the "
                     "embedding and the first layer's q/k with this decay per step (e.g. 0.99; 0 = "
                     "from the layer itself)")

    fine = command("finetune", "fine-tune with a one-query head", "--data TASK --out DIR")
    fine.add_argument("--data", required=True, choices=sorted(datasets.TASKS), help="task")
    fine.add_argument("--init", type=Path, default=None,
                      help="pretraining checkpoint (default: train from scratch)")
    _add_train_args(fine, steps=500, lr=1e-4, warmup=50)
    _add_model_args(fine, ignored=" (ignored with --init)")
    fine.add_argument("--dropout", type=_number(float, 0, high=1, high_open=True), default=0.1,
                      help="dropout in the embedding, attention outputs and MLPs")

    ev = command("evaluate", "metrics of a fine-tuned checkpoint", "--checkpoint FILE")
    ev.add_argument("--checkpoint", type=Path, required=True,
                    help="fine-tuned checkpoint (from sma finetune)")
    ev.add_argument("--splits", nargs="+", default=["valid", "test"], choices=datasets.SPLITS,
                    help="splits of the checkpoint's task to evaluate")
    ev.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    ev.add_argument("--device", choices=DEVICES, default="auto",
                    help="auto = cuda when available, else cpu")

    show = command("show-masks", "PNG of the masks chosen for a few inputs",
                   "--checkpoint FILE --out PNG")
    show.add_argument("--checkpoint", type=Path, required=True,
                      help="pretraining checkpoint (from sma pretrain)")
    show.add_argument("--data", default=None, choices=sorted({*datasets.CORPORA, *datasets.TASKS}),
                      help="corpus or task (default: the checkpoint's)")
    show.add_argument("--num", type=COUNT, default=8, help="inputs to show")
    show.add_argument("--max-len", type=COUNT, default=64,
                      help="show only byte inputs of at most this many tokens")
    show.add_argument("--masking", choices=("guided", "random"), default=None,
                      help="override the checkpoint's strategy")
    show.add_argument("--seed", type=SEED, default=0, help="seeds the masks' random choices")
    show.add_argument("--out", type=Path, required=True, help="PNG file to write")

    ana = command("analyze-masks", "structure of guided vs random masks on held-out data",
                  "--checkpoint PATH [PATH ...] --out DIR")
    ana.add_argument("--checkpoint", type=Path, nargs="+", required=True, metavar="PATH",
                     help="pretraining checkpoints or snapshots, or run directories (their "
                          "steps/step-*.pt snapshots from --checkpoint-every, and checkpoint.pt)")
    ana.add_argument("--data", default=None, choices=sorted(DOMAIN),
                     help="read the held-out examples of this corpus's or task's domain (default: "
                          "the checkpoint's corpus)")
    ana.add_argument("--num", type=COUNT, default=512, help="held-out examples (at most)")
    ana.add_argument("--draws", type=COUNT, default=4, help="masks per example and strategy")
    ana.add_argument("--bootstrap", type=COUNT, default=1000,
                     help="bootstrap resamples over the examples for the 95%% intervals")
    ana.add_argument("--seed", type=SEED, default=0, help="seeds the masks and the bootstrap")
    ana.add_argument("--out", type=Path, required=True,
                     help="directory: masks.json, and masks.png (each metric against the "
                          "pretraining step) when the checkpoints span several steps")
    ana.add_argument("--device", choices=DEVICES, default="auto",
                     help="auto = cuda when available, else cpu")
    ana.add_argument("--backend", choices=("auto", *sma_kernels.backends()), default="auto",
                     help="sma_kernels backend of the first layer")
    ana.add_argument("--threads", type=COUNT, default=None,
                     help="torch CPU threads (default: torch's choice)")
    return parser, dict(commands.choices)


def build_parser() -> argparse.ArgumentParser:
    """The ``sma`` argument parser."""
    return build_parsers()[0]


def _model_config(args: argparse.Namespace, data: datasets.TokenSet, name: str) -> ModelConfig:
    encoder = args.encoder
    if encoder is None:
        encoder = "self" if data.kind == "features" or name in ("molecules", "freesolv",
                                                                "solubility") else "cross"
    max_len = data.length if data.kind == "features" else datasets.MAX_LEN
    return ModelConfig(input_kind=data.kind, max_len=max_len, encoder=encoder, width=args.width,
                       depth=args.depth, heads=args.heads, latents=args.latents,
                       widening=args.widening)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, warmup=args.warmup,
                       grad_clip=args.grad_clip, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, stop_at=args.stop_at)


def _summary(metrics: dict) -> str:
    keep = {k: metrics[k] for k in ("command", "data", "steps_done", "final_loss", "eval", "wall_s")
            if k in metrics}
    return json.dumps(keep, indent=2)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace,
           fail: Callable[[str], NoReturn]) -> None:
    """The checks that involve several flags, the machine or the file system; each error stops
    the command with status 2 before any data set loads. A long warmup only warns."""
    if "width" in args and getattr(args, "init", None) is None and args.width % args.heads:
        parser.error(f"--width {args.width} must be divisible by --heads {args.heads}")
    device = getattr(args, "device", "auto")
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        parser.error(f"--device cuda: CUDA is not available ({why}); use --device cpu")
    backend = getattr(args, "backend", "auto")
    if backend != "auto":
        info = sma_kernels.backends()[backend]
        if not info["available"]:
            parser.error(f"--backend {backend} is not available here: {info['reason']}")
        runs_on = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) \
            else "cpu"
        if info["device"] not in ("any", runs_on):
            where = device if device != "auto" else f"auto ({runs_on} here)"
            parser.error(f"--backend {backend} runs on {info['device']}, but --device is {where}")
    if getattr(args, "data", None) is not None and args.command != "analyze-masks":
        _require_data(args.data, fail)
    if getattr(args, "resume", False) and not (args.out / CHECKPOINT).is_file():
        fail(f"--resume: {args.out / CHECKPOINT} does not exist (leave out --resume to start a "
             "new run)")
    if getattr(args, "init", None) is not None:
        load_checkpoint(args.init, "pretrain", "finetune --init")  # refused before the data loads
    if "warmup" in args and args.warmup > args.steps:
        print(f"{parser.prog}: warning: --warmup {args.warmup} exceeds --steps {args.steps}: the "
              f"learning rate rises for the whole run and peaks at {args.steps}/{args.warmup} of "
              "--lr", file=sys.stderr)


def _require_data(name: str, fail: Callable[[str], NoReturn]) -> None:
    missing = datasets.missing_packages(name)
    if missing:
        fail(f"--data {name} needs the packages {', '.join(missing)}: pip install .[data]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sma`` console script."""
    parser, commands = build_parsers()
    args = parser.parse_args(argv)
    command = commands[args.command]

    def fail(message: str) -> NoReturn:
        command.exit(2, f"{command.prog}: error: {message}\n")

    try:
        _check(command, args, fail)
        return _run(args, fail)
    except CheckpointError as error:
        fail(str(error))


def _run(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> int:
    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    if args.command == "pretrain":
        dist = setup(args.device)
        corpus = datasets.load_corpus(args.data)
        masking = MaskingConfig(args.masking, args.ratio, args.num_per_query, args.head_mix,
                                args.mask_self, args.curriculum, args.mask_teacher_ema)
        metrics = pretrain(corpus, args.data, _model_config(args, corpus, args.data), masking,
                           _train_config(args), args.out, dist=dist, resume=args.resume,
                           backend=args.backend)
    elif args.command == "finetune":
        dist = setup(args.device)
        task = datasets.load_task(args.data)
        model_config = None if args.init else _model_config(args, task.splits["train"], args.data)
        metrics = finetune(task, _train_config(args), args.out, dist=dist, init=args.init,
                           model_config=model_config, dropout=args.dropout, resume=args.resume,
                           backend=args.backend)
    elif args.command == "evaluate":
        dist = setup(args.device)
        model, state = load_predictor(args.checkpoint, dist.device)
        _require_data(state["data"], fail)
        task = datasets.load_task(state["data"])
        metrics = {"command": "evaluate", "checkpoint": str(args.checkpoint), "data": state["data"],
                   "eval": evaluate(model, task, tuple(state["target_stats"]), dist.device,
                                    tuple(args.splits))}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    elif args.command == "show-masks":
        return _show_masks(args, fail)
    else:
        return _analyze_masks(args, fail)
    if dist.rank == 0:
        print(_summary(metrics))
    return 0


def _show_masks(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> int:
    from .show_masks import choose_masks, render
    state = load_checkpoint(args.checkpoint, "pretrain", "show-masks")
    masking = MaskingConfig(**state["masking"])
    if args.masking is not None:
        masking = replace(masking, strategy=args.masking)
    model_config = ModelConfig(**state["model"])
    name = args.data or state["data"]
    _require_data(name, fail)
    data = (datasets.load_corpus(name) if name in datasets.CORPORA
            else datasets.load_task(name).splits["train"])
    check_inputs(args.checkpoint, model_config, data, name)
    if data.kind == "bytes":  # short inputs keep the picture legible
        data = data.subset([i for i, s in enumerate(data.inputs) if len(s) <= args.max_len])
        if len(data) == 0:
            fail(f"--data {name} has no input of at most --max-len {args.max_len} tokens")
    model = SMAPretrainer(model_config, masking)
    model.load_state_dict(state["run"]["model"])
    inputs, valid, mask = choose_masks(model, data, args.num, seed=args.seed)
    names = datasets.JET_FEATURES if name.startswith("jets") else None
    title = (f"{masking.strategy} masks, ratio {masking.ratio}, {name} "
             f"(checkpoint step {state['run']['step']})")
    render(inputs, valid, mask, data.kind, args.out, title, names)
    print(f"wrote {args.out}")
    return 0


def _analyze_masks(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> int:
    from . import mask_structure
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is a file; it names the directory to write to")
    files = []
    for path in args.checkpoint:
        if not path.exists():
            fail(f"--checkpoint {path} does not exist")
        found = mask_structure.checkpoint_files(path)
        if not found:
            fail(f"--checkpoint {path} holds no checkpoint (steps/step-*.pt or checkpoint.pt); "
                 "pretrain with --checkpoint-every N to keep step snapshots")
        files += found
    states = [load_checkpoint(f, "pretrain", "analyze-masks") for f in files]
    name = args.data or states[0]["data"]
    for path, state in zip(files, states, strict=True):
        if args.data is None and state["data"] != name:
            fail(f"{path} is a run on {state['data']}, {files[0]} on {name}: pass --data to "
                 "read one data set for all")
    missing = mask_structure.missing_packages(name)
    if missing:
        fail(f"--data {name} needs the packages {', '.join(missing)}: pip install .[data]")
    dist = setup(args.device)
    del states
    result = mask_structure.analyze_checkpoints(
        files, name, count=args.num, draws=args.draws, resamples=args.bootstrap, seed=args.seed,
        device=dist.device, backend=args.backend)
    print(mask_structure.format_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "masks.json").write_text(json.dumps(result, indent=2) + "\n")
    written = [args.out / "masks.json"]
    if len({r["step"] for r in result["records"]}) > 1:
        mask_structure.plot(result, args.out / "masks.png")
        written.append(args.out / "masks.png")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
