"""The foundation commands end to end on real data (scikit-learn digits, Fashion-MNIST where
present), and every bad input of the foundation issue: one clear line, non-zero exit, no
traceback, nothing earlier overwritten."""

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST_TRAIN
from fed_distill.artifacts import read_weights
from fed_distill.data.sources import find_dataset_dir


def _split(cli, run_dir, *overrides: str) -> dict:
    """`fed-distill split` into ``run_dir`` (which must succeed); the split.json it wrote."""
    code, _, err = cli("split", *overrides, f"run_dir={run_dir}")
    assert code == 0, err
    return json.loads((run_dir / "split.json").read_text())


def _teacher_metrics(run_dir, n: int) -> list[dict]:
    """The metrics files of teachers 0 .. n-1."""
    return [
        json.loads((run_dir / "teachers" / f"metrics_teacher_{i}.json").read_text())
        for i in range(n)
    ]


@pytest.mark.accuracy
def test_split_then_train_teachers_on_digits(cli, tmp_path):
    split = _split(
        cli,
        tmp_path,
        "dataset=digits",
        "split=dirichlet",
        "split.alpha=0.3",
        "split.num_clients=7",
        "seed=3",
    )
    assert split["dataset"] == "digits" and len(split["clients"]) == 7
    assert (tmp_path / "split.png").stat().st_size > 1000
    code, out, err = cli("train-teachers", f"run_dir={tmp_path}", *FAST_TRAIN)
    assert code == 0, err
    metrics = _teacher_metrics(tmp_path, 7)
    for i, m in enumerate(metrics):
        for key in ["train_loss", "train_acc", "val_acc", "local_test_acc", "test_acc"]:
            assert key in m
        assert 0.0 <= m["test_acc"] <= 1.0
        assert f"teacher {i}:" in out
        assert read_weights(tmp_path / "teachers" / f"teacher_{i}.safetensors")
    # local test accuracy is far above chance: teachers learnt their clients' data
    assert np.mean([m["local_test_acc"] for m in metrics]) > 0.5


def test_teachers_share_one_initialisation_and_rerun_is_reused(cli, tmp_path):
    _split(cli, tmp_path, "dataset=digits", "split=iid", "split.num_clients=2")
    args = (
        "train-teachers",
        f"run_dir={tmp_path}",
        "train.epochs=1",
        "train.min_steps=0",
        "train.lr=0.0",
        "train.weight_decay=0.0",
        "device=cpu",
    )
    assert cli(*args)[0] == 0
    w0 = read_weights(tmp_path / "teachers" / "teacher_0.safetensors")
    w1 = read_weights(tmp_path / "teachers" / "teacher_1.safetensors")
    conv = [k for k in w0 if k.endswith("weight") and w0[k].dim() == 4][0]
    assert (w0[conv] == w1[conv]).all()  # lr=0: both are still the shared initialisation
    before = (tmp_path / "teachers" / "teacher_0.safetensors").stat().st_mtime_ns
    code, out, _ = cli(*args)
    assert code == 0 and "already trained" in out
    assert (tmp_path / "teachers" / "teacher_0.safetensors").stat().st_mtime_ns == before


@pytest.mark.accuracy
@pytest.mark.skipif(
    find_dataset_dir("fashion_mnist") is None, reason="Fashion-MNIST files not installed"
)
def test_fashion_mnist_split_and_one_teacher(cli, tmp_path):
    split = _split(
        cli,
        tmp_path,
        "dataset=fashion_mnist",
        "split=dirichlet",
        "split.alpha=0.5",
        "split.num_clients=20",
    )
    assert sum(len(c["train"]) + len(c["val"]) for c in split["clients"]) == 60000
    code, out, err = cli(
        "train-teachers", f"run_dir={tmp_path}", "train.epochs=1", "train.min_steps=0", "device=cpu"
    )
    assert code == 0, err
    accs = [m["local_test_acc"] for m in _teacher_metrics(tmp_path, 20)]
    assert np.mean(accs) > 0.5  # one epoch on ~2.7k images per client


def test_cfg_prints_every_key(cli):
    code, out, _ = cli("split", "--cfg", "dataset=digits")
    assert code == 0
    for key in ["dataset:", "split:", "model:", "train:", "alpha:", "num_clients:", "epochs:"]:
        assert key in out


def _one_line_error(code, out, err):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["split", "dataset=nonexistent"], "unknown dataset 'nonexistent'"),
        (["split", "dataset=digits", "model=resnet9000"], "unknown model 'resnet9000'"),
        (["split", "dataset=digits", "split.alpha=0"], "alpha must be > 0"),
        (["split", "dataset=digits", "split.alpha=-0.5"], "alpha must be > 0"),
        (["split", "dataset=digits", "split=iid", "split.num_clients=5000"], "among 5000 clients"),
        (
            ["split", "dataset=digits", "split=classes", "split.classes=[[0,1],[10]]"],
            "names class 10",
        ),
        (["split", "dataset=digits", "split.alhpa=0.3"], "unknown config key 'split.alhpa'"),
        (["split", "dataset=digits", "split.num_clients=five"], "split.num_clients"),
        (["split", "dataset=digits", "split=nonsense"], "unknown split 'nonsense'"),
        (["nonstage"], "unknown stage"),
    ],
)
def test_bad_input_one_line(cli, tmp_path, args, expected):
    code, out, err = cli(*args, f"run_dir={tmp_path}")
    assert expected in _one_line_error(code, out, err)
    assert not (tmp_path / "split.json").exists()


def test_failed_split_keeps_the_earlier_one(cli, tmp_path):
    _split(cli, tmp_path, "dataset=digits", "split=iid", "split.num_clients=3")
    before = (tmp_path / "split.json").read_bytes()
    _one_line_error(*cli("split", "dataset=digits", "split.alpha=0", f"run_dir={tmp_path}"))
    assert (tmp_path / "split.json").read_bytes() == before


def test_train_teachers_without_split(cli, tmp_path):
    line = _one_line_error(*cli("train-teachers", f"run_dir={tmp_path}"))
    assert "no split file" in line and "fed-distill split" in line


def test_split_made_for_another_dataset(cli, tmp_path):
    _split(cli, tmp_path, "dataset=digits", "split=iid", "split.num_clients=2")
    line = _one_line_error(*cli("train-teachers", f"run_dir={tmp_path}", "dataset=mnist5k"))
    assert "made for dataset 'digits'" in line
    # a split file edited to claim another dataset of the same name is caught by its labels
    d = json.loads((tmp_path / "split.json").read_text())
    d["label_digest"] = "0" * 16
    (tmp_path / "split.json").write_text(json.dumps(d))
    assert "labels do not match" in _one_line_error(*cli("train-teachers", f"run_dir={tmp_path}"))


@pytest.fixture
def no_data_env(tmp_path, monkeypatch):
    """No dataset cache, no $FED_DISTILL_DATA: only what a test writes exists."""
    monkeypatch.delenv("FED_DISTILL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_missing_dataset_files(cli, tmp_path, no_data_env):
    if Path("/usr/share/datasets/mnist").exists():
        pytest.skip("MNIST is installed system-wide here")
    line = _one_line_error(
        *cli(
            "split",
            "dataset=mnist",
            "dataset.download=false",
            f"dataset.data_dir={tmp_path}",
            f"run_dir={tmp_path / 'r'}",
        )
    )
    assert "mnist" in line and "fed-distill data fetch mnist" in line


def test_truncated_dataset_files(cli, tmp_path, no_data_env):
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix, n in (("train", 60), ("t10k", 10)):
        with gzip.open(d / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(
                struct.pack(">IIII", 2051, n, 28, 28) + bytes(28 * 28 * n // 2)
            )  # half the pixels
        with gzip.open(d / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + bytes(n))
    line = _one_line_error(
        *cli(
            "split",
            "dataset=mnist",
            f"dataset.data_dir={d}",
            "dataset.download=false",
            f"run_dir={tmp_path / 'r'}",
        )
    )
    assert "mnist" in line


def test_console_script_prints_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("fed-distill")
    env = {**os.environ, "FED_DISTILL_NO_PROGRESS": "1"}
    r = subprocess.run(
        [str(exe), "split", "dataset=digits", "split.alpha=0", f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_multirun_sweeps_seeds(tmp_path):
    exe = Path(sys.executable).with_name("fed-distill")
    env = {**os.environ, "FED_DISTILL_NO_PROGRESS": "1"}
    r = subprocess.run(
        [
            str(exe),
            "split",
            "--multirun",
            "dataset=digits",
            "split=iid",
            "seed=1,2",
            f"run_dir={tmp_path}/s${{seed}}",
            f"hydra.sweep.dir={tmp_path}/multirun",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "s1" / "split.json").read_text())
    b = json.loads((tmp_path / "s2" / "split.json").read_text())
    assert a["seed"] == 1 and b["seed"] == 2 and a["clients"] != b["clients"]


def test_data_info(cli):
    code, out, _ = cli("data", "info", "digits")
    assert code == 0 and "10" in out and "1347 train" in out
    assert "unknown" in _one_line_error(*cli("data", "info", "imagenet")).lower()
