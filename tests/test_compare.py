"""``fed-distill compare``: grouping, mean and std against hand-computed values, the CSV, the
figures, bad inputs, and a real (tiny) digits sweep compared end to end; the shared table code
and FedMD's headline numbers it builds on."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_TRAIN
from fed_distill.cli import main
from fed_distill.compare import compare
from fed_distill.compare.runs import find_runs, group_runs
from fed_distill.federated.fedmd_results import headline
from fed_distill.tables import format_table

SYNTH = {  # two synthesis presets as results.json records them (a few of their keys)
    "cpu": {"name": "cpu", "method": "deepinversion", "iterations": 100, "lr": 0.25},
    "generator": {"name": "generator", "method": "generator", "iterations": 5, "lr": 0.005},
}


def oneshot_results(synthesis: str, seed: int, student: float, **extra) -> dict:
    """A one-shot results.json with the keys `fed-distill oneshot` writes."""
    r = {
        "teacher_acc": [0.7, 0.72, 0.74],
        "teacher_local_acc": [0.9, 0.91, 0.92],
        "ensemble_acc_by_method": {"mean": 0.9, "weighted": 0.9},
        "ensemble_method": "mean",
        "ensemble_acc": 0.9,
        "fedavg_acc": 0.5,
        "student_acc": student,
        "class_names": ["zero", "one", "two"],
        "class_acc": {
            "student": [0.9, student, 0.8],
            "ensemble": [0.95, 0.9, 0.85],
            "fedavg": [0.5, 0.5, 0.5],
            "teachers": [[0.7, 0.7, 0.7]] * 3,
        },
        "student_curve": {
            "test_acc": [None, student - 0.1, student],
            "elapsed_s": [10.0, 20.0, 30.0 + seed],
            "synthesis_s": [5.0, 10.0, 15.0],
        },
        "synthetic_images": 1000,
        "synthesis_s": 10.0,
        "synthesis_images_per_s": 100.0 + seed,
        "stage_times_s": {"split": 0.1, "train-teachers": 10.0},
        "wall_time_s": 60.0 + 10 * seed,
        "config": {
            "seed": seed,
            "run_dir": f"runs/{synthesis}_s{seed}",
            "device": "cpu",
            "dataset": {"name": "digits", "data_dir": None},
            "synthesis": SYNTH[synthesis],
            "student": {"name": "default", "epochs": 3, "seed": None, "checkpoint_every": 1},
        },
    }
    return {**r, **extra}


def fedmd_results(seed: int, final: list[float]) -> dict:
    """A FedMD results.json with the keys `fed-distill fedmd` writes (two parties, 2 rounds)."""
    return {
        "rounds": 2,
        "parties": ["fedmd_1", "fedmd_6"],
        "party_acc": [[0.5, 0.55, final[0]], [0.6, 0.62, final[1]]],
        "alone_acc": [0.5, 0.6],
        "pooled_acc": [0.8, 0.9],
        "alone_extended_acc": [0.52, 0.61],
        "final_acc": final,
        "mean_acc": [0.55, 0.585, (final[0] + final[1]) / 2],
        "round_times_s": [3.0, 4.0],
        "wall_time_s": 30.0,
        "config": {"seed": seed, "run_dir": f"runs/fedmd_s{seed}", "fedmd": {"name": "quick"}},
    }


def write_run(folder: Path, results: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep folder of six one-shot runs: synthesis cpu / generator x seeds 0, 1, 2."""
    acc = {"cpu": [0.80, 0.82, 0.84], "generator": [0.70, 0.75, 0.71]}
    for synth, values in acc.items():
        for seed, a in enumerate(values):
            write_run(tmp_path / "sweep" / f"{synth}_s{seed}", oneshot_results(synth, seed, a))
    return tmp_path / "sweep"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ============================================================================ tables and FedMD


def test_one_table_function_renders_plain_and_markdown():
    rows = [["cpu", 3, "82.00 ± 2.00"], ["generator", 1, "70.00"]]
    plain = format_table(["group", "n", "student %"], rows)
    assert plain.splitlines() == [
        "    group  n     student %",
        "---------  -  ------------",
        "      cpu  3  82.00 ± 2.00",
        "generator  1         70.00",
    ]
    md = format_table(["group", "n", "student %"], rows, markdown=True)
    assert md.splitlines()[:2] == ["| group | n | student % |", "|---|---:|---:|"]


def test_fedmd_headline_is_the_mean_over_parties_and_the_share_of_the_gap():
    h = headline(fedmd_results(0, [0.7, 0.75]))
    assert h["alone"] == pytest.approx(0.55)
    assert h["final"] == pytest.approx(0.725)
    assert h["pooled"] == pytest.approx(0.85)
    assert h["alone_extended"] == pytest.approx(0.565)
    assert h["gain"] == pytest.approx(0.175)
    # closed (0.2 + 0.15) of the (0.3 + 0.3) from alone to pooled
    assert h["gap_closed"] == pytest.approx(0.35 / 0.6)
    no_pooled = fedmd_results(0, [0.7, 0.75]) | {"pooled_acc": [None, None]}
    assert headline(no_pooled)["gap_closed"] is None


# ============================================================================ grouping


def test_runs_are_grouped_by_the_keys_that_differ_without_seed_and_bookkeeping(sweep):
    runs, skipped = find_runs([sweep])
    assert len(runs) == 6 and skipped == []
    groups, shown = group_runs(runs)
    # synthesis.lr / method / iterations differ too, but follow from synthesis.name
    assert shown == ["synthesis.name"]
    assert [g.label for g in groups] == ["synthesis=cpu", "synthesis=generator"]
    assert [sorted(r.path.name for r in g.runs) for g in groups] == [
        ["cpu_s0", "cpu_s1", "cpu_s2"],
        ["generator_s0", "generator_s1", "generator_s2"],
    ]


def test_by_chooses_the_keys_and_a_group_name_stands_for_its_name_key(sweep, capsys):
    runs, _ = find_runs([sweep])
    groups, shown = group_runs(runs, ["seed"])
    assert shown == ["seed"] and [g.label for g in groups] == ["seed=0", "seed=1", "seed=2"]
    assert [len(g.runs) for g in groups] == [2, 2, 2]
    groups, shown = group_runs(runs, ["synthesis"])
    assert shown == ["synthesis.name"] and len(groups) == 2
    code, _, err = run_cli(capsys, sweep, "--by", "synthesis.nope", "--out", sweep.parent / "o")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--by synthesis.nope" in err and "synthesis.name" in err


# ============================================================================ numbers and files


def test_table_and_csv_hold_mean_std_and_n_computed_by_hand(sweep, capsys):
    out = sweep.parent / "cmp"
    code, stdout, err = run_cli(capsys, sweep, "--out", out)
    assert code == 0 and err == ""
    # cpu: student 0.80, 0.82, 0.84 -> mean 82.00, sample std 2.00;
    # generator: 0.70, 0.75, 0.71 -> mean 72.00, std sqrt((4 + 9 + 1) / 2) = 2.6458
    cpu = next(line for line in stdout.splitlines() if "synthesis=cpu" in line)
    gen = next(line for line in stdout.splitlines() if "synthesis=generator" in line)
    assert "82.00 ± 2.00" in cpu and "72.00 ± 2.65" in gen
    # student / ensemble (0.9): 91.11 ± 2.22; images/s 100, 101, 102: 101.0 ± 1.0;
    # wall time 60, 70, 80: 70.0 ± 10.0; worst class: "one", gap 0.9 - student
    assert "91.11 ± 2.22" in cpu and "101.0 ± 1.0" in cpu and "70.0 ± 10.0" in cpu
    assert "8.0 ± 2.0 (one)" in cpu and "18.0 ± 2.6 (one)" in gen
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert list(rows[0]) == ["protocol", "group", "metric", "unit", "n"] + [
        "mean",
        "std",
        "min",
        "max",
        "note",
    ]
    cell = {(r["group"], r["metric"]): r for r in rows}
    s = cell[("synthesis=generator", "student_acc")]
    assert s["protocol"] == "oneshot" and s["unit"] == "fraction" and s["n"] == "3"
    assert float(s["mean"]) == pytest.approx(0.72)
    assert float(s["std"]) == pytest.approx(math.sqrt(0.0014 / 2))
    assert (float(s["min"]), float(s["max"])) == (0.70, 0.75)
    gap = cell[("synthesis=cpu", "worst_class_gap")]
    assert float(gap["mean"]) == pytest.approx(0.08) and gap["note"] == "class one"
    md = (out / "compare.md").read_text()
    assert "| synthesis=cpu | 3 | 82.00 ± 2.00 |" in md
    assert "`synthesis.name`" in md and "compare_oneshot.png" in md


def test_the_figure_shows_a_curve_per_group(sweep):
    import matplotlib.image

    cmp = compare([sweep], sweep.parent / "figs")
    assert cmp.figures == {"oneshot": "compare_oneshot.png"}
    img = matplotlib.image.imread(sweep.parent / "figs" / "compare_oneshot.png")
    assert img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not blank


def test_one_run_alone_is_a_table_with_n_1(tmp_path, capsys):
    run = write_run(tmp_path / "only", oneshot_results("cpu", 0, 0.8))
    code, out, _ = run_cli(capsys, run / "results.json", "--out", tmp_path / "o")
    assert code == 0
    row = next(line for line in out.splitlines() if "all runs" in line)
    assert " 1 " in row and "80.00" in row and "±" not in row
    rows = list(csv.DictReader((tmp_path / "o" / "compare.csv").open()))
    assert rows[0]["n"] == "1" and rows[0]["std"] == ""


def test_protocols_are_compared_apart(tmp_path, capsys):
    write_run(tmp_path / "s" / "oneshot", oneshot_results("cpu", 0, 0.8))
    for seed, final in enumerate([[0.7, 0.75], [0.74, 0.77]]):
        write_run(tmp_path / "s" / f"fedmd_{seed}", fedmd_results(seed, final))
    code, out, _ = run_cli(capsys, tmp_path / "s", "--out", tmp_path / "o")
    assert code == 0
    assert "== one-shot (1 runs)" in out and "== FedMD (2 runs)" in out
    fedmd_part = out.split("== FedMD")[1]
    # final means 0.725 and 0.755: 74.00 ± 2.12; gap closed 0.35/0.6, 0.41/0.6: 63.33 ± 7.07
    assert "74.00 ± 2.12" in fedmd_part and "63.33 ± 7.07" in fedmd_part
    assert "student" not in fedmd_part
    rows = list(csv.DictReader((tmp_path / "o" / "compare.csv").open()))
    assert {r["protocol"] for r in rows} == {"oneshot", "fedmd"}
    assert {r["metric"] for r in rows if r["protocol"] == "fedmd"} == {
        "alone",
        "alone_extended",
        "final",
        "pooled",
        "gain",
        "gap_closed",
        "wall_time_s",
    }
    assert (tmp_path / "o" / "compare_fedmd.png").is_file()


# ============================================================================ bad inputs


def test_bad_runs_are_one_line_each_and_the_rest_compared(sweep, capsys):
    (sweep / "broken").mkdir()
    (sweep / "broken" / "results.json").write_text('{"teacher_acc": [0.5], ')
    (sweep / "partial" / "teachers").mkdir(parents=True)
    (sweep / "partial" / "split.json").write_text("{}")
    bad = oneshot_results("cpu", 3, 0.8)
    bad["student_acc"] = "high"
    write_run(sweep / "wrong_type", bad)
    write_run(sweep / "list", {}).joinpath("results.json").write_text("[1, 2]")
    missing = sweep.parent / "no_such_run"
    code, out, err = run_cli(capsys, sweep, missing, "--out", sweep.parent / "o")
    assert code == 0 and err == ""
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 5
    text = "\n".join(skipped)
    assert f"{sweep / 'broken' / 'results.json'} is not valid JSON" in text
    assert "partial run, no results.json yet (has split.json, teachers)" in text
    assert "'student_acc' has an unexpected value \"high\"" in text
    assert "must hold a JSON object" in text
    assert f"skipped {missing}: no such file or folder" in text
    assert "synthesis=cpu" in out and "synthesis=generator" in out  # the good six still compared
    md = (sweep.parent / "o" / "compare.md").read_text()
    assert "## Skipped" in md and "partial run" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "o"], "no PATH given"),
        (["x"], "--out DIR is required"),
        (["x", "--out"], "--out needs a value"),
        (["x", "--out", "o", "--colour"], "unknown option '--colour'"),
        (["does_not_exist", "--out", "o"], "nothing to compare"),
    ],
)
def test_bad_command_lines_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_only_malformed_results_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "results.json").write_text("not json")
    code, out, err = run_cli(capsys, run, "--out", tmp_path / "o")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert str(run / "results.json") in err and "not valid JSON" in err
    assert not (tmp_path / "o").exists()


def test_compare_starts_without_torch(tmp_path):
    write_run(tmp_path / "r", oneshot_results("cpu", 0, 0.8))
    code = (
        "import sys; from fed_distill.cli import main; "
        f"rc = main(['compare', {str(tmp_path / 'r')!r}, '--out', {str(tmp_path / 'o')!r}]); "
        "assert rc == 0; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ============================================================================ the benchmarks


def test_oneshot_benchmark_prints_compares_table_with_its_anchors(
    tmp_path, monkeypatch, capsys, benchmark_module
):
    bench = benchmark_module("oneshot")
    out = tmp_path / "bench"
    for seed, acc in ((0, 0.8), (1, 0.84)):
        r = oneshot_results("cpu", seed, acc)
        r["config"]["split"] = {"name": "dirichlet", "alpha": 0.5}
        run = write_run(bench.run_dir(out, 0.5, seed, False), r)
        (run / "teachers").mkdir()
        for i in range(2):  # 90 s of teacher training per run
            (run / "teachers" / f"metrics_teacher_{i}.json").write_text('{"train_time_s": 45}')
    monkeypatch.setattr(bench, "run_one", lambda *a: None)  # the runs above stand for its runs
    monkeypatch.setattr(sys, "argv", ["oneshot.py", "--alphas", "0.5", "--out", str(out)])
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--seed", "0", "1"])
    assert bench.main() == 0
    row = capsys.readouterr().out.splitlines()[2]
    # n = 2, student 82.00 ± 2.83, DENSE's 85.94 and 89.42 at alpha 0.5, 1.5 teacher minutes
    assert row.split()[:2] == ["all", "runs"] and " 2 " in row and "82.00 ± 2.83" in row
    assert "85.94" in row and "89.42" in row and "1.5 ± 0.0" in row
    assert (out / "table.txt").read_text().splitlines()[2] == row
    assert (out / "compare.csv").is_file()


def test_fedmd_benchmark_means_are_the_headline(benchmark_module):
    bench = benchmark_module("fedmd")
    text = bench.report(fedmd_results(0, [0.7, 0.75]))
    mean_row = next(line for line in text.splitlines() if line.strip().startswith("mean"))
    assert mean_row.split()[1:5] == ["0.5500", "0.5650", "0.7250", "0.8500"]
    assert "gap from alone to pooled closed: 58%" in text  # 0.35 / 0.6


# ============================================================================ real runs


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """Two tiny real digits runs, seeds 0 and 1, from one `--multirun` sweep."""
    root = tmp_path_factory.mktemp("compare") / "sweep"
    args = ["oneshot", "--multirun", "dataset=digits", "split=iid", "split.num_clients=2"]
    args += [*FAST_TRAIN, "synthesis.iterations=10", "synthesis.batch_size=32"]
    args += ["student.epochs=2", "student.initial_batches=1", "student.steps_per_epoch=3"]
    args += ["seed=0,1", f"run_dir={root}/s${{seed}}", "progress=false"]
    assert main(args) == 0
    return root


def test_a_real_sweep_compares_to_its_results(real_sweep, capsys):
    out = real_sweep.parent / "cmp"
    code, stdout, _ = run_cli(capsys, real_sweep, "--out", out)
    assert code == 0
    results = [json.loads((real_sweep / f"s{s}" / "results.json").read_text()) for s in (0, 1)]
    acc = [r["student_acc"] for r in results]
    mean, std = sum(acc) / 2, abs(acc[0] - acc[1]) / math.sqrt(2)
    row = next(line for line in stdout.splitlines() if "all runs" in line)
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in row
    assert " 2 " in row and "(" in row  # n = 2; the worst class gap names its class
    assert (out / "compare_oneshot.png").is_file() and (out / "compare.md").is_file()
    assert "one group" in (out / "compare.md").read_text()  # runs differ only in seed
