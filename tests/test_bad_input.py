"""A fuzz list of malformed inputs: configs, split files, checkpoints, synthetic datasets, class
scores, dataset files, result files. For each one: a non-zero exit with one ``error:`` line and
no traceback (CLI), or a typed FedDistillError (API); and every file already in the run folder
is byte-for-byte what it was. Then: planted malicious pickles are refused and never run."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN
from fed_distill.artifacts import read_weights, save_tensors, save_weights
from fed_distill.errors import ConfigError, FedDistillError, ProtocolError
from fed_distill.federated.fedmd import aggregate, validate_report, validate_scores
from fed_distill.federated.rules import list_rules
from fed_distill.federated.rules.average import MeanOptions
from fed_distill.report import write_report

# the smallest synthesis and student: 5 steps a batch, one initial batch, one epoch of 2 steps
SMALL_STUDENT = [
    "synthesis.iterations=5",
    "synthesis.batch_size=32",
    "student.epochs=1",
    "student.initial_batches=1",
    "student.steps_per_epoch=2",
]
TINY = [*FAST_TRAIN, "train.epochs=1", *SMALL_STUDENT, "student.batch_size=32"]
STUDENT = ["device=cpu", *SMALL_STUDENT]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One complete tiny one-shot run on digits (split, teachers, initial.pt, student, results)."""
    from fed_distill.cli import main

    run = tmp_path_factory.mktemp("base") / "run"
    code = main(
        [
            "oneshot",
            "dataset=digits",
            "split=iid",
            "split.num_clients=2",
            "seed=1",
            f"run_dir={run}",
            *TINY,
        ]
    )
    assert code == 0
    return run


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(code: int, err: str) -> str:
    assert code != 0, "the command succeeded on malformed input"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- helpers that break files
def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    d = json.loads(path.read_text())
    out = fn(d)
    path.write_text(json.dumps(d if out is None else out))


def split_edit(fn):
    def setup(run: Path) -> list[str]:
        edit_json(run / "split.json", fn)
        return ["train-teachers", f"run_dir={run}", *FAST_TRAIN]

    return setup


def split_bytes(data: bytes):
    def setup(run: Path) -> list[str]:
        (run / "split.json").write_bytes(data)
        return ["train-teachers", f"run_dir={run}", *FAST_TRAIN]

    return setup


def split_truncated(run: Path) -> list[str]:
    raw = (run / "split.json").read_bytes()
    (run / "split.json").write_bytes(raw[: len(raw) // 2])
    return ["train-teachers", f"run_dir={run}", *FAST_TRAIN]


def _set(d: dict, key: str, value) -> None:
    d[key] = value


def _pop(d: dict, key: str) -> None:
    d.pop(key)


def _duplicate_across_clients(d: dict) -> None:
    d["clients"][1]["train"][0] = d["clients"][0]["train"][0]


def _teacher_state(run: Path) -> dict[str, torch.Tensor]:
    # clone: read_weights may memory-map the file, which these helpers then overwrite
    return {
        k: v.clone() for k, v in read_weights(run / "teachers" / "teacher_0.safetensors").items()
    }


def teacher(fn):
    """Break teacher 0; the next stage (generate-initial) must refuse it."""

    def setup(run: Path) -> list[str]:
        fn(run / "teachers" / "teacher_0.safetensors", run)
        return ["generate-initial", f"run_dir={run}", *STUDENT]

    return setup


def _truncate(path: Path, run: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _wrong_shape(path: Path, run: Path) -> None:
    state = _teacher_state(run)
    k = next(k for k, v in state.items() if v.dim() == 4)
    v = state[k]
    state[k] = torch.zeros(v.shape[0] + 1, *v.shape[1:])
    save_weights(state, path)


def _nan_weights(path: Path, run: Path) -> None:
    state = _teacher_state(run)
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k].view(-1)[0] = float("nan")
    save_weights(state, path)


def _missing_key(path: Path, run: Path) -> None:
    state = _teacher_state(run)
    state.pop(next(iter(state)))
    save_weights(state, path)


def _torch_zip(path: Path, run: Path) -> None:
    torch.save(_teacher_state(run), path)  # a plain (harmless) torch checkpoint: still refused


def _plain_pickle(path: Path, run: Path) -> None:
    path.write_bytes(pickle.dumps({k: v.tolist() for k, v in _teacher_state(run).items()}))


def _empty(path: Path, run: Path) -> None:
    path.write_bytes(b"")


def teachers_json(fn):
    def setup(run: Path) -> list[str]:
        edit_json(run / "teachers" / "teachers.json", fn)
        return ["generate-initial", f"run_dir={run}", *STUDENT]

    return setup


def teachers_json_bytes(run: Path) -> list[str]:
    (run / "teachers" / "teachers.json").write_text('{"model": "cnn_small", ')
    return ["generate-initial", f"run_dir={run}", *STUDENT]


def missing_teacher(run: Path) -> list[str]:
    (run / "teachers" / "teacher_1.safetensors").unlink()
    return ["generate-initial", f"run_dir={run}", *STUDENT]


def initial(fn):
    """Break student/initial.pt; train-student must refuse it."""

    def setup(run: Path) -> list[str]:
        path = run / "student" / "initial.pt"
        state = torch.load(path, weights_only=True)
        out = fn(state, path)
        if out is not None:
            save_tensors(out, path)
        return ["train-student", f"run_dir={run}", *STUDENT]

    return setup


def _nan_images(s, path):
    s["images"][0, 0, 0, 0] = float("nan")
    return s


def _bad_image_shape(s, path):
    s["images"] = s["images"][:, :, :4, :4].contiguous()
    return s


def _labels_out_of_range(s, path):
    s["labels"][0] = 10
    return s


def _no_labels(s, path):
    del s["labels"]
    return s


def _not_a_dict(s, path):
    torch.save(s["images"], path)


def _truncated_file(s, path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def results(fn):
    def setup(run: Path) -> list[str]:
        path = run / "results.json"
        if callable(fn):
            edit_json(path, fn)
        else:
            path.write_bytes(fn)
        return ["report", str(run)]

    return setup


def report_dataset_nan(run: Path) -> list[str]:
    path = run / "student" / "dataset.pt"
    s = torch.load(path, weights_only=True)
    s["images"][1, 0, 2, 2] = float("inf")
    save_tensors(s, path)
    return ["report", str(run)]


def report_teacher_metrics(run: Path) -> list[str]:
    edit_json(run / "teachers" / "metrics_teacher_0.json", lambda d: _set(d, "val_acc", "high"))
    return ["report", str(run)]


def report_on(sub: str):
    def setup(run: Path) -> list[str]:
        target = run / sub
        if sub == "empty":
            target.mkdir()
        return ["report", str(target)]

    return setup


def report_args(*args: str):
    def setup(run: Path) -> list[str]:
        return ["report", *[a.format(run=run) for a in args]]

    return setup


def config(*args: str):
    def setup(run: Path) -> list[str]:
        return [*args, f"run_dir={run}"]

    return setup


# ----------------------------------------------------------------------------- dataset files
def _idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{len(dims)}I", magic, *dims) + data)


def mnist_files(kind: str):
    def setup(run: Path) -> list[str]:
        d = run.parent / "mnist_files"
        d.mkdir()
        for prefix, n in (("train", 40), ("t10k", 10)):
            img_magic = 2049 if kind == "magic" and prefix == "train" else 2051
            _idx(d / f"{prefix}-images-idx3-ubyte.gz", img_magic, (n, 28, 28), bytes(28 * 28 * n))
            labels = bytes([12] * n) if kind == "labels" else bytes(i % 10 for i in range(n))
            _idx(d / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels)
        if kind == "gzip":
            p = d / "train-images-idx3-ubyte.gz"
            p.write_bytes(p.read_bytes()[:-20])
        return [
            "split",
            "dataset=mnist",
            f"dataset.data_dir={d}",
            "dataset.download=false",
            f"run_dir={run}",
        ]

    return setup


def cifar_files(kind: str):
    def setup(run: Path) -> list[str]:
        d = run.parent / "cifar_files"
        d.mkdir()
        good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (d / name).write_bytes(pickle.dumps(good))
        bad: object = {
            "not_dict": [1, 2, 3],
            "no_data": {b"labels": [0, 1]},
            "garbage": None,
        }[kind]
        (d / "data_batch_1").write_bytes(os.urandom(64) if bad is None else pickle.dumps(bad))
        return [
            "split",
            "dataset=cifar10",
            f"dataset.data_dir={d}",
            "dataset.download=false",
            f"run_dir={run}",
        ]

    return setup


# fmt: off
CLI_CASES = [
    # --- configs --------------------------------------------------------------------------------
    ("cfg-num-clients-negative", config("split", "dataset=digits", "split=iid", "split.num_clients=-3"), "num_clients must be >= 1"),
    ("cfg-num-clients-zero", config("split", "dataset=digits", "split.num_clients=0"), "num_clients must be >= 1"),
    ("cfg-alpha-nan", config("split", "dataset=digits", "split.alpha=nan"), "alpha"),
    ("cfg-alpha-inf", config("split", "dataset=digits", "split.alpha=inf"), "alpha must be > 0"),
    ("cfg-val-fraction", config("split", "dataset=digits", "split=iid", "split.val_fraction=1.5"), "val_fraction"),
    ("cfg-shards-too-many-classes", config("split", "dataset=digits", "split=shards", "split.classes_per_client=11"), "classes_per_client"),
    ("cfg-heter-percentage", config("split", "dataset=digits", "split=heter", "split.unif_percentage=2"), "unif_percentage"),
    ("cfg-server-clients-all", config("split", "dataset=digits", "split=iid", "split.num_clients=3", "split.server_clients=3"), "server_clients"),
    ("cfg-min-size", config("split", "dataset=digits", "split.min_size=100000"), "min_size"),
    ("cfg-quantity-alpha-inf", config("split", "dataset=digits", "split=quantity", "split.alpha=inf"), "split.alpha must be > 0 and finite, got inf"),
    ("cfg-quantity-min-size", config("split", "dataset=digits", "split=quantity", "split.min_size=400"), "split.min_size=400 x 5 clients exceeds"),
    ("cfg-noise-sigma-negative", config("split", "dataset=digits", "split=noise", "split.sigma=-0.5"), "split.sigma must be a finite number >= 0"),
    ("cfg-noise-sigma-inf", config("split", "dataset=digits", "split=noise", "split.sigma=inf"), "split.sigma must be a finite number >= 0"),
    ("cfg-classes-out-of-range", config("split", "dataset=digits", "split=classes", "split.classes=[[0,1],[10]]"), "client 1 names class 10"),
    ("cfg-unknown-split", config("split", "dataset=digits", "split=niid"), "unknown split 'niid'; available: classes, dirichlet, heter, iid, noise, quantity, shards"),
    ("cfg-fedmd-partition-param", config("fedmd", "fedmd=quick", "fedmd.partition=quantity", "split.alpha=0"), "split.alpha must be > 0"),
    ("cfg-fedmd-partition-unknown", config("fedmd", "fedmd=quick", "fedmd.partition=random"), "fedmd.partition must be one of balanced, writer, subclass"),
    ("cfg-wrong-type-other-group", config("split", "dataset=digits", "train.epochs=many"), "train.epochs"),
    ("cfg-misspelt-nested-key", config("split", "dataset=digits", "synthesis.iteratons=5"), "synthesis.iteratons"),
    ("cfg-unknown-synthesis", config("split", "dataset=digits", "synthesis=nonexistent"), "unknown synthesis 'nonexistent'"),
    ("cfg-unknown-experiment", config("split", "experiment=nope"), "unknown experiment 'nope'"),
    ("cfg-digits-image-size", config("split", "dataset=digits", "dataset.image_size=3"), "image_size"),
    ("cfg-bad-device", lambda run: ["train-teachers", f"run_dir={run}", "device=tpu"], "device must be"),
    ("cfg-student-epochs", lambda run: ["train-student", f"run_dir={run}", "student.epochs=-1"], "student.epochs"),
    ("cfg-synthesis-iterations", lambda run: ["generate-initial", f"run_dir={run}", "synthesis.iterations=0", "device=cpu"], "synthesis.iterations"),
    ("cfg-train-optimizer", lambda run: ["train-teachers", f"run_dir={run}", "train.optimizer=adamw", "force=true", "device=cpu"], "train.optimizer"),
    ("cfg-train-negative-lr", lambda run: ["train-teachers", f"run_dir={run}", "train.lr=-0.1", "force=true", "device=cpu"], "learning rate"),
    ("split-class-counts-not-list", split_edit(lambda d: _set(d["clients"][0], "train_class_counts", 7)), "train_class_counts"),
    ("cfg-fedmd-rounds", config("fedmd", "fedmd=quick", "fedmd.rounds=-1"), "fedmd.rounds"),
    ("cfg-fedmd-revisit-outputs", config("fedmd", "fedmd=quick", "fedmd.revisit_outputs=some"), "fedmd.revisit_outputs must be one of all, held, got 'some'"),
    ("cfg-fedmd-final-revisit", config("fedmd", "fedmd=quick", "fedmd.final_revisit=maybe"), "fedmd.final_revisit=maybe; Value 'maybe' is not a valid bool"),
    ("cfg-fedmd-public-dataset", config("fedmd", "fedmd=quick", "fedmd.public=imagenet"), "imagenet"),
    ("cfg-fedmd-aggregate-unknown", config("fedmd", "fedmd=quick", "fedmd.aggregate=vote"), "fedmd.aggregate must be one of " + ", ".join(list_rules()) + ", got 'vote'"),
    ("cfg-fedmd-sharpen-zero", config("fedmd", "fedmd=quick", "fedmd.sharpen=0"), "fedmd.sharpen must be a finite number > 0 (1 = off)"),
    ("cfg-fedmd-sharpen-negative", config("fedmd", "fedmd=quick", "fedmd.sharpen=-0.5"), "fedmd.sharpen must be a finite number > 0 (1 = off), got -0.5"),
    ("cfg-fedmd-reliability-no-holdout", config("fedmd", "fedmd=quick", "fedmd.aggregate=reliability"), "aggregate=reliability needs fedmd.reliability_holdout >= 1"),
    ("cfg-fedmd-holdout-everything", config("fedmd", "fedmd=quick", "fedmd.aggregate=reliability", "fedmd.reliability_holdout=15"), "fedmd.reliability_holdout=15 leaves party 0 nothing to train on"),
    # --- split files ------------------------------------------------------------------------------
    ("split-truncated", split_truncated, "not valid JSON"),
    ("split-not-json", split_bytes(b"\x00\xffgarbage"), "not valid JSON"),
    ("split-json-list", split_bytes(b"[1, 2, 3]"), "must hold a JSON object"),
    ("split-missing-clients", split_edit(lambda d: _pop(d, "clients")), "lacks 'clients'"),
    ("split-no-clients", split_edit(lambda d: _set(d, "clients", [])), "non-empty list"),
    ("split-index-out-of-range", split_edit(lambda d: d["clients"][0]["train"].append(10**6)), "outside"),
    ("split-negative-index", split_edit(lambda d: d["clients"][0]["test"].append(-1)), "outside"),
    ("split-index-not-int", split_edit(lambda d: d["clients"][0]["val"].append("7")), "list of integers"),
    ("split-duplicate-index", split_edit(_duplicate_across_clients), "more than once"),
    ("split-seed-not-int", split_edit(lambda d: _set(d, "seed", "abc")), "seed"),
    ("split-params-not-object", split_edit(lambda d: _set(d, "params", [1, 2])), "params"),
    ("split-unknown-dataset", split_edit(lambda d: _set(d, "dataset", "imagenet")), "unknown dataset 'imagenet'"),
    ("split-class-counts", split_edit(lambda d: d["clients"][0]["train_class_counts"].reverse()), "class counts"),
    # --- teacher checkpoints ----------------------------------------------------------------------
    ("teacher-truncated", teacher(_truncate), "not a valid safetensors file"),
    ("teacher-empty", teacher(_empty), "not a valid safetensors file"),
    ("teacher-plain-pickle", teacher(_plain_pickle), "refusing to unpickle"),
    ("teacher-torch-zip", teacher(_torch_zip), "refusing to unpickle"),
    ("teacher-wrong-shape", teacher(_wrong_shape), "does not fit the model"),
    ("teacher-nan-weights", teacher(_nan_weights), "NaN or Inf"),
    ("teacher-missing-key", teacher(_missing_key), "missing keys"),
    ("teacher-file-missing", missing_teacher, "weights file not found"),
    ("teachers-json-truncated", teachers_json_bytes, "not valid JSON"),
    ("teachers-json-unknown-model", teachers_json(lambda d: _set(d, "model", "resnet9000")), "unknown model 'resnet9000'"),
    ("teachers-json-count-not-int", teachers_json(lambda d: _set(d, "num_teachers", "two")), "num_teachers"),
    ("teachers-json-missing-key", teachers_json(lambda d: _pop(d, "image_size")), "malformed"),
    ("teachers-json-zero-classes", teachers_json(lambda d: _set(d, "num_classes", 0)), "num_classes"),
    # --- synthetic datasets -------------------------------------------------------------------------
    ("initial-nan", initial(_nan_images), "NaN"),
    ("initial-wrong-shape", initial(_bad_image_shape), "shape"),
    ("initial-labels-out-of-range", initial(_labels_out_of_range), "labels"),
    ("initial-no-labels", initial(_no_labels), "lacks tensor 'labels'"),
    ("initial-not-a-dict", initial(_not_a_dict), "does not hold a dict"),
    ("initial-truncated", initial(_truncated_file), "refused or is corrupt"),
    # --- dataset files ----------------------------------------------------------------------------
    ("idx-wrong-magic", mnist_files("magic"), "magic number"),
    ("idx-labels-out-of-range", mnist_files("labels"), "mnist"),
    ("idx-cut-gzip", mnist_files("gzip"), "mnist"),
    ("cifar-not-a-dict", cifar_files("not_dict"), "not a CIFAR dict"),
    ("cifar-no-data", cifar_files("no_data"), "b'data'"),
    ("cifar-garbage", cifar_files("garbage"), "cifar10"),
    # --- report inputs ------------------------------------------------------------------------------
    ("report-results-not-json", results(b'{"teacher_acc": [0.5,'), "not valid JSON"),
    ("report-results-list", results(b"[0.5]"), "JSON object"),
    ("report-results-bad-acc", results(lambda d: _set(d, "teacher_acc", "high")), "teacher_acc"),
    ("report-results-acc-above-one", results(lambda d: _set(d, "student_acc", 7.5)), "student_acc"),
    ("report-results-unknown-kind", results(lambda d: {"hello": 1}), "neither a one-shot"),
    ("report-fedmd-short-curve", results(lambda d: {"rounds": 3, "parties": ["fedmd_1"], "party_acc": [[0.5]], "alone_acc": [0.5], "pooled_acc": [None]}), "party_acc[0]"),
    ("report-fedmd-short-digest-curve", results(lambda d: {"rounds": 1, "parties": ["fedmd_1"], "party_acc": [[0.5, 0.6]], "party_acc_digest": [[0.4, 0.5]], "alone_acc": [0.5], "pooled_acc": [None]}), "party_acc_digest[0]"),
    ("report-dataset-inf", report_dataset_nan, "NaN or Inf"),
    ("report-teacher-metrics", report_teacher_metrics, "val_acc"),
    ("report-empty-dir", report_on("empty"), "holds no fed-distill run"),
    ("report-missing-dir", report_on("nonexistent"), "not found"),
    ("report-a-file", report_on("split.json"), "not a folder"),
    ("report-two-dirs", report_args("{run}", "{run}"), "one run folder"),
    ("report-unknown-option", report_args("{run}", "--pdf"), "unknown option"),
]
# fmt: on


@pytest.mark.parametrize(
    "setup, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_cli_refuses_malformed_input(cli, base_run, tmp_path, setup, expected):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    args = setup(run)
    before = snapshot(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(*args)
    line = one_line_error(code, err)
    assert expected in line, line
    assert snapshot(run) == before, "a failed command changed an earlier artifact"
    # a warning from our own code would be a second stderr line for a CLI user
    ours = [w for w in caught if "fed_distill" in str(w.filename)]
    assert not ours, [str(w.message) for w in ours]


def test_the_fuzz_list_is_long_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 30
    assert len({c[0] for c in CLI_CASES}) == len(CLI_CASES)


# ----------------------------------------------------------------------------- API: typed errors
def _scores(shape=(8, 4), dtype=torch.float32, fill=0.0):
    return torch.full(shape, fill, dtype=dtype)


API_CASES = [
    (
        "scores-transposed",
        lambda: validate_scores(_scores((4, 8)), (8, 4), 0),
        ProtocolError,
        "shape",
    ),
    ("scores-3d", lambda: validate_scores(_scores((1, 8, 4)), (8, 4), 0), ProtocolError, "shape"),
    (
        "scores-bool",
        lambda: validate_scores(_scores(dtype=torch.bool), (8, 4), 0),
        ProtocolError,
        "floating point",
    ),
    (
        "scores-numpy",
        lambda: validate_scores(np.zeros((8, 4), np.float32), (8, 4), 0),
        ProtocolError,
        "must be a tensor",
    ),
    (
        "scores-all-inf",
        lambda: validate_scores(_scores(fill=float("inf")), (8, 4), "p"),
        ProtocolError,
        "32 Inf",
    ),
    ("scores-none", lambda: validate_scores(None, (8, 4), 1), ProtocolError, "NoneType"),
    ("aggregate-nothing", lambda: aggregate([]), ProtocolError, "no party"),
    (
        "report-reliability-nan",
        lambda: validate_report(
            {"scores": _scores(), "reliability": torch.tensor([float("nan")])},
            (8, 4),
            "party 3 (fedmd_4)",
            ("reliability",),
        ),
        ProtocolError,
        "party 3 (fedmd_4): reliability is not finite",
    ),
    (
        "report-reliability-out-of-range",
        lambda: validate_report(
            {"scores": _scores(), "reliability": torch.tensor([1.2])}, (8, 4), 1, ("reliability",)
        ),
        ProtocolError,
        "party 1: reliability must be one number in [0, 1]",
    ),
    (
        "report-class-counts-negative",
        lambda: validate_report(
            {"scores": _scores(), "class_counts": torch.tensor([3.0, -1.0, 0.0, 0.0])},
            (8, 4),
            2,
            ("class_counts",),
        ),
        ProtocolError,
        "party 2: class_counts must be whole numbers >= 0",
    ),
    (
        "aggregate-negative-weights",
        lambda: aggregate([_scores(), _scores()], "mean", MeanOptions([1.0, -2.0])),
        ConfigError,
        "non-negative",
    ),
    (
        "aggregate-options-of-another-rule",
        lambda: aggregate([_scores()] * 3, "trimmed_mean", MeanOptions()),
        ConfigError,
        "takes TrimOptions",
    ),
    ("report-api-missing", lambda: write_report("/nonexistent/run"), FedDistillError, "not found"),
]


@pytest.mark.parametrize(
    "call, error, match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_api_raises_a_typed_one_line_error(call, error, match):
    with pytest.raises(error) as info:
        call()
    msg = str(info.value)
    assert match in msg and "\n" not in msg


# ----------------------------------------------------------------------------- malicious pickles
class Evil:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


class EvilShell(Evil):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _raw_pickle(marker: Path, path: Path, protocol: int) -> None:
    path.write_bytes(pickle.dumps({"images": Evil(marker)}, protocol=protocol))


def _torch_style(marker: Path, path: Path) -> None:
    torch.save({"images": EvilShell(marker), "labels": torch.zeros(2, dtype=torch.long)}, path)


PLANTS = [
    # (id, file in the run folder, how to write it, command that reads it)
    (
        "teacher-raw-pickle",
        "teachers/teacher_0.safetensors",
        lambda m, p: _raw_pickle(m, p, 4),
        "generate-initial",
    ),
    (
        "teacher-protocol-0-pickle",
        "teachers/teacher_0.safetensors",
        lambda m, p: _raw_pickle(m, p, 0),
        "generate-initial",
    ),
    ("teacher-torch-zip", "teachers/teacher_0.safetensors", _torch_style, "generate-initial"),
    ("initial-torch-zip", "student/initial.pt", _torch_style, "train-student"),
    (
        "initial-raw-pickle",
        "student/initial.pt",
        lambda m, p: _raw_pickle(m, p, 2),
        "train-student",
    ),
    ("dataset-torch-zip", "student/dataset.pt", _torch_style, "report"),
    ("dataset-raw-pickle", "student/dataset.pt", lambda m, p: _raw_pickle(m, p, 4), "report"),
]


def _live(write, tmp_path: Path) -> None:
    """Control: the payload does run when a plain unpickler reads it (so the test can fail)."""
    marker = tmp_path / "control_marker"
    probe = tmp_path / "probe.bin"
    write(marker, probe)
    raw = probe.read_bytes()
    if raw[:2] == b"PK":
        torch.load(probe, weights_only=False)
    else:
        pickle.loads(raw)
    assert marker.exists(), "the planted payload is inert; the test would prove nothing"
    marker.unlink()


@pytest.mark.parametrize(
    "where, write, command", [p[1:] for p in PLANTS], ids=[p[0] for p in PLANTS]
)
def test_malicious_pickle_is_refused_and_never_runs(cli, base_run, tmp_path, where, write, command):
    _live(write, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    marker = tmp_path / "pwned"
    write(marker, run / where)
    args = [command, str(run)] if command == "report" else [command, f"run_dir={run}", *STUDENT]
    before = snapshot(run)
    code, _, err = cli(*args)
    line = one_line_error(code, err)
    assert any(w in line for w in ("refus", "not a valid safetensors")), line
    assert not marker.exists(), "the pickle's payload ran"
    assert snapshot(run) == before


def test_malicious_cifar_batch_is_refused_by_the_cli(cli, tmp_path):
    d = tmp_path / "cifar"
    d.mkdir()
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(good)
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": EvilShell(marker), b"labels": [0, 1]})
    pickle.loads(payload)  # control: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    (d / "data_batch_1").write_bytes(payload)
    code, _, err = cli(
        "split",
        "dataset=cifar10",
        f"dataset.data_dir={d}",
        "dataset.download=false",
        f"run_dir={tmp_path / 'run'}",
    )
    line = one_line_error(code, err)
    assert "refusing to unpickle" in line and ("posix.system" in line or "os.system" in line)
    assert not marker.exists()
    assert not (tmp_path / "run" / "split.json").exists()


def test_a_safetensors_file_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # the header length is the first field; 128 + 256k bytes makes its first byte 0x80
    path = tmp_path / "w.safetensors"
    for n in range(1, 300):
        save_weights({"k" * n: torch.zeros(2)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert list(read_weights(path)) == ["k" * n]


REPORT_ODDITIES = [
    ("results-synthesis-s-text", "results.json", lambda d: _set(d, "synthesis_s", "fast")),
    ("results-config-list", "results.json", lambda d: _set(d, "config", [1])),
    (
        "teacher-time-text",
        "teachers/metrics_teacher_1.json",
        lambda d: _set(d, "train_time_s", "x"),
    ),
    ("di-metrics-text", "student/di_metrics_teacher_0.json", lambda d: _set(d, "seconds", ["a"])),
    ("di-metrics-list", "student/di_metrics_teacher_0.json", lambda d: [1, 2]),
]


@pytest.mark.parametrize(
    "where, edit", [c[1:] for c in REPORT_ODDITIES], ids=[c[0] for c in REPORT_ODDITIES]
)
def test_report_refuses_odd_values_before_writing_anything(cli, base_run, tmp_path, where, edit):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    edit_json(run / where, edit)
    before = snapshot(run)
    line = one_line_error(*cli("report", str(run))[::2])
    assert where.split("/")[-1] in line, line
    assert snapshot(run) == before  # not even a figure was written


def test_malicious_resume_checkpoint_is_ignored_and_never_runs(cli, base_run, tmp_path):
    """A mid-stage checkpoint that is a pickle is not a fed-distill checkpoint: the stage says so,
    starts that teacher afresh, and the payload never runs."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "teachers" / "teacher_0.safetensors").unlink()  # teacher 0 unfinished: it may resume
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "teacher_0.safetensors"
    ckpt.parent.mkdir(exist_ok=True)
    _torch_style(marker, ckpt)
    code, out, err = cli("train-teachers", f"run_dir={run}", *FAST_TRAIN, "train.epochs=1")
    assert code == 0, err
    assert "ignoring unreadable checkpoint" in out and "refusing to unpickle" in out
    assert not marker.exists(), "the pickle's payload ran"
    assert read_weights(run / "teachers" / "teacher_0.safetensors")


# ----------------------------------------------------------------------------- before any work
# A config error in a group that a stage reads late (synthesis, student) is reported before the
# first group's work (split, teacher training) starts: one line, in seconds, nothing written.
@pytest.mark.parametrize(
    "override, expected",
    [
        ("synthesis.batch_size=0", "synthesis.batch_size must be a positive integer"),
        ("synthesis.mode=sampling", "num_teachers=3 but only 2 teachers"),
        ("student.epochs=0", "student.epochs"),
        ("student.model=resnet9000", "unknown model 'resnet9000'"),
        ("student.fresh=2", "student.fresh"),
        ("student.mix=cutout", "student.mix must be one of"),
        ("student.targets=fast", "student.targets must be one of"),
        ("student.target_teachers=0", "student.target_teachers must be a positive integer"),
        ("synthesis.pixel_scale=3", "needs the clients' pixel statistics: add upload.pixels=true"),
        ("synthesis.label_mode=owners", "synthesis.label_mode must be one of"),
        ("train.lr=-1", "learning rate"),
        ("train.patience=0", "train.patience"),
        ("split.server_clients=2", "server_clients"),
        ("model.kwargs={width:-4}", "width"),
    ],
)
def test_oneshot_config_error_before_any_work(cli, tmp_path, override, expected):
    import time

    from fed_distill.data.sources import dataset_info

    dataset_info("digits")  # import torch and scikit-learn first: time the check, not imports
    run = tmp_path / "run"
    t0 = time.perf_counter()
    code, out, err = cli(
        "oneshot", "dataset=digits", "split=iid", "split.num_clients=2", f"run_dir={run}", override
    )
    line = one_line_error(code, err)
    assert expected in line, line
    assert time.perf_counter() - t0 < 10
    assert "==" not in out  # no stage started
    assert not run.exists() or not any(run.iterdir()), "a failed config check wrote files"


def _registered_bad_values() -> list[tuple[str, list[str], str]]:
    """(id, overrides, what the one line names): a bad value for every registered partition
    (each of its parameters), synthesizer and dataset."""
    from fed_distill.data.partition import get_partition, list_partitions
    from fed_distill.data.sources import list_datasets
    from fed_distill.synthesis import list_synthesizers

    cases = []
    for name in list_partitions():
        spec = get_partition(name)
        for key, (kind, _) in spec.params.items():
            bad = "-1" if kind in (int, float) else "[[-1]]"
            cases.append((f"split={name}:{key}", [f"split={name}", f"split.{key}={bad}"], key))
        if not spec.params:
            cases.append((f"split={name}", [f"split={name}", "split.num_clients=0"], "num_clients"))
    for name in list_synthesizers():
        args = [f"synthesis={name}", "synthesis.batch_size=0"]
        cases.append((f"synthesis={name}", args, "synthesis.batch_size must be a positive"))
    for name in list_datasets():  # a built-in takes no path; npz / folder: no such file
        args = [f"dataset={name}", "dataset.path=/nonexistent/data.npz"]
        cases.append(
            (
                f"dataset={name}",
                args,
                "/nonexistent/data.npz" if name in ("npz", "folder") else "dataset.path",
            )
        )
    return cases


@pytest.mark.parametrize(
    "overrides, names",
    [c[1:] for c in _registered_bad_values()],
    ids=[c[0] for c in _registered_bad_values()],
)
def test_every_registered_component_refuses_a_bad_value_with_one_line(
    cli, tmp_path, overrides, names
):
    """Each check lives beside its component (a partition's check, SynthesisConfig.validate,
    the dataset's source) and the start-up validation calls it: one line, before any work."""
    run = tmp_path / "run"
    base = ["dataset=digits", "split=iid", "split.num_clients=2"]
    code, out, err = cli("oneshot", *base, *overrides, f"run_dir={run}")
    assert names in one_line_error(code, err), err
    assert "==" not in out  # no stage started


def test_every_stage_checks_its_config_before_work(cli, base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = snapshot(run)
    for args, expected in [
        (["train-teachers", "train.batch_size=0", "force=true"], "train.batch_size"),
        (["generate-initial", "synthesis.iterations=-2", "force=true"], "synthesis.iterations"),
        (["train-student", "synthesis.lr=0", "force=true"], "synthesis.lr"),
        (["train-student", "student.model=cnn_small", "student.model_kwargs={depth:3}"], "depth"),
        (["split", "split=shards", "split.classes_per_client=11"], "classes_per_client"),
    ]:
        code, _, err = cli(*args, f"run_dir={run}", "device=cpu")
        assert expected in one_line_error(code, err), (args, err)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- run folders
def _unusable_run_dirs(tmp_path: Path) -> list[tuple[str, str]]:
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    cases = [
        (str(a_file), "is a file, not a folder"),
        (str(a_file / "run"), "cannot be created: Not a directory"),
        ("/proc/fed-distill-forbidden/run", "cannot be created: No such file or directory"),
    ]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        cases += [(str(ro / "run"), "Permission denied"), (str(ro), "not writable")]
    return cases


def test_unusable_run_dir_is_one_line_naming_path_and_reason(cli, tmp_path):
    for run_dir, reason in _unusable_run_dirs(tmp_path):
        for stage in ("split", "oneshot"):
            code, out, err = cli(stage, "dataset=digits", "split=iid", f"run_dir={run_dir}")
            line = one_line_error(code, err)
            assert f"run_dir {run_dir} " in line and reason in line, line
            assert "==" not in out
    assert (tmp_path / "results.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- sweeps
def _sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fed-distill")
    env = {**os.environ, "FED_DISTILL_NO_PROGRESS": "1"}
    return subprocess.run(
        [str(exe), "split", "--multirun", "dataset=digits", "split=iid", *args,
         f"run_dir={tmp_path}/n${{split.num_clients}}", f"hydra.sweep.dir={tmp_path}/multirun"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip


def test_multirun_with_one_bad_value_runs_the_good_ones(tmp_path):
    r = _sweep(tmp_path, "split.num_clients=2,0,3")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: job split.num_clients=0:"), r.stderr
    assert "num_clients must be >= 1" in lines[0]
    for n in (2, 3):  # the good jobs, before and after the bad one, finished
        assert len(json.loads((tmp_path / f"n{n}" / "split.json").read_text())["clients"]) == n
    assert not (tmp_path / "n0").exists()


def test_multirun_with_a_value_of_the_wrong_type_runs_nothing(tmp_path):
    r = _sweep(tmp_path, "split.num_clients=2,abc")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "split.num_clients=abc" in lines[0] and "Integer" in lines[0]
    assert not (tmp_path / "n2").exists()
