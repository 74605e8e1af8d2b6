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
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import Synthesizer, SyntheticBatch
from fed_distill.synthesis.bn_hooks import BNFeatureHooks
from fed_distill.synthesis.config import SynthesisConfig
from fed_distill.synthesis.losses import (
    class_weighted_ce,
    competition_loss,
    l2_prior,
    masked_logits,
    total_variation,
)


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
    ) -> None:
        if not teachers:
            raise ConfigError("synthesis needs at least one teacher")
        cfg.validate(num_available=len(teachers))
        self.cfg = cfg
        self.device = torch.device(device)
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
        self.class_weights = teacher_class_weights(counts)  # also validates the counts
        if counts.shape[0] != len(teachers):
            raise ConfigError(
                f"class_counts has {counts.shape[0]} rows but there are {len(teachers)} teachers"
            )
        if len(image_shape) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(counts.shape[1])
        self.counts = counts
        self.owned = counts > 0  # (T, C) bool, CPU
        self.teachers = frozen_copies(teachers, self.device, need_bn=cfg.bn_scale > 0)
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
        counts = self.counts[ids].sum(dim=0)
        p = (counts > 0).double() if self.cfg.label_mode == "uniform" else counts
        return (p / p.sum()).float()

    def _make_optimizer(self, x: torch.Tensor) -> torch.optim.Optimizer:
        # A fresh Adam per batch: moment estimates must never leak from one batch to the next.
        b1, b2 = self.cfg.betas
        return torch.optim.Adam([x], lr=self.cfg.lr, betas=(float(b1), float(b2)))

    def _teacher_logits(self, t: int, x: torch.Tensor) -> torch.Tensor:
        logits = self.teachers[t](x)
        if self.cfg.class_mask:
            logits = masked_logits(logits, self._owned_dev[t])
        return logits

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

        restore = None
        if adaptive:
            assert student is not None
            # Student frozen for the duration (eval BN, no weight grads), restored afterwards.
            restore = (student.training, [p.requires_grad for p in student.parameters()])
            student.eval().requires_grad_(False)
        t0 = time.perf_counter()
        try:
            with ExitStack() as stack:
                hooks = {}
                if use_bn:
                    hooks = {
                        t: stack.enter_context(BNFeatureHooks(self.teachers[t])) for t in active
                    }
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
                                bns.append(hooks[t].loss(cfg.first_bn_multiplier))
                            if adaptive:
                                comps.append(competition_loss(logits, s_logits, cfg.temperature))
                        k = len(draws[i])
                        ce = torch.stack(ces).sum() / k
                        bn = torch.stack(bns).sum() / k if use_bn else zero
                        comp = torch.stack(comps).sum() / k if adaptive else zero
                    elif cfg.mode == "ensemble":
                        logits = torch.stack([self.teachers[t](xj) for t in active]).mean(dim=0)
                        if cfg.class_mask:
                            logits = masked_logits(logits, self._union_dev)
                        ce = self._ce(None, logits, y)
                        bn = (
                            torch.stack(
                                [hooks[t].loss(cfg.first_bn_multiplier) for t in active]
                            ).mean()
                            if use_bn
                            else zero
                        )
                        comp = (
                            competition_loss(logits, s_logits, cfg.temperature)
                            if adaptive
                            else zero
                        )
                    else:
                        logits = self._teacher_logits(t_cur, xj)  # type: ignore[arg-type]
                        ce = self._ce(t_cur, logits, y)
                        bn = hooks[t_cur].loss(cfg.first_bn_multiplier) if use_bn else zero
                        comp = (
                            competition_loss(logits, s_logits, cfg.temperature)
                            if adaptive
                            else zero
                        )

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
                    logits = torch.stack([self.teachers[t](best_x) for t in active]).mean(dim=0)
                    if cfg.class_mask:
                        logits = masked_logits(logits, self._owned_dev[active].any(dim=0))
                    acc = (logits.argmax(dim=1) == y).float().mean()
        finally:
            if restore is not None:
                assert student is not None
                student.train(restore[0])
                for p, rg in zip(student.parameters(), restore[1], strict=True):
                    p.requires_grad_(rg)

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
