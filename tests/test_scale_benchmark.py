"""benchmarks/scale.py: one run per number of clients in its own process, read back, tabled."""

from __future__ import annotations

import json
import sys

TINY = [
    "dataset=digits",
    "train.epochs=2",
    "train.min_steps=20",
    "synthesis.iterations=10",
    "synthesis.batch_size=32",
    "student.epochs=2",
    "student.initial_batches=1",
    "student.steps_per_epoch=5",
    "student.batch_size=32",
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
