"""Check the whole resolved config a stage will use, and its run folder, before any work starts.

A typo in ``synthesis.batch_size`` must not cost the minutes of teacher training that come before
synthesis: :func:`validate_config` checks every group the stage reads (dataset, split, model,
train, synthesis, student, fedmd, device) and then that ``run_dir`` can be created and written.
It loads no dataset files (``dataset_info`` reads metadata only), so it takes well under a
second; every problem is one :class:`ConfigError` line.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fed_distill.data.partition_registry import is_int
from fed_distill.errors import ConfigError, FedDistillError

# What each stage reads besides the device and the run folder.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "split": ("dataset", "split"),
    "train-teachers": ("model", "train"),
    "generate-initial": ("synthesis", "student"),
    "train-student": ("synthesis", "student"),
    "oneshot": ("dataset", "split", "model", "train", "synthesis", "student", "refit"),
    "refit": ("refit",),
    "fedmd": ("fedmd",),
}


def validate_config(stage: str, cfg: DictConfig) -> None:
    """Raise one ConfigError line if ``cfg`` cannot run ``stage``; creates ``run_dir`` if needed
    (every stage would) but writes nothing in it."""
    from fed_distill.tracking import check_logger
    from fed_distill.utils import resolve_device

    groups = STAGE_GROUPS.get(stage, ())
    check_protocol(stage, cfg)  # a preset or key of the other protocol: before anything
    resolve_device(str(cfg.device))
    check_logger(str(cfg.get("logger", "none")))
    info = _dataset_info(cfg, stage) if {"dataset", "model"} & set(groups) else None
    if "split" in groups:
        num_classes = info.num_classes if info is not None else None
        check_split_config(cfg.split, num_classes, explicit_keys(cfg))
    if "model" in groups and info is not None:
        _check_model(str(cfg.model.name), _kwargs(cfg.model.get("kwargs")), info, "model")
    if "model" in groups:
        _check_teacher_models(cfg, info)
    if "train" in groups:
        from fed_distill.config import as_object
        from fed_distill.train.fit import TrainConfig

        as_object(cfg.train, TrainConfig).validate()
    if "synthesis" in groups:
        from fed_distill.config import as_object
        from fed_distill.synthesis import options_from_node
        from fed_distill.train.student_config import StudentConfig

        synth = options_from_node(cfg.synthesis).validate(_num_teachers(cfg, stage))
        if "train" in groups:  # the stage trains the teachers: their upload must serve synthesis
            from fed_distill.config import UploadConfig

            synth.check_upload(as_object(cfg.upload, UploadConfig))
        scfg = as_object(cfg.student, StudentConfig).validate()
        _check_targets(scfg, synth.method)
        if scfg.model and info is not None:
            _check_model(scfg.model, dict(scfg.model_kwargs), info, "student.model")
    if "refit" in groups:
        from fed_distill.config import as_object
        from fed_distill.federated.refit_config import RefitConfig

        as_object(cfg.refit, RefitConfig).validate()
    if "fedmd" in groups:
        from fed_distill.config import as_object
        from fed_distill.federated.config import check_fedmd_config, fedmd_config

        fedmd = fedmd_config(cfg.fedmd)
        check_fedmd_config(fedmd, _kwargs(cfg.get("split")))
        check_fedmd_split_keys(fedmd.partition, _kwargs(cfg.get("split")), explicit_keys(cfg))
    check_run_dir(cfg.run_dir)


def _check_targets(scfg: Any, method: str) -> None:
    """student.targets: a mode that can serve the student's and the synthesizer's settings."""
    from fed_distill.synthesis.registry import own_soft_labels
    from fed_distill.train.targets import resolve_targets

    resolve_targets(scfg.targets, scfg.mix, scfg.perturb, scfg.fresh, own_soft_labels(method))


# ----------------------------------------------------------------------------- run folder
def check_run_dir(path: Any) -> Path:
    """``run_dir`` exists (created if missing) and accepts a new file; else one line naming the
    path and the reason. Nothing already in the folder is touched."""
    run_dir = Path(str(path)).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a folder; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise ConfigError(f"run_dir {run_dir} cannot be created: a parent path is a file") from None
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} cannot be created: {_reason(e)}") from None
    probe = run_dir / f".fed-distill-write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable: {_reason(e)}") from None
    return run_dir


def _reason(e: OSError) -> str:
    return e.strerror or (errno.errorcode.get(e.errno or 0) if e.errno else None) or str(e)


# ----------------------------------------------------------------------------- groups
def _dataset_info(cfg: DictConfig, stage: str):
    """The dataset's metadata (classes, channels, size): from run_dir/split.json for the stages
    that read an earlier split, else from ``dataset``. None when the split is not readable yet
    (the stage itself reports that)."""
    from fed_distill.data.sources import dataset_info
    from fed_distill.pipeline import dataset_options

    name, options = None, None
    if stage != "oneshot" and stage != "split":
        try:
            split = json.loads((Path(str(cfg.run_dir)) / "split.json").read_text())
            name, options = split["dataset"], dict(split.get("dataset_options") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    else:
        from fed_distill.config import DatasetConfig, as_object

        ds = as_object(cfg.dataset, DatasetConfig)
        name, options = ds.name, dataset_options(ds)
    try:
        return dataset_info(str(name), **options)
    except FedDistillError:
        if stage in ("oneshot", "split"):
            raise
        return None  # a malformed split.json: the stage reports it with its own message


def _kwargs(node: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if node is None:
        return {}
    return dict(
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    )


def _check_model(name: str, kwargs: dict[str, Any], info: Any, key: str):
    from fed_distill.models import build_model

    try:
        return build_model(name, info.num_classes, info.channels, info.image_size, **kwargs)
    except FedDistillError as e:
        raise ConfigError(f"{key}: {e}") from None


def _check_teacher_models(cfg: DictConfig, info: Any) -> None:
    """``teachers.models``: known names or families, each architecture buildable (where the
    dataset is known)."""
    from fed_distill.errors import ModelError
    from fed_distill.models import parse_architectures

    node = cfg.get("teachers")
    value = _kwargs(node).get("models") if node is not None else None
    try:
        archs = parse_architectures(value)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    for pos, (name, kwargs) in enumerate(archs if info is not None and archs else []):
        _check_model(name, kwargs, info, f"teachers.models[{pos}]")


def check_split_config(
    sp: DictConfig, num_classes: int | None = None, explicit: Sequence[str] = ()
) -> int:
    """The split's keys, by the partition registry's own check (``check_split_params``: the
    common keys and the chosen partition's ``check``), and the ``split.KEY`` overrides the user
    typed (``explicit``, :func:`explicit_keys`; ``check_explicit_split``); returns the number
    of clients."""
    from fed_distill.data.partition import check_split_params, split_kwargs
    from fed_distill.data.partition_registry import check_explicit_split

    node = _kwargs(sp)
    n = check_split_params(num_classes=num_classes, **split_kwargs(node))[1]
    check_explicit_split(node["strategy"], node, explicit, n)
    return n


def check_fedmd_split_keys(partition: str, split: dict[str, Any], explicit: Sequence[str]) -> None:
    """FedMD reads ``split.KEY`` only as the parameters of ``fedmd.partition`` naming a
    registered partition: a typed key of another partition, or any partition key with FedMD's
    own partitions (balanced, writer, subclass), would be ignored, so it is one line."""
    from fed_distill.data.partition_registry import (
        all_params,
        check_explicit_split,
        list_partitions,
    )

    if partition in list_partitions():
        check_explicit_split(partition, split, explicit, what="fedmd.partition")
        return
    for key in explicit:
        name = key.removeprefix("split.").split(".")[0]
        if key.startswith("split.") and name in all_params():
            raise ConfigError(
                f"split.{name} is not read by FedMD's own fedmd.partition={partition}; drop it or"
                f" choose a registered partition that takes it (fedmd.partition=NAME)"
            )


def explicit_keys(cfg: DictConfig) -> list[str]:
    """The override keys the user typed (``fed_distill.api.mark_explicit``); none for a config
    composed without it."""
    keys = cfg.get("_explicit_keys")
    return [str(k) for k in keys] if keys is not None else []


def check_protocol(stage: str, cfg: DictConfig) -> None:
    """A preset or key of the other protocol, refused before anything is made: a one-shot
    ``experiment=NAME`` for FedMD; for the one-shot stages a FedMD ``experiment=NAME`` (none
    is built in) or a typed ``fedmd=NAME`` / ``fedmd.KEY`` (FedMD's presets and keys)."""
    from fed_distill.federated.config import check_preset_for_fedmd, check_preset_for_oneshot

    if stage == "fedmd":
        check_preset_for_fedmd(cfg)
    else:
        check_preset_for_oneshot(stage, cfg, explicit_keys(cfg))


def _num_teachers(cfg: DictConfig, stage: str) -> int | None:
    """Teachers the synthesizer will have: from the split this stage makes (oneshot), else from
    run_dir/teachers/teachers.json when readable."""
    if stage == "oneshot":
        return check_split_config(cfg.split) - int(cfg.split.server_clients)
    try:
        spec = json.loads((Path(str(cfg.run_dir)) / "teachers" / "teachers.json").read_text())
        n = spec["num_teachers"]
        return n if is_int(n, 1) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
