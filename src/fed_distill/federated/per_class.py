"""Per-class figures of a one-shot run: which classes the student loses against the ensemble.

The average hides it: a student can sit 9 points under its ensemble because of two classes. The
evaluation here runs each model once over the official test set and derives everything from
those predictions: overall and per-class accuracy, confusion matrices and the ensemble's accuracy
under every rule. :func:`pool_agreement` measures, without real data, how convincing the final
synthetic pool's images of each class are to the teachers. The formatting helpers at the end
(:func:`worst_classes_line`, :func:`worst_class_gap`) read a ``results.json`` dict and serve the
summary printed after a run and the benchmarks' tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import ENSEMBLE_METHODS, ensemble_probs
from fed_distill.train.fit import predict_logits


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (NaN for an empty set, as ``evaluate``)."""
    if len(y) == 0:
        return float("nan")
    return (pred == y).float().mean().item()


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    idx = y.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def class_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per true class, the fraction predicted right; None for a class absent from ``y``."""
    cm = confusion_matrix(pred, y, num_classes)
    n = cm.sum(1)
    return [cm[k, k].item() / n[k].item() if n[k] > 0 else None for k in range(num_classes)]


def _stack_logits(
    models: Sequence[nn.Module], x: torch.Tensor, normalizer: Normalizer | None, device
) -> torch.Tensor:
    """(M, N, C) logits: one forward pass of each model over ``x``."""
    return torch.stack([predict_logits(m, x, normalizer, device) for m in models])


def evaluate_on_test(
    teachers: Sequence[nn.Module],
    local_tests: Sequence[Sequence[int]],
    fedavg: nn.Module | None,
    student: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    normalizer: Normalizer,
    device: Any,
    method: str,
    shares: torch.Tensor,
) -> dict[str, Any]:
    """Accuracies of the teachers (official test set and their client's own test part, indices
    ``local_tests``), the ensemble under every rule (``method`` is the one in use), one-shot
    FedAvg and the student, with per-class accuracy (``class_acc``) and confusion matrices
    (``confusion``): one forward pass of each model over the test set (x, y)."""
    y = y.cpu()
    num_classes = shares.shape[1]
    t_logits = _stack_logits(teachers, x, normalizer, device)
    t_pred = t_logits.argmax(-1)
    ens = {m: ensemble_probs(t_logits, m, shares).argmax(1) for m in ENSEMBLE_METHODS}
    pred = {
        k: None if m is None else predict_logits(m, x, normalizer, device).argmax(1)
        for k, m in (("student", student), ("ensemble", None), ("fedavg", fedavg))
    }
    pred["ensemble"] = ens[method]
    local = [torch.as_tensor(list(te), dtype=torch.long) for te in local_tests]
    out: dict[str, Any] = {
        "teacher_acc": [accuracy(p, y) for p in t_pred],
        "teacher_local_acc": [accuracy(p[i], y[i]) for p, i in zip(t_pred, local, strict=False)],
        "ensemble_acc_by_method": {m: accuracy(p, y) for m, p in ens.items()},
        "ensemble_method": method,
        "fedavg_acc": None if pred["fedavg"] is None else accuracy(pred["fedavg"], y),
        "student_acc": None if pred["student"] is None else accuracy(pred["student"], y),
    }
    out["ensemble_acc"] = out["ensemble_acc_by_method"][method]
    out["class_acc"] = {
        k: None if p is None else class_accuracy(p, y, num_classes) for k, p in pred.items()
    }
    out["class_acc"]["teachers"] = [class_accuracy(p, y, num_classes) for p in t_pred]
    out["confusion"] = {
        k: None if pred[k] is None else confusion_matrix(pred[k], y, num_classes).tolist()
        for k in ("student", "ensemble")
    }
    return out


def pool_agreement(
    teachers: Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    shares: torch.Tensor,
    device: Any,
) -> dict[str, list[Any]]:
    """How convincing the synthetic pool's images of each class are to the teachers.

    For the images of intended class c (``labels``; ``images`` already normalised):
    ``ensemble[c]``, the mean probability of c under the ensemble rule ``method`` (at
    temperature 1, as the test accuracy); ``holders[c]``, the mean of sum_t s_tc p_t(c|x), each
    teacher's probability of c weighted by its share s_tc of class c's training data
    (``ensemble.class_shares``; the shares of a class sum to 1), so teachers that never saw c
    count for nothing; ``count[c]``, the number of pool images of c. Means are None where a
    class has no image."""
    num_classes = shares.shape[1]
    labels = labels.long().cpu()
    logits = _stack_logits(teachers, images, None, device)  # (T, N, C)
    ens = ensemble_probs(logits, method, shares).gather(1, labels[:, None]).squeeze(1)
    p_t = logits.softmax(-1).gather(2, labels[None, :, None].expand(len(logits), -1, 1))
    holders = (shares[:, labels] * p_t.squeeze(2)).sum(0)
    count = torch.bincount(labels, minlength=num_classes)

    def class_mean(v: torch.Tensor) -> list[float | None]:
        s = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, v.double())
        return [s[c].item() / count[c].item() if count[c] > 0 else None for c in range(num_classes)]

    return {"ensemble": class_mean(ens), "holders": class_mean(holders), "count": count.tolist()}


# ============================================================================ reading results


def class_name(res: dict[str, Any], k: int) -> str:
    """Class ``k``'s name from ``results.json`` (``class_names``), else its index."""
    names = res.get("class_names")
    if isinstance(names, list) and 0 <= k < len(names):
        return str(names[k])
    return str(k)


def class_gaps(res: dict[str, Any], key: str = "student") -> list[tuple[int, float, float]]:
    """(class, student, ensemble) accuracies, the class where the student (``key``: or the
    re-fitted one, ``student_refit``) is furthest under the ensemble first; empty where the
    results hold no per-class figures (older runs)."""
    acc = res.get("class_acc") or {}
    s, e = acc.get(key), acc.get("ensemble")
    if not isinstance(s, list) or not isinstance(e, list):
        return []
    rows = [
        (k, float(a), float(b))
        for k, (a, b) in enumerate(zip(s, e, strict=False))
        if a is not None and b is not None and not (math.isnan(a) or math.isnan(b))
    ]
    return sorted(rows, key=lambda r: r[1] - r[2])


def worst_classes_line(
    res: dict[str, Any], n: int = 3, key: str = "student", who: str = "student"
) -> str | None:
    """``student vs ensemble, worst classes: Shirt 11.0 vs 58.8, ...`` (the ``n`` classes where
    the student, ``key`` in ``class_acc``, is most under the ensemble, in %), or None without
    per-class figures."""
    gaps = class_gaps(res, key)
    if not gaps:
        return None
    under = [g for g in gaps if g[1] < g[2]][:n]
    if not under:
        return f"{who} vs ensemble: no class under the ensemble"
    cells = ", ".join(f"{class_name(res, k)} {100 * s:.1f} vs {100 * e:.1f}" for k, s, e in under)
    return f"{who} vs ensemble, worst classes: {cells}"


def worst_class_gap(res: dict[str, Any]) -> str:
    """The benchmarks' cell: the largest ensemble-minus-student gap over classes in points, with
    the class (``47.8 (Shirt)``); ``—`` without per-class figures."""
    gaps = class_gaps(res)
    if not gaps:
        return "—"
    k, s, e = gaps[0]
    return f"{100 * (e - s):.1f} ({class_name(res, k)})"
