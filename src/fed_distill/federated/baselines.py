"""Baselines a one-shot server can compute from the uploaded teachers: the teacher ensemble
(mean logits) and one-shot FedAvg (size-weighted average of the weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.train.fit import predict_logits

ENSEMBLE_METHODS = ("logits", "probs", "weighted")


def class_shares(class_counts: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
    """(T, C) share of each class's training data held by each teacher (columns sum to 1;
    a class nobody holds is shared equally)."""
    c = torch.as_tensor(class_counts, dtype=torch.float32)
    total = c.sum(dim=0, keepdim=True)
    return torch.where(total > 0, c / total.clamp_min(1.0), torch.full_like(c, 1.0 / c.shape[0]))


def ensemble_probs(
    logits: torch.Tensor,
    method: str = "weighted",
    shares: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Combine (T, N, C) teacher logits into (N, C) class probabilities.

    ``logits``: softmax of the mean logits. ``probs``: mean of the teachers' softmax.
    ``weighted``: per class, each teacher's softmax weighted by its share of that class's
    training data (``shares``, from the label counts clients upload with their model), so a
    teacher speaks for the classes it has seen. On label-skewed clients ``logits`` is by far the
    worst: over-confident teachers outvote the ones that know the class.

    ``temperature`` softens each teacher's softmax *before* they are combined. That can move the
    ensemble's decision (on Fashion-MNIST at Dirichlet 0.5 the ``weighted`` rule's test argmax
    is 88.8 % at T = 1 and 83.0 % at T = 4), and softening the combined distribution instead
    (p^(1/T)) keeps it; but distilled at T = 4, students learnt less from the latter (Adaptive DI
    at Dirichlet 0.1: 66.2 against 69.4 %, 20 epochs on the same teachers), so this order stays. At
    T = 1 the two are the same.
    """
    z = logits / temperature
    if method == "logits":
        return z.mean(dim=0).softmax(dim=-1)
    p = z.softmax(dim=-1)
    if method == "probs":
        return p.mean(dim=0)
    if method == "weighted":
        if shares is None:
            raise ValueError("ensemble method 'weighted' needs the teachers' class shares")
        q = (p * shares.to(p.device, p.dtype)[:, None, :]).sum(dim=0)
        return q / q.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    raise ValueError(
        f"ensemble method must be one of {', '.join(ENSEMBLE_METHODS)}, got '{method}'"
    )


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
