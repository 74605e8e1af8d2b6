"""``fed-distill report RUN_DIR`` on real (tiny) runs: a complete one-shot run, partial runs, a
FedMD run; and the one-screen summaries printed after stages."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN
from fed_distill.report import stage_summary, write_report

ONESHOT = [
    *FAST_TRAIN,
    "train.min_steps=60",
    "synthesis.iterations=20",
    "synthesis.batch_size=40",
    "student.epochs=3",
    "student.initial_batches=2",
    "student.steps_per_epoch=5",
    "student.batch_size=40",
]


@pytest.fixture(scope="module")
def oneshot_run(tmp_path_factory) -> Path:
    from fed_distill.cli import main

    run = tmp_path_factory.mktemp("report") / "oneshot"
    args = ["oneshot", "dataset=digits", "split=dirichlet", "split.alpha=0.5"]
    args += ["split.num_clients=3", "seed=2", f"run_dir={run}", *ONESHOT]
    assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def fedmd_run(tmp_path_factory) -> Path:
    from fed_distill.cli import main

    run = tmp_path_factory.mktemp("report") / "fedmd"
    args = ["fedmd", "fedmd=quick", "fedmd.parties=[fedmd_1,fedmd_6]", "fedmd.rounds=2"]
    args += ["fedmd.public_epochs=1", "fedmd.private_epochs=3", "fedmd.pooled_epochs=2"]
    args += ["fedmd.public_size=500", "fedmd.public_subset_size=200", "seed=1"]
    assert main([*args, f"run_dir={run}", "progress=false", "device=cpu"]) == 0
    return run


def images_in(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return matplotlib.image.imread(path)


def check_figures(run: Path, md: str, expected: set[str]) -> None:
    links = images_in(md)
    assert set(links) == {f"report_{n}.png" for n in expected}
    for link in links:
        assert not Path(link).is_absolute() and "/" not in link  # relative, beside report.md
        img = png_pixels(run / link)
        assert img.shape[0] > 150 and img.shape[1] > 250, (link, img.shape)
        assert img[..., :3].std() > 0.05, f"{link} is blank"


def artifacts(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in run.rglob("*")
        if p.is_file() and not p.name.startswith("report")
    }


def test_oneshot_report_has_every_section(cli, oneshot_run):
    before = artifacts(oneshot_run)
    code, out, err = cli("report", str(oneshot_run))
    assert code == 0, err
    assert "report.md" in out and "7 figure(s)" in out
    md = (oneshot_run / "report.md").read_text()
    res = json.loads((oneshot_run / "results.json").read_text())
    assert md.startswith("# One-shot federated distillation")
    for heading in [
        "## Configuration",
        "## Results",
        "## Per class",
        "## Data: label distribution",
    ]:
        assert heading in md
    for heading in ["## Teachers", "## Student", "## Synthetic images", "## Wall time per stage"]:
        assert heading in md
    # the results table carries the numbers of results.json
    for i, a in enumerate(res["teacher_acc"]):
        assert f"| teacher {i} |" in md and f"{100 * a:.2f}" in md
    for v in (res["ensemble_acc"], res["fedavg_acc"], res["student_acc"]):
        assert f"{100 * v:.2f}" in md
    assert "FedAvg (one-shot)" in md and "| split (`split.json`) | `dirichlet` num_clients=3" in md
    assert "`digits`" in md and "alpha=0.5" in md
    assert "Not in this run" not in md  # a complete run misses nothing
    check_figures(
        oneshot_run,
        md,
        {
            "accuracy",
            "per_class",
            "label_distribution",
            "teacher_curves",
            "student_curves",
            "synthetic_grid",
            "stage_times",
        },
    )
    # every image link has a caption line under it
    assert md.count("![") == len(re.findall(r"\)\n\n\*[^*]+\*", md))
    assert artifacts(oneshot_run) == before  # the report only adds report.md and report_*.png


def test_synthetic_grid_shows_one_row_per_class(oneshot_run):
    if not (oneshot_run / "report_synthetic_grid.png").is_file():
        write_report(oneshot_run)
    img = png_pixels(oneshot_run / "report_synthetic_grid.png")
    # 10 classes x 10 columns of small squares: taller than a strip, and not uniform
    assert img.shape[0] > img.shape[1] * 0.6
    assert img[..., :3].std() > 0.1


def test_partial_runs_say_what_is_missing(tmp_path, oneshot_run):
    only_split = tmp_path / "split_only"
    only_split.mkdir()
    shutil.copy(oneshot_run / "split.json", only_split)
    rep = write_report(only_split)
    md = rep.path.read_text()
    assert [f.file for f in rep.figures] == ["report_label_distribution.png"]
    assert "_No accuracies yet._" in md and "## Not in this run (yet)" in md
    assert "fed-distill train-teachers" in md and "results.json" in md

    teachers = tmp_path / "teachers_only"
    shutil.copytree(
        oneshot_run, teachers, ignore=shutil.ignore_patterns("student", "results.json", "report*")
    )
    rep = write_report(teachers)
    md = rep.path.read_text()
    names = {f.file for f in rep.figures}
    assert {"report_teacher_curves.png", "report_accuracy.png", "report_stage_times.png"} <= names
    assert "report_student_curves.png" not in names and "| teacher 2 |" in md
    assert "fed-distill generate-initial" in md and "Not in this run" in md

    student_no_results = tmp_path / "no_results"
    shutil.copytree(
        oneshot_run, student_no_results, ignore=shutil.ignore_patterns("results.json", "report*")
    )
    md = write_report(student_no_results).path.read_text()
    assert "student (cnn_small)" in md and "## Synthetic images" in md
    assert "written by `fed-distill oneshot`" in md


def test_fedmd_report(cli, fedmd_run):
    code, out, err = cli("report", f"run_dir={fedmd_run}")
    assert code == 0, err
    md = (fedmd_run / "report.md").read_text()
    res = json.loads((fedmd_run / "results.json").read_text())
    assert md.startswith("# FedMD")
    assert "| 0 | `fedmd_1` |" in md and "| 1 | `fedmd_6` |" in md and "| mean |" in md
    for key in ("alone_acc", "pooled_acc"):
        for v in res[key]:
            assert f"{100 * v:.2f}" in md
    assert f"FedMD round {res['rounds']} %" in md
    check_figures(
        fedmd_run,
        md,
        {"fedmd_accuracy", "consensus_distance", "label_distribution", "stage_times"},
    )


def test_stage_summaries(oneshot_run):
    s = stage_summary("train-student", oneshot_run)
    lines = s.splitlines()
    assert lines[0].split() == [
        "epoch",
        "pool",
        "loss",
        "train",
        "%",
        "val",
        "%",
        "test",
        "%",
        "time",
        "s",
    ]
    assert len(lines) == 3 + 3  # header, rule, 3 epochs, footer
    assert "fed-distill report" in lines[-1]
    s = stage_summary("generate-initial", oneshot_run)
    assert "80 images in 2 batches" in s and "images per class: 0:" in s
    assert len(s.splitlines()) <= 24  # one screen
    assert stage_summary("models", oneshot_run) is None


def test_generate_initial_prints_its_summary(cli, oneshot_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(
        oneshot_run, run, ignore=shutil.ignore_patterns("student", "results.json", "report*")
    )
    code, out, err = cli(
        "generate-initial",
        f"run_dir={run}",
        "device=cpu",
        "synthesis.iterations=2",
        "synthesis.batch_size=16",
        "student.initial_batches=1",
    )
    assert code == 0, err
    assert "initial synthetic set: 16 images in 1 batches" in out
    assert f"report: fed-distill report {run}" in out


def test_grid_of_colour_images_keeps_to_twenty_classes(tmp_path):
    from fed_distill.report import plot_synthetic_grid

    rng = np.random.default_rng(0)
    x = rng.random((300, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 100, 300)
    plot_synthetic_grid(x, y, [f"c{k}" for k in range(100)], tmp_path / "g.png", "cifar100-like")
    img = png_pixels(tmp_path / "g.png")
    assert img.shape[-1] in (3, 4) and img[..., :3].std() > 0.05
    assert img.shape[0] < 2200  # 20 rows at most, not 100
