"""Pretraining and fine-tuning loops with exact resume, AMP on GPU and DDP under torchrun.

A checkpoint holds everything the next step depends on: the weights, AdamW's moments, the
learning-rate schedule, the step, the loss curve so far, the torch (CPU and CUDA) RNG states and
the state of the generator that draws the masks. The data order is a function of (seed, epoch),
so it needs no state. Restarting from a checkpoint therefore continues the loss curve of an
uninterrupted run bit for bit, whenever the run itself is deterministic: on CPU that means one
torch thread (``torch.set_num_threads(1)``, ``sma ... --threads 1``), since the result of a
multi-threaded reduction depends on how its work is split between threads, and that split is not
guaranteed to be the same from run to run.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) each process takes every WORLD_SIZE-th example
of the global batch, the model is wrapped in DistributedDataParallel, and only rank 0 writes
checkpoints, metrics and the progress bar. On CUDA the forward runs under bf16 autocast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import Task, TokenSet
from .masking import MaskingConfig
from .metrics import task_metrics
from .model import ModelConfig, SMAPredictor, SMAPretrainer

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
SNAPSHOTS = "steps"  # pretraining with checkpoint_every: weights-only step-NNNNNNN.pt files


def snapshot_name(step: int) -> str:
    """File name of the weights-only pretraining snapshot after ``step`` optimizer steps."""
    return f"step-{step:07d}.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        steps: total optimizer steps (the schedule spans them all).
        batch_size: global batch size (split across processes under DDP).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases, LayerNorms, embeddings, latents).
        warmup: linear warmup steps before the cosine decay to 0.
        grad_clip: maximum global gradient norm.
        seed: seeds the initial weights, the data order and the masks.
        checkpoint_every: also checkpoint every this many steps (0 = only at the end); pretraining
            then also keeps a weights-only snapshot of step 0, of every such step and of the
            last one in ``steps/step-NNNNNNN.pt`` (e.g. for ``sma analyze-masks``).
        stop_at: stop after this many steps with a checkpoint, as if interrupted (None = run all).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    stop_at: int | None = None


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device


def setup(device: str = "auto") -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1, and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(local_rank)
            return Dist(torch.distributed.get_rank(), world, torch.device("cuda", local_rank))
        return Dist(torch.distributed.get_rank(), world, torch.device("cpu"))
    return Dist(0, 1, torch.device("cuda" if cuda else "cpu") if device == "auto"
                else torch.device(device))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int, dist: Dist) -> np.ndarray:
    """This process's examples for ``step``: epochs are fixed permutations drawn from
    (seed, epoch); each process takes every ``world``-th example of the global batch."""
    batch_size = min(batch_size, num_examples)
    per_epoch = num_examples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[position * batch_size:(position + 1) * batch_size][dist.rank::dist.world]


def make_optimizer(model: nn.Module, config: TrainConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on 1-d parameters, embeddings, latents and queries) with linear warmup
    then cosine decay to 0 over ``config.steps``."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # e.g. the EMA mask teacher
            continue
        exempt = param.dim() < 2 or name.endswith(("latents", "queries")) or "positions" in name \
            or "tokens" in name
        (no_decay if exempt else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Run:
    """One training run's mutable state, saved and restored whole by the checkpoint."""

    def __init__(self, model: nn.Module, config: TrainConfig, dist: Dist) -> None:
        self.model = model
        self.config = config
        self.dist = dist
        self.optimizer, self.scheduler = make_optimizer(model, config)
        # Masks come from their own generator, so their sequence does not depend on dropout draws.
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + dist.rank)
        self.step = 0
        self.losses: list[float] = []
        self.wrapped: nn.Module = model
        if dist.world > 1:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "mask_generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "losses": self.losses, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.losses = list(state["losses"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["mask_generator"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def train(self, loss_fn: Callable[[int], torch.Tensor], save: Callable[[], None],
              desc: str, progress: bool = True,
              after_step: Callable[[], None] | None = None) -> None:
        """Run optimizer steps from ``self.step`` to the end (or ``stop_at``), calling
        ``after_step`` after each optimizer step and ``save`` at every checkpoint."""
        config = self.config
        end = config.steps if config.stop_at is None else min(config.stop_at, config.steps)
        self.model.train()
        with tqdm(total=config.steps, initial=self.step, desc=desc, dynamic_ncols=True,
                  disable=not progress or self.dist.rank != 0, mininterval=1.0) as bar:
            while self.step < end:
                with autocast(self.dist.device):
                    loss = loss_fn(self.step)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.optimizer.step()
                if after_step is not None:
                    after_step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{self.losses[-1]:.4f}")
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 \
                        and self.step < end:
                    save()
        save()


def _save(path: Path, payload: dict, dist: Dist) -> None:
    if dist.rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken checkpoint


def write_metrics(out_dir: Path, metrics: dict, dist: Dist) -> None:
    if dist.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or not the kind its use needs."""


_KINDS = {"pretrain": ("a pretraining checkpoint", "a pretraining one (from `sma pretrain`)"),
          "finetune": ("a fine-tuned checkpoint", "a fine-tuned one (from `sma finetune`)")}


def load_checkpoint(path: Path, kind: str, use: str,
                    map_location: torch.device | str = "cpu") -> dict:
    """The checkpoint at ``path``, written by ``kind`` ("pretrain" or "finetune").

    Raises :class:`CheckpointError`, with a one-line message naming ``use`` (what needs the
    checkpoint, e.g. "evaluate"), when the file is missing, is not a torch checkpoint, or is not
    an sma checkpoint of that kind.
    """
    path = Path(path)
    wanted = f"{use} needs {_KINDS[kind][1]}"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {wanted}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; {wanted}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling fails with many types (UnpicklingError, EOFError, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path} is not a torch checkpoint ({type(error).__name__}: "
                              f"{reason}); {wanted}") from error
    found = state.get("command") if isinstance(state, dict) else None
    if found not in _KINDS or not isinstance(state.get("run"), dict):
        raise CheckpointError(f"{path} is not an sma checkpoint; {wanted}")
    if found != kind:
        raise CheckpointError(f"{path} is {_KINDS[found][0]}; {wanted}")
    return state


def check_inputs(path: Path, model: ModelConfig, data: TokenSet, data_name: str) -> None:
    """Raise :class:`CheckpointError` unless the model from ``path`` reads ``data``'s inputs."""
    if model.input_kind != data.kind:
        has = "bytes" if data.kind == "bytes" else f"{data.length} features"
        raise CheckpointError(f"{path} is a model of {model.input_kind} inputs; "
                              f"--data {data_name} has {has}")
    if data.kind == "features" and model.max_len != data.length:
        raise CheckpointError(f"{path} is a model of {model.max_len} features; "
                              f"--data {data_name} has {data.length}")


def _resume(run: Run, path: Path, resume: bool, kind: str, model_config: ModelConfig,
            data_name: str) -> dict | None:
    """The checkpoint state that ``run`` continues from (None without ``resume``); refuses a
    missing checkpoint and one of another command, model or data set."""
    if not resume:
        return None
    # Loaded to the CPU: RNG states must stay CPU byte tensors; load_state_dict moves the
    # weights and the optimizer moments to the parameters' device.
    state = load_checkpoint(path, kind, f"{kind} --resume")
    if state["data"] != data_name:
        raise CheckpointError(f"{path} is a run on --data {state['data']}, not {data_name}")
    if state["model"] != model_config.to_dict():
        saved = state["model"]
        diff = ", ".join(f"{key} {saved.get(key)}, not {value}"
                         for key, value in model_config.to_dict().items() if saved.get(key) != value)
        raise CheckpointError(f"{path} holds a different model ({diff}); resume with the flags of "
                              "the run that wrote it")
    run.load_state_dict(state["run"])
    return state


def pretrain(corpus: TokenSet, corpus_name: str, model_config: ModelConfig,
             masking: MaskingConfig, config: TrainConfig, out_dir: Path, *, dist: Dist,
             resume: bool = False, backend: str = "auto", progress: bool = True) -> dict:
    """Pretrain an SMA encoder + decoder on ``corpus``; returns (and writes) the metrics.

    With ``resume`` it continues from ``out_dir/checkpoint.pt``, which must exist and come from a
    pretraining run of the same model on the same corpus (else :class:`CheckpointError`).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = SMAPretrainer(model_config, masking, backend).to(dist.device)
    run = Run(model, config, dist)
    path = out_dir / CHECKPOINT
    previous = _resume(run, path, resume, "pretrain", model_config, corpus_name)
    elapsed = previous["wall_s"] if previous else 0.0

    def loss_fn(step: int) -> torch.Tensor:
        inputs, valid = corpus.batch(batch_indices(len(corpus), config.batch_size, config.seed,
                                                   step, dist), dist.device)
        return run.wrapped(inputs, valid, noise=masking.noise(step, config.steps),
                           generator=run.generator)[0]

    header = {"command": "pretrain", "data": corpus_name, "corpus_size": len(corpus),
              "model": model_config.to_dict(), "masking": masking.to_dict(), "train": asdict(config),
              "parameters": sum(p.numel() for p in model.parameters())}

    def snapshot() -> None:
        weights = {"model": model.state_dict(), "step": run.step, "losses": run.losses}
        _save(out_dir / SNAPSHOTS / snapshot_name(run.step),
              {**header, "run": weights, "wall_s": elapsed + time.perf_counter() - start}, dist)

    def save() -> None:
        _save(path, {**header, "run": run.state_dict(),
                     "wall_s": elapsed + time.perf_counter() - start}, dist)
        if config.checkpoint_every:
            snapshot()

    if config.checkpoint_every and run.step == 0:
        snapshot()
    run.train(loss_fn, save, f"pretrain {corpus_name} ({masking.strategy})", progress,
              after_step=model.update_teacher)
    tail = run.losses[-max(1, len(run.losses) // 10):]
    metrics = {**header, "steps_done": run.step, "losses": run.losses,
               "final_loss": float(np.mean(tail)) if tail else None,
               "wall_s": elapsed + time.perf_counter() - start}
    write_metrics(out_dir, metrics, dist)
    return metrics


def predict(model: SMAPredictor, data: TokenSet, device: torch.device,
            batch_size: int = 256) -> np.ndarray:
    """The model's raw outputs (standardized value or logit) for every example, in order."""
    model.eval()
    out = []
    with torch.no_grad(), autocast(device):
        for begin in range(0, len(data), batch_size):
            inputs, valid = data.batch(np.arange(begin, min(begin + batch_size, len(data))), device)
            out.append(model(inputs, valid)[:, 0].float().cpu())
    model.train()
    return torch.cat(out).numpy()


def evaluate(model: SMAPredictor, task: Task, stats: tuple[float, float], device: torch.device,
             splits: tuple[str, ...] = ("valid", "test")) -> dict[str, dict[str, float]]:
    """Task metrics per split; regression outputs are mapped back by the target (mean, std)."""
    mean, std = stats
    result = {}
    for split in splits:
        data = task.splits[split]
        output = predict(model, data, device)
        if task.problem == "regression":
            output = output * std + mean
        result[split] = {**task_metrics(task.problem, output, data.labels), "count": len(data)}
    return result


def load_predictor(path: Path, device: torch.device, backend: str = "auto"
                   ) -> tuple[SMAPredictor, dict]:
    """A fine-tuned model and its checkpoint header from ``path`` (:class:`CheckpointError` if
    it is not a fine-tuned checkpoint)."""
    state = load_checkpoint(path, "finetune", "evaluate", map_location=device)
    model = SMAPredictor(ModelConfig(**state["model"]), backend=backend).to(device)
    model.load_state_dict(state["run"]["model"])
    return model, state


def finetune(task: Task, config: TrainConfig, out_dir: Path, *, dist: Dist,
             init: Path | None = None, model_config: ModelConfig | None = None,
             dropout: float = 0.1, resume: bool = False, backend: str = "auto",
             progress: bool = True) -> dict:
    """Fine-tune a predictor on ``task`` from the pretrained encoder at ``init`` (or from scratch
    with ``model_config``), then evaluate valid and test; returns (and writes) the metrics.

    ``init`` must be a pretraining checkpoint of a model for the task's inputs; with ``resume`` it
    continues from ``out_dir/checkpoint.pt``, which must exist and come from a fine-tuning run of
    the same model on the same task (else :class:`CheckpointError`).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    pretrained = None
    if init is not None:
        pretrained = load_checkpoint(init, "pretrain", "finetune --init")
        model_config = ModelConfig(**pretrained["model"])
        check_inputs(init, model_config, task.splits["train"], task.name)
    if model_config is None:
        raise ValueError("finetune needs a pretrained checkpoint (init) or a model_config")
    model_config = replace(model_config, dropout=dropout)
    model = SMAPredictor(model_config, backend=backend)
    if pretrained is not None:
        encoder = {k.removeprefix("encoder."): v for k, v in pretrained["run"]["model"].items()
                   if k.startswith("encoder.")}
        model.encoder.load_state_dict(encoder)
    model.to(dist.device)
    train = task.splits["train"]
    labels = torch.as_tensor(train.labels)
    # Regression targets are standardized on the training split, so one lr suits every task.
    stats = (float(labels.mean()), float(labels.std())) if task.problem == "regression" else (0.0, 1.0)
    run = Run(model, config, dist)
    path = out_dir / CHECKPOINT
    previous = _resume(run, path, resume, "finetune", model_config, task.name)
    elapsed = previous["wall_s"] if previous else 0.0

    def loss_fn(step: int) -> torch.Tensor:
        index = batch_indices(len(train), config.batch_size, config.seed, step, dist)
        inputs, valid = train.batch(index, dist.device)
        target = ((labels[index] - stats[0]) / stats[1]).to(dist.device)
        output = run.wrapped(inputs, valid)[:, 0].float()
        if task.problem == "regression":
            return F.mse_loss(output, target)
        return F.binary_cross_entropy_with_logits(output, target)

    header = {"command": "finetune", "data": task.name, "problem": task.problem,
              "metric": task.metric, "init": None if init is None else str(init),
              "pretrain": None if pretrained is None else
              {k: pretrained[k] for k in ("data", "corpus_size", "masking", "train")},
              "model": model_config.to_dict(), "train": asdict(config), "target_stats": stats,
              "split_sizes": {s: len(d) for s, d in task.splits.items()}}

    def save() -> None:
        _save(path, {**header, "run": run.state_dict(),
                     "wall_s": elapsed + time.perf_counter() - start}, dist)

    run.train(loss_fn, save, f"finetune {task.name}", progress)
    metrics = {**header, "steps_done": run.step, "losses": run.losses,
               "eval": evaluate(model, task, stats, dist.device),
               "wall_s": elapsed + time.perf_counter() - start}
    write_metrics(out_dir, metrics, dist)
    return metrics

