"""Bad input at the partition registry and the split keys (issue 39): what a user's partition
returns is checked where the split is made (integers, in range, disjoint within and across
clients, every client non-empty), naming the partition; ``register_partition`` given something
that is not a function is a config error; a key of another partition, or a client count the
partition's own parameters contradict, is refused, not ignored. Each is one ``error:`` line from
the CLI, and the run folder is left as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fed_distill
from fed_distill.cli import main
from fed_distill.data.partition import make_split
from fed_distill.errors import ConfigError, SplitError
from test_partition import YTE, YTR


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, err: str, *parts: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in parts:
        assert part in err, err


def files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*")) if run.exists() else []


def _iid(labels, k):
    return np.array_split(np.arange(len(labels)), k)


# What a user's partition returns for 3 clients, and what the one line must say.
BAD_OUTPUTS = {
    "out_of_range": (lambda y, k: [*_iid(y, k)[:-1], np.array([0, len(y)])], "outside the samples"),
    "negative": (lambda y, k: [np.array([-1, 5]), *_iid(y, k)[1:]], "holds index -1"),
    "duplicate": (lambda y, k: [np.array([3, 3]), *_iid(y, k)[1:]], "holds index 3 twice"),
    "overlap": (lambda y, k: [np.arange(10), np.arange(5, 15), np.arange(20, 30)], "held by"),
    "floats": (lambda y, k: [p + 0.5 for p in _iid(y, k)], "integer indices, got float64"),
    "whole_floats": (lambda y, k: [p.astype(float) for p in _iid(y, k)], "integer indices"),
    "empty_client": (lambda y, k: [*_iid(y, k)[:-1], []], "gave client 2 no samples"),
    "two_d": (lambda y, k: [p.reshape(-1, 1) for p in _iid(y, k)], "2-D"),
    "too_few": (lambda y, k: _iid(y, k - 1), "returned 2 parts for 3 clients"),
    "not_a_list": (lambda y, k: 7, "returned int, not one index list per client"),
    "bools": (lambda y, k: [np.ones(len(y), bool)] * k, "integer indices, got bool"),
}


@pytest.fixture
def bad_partition(restore_registries, request):
    """Register ``split=bad_NAME`` returning the BAD_OUTPUTS case; its name and message."""
    name = request.param
    make, message = BAD_OUTPUTS[name]

    def fn(labels, num_clients, rng, num_classes):
        return make(labels, num_clients)

    fed_distill.register_partition(f"bad_{name}")(fn)
    return f"bad_{name}", message


@pytest.mark.parametrize("bad_partition", sorted(BAD_OUTPUTS), indirect=True)
def test_a_user_partitions_bad_output_is_one_line_naming_it(bad_partition, tmp_path, capsys):
    name, message = bad_partition
    run = tmp_path / "run"
    args = ["split", "dataset=digits", f"split={name}", "split.num_clients=3", f"run_dir={run}"]
    code, _, err = run_cli(capsys, *args)
    assert_one_error(code, err, f"partition '{name}'", message)
    assert files(run) == []  # no split.json that a later stage would refuse


@pytest.mark.parametrize("bad_partition", ["overlap", "floats"], indirect=True)
def test_make_split_refuses_it_from_python_too(bad_partition):
    name, message = bad_partition
    with pytest.raises(SplitError, match=message):
        make_split("digits", YTR, YTE, 10, name, 3, seed=0)


def test_a_good_tuple_of_two_parts_is_parts_not_parts_and_record(restore_registries):
    @fed_distill.register_partition("pairs")
    def pairs(labels, num_clients, rng, num_classes):
        half = len(labels) // 2
        return (np.arange(half), np.arange(half, len(labels)))

    s = make_split("digits", YTR, YTE, 10, "pairs", 2, seed=0)
    assert sum(len(c.train) + len(c.val) for c in s.clients) == len(YTR)


@pytest.mark.parametrize("thing", [42, "split", None])
def test_registering_something_that_is_not_a_function_is_a_config_error(restore_registries, thing):
    with pytest.raises(ConfigError, match="register_partition\\('x'\\) decorates a function"):
        fed_distill.register_partition("x")(thing)
    assert "x" not in fed_distill.list_partitions()


def test_a_check_that_is_not_a_function_is_a_config_error(restore_registries):
    with pytest.raises(ConfigError, match="check must be a function"):
        fed_distill.register_partition("y", check=3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["split=dirichlet", "split.sigma=-1"], "split.sigma=-1.0 is a parameter of split=noise"),
        (["split=iid", "split.alpha=0.3"], "split.alpha=0.3 is a parameter of split=dirichlet"),
        (["split=noise", "split.classes=[[0],[1]]"], "of split=classes, not of split=noise"),
        (["split=classes", "split.classes=[[0,1],[2,3]]", "split.num_clients=3"], "makes 2"),
    ],
)
def test_keys_the_chosen_partition_does_not_take_are_refused(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "split", "dataset=digits", *overrides, f"run_dir={run}")
    assert_one_error(code, err, message)
    assert files(run) == []


def test_a_partitions_own_keys_and_count_still_work(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["split", "dataset=digits", "split=classes", "split.classes=[[0,1],[2,3]]"]
    code, out, err = run_cli(capsys, *args, f"run_dir={run}")
    assert code == 0 and err == "" and "among 2 clients" in out
    code, _, err = run_cli(capsys, *args, "split.num_clients=2", f"run_dir={tmp_path / 'r2'}")
    assert code == 0, err


def test_the_default_client_count_is_the_schemas():
    from fed_distill.config import SplitConfig
    from fed_distill.data.partition_registry import DEFAULT_NUM_CLIENTS

    assert SplitConfig().num_clients == DEFAULT_NUM_CLIENTS


# Typed on the command line at exactly the value a default or a preset would give: only the
# user's overrides are explicit (fed_distill.api.mark_explicit), so these are still refused.
TYPED_AT_DEFAULT = [
    (
        ["split=classes", "split.classes=[[0,1],[2,3]]", "split.num_clients=5"],
        "split.num_clients=5, but split=classes makes 2 clients",
    ),
    (["split=dirichlet", "split.sigma=0.1"], "split.sigma=0.1 is a parameter of split=noise"),
    (["split=iid", "split.alpha=0.5"], "split.alpha=0.5 is a parameter of split=dirichlet"),
    (["split=noise", "++split.min_size=10"], "split.min_size=10 is a parameter of split="),
]


@pytest.mark.parametrize("overrides, message", TYPED_AT_DEFAULT)
def test_a_typed_key_is_refused_even_at_its_default(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "split", "dataset=digits", *overrides, f"run_dir={run}")
    assert_one_error(code, err, message, "drop")
    assert not run.exists()  # nothing made, not even the folder


def test_a_typed_key_at_its_default_is_refused_in_a_finished_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["split", "dataset=digits", "split=classes", "split.classes=[[0,1],[2,3]]"]
    assert run_cli(capsys, *args, f"run_dir={run}")[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, *args, "split.num_clients=5", f"run_dir={run}")
    assert_one_error(code, err, "split.num_clients=5")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_the_python_api_refuses_typed_keys_and_takes_a_changed_config(tmp_path):
    bad = ["split=classes", "split.classes=[[0,1],[2,3]]", "split.num_clients=5"]
    with pytest.raises(ConfigError, match="split.num_clients=5, but split=classes makes 2"):
        fed_distill.run("split", [*bad, "dataset=digits", f"run_dir={tmp_path / 'a'}"])
    cfg = fed_distill.compose("split", ["dataset=digits", f"run_dir={tmp_path / 'b'}"])
    cfg.split.strategy, cfg.split.alpha = "dirichlet", 0.3  # set in Python: not "typed"
    assert fed_distill.run("split", cfg=cfg)["strategy"] == "dirichlet"
    assert not (tmp_path / "a").exists()


def test_a_presets_split_keys_are_not_the_users(tmp_path):
    """experiment=NAME sets split keys (and split.num_clients=5 = the default): none is typed,
    so the preset validates; the same keys typed against another partition do not."""
    from fed_distill.validate import validate_config

    cfg = fed_distill.compose("split", ["experiment=fmnist_noise_5", f"run_dir={tmp_path}"])
    assert cfg.split.strategy == "noise" and cfg._explicit_keys == ["experiment", "run_dir"]
    validate_config("split", cfg)
    cfg = fed_distill.compose("split", ["experiment=fmnist_noise_5", "split.alpha=0.5"])
    with pytest.raises(ConfigError, match="split.alpha=0.5 is a parameter of split=dirichlet"):
        validate_config("split", cfg)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fedmd.partition=dirichlet", "split.sigma=0.1"], "not of fedmd.partition=dirichlet"),
        (["split.alpha=0.5"], "split.alpha is not read by FedMD's own fedmd.partition=balanced"),
    ],
)
def test_fedmd_refuses_typed_split_keys_it_would_ignore(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "fedmd", "fedmd=quick", *overrides, f"run_dir={run}")
    assert_one_error(code, err, message)
    assert not run.exists()
