"""One supervised training loop for any classifier, readable top to bottom.

Data stay uint8 (N, C, H, W) tensors on the device; each step indexes a batch, augments it as a
whole, normalises it and takes one optimiser step. Every ``eval_every`` epochs the model is
evaluated on the validation part; the best checkpoint *on validation* is kept (never on test).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fed_distill.artifacts import load_checkpoint, save_checkpoint
from fed_distill.checks import check_finite
from fed_distill.data.transforms import Normalizer, augment
from fed_distill.errors import CheckpointError, ConfigError, FedDistillError
from fed_distill.utils import progress_bar


@dataclass
class TrainConfig:
    """Supervised training settings (config group ``train``)."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | none
    step_size: int = 10  # epochs between decays for schedule=step
    gamma: float = 0.1
    crop_padding: int = 2  # random-crop padding in pixels (0 = off)
    hflip: bool | None = None  # None = the dataset's own default
    eval_every: int = 1
    min_steps: int = 200  # at least this many optimiser steps: tiny clients get more epochs
    max_steps: int | None = None  # stop after this many optimiser steps (quick smoke runs)
    patience: int | None = None  # early stopping after this many evaluations without improvement
    label_smoothing: float = 0.0
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    checkpoint_every: int = 1  # epochs between resumable checkpoints of a teacher (0 = none)

    def validate(self) -> TrainConfig:
        """Raise ConfigError (one line) on a bad value: counts are integers in range, rates
        finite, and the optimiser and schedule build (torch.optim's own checks of lr,
        momentum and weight_decay, on a one-parameter stand-in for the model)."""

        def is_int(v: Any, minimum: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

        check_finite(self, "train")  # NaN and inf in any float key, named (before torch's checks)
        for key in ("epochs", "batch_size", "eval_every"):
            if not is_int(getattr(self, key), 1):
                raise ConfigError(
                    f"train.{key} must be a positive integer, got {getattr(self, key)!r}"
                )
        for key in ("min_steps", "crop_padding", "checkpoint_every", "step_size"):
            if not is_int(getattr(self, key), 0):
                raise ConfigError(
                    f"train.{key} must be an integer >= 0, got {getattr(self, key)!r}"
                )
        for key in ("max_steps", "patience"):
            v = getattr(self, key)
            if v is not None and not is_int(v, 1):
                raise ConfigError(f"train.{key} must be a positive integer or null, got {v!r}")
        for key in ("gamma", "label_smoothing"):
            v = getattr(self, key)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"train.{key} must be a finite number >= 0, got {v!r}")
        if not self.label_smoothing < 1:
            raise ConfigError(
                f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        try:
            make_schedule(make_optimizer(torch.nn.Linear(1, 1), self), 1, self, 1)
        except ValueError as e:
            raise ConfigError(f"train: {e}") from None
        return self


@dataclass
class FitResult:
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = -1
    best_val_acc: float = float("nan")
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer must be sgd or adam, got '{cfg.optimizer}'")


def make_schedule(opt: torch.optim.Optimizer, epochs: int, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR schedule (cosine decays smoothly to 0 over all steps)."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "step":
        every = max(1, cfg.step_size * steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.gamma ** (s // every))
    if cfg.schedule == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise ConfigError(f"train.schedule must be cosine, step or none, got '{cfg.schedule}'")


def predict_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    normalizer: Normalizer | None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> torch.Tensor:
    """Logits for all of ``x`` (uint8 images, or float images already normalised), in eval mode."""
    was_training = model.training
    if not torch.is_inference_mode_enabled():
        # Converting parameters inside inference mode would turn them into inference tensors.
        model.to(memory_format=preferred_format(torch.device(device)))
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            xb = (
                normalizer(xb)
                if (normalizer is not None and xb.dtype == torch.uint8)
                else xb.float()
            )
            with _autocast(torch.device(device)):
                out.append(model(xb).float().cpu())
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer | None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (NaN for an empty set)."""
    if len(y) == 0:
        return float("nan")
    logits = predict_logits(model, x, normalizer, device, batch_size)
    return (logits.argmax(1) == y.cpu()).float().mean().item()


def preferred_format(device: torch.device) -> torch.memory_format:
    """channels_last is oneDNN's fast layout for conv/pool on CPU (~1.4x for small CNNs)."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def _autocast(device: torch.device, enabled: bool = True):
    # Mixed precision only on CUDA; on CPU bf16 autocast is slower for these small nets.
    return torch.autocast(
        device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda"
    )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global RNG state(s) that a loop on ``device`` consumes (dropout and the like)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def align_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Give restored optimiser buffers their parameter's memory layout (channels_last on CPU):
    a checkpoint stores them contiguous, and a layout change can change the last bits of the
    update, which would make a resumed run drift from an uninterrupted one."""
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    opt.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def optimizer_state(opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """The optimiser's and the schedule's part of a checkpoint."""
    return {"optimizer": opt.state_dict(), "schedule": sched.state_dict()}


def load_optimizer_state(ckpt: Mapping[str, Any], opt: torch.optim.Optimizer, sched: Any) -> None:
    """Undo :func:`optimizer_state` (the optimiser's state moved to its parameters' device)."""
    opt.load_state_dict(ckpt["optimizer"])
    align_optimizer_state(opt)
    sched.load_state_dict(ckpt["schedule"])


def load_resumable(
    path: str | Path | None, meta: Mapping[str, Any], what: str
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it was written for exactly ``meta``, else None (with a note:
    a checkpoint of other settings, or an unreadable one, is ignored and overwritten later)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        print(f"{what}: ignoring unreadable checkpoint ({e}); starting afresh")
        return None
    if ckpt.get("meta") != json_like(meta):
        print(f"{what}: checkpoint {path} was written for other settings; starting afresh")
        return None
    return ckpt


def json_like(obj: Any) -> Any:
    """``obj`` as it reads back from a checkpoint's metadata (tuples become lists)."""
    if isinstance(obj, Mapping):
        return {k: json_like(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_like(v) for v in obj]
    return obj


def fit(
    model: torch.nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor | None,
    val_y: torch.Tensor | None,
    cfg: TrainConfig,
    normalizer: Normalizer,
    *,
    hflip: bool = False,
    device: torch.device | str = "cpu",
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_meta: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` on (train_x, train_y); keep the weights with the best validation accuracy.

    ``train_y`` holds class indices (cross-entropy) unless ``loss_fn`` is given, in which case it
    can be any per-sample target (e.g. soft labels) and ``loss_fn(logits, targets)`` is minimised.
    Without a validation set the last epoch's weights are kept.

    With ``checkpoint_path``, every ``checkpoint_every`` epochs the whole loop state (model,
    optimiser, schedule, grad scaler, shuffling generator, torch's global RNG, best weights so
    far, history) is written there; a later call with the same arguments and a checkpoint
    present continues from it and ends exactly where an uninterrupted call would have. A
    checkpoint written for other settings (``checkpoint_meta`` and the loop's own sizes) is
    ignored. The caller deletes the file once it has saved the result.
    """
    device = torch.device(device)
    _check_fit_inputs(train_x, train_y, cfg, desc)
    gen = torch.Generator().manual_seed(seed)
    model.to(device, memory_format=preferred_format(device))
    x_all, y_all = train_x.to(device), train_y.to(device)
    has_val = val_x is not None and val_y is not None and len(val_y) > 0
    n = len(x_all)
    bs, steps, epochs, eval_every = _fit_plan(n, cfg)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, epochs, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    loop = _FitLoop(model, opt, sched, scaler, gen, device)
    loss_fn = loss_fn or partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)
    hist: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "val_acc": [], "lr": []}
    result = FitResult(history=hist)
    best_state, bad_evals, start = None, 0, 0
    meta = {
        **(checkpoint_meta or {}),
        "fit": [n, bs, steps, epochs, int(seed), cfg.optimizer, cfg.schedule],
    }
    ckpt = load_resumable(checkpoint_path, meta, desc)
    if ckpt is not None:
        loop.load(ckpt)
        hist.update(ckpt["history"])
        result.history = hist
        result.best_val_acc, result.best_epoch = ckpt["best_val_acc"], ckpt["best_epoch"]
        best_state, bad_evals, start = ckpt["best_state"], ckpt["bad_evals"], ckpt["epoch"] + 1
        print(f"{desc}: resuming from epoch {start + 1}/{epochs} (checkpoint {checkpoint_path})")
    bar = progress_bar(range(start, epochs), desc=desc, enabled=progress)
    for epoch in bar:
        row = loop.epoch(x_all, y_all, bs, steps, cfg, normalizer, hflip, loss_fn, desc, epoch)
        evaluate_now = has_val and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs)
        row["val_acc"] = (
            evaluate(model, val_x, val_y, normalizer, device) if evaluate_now else float("nan")
        )
        for k, v in row.items():
            hist[k].append(v)
        if evaluate_now and not (row["val_acc"] <= result.best_val_acc):  # first eval, or better
            result.best_val_acc, result.best_epoch = row["val_acc"], epoch
            best_state, bad_evals = copy.deepcopy(model.state_dict()), 0
        elif evaluate_now:
            bad_evals += 1
        postfix = {k: f"{row[k]:.3f}" for k in ("train_loss", "train_acc", "val_acc")}
        bar.set_postfix(
            loss=postfix["train_loss"], acc=postfix["train_acc"], val=postfix["val_acc"]
        )
        if on_epoch is not None:
            on_epoch(epoch, row)
        stop = cfg.patience is not None and bad_evals >= cfg.patience
        # a stopped loop is finished: nothing to resume
        due = checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < epochs
        if checkpoint_path is not None and due and not stop:
            best = {"best_val_acc": result.best_val_acc, "best_epoch": result.best_epoch}
            best.update(best_state=best_state, bad_evals=bad_evals)
            state = {"meta": meta, "epoch": epoch, **loop.state(), "history": hist, **best}
            save_checkpoint(state, checkpoint_path)
        if stop:
            break
    bar.close()
    if best_state is None:  # no validation set: keep the final weights
        best_state, result.best_epoch = (
            copy.deepcopy(model.state_dict()),
            len(hist["train_loss"]) - 1,
        )
    model.load_state_dict(best_state)
    result.state_dict = {k: v.detach().cpu() for k, v in best_state.items()}
    return result


def _check_fit_inputs(
    train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig, desc: str
) -> None:
    if len(train_x) == 0:
        raise FedDistillError(f"{desc}: no training samples")
    if len(train_x) != len(train_y):
        raise FedDistillError(f"{desc}: {len(train_x)} images but {len(train_y)} targets")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ConfigError(
            f"train.epochs and train.batch_size must be >= 1 (got {cfg.epochs}, {cfg.batch_size})"
        )


def _fit_plan(n: int, cfg: TrainConfig) -> tuple[int, int, int, int]:
    """(batch size, steps per epoch, epochs, evaluate every) for ``n`` training samples."""
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)  # drop the ragged last batch: BatchNorm dislikes batches of one
    # A client with 150 samples would get one step per epoch; train it for min_steps instead.
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps))
    if cfg.max_steps is not None:
        epochs = max(1, min(epochs, math.ceil(cfg.max_steps / steps)))
        steps = min(steps, cfg.max_steps)
    eval_every = cfg.eval_every * math.ceil(epochs / cfg.epochs)  # as many evaluations as asked
    return bs, steps, epochs, eval_every


@dataclass
class _FitLoop:
    """What :func:`fit` carries from step to step (and into a checkpoint)."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # shuffling and augmentation
    device: torch.device

    def epoch(
        self,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        bs: int,
        steps: int,
        cfg: TrainConfig,
        normalizer: Normalizer,
        hflip: bool,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        desc: str,
        epoch: int,
    ) -> dict[str, float]:
        """One epoch of ``steps`` shuffled batches of ``bs``; its train loss, accuracy and lr."""
        model, opt, scaler = self.model, self.opt, self.scaler
        classification = not torch.is_floating_point(y_all)
        model.train()
        perm = torch.randperm(len(x_all), generator=self.gen).to(self.device)
        tot_loss = tot_correct = tot_seen = 0.0
        for s in range(steps):
            idx = perm[s * bs : (s + 1) * bs]
            xb, yb = x_all[idx], y_all[idx]
            if xb.dtype == torch.uint8:
                xb = normalizer(augment(xb, cfg.crop_padding, hflip, self.gen))
            with _autocast(self.device, cfg.amp):
                logits = model(xb)
                loss = loss_fn(logits.float(), yb)
            if not torch.isfinite(loss):
                raise FedDistillError(
                    f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; lower train.lr"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            self.sched.step()
            tot_loss += loss.detach() * len(idx)
            if classification:
                tot_correct += (logits.detach().argmax(1) == yb).sum()
            tot_seen += len(idx)
        return {
            "train_loss": float(tot_loss) / tot_seen,
            "train_acc": float(tot_correct) / tot_seen if classification else float("nan"),
            "lr": opt.param_groups[0]["lr"],
        }

    def state(self) -> dict[str, Any]:
        """The loop's part of a checkpoint."""
        return {
            "model": self.model.state_dict(),
            **optimizer_state(self.opt, self.sched),
            "scaler": self.scaler.state_dict(),
            "generator": self.gen.get_state(),
            "rng": rng_state(self.device),
        }

    def load(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        load_optimizer_state(ckpt, self.opt, self.sched)
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.gen.set_state(ckpt["generator"])
        set_rng_state(ckpt["rng"], self.device)
