"""The packaged Hydra configs: ``config.yaml`` and one folder of presets per config group."""

from __future__ import annotations

from importlib.resources import files


def preset_names(group: str) -> list[str]:
    """The presets shipped for config group ``group`` (``synthesis``, ``fedmd``, ...), sorted."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in (files(__name__) / group).iterdir()
        if p.name.endswith(".yaml")
    )
