"""The ``sma`` command: pretrain, finetune, evaluate, show-masks.

Examples (``--data`` names are listed in :mod:`sma.data`)::

    sma pretrain --data molecules --out runs/mol --encoder self --ratio 0.3 --num-per-query 3 \\
        --head-mix random --mask-self --steps 2000
    sma finetune --data freesolv --init runs/mol/checkpoint.pt --out runs/freesolv --steps 500
    sma evaluate --checkpoint runs/freesolv/checkpoint.pt --out runs/freesolv/eval.json
    sma show-masks --checkpoint runs/mol/checkpoint.pt --out docs/show_masks.png

Each training command writes ``checkpoint.pt`` and ``metrics.json`` to ``--out``; ``--resume``
continues from the checkpoint there exactly where it stopped. Under ``torchrun`` with
WORLD_SIZE > 1 the commands train with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import data as datasets
from .masking import MaskingConfig
from .model import ModelConfig, SMAPretrainer
from .train import TrainConfig, evaluate, finetune, load_predictor, pretrain, setup


def _add_train_args(parser: argparse.ArgumentParser, steps: int, lr: float, warmup: int) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="checkpoint every N steps besides the end (0 = end only)")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this step with a checkpoint (resume later with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--backend", default="auto", help="sma_kernels backend of the first layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", choices=("cross", "self"), default=None,
                        help="first layer: learned latents (cross) or tokens (self); default "
                             "self for molecules and features, cross otherwise")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2, help="self-attention layers after layer 1")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--widening", type=int, default=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sma", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    pre = commands.add_parser("pretrain", help="masked-autoencoder pretraining")
    pre.add_argument("--data", required=True, choices=sorted(datasets.CORPORA))
    _add_train_args(pre, steps=1000, lr=3e-4, warmup=100)
    _add_model_args(pre)
    pre.add_argument("--masking", choices=("guided", "random"), default="guided")
    pre.add_argument("--ratio", type=float, default=0.15)
    pre.add_argument("--num-per-query", type=int, default=4)
    pre.add_argument("--head-mix", choices=("mean", "random"), default="mean")
    pre.add_argument("--mask-self", action="store_true", help="self encoder: mask chosen queries")
    pre.add_argument("--curriculum", type=float, default=0.0,
                     help="fraction of steps over which eta decays from 1 (random) to 0 (guided)")

    fine = commands.add_parser("finetune", help="fine-tune with a one-query head")
    fine.add_argument("--data", required=True, choices=sorted(datasets.TASKS))
    fine.add_argument("--init", type=Path, default=None,
                      help="pretraining checkpoint (default: train from scratch)")
    _add_train_args(fine, steps=500, lr=1e-4, warmup=50)
    _add_model_args(fine)
    fine.add_argument("--dropout", type=float, default=0.1)

    ev = commands.add_parser("evaluate", help="metrics of a fine-tuned checkpoint")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--splits", nargs="+", default=["valid", "test"], choices=datasets.SPLITS)
    ev.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    ev.add_argument("--device", default="auto")

    show = commands.add_parser("show-masks", help="PNG of the masks chosen for a few inputs")
    show.add_argument("--checkpoint", type=Path, required=True, help="pretraining checkpoint")
    show.add_argument("--data", default=None, help="corpus or task (default: the checkpoint's)")
    show.add_argument("--num", type=int, default=8, help="inputs to show")
    show.add_argument("--max-len", type=int, default=64, help="show only inputs up to this length")
    show.add_argument("--masking", choices=("guided", "random"), default=None,
                      help="override the checkpoint's strategy")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", type=Path, required=True)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sma`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "pretrain":
        dist = setup(args.device)
        corpus = datasets.load_corpus(args.data)
        masking = MaskingConfig(args.masking, args.ratio, args.num_per_query, args.head_mix,
                                args.mask_self, args.curriculum)
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
        task = datasets.load_task(state["data"])
        metrics = {"command": "evaluate", "checkpoint": str(args.checkpoint), "data": state["data"],
                   "eval": evaluate(model, task, tuple(state["target_stats"]), dist.device,
                                    tuple(args.splits))}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    else:
        return _show_masks(args)
    if dist.rank == 0:
        print(_summary(metrics))
    return 0


def _show_masks(args: argparse.Namespace) -> int:
    from .show_masks import choose_masks, render
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    masking = MaskingConfig(**state["masking"])
    if args.masking is not None:
        masking = MaskingConfig(**{**state["masking"], "strategy": args.masking})
    model = SMAPretrainer(ModelConfig(**state["model"]), masking)
    model.load_state_dict(state["run"]["model"])
    name = args.data or state["data"]
    data = (datasets.load_corpus(name) if name in datasets.CORPORA
            else datasets.load_task(name).splits["train"])
    if data.kind == "bytes":  # short inputs keep the picture legible
        data = data.subset([i for i, s in enumerate(data.inputs) if len(s) <= args.max_len])
    inputs, valid, mask = choose_masks(model, data, args.num, seed=args.seed)
    names = datasets.JET_FEATURES if name.startswith("jets") else None
    title = (f"{masking.strategy} masks, ratio {masking.ratio}, {name} "
             f"(checkpoint step {state['run']['step']})")
    render(inputs, valid, mask, data.kind, args.out, title, names)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
