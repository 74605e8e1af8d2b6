"""``fed-distill compare`` given bad input (issue 39): an ``--out`` that cannot take the files
is one ``error:`` line before anything is read or written; accuracies outside [0, 1] or not
finite skip their run with a line naming it; a FedMD run is not labelled by the one-shot
``synthesis`` it never ran; an earlier comparison being replaced is said."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fed_distill.cli import main
from test_compare import fedmd_results, oneshot_results, write_run


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def one_run(tmp_path) -> Path:
    return write_run(tmp_path / "runs" / "a", oneshot_results("cpu", 0, 0.8))


def assert_one_error(code: int, out: str, err: str, *parts: str) -> None:
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in parts:
        assert part in err, err


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_that_is_or_lies_under_a_file_is_one_line_and_nothing_changes(
    tmp_path, capsys, one_run, where
):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "sub" / "dir"
    before = snapshot(tmp_path)
    code, stdout, err = run_cli(capsys, one_run, "--out", out)
    assert_one_error(code, stdout, err, f"--out {out}", "choose another --out")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's")
def test_out_in_a_read_only_place_is_one_line(tmp_path, capsys, one_run):
    # /sys refuses new folders even to root, where a chmod'ed folder would not
    out = Path("/sys/fed-distill-compare-test")
    code, stdout, err = run_cli(capsys, one_run, "--out", out)
    assert_one_error(code, stdout, err, f"--out {out}", "cannot be created")
    assert not out.exists()


def test_a_compare_file_that_is_a_folder_is_refused_up_front(tmp_path, capsys, one_run):
    out = tmp_path / "o"
    (out / "compare.md").mkdir(parents=True)
    code, stdout, err = run_cli(capsys, one_run, "--out", out)
    assert_one_error(code, stdout, err, "compare.md there is not a file")
    assert sorted(p.name for p in out.iterdir()) == ["compare.md"]


def test_the_out_check_comes_before_reading_the_runs(tmp_path, capsys):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("x")
    code, stdout, err = run_cli(capsys, tmp_path / "no_such_run", "--out", blocker)
    assert_one_error(code, stdout, err, "is a file, not a folder")


def test_replacing_an_earlier_comparison_is_said(tmp_path, capsys, one_run):
    out = tmp_path / "o"
    code, first, _ = run_cli(capsys, one_run, "--out", out)
    assert code == 0 and "(replacing the earlier" not in first
    code, again, _ = run_cli(capsys, one_run, "--out", out)
    assert code == 0
    assert "(replacing the earlier compare.md, compare.csv, compare_oneshot.png)" in again


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("student_acc", 7.5, "7.5"),
        ("student_acc", -2, "-2"),
        ("ensemble_acc", math.inf, "Infinity"),
        ("student_acc", math.nan, "NaN"),
        ("teacher_acc", [0.7, 1.5, 0.7], "1.5"),
        ("wall_time_s", -1.0, "-1.0"),
        ("wall_time_s", math.nan, "NaN"),
    ],
)
def test_accuracies_outside_0_1_or_not_finite_skip_the_run_naming_it(
    tmp_path, capsys, one_run, key, value, shown
):
    bad = oneshot_results("cpu", 1, 0.8)
    bad[key] = value
    bad_run = write_run(tmp_path / "runs" / "bad", bad)  # json.dumps writes NaN / Infinity
    code, out, err = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0 and err == ""
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1
    assert str(bad_run) in skipped[0] and f"'{key}' holds {shown}" in skipped[0]
    assert "750.00" not in out and "inf" not in out.split("skipped")[0]
    assert "(1 runs)" in out  # the good run is still compared


@pytest.mark.parametrize(
    "where, value",
    [("class_acc", {"student": [0.5, 2.0, 0.5]}), ("student_curve", {"test_acc": [0.5, -0.1]})],
)
def test_nested_accuracies_are_checked_too(tmp_path, capsys, one_run, where, value):
    bad = oneshot_results("cpu", 1, 0.8)
    bad[where] = {**bad[where], **value}
    write_run(tmp_path / "runs" / "bad", bad)
    code, out, _ = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0 and f"'{where}." in out and "not an accuracy in [0, 1]" in out


def test_fedmd_accuracies_out_of_range_are_skipped(tmp_path, capsys):
    write_run(tmp_path / "runs" / "ok", fedmd_results(0, [0.7, 0.75]))
    write_run(tmp_path / "runs" / "bad", fedmd_results(1, [0.7, 75.0]))
    code, out, _ = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0 and "== FedMD (1 runs)" in out
    assert "'party_acc' holds 75.0, not an accuracy in [0, 1]" in out


def test_only_out_of_range_runs_is_one_error_line(tmp_path, capsys):
    bad = oneshot_results("cpu", 0, 7.5)
    write_run(tmp_path / "runs" / "bad", bad)
    code, out, err = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert_one_error(code, out, err, "nothing to compare", "'student_acc' holds 7.5")
    assert not (tmp_path / "o").exists()


def fedmd_run_with_full_config(seed: int) -> dict:
    """A FedMD results.json whose config, as a real run's, also holds the one-shot groups at
    their defaults (synthesis=cpu) which FedMD never reads."""
    r = fedmd_results(seed, [0.7, 0.75])
    r["config"]["synthesis"] = {"name": "cpu", "lr": 0.25}
    r["config"]["student"] = {"name": "long", "epochs": 3}
    return r


def test_by_synthesis_over_fedmd_runs_is_refused_not_labelled_cpu(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"f{seed}", fedmd_run_with_full_config(seed))
    code, out, err = run_cli(
        capsys, tmp_path / "runs", "--by", "synthesis", "--out", tmp_path / "o"
    )
    assert_one_error(code, out, err, "--by synthesis", "no FedMD run's config has this key")
    assert not (tmp_path / "o").exists()


def test_one_shot_groups_never_split_fedmd_runs(tmp_path, capsys):
    a, b = fedmd_run_with_full_config(0), fedmd_run_with_full_config(1)
    b["config"]["synthesis"]["lr"] = 0.5  # differs, but FedMD never read it
    write_run(tmp_path / "runs" / "a", a)
    write_run(tmp_path / "runs" / "b", b)
    code, out, _ = run_cli(capsys, tmp_path / "runs", "--out", tmp_path / "o")
    assert code == 0 and "synthesis" not in out and "all runs" in out
    md = json.dumps((tmp_path / "o" / "compare.md").read_text())
    assert "synthesis" not in md
