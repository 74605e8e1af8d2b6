"""DeepInversion and Adaptive DeepInversion, with multi-teacher cycling, ensemble and sampling.

The pixels of a random batch are optimised with Adam so that a frozen teacher (i) classifies
them as the drawn labels, (ii) sees BatchNorm input statistics that match its running
statistics, and (iii) finds them smooth (total variation) and small (l2). With a student given
(Adaptive DI) a competition term 1 − JS(teacher, student) also pushes the images towards where
the two disagree; the gradient flows to the pixels through the student, never into its weights.

Modes (``SynthesisConfig.mode``):

- ``cycling``: one teacher per ``synthesize()`` call, round-robin; labels from its own classes.
- ``ensemble``: CE and JS on the mean of all teachers' logits; BN term averaged over teachers.
- ``sampling``: Sampling DeepInversion (Algorithm 1 of the seed report). At every gradient step
  ``num_teachers`` distinct teachers are drawn without replacement; their losses (CE with
  per-class weights w[t][l] = share of label l in teacher t's data, BN term, competition with
  the student) are averaged, and the image priors are added once. Unlike the seed's sampling
  scripts, the competition term is kept.

With ``class_mask`` a teacher's logits outside the classes it owns are masked before both the
CE and the competition term (its scores there carry no knowledge).

Cost per step is one forward+backward of each teacher used (and of the student) with respect to
the input only; the step loop avoids host syncs (the best batch is tracked with tensor ops and
everything is read back once at the end).

Speed keys (same math; tested against the plain path):

- ``stacked`` (default on): the teachers run as converted copies (``synthesis/stacked.py``)
  whose BatchNorm layers compute the BN-statistics term with one hand-written forward/backward
  instead of BN + a hook + autograd through both; ``false`` is the plain path of before.
- ``grouped`` (default auto: on with CUDA or more than one CPU thread): in ``ensemble`` mode
  all teachers run as ONE grouped network, one forward/backward per step (falls back to one
  after another when they differ in architecture or the grouped outputs do not match).
- ``parallel`` (cycling, default off): one batch per teacher at once, T independent problems
  in one grouped forward, handed out one per ``synthesize()`` call in round-robin order. All
  batches of a group see the student as it was when the group was made.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.class_stats import ClassTargets, class_targets, class_weights
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import Synthesizer, SyntheticBatch, frozen_student
from fed_distill.synthesis.bn_hooks import BNFeatureHooks
from fed_distill.synthesis.config import SynthesisConfig
from fed_distill.synthesis.losses import (
    MASKED_LOGIT,
    class_weighted_ce,
    competition_loss,
    l2_prior,
    masked_logits,
    total_variation,
)
from fed_distill.synthesis.registry import register_synthesizer
from fed_distill.synthesis.stacked import StackedBNHooks, StackedTeachers, try_stack, use_grouped

log = logging.getLogger(__name__)


def total_variation_per_batch(x: torch.Tensor) -> torch.Tensor:
    """:func:`total_variation` of each batch of (T, N, C, H, W) ``x`` → (T,): the norms are
    taken over each batch separately, as T separate syntheses would."""
    diffs = (
        x[..., :, :-1] - x[..., :, 1:],
        x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:],
        x[..., :-1, :-1] - x[..., 1:, 1:],
    )
    dims = tuple(range(1, x.dim()))
    out = torch.linalg.vector_norm(diffs[0], dim=dims)
    for d in diffs[1:]:
        out = out + torch.linalg.vector_norm(d, dim=dims)
    return out


def l2_prior_per_batch(x: torch.Tensor) -> torch.Tensor:
    """:func:`l2_prior` of each batch of (T, N, C, H, W) ``x`` → (T,)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def teacher_class_weights(class_counts: np.ndarray | torch.Tensor) -> torch.Tensor:
    """w[t][l] = share of label l in teacher t's training data; rows sum to 1 (float32, CPU)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if counts.ndim != 2:
        raise ConfigError(
            f"class_counts must be (num_teachers, num_classes), got {tuple(counts.shape)}"
        )
    if (counts < 0).any():
        raise ConfigError("class_counts must be non-negative")
    totals = counts.sum(dim=1, keepdim=True)
    if (totals <= 0).any():
        empty = [i for i, v in enumerate(totals.flatten().tolist()) if v <= 0]
        raise ConfigError(f"teacher(s) {empty} have no training data (all class counts are 0)")
    return (counts / totals).float()


def synthesis_inputs(
    teachers: list[nn.Module], class_counts: np.ndarray, image_shape: tuple[int, ...]
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The checks every synthesizer makes on its inputs: at least one teacher, class counts
    (T, C) non-negative with one non-empty row per teacher, an image shape (C, H, W). Returns
    the counts as float64 and the shape as ints; raises ConfigError (one line) otherwise."""
    if not teachers:
        raise ConfigError("synthesis needs at least one teacher")
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    teacher_class_weights(counts)  # 2-D, non-negative, no empty teacher
    if counts.shape[0] != len(teachers):
        raise ConfigError(
            f"class_counts has {counts.shape[0]} rows but there are {len(teachers)} teachers"
        )
    if len(image_shape) != 3:
        raise ConfigError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    c, h, w = (int(v) for v in image_shape)
    return counts, (c, h, w)


def label_probs(counts: torch.Tensor, label_mode: str) -> torch.Tensor:
    """Label distribution for teachers with these (T, C) class counts: ``uniform`` over the
    classes any of them owns, or ``weighted`` by their summed counts."""
    total = counts.sum(dim=0)
    p = (total > 0).double() if label_mode == "uniform" else total
    return (p / p.sum()).float()


def balanced_labels(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels following ``probs`` with the least sampling noise: each class gets
    floor(p·n) labels, the remainder goes to distinct classes drawn by the leftover mass; then
    shuffled. (A multinomial draw would leave classes under-represented in small batches.)"""
    base = torch.floor(probs * n).long()
    labels = torch.repeat_interleave(torch.arange(probs.numel()), base)
    rest = n - int(base.sum())
    if rest > 0:
        resid = (probs * n - base).clamp_min(0)
        extra = torch.multinomial(resid / resid.sum(), rest, replacement=False, generator=generator)
        labels = torch.cat([labels, extra])
    return labels[torch.randperm(n, generator=generator)]


def frozen_copies(
    teachers: list[nn.Module], device: torch.device, need_bn: bool = False
) -> list[nn.Module]:
    """Private frozen copies of the teachers: the caller's modules keep their mode, grads and
    layout. On CPU the copies are channels_last, oneDNN's fast path for conv/pool (~1.2x per
    step). No weight gradient is ever computed through them, only gradients to the input."""
    fmt = torch.channels_last if device.type == "cpu" else torch.preserve_format
    out = []
    for teacher in teachers:
        t = copy.deepcopy(teacher).to(device, memory_format=fmt)
        t.eval().requires_grad_(False)
        if need_bn and not any(isinstance(m, nn.BatchNorm2d) for m in t.modules()):
            raise ConfigError(
                "synthesis.bn_scale > 0 needs teachers with BatchNorm2d layers; "
                "use a BN model or set synthesis.bn_scale=0"
            )
        out.append(t)
    return out


def teachers_class_targets(
    teachers: list[nn.Module],
    class_stats: list[dict[str, torch.Tensor] | None] | None,
    cfg: SynthesisConfig,
) -> list[ClassTargets] | None:
    """Per teacher, the class targets of the per-class BN (and feature) term
    (:func:`fed_distill.class_stats.class_targets`), or None: global statistics, when
    ``synthesis.class_stats`` is off, the BN term is off, or some teacher has no statistics."""
    if not cfg.class_stats or cfg.bn_scale <= 0 or not class_stats:
        return None
    if len(class_stats) != len(teachers) or any(s is None for s in class_stats):
        return None
    if cfg.feature_scale > 0 and any("feat.mean" not in s for s in class_stats):  # type: ignore[operator]
        print(
            f"note: synthesis.feature_scale={cfg.feature_scale} but the clients uploaded no feature"
            " statistics (train-teachers with upload.features=true); the feature term is off"
        )
    return [
        class_targets(t, s, cfg.class_stats_min, cfg.feature_scale)  # type: ignore[arg-type]
        for t, s in zip(teachers, class_stats, strict=True)
    ]


@register_synthesizer("deepinversion")
class DeepInversion(Synthesizer):
    """(Adaptive) DeepInversion over one or several frozen teachers; see the module docstring.

    ``last_draws`` holds, after a sampling-mode ``synthesize()``, the teachers drawn at each
    step; ``last_loss_curve`` the total loss of every step of the latest batch.
    """

    def __init__(
        self,
        cfg: SynthesisConfig,
        teachers: list[nn.Module],
        class_counts: np.ndarray,
        image_shape: tuple[int, int, int],
        normalizer: Normalizer,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        class_stats: list[dict[str, torch.Tensor] | None] | None = None,
    ) -> None:
        if not teachers:
            raise ConfigError("synthesis needs at least one teacher")
        cfg.validate(num_available=len(teachers))
        self.cfg = cfg
        self.device = torch.device(device)
        counts, self.image_shape = synthesis_inputs(teachers, class_counts, image_shape)
        self.class_weights = teacher_class_weights(counts)
        self.num_classes = int(counts.shape[1])
        self.counts = counts
        self.owned = counts > 0  # (T, C) bool, CPU
        self.teachers = frozen_copies(teachers, self.device, need_bn=cfg.bn_scale > 0)
        # per teacher, per BN layer: (K, C) class targets (None: the global BN statistics)
        self.class_targets = teachers_class_targets(self.teachers, class_stats, cfg)
        self._shares_dev = class_shares(counts).to(self.device)
        # synthesis.stacked: the teachers as converted networks (synthesis/stacked.py) whose
        # BatchNorm layers compute the BN-statistics term with one fused forward/backward;
        # with synthesis.grouped, where a step uses several teachers (ensemble, parallel
        # cycling) they run as ONE grouped network. Same math; a teacher that cannot be
        # converted runs as it is (plain BN + BNFeatureHooks).
        self.stacked: StackedTeachers | None = None  # the grouped network of all teachers
        self.fast: list[StackedTeachers | None] = [None] * len(self.teachers)  # one each
        self.stacked_note = "off (synthesis.stacked=false)"
        if cfg.stacked:
            fmt = torch.channels_last if self.device.type == "cpu" else torch.preserve_format
            notes = []
            group = cfg.mode == "ensemble" or (cfg.mode == "cycling" and cfg.parallel)
            if group and use_grouped(cfg.grouped, self.device) and len(self.teachers) > 1:
                self.stacked, why = try_stack(self.teachers, self.image_shape, fmt)
                notes.append("grouped" if self.stacked is not None else f"not grouped: {why}")
                if self.stacked is None:
                    log.info("teachers not grouped, run one after another (%s)", why)
            if self.stacked is None:
                for i, t in enumerate(self.teachers):
                    self.fast[i], why = try_stack([t], self.image_shape, fmt)
                    if self.fast[i] is None:
                        notes.append(f"teacher {i} as is: {why}")
            self.stacked_note = "; ".join(notes) or "fused BN statistics"
        # parallel cycling: batches made as one group, handed out one per call.
        self._queue: deque[tuple[SyntheticBatch, torch.Tensor]] = deque()
        self._queue_adaptive = False
        # Device copies of the per-teacher tables used inside the step loop.
        self._weights_dev = self.class_weights.to(self.device)
        self._owned_dev = self.owned.to(self.device)
        self._owned_f_dev = self._owned_dev.float()
        self._union_dev = self._owned_dev.any(dim=0)
        self.flip = bool(hflip) if cfg.flip is None else bool(cfg.flip)
        self.low, self.high = normalizer.bounds(self.device)
        # One CPU generator drives every random choice, so a seed gives the same batches on
        # any device; successive calls continue the stream (different batches, reproducible).
        self.generator = torch.Generator().manual_seed(int(seed))
        self._next_teacher = 0
        self.last_draws: list[list[int]] = []
        self.last_loss_curve: torch.Tensor | None = None

    # ------------------------------------------------------------------ resumable state

    def state_dict(self) -> dict[str, Any]:
        """The RNG stream and the cycling cursor: all that decides the next batches."""
        return {"generator": self.generator.get_state(), "next_teacher": self._next_teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._next_teacher = int(state["next_teacher"]) % len(self.teachers)

    # ------------------------------------------------------------------ helpers

    def _label_probs(self, ids: list[int]) -> torch.Tensor:
        return label_probs(self.counts[ids], self.cfg.label_mode)

    def _make_optimizer(self, x: torch.Tensor) -> torch.optim.Optimizer:
        # A fresh Adam per batch: moment estimates must never leak from one batch to the next.
        b1, b2 = self.cfg.betas
        return torch.optim.Adam([x], lr=self.cfg.lr, betas=(float(b1), float(b2)))

    def _teacher_logits(self, t: int, x: torch.Tensor) -> torch.Tensor:
        logits = self._forward(t, x)
        if self.cfg.class_mask:
            logits = masked_logits(logits, self._owned_dev[t])
        return logits

    def _forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Teacher ``t``'s logits, through its converted network where there is one."""
        fast = self.fast[t]
        return fast(x)[0] if fast is not None else self.teachers[t](x)

    def _bn_hooks(self, t: int) -> BNFeatureHooks | StackedBNHooks:
        fast = self.fast[t]
        targets = self.class_targets[t] if self.class_targets is not None else None
        if fast is not None:
            return StackedBNHooks(fast, None if targets is None else [targets])
        return BNFeatureHooks(self.teachers[t], class_targets=targets)

    def _set_classes(self, hooks: dict, y: torch.Tensor) -> None:
        """Per-class BN terms for this batch: each class weighted by its share of the batch; in
        ensemble mode teacher t's class k also by t's share of class k's data (×T, so that the
        mean over teachers is the share-weighted sum)."""
        if self.class_targets is None:
            return
        w = class_weights(y, self.num_classes)
        if self.cfg.mode == "ensemble":
            w = len(self.teachers) * self._shares_dev * w
        for t, h in hooks.items():
            h.set_classes(y, w if w.dim() == 1 or t == -1 else w[t])

    def _ce(self, t: int | None, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE of teacher ``t`` (None = ensemble), with per-class weights where configured."""
        cfg = self.cfg
        if t is not None and cfg.class_weighted_ce:
            return class_weighted_ce(logits, y, self._weights_dev[t])
        if t is not None and cfg.class_mask and cfg.mode == "sampling":
            # A drawn teacher is not asked about labels it never saw (its logit there is masked).
            return class_weighted_ce(logits, y, self._owned_f_dev[t])
        return F.cross_entropy(logits, y)

    # ------------------------------------------------------------------ main loop

    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        """One batch; ``student`` (on this synthesizer's device) makes it adaptive. The
        student is put in eval mode with frozen weights for the call and restored after."""
        cfg = self.cfg
        n_teachers = len(self.teachers)
        if cfg.mode == "cycling" and cfg.parallel and self.stacked is not None:
            return self._next_from_group(student)
        if cfg.mode == "cycling":
            t_cur = self._next_teacher
            self._next_teacher = (self._next_teacher + 1) % n_teachers
            active = [t_cur]
        else:
            t_cur = None
            active = list(range(n_teachers))

        gen, dev, iters = self.generator, self.device, cfg.iterations
        n = cfg.batch_size
        y = balanced_labels(self._label_probs(active), n, gen).to(dev)
        x0 = torch.randn((n, *self.image_shape), generator=gen).to(dev)
        x = torch.maximum(torch.minimum(x0, self.high), self.low).requires_grad_(True)
        opt = self._make_optimizer(x)

        # All randomness of the loop drawn up front: no per-step generator calls or syncs.
        j = cfg.jitter
        offsets = torch.randint(-j, j + 1, (iters, 2), generator=gen).tolist() if j else None
        flips = (torch.rand(iters, generator=gen) < 0.5).tolist() if self.flip else None
        draws: list[list[int]] = []
        if cfg.mode == "sampling":
            k = cfg.num_teachers
            draws = [torch.randperm(n_teachers, generator=gen)[:k].tolist() for _ in range(iters)]
        self.last_draws = draws
        if cfg.lr_schedule == "cosine":
            lrs = [0.5 * cfg.lr * (1 + math.cos(math.pi * i / iters)) for i in range(iters)]
        else:
            lrs = None

        adaptive = student is not None and cfg.comp_scale > 0
        use_bn = cfg.bn_scale > 0
        zero = torch.zeros((), device=dev)
        curve = torch.empty(iters, device=dev)
        best_loss = torch.full((), math.inf, device=dev)
        best_x = x.detach().clone()
        terms: dict[str, torch.Tensor] = {}

        t0 = time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            hooks: dict = {}
            stacked = self.stacked if cfg.mode == "ensemble" else None
            if use_bn and stacked is not None:
                # one hook set on the grouped net: a (T,) vector of per-teacher terms
                hooks = {-1: stack.enter_context(StackedBNHooks(stacked, self.class_targets))}
            elif use_bn:
                hooks = {t: stack.enter_context(self._bn_hooks(t)) for t in active}
            self._set_classes(hooks, y)
            for i in range(iters):
                if lrs is not None:
                    opt.param_groups[0]["lr"] = lrs[i]
                xj = x
                if offsets is not None:
                    dx, dy = offsets[i]
                    if dx or dy:
                        xj = torch.roll(xj, shifts=(dx, dy), dims=(2, 3))
                if flips is not None and flips[i]:
                    xj = xj.flip(3)
                s_logits = student(xj) if adaptive else None  # type: ignore[misc]

                if cfg.mode == "sampling":
                    ces, bns, comps = [], [], []
                    for t in draws[i]:
                        logits = self._teacher_logits(t, xj)
                        ces.append(self._ce(t, logits, y))
                        if use_bn:
                            bns.append(hooks[t].loss(cfg.first_bn_multiplier).reshape(()))
                        if adaptive:
                            comps.append(competition_loss(logits, s_logits, cfg.temperature))
                    k = len(draws[i])
                    ce = torch.stack(ces).sum() / k
                    bn = torch.stack(bns).sum() / k if use_bn else zero
                    comp = torch.stack(comps).sum() / k if adaptive else zero
                elif cfg.mode == "ensemble":
                    if stacked is not None:
                        logits = stacked(xj).mean(dim=0)  # one grouped forward
                    else:
                        logits = torch.stack([self._forward(t, xj) for t in active])
                        logits = logits.mean(dim=0)
                    if cfg.class_mask:
                        logits = masked_logits(logits, self._union_dev)
                    ce = self._ce(None, logits, y)
                    if not use_bn:
                        bn = zero
                    elif stacked is not None:
                        bn = hooks[-1].loss(cfg.first_bn_multiplier).mean()
                    else:
                        bn = torch.stack(
                            [hooks[t].loss(cfg.first_bn_multiplier).reshape(()) for t in active]
                        ).mean()
                    comp = competition_loss(logits, s_logits, cfg.temperature) if adaptive else zero
                else:
                    logits = self._teacher_logits(t_cur, xj)  # type: ignore[arg-type]
                    ce = self._ce(t_cur, logits, y)
                    bn = hooks[t_cur].loss(cfg.first_bn_multiplier).reshape(()) if use_bn else zero
                    comp = competition_loss(logits, s_logits, cfg.temperature) if adaptive else zero

                # Image priors on the un-jittered pixels, once per step.
                tv = total_variation(x)
                l2 = l2_prior(x)
                loss = ce + cfg.bn_scale * bn + cfg.var_scale * tv + cfg.l2_scale * l2
                if adaptive:
                    loss = loss + cfg.comp_scale * comp
                opt.zero_grad(set_to_none=True)
                loss.backward()

                with torch.no_grad():
                    # Keep the lowest-loss pixels (those the loss was computed on, i.e.
                    # before this step) as a copy: torch.where allocates, never aliases x.
                    ld = loss.detach()
                    curve[i] = ld
                    better = ld < best_loss
                    best_loss = torch.where(better, ld, best_loss)
                    best_x = torch.where(better, x.detach(), best_x)
                opt.step()
                with torch.no_grad():
                    x.clamp_(min=self.low, max=self.high)  # stay valid pixel values
            terms = {"ce": ce, "bn": bn, "tv": tv, "l2": l2, "comp": comp}
            final_loss = ld

            # Final check, no BN terms needed: how often do the producing teachers agree
            # with the labels on the kept batch?
            for h in hooks.values():
                h.enabled = False
            with torch.inference_mode():
                if stacked is not None:
                    logits = stacked(best_x).mean(dim=0)
                else:
                    logits = torch.stack([self.teachers[t](best_x) for t in active])
                    logits = logits.mean(dim=0)
                if cfg.class_mask:
                    logits = masked_logits(logits, self._owned_dev[active].any(dim=0))
                acc = (logits.argmax(dim=1) == y).float().mean()

        # One host sync for everything the loop produced.
        values = torch.stack(
            [final_loss, curve[0], best_loss, acc]
            + [terms[k].detach().float() for k in ("ce", "bn", "tv", "l2", "comp")]
        ).tolist()
        seconds = time.perf_counter() - t0
        self.last_loss_curve = curve.detach().cpu()
        stats = {
            "loss": values[0],
            "loss_start": values[1],
            "best_loss": values[2],
            "teacher_acc": values[3],
            "loss_ce": values[4],
            "loss_bn": values[5],
            "loss_tv": values[6],
            "loss_l2": values[7],
            "iterations": float(iters),
            "seconds": seconds,
            "images_per_s": n * iters / max(seconds, 1e-9),
        }
        if adaptive:
            stats["loss_comp"] = values[8]
        teacher_ids = sorted({t for d in draws for t in d}) if draws else active
        return SyntheticBatch(
            images=best_x.detach().to("cpu", copy=True),
            labels=y.detach().to("cpu", copy=True),
            teacher_ids=list(teacher_ids),
            stats=stats,
        )

    # ------------------------------------------------------------------ parallel cycling

    def _next_from_group(self, student: nn.Module | None) -> SyntheticBatch:
        """``synthesis.parallel``: hand out the next batch of the current group, making a new
        group (one batch per teacher, at once) when the queue is empty.

        A group's batches are all made against ``student`` as it is when the group is made.
        A queued batch is never handed to a call of the other kind (adaptive vs not): the rest
        of the group is dropped and a new one made, starting at the first dropped teacher, so
        the round-robin order is kept.
        """
        adaptive = student is not None and self.cfg.comp_scale > 0
        n_teachers = len(self.teachers)
        if self._queue and self._queue_adaptive != adaptive:
            self._next_teacher = self._queue[0][0].teacher_ids[0]
            self._queue.clear()
        if not self._queue:
            made = self._synthesize_group(student)
            order = [(self._next_teacher + i) % n_teachers for i in range(n_teachers)]
            self._queue.extend(made[t] for t in order)
            self._queue_adaptive = adaptive
        batch, curve = self._queue.popleft()
        self._next_teacher = (batch.teacher_ids[0] + 1) % n_teachers
        self.last_draws = []
        self.last_loss_curve = curve
        return batch

    def _synthesize_group(
        self, student: nn.Module | None
    ) -> list[tuple[SyntheticBatch, torch.Tensor]]:
        """T cycling batches at once, batch t from teacher t alone: T independent problems in
        one grouped forward. Each batch's loss is its own (CE, BN, competition on its teacher's
        logits; TV and l2 over that batch only) and the total is their sum, so every batch gets
        exactly the gradient it would get alone; Adam is elementwise, so one Adam over the
        (T, N, C, H, W) pixels is T separate Adams. Jitter/flip draws are shared by the group.
        The lowest-loss pixels are kept per batch."""
        cfg, stacked = self.cfg, self.stacked
        assert stacked is not None
        n_t = len(self.teachers)
        gen, dev, iters, n = self.generator, self.device, cfg.iterations, cfg.batch_size
        y = torch.stack([balanced_labels(self._label_probs([t]), n, gen) for t in range(n_t)]).to(
            dev
        )  # (T, N), teacher t's labels from its own classes
        x0 = torch.randn((n_t, n, *self.image_shape), generator=gen).to(dev)
        x = torch.maximum(torch.minimum(x0, self.high), self.low).requires_grad_(True)
        opt = self._make_optimizer(x)

        j = cfg.jitter
        offsets = torch.randint(-j, j + 1, (iters, 2), generator=gen).tolist() if j else None
        flips = (torch.rand(iters, generator=gen) < 0.5).tolist() if self.flip else None
        if cfg.lr_schedule == "cosine":
            lrs = [0.5 * cfg.lr * (1 + math.cos(math.pi * i / iters)) for i in range(iters)]
        else:
            lrs = None

        adaptive = student is not None and cfg.comp_scale > 0
        use_bn = cfg.bn_scale > 0
        zero = torch.zeros(n_t, device=dev)
        curve = torch.empty(iters, n_t, device=dev)
        best_loss = torch.full((n_t,), math.inf, device=dev)
        best_x = x.detach().clone()
        y_flat = y.reshape(-1)
        if cfg.class_weighted_ce:
            w = self._weights_dev.gather(1, y)  # (T, N): w[t][y_tn]
            w_sum = w.sum(dim=1).clamp_min(1e-12)
        not_owned = ~self._owned_dev[:, None, :]  # (T, 1, K)

        t0 = time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            hooks = None
            if use_bn:
                hooks = stack.enter_context(StackedBNHooks(stacked, self.class_targets))
                if self.class_targets is not None:
                    hooks.set_classes(y, class_weights(y, self.num_classes))
            for i in range(iters):
                if lrs is not None:
                    opt.param_groups[0]["lr"] = lrs[i]
                xj = x
                if offsets is not None:
                    dx, dy = offsets[i]
                    if dx or dy:
                        xj = torch.roll(xj, shifts=(dx, dy), dims=(3, 4))
                if flips is not None and flips[i]:
                    xj = xj.flip(4)
                logits = stacked(xj)  # (T, N, K), one grouped forward
                if cfg.class_mask:
                    logits = logits.masked_fill(not_owned, MASKED_LOGIT)
                k = logits.shape[-1]
                ce_el = F.cross_entropy(logits.reshape(-1, k), y_flat, reduction="none")
                ce_el = ce_el.view(n_t, n)
                ce = (w * ce_el).sum(dim=1) / w_sum if cfg.class_weighted_ce else ce_el.mean(1)
                bn = hooks.loss(cfg.first_bn_multiplier) if hooks is not None else zero
                tv = total_variation_per_batch(x)
                l2 = l2_prior_per_batch(x)
                per_batch = ce + cfg.bn_scale * bn + cfg.var_scale * tv + cfg.l2_scale * l2
                if adaptive:
                    # The student in eval mode treats every image on its own, so one
                    # forward over the T·N images is T separate ones.
                    s_logits = student(xj.reshape(n_t * n, *xj.shape[2:]))  # type: ignore[misc]
                    s_logits = s_logits.view(n_t, n, -1)
                    comp = torch.stack(
                        [
                            competition_loss(logits[t], s_logits[t], cfg.temperature)
                            for t in range(n_t)
                        ]
                    )
                    per_batch = per_batch + cfg.comp_scale * comp
                else:
                    comp = zero
                opt.zero_grad(set_to_none=True)
                per_batch.sum().backward()  # batch t's pixels only reach loss t

                with torch.no_grad():
                    ld = per_batch.detach()
                    curve[i] = ld
                    better = ld < best_loss
                    best_loss = torch.where(better, ld, best_loss)
                    best_x = torch.where(better.view(-1, 1, 1, 1, 1), x.detach(), best_x)
                opt.step()
                with torch.no_grad():
                    x.clamp_(min=self.low, max=self.high)
            terms = [ce, bn, tv, l2, comp]
            if hooks is not None:
                hooks.enabled = False
            with torch.inference_mode():
                logits = stacked(best_x)
                if cfg.class_mask:
                    logits = logits.masked_fill(not_owned, MASKED_LOGIT)
                acc = (logits.argmax(dim=2) == y).float().mean(dim=1)

        # One host sync for the whole group.
        rows = torch.stack([ld, curve[0], best_loss, acc] + [v.detach().float() for v in terms])
        values = rows.t().tolist()  # values[t] = that batch's numbers
        seconds = time.perf_counter() - t0
        curves = curve.detach().cpu()
        images, labels = best_x.detach().cpu(), y.cpu()
        out = []
        for t in range(n_t):
            v = values[t]
            stats = {
                "loss": v[0],
                "loss_start": v[1],
                "best_loss": v[2],
                "teacher_acc": v[3],
                "loss_ce": v[4],
                "loss_bn": v[5],
                "loss_tv": v[6],
                "loss_l2": v[7],
                "iterations": float(iters),
                # the group's time, shared out: seconds per batch and images/s of the group
                "seconds": seconds / n_t,
                "images_per_s": n_t * n * iters / max(seconds, 1e-9),
                "group_size": float(n_t),
            }
            if adaptive:
                stats["loss_comp"] = v[8]
            batch = SyntheticBatch(
                images=images[t].clone(),  # its own storage, never a view of the group
                labels=labels[t].clone(),
                teacher_ids=[t],
                stats=stats,
            )
            out.append((batch, curves[:, t].clone()))
        return out
