"""Per-client architectures: ``teachers.models`` resolved to one (name, kwargs) per teacher.

``teachers.models`` is a list of registered names, each optionally with its kwargs
(``{name: fedmd_3, kwargs: {width_scale: 0.25}}``), cycled when shorter than the number of
teachers, or a named family (``fedmd_family``: the ten FedMD CNNs, ``fedmd_1`` .. ``fedmd_10``),
or one name. Unset (null), every teacher has the ``model=`` architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fed_distill.errors import ModelError
from fed_distill.models.fedmd import fedmd_default_parties
from fed_distill.models.registry import list_models

# A family name -> its member model names, in order.
FAMILIES: dict[str, list[str]] = {"fedmd_family": fedmd_default_parties()}

Architecture = tuple[str, dict[str, Any]]


def list_families() -> list[str]:
    return sorted(FAMILIES)


def _entry(item: Any, pos: int) -> list[Architecture]:
    """One item of ``teachers.models``: a name, a family, or {name, kwargs}."""
    if isinstance(item, str):
        if item in FAMILIES:
            return [(n, {}) for n in FAMILIES[item]]
        if item not in list_models():
            raise ModelError(
                f"teachers.models[{pos}]: unknown model '{item}'; available: "
                f"{', '.join(list_models() + list_families())}"
            )
        return [(item, {})]
    if isinstance(item, Mapping) and set(item) <= {"name", "kwargs"} and "name" in item:
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ModelError(f"teachers.models[{pos}].kwargs must be a mapping, got {kwargs!r}")
        archs = _entry(item["name"], pos)
        return [(n, {**k, **dict(kwargs)}) for n, k in archs]
    raise ModelError(
        f"teachers.models[{pos}] must be a model name or {{name: NAME, kwargs: {{...}}}}, got"
        f" {item!r}; e.g. teachers.models=[cnn_small,resnet8]"
    )


def parse_architectures(value: Any) -> list[Architecture] | None:
    """``teachers.models`` as a list of (name, kwargs), families expanded; None when unset."""
    if value is None:
        return None
    items = [value] if isinstance(value, str | Mapping) else value
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise ModelError(
            f"teachers.models must be a non-empty list of model names or a family"
            f" ({', '.join(list_families())}), got {value!r}"
        )
    return [a for pos, item in enumerate(items) for a in _entry(item, pos)]


def teacher_architectures(
    value: Any, default: Architecture, num_teachers: int
) -> list[Architecture]:
    """One (name, kwargs) per teacher: ``teachers.models`` cycled, or ``default`` for all."""
    archs = parse_architectures(value)
    if archs is None:
        return [(default[0], dict(default[1]))] * num_teachers
    return [(archs[i % len(archs)][0], dict(archs[i % len(archs)][1])) for i in range(num_teachers)]


def mixed(archs: Sequence[Architecture]) -> bool:
    """Whether the teachers differ in architecture (name or kwargs)."""
    return any(a != archs[0] for a in archs[1:])


def describe(archs: Sequence[Architecture]) -> str:
    """``cnn_small, resnet8`` (kwargs shown where set), for notes and tables."""
    return ", ".join(n + (f"({k})" if k else "") for n, k in archs)
