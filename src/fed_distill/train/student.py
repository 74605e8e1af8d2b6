"""Distilling frozen teachers into a student on a growing synthetic dataset.

Each epoch: synthesise ``new_batches_per_epoch`` fresh batches (Adaptive DeepInversion against
the current student when ``adaptive``), take one step on each at once and append it to the pool;
then take ``steps_per_epoch`` steps on batches drawn from the whole pool with augmentation.
The loss is KL to the teachers' ensemble soft labels at a temperature (default), or the seed's
cross-entropy on the synthetic labels; optional per-class weights; optionally the server's own
real data adds a supervised term. Evaluation each ``eval_every`` epochs; the student kept is the
last one (a data-free server has no validation data of its own to select on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.artifacts import save_checkpoint
from fed_distill.data.transforms import Normalizer, augment
from fed_distill.ensemble import ensemble_probs
from fed_distill.errors import ConfigError, FedDistillError
from fed_distill.synthesis.base import Synthesizer, SyntheticBatch
from fed_distill.synthesis.losses import kl_per_sample
from fed_distill.synthesis.registry import has_own_soft_labels
from fed_distill.train.fit import (
    evaluate,
    load_optimizer_state,
    load_resumable,
    optimizer_state,
    preferred_format,
    rng_state,
    set_rng_state,
)
from fed_distill.train.pool import SyntheticPool  # noqa: F401  (the loop's pool, re-exported)
from fed_distill.train.student_config import StudentConfig
from fed_distill.train.targets import PoolTargets, TeacherSampler, resolve_targets
from fed_distill.utils import progress_bar


def teacher_targets(
    teachers: list[nn.Module],
    x: torch.Tensor,
    temperature: float,
    method: str,
    shares: torch.Tensor | None,
) -> torch.Tensor:
    """The ensemble's soft labels at ``temperature`` (see ``ensemble_probs``), without autograd.
    no_grad, not inference_mode: the targets enter the student's loss, which autograd records."""
    with torch.no_grad():
        return ensemble_probs(torch.stack([t(x) for t in teachers]), method, shares, temperature)


def weighted_kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(p_teacher ‖ softmax(s/T))·T² per sample (``teacher_probs`` already at temperature T),
    averaged with optional per-sample weights."""
    per = kl_per_sample(teacher_probs, student_logits / temperature) * temperature**2
    if weights is None:
        return per.mean()
    return (weights * per).sum() / weights.sum().clamp_min(1e-12)


@dataclass
class StudentResult:
    metrics: dict[str, list[float]] = field(default_factory=dict)
    di_metrics: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    synthesis_seconds: float = 0.0
    synthesized_images: int = 0


METRIC_KEYS = ("loss", "train_acc", "val_acc", "test_acc", "pool_size", "synthesis_s", "elapsed_s")


@dataclass
class _Loop:
    """What the distillation loop carries from step to step (and into a checkpoint): the
    student and its optimiser and schedule, the frozen teachers, the loop's generators."""

    student: nn.Module
    teachers: list[nn.Module]
    cfg: StudentConfig
    normalizer: Normalizer
    hflip: bool
    device: torch.device
    fmt: torch.memory_format
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator  # pool draws, augmentation, real-data draws
    fresh_gen: torch.Generator  # latent codes of the fresh samples: a stream of their own
    cw: torch.Tensor | None  # per-class loss weights
    shares: torch.Tensor | None
    real: tuple[torch.Tensor, torch.Tensor] | None  # the server's own real data, if any
    # the synthesizer's own rule for the soft labels (Synthesizer.student_probs)
    combine: Callable[[torch.Tensor, float], torch.Tensor | None] | None = None
    # student.targets=cached: the pool's soft labels, computed once (train/targets.py)
    cache: PoolTargets | None = None
    # student.targets=sampled: k teachers per step (train/targets.py)
    sampler: TeacherSampler | None = None

    def probs(self, x: torch.Tensor, temperature: float, sampled: bool = False) -> torch.Tensor:
        """The teachers' soft labels on ``x`` (with autograd: the perturbation needs it); with
        ``sampled`` and a sampler, from this step's draw of teachers only."""
        if sampled and self.sampler is not None and not self.sampler.exact:
            return self.sampler.label(self.teachers, x, temperature)
        logits = torch.stack([t(x) for t in self.teachers])
        own = self.combine(logits, temperature) if self.combine is not None else None
        if own is not None:
            return own
        return ensemble_probs(logits, self.cfg.ensemble, self.shares, temperature)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """Co-Boosting's hard-sample perturbation: a signed-gradient step of size
        ``perturb`` on the images along a random direction of the soft labels."""
        x = x.detach().requires_grad_(True)
        p = self.probs(x, self.cfg.temperature)
        u = (torch.rand(p.shape, generator=self.gen) * 2 - 1).to(p.device)
        (g,) = torch.autograd.grad((u * p).sum(), x)
        return (x + self.cfg.perturb * g.sign()).detach()

    def step(
        self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One student step on ``x``, with the teachers' soft labels ``targets`` if known
        (cached), else computed here; the images beyond ``len(y)`` (fresh generator samples)
        take the ensemble's top class as their label. Returns (loss, accuracy), on device."""
        cfg, student, cw = self.cfg, self.student, self.cw
        x, y = x.to(self.device, memory_format=self.fmt), y.to(self.device)
        if cfg.perturb > 0:
            x = self.perturb(x)
        student.train()
        s_logits = student(x)
        if targets is None and (cfg.loss == "kl" or len(y) < len(x)):
            t = cfg.temperature if cfg.loss == "kl" else 1.0
            with torch.no_grad():
                targets = self.probs(x, t, sampled=True)
        if len(y) < len(x):
            y = torch.cat([y, targets[len(y) :].argmax(1)])
        w = cw[y] if cw is not None else None
        if cfg.loss == "kl":
            loss = weighted_kd_loss(s_logits, targets, cfg.temperature, w)
        else:
            loss = _weighted_mean(F.cross_entropy(s_logits, y, reduction="none"), w)
        if self.real is not None:
            loss = loss + cfg.real_weight * self._real_loss()
        if not torch.isfinite(loss):
            raise FedDistillError(f"student loss became {loss.item()}; lower student.lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        self.opt.step()
        if cfg.pool_passes == 0:  # else the schedule steps once per epoch
            self.sched.step()
        return loss.detach(), (s_logits.detach().argmax(1) == y).float().mean()

    def _real_loss(self) -> torch.Tensor:
        """CE on a batch of the server's own real data, augmented."""
        assert self.real is not None
        real_x, real_y = self.real
        n = min(self.cfg.batch_size, len(real_y))
        idx = torch.randint(0, len(real_y), (n,), generator=self.gen).to(self.device)
        xr = self.normalizer(augment(real_x[idx], self.cfg.jitter, self.hflip, self.gen))
        yr = real_y[idx]
        ce_r = F.cross_entropy(self.student(xr), yr, reduction="none")
        return _weighted_mean(ce_r, self.cw[yr] if self.cw is not None else None)

    def roll_flip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised float images: pad-free jitter (roll) and flips, batch-wise. Returns the
        images and which were flipped (None without flips)."""
        j = self.cfg.jitter
        if j:
            dx, dy = torch.randint(-j, j + 1, (2,), generator=self.gen).tolist()
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        flip = None
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=self.gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return x, flip

    def state(self) -> dict[str, Any]:
        """The loop's part of a checkpoint."""
        return {
            "student": self.student.state_dict(),
            **optimizer_state(self.opt, self.sched),
            "generator": self.gen.get_state(),
            "fresh_generator": self.fresh_gen.get_state(),
            **({"teacher_draws": self.sampler.gen.get_state()} if self.sampler else {}),
            "rng": rng_state(self.device),
        }

    def load(self, ckpt: Mapping[str, Any]) -> None:
        self.student.load_state_dict(ckpt["student"])
        load_optimizer_state(ckpt, self.opt, self.sched)
        self.gen.set_state(ckpt["generator"])
        if "fresh_generator" in ckpt:  # absent from checkpoints of earlier versions
            self.fresh_gen.set_state(ckpt["fresh_generator"])
        if self.sampler is not None and "teacher_draws" in ckpt:
            self.sampler.gen.set_state(ckpt["teacher_draws"])
        set_rng_state(ckpt["rng"], self.device)


def _weighted_mean(losses: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return losses.mean() if w is None else (w * losses).sum() / w.sum().clamp_min(1e-12)


def _optimizer(
    student: nn.Module, cfg: StudentConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The student's optimiser and its schedule over every step of the run."""
    params = list(student.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # at least 1: a student that takes no step (e.g. only evaluated from student.init=fedavg)
    total_steps = max(1, cfg.epochs * (cfg.new_batches_per_epoch + cfg.steps_per_epoch))
    if cfg.pool_passes:  # pool passes grow with the pool: the schedule counts epochs
        total_steps = cfg.epochs
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def _class_weights(
    cfg: StudentConfig, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    if cfg.class_weights is None:
        return None
    if len(cfg.class_weights) != num_classes:
        raise FedDistillError(
            f"student.class_weights has {len(cfg.class_weights)} entries, the data has {num_classes} classes"
        )
    return torch.tensor(cfg.class_weights, dtype=torch.float32, device=device)


def distill(
    student: nn.Module,
    teachers: list[nn.Module],
    synthesizer: Synthesizer,
    pool: SyntheticPool,
    cfg: StudentConfig,
    *,
    normalizer: Normalizer,
    hflip: bool,
    device: torch.device | str,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    server_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_classes: int | None = None,
    shares: torch.Tensor | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 1,
    checkpoint_meta: Mapping[str, Any] | None = None,
) -> StudentResult:
    """Train ``student`` from the teachers on a pool that grows by fresh synthetic batches.

    With ``checkpoint_path``, every ``checkpoint_every`` epochs the loop state is written there
    (student, optimiser, schedule, the loop's generator, torch's global RNG, the synthesizer's
    state, the pool, the metrics so far); a later call with the same arguments continues from it
    and ends with the same student as an uninterrupted call. A checkpoint written for other
    settings (``checkpoint_meta``) is ignored. The caller deletes it once the result is saved.
    """
    cfg.validate()
    loop = _build_loop(student, teachers, cfg, normalizer, hflip, device, seed, shares, server_data)
    device = loop.device
    num_classes = num_classes or int(test[1].max()) + 1
    loop.cw = _class_weights(cfg, num_classes, device)
    res = StudentResult(metrics={k: [] for k in METRIC_KEYS})
    n_fresh = round(cfg.fresh * cfg.batch_size)
    if n_fresh and not synthesizer.can_sample:
        raise ConfigError(
            f"student.fresh={cfg.fresh} needs a synthesizer with a generator to sample from"
            f" ({type(synthesizer).__name__} has none); use synthesis=generator or student.fresh=0"
        )
    t_start = time.perf_counter()
    start = 0
    meta = {**(checkpoint_meta or {}), "distill": [cfg.epochs, int(seed), len(pool)]}
    if checkpoint_path is not None and checkpoint_every > 0:
        try:
            synthesizer.state_dict()
        except NotImplementedError as e:
            print(f"student: no checkpoints ({e})")
            checkpoint_path = None
    loop.combine = synthesizer.student_probs
    own = has_own_soft_labels(type(synthesizer))
    mode = resolve_targets(cfg.targets, cfg.mix, cfg.perturb, cfg.fresh, own)
    if mode == "cached" and cfg.loss == "kl":
        loop.cache = PoolTargets(lambda x: loop.probs(x, cfg.temperature), hflip)
    if mode == "sampled":
        n_t = len(loop.teachers)
        loop.sampler = TeacherSampler(n_t, cfg.target_teachers, cfg.ensemble, shares, seed + 104729)
    synthesizer.bind_pool(pool)
    ckpt = load_resumable(checkpoint_path, meta, "student")
    if ckpt is not None:
        start = _resume(ckpt, loop, synthesizer, pool, res, num_classes)
        t_start -= res.metrics["elapsed_s"][-1]  # elapsed time continues from the checkpoint
        print(
            f"student: resuming from epoch {start + 1}/{cfg.epochs} with {len(pool)} synthetic"
            f" images (checkpoint {checkpoint_path})"
        )
    if loop.cache is not None:  # the pool so far: generate-initial's batches or a checkpoint's
        loop.cache.sync(pool.images, loop.device)
    bar = progress_bar(range(start, cfg.epochs), desc="student", enabled=progress)
    for epoch in bar:
        row = _train_epoch(loop, synthesizer, pool, res, n_fresh)
        last = epoch + 1 == cfg.epochs
        nan = float("nan")
        if (epoch + 1) % cfg.eval_every == 0 or last:
            row["test_acc"] = evaluate(student, *test, normalizer, device)
            row["val_acc"] = evaluate(student, *val, normalizer, device) if val is not None else nan
        else:
            row["test_acc"] = row["val_acc"] = nan
        row["elapsed_s"] = time.perf_counter() - t_start
        for k, v in row.items():
            res.metrics[k].append(v)
        pool_size = int(row["pool_size"])
        bar.set_postfix(loss=f"{row['loss']:.3f}", test=f"{row['test_acc']:.3f}", pool=pool_size)
        if on_epoch is not None:
            on_epoch(epoch, row)
        due = checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0 and not last
        if checkpoint_path is not None and due:
            save_checkpoint(_checkpoint(meta, epoch, loop, synthesizer, pool, res), checkpoint_path)
    bar.close()
    return res


def _build_loop(
    student: nn.Module,
    teachers: list[nn.Module],
    cfg: StudentConfig,
    normalizer: Normalizer,
    hflip: bool,
    device: torch.device | str,
    seed: int,
    shares: torch.Tensor | None,
    server_data: tuple[torch.Tensor, torch.Tensor] | None,
) -> _Loop:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    # The layout evaluate() would switch it to anyway; from the start, so that a student
    # restored from a checkpoint computes with the very same kernels.
    fmt = preferred_format(device)
    student.to(device, memory_format=fmt)
    # The teachers' forward passes (soft labels for every step) cost more than the student's
    # step; in the same layout as the student they run ~2x faster on CPU.
    teachers = [t.to(device, memory_format=fmt).eval() for t in teachers]
    opt, sched = _optimizer(student, cfg)
    real = None
    if server_data is not None and len(server_data[1]):
        real = (server_data[0].to(device), server_data[1].to(device))
    return _Loop(
        student=student,
        teachers=teachers,
        cfg=cfg,
        normalizer=normalizer,
        hflip=hflip,
        device=device,
        fmt=fmt,
        opt=opt,
        sched=sched,
        gen=gen,
        fresh_gen=torch.Generator().manual_seed(seed + 7919),
        cw=None,
        shares=shares,
        real=real,
    )


def _train_epoch(
    loop: _Loop, synthesizer: Synthesizer, pool: SyntheticPool, res: StudentResult, n_fresh: int
) -> dict[str, float]:
    """One epoch's steps: on each new synthetic batch at once, then on pool batches (with
    ``n_fresh`` images sampled fresh from the synthesizer in each). Returns its metrics row."""
    cfg = loop.cfg
    losses, accs = [], []
    for _ in range(cfg.new_batches_per_epoch):
        t0 = time.perf_counter()
        batch = synthesizer.synthesize(loop.student if cfg.adaptive else None)
        res.synthesis_seconds += time.perf_counter() - t0
        res.synthesized_images += len(batch)
        record_batch_metrics(res.di_metrics, batch, loop.teachers, loop.student, loop.device)
        pool.append(batch)
        cache = loop.cache
        if cache is not None:
            cache.sync(pool.images, loop.device)
        if cfg.fresh_step:  # use the fresh batch at once
            loss, acc = loop.step(batch.images, batch.labels, cache.last() if cache else None)
            losses.append(loss)
            accs.append(acc)
    x_all, y_all = pool.tensors()
    for idx in _pool_batches(loop, len(y_all), n_fresh):
        xb, yb, flip = x_all[idx], y_all[idx], None
        if n_fresh:
            fresh = synthesizer.sample(n_fresh, loop.fresh_gen)
            xb = torch.cat([xb, fresh.to(xb.device, xb.dtype)])
        if cfg.augment:
            xb, flip = loop.roll_flip(xb)
        if cfg.mix != "none":
            xb = mix_batch(xb, cfg.mix, cfg.mix_prob, loop.gen)
        targets = loop.cache.lookup(idx, flip) if loop.cache is not None else None
        loss, acc = loop.step(xb, yb, targets)
        losses.append(loss)
        accs.append(acc)
    if cfg.pool_passes:
        loop.sched.step()
    return {
        "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
        "train_acc": float(torch.stack(accs).mean()) if accs else float("nan"),
        "pool_size": float(len(y_all)),
        "synthesis_s": res.synthesis_seconds,
    }


def mix_batch(x: torch.Tensor, mix: str, prob: float, gen: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) mixed with a shuffled copy of itself with probability ``prob``:
    ``cutmix`` pastes the same random box of each partner image (area fraction ~ U(0, 1),
    aspect as the image), ``mixup`` blends with one weight ~ U(0, 1). No labels are mixed: the
    teachers label the mixed images themselves. Draws from ``gen`` only."""
    draws = torch.rand(4, generator=gen).tolist()
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if draws[0] >= prob:
        return x
    lam = draws[1]
    if mix == "mixup":
        return lam * x + (1 - lam) * x[perm]
    h, w = x.shape[-2:]
    bh, bw = round(h * math.sqrt(lam)), round(w * math.sqrt(lam))
    top, left = int(draws[2] * (h - bh + 1)), int(draws[3] * (w - bw + 1))
    out = x.clone()
    out[..., top : top + bh, left : left + bw] = x[perm][..., top : top + bh, left : left + bw]
    return out


def _pool_batches(loop: _Loop, n: int, n_fresh: int) -> Iterator[torch.Tensor]:
    """The pool indices of an epoch's pool steps: ``pool_passes`` shuffled passes, or
    ``steps_per_epoch`` random draws (drawn lazily, step by step, from the loop's generator)."""
    cfg = loop.cfg
    if cfg.pool_passes:
        for _ in range(cfg.pool_passes):
            yield from torch.randperm(n, generator=loop.gen).split(cfg.batch_size)
        return
    for _ in range(cfg.steps_per_epoch):
        yield torch.randint(0, n, (min(cfg.batch_size - n_fresh, n),), generator=loop.gen)


def _checkpoint(
    meta: dict[str, Any],
    epoch: int,
    loop: _Loop,
    synthesizer: Synthesizer,
    pool: SyntheticPool,
    res: StudentResult,
) -> dict[str, Any]:
    """Everything a later call needs to continue after ``epoch`` as if never stopped."""
    return {
        "meta": meta,
        "epoch": epoch,
        **loop.state(),
        "synthesizer": synthesizer.state_dict(),
        "pool": pool.state(),
        "metrics": res.metrics,
        "di_metrics": res.di_metrics,
        "synthesis_seconds": res.synthesis_seconds,
        "synthesized_images": res.synthesized_images,
    }


def _resume(
    ckpt: dict[str, Any],
    loop: _Loop,
    synthesizer: Synthesizer,
    pool: SyntheticPool,
    res: StudentResult,
    num_classes: int,
) -> int:
    """Restore what :func:`_checkpoint` saved; returns the epoch to continue at."""
    loop.load(ckpt)
    synthesizer.load_state_dict(ckpt["synthesizer"])
    shape = tuple(ckpt["pool"]["images"].shape[1:])
    pool.replace_with(SyntheticPool.from_state(ckpt["pool"], shape, num_classes))
    res.metrics, res.di_metrics = ckpt["metrics"], ckpt["di_metrics"]
    res.synthesis_seconds = ckpt["synthesis_seconds"]
    res.synthesized_images = ckpt["synthesized_images"]
    return ckpt["epoch"] + 1


def record_batch_metrics(
    store: dict[int, dict[str, list[float]]],
    batch: SyntheticBatch,
    teachers: list[nn.Module],
    student: nn.Module,
    device: torch.device,
) -> None:
    """For each teacher that produced ``batch``: its accuracy and the student's on the batch."""
    x, y = batch.images.to(device), batch.labels.to(device)
    with torch.inference_mode():
        was = student.training
        student.eval()
        s_acc = (student(x).argmax(1) == y).float().mean().item()
        student.train(was)
        for t in batch.teacher_ids:
            t_acc = (teachers[t](x).argmax(1) == y).float().mean().item()
            d = store.setdefault(t, {"teacher_acc": [], "student_acc": [], "seconds": []})
            d["teacher_acc"].append(t_acc)
            d["student_acc"].append(s_acc)
            d["seconds"].append(float(batch.stats.get("seconds", float("nan"))))
