"""BatchNorm-statistics hooks: DeepInversion's feature-distribution regulariser.

For the input ``x`` of every ``nn.BatchNorm2d`` of a teacher, the hook computes

    ‖mean(x) − running_mean‖₂ + ‖var(x) − running_var‖₂

with the per-channel batch mean and *biased* variance over (N, H, W), as the teacher would have
seen them on real data. :class:`BNFeatureHooks` is a context manager: the hooks are removed on
exit, even when the block raises, so a model is never left with stale hooks.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


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
    """Forward hook on one BatchNorm2d; ``r_feature`` holds the term of the latest forward."""

    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.module = module
        self.r_feature: torch.Tensor | None = None
        self.enabled = True
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if x.dtype != torch.float32:  # under autocast the statistics are still taken in fp32
            x = x.float()
        mean, var = batch_mean_var(x)
        self.r_feature = torch.linalg.vector_norm(
            mean - module.running_mean
        ) + torch.linalg.vector_norm(var - module.running_var)

    def remove(self) -> None:
        self._handle.remove()


class BNFeatureHooks:
    """Hooks on every ``nn.BatchNorm2d`` of ``model`` (module order), as a context manager.

    >>> with BNFeatureHooks(teacher) as bn:
    ...     logits = teacher(x)
    ...     loss = bn.loss(first_bn_multiplier=1.0)
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks: list[BNStatsHook] = []

    def __enter__(self) -> BNFeatureHooks:
        mods = [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        try:
            for m in mods:
                if m.running_mean is None or m.running_var is None:
                    raise ValueError("BNFeatureHooks needs BatchNorm2d layers that track stats")
                self.hooks.append(BNStatsHook(m))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def __len__(self) -> int:
        return len(self.hooks)

    @property
    def enabled(self) -> bool:
        return all(h.enabled for h in self.hooks)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # Switch off for forwards that need no BN loss (e.g. a final accuracy check).
        for h in self.hooks:
            h.enabled = value

    def layer_losses(self) -> list[torch.Tensor]:
        """The per-layer terms of the latest forward, in module order."""
        out = []
        for h in self.hooks:
            if h.r_feature is None:
                raise RuntimeError("BNFeatureHooks.loss() called before a forward pass")
            out.append(h.r_feature)
        return out

    def loss(self, first_bn_multiplier: float = 1.0) -> torch.Tensor:
        """Σ over BN layers of the latest forward, the first layer weighted extra."""
        terms = self.layer_losses()
        if not terms:
            raise RuntimeError("the model has no BatchNorm2d layer: BN statistics loss undefined")
        total = terms[0] * first_bn_multiplier if first_bn_multiplier != 1.0 else terms[0]
        for t in terms[1:]:
            total = total + t
        return total
