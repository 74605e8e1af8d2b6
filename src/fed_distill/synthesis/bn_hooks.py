"""BatchNorm-statistics hooks: DeepInversion's feature-distribution regulariser.

For the input ``x`` of every ``nn.BatchNorm2d`` of a teacher, the hook computes

    ‖mean(x) − running_mean‖₂ + ‖var(x) − running_var‖₂

with the per-channel batch mean and *biased* variance over (N, H, W), as the teacher would have
seen them on real data. :class:`BNFeatureHooks` is a context manager: the hooks are removed on
exit, even when the block raises, so a model is never left with stale hooks.

With per-class targets (``class_targets``, from the statistics a client uploads, see
:mod:`fed_distill.class_stats`) and the batch's labels (:meth:`BNFeatureHooks.set_classes`), the
term is Σ_k w_k (‖mean_k(x) − mean_k‖₂ + ‖var_k(x) − var_k‖₂): the images of class k are compared
with the statistics of class k, and w_k (e.g. the class's share of the batch) weights it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from fed_distill.class_stats import (
    ClassFeatureHook,
    ClassTargets,
    class_bn_term,
    class_mean_var,
    class_membership,
    feature_layer,
)


def batch_mean_var(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of (N, C, H, W) ``x`` over (N, H, W).

    Computed from Σx and Σx², reduced along the memory layout (the contiguous (H, W) axes
    first for NCHW, all three at once for channels_last): on CPU forward + backward is 2-3x
    faster than ``torch.var_mean(x, dim=(0, 2, 3))``, which dominated a synthesis step. The
    cancellation in E[x²] − E[x]² costs ~1e-6 relative on BN inputs, irrelevant for a loss
    term; the gradient is the exact one.
    """
    n = x.numel() // x.shape[1]
    if x.is_contiguous():
        mean = x.sum(dim=(2, 3)).sum(dim=0) / n
        mean_sq = x.square().sum(dim=(2, 3)).sum(dim=0) / n
    else:
        mean = x.sum(dim=(0, 2, 3)) / n
        mean_sq = x.square().sum(dim=(0, 2, 3)) / n
    return mean, (mean_sq - mean * mean).clamp_min(0.0)


class BNStatsHook:
    """Forward hook on one BatchNorm2d; ``r_feature`` holds the term of the latest forward.

    With ``momentum`` m > 0 and ``tracked`` statistics (from earlier batches), the term compares
    (1 − m)·batch + m·tracked with the running statistics instead of the batch alone (Fast
    data-free KD): a generator adapted for a few steps per batch then matches the statistics
    over many batches, not within each one. ``batch_stats`` keeps the latest detached batch
    mean/var for :meth:`BNFeatureHooks.update_momentum`.
    """

    def __init__(
        self,
        module: nn.BatchNorm2d,
        momentum: float = 0.0,
        tracked: tuple[torch.Tensor, ...] | None = None,
        class_target: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.module = module
        self.r_feature: torch.Tensor | None = None
        self.enabled = True
        self.momentum = float(momentum)
        self.tracked = tracked
        self.batch_stats: tuple[torch.Tensor, ...] | None = None
        # per-class mode (class statistics uploaded by the client): (K, C) target mean / var,
        # and the batch's (N, K) class membership and (K,) class weights (set per batch)
        self.class_target = class_target
        self.classes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if x.dtype != torch.float32:  # under autocast the statistics are still taken in fp32
            x = x.float()
        if self.class_target is not None and self.classes is not None:
            self.r_feature = self._class_term(x)
            return
        mean, var = batch_mean_var(x)
        if self.momentum > 0:
            self.batch_stats = (mean.detach(), var.detach())
            if self.tracked is not None:
                m = self.momentum
                mean = (1 - m) * mean + m * self.tracked[0]
                var = (1 - m) * var + m * self.tracked[1]
        self.r_feature = torch.linalg.vector_norm(
            mean - module.running_mean
        ) + torch.linalg.vector_norm(var - module.running_var)

    def _class_term(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k (‖mean_k − target_k‖ + ‖var_k − target_k‖) over the batch's classes; with
        momentum, a class's statistics are blended with those tracked over earlier batches
        (tracked = (mean, var, seen) with ``seen`` (K,) the classes tracked so far)."""
        assert self.class_target is not None and self.classes is not None
        member, weights = self.classes
        mean, var = class_mean_var(x, member)
        if self.momentum > 0:
            present = member.sum(dim=0) > 0
            self.batch_stats = (mean.detach(), var.detach(), present)
            if self.tracked is not None:
                m = self.momentum
                seen = self.tracked[2][:, None]
                mean = torch.where(seen, (1 - m) * mean + m * self.tracked[0], mean)
                var = torch.where(seen, (1 - m) * var + m * self.tracked[1], var)
        return class_bn_term(mean, var, *self.class_target, weights)

    def remove(self) -> None:
        self._handle.remove()


class BNHooksBase:
    """What both kinds of BN-statistics hooks share: a context manager whose layers compute the
    terms inside the block and stop on exit (even on an exception), an ``enabled`` switch, the
    per-class mode (:meth:`set_classes`) and the sum over layers (:meth:`loss`).

    A subclass says which units compute the terms (:meth:`_units`: hook objects or BN layers,
    each with ``classes`` for the per-class mode), how one unit's term is read and switched and
    how units stop (:meth:`_term`, :meth:`_is_enabled`, :meth:`_set_enabled`,
    :meth:`_remove_units`), and how labels
    and class weights are shaped for its units and its feature hook (:meth:`_class_inputs`).
    """

    feature: ClassFeatureHook | None = None  # the per-class feature term, if any
    _class_targets: Any = None  # the per-class targets (None: the plain term)

    # --- what a subclass provides -------------------------------------------------------------

    def _units(self) -> list:
        raise NotImplementedError

    def _term(self, unit: object) -> torch.Tensor | None:
        raise NotImplementedError

    def _is_enabled(self) -> bool:
        raise NotImplementedError

    def _set_enabled(self, value: bool) -> None:
        raise NotImplementedError

    def _remove_units(self) -> None:
        raise NotImplementedError

    def _class_inputs(self, labels: torch.Tensor, weights: torch.Tensor) -> tuple[tuple, tuple]:
        """(what each unit's ``classes`` gets, what the feature hook's ``classes`` gets)."""
        raise NotImplementedError

    def _feature_term(self) -> torch.Tensor:
        """The feature hook's term, weighted by its ``feature_scale``."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        self._remove_units()
        if self.feature is not None:
            self.feature.remove()
            self.feature = None

    def __len__(self) -> int:
        return len(self._units())

    @property
    def enabled(self) -> bool:
        return self._is_enabled()

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # Switch off for forwards that need no BN loss (e.g. a final accuracy check).
        self._set_enabled(value)
        if self.feature is not None:
            self.feature.enabled = value

    def set_classes(self, labels: torch.Tensor, weights: torch.Tensor) -> None:
        """Per-class mode for the next forwards (needs ``class_targets``): the batch's labels
        and each class's weight in the term (shapes: see the subclass)."""
        if self._class_targets is None:
            return
        unit_classes, feature_classes = self._class_inputs(labels, weights)
        for u in self._units():
            u.classes = unit_classes
        if self.feature is not None:
            self.feature.classes = feature_classes

    def layer_losses(self) -> list[torch.Tensor]:
        """The per-layer terms of the latest forward, in module order."""
        terms = [self._term(u) for u in self._units()]
        if any(t is None for t in terms):
            raise RuntimeError(f"{type(self).__name__}.loss() called before a forward pass")
        return terms  # type: ignore[return-value]

    def loss(self, first_bn_multiplier: float = 1.0) -> torch.Tensor:
        """Σ over BN layers of the latest forward, the first layer weighted extra (plus the
        per-class feature term, weighted by its ``feature_scale``, where there is one)."""
        terms = self.layer_losses()
        if not terms:
            raise RuntimeError("the model has no BatchNorm2d layer: BN statistics loss undefined")
        total = terms[0] * first_bn_multiplier if first_bn_multiplier != 1.0 else terms[0]
        for t in terms[1:]:
            total = total + t
        if self.feature is not None and self.feature.term is not None:
            total = total + self._feature_term()
        return total


class BNFeatureHooks(BNHooksBase):
    """Hooks on every ``nn.BatchNorm2d`` of ``model`` (module order), as a context manager.

    >>> with BNFeatureHooks(teacher) as bn:
    ...     logits = teacher(x)
    ...     loss = bn.loss(first_bn_multiplier=1.0)

    :meth:`set_classes` takes the batch's labels (N,) and the class weights (K,).
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.0,
        tracked: list[tuple[torch.Tensor, ...] | None] | None = None,
        class_targets: ClassTargets | None = None,
    ) -> None:
        self.model = model
        self.hooks: list[BNStatsHook] = []
        self.momentum = float(momentum)
        self._tracked = tracked
        self._class_targets = class_targets
        self.feature = None

    def __enter__(self) -> BNFeatureHooks:
        mods = [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        tracked = self._tracked or [None] * len(mods)
        ct = self._class_targets
        targets = ct.bn if ct is not None else [None] * len(mods)
        try:
            for m, tr, tg in zip(mods, tracked, targets, strict=True):
                if m.running_mean is None or m.running_var is None:
                    raise ValueError("BNFeatureHooks needs BatchNorm2d layers that track stats")
                self.hooks.append(BNStatsHook(m, self.momentum, tr, tg))
            if ct is not None and ct.feat is not None:
                self.feature = ClassFeatureHook(feature_layer(self.model), ct.feat[None])
        except BaseException:
            self.remove()
            raise
        return self

    def _units(self) -> list[BNStatsHook]:
        return self.hooks

    def _term(self, unit: BNStatsHook) -> torch.Tensor | None:  # type: ignore[override]
        return unit.r_feature

    def _remove_units(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def _class_inputs(self, labels: torch.Tensor, weights: torch.Tensor) -> tuple[tuple, tuple]:
        member = class_membership(labels, weights.shape[-1]).to(weights)
        return (member, weights), (member[None], weights[None])

    def _feature_term(self) -> torch.Tensor:
        assert self._class_targets is not None and self.feature is not None
        assert self.feature.term is not None
        return self._class_targets.feature_scale * self.feature.term[0]

    def _is_enabled(self) -> bool:
        return all(h.enabled for h in self.hooks)

    def _set_enabled(self, value: bool) -> None:
        for h in self.hooks:
            h.enabled = value

    def update_momentum(self) -> list[tuple[torch.Tensor, ...] | None]:
        """Blend the latest batch statistics into the tracked ones (tracked ← m·tracked +
        (1 − m)·batch; the first batch is taken as is) and return them, one per layer, to pass
        as ``tracked`` to the hooks of the next batch. In per-class mode only the classes of
        the latest batch move (a class seen for the first time is taken as is)."""
        m = self.momentum
        for h in self.hooks:
            if h.batch_stats is None:
                continue
            if len(h.batch_stats) == 3:  # per class: (mean, var, present)
                mean, var, present = h.batch_stats
                if h.tracked is None:
                    h.tracked = (mean, var, present)
                    continue
                old_mean, old_var, seen = h.tracked
                both, new = (present & seen)[:, None], (present & ~seen)[:, None]
                mean_b = torch.where(both, m * old_mean + (1 - m) * mean, old_mean)
                var_b = torch.where(both, m * old_var + (1 - m) * var, old_var)
                h.tracked = (
                    torch.where(new, mean, mean_b),
                    torch.where(new, var, var_b),
                    seen | present,
                )
            elif h.tracked is None:
                h.tracked = h.batch_stats
            else:
                h.tracked = (
                    m * h.tracked[0] + (1 - m) * h.batch_stats[0],
                    m * h.tracked[1] + (1 - m) * h.batch_stats[1],
                )
        return [h.tracked for h in self.hooks]
