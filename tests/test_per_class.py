"""Per-class figures of a one-shot run (``federated/per_class.py``): the pieces on hand-made
tensors, then a tiny real run on digits checked against a hand count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fed_distill.artifacts import load_weights
from fed_distill.data.partition import load_split
from fed_distill.data.sources import load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.federated.oneshot import print_summary
from fed_distill.federated.per_class import (
    class_accuracy,
    confusion_matrix,
    pool_agreement,
    worst_class_gap,
    worst_classes_line,
)
from fed_distill.models import build_model
from fed_distill.report import ReportError, write_report
from fed_distill.report.per_class import added_confusions
from fed_distill.teachers import load_teachers
from fed_distill.train.fit import predict_logits
from test_report import ONESHOT  # the report tests' tiny run


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


# ----------------------------------------------------------------------------- a tiny real run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from fed_distill.cli import main

    run = tmp_path_factory.mktemp("per_class") / "oneshot"
    args = ["oneshot", "dataset=digits", "split=dirichlet", "split.alpha=0.5"]
    assert main([*args, "split.num_clients=3", "seed=3", f"run_dir={run}", *ONESHOT]) == 0
    return run


def _hand_count(pred: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per class, right answers over test images, counted one image at a time."""
    right, total = [0] * 10, [0] * 10
    for p, t in zip(pred.tolist(), y.tolist(), strict=True):
        total[t] += 1
        right[t] += p == t
    return [r / n for r, n in zip(right, total, strict=True)]


def test_class_acc_equals_a_hand_count_on_a_real_run(run):
    r = json.loads((run / "results.json").read_text())
    data = load_dataset("digits")
    norm = Normalizer(data.info.mean, data.info.std)
    m = json.loads((run / "student" / "metrics.json").read_text())
    info = data.info
    student = build_model(m["model"], 10, info.channels, info.image_size, **m["model_kwargs"])
    load_weights(student, run / "student" / "student.safetensors")
    teachers, _ = load_teachers(run, "cpu")
    t_logits = torch.stack([predict_logits(t, data.test_x, norm) for t in teachers])
    shares = class_shares(load_split(run / "split.json").class_counts()[: len(teachers)])
    ens = ensemble_probs(t_logits, r["ensemble_method"], shares).argmax(1)
    y = data.test_y
    assert r["class_acc"]["student"] == _hand_count(
        predict_logits(student, data.test_x, norm).argmax(1), y
    )
    assert r["class_acc"]["ensemble"] == _hand_count(ens, y)
    assert r["class_acc"]["teachers"] == [_hand_count(t.argmax(1), y) for t in t_logits]
    assert len(r["class_acc"]["fedavg"]) == 10 and r["class_names"] == [str(k) for k in range(10)]


def test_confusion_rows_sum_to_class_counts_and_class_means_to_the_accuracy(run):
    r = json.loads((run / "results.json").read_text())
    n = torch.bincount(load_dataset("digits").test_y, minlength=10).tolist()
    for who in ("student", "ensemble"):
        cm = r["confusion"][who]
        assert [sum(row) for row in cm] == n
        assert [cm[k][k] / n[k] for k in range(10)] == r["class_acc"][who]

    def weighted(acc):
        return sum(a * c for a, c in zip(acc, n, strict=True)) / sum(n)

    acc = r["class_acc"]  # results' accuracies are float32 means: equal to ~1e-7
    assert weighted(acc["student"]) == pytest.approx(r["student_acc"], abs=1e-6)
    assert weighted(acc["ensemble"]) == pytest.approx(r["ensemble_acc"], abs=1e-6)
    assert weighted(acc["fedavg"]) == pytest.approx(r["fedavg_acc"], abs=1e-6)
    for a, t in zip(acc["teachers"], r["teacher_acc"], strict=True):
        assert weighted(a) == pytest.approx(t, abs=1e-6)
    # the pool's agreement covers the final pool, class by class
    pool = torch.load(run / "student" / "dataset.pt", weights_only=True)
    agree = r["pool_agreement"]
    assert agree["count"] == torch.bincount(pool["labels"], minlength=10).tolist()
    for k in ("ensemble", "holders"):
        assert all((v is None) == (c == 0) for v, c in zip(agree[k], agree["count"], strict=True))
        assert all(0 <= v <= 1 for v in agree[k] if v is not None)


def test_summary_names_the_worst_classes(run, capsys):
    print_summary(json.loads((run / "results.json").read_text()))
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("student vs ensemble")]
    assert len(line) == 1


def test_report_shows_per_class_figures_and_reports_older_runs(run, tmp_path):
    rep = write_report(run)
    assert "report_per_class.png" in [f.file for f in rep.figures]
    assert (run / "report_per_class.png").stat().st_size > 1000
    md = (run / "report.md").read_text()
    assert "## Per class" in md and "pool: holders p(class)" in md
    assert "### Confusions the student adds" in md
    # a run written before the per-class keys still reports, with a note
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("report*"))
    r = json.loads((old / "results.json").read_text())
    for k in ("class_acc", "confusion", "pool_agreement", "class_names"):
        del r[k]
    (old / "results.json").write_text(json.dumps(r))
    rep = write_report(old)
    assert "report_per_class.png" not in [f.file for f in rep.figures]
    assert "no per-class figures" in (old / "report.md").read_text()
    assert not (old / "report_per_class.png").exists()


def test_malformed_per_class_keys_are_one_line(run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, ignore=shutil.ignore_patterns("report*"))
    r = json.loads((bad / "results.json").read_text())
    r["class_acc"]["student"] = r["class_acc"]["student"][:3]
    (bad / "results.json").write_text(json.dumps(r))
    with pytest.raises(ReportError, match="class_acc.student' has 3 entries, expected 10"):
        write_report(bad)
    assert not (bad / "report.md").exists() and not list(bad.glob("report_*.png"))


def test_added_confusions_by_hand():
    student = [[5, 3, 0], [4, 2, 0], [0, 1, 6]]
    ensemble = [[7, 1, 0], [0, 6, 0], [1, 0, 6]]
    # 1 -> 0: 4 more, 0 -> 1: 2 more, 2 -> 1: 1 more; 2 -> 0 is fewer, the diagonal ignored
    assert added_confusions(student, ensemble) == [(1, 0, 4, 0), (0, 1, 3, 1), (2, 1, 1, 0)]
    assert added_confusions(student, ensemble, top=1) == [(1, 0, 4, 0)]
    assert added_confusions(ensemble, ensemble) == []
