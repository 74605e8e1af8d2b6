"""Many clients: benchmarks/scale.py, bad input at scale, clients without some classes, and
Flower's simulation with 20 clients against in-process."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import TINY_SERVER

TINY = [
    "dataset=digits",
    "train.epochs=2",
    "train.min_steps=20",
    *TINY_SERVER,
    "student.target_teachers=2",
]


def test_scale_runs_each_size_once_and_tables_cost_and_accuracy(
    benchmark_module, tmp_path, monkeypatch, capsys
):
    scale = benchmark_module("scale")
    out, fig = tmp_path / "runs", tmp_path / "scale.png"
    argv = ["scale.py", "--clients", "2", "3", "--out", str(out), "--figure", str(fig), "--"]
    monkeypatch.setattr(sys, "argv", [*argv, *TINY])
    assert scale.main() == 0
    table = capsys.readouterr().out
    rows = {}
    for n in (2, 3):
        r = scale.row(out / f"clients{n}_seed0")
        rows[n] = dict(zip(scale.HEADER, r, strict=True))
        assert rows[n]["clients"] == n
        assert 0 < float(rows[n]["peak GiB"]) < 24  # measured by the child's own rusage
        assert float(rows[n]["slowest client min"]) <= float(rows[n]["teachers min (sum)"])
        res = json.loads((out / f"clients{n}_seed0" / "results.json").read_text())
        ratio = res["student_acc"] / res["ensemble_acc"]
        assert rows[n]["student / ensemble"] == f"{ratio:.3f}"
        assert rows[n]["student %"] == f"{100 * res['student_acc']:.2f}"
        assert f"| {n} |" in table
    assert rows[2]["targets"] == "auto: all 2" and rows[3]["targets"] == "auto: 2 of 3"
    assert fig.is_file()
    results = out / "clients3_seed0" / "results.json"
    before = results.stat().st_mtime_ns
    assert json.loads(results.read_text())["config"]["split"]["num_clients"] == 3
    # a second call reads the finished runs back instead of running them again
    monkeypatch.setattr(sys, "argv", [*argv, *TINY])
    assert scale.main() == 0
    assert results.stat().st_mtime_ns == before


def test_cost_modes_time_every_synthesizer_and_the_student_targets(
    benchmark_module, monkeypatch, capsys
):
    """--synthesis-cost / --student-cost: a row per synthesizer (or one per teacher count), each
    a positive time; run nothing else."""
    scale = benchmark_module("scale")
    rows = scale.synthesis_cost([2, 3], iterations=1)
    assert [r[0] for r in rows] == [2] * len(scale.SYNTHESIZERS) + [3] * len(scale.SYNTHESIZERS)
    assert all(float(r[3]) > 0 for r in rows)
    monkeypatch.setattr(sys, "argv", ["scale.py", "--student-cost", "2", "7"])
    assert scale.main() == 0
    table = capsys.readouterr().out
    assert "| live ms | sampled ms |" in table
    lines = [
        line for line in table.splitlines() if line.startswith("| 2 |") or line.startswith("| 7 |")
    ]
    assert len(lines) == 2
    for line in lines:
        assert all(float(c) > 0 for c in line.strip("|").split("|")[2:])


def test_more_clients_than_min_size_allows_is_one_line_and_writes_nothing(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli("oneshot", "dataset=digits", "split.num_clients=500", f"run_dir={run}")
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1
    assert "split.min_size=10 x 500 clients exceeds the" in lines[0]
    assert "lower split.min_size or use fewer clients" in lines[0]
    assert not run.exists() or not any(run.iterdir())


FLOWER_20 = [
    "dataset=digits",
    "split=dirichlet",
    "split.alpha=0.2",
    "split.num_clients=20",
    "seed=2",
    "device=cpu",
    "train.epochs=1",
    "train.min_steps=10",
    "synthesis.iterations=5",
    "synthesis.batch_size=32",
    "student.epochs=2",
    "student.initial_batches=1",
    "student.steps_per_epoch=4",
    "student.batch_size=32",
    "progress=false",
]


@pytest.mark.slow
def test_twenty_clients_on_flower_simulation_equal_in_process(cli, tmp_path, monkeypatch):
    """20 clients at Dirichlet 0.2 (many hold none of some classes): the simulation engine gives
    in-process's results.json, every uploaded statistic is finite, and the student samples 5
    of the 20 teachers per image."""
    pytest.importorskip("flwr")
    from fed_distill.artifacts import read_weights
    from fed_distill.federated.flower.runner import FlowerOptions, run_flower

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli("oneshot", *FLOWER_20, f"run_dir={tmp_path / 'local'}")[0] == 0
        flower = run_flower("oneshot", [*FLOWER_20, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    finally:
        torch.set_num_threads(before)
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    split = json.loads((tmp_path / "local" / "split.json").read_text())
    assert sum(n == 0 for c in split["clients"] for n in c["train_class_counts"]) > 20
    assert flower["left_out"] == [] and len(flower["teacher_acc"]) == 20
    for key in ("teacher_acc", "ensemble_acc_by_method", "fedavg_acc", "student_acc"):
        assert flower[key] == pytest.approx(local[key], rel=1e-5, abs=1e-6), key
    for who in ("student", "ensemble", "fedavg"):
        assert flower["class_acc"][who] == pytest.approx(local["class_acc"][who], abs=1e-6), who
    assert local["config"]["student"]["targets"] == "auto"
    for i in range(20):
        stats = read_weights(tmp_path / "sim" / "teachers" / f"class_stats_{i}.safetensors")
        assert all(torch.isfinite(v).all() for v in stats.values() if v.is_floating_point())
