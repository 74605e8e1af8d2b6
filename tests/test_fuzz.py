"""Fuzz suite (issue 39): bad values for every numeric key of every registered component, drawn
from the key's own declared type, through the CLI in this process. For each: a non-zero exit,
exactly one ``error:`` line naming the key, no traceback, and no file in the run folder changed.

The components and their keys are read from the registries and the typed configs, never listed
here: every partition (``list_partitions``, its declared parameters and the common split keys),
every synthesizer (``list_synthesizers``, the numeric fields of its own options class), every FedMD
consensus rule (``list_rules``, the generated ``fedmd_config_class()``: the protocol's keys and every rule's options), every student preset (``StudentConfig``), every
method of the statistics round (``REFIT_METHODS``, ``RefitConfig``) and the teachers'
``TrainConfig``. A new key or component is covered without editing this file. Each
component first shows that its base config is valid, so a refusal is the drawn value's doing.
A stage never runs: reaching a stage's function fails the test at once.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fed_distill.api
from fed_distill.cli import main
from fed_distill.conf import preset_names
from fed_distill.config import SplitConfig
from fed_distill.data.partition import get_partition, list_partitions
from fed_distill.errors import ConfigError
from fed_distill.federated.config import fedmd_config_class
from fed_distill.federated.fedmd_consensus import list_rules
from fed_distill.federated.refit_config import REFIT_METHODS, RefitConfig
from fed_distill.synthesis import (
    list_synthesizers,
    options_class,  # with the built-in ones registered
)
from fed_distill.train.fit import TrainConfig
from fed_distill.train.student_config import StudentConfig

FUZZ = settings(
    max_examples=6,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NUMERIC = (int, float)


def _base_type(kind: Any) -> tuple[str, Any] | None:
    """("int" | "float" | "list", element type) for a numeric or list-of-float type, allowing
    ``| None``; None for anything else (strings, bools, mappings)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType):
        return _base_type(args[0]) if len(args) == 1 else None
    if kind is bool:
        return None
    if kind in NUMERIC:
        return ("int" if kind is int else "float", kind)
    if typing.get_origin(kind) is list and args == [float]:
        return ("list", float)
    return None


def numeric_fields(cls: type) -> dict[str, tuple[str, Any]]:
    """The numeric keys of a typed config dataclass, with their base type."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = _base_type(hints[f.name])
        if t is not None:
            out[f.name] = t
    return out


# Values a component's defaults leave unset that its base needs (checked below to be valid).
NEEDS = {
    "split:classes": ["split.classes=[[0,1],[2,3]]"],
    "fedmd:reliability": ["fedmd.reliability_holdout=1"],
    "fedmd:coupling": ["fedmd.scores=softmax"],
}


def _components() -> list[tuple[str, str, list[str], str, dict[str, tuple[str, Any]]]]:
    """(id, stage, base overrides, key prefix, numeric keys) for every registered component."""
    out = []
    common = {k: v for k, v in numeric_fields(SplitConfig).items()}
    for p in list_partitions():
        own = {k: t for k, (kind, _) in get_partition(p).params.items() if (t := _base_type(kind))}
        base = ["dataset=digits", f"split={p}", *NEEDS.get(f"split:{p}", [])]
        out.append((f"split:{p}", "split", base, "split", {**common, **own}))
    for m in list_synthesizers():
        base = ["dataset=digits", f"synthesis={m}"]
        synth = numeric_fields(options_class(m))
        out.append((f"synthesis:{m}", "oneshot", base, "synthesis", synth))
    fedmd = numeric_fields(fedmd_config_class())
    for rule in list_rules():
        base = ["fedmd=quick", f"fedmd.aggregate={rule}", *NEEDS.get(f"fedmd:{rule}", [])]
        out.append((f"fedmd:{rule}", "fedmd", base, "fedmd", fedmd))
    student = numeric_fields(StudentConfig)
    synth_presets = set(preset_names("synthesis"))
    for s in preset_names("student"):
        base = [
            "dataset=digits",
            f"student={s}",
            *([f"synthesis={s}"] if s in synth_presets else []),
        ]
        out.append((f"student:{s}", "oneshot", base, "student", student))
    out.append(("train", "oneshot", ["dataset=digits"], "train", numeric_fields(TrainConfig)))
    refit = numeric_fields(RefitConfig)
    for m in REFIT_METHODS:  # the statistics round's group: each method, every numeric key
        out.append((f"refit:{m}", "oneshot", ["dataset=digits", f"refit={m}"], "refit", refit))
    return out


COMPONENTS = _components()
WORDS = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6).filter(
    lambda w: w not in {"nan", "inf", "null", "none", "true", "false", "yes", "no", "on", "off"}
)
NON_FINITE = st.sampled_from(["nan", "inf", "-inf"])


def bad_value(kind: str) -> st.SearchStrategy[str]:
    """A value of the wrong type for the key's declared type, or a float no run can use."""
    if kind == "int":  # a fraction, a word, a non-finite float: none is an integer
        return st.one_of(
            st.floats(-1e6, 1e6).filter(lambda x: x != int(x)).map(repr), WORDS, NON_FINITE
        )
    if kind == "float":
        return st.one_of(NON_FINITE, WORDS)
    return st.one_of(NON_FINITE.map(lambda v: f"[{v},1.0]"), NON_FINITE.map(lambda v: f"[1.0,{v}]"))


def _never_run(stage: str):
    def fn(cfg):
        raise AssertionError(f"a bad value reached the {stage} stage: it was not refused")

    return fn


@pytest.fixture
def guarded(monkeypatch):
    """No stage ever runs: the stage functions fail the test if reached."""
    real = fed_distill.api.stage_function
    monkeypatch.setattr(fed_distill.api, "stage_function", lambda s: (real(s), _never_run(s))[1])


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("component", COMPONENTS, ids=[c[0] for c in COMPONENTS])
def test_every_registered_component_refuses_bad_numbers_in_one_line(component, guarded, capsys):
    name, stage, base, prefix, keys = component
    assert keys, f"{name}: no numeric keys found"
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        cfg = fed_distill.api.compose(stage, [*base, f"run_dir={run}"])
        from fed_distill.validate import validate_config

        validate_config(stage, cfg)  # the base is valid: a refusal below is the value's doing
    key_and_value = st.sampled_from(sorted(keys)).flatmap(
        lambda k: st.tuples(st.just(k), bad_value(keys[k][0]))
    )

    @FUZZ
    @given(key_and_value)
    def check(kv: tuple[str, str]) -> None:
        key, value = kv
        with tempfile.TemporaryDirectory() as d:
            run = Path(d) / "run"
            run.mkdir()
            (run / "keep.json").write_text('{"kept": true}')
            before = snapshot(run)
            code = main([stage, *base, f"{prefix}.{key}={value}", f"run_dir={run}"])
            out, err = capsys.readouterr()
            where = f"{name}: {prefix}.{key}={value}"
            assert code == 1, f"{where}: exit {code}, {err!r}"
            assert err.startswith("error: ") and err.count("\n") == 1, f"{where}: {err!r}"
            assert "Traceback" not in err + out, where
            assert key in err, f"{where}: the line does not name the key: {err!r}"
            assert snapshot(run) == before, f"{where}: the run folder changed"

    check()


# Every key of every typed config, deterministically and without the CLI: NaN and both
# infinities refused by the config's own check, naming the key.
CONFIGS = [
    (TrainConfig, "train", lambda c: c.validate()),
    *((options_class(m), "synthesis", lambda c: c.validate()) for m in list_synthesizers()),
    (StudentConfig, "student", lambda c: c.validate()),
    (RefitConfig, "refit", lambda c: c.validate()),
    (
        fedmd_config_class(),
        "fedmd",
        lambda c: __import__("fed_distill.federated.config").federated.config.check_fedmd_config(c),
    ),
]
FLOAT_KEYS = [
    (cls, prefix, check, key, kind)
    for cls, prefix, check in CONFIGS
    for key, (kind, _) in numeric_fields(cls).items()
    if kind != "int"
]


@pytest.mark.parametrize(
    "cls, prefix, check, key, kind",
    FLOAT_KEYS,
    ids=[f"{c.__name__}.{k}" for c, _, _, k, _ in FLOAT_KEYS],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_key_refuses_non_finite_values(cls, prefix, check, key, kind, value):
    cfg = cls(**{key: [value, 1.0] if kind == "list" else value})
    with pytest.raises(ConfigError, match=key):
        check(cfg)


PARTITION_FLOATS = [
    (p, k)
    for p in list_partitions()
    for k, (kind, _) in get_partition(p).params.items()
    if kind is float
]


@pytest.mark.parametrize(
    "partition, key", PARTITION_FLOATS, ids=[f"{p}.{k}" for p, k in PARTITION_FLOATS]
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_partitions_float_parameter_refuses_non_finite_values(partition, key, value):
    from fed_distill.data.partition import check_split_params

    with pytest.raises(ConfigError, match=f"split.{key}"):
        check_split_params(partition, 3, **{key: value})
