"""logger=tensorboard (issue 20): event files under run_dir/tb/, read back with TensorBoard's own
reader; without the package, one line saying how to install it."""

import json
import sys

import pytest

from conftest import FAST_TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *FAST_TRAIN,
    "dataset=digits",
    "split=iid",
    "split.num_clients=2",
    "seed=0",
    "synthesis.iterations=5",
    "synthesis.batch_size=32",
    "student.epochs=3",
    "student.initial_batches=1",
    "student.new_batches_per_epoch=1",
    "student.steps_per_epoch=5",
    "student.batch_size=32",
]


def read_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of every event file under run_dir/tb/."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_oneshot_logs_every_teacher_and_student_epoch(cli, tmp_path):
    pytest.importorskip("tensorboard")
    code, _, err = cli("oneshot", *TINY, "logger=tensorboard", f"run_dir={tmp_path}")
    assert code == 0, err
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "no event file in run_dir/tb/"
    s = read_scalars(tmp_path)
    for i in range(2):
        m = json.loads((tmp_path / "teachers" / f"metrics_teacher_{i}.json").read_text())
        epochs = len(m["train_loss"])
        assert epochs >= 2
        for key in ("train_loss", "train_acc", "lr"):
            assert [step for step, _ in s[f"teacher_{i}/{key}"]] == list(range(1, epochs + 1))
        # val_acc only where the loop evaluated (null in the metrics elsewhere: not logged)
        evaluated = [e + 1 for e, v in enumerate(m["val_acc"]) if v is not None]
        assert evaluated and [step for step, _ in s[f"teacher_{i}/val_acc"]] == evaluated
        assert [v for _, v in s[f"teacher_{i}/train_loss"]] == pytest.approx(m["train_loss"])
        assert s[f"teacher_{i}/test_acc"] == [(m["best_epoch"] + 1, pytest.approx(m["test_acc"]))]
    student = json.loads((tmp_path / "student" / "metrics.json").read_text())
    for key in ("loss", "train_acc", "pool_size", "synthesis_s", "elapsed_s"):
        assert [step for step, _ in s[f"student/{key}"]] == [1, 2, 3], key
    assert [v for _, v in s["student/loss"]] == pytest.approx(student["loss"])
    r = json.loads((tmp_path / "results.json").read_text())
    assert s["student/test_acc"][-1] == (3, pytest.approx(r["student_acc"]))
    assert [step for step, _ in s["synthesis/initial_batch_s"]] == [1]


def test_no_event_files_without_the_logger(cli, tmp_path):
    code, _, err = cli("split", *TINY, f"run_dir={tmp_path}")
    assert code == 0, err
    assert not (tmp_path / "tb").exists()


def test_missing_tensorboard_is_one_line_before_any_work(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    code, out, err = cli("oneshot", *TINY, "logger=tensorboard", f"run_dir={tmp_path}")
    assert code == 1
    assert err.strip() == (
        "error: logger=tensorboard needs the tensorboard package:"
        " pip install 'fed-distill[tensorboard]' (or run with logger=none)"
    )
    assert not (tmp_path / "split.json").exists()
    code, _, err = cli("split", *TINY, "logger=wandb", f"run_dir={tmp_path}")
    assert code == 1 and "logger must be one of none, tensorboard, got 'wandb'" in err


@pytest.mark.slow
def test_fedmd_logs_every_round(cli, tmp_path):
    pytest.importorskip("tensorboard")
    two_rounds = ["fedmd=quick", "fedmd.rounds=2", "fedmd.parties=[fedmd_1,fedmd_6]"]
    code, _, err = cli("fedmd", *two_rounds, "logger=tensorboard", f"run_dir={tmp_path}")
    assert code == 0, err
    r = json.loads((tmp_path / "results.json").read_text())
    s = read_scalars(tmp_path)
    for i, accs in enumerate(r["party_acc"]):
        assert s[f"party_{i}/private_acc"] == [(k, pytest.approx(a)) for k, a in enumerate(accs)]
    assert [step for step, _ in s["fedmd/mean_acc"]] == [0, 1, 2]
    assert [step for step, _ in s["fedmd/round_s"]] == [1, 2]
