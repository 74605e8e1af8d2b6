"""Generator-based synthesis: a small generator network is trained against the teachers instead
of optimising every pixel of every batch.

Two methods share the network and the loss:

- ``generator`` (DENSE, Zhang et al., NeurIPS 2022): one persistent generator. Every
  ``synthesize()`` draws fresh latent codes and labels and takes ``iterations`` Adam steps on the
  generator and the codes; the batch with the lowest loss is returned. Because the generator keeps
  learning from batch to batch, later batches cost few steps.
- ``fast`` (Fast data-free KD, Fang et al., AAAI 2022): a meta-generator. Every batch starts from
  a copy of it that is adapted for only ``iterations`` steps; the meta-generator then moves
  towards what worked (first-order MAML: the gradient of the first adaptation step; or Reptile:
  the difference between copy and meta-generator). BN statistics are matched against a momentum
  average over batches (``bn_momentum``), so one batch need not match them alone.

Loss on the (jittered/flipped) generated images x with labels y, teachers t = 1..T:

    oh_scale · CE(ensemble(x), y) + bn_scale · mean_t BN_t(x) + adv_scale · adv
    adv = −mean_i [ mask_i · KL(ensemble(x_i) ‖ student(x_i)) ],
    mask_i = 1 where the student's top class equals the ensemble's (DENSE's adversarial term:
    push the generator towards samples the student still gets right but does not yet match)

``ensemble`` combines the teachers' softmax outputs (``weighted`` by class shares by default, see
:func:`fed_distill.ensemble.ensemble_probs`). With ``target=cycling`` each batch uses
one teacher instead, round-robin: its softmax replaces the ensemble in the CE and adversarial
terms, the BN term is its own, and the labels are drawn from the classes it owns. The
adversarial term needs the current student (``synthesize(student)``); without one it is off.
The generator's output is a sigmoid in [0, 1] that is then normalised, so every image is a
valid picture.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.class_stats import class_weights
from fed_distill.ensemble import ensemble_probs
from fed_distill.synthesis.arch_groups import (
    ArchitectureGroups,
    convert_teachers,
    grouped_bn_hooks,
)
from fed_distill.synthesis.base import SyntheticBatch, frozen_student
from fed_distill.synthesis.bn_hooks import BNFeatureHooks
from fed_distill.synthesis.inputs import (
    TeacherSynthesizer,
    balanced_labels,
    has_bn,
    label_probs,
)
from fed_distill.synthesis.losses import kl_per_sample
from fed_distill.synthesis.options import FastOptions, GeneratorOptions
from fed_distill.synthesis.registry import register_synthesizer
from fed_distill.synthesis.stacked import StackedBNHooks, StackedTeachers


class ImageGenerator(nn.Module):
    """z (N, nz) → images (N, C, H, W) in [0, 1].

    fc → (2·ngf, H/4, W/4) → BN → [×2 up, conv 3×3, BN, LeakyReLU] at H/2 (2·ngf channels) and at
    H (ngf channels) → conv 3×3 to C channels → sigmoid. Sizes not divisible by 4 are reached by
    a final bilinear resize.
    """

    def __init__(self, nz: int, image_shape: tuple[int, int, int], ngf: int = 16) -> None:
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        self.init_hw = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        self.fc = nn.Linear(nz, 2 * ngf * self.init_hw[0] * self.init_hw[1])
        self.ngf = ngf
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, c, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], 2 * self.ngf, *self.init_hw)
        x = self.body(x)
        if tuple(x.shape[2:]) != self.image_shape[1:]:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def adversarial_loss(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, agree: bool = True
) -> torch.Tensor:
    """DENSE's adversarial term: −mean over the batch of KL(teacher ‖ student) on the samples
    where the student's top class agrees with the teacher's (``agree=False``: differs, as
    DENSE's public code has it), 0 for the others. Minimising it drives a generator towards
    samples the student has not yet learnt to match."""
    same = student_logits.argmax(dim=1) == teacher_probs.argmax(dim=1)
    mask = (same if agree else ~same).float()
    return -(kl_per_sample(teacher_probs, student_logits) * mask).mean()


@register_synthesizer("generator", options=GeneratorOptions)
@register_synthesizer("fast", options=FastOptions, meta=True)
class GeneratorSynthesizer(TeacherSynthesizer):
    """``synthesis=generator`` (DENSE) or ``fast`` (Fast data-free KD, ``meta=True``);
    see the module docstring."""

    def __init__(self, *inputs: Any, meta: bool = False, **options: Any) -> None:
        super().__init__(*inputs, **options)  # TeacherSynthesizer's arguments
        cfg, seed, self.meta = self.cfg, self.seed, meta
        self.has_bn = [has_bn(t) for t in self.teachers]  # without: CE and adversarial only
        # Speed (same math): every step runs all teachers on the same images, so with
        # `synthesis.stacked` they run as one grouped network (auto: >1 thread or CUDA) or each
        # as a converted network with fused BN statistics (see synthesis/stacked.py). The
        # momentum-tracked statistics of `fast` need the plain hooks.
        self.grouped: StackedTeachers | ArchitectureGroups | None = None
        self.fused: list[StackedTeachers | None] = [None] * len(self.teachers)
        if cfg.stacked and not (meta and cfg.bn_momentum > 0):
            group = cfg.target == "ensemble"
            self.grouped, self.fused, _ = convert_teachers(
                self.teachers, self.image_shape, self.device, cfg.grouped, group
            )
        # The network's initial weights come from the same seed, not from the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.net = ImageGenerator(cfg.nz, self.image_shape, cfg.ngf).to(self.device)
        betas = (0.5, 0.999)
        if meta:
            # Fast data-free KD scales the meta step by the number of inner steps.
            self.meta_opt = torch.optim.Adam(
                self.net.parameters(), lr=cfg.lr * cfg.iterations, betas=betas
            )
        self.tracked: list[list[tuple[torch.Tensor, torch.Tensor] | None] | None] = [None] * len(
            self.teachers
        )
        self.batches = 0
        self.can_sample = not meta

    def _logits(self, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """(len(ids), N, K) logits of the teachers ``ids`` on ``x``."""
        if self.grouped is not None:  # only built when every batch uses all teachers
            return self.grouped(x)
        return torch.stack(
            [self.teachers[i](x) if self.fused[i] is None else self.fused[i](x)[0] for i in ids]
        )

    def _enter_hooks(
        self, stack: ExitStack, momentum: float, ids: list[int], y: torch.Tensor
    ) -> list:
        """BN-statistics hooks on the teachers ``ids`` (on the converted networks where there
        are); with class statistics, per class for the labels ``y``: each class weighted by its
        share of the batch, and with several teachers teacher t's class k also by t's share of
        class k's data (×T, so that the mean over teachers is the share-weighted sum)."""
        ct = self.class_targets
        with_bn = [(j, i) for j, i in enumerate(ids) if self.has_bn[i]]  # (position, teacher)
        if self.grouped is not None:
            hooks = [stack.enter_context(grouped_bn_hooks(self.grouped, ct))]
        else:
            hooks = [
                stack.enter_context(
                    StackedBNHooks(self.fused[i], None if ct is None else [ct[i]])
                    if self.fused[i] is not None
                    else BNFeatureHooks(
                        self.teachers[i], momentum, self.tracked[i], None if ct is None else ct[i]
                    )
                )
                for _, i in with_bn
            ]
        if ct is not None:
            w = class_weights(y, self.num_classes)
            if len(ids) > 1:
                w = len(ids) * self.shares[ids] * w
            if self.grouped is not None:
                hooks[0].set_classes(y, w)
            else:
                for (j, _), h in zip(with_bn, hooks, strict=True):
                    h.set_classes(y, w if w.dim() == 1 else w[j])
        return hooks

    def _target(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities the CE and adversarial terms aim at: the ensemble of all teachers,
        or the softmax of the batch's one teacher (``target=cycling``)."""
        if self.cfg.target == "cycling":
            return F.softmax(logits[0], dim=1)
        return ensemble_probs(logits, self.cfg.ensemble, self.shares)

    def _augment(self, x: torch.Tensor, offset: list[int] | None, flip: bool) -> torch.Tensor:
        if offset is not None and (offset[0] or offset[1]):
            x = torch.roll(x, shifts=(offset[0], offset[1]), dims=(2, 3))
        return x.flip(3) if flip else x

    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        cfg, dev, gen = self.cfg, self.device, self.generator
        n, iters = cfg.batch_size, cfg.iterations
        if cfg.target == "cycling":
            # one teacher per batch, round-robin; labels from the classes it owns
            ids = [self.batches % len(self.teachers)]
        else:
            ids = list(range(len(self.teachers)))
        y = balanced_labels(label_probs(self.counts, cfg.label_mode, ids), n, gen).to(dev)
        z = torch.randn((n, cfg.nz), generator=gen).to(dev).requires_grad_(True)
        j = cfg.jitter
        offsets = torch.randint(-j, j + 1, (iters, 2), generator=gen).tolist() if j else None
        flips = (torch.rand(iters, generator=gen) < 0.5).tolist() if self.flip else [False] * iters

        net = copy.deepcopy(self.net) if self.meta else self.net
        net.train()  # the generator's own BN normalises with batch statistics
        opt = torch.optim.Adam(
            [{"params": net.parameters()}, {"params": [z], "lr": cfg.lr_z}],
            lr=cfg.lr,
            betas=(0.5, 0.999),
        )
        adaptive = student is not None and cfg.adv_scale > 0
        momentum = cfg.bn_momentum if self.meta else 0.0
        zero = torch.zeros((), device=dev)
        best_loss = torch.full((), math.inf, device=dev)
        best_x = None
        t0 = time.perf_counter()
        with frozen_student(student if adaptive else None), ExitStack() as stack:
            hooks = self._enter_hooks(stack, momentum, ids, y) if cfg.bn_scale > 0 else []
            for i in range(iters):
                x = self.normalizer(net(z))
                xa = self._augment(x, offsets[i] if offsets else None, flips[i])
                probs = self._target(self._logits(xa, ids))
                ce = F.nll_loss(probs.clamp_min(1e-8).log(), y)
                bn = (
                    torch.cat([h.loss(cfg.first_bn_multiplier).reshape(-1) for h in hooks]).mean()
                    if hooks
                    else zero
                )
                adv = adversarial_loss(probs, student(xa)) if adaptive else zero  # type: ignore[misc]
                loss = cfg.oh_scale * ce + cfg.bn_scale * bn + cfg.adv_scale * adv
                with torch.no_grad():
                    ld = loss.detach()
                    better = ld < best_loss
                    best_loss = torch.where(better, ld, best_loss)
                    best_x = (
                        x.detach() if best_x is None else torch.where(better, x.detach(), best_x)
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.meta and i == 0 and cfg.meta_update == "maml":
                    # First-order MAML: the meta-gradient is the copy's first-step gradient.
                    for p, q in zip(self.net.parameters(), net.parameters(), strict=True):
                        p.grad = None if q.grad is None else q.grad.detach().clone()
                opt.step()
            if momentum > 0 and hooks:
                for i, h in zip([i for i in ids if self.has_bn[i]], hooks, strict=True):
                    self.tracked[i] = h.update_momentum()  # type: ignore[union-attr]
            terms = {"ce": ce.detach(), "bn": bn.detach(), "adv": adv.detach()}
            for h in hooks:
                h.enabled = False
            with torch.inference_mode():
                assert best_x is not None
                probs = self._target(self._logits(best_x, ids))
                acc = (probs.argmax(dim=1) == y).float().mean()
        if self.meta:
            if cfg.meta_update == "reptile":
                for p, q in zip(self.net.parameters(), net.parameters(), strict=True):
                    p.grad = (p.detach() - q.detach()).clone()
            self.meta_opt.step()
            self.meta_opt.zero_grad(set_to_none=True)
        self.batches += 1
        values = torch.stack([ld, best_loss, acc, terms["ce"], terms["bn"], terms["adv"]]).tolist()
        seconds = time.perf_counter() - t0
        stats = {
            "loss": values[0],
            "best_loss": values[1],
            "teacher_acc": values[2],
            "loss_ce": values[3],
            "loss_bn": values[4],
            "iterations": float(iters),
            "seconds": seconds,
            "images_per_s": n * iters / max(seconds, 1e-9),
        }
        if adaptive:
            stats["loss_adv"] = values[5]
        return SyntheticBatch(
            images=best_x.to("cpu", copy=True),
            labels=y.detach().to("cpu", copy=True),
            teacher_ids=ids,
            stats=stats,
        )

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """``n`` images from the current generator and fresh latent codes drawn with ``gen``,
        normalised, without gradients. The generator's BN layers normalise with the batch's own
        statistics, as when the pool's batches were made, and leave their running statistics
        as they were. ``fast``: its meta-generator is only a starting point for adaptation, so
        there is nothing to sample (None)."""
        if self.meta:
            return None
        z = torch.randn((n, self.cfg.nz), generator=gen).to(self.device)
        bns = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [m.momentum for m in bns]
        self.net.train()
        try:
            for m in bns:
                m.momentum = 0.0  # batch statistics, running statistics untouched
            with torch.no_grad():
                return self.normalizer(self.net(z))
        finally:
            for m, mom in zip(bns, saved, strict=True):
                m.momentum = mom

    def state_dict(self) -> dict[str, Any]:
        """RNG stream, the (meta-)generator and its optimiser, the tracked BN statistics: all
        that decides the next batches (for checkpoints)."""
        state: dict[str, Any] = {
            "rng": self.generator.get_state(),
            "net": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "batches": self.batches,
            "tracked": [
                None if tr is None else [None if t is None else [v.cpu() for v in t] for t in tr]
                for tr in self.tracked
            ],
        }
        if self.meta:
            state["meta_opt"] = self.meta_opt.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.net.load_state_dict({k: v.to(self.device) for k, v in state["net"].items()})
        self.batches = int(state["batches"])
        self.tracked = [
            None
            if tr is None
            else [None if t is None else tuple(v.to(self.device) for v in t) for t in tr]
            for tr in state["tracked"]
        ]
        if self.meta:
            self.meta_opt.load_state_dict(state["meta_opt"])
