"""Baselines a one-shot server can compute from the uploaded teachers: the teacher ensemble's
accuracy (under each rule of :mod:`fed_distill.ensemble`) and one-shot FedAvg (size-weighted
average of the weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import ENSEMBLE_METHODS, ensemble_probs
from fed_distill.train.fit import predict_logits


def ensemble_accuracy(
    teachers: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    device: torch.device | str = "cpu",
    shares: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracy of the teacher ensemble under every combination rule (see :func:`ensemble_probs`)."""
    if len(y) == 0:
        return {m: float("nan") for m in ENSEMBLE_METHODS}
    logits = torch.stack([predict_logits(t, x, normalizer, device) for t in teachers])
    methods = [m for m in ENSEMBLE_METHODS if m != "weighted" or shares is not None]
    return {
        m: (ensemble_probs(logits, m, shares).argmax(1) == y).float().mean().item() for m in methods
    }


def fedavg_state(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts with identical keys and shapes.

    Floating tensors (weights and BN running statistics) are averaged with ``weights`` (e.g.
    client dataset sizes); integer buffers (BN's ``num_batches_tracked``) take the maximum.
    """
    if not states:
        raise ValueError("fedavg_state needs at least one state dict")
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if len(w) != len(states) or not (w >= 0).all() or w.sum() <= 0:
        raise ValueError("fedavg_state needs one non-negative weight per state, not all zero")
    w = w / w.sum()
    out = {}
    for k, ref in states[0].items():
        if ref.is_floating_point():
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for wi, s in zip(w, states, strict=True):
                acc += wi * s[k].double()
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = torch.stack([s[k] for s in states]).max(dim=0).values
    return out
