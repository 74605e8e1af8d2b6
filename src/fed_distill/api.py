"""The Python API: every ``fed-distill`` stage in-process, from a notebook or a script.

    import fed_distill
    cfg = fed_distill.compose("oneshot", overrides=["dataset=digits", "split.num_clients=2"])
    results = fed_distill.run("oneshot", cfg=cfg)     # or run("oneshot", overrides=[...])
    print(results["student_acc"])

:func:`run` does exactly what ``fed-distill STAGE key=value ...`` does (the CLI calls it), but
raises the project's typed errors (:class:`fed_distill.errors.FedDistillError` and its
subclasses, each a one-line message) instead of printing them and exiting, and returns what the
stage wrote (``results.json`` for ``oneshot`` and ``fedmd``). docs/api.md has a walk-through.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fed_distill.errors import ConfigError, FedDistillError

# stage name -> ("module:function", one-line help). Later protocols add their stages here.
STAGES: dict[str, tuple[str, str]] = {
    "split": (
        "fed_distill.pipeline:run_split",
        "partition a dataset among clients -> run_dir/split.json",
    ),
    "train-teachers": (
        "fed_distill.pipeline:run_train_teachers",
        "train one teacher per client of run_dir/split.json -> run_dir/teachers/",
    ),
    "generate-initial": (
        "fed_distill.federated.oneshot:run_generate_initial",
        "synthesise the initial (non-adaptive) batches from the teachers -> run_dir/student/initial.pt",
    ),
    "train-student": (
        "fed_distill.federated.oneshot:run_train_student",
        "distil the teachers into a student on a growing synthetic dataset -> run_dir/student/",
    ),
    "oneshot": (
        "fed_distill.federated.oneshot:run_oneshot",
        "the whole one-shot pipeline with baselines -> run_dir/results.json",
    ),
    "refit": (
        "fed_distill.federated.refit:run_refit",
        "one statistics round: clients describe their classes in the student's features, the"
        " server re-fits its head -> run_dir/student/student_refit.safetensors",
    ),
    "fedmd": (
        "fed_distill.federated.fedmd_run:run_fedmd",
        "FedMD: heterogeneous parties distil through class scores on public data -> run_dir/results.json",
    ),
}

# What :func:`run` returns: the JSON file each stage writes in run_dir.
STAGE_OUTPUT: dict[str, str] = {
    "split": "split.json",
    "train-teachers": "teachers/teachers.json",
    "generate-initial": "student/initial.json",
    "train-student": "student/metrics.json",
    "oneshot": "results.json",
    "refit": "student/refit.json",
    "fedmd": "results.json",
}


def stage_function(stage: str) -> Callable:
    """The function behind ``stage`` (one of :data:`STAGES`); unknown names are a ConfigError."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose one of: {', '.join(STAGES)}")
    module, fn = STAGES[stage][0].split(":")
    return getattr(importlib.import_module(module), fn)


def compose(stage: str, overrides: Sequence[str] | None = None):
    """The resolved config (an OmegaConf ``DictConfig``) that ``fed-distill STAGE overrides...``
    would run, with the same defaults, presets and checks; misspelt keys and wrong types raise
    :class:`ConfigError`. Change it (``cfg.student.epochs = 5``) and hand it to ``run(stage,
    cfg=cfg)``; attributes that are not in the schema cannot be set. Nothing is written."""
    from fed_distill.config import compose_config

    if isinstance(overrides, str):
        raise ConfigError("overrides must be a list of 'key=value' strings, not one string")
    overrides = list(overrides or [])
    stage_function(stage)
    if stage == "refit" and not any(o.split("=", 1)[0].lstrip("+~") == "refit" for o in overrides):
        overrides = ["refit=head", *overrides]  # the stage is the request for the round
    return mark_explicit(compose_config(overrides), overrides)


def mark_explicit(cfg, overrides: Sequence[str]):
    """Record what the user typed, for the checks that tell a typed value from a default or a
    preset's: ``_explicit_dataset`` (stages that read an earlier split check it against the
    split's dataset) and ``_explicit_keys``, the keys of the overrides (``split.num_clients``,
    ``fedmd``, ...; a ``~KEY`` deletion sets nothing). A preset's keys (``experiment=NAME``)
    are not the user's: only ``experiment`` itself is listed."""
    from omegaconf import open_dict

    keys = override_keys(overrides)
    with open_dict(cfg):
        cfg._explicit_dataset = any(k in ("dataset", "dataset.name") for k in keys)
        cfg._explicit_keys = keys
    return cfg


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The keys ``key=value`` overrides set, in order, without ``+`` / ``++`` and without
    deletions (``~key``)."""
    out: list[str] = []
    for o in overrides:
        key = str(o).split("=", 1)[0].strip()
        if key.startswith("~") or "=" not in str(o):
            continue
        key = key.lstrip("+")
        if key and key not in out:
            out.append(key)
    return out


def execute(stage: str, cfg) -> Any:
    """Validate ``cfg`` for ``stage`` (every group it reads, and run_dir) and run the stage in
    this process, with the configured logger; returns what the stage function returns."""
    from fed_distill.tracking import tracking
    from fed_distill.utils import configure_threads
    from fed_distill.validate import validate_config

    fn = stage_function(stage)
    validate_config(stage, cfg)  # every group the stage reads, and run_dir, before any work
    configure_threads()
    if not cfg.progress:
        os.environ["FED_DISTILL_NO_PROGRESS"] = "1"
    with tracking(str(cfg.get("logger", "none")), Path(str(cfg.run_dir)), stage):
        return fn(cfg)


def run(stage: str, overrides: Sequence[str] | None = None, *, cfg=None) -> dict[str, Any]:
    """Run one stage in-process, as ``fed-distill STAGE overrides...`` does, and return the JSON
    it wrote as a dict: ``results.json`` for ``oneshot`` and ``fedmd`` (accuracies, times, the
    resolved config), ``split.json`` for ``split``, ``teachers/teachers.json`` plus each
    teacher's metrics under ``"teachers"`` for ``train-teachers``, ``student/initial.json`` for
    ``generate-initial``, ``student/metrics.json`` for ``train-student``.

    Give either ``overrides`` or a config from :func:`compose` (``cfg=``), not both. Problems
    the user can fix raise :class:`fed_distill.errors.FedDistillError` subclasses with a
    one-line message, before any work where they can be seen in advance."""
    if cfg is None:
        cfg = compose(stage, overrides)
    elif overrides:
        raise ConfigError("run(): give overrides or cfg=, not both (compose the overrides in)")
    execute(stage, cfg)
    return read_stage_output(stage, cfg.run_dir)


def read_stage_output(stage: str, run_dir: str | Path) -> dict[str, Any]:
    """The JSON ``stage`` wrote in ``run_dir`` (see :func:`run`)."""
    run_dir = Path(str(run_dir))
    path = run_dir / STAGE_OUTPUT[stage]
    out = _read(path)
    if stage == "train-teachers":
        n = int(out.get("num_teachers", 0))
        out["teachers"] = [
            _read(run_dir / "teachers" / f"metrics_teacher_{i}.json") for i in range(n)
        ]
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FedDistillError(f"the stage finished but {path} cannot be read ({e})") from None
