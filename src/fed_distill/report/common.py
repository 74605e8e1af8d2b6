"""What every report section shares: the Report being assembled, checked reading of the run's
files (a malformed file is a one-line ReportError), number formatting and markdown tables."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_distill.artifacts import load_json
from fed_distill.errors import FedDistillError
from fed_distill.tables import md_table  # noqa: F401 - re-exported for the report modules

PREFIX = "report_"  # figures are written next to report.md as report_*.png


class ReportError(FedDistillError):
    """A run folder cannot be reported: it does not exist, holds nothing, or a file is malformed."""


# ============================================================================ reading, checked


def _read_json(path: Path, what: str) -> Any | None:
    """The file's JSON, None when it is absent; a malformed file is a ReportError."""
    if not path.is_file():
        return None
    try:
        return load_json(path, what)
    except FedDistillError as e:
        raise ReportError(str(e)) from None


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise ReportError(f"{path}: {msg}; the file is malformed, rerun the stage that writes it")


def _check_acc(v: Any, path: Path, key: str, optional: bool = True) -> None:
    ok = (v is None and optional) or (_is_num(v) and (math.isnan(v) or -1e-6 <= v <= 1 + 1e-6))
    _check(ok, path, f"'{key}' must be an accuracy in [0, 1], got {v!r}")


def _check_acc_list(v: Any, path: Path, key: str, length: int | None = None) -> None:
    _check(isinstance(v, list), path, f"'{key}' must be a list")
    if length is not None:
        _check(len(v) == length, path, f"'{key}' has {len(v)} entries, expected {length}")
    for i, a in enumerate(v):
        _check_acc(a, path, f"{key}[{i}]")


def _check_num_list(v: Any, path: Path, key: str) -> None:
    _check(
        isinstance(v, list) and all(x is None or _is_num(x) for x in v),
        path,
        f"'{key}' must be a list of numbers",
    )


def _check_times(v: Any, path: Path, key: str) -> None:
    _check(
        isinstance(v, dict) and all(isinstance(k, str) and _is_num(t) for k, t in v.items()),
        path,
        f"'{key}' must map names to seconds",
    )


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``, or ``default`` where a level is missing or not a dict."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _pct(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _secs(v: float) -> str:
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


# ============================================================================ what a run holds


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class Report:
    """The report being assembled: markdown sections, figures written, what is missing."""

    run_dir: Path
    kind: str
    path: Path | None = None  # report.md, once written
    sections: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")

    def figure(self, name: str, caption: str, draw: Callable[[Path], None]) -> None:
        file = f"{PREFIX}{name}.png"
        draw(self.run_dir / file)
        self.figures.append(Figure(file, caption))
        self.add(f"![{name.replace('_', ' ')}]({file})\n\n*{caption}*")


def _config_rows(cfg: dict[str, Any], keys: Sequence[str]) -> list[list[Any]]:
    rows = []
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != {} and node != []:
            rows.append([f"`{key}`", f"`{node}`"])
    return rows
