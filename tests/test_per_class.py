"""Per-class figures of a one-shot run (``federated/per_class.py``): the pieces on hand-made
tensors, then a tiny real run on digits checked against a hand count."""

from __future__ import annotations

import torch
from torch import nn

from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.federated.per_class import (
    class_accuracy,
    confusion_matrix,
    pool_agreement,
    worst_class_gap,
    worst_classes_line,
)


def test_confusion_matrix_and_class_accuracy_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 1])
    cm = confusion_matrix(pred, y, 4)
    assert cm.tolist() == [[1, 2, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    # class 3 has no sample: None, not a division by zero
    assert class_accuracy(pred, y, 4) == [1 / 3, 1 / 2, 0.0, None]


class FixedLogits(nn.Module):
    """A 'teacher' whose logits are its (N, C, 1, 1) input times a per-class scale."""

    def __init__(self, scale: list[float]):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def test_pool_agreement_by_hand():
    teachers = [FixedLogits([1.0, 1.0, 1.0]), FixedLogits([2.0, 0.0, 1.0])]
    counts = [[30, 0, 5], [10, 20, 0]]  # teacher 0 never saw class 1, teacher 1 never class 2
    shares = class_shares(counts)
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 1.0, 0.0]])[:, :, None, None]
    labels = torch.tensor([0, 1, 1])
    got = pool_agreement(teachers, images, labels, "weighted", shares, "cpu")
    logits = torch.stack([t(images) for t in teachers])
    p = logits.softmax(-1)  # (T, N, C)
    ens = ensemble_probs(logits, "weighted", shares)
    assert got["count"] == [1, 2, 0]
    assert abs(got["ensemble"][0] - ens[0, 0].item()) < 1e-6
    assert abs(got["ensemble"][1] - (ens[1, 1] + ens[2, 1]).item() / 2) < 1e-6
    # class 0: teacher 0 holds 3/4 of it; class 1: all of it is teacher 1's
    assert abs(got["holders"][0] - (0.75 * p[0, 0, 0] + 0.25 * p[1, 0, 0]).item()) < 1e-6
    assert abs(got["holders"][1] - (p[1, 1, 1] + p[1, 2, 1]).item() / 2) < 1e-6
    assert got["ensemble"][2] is None and got["holders"][2] is None  # no image of class 2


def test_worst_classes_line_and_gap_cell_name_the_class():
    res = {
        "class_acc": {"student": [0.9, 0.11, 0.579, None], "ensemble": [0.95, 0.588, 0.813, 0.5]},
        "class_names": ["T-shirt/top", "Shirt", "Coat", "Bag"],
    }
    assert worst_classes_line(res) == (
        "student vs ensemble, worst classes: Shirt 11.0 vs 58.8, Coat 57.9 vs 81.3,"
        " T-shirt/top 90.0 vs 95.0"
    )
    assert worst_class_gap(res) == "47.8 (Shirt)"
    del res["class_names"]  # indices where the results name no classes
    assert worst_class_gap(res) == "47.8 (1)"
    res["class_acc"]["student"] = [1.0, 0.9, 0.9, 0.6]
    assert worst_classes_line(res) == "student vs ensemble: no class under the ensemble"
    # older results.json: no per-class figures
    assert worst_classes_line({"student_acc": 0.5}) is None
    assert worst_class_gap({"student_acc": 0.5}) == "—"
