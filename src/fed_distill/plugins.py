"""Discovery of a registry's entries: every module of a package, and every entry point of a
group (a component shipped in another installed package). Importing a module is what
registers what it defines (``@register_synthesizer``, ``@register_rule``), so a new component
is one new file, listed nowhere."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

from fed_distill.errors import ConfigError


def import_all(package: str, path: Iterable[str], group: str, what: str) -> None:
    """Import every module of ``package`` (found on ``path``, its ``__path__``) and load every
    entry point of ``group``; a plug-in that fails to load is one ConfigError line naming it
    (``what``: the kind of component, for the message)."""
    for info in pkgutil.iter_modules(list(path)):
        importlib.import_module(f"{package}.{info.name}")
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise ConfigError(f"{what} plug-in {ep.name!r} ({ep.value}) failed: {e}") from None


def registry_access(
    package: str, path: Iterable[str], group: str, what: str, names: Iterable[str]
) -> tuple[Callable[[], None], Callable[[str], Any]]:
    """``(discover, get)`` for a package whose registry module (``PACKAGE.registry``) hands out
    ``names``: ``discover()`` runs :func:`import_all` once; ``get(name)`` (the package's
    ``__getattr__``) discovers, then returns the registry's ``name``."""
    done: list[bool] = []
    wanted = set(names)

    def discover() -> None:
        if not done:
            done.append(True)  # first: a module that reads the registry while imported
            import_all(package, path, group, what)

    def get(name: str) -> Any:
        if name not in wanted:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        discover()
        return getattr(importlib.import_module(f"{package}.registry"), name)

    return discover, get
