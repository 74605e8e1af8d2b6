"""The teacher-ensemble rule: how the teachers' logits combine into one soft label.

Below synthesis, train and the protocols (it imports only torch): the synthesizers, the student
loop and the one-shot baselines all combine teachers with :func:`ensemble_probs`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
