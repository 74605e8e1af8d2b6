"""`fed-distill refit` and `oneshot refit=head` on real digits run folders: what they write, the
re-fitted student's accuracy against the distilled one, bad uploads refused before any work,
uploads of another round redone, and a resumed round reusing the uploads it had."""

import json
import pickle
import shutil

import pytest
import torch

from conftest import TINY_ONESHOT
from fed_distill.artifacts import read_weights, save_weights
from fed_distill.feature_stats import read_feature_stats, save_feature_stats

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["dataset=digits", "split.num_clients=3", "progress=false", *TINY_ONESHOT]
REFIT = ["refit.steps=600", "refit.features=penultimate"]  # the map: its own test below


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-shot run folder (refit=none), made once; tests work on copies."""
    from fed_distill.cli import main

    run = tmp_path_factory.mktemp("oneshot") / "run"
    assert main(["oneshot", *TINY, f"run_dir={run}"]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def _results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def test_refit_stage_adds_the_refitted_student_beside_the_one_shot_one(cli, run):
    before = _results(run)
    code, out, err = cli("refit", f"run_dir={run}", *REFIT)
    assert code == 0, err
    after = _results(run)
    assert after["student_acc"] == before["student_acc"]  # the one-shot number stays
    assert 0 <= after["student_refit_acc"] <= 1 and len(after["class_acc"]["student_refit"]) == 10
    assert after["refit"]["clients"] == [0, 1, 2] and after["refit"]["feature_dim"] == 32
    assert after["refit"]["upload_floats_per_client"] == 10 + 10 * 32 + 10 * 32 * 32
    assert (run / "student" / "student_refit.safetensors").is_file()
    for i in range(3):
        _, said = read_feature_stats(run / "feedback" / f"feature_stats_{i}.safetensors")
        assert said["student"] and said["round"]
    assert "test accuracy" in out
    code, out, _ = cli("refit", f"run_dir={run}", *REFIT)
    assert code == 0 and "already re-fitted" in out
    assert _results(run)["student_refit_acc"] == after["student_refit_acc"]


@pytest.mark.accuracy
def test_refitted_student_beats_the_distilled_one(cli, run):
    # Tiny digits run (3 teachers, 3 student epochs): the distilled student is near chance
    # (0.10-0.39 seen) and the re-fitted one 0.55-0.85 (1 and 2 threads, student.seed 0-2).
    for seed in (0, 1):
        code, _, err = cli("refit", f"run_dir={run}", *REFIT, f"refit.seed={seed}")
        assert code == 0, err
        r = _results(run)
        assert r["student_refit_acc"] >= r["student_acc"] + 0.15, (seed, r["student_refit_acc"])
        assert r["student_refit_acc"] >= 0.45


def _tamper(path, kind: str) -> None:
    st, said = read_feature_stats(path)
    if kind == "pickle":
        path.write_bytes(pickle.dumps(st))
        return
    if kind == "nan":
        st["sum"][0, 0] = float("nan")
    elif kind == "shape":
        st["outer"] = st["outer"][:, :5, :5].contiguous()
    elif kind == "negative count":
        st["counts"][0] = -3
    elif kind == "not psd":
        st["outer"] = -st["outer"]
    save_feature_stats(st, path, said)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("nan", "contains NaN or Inf"),
        ("shape", "has shape (10, 5, 5), expected (10, 32, 32)"),
        ("negative count", "whole numbers >= 0"),
        ("not psd", "not positive semi-definite"),
        ("pickle", "refusing to unpickle"),
    ],
)
def test_bad_upload_is_one_line_naming_the_client_before_any_work(cli, run, kind, words):
    assert cli("refit", f"run_dir={run}", *REFIT)[0] == 0
    (run / "student" / "refit.json").unlink()
    (run / "student" / "student_refit.safetensors").unlink()
    results = (run / "results.json").read_bytes()
    _tamper(run / "feedback" / "feature_stats_1.safetensors", kind)
    code, out, err = cli("refit", f"run_dir={run}", *REFIT)
    assert code == 1 and err.startswith("error: client 1") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (run / "student" / "student_refit.safetensors").exists()
    assert (run / "results.json").read_bytes() == results  # nothing earlier lost


def test_uploads_of_another_student_are_redone_and_a_resumed_round_reuses_its_own(cli, run):
    assert cli("refit", f"run_dir={run}", *REFIT)[0] == 0
    first = read_weights(run / "student" / "student_refit.safetensors")
    fb = run / "feedback"
    # a kill after the uploads, before the head: the round resumes from the uploads it has
    (run / "student" / "refit.json").unlink()
    stamp = {i: (fb / f"feature_stats_{i}.safetensors").stat().st_mtime_ns for i in range(3)}
    # client 2's file is from an earlier round (another student): asked again
    st, said = read_feature_stats(fb / "feature_stats_2.safetensors")
    save_feature_stats(st, fb / "feature_stats_2.safetensors", {**said, "student": "0" * 16})
    code, out, err = cli("refit", f"run_dir={run}", *REFIT)
    assert code == 0, err
    assert "feature_stats_2.safetensors is from an earlier round" in out
    for i in (0, 1):
        assert (fb / f"feature_stats_{i}.safetensors").stat().st_mtime_ns == stamp[i]
    assert read_feature_stats(fb / "feature_stats_2.safetensors")[1] == said
    again = read_weights(run / "student" / "student_refit.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_changed_student_redoes_the_round(cli, run):
    assert cli("refit", f"run_dir={run}", *REFIT)[0] == 0
    w = read_weights(run / "student" / "student.safetensors")
    w["fc.bias"] = w["fc.bias"] + 1.0  # as if train-student had been rerun
    save_weights(w, run / "student" / "student.safetensors")
    code, out, _ = cli("refit", f"run_dir={run}", *REFIT)
    assert code == 0 and "already re-fitted" not in out
    assert "earlier round" in out  # every upload was for the old student


def test_noise_changes_the_uploads_and_clip_bounds_them(cli, run):
    assert cli("refit", f"run_dir={run}", *REFIT)[0] == 0
    exact, _ = read_feature_stats(run / "feedback" / "feature_stats_0.safetensors")
    code, out, err = cli("refit", f"run_dir={run}", *REFIT, "refit.noise=0.1", "refit.clip=5")
    assert code == 0, err
    noisy, _ = read_feature_stats(run / "feedback" / "feature_stats_0.safetensors")
    assert torch.equal(noisy["counts"], exact["counts"])
    assert not torch.allclose(noisy["sum"], exact["sum"])
    assert 0 <= _results(run)["student_refit_acc"] <= 1


def test_oneshot_with_refit_head_prints_both_students(cli, tmp_path):
    code, out, err = cli("oneshot", *TINY, f"run_dir={tmp_path}", "refit=head", *REFIT)
    assert code == 0, err
    r = _results(tmp_path)
    assert r["config"]["refit"]["method"] == "head" and "refit" in r["stage_times_s"]
    assert "student (one-shot, data-free)" in out and "student + statistics round" in out
    assert "student + statistics round vs ensemble" in out  # its own worst classes
    assert r["student_refit_acc"] is not None and r["student_acc"] is not None


def test_refit_benchmark_prints_every_row(benchmark_module, run, capsys):
    bench = benchmark_module("refit")
    bench.bench(run, seeds=[0], quick=True)
    out = capsys.readouterr().out
    labels = [
        "as distilled",
        *bench.HEAD_VARIANTS,
        "bound: penultimate head on real",
        "bound: map head on real",
        "AdaBN + map head",
        "2nd round: body on pool + map head",
    ]
    for label in labels:
        assert f"| {label}" in out, label
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "row" not in ln]
    assert len(rows) == 2 + len(bench.HEAD_VARIANTS) + 4
    for ln in rows:  # every accuracy a percentage
        assert 0 <= float(ln.split("|")[2]) <= 100


def test_refit_with_teachers_of_different_architectures(cli, tmp_path):
    # the round touches only the student: mixed teachers (no FedAvg) change nothing for it
    mixed = "teachers.models=[cnn_small,resnet8]"
    code, out, err = cli("oneshot", *TINY, mixed, f"run_dir={tmp_path}", "refit=head", *REFIT)
    assert code == 0, err
    r = _results(tmp_path)
    assert r["fedavg_acc"] is None and r["refit"]["clients"] == [0, 1, 2]
    assert 0 <= r["student_refit_acc"] <= 1 and r["refit"]["feature_dim"] == 32
