"""Checks every typed config shares: a number no run can use (NaN, inf) refused wherever it
enters, naming the key. Each config's ``validate`` calls :func:`check_finite` first, so a new
float key is covered without a line of its own."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fed_distill.errors import ConfigError


def _numbers(value: Any) -> list[float]:
    """The floats in a value (a number, or a list / tuple of them); ints are always finite."""
    if isinstance(value, float):
        return [value]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _numbers(v)]
    return []


def check_finite(cfg: Any, prefix: str) -> None:
    """One ConfigError line (``PREFIX.KEY must be a finite number, got inf``) for the first
    field of the dataclass ``cfg`` holding NaN or an infinity, alone or in a list."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if any(not math.isfinite(x) for x in _numbers(value)):
            raise ConfigError(
                f"{prefix}.{f.name} must be {'finite numbers' if isinstance(value, list | tuple) else 'a finite number'},"
                f" got {value!r}"
            )
