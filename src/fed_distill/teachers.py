"""The teachers as the server holds them: each teacher's architecture (``teachers.models``,
cycled, or ``model=`` for all), the initial weights they start from, ``teachers.json``
(:class:`TeacherSpec`) and :func:`load_teachers`, which rebuilds every teacher with its own
architecture and checks its files against it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fed_distill.artifacts import load_json, load_weights
from fed_distill.config import ModelConfig, as_object, to_container
from fed_distill.data.sources import DatasetInfo
from fed_distill.errors import ConfigError, FedDistillError, ModelError
from fed_distill.models import build_model, describe, list_models, mixed, teacher_architectures
from fed_distill.models.families import Architecture
from fed_distill.utils import seed_everything


@dataclass
class TeacherSpec:
    """What is needed to rebuild the teachers (``teachers/teachers.json``)."""

    model: str
    model_kwargs: dict[str, Any]
    num_classes: int
    in_channels: int
    image_size: int
    num_teachers: int
    dataset: str
    init_seed: int
    # per teacher, {"name", "kwargs"}: its own architecture (teachers.models); None (a run
    # folder from before per-client architectures) = every teacher is ``model``
    models: list[dict[str, Any]] | None = None

    def architectures(self) -> list[Architecture]:
        """One (name, kwargs) per teacher."""
        if self.models is None:
            return [(self.model, dict(self.model_kwargs))] * self.num_teachers
        return [(m["name"], dict(m["kwargs"])) for m in self.models]

    @property
    def mixed(self) -> bool:
        """Whether the teachers differ in architecture (one-shot FedAvg is then undefined)."""
        return mixed(self.architectures())


def configured_architectures(cfg: DictConfig, num_teachers: int) -> list[Architecture]:
    """One (name, kwargs) per teacher: ``teachers.models`` cycled, else ``model=`` for all."""
    mcfg: ModelConfig = as_object(cfg.model, ModelConfig)
    teachers = cfg.get("teachers")
    value = to_container(teachers).get("models") if teachers is not None else None
    try:
        return teacher_architectures(value, (mcfg.name, dict(mcfg.kwargs)), num_teachers)
    except ModelError as e:
        raise ConfigError(str(e)) from None


def architecture_record(arch: Architecture) -> dict[str, Any]:
    """What teachers.json and metrics_teacher_{i}.json record of a teacher's architecture."""
    return {"model": arch[0], "model_kwargs": dict(arch[1])}


def build_teacher(arch: Architecture, info: DatasetInfo) -> torch.nn.Module:
    """A teacher of architecture ``arch`` = (name, kwargs) for the dataset (random weights)."""
    return build_model(arch[0], info.num_classes, info.channels, info.image_size, **arch[1])


def initial_teachers(
    archs: list[Architecture], info: DatasetInfo, seed: int
) -> list[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """Per teacher, the model it starts from and a copy of its weights: one initialisation per
    architecture, each seeded with the run's ``seed`` (which resets the global RNGs), so
    teachers of one architecture share it (one-shot FedAvg is meaningful among them) and a
    homogeneous run starts exactly as before per-client architectures."""
    made: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
    for arch in archs:
        key = json.dumps(arch, sort_keys=True, default=str)
        if key not in made:
            seed_everything(seed)
            init = build_teacher(arch, info)
            made[key] = (init, {k: v.clone() for k, v in init.state_dict().items()})
    return [made[json.dumps(a, sort_keys=True, default=str)] for a in archs]


def teacher_spec(
    mcfg: ModelConfig, info: DatasetInfo, archs: list[Architecture], seed: int
) -> TeacherSpec:
    """``teachers.json``: ``model`` is the ``model=`` key (the student's default architecture),
    ``models`` every teacher's own."""
    return TeacherSpec(
        mcfg.name,
        dict(mcfg.kwargs),
        info.num_classes,
        info.channels,
        info.image_size,
        len(archs),
        info.name,
        int(seed),
        [{"name": n, "kwargs": dict(k)} for n, k in archs],
    )


def load_teachers(
    run_dir: str | Path, device: torch.device | str = "cpu"
) -> tuple[list[torch.nn.Module], TeacherSpec]:
    """The uploaded teachers of ``run_dir`` in eval mode, each built with its own architecture
    (teachers.json) and its weights checked against it."""
    tdir = Path(run_dir) / "teachers"
    spec = _read_spec(tdir)
    teachers = []
    for i, arch in enumerate(spec.architectures()):
        _check_recorded_architecture(tdir, i, arch)
        m = build_model(arch[0], spec.num_classes, spec.in_channels, spec.image_size, **arch[1])
        load_weights(m, tdir / f"teacher_{i}.safetensors")
        teachers.append(m.to(device).eval())
    return teachers, spec


def _read_spec(tdir: Path) -> TeacherSpec:
    """``teachers.json``, its types checked."""
    if not (tdir / "teachers.json").is_file():
        raise FedDistillError(
            f"no teachers in {tdir}; run `fed-distill train-teachers run_dir={tdir.parent}` first"
        )
    raw = load_json(tdir / "teachers.json", "teachers.json")
    try:
        spec = TeacherSpec(**raw)
    except TypeError as e:
        raise FedDistillError(
            f"{tdir / 'teachers.json'} is malformed ({e}); rerun train-teachers"
        ) from None
    ints = ("num_classes", "in_channels", "image_size", "num_teachers")
    bad = [k for k in ints if type(getattr(spec, k)) is not int or getattr(spec, k) < 1]
    if not isinstance(spec.model, str) or not isinstance(spec.model_kwargs, dict):
        bad.append("model")
    models = spec.models
    if models is not None and not (
        isinstance(models, list)
        and len(models) == spec.num_teachers
        and all(
            isinstance(m, dict)
            and isinstance(m.get("name"), str)
            and isinstance(m.get("kwargs"), dict)
            for m in models
        )
    ):
        bad.append("models")
    if bad:
        raise FedDistillError(
            f"{tdir / 'teachers.json'} is malformed ({', '.join(bad)} has the wrong"
            " type or value); rerun train-teachers"
        )
    if spec.model not in list_models():  # the student's default architecture
        raise ModelError(
            f"{tdir / 'teachers.json'}: unknown model '{spec.model}'; rerun train-teachers"
        )
    return spec


def _check_recorded_architecture(tdir: Path, i: int, arch: Architecture) -> None:
    """``metrics_teacher_{i}.json`` must name the architecture teachers.json gives teacher
    ``i`` (where it names one: runs before per-client architectures do not)."""
    mpath = tdir / f"metrics_teacher_{i}.json"
    if not mpath.is_file():
        return
    rec = load_json(mpath, "teacher metrics")
    if (
        isinstance(rec, dict)
        and "model" in rec
        and (rec["model"], rec.get("model_kwargs", {})) != arch
    ):
        raise FedDistillError(
            f"{mpath} records architecture {describe([(rec['model'], rec.get('model_kwargs') or {})])}"
            f" but teachers.json gives teacher {i} {describe([arch])}; rerun train-teachers"
            " force=true"
        )
