"""FedMD's consensus rules (``fedmd.aggregate=NAME``), one registry (``registry.py``) and the
built-in rules in the modules of this package: ``average.py`` (mean, median, trimmed_mean) and
``weighted.py`` (confidence, class_share, reliability). A new rule is one new module here (found
without being listed: this package imports every module of its own, and every
``fed_distill.rules`` entry point of the installed packages, the first time the registry is
asked for), or ``fed_distill.register_rule`` from Python."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from fed_distill.errors import ConfigError

ENTRY_POINTS = "fed_distill.rules"
_REGISTRY_NAMES = (
    "Inputs",
    "Rule",
    "RuleOptions",
    "all_rule_params",
    "check_rule_keys",
    "get_rule",
    "list_rules",
    "register_rule",
    "rule_options",
)
_DISCOVERED: list[bool] = []

__all__ = ["discover", *_REGISTRY_NAMES]


def discover() -> None:
    """Import every module of this package and every ``fed_distill.rules`` entry point once:
    each registers the rules it defines."""
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise ConfigError(
                f"consensus-rule plug-in {ep.name!r} ({ep.value}) failed: {e}"
            ) from None


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        discover()
        from fed_distill.federated.rules import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'fed_distill.federated.rules' has no attribute {name!r}")
