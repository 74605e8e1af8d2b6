"""The same seed gives the same numbers on CPU: split, teachers, synthesis, student and FedMD,
each run twice into two run folders and compared exactly (tensors bit for bit)."""

import json

import pytest
import torch

from fed_distill.artifacts import load_tensors, read_weights

SPLIT = ["dataset=digits", "split=dirichlet", "split.alpha=0.5", "split.num_clients=3", "seed=4"]
TRAIN = ["train.epochs=2", "train.min_steps=40", "device=cpu"]
SERVER = [
    "device=cpu",
    "synthesis.iterations=10",
    "synthesis.batch_size=32",
    "student.initial_batches=1",
    "student.epochs=2",
    "student.steps_per_epoch=4",
    "student.batch_size=32",
]
FEDMD = [
    "fedmd=quick",
    "seed=5",
    "device=cpu",
    "progress=false",
    "fedmd.public_size=300",
    "fedmd.public_val_size=60",
    "fedmd.public_epochs=1",
    "fedmd.private_epochs=2",
    "fedmd.rounds=2",
    "fedmd.public_subset_size=60",
    "fedmd.pooled_epochs=1",
    "fedmd.parties=[fedmd_1,fedmd_6]",
]


# one thread, here and in the CLI (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_numbers_oneshot_stages(cli, tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        for stage, args in (
            ("split", SPLIT),
            ("train-teachers", TRAIN),
            ("generate-initial", SERVER),
            ("train-student", SERVER),
        ):
            code, _, err = cli(stage, f"run_dir={d}", *args)
            assert code == 0, err
    a, b = dirs
    assert (a / "split.json").read_bytes() == (b / "split.json").read_bytes()
    for i in range(3):
        _tensors_equal(
            read_weights(a / f"teachers/teacher_{i}.safetensors"),
            read_weights(b / f"teachers/teacher_{i}.safetensors"),
        )
        ma, mb = (json.loads((d / f"teachers/metrics_teacher_{i}.json").read_text()) for d in dirs)
        _tensors_equal(
            read_weights(a / f"teachers/class_stats_{i}.safetensors"),
            read_weights(b / f"teachers/class_stats_{i}.safetensors"),
        )
        for timing in ("train_time_s", "class_stats_s"):
            ma.pop(timing), mb.pop(timing)
        assert ma == mb
    _tensors_equal(load_tensors(a / "student/initial.pt"), load_tensors(b / "student/initial.pt"))
    _tensors_equal(
        read_weights(a / "student/student.safetensors"),
        read_weights(b / "student/student.safetensors"),
    )
    sa, sb = (json.loads((d / "student/metrics.json").read_text()) for d in dirs)
    for key in ("loss", "train_acc", "test_acc", "val_acc", "pool_size", "fingerprint"):
        assert sa[key] == sb[key], key

    # Finished stages are skipped; teachers retrained with force=true come out identical, so
    # the synthetic data and the student made from them are still current.
    code, out, _ = cli("train-teachers", f"run_dir={a}", "force=true", *TRAIN)
    assert code == 0 and "already trained" not in out
    _tensors_equal(
        read_weights(a / "teachers/teacher_0.safetensors"),
        read_weights(b / "teachers/teacher_0.safetensors"),
    )
    for stage, message in (
        ("generate-initial", "initial batches already generated"),
        ("train-student", "student already trained"),
    ):
        code, out, _ = cli(stage, f"run_dir={a}", *SERVER)
        assert code == 0 and message in out and "force=true to redo" in out
    other = [o for o in SERVER if not o.startswith("student.epochs=")] + ["student.epochs=3"]
    code, out, _ = cli("train-student", f"run_dir={a}", *other)
    assert code == 0 and "student already trained" not in out  # other settings: trained anew


def test_same_seed_same_numbers_fedmd(cli, tmp_path):
    results = []
    for d in (tmp_path / "a", tmp_path / "b"):
        code, _, err = cli("fedmd", f"run_dir={d}", *FEDMD)
        assert code == 0, err
        results.append(json.loads((d / "results.json").read_text()))
    a, b = results
    for key in ("party_acc", "alone_acc", "pooled_acc", "alone_extended_acc", "consensus_distance"):
        assert a[key] == b[key], key
    for i in range(2):
        _tensors_equal(
            read_weights(tmp_path / f"a/parties/party_{i}.safetensors"),
            read_weights(tmp_path / f"b/parties/party_{i}.safetensors"),
        )
