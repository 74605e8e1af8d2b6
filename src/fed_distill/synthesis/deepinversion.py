"""DeepInversion and Adaptive DeepInversion, with multi-teacher cycling, ensemble and sampling.

The pixels of a random batch are optimised with Adam so that a frozen teacher (i) classifies
them as the drawn labels, (ii) sees BatchNorm input statistics that match its running
statistics, and (iii) finds them smooth (total variation) and small (l2). With a student given
(Adaptive DI) a competition term 1 − JS(teacher, student) also pushes the images towards where
the two disagree; the gradient flows to the pixels through the student, never into its weights.

Modes (``DeepInversionOptions.mode``):

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

import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.class_stats import class_weights
from fed_distill.synthesis.arch_groups import (
    ArchitectureGroupHooks,
    ArchitectureGroups,
    convert_teachers,
    grouped_bn_hooks,
)
from fed_distill.synthesis.base import SyntheticBatch, frozen_student
from fed_distill.synthesis.bn_hooks import BNFeatureHooks
from fed_distill.synthesis.diversity import (
    FeatureBank,
    FeatureCapture,
    head_module,
    uniformity_loss,
)
from fed_distill.synthesis.inputs import (
    TeacherSynthesizer,
    balanced_labels,
    has_bn,
    label_probs,
    pixel_targets,
    teacher_class_weights,
)
from fed_distill.synthesis.losses import (
    MASKED_LOGIT,
    class_weighted_ce,
    competition_loss,
    l2_prior,
    l2_prior_per_batch,
    masked_logits,
    total_variation,
    total_variation_per_batch,
)
from fed_distill.synthesis.options import DeepInversionOptions
from fed_distill.synthesis.pixels import pixel_term
from fed_distill.synthesis.registry import register_synthesizer
from fed_distill.synthesis.stacked import StackedBNHooks, StackedTeachers

# (step, x, jittered x) -> (loss: a scalar, or (T,) for a group; its terms ce, bn, tv, l2, comp)
StepLoss = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


@register_synthesizer("deepinversion", options=DeepInversionOptions)
class DeepInversion(TeacherSynthesizer):
    """(Adaptive) DeepInversion over one or several frozen teachers; see the module docstring.

    ``last_draws`` holds, after a sampling-mode ``synthesize()``, the teachers drawn at each
    step; ``last_loss_curve`` the total loss of every step of the latest batch.
    """

    def __init__(self, *inputs: Any, **options: Any) -> None:
        super().__init__(*inputs, **options)  # TeacherSynthesizer's arguments
        cfg, counts = self.cfg, self.counts
        # (K, D) pooled per-class pixel mean and variance (synthesis.pixel_scale), or None
        self.pixel_targets = pixel_targets(self.uploaded, cfg, self.image_shape, self.device)
        self.class_weights = teacher_class_weights(counts)
        self.owned = counts > 0  # (T, C) bool, CPU
        # a teacher without BN layers adds CE and competition terms only (no hooks)
        self.bn_teachers = {i for i, t in enumerate(self.teachers) if has_bn(t)}
        # synthesis.stacked: the teachers as converted networks (synthesis/stacked.py) whose
        # BatchNorm layers compute the BN-statistics term with one fused forward/backward;
        # with synthesis.grouped, where a step uses several teachers (ensemble, parallel
        # cycling) they run as ONE grouped network (``stacked``), else one each (``fast``).
        # Same math; a teacher that cannot be converted runs as it is (BN + BNFeatureHooks).
        self.stacked: StackedTeachers | ArchitectureGroups | None = None
        self.fast: list[StackedTeachers | None] = [None] * len(self.teachers)
        self.stacked_note = "off (synthesis.stacked=false)"
        if cfg.stacked:
            group = cfg.mode == "ensemble" or (cfg.mode == "cycling" and cfg.parallel)
            self.stacked, self.fast, self.stacked_note = convert_teachers(
                self.teachers, self.image_shape, self.device, cfg.grouped, group
            )
        # parallel cycling: batches made as one group, handed out one per call.
        self._queue: deque[tuple[SyntheticBatch, torch.Tensor]] = deque()
        self._queue_adaptive = False
        # Device copies of the per-teacher tables used inside the step loop.
        self._weights_dev = self.class_weights.to(self.device)
        self._owned_dev = self.owned.to(self.device)
        self._owned_f_dev = self._owned_dev.float()
        self._union_dev = self._owned_dev.any(dim=0)
        # synthesis.comp_known: the classes each teacher holds class_stats_min images of or more
        self._known_dev = (counts >= max(1, cfg.class_stats_min)).to(self.device)
        self._zero = torch.zeros((), device=self.device)  # an absent term
        self.low, self.high = self.normalizer.bounds(self.device)
        # successive calls continue self.generator's stream (different batches, reproducible)
        self._next_teacher = 0
        self.last_draws: list[list[int]] = []
        self.last_loss_curve: torch.Tensor | None = None
        # synthesis.div_scale (cycling): spread each batch's teacher features apart from each
        # other and from the teacher's last div_bank images (synthesis/diversity.py)
        self.bank = FeatureBank(len(self.teachers), cfg.div_bank) if cfg.div_scale > 0 else None
        self._capture: FeatureCapture | None = None

    # ------------------------------------------------------------------ resumable state

    def state_dict(self) -> dict[str, Any]:
        """The RNG stream and the cycling cursor: all that decides the next batches."""
        state = {"generator": self.generator.get_state(), "next_teacher": self._next_teacher}
        if self.bank is not None:
            state["feature_bank"] = self.bank.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self._next_teacher = int(state["next_teacher"]) % len(self.teachers)
        if self.bank is not None and "feature_bank" in state:
            self.bank.load_state_dict(state["feature_bank"])

    # ------------------------------------------------------------------ helpers

    def _label_probs(self, ids: list[int]) -> torch.Tensor:
        return label_probs(self.counts, self.cfg.label_mode, ids)

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
            w = len(self.teachers) * self.shares * w
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

    # ------------------------------------------------------------------ the step loop

    def _start(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, list | None, list | None]:
        """Random pixels of ``shape`` (clamped to valid values) and the jitter offsets and flips
        of every step: all randomness of the loop drawn up front, no per-step generator calls."""
        cfg, gen, iters = self.cfg, self.generator, self.cfg.iterations
        x0 = torch.randn(shape, generator=gen).to(self.device)
        x = torch.maximum(torch.minimum(x0, self.high), self.low).requires_grad_(True)
        j = cfg.jitter
        offsets = torch.randint(-j, j + 1, (iters, 2), generator=gen).tolist() if j else None
        flips = (torch.rand(iters, generator=gen) < 0.5).tolist() if self.flip else None
        return x, offsets, flips

    def _optimise(
        self, x: torch.Tensor, offsets: list | None, flips: list | None, step_loss: StepLoss
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Adam on the pixels ``x``, (N, C, H, W) for one batch or (T, N, C, H, W) for a group:
        step i jitters / flips them and asks ``step_loss(i, x, xj)`` for the loss (a scalar, or
        one per batch of a group) and its terms. The lowest-loss pixels are kept per batch,
        tracked with tensor ops (no host sync). Returns (best pixels, best loss, loss of every
        step, last loss, last terms)."""
        cfg, iters = self.cfg, self.cfg.iterations
        opt = self._make_optimizer(x)
        if cfg.lr_schedule == "cosine":
            lrs = [0.5 * cfg.lr * (1 + math.cos(math.pi * i / iters)) for i in range(iters)]
        else:
            lrs = None
        batches = x.shape[:-4]  # () for one batch, (T,) for a group
        curve = torch.empty(iters, *batches, device=self.device)
        best_loss = torch.full(batches, math.inf, device=self.device)
        best_x = x.detach().clone()
        for i in range(iters):
            if lrs is not None:
                opt.param_groups[0]["lr"] = lrs[i]
            xj = x
            if offsets is not None:
                dx, dy = offsets[i]
                if dx or dy:
                    xj = torch.roll(xj, shifts=(dx, dy), dims=(-2, -1))
            if flips is not None and flips[i]:
                xj = xj.flip(-1)
            loss, terms = step_loss(i, x, xj)
            opt.zero_grad(set_to_none=True)
            (loss.sum() if batches else loss).backward()  # a group's batch t only reaches loss t
            with torch.no_grad():
                # Keep the lowest-loss pixels (those the loss was computed on, i.e. before this
                # step) as a copy: torch.where allocates, never aliases x.
                ld = loss.detach()
                curve[i] = ld
                better = ld < best_loss
                best_loss = torch.where(better, ld, best_loss)
                best_x = torch.where(better.view(*batches, 1, 1, 1, 1), x.detach(), best_x)
            opt.step()
            with torch.no_grad():
                x.clamp_(min=self.low, max=self.high)  # stay valid pixel values
        return best_x, best_loss, curve, ld, terms

    def _stats(self, values: list[float], adaptive: bool, **timing: float) -> dict[str, float]:
        """A batch's stats from the numbers read back in one sync (last loss, first loss, best
        loss, teacher agreement, then the terms ce, bn, tv, l2, comp) and its timing."""
        names = ("loss", "loss_start", "best_loss", "teacher_acc")
        names += ("loss_ce", "loss_bn", "loss_tv", "loss_l2")
        stats = dict(zip(names, values[:8], strict=True))
        stats.update(iterations=float(self.cfg.iterations), **timing)
        if adaptive:
            stats["loss_comp"] = values[8]
        if len(values) > 9:
            stats["loss_div"] = values[9]
        return stats

    # ------------------------------------------------------------------ one batch

    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        """One batch; ``student`` (on this synthesizer's device) makes it adaptive. The
        student is put in eval mode with frozen weights for the call and restored after."""
        cfg = self.cfg
        n_teachers = len(self.teachers)
        if cfg.mode == "cycling" and cfg.parallel and self.stacked is not None:
            return self._next_from_group(student)
        if cfg.mode == "cycling":
            active = [self._next_teacher]
            self._next_teacher = (self._next_teacher + 1) % n_teachers
        else:
            active = list(range(n_teachers))

        gen, n, iters = self.generator, cfg.batch_size, cfg.iterations
        y = balanced_labels(self._label_probs(active), n, gen).to(self.device)
        x, offsets, flips = self._start((n, *self.image_shape))
        draws: list[list[int]] = []
        if cfg.mode == "sampling":
            k = cfg.num_teachers
            draws = [torch.randperm(n_teachers, generator=gen)[:k].tolist() for _ in range(iters)]
        self.last_draws = draws
        adaptive = student is not None and cfg.comp_scale > 0

        t0 = time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            stacked = self.stacked if cfg.mode == "ensemble" else None
            hooks: dict = {}
            if cfg.bn_scale > 0 and stacked is not None:
                # one hook set on the grouped net: a (T,) vector of per-teacher terms
                hooks = {-1: stack.enter_context(grouped_bn_hooks(stacked, self.class_targets))}
            elif cfg.bn_scale > 0:
                hooks = {
                    t: stack.enter_context(self._bn_hooks(t))
                    for t in active
                    if t in self.bn_teachers
                }
            self._set_classes(hooks, y)
            if self.bank is not None:
                self._capture = stack.enter_context(self._feature_capture(active[0]))
            step_loss = partial(
                self._step_loss, active, draws, y, hooks, student if adaptive else None
            )
            best_x, best_loss, curve, final_loss, terms = self._optimise(
                x, offsets, flips, step_loss
            )

            for h in hooks.values():
                h.enabled = False  # the final check needs no BN terms
            if self._capture is not None:
                self._remember(active[0], best_x, y)
            acc = self._agreement(best_x, y, active, stacked)
        self._capture = None

        # One host sync for everything the loop produced.
        rows = [final_loss, curve[0], best_loss, acc] + [v.detach().float() for v in terms]
        values = torch.stack(rows).tolist()
        seconds = time.perf_counter() - t0
        self.last_loss_curve = curve.detach().cpu()
        stats = self._stats(
            values, adaptive, seconds=seconds, images_per_s=n * iters / max(seconds, 1e-9)
        )
        teacher_ids = sorted({t for d in draws for t in d}) if draws else active
        return SyntheticBatch(
            images=best_x.detach().to("cpu", copy=True),
            labels=y.detach().to("cpu", copy=True),
            teacher_ids=list(teacher_ids),
            stats=stats,
        )

    def _agreement(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        active: list[int],
        stacked: StackedTeachers | ArchitectureGroups | None,
    ) -> torch.Tensor:
        """How often the producing teachers (their mean logits) agree with the labels on ``x``."""
        with torch.inference_mode():
            if stacked is not None:
                logits = stacked(x).mean(dim=0)
            else:
                logits = torch.stack([self.teachers[t](x) for t in active])
                logits = logits.mean(dim=0)
            if self.cfg.class_mask:
                logits = masked_logits(logits, self._owned_dev[active].any(dim=0))
            return (logits.argmax(dim=1) == y).float().mean()

    def _step_loss(
        self,
        active: list[int],
        draws: list[list[int]],
        y: torch.Tensor,
        hooks: dict,
        student: nn.Module | None,
        i: int,
        x: torch.Tensor,
        xj: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Step ``i``'s loss of one batch: the teachers' CE, BN and competition terms in the
        configured mode, the image priors on the un-jittered pixels ``x`` once."""
        cfg = self.cfg
        s_logits = student(xj) if student is not None else None
        if cfg.mode == "sampling":
            ce, bn, comp = self._sampling_terms(draws[i], xj, y, hooks, s_logits)
        elif cfg.mode == "ensemble":
            ce, bn, comp = self._ensemble_terms(active, xj, y, hooks, s_logits)
        else:
            t = active[0]
            logits = self._teacher_logits(t, xj)
            ce = self._ce(t, logits, y)
            bn = hooks[t].loss(cfg.first_bn_multiplier).reshape(()) if t in hooks else self._zero
            comp = self._comp(logits, s_logits, t)
        tv = total_variation(x)
        l2 = l2_prior(x)
        loss = ce + cfg.bn_scale * bn + cfg.var_scale * tv + cfg.l2_scale * l2
        if self.pixel_targets is not None:
            loss = loss + cfg.pixel_scale * pixel_term(x, y, *self.pixel_targets)
        if s_logits is not None:
            loss = loss + cfg.comp_scale * comp
        if self._capture is None or self.bank is None:
            return loss, [ce, bn, tv, l2, comp]
        assert self._capture.features is not None
        div = uniformity_loss(self._capture.features, y, self.bank.get(active[0]))
        return loss + cfg.div_scale * div, [ce, bn, tv, l2, comp, div]

    def _feature_capture(self, t: int) -> FeatureCapture:
        """Captures teacher ``t``'s features in the network :meth:`_forward` runs."""
        fast = self.fast[t]
        head = head_module(fast.net if fast is not None else self.teachers[t])
        if head is None:
            raise ValueError(f"synthesis.div_scale: teacher {t} has no final linear layer")
        return FeatureCapture(head)

    def _remember(self, t: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the features of teacher ``t`` on the finished batch ``x`` to its bank."""
        assert self._capture is not None and self.bank is not None
        with torch.no_grad():
            self._forward(t, x)
        assert self._capture.features is not None
        self.bank.add(t, self._capture.features, y)

    def _comp(
        self, logits: torch.Tensor, s_logits: torch.Tensor | None, t: int | None = None
    ) -> torch.Tensor:
        if s_logits is None:
            return self._zero
        if t is not None and self.cfg.comp_known:
            # teacher t's disagreement with the student among the classes it knows only
            known = self._known_dev[t]
            logits, s_logits = masked_logits(logits, known), masked_logits(s_logits, known)
        return competition_loss(logits, s_logits, self.cfg.temperature)

    def _sampling_terms(
        self, drawn: list[int], xj: torch.Tensor, y: torch.Tensor, hooks: dict, s_logits
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE, BN and competition terms averaged over the teachers drawn for this step."""
        ces, bns, comps = [], [], []
        for t in drawn:
            logits = self._teacher_logits(t, xj)
            ces.append(self._ce(t, logits, y))
            if t in hooks:
                bns.append(hooks[t].loss(self.cfg.first_bn_multiplier).reshape(()))
            if s_logits is not None:
                comps.append(competition_loss(logits, s_logits, self.cfg.temperature))
        k = len(drawn)
        ce = torch.stack(ces).sum() / k
        bn = torch.stack(bns).sum() / k if bns else self._zero
        comp = torch.stack(comps).sum() / k if s_logits is not None else self._zero
        return ce, bn, comp

    def _ensemble_terms(
        self, active: list[int], xj: torch.Tensor, y: torch.Tensor, hooks: dict, s_logits
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE and competition on the mean of all teachers' logits; BN term averaged."""
        cfg = self.cfg
        stacked = self.stacked
        if stacked is not None:
            logits = stacked(xj).mean(dim=0)  # one grouped forward
        else:
            logits = torch.stack([self._forward(t, xj) for t in active]).mean(dim=0)
        if cfg.class_mask:
            logits = masked_logits(logits, self._union_dev)
        ce = self._ce(None, logits, y)
        if not hooks:
            bn = self._zero
        elif stacked is not None:
            bn = hooks[-1].loss(cfg.first_bn_multiplier).mean()
        else:
            bn = torch.stack(
                [hooks[t].loss(cfg.first_bn_multiplier).reshape(()) for t in active if t in hooks]
            ).mean()
        return ce, bn, self._comp(logits, s_logits)

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
        n_t, gen, n = len(self.teachers), self.generator, cfg.batch_size
        y = torch.stack([balanced_labels(self._label_probs([t]), n, gen) for t in range(n_t)]).to(
            self.device
        )  # (T, N), teacher t's labels from its own classes
        x, offsets, flips = self._start((n_t, n, *self.image_shape))
        adaptive = student is not None and cfg.comp_scale > 0

        t0 = time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            hooks = None
            if cfg.bn_scale > 0:
                hooks = stack.enter_context(grouped_bn_hooks(stacked, self.class_targets))
                if self.class_targets is not None:
                    hooks.set_classes(y, class_weights(y, self.num_classes))
            step_loss = partial(self._group_loss, y, hooks, student if adaptive else None)
            best_x, best_loss, curve, ld, terms = self._optimise(x, offsets, flips, step_loss)
            if hooks is not None:
                hooks.enabled = False
            with torch.inference_mode():
                logits = stacked(best_x)
                if cfg.class_mask:
                    logits = logits.masked_fill(~self._owned_dev[:, None, :], MASKED_LOGIT)
                acc = (logits.argmax(dim=2) == y).float().mean(dim=1)

        # One host sync for the whole group.
        rows = torch.stack([ld, curve[0], best_loss, acc] + [v.detach().float() for v in terms])
        values = rows.t().tolist()  # values[t] = that batch's numbers
        seconds = time.perf_counter() - t0
        curves = curve.detach().cpu()
        images, labels = best_x.detach().cpu(), y.cpu()
        out = []
        for t in range(n_t):
            # the group's time, shared out: seconds per batch and images/s of the group
            timing = dict(
                seconds=seconds / n_t, images_per_s=n_t * n * cfg.iterations / max(seconds, 1e-9)
            )
            stats = self._stats(values[t], adaptive, **timing, group_size=float(n_t))
            batch = SyntheticBatch(
                images=images[t].clone(),  # its own storage, never a view of the group
                labels=labels[t].clone(),
                teacher_ids=[t],
                stats=stats,
            )
            out.append((batch, curves[:, t].clone()))
        return out

    def _group_loss(
        self,
        y: torch.Tensor,
        hooks: StackedBNHooks | ArchitectureGroupHooks | None,
        student: nn.Module | None,
        _i: int,
        x: torch.Tensor,
        xj: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step's (T,) losses of a group, batch t's from teacher t alone."""
        cfg, stacked = self.cfg, self.stacked
        assert stacked is not None
        n_t, n = y.shape
        logits = stacked(xj)  # (T, N, K), one grouped forward
        if cfg.class_mask:
            logits = logits.masked_fill(~self._owned_dev[:, None, :], MASKED_LOGIT)
        k = logits.shape[-1]
        ce_el = F.cross_entropy(logits.reshape(-1, k), y.reshape(-1), reduction="none")
        ce_el = ce_el.view(n_t, n)
        if cfg.class_weighted_ce:
            w = self._weights_dev.gather(1, y)  # (T, N): w[t][y_tn]
            ce = (w * ce_el).sum(dim=1) / w.sum(dim=1).clamp_min(1e-12)
        else:
            ce = ce_el.mean(1)
        zero = torch.zeros(n_t, device=self.device)
        bn = hooks.loss(cfg.first_bn_multiplier) if hooks is not None else zero
        tv = total_variation_per_batch(x)
        l2 = l2_prior_per_batch(x)
        per_batch = ce + cfg.bn_scale * bn + cfg.var_scale * tv + cfg.l2_scale * l2
        if self.pixel_targets is not None:
            per_batch = per_batch + cfg.pixel_scale * pixel_term(x, y, *self.pixel_targets)
        comp = zero
        if student is not None:
            # The student in eval mode treats every image on its own, so one forward over the
            # T·N images is T separate ones.
            s_logits = student(xj.reshape(n_t * n, *xj.shape[2:])).view(n_t, n, -1)
            comp = torch.stack([self._comp(logits[t], s_logits[t], t) for t in range(n_t)])
            per_batch = per_batch + cfg.comp_scale * comp
        return per_batch, [ce, bn, tv, l2, comp]
