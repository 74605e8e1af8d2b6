"""The numbers of a comparison: per group of runs, the mean, standard deviation and count of each
headline figure, as a table (terminal or markdown) and as CSV rows.

The standard deviation is the sample one (n - 1 in the denominator), the spread a reader expects
beside a mean over seeds; a group of one run has none. A value a run does not have (FedAvg with
mixed architectures, a run from before per-class figures) is left out of its mean, and the cell
says over how many runs it was taken when that is fewer than the group's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fed_distill.compare.runs import Group, Run
from fed_distill.federated.fedmd_results import headline
from fed_distill.tables import format_table


@dataclass
class Stat:
    """Summary of one figure over the runs of a group (``None`` and NaN left out)."""

    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        return cls([float(v) for v in values if v is not None and not math.isnan(v)])

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation; None below two values."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class Metric:
    key: str  # the CSV's name for it
    header: str  # the table's column
    unit: str  # "fraction" (shown in %), "s", "images/s"
    get: Callable[[Run], float | None]


def _ratio(r: Run) -> float | None:
    s, e = r.results.get("student_acc"), r.results.get("ensemble_acc")
    return s / e if s is not None and e else None


def _key(name: str) -> Callable[[Run], float | None]:
    return lambda r: r.results.get(name)


def _fedmd(name: str) -> Callable[[Run], float | None]:
    return lambda r: headline(r.results)[name]


METRICS: dict[str, list[Metric]] = {
    "oneshot": [
        Metric("student_acc", "student %", "fraction", _key("student_acc")),
        # refit=head: the student after the statistics round (— for one-shot-only runs)
        Metric("student_refit_acc", "+stats round %", "fraction", _key("student_refit_acc")),
        Metric("ensemble_acc", "ensemble %", "fraction", _key("ensemble_acc")),
        Metric("fedavg_acc", "FedAvg %", "fraction", _key("fedavg_acc")),
        Metric("student_over_ensemble", "student/ens %", "fraction", _ratio),
        Metric("synthesis_images_per_s", "synth img/s", "images/s", _key("synthesis_images_per_s")),
        Metric("wall_time_s", "wall s", "s", _key("wall_time_s")),
    ],
    "fedmd": [
        Metric("alone", "alone %", "fraction", _fedmd("alone")),
        Metric("alone_extended", "alone ext. %", "fraction", _fedmd("alone_extended")),
        Metric("final", "final %", "fraction", _fedmd("final")),
        Metric("pooled", "pooled %", "fraction", _fedmd("pooled")),
        Metric("gain", "gain pts", "fraction", _fedmd("gain")),
        Metric("gap_closed", "gap closed %", "fraction", _fedmd("gap_closed")),
        Metric("wall_time_s", "wall s", "s", _key("wall_time_s")),
    ],
}
GAP_HEADER = "worst class gap pts (class)"


def group_stats(group: Group, protocol: str) -> dict[str, Stat]:
    return {m.key: Stat.of([m.get(r) for r in group.runs]) for m in METRICS[protocol]}


def worst_class(group: Group) -> tuple[str, Stat] | None:
    """The class whose ensemble - student gap is largest on average over the group's runs, with
    the gaps' Stat; None when no run of the group has per-class figures (``class_acc``)."""
    gaps: dict[int, list[float]] = {}
    names: dict[int, str] = {}
    for r in group.runs:
        acc = r.results.get("class_acc") or {}
        s, e = acc.get("student"), acc.get("ensemble")
        if not isinstance(s, list) or not isinstance(e, list):
            continue
        cls_names = r.results.get("class_names") or []
        for k, (a, b) in enumerate(zip(s, e, strict=False)):
            if a is not None and b is not None:
                gaps.setdefault(k, []).append(b - a)
                if k < len(cls_names):
                    names.setdefault(k, str(cls_names[k]))
    if not gaps:
        return None
    k = max(gaps, key=lambda c: (Stat.of(gaps[c]).mean, -c))
    return names.get(k, str(k)), Stat.of(gaps[k])


def cell(stat: Stat, unit: str, group_n: int, digits: int | None = None) -> str:
    """``85.12 ± 0.43`` (accuracies in %), the mean alone for one value, ``—`` for none, and
    ``(n=k)`` where fewer than the group's runs had the value."""
    if stat.mean is None:
        return "—"
    scale = 100.0 if unit == "fraction" else 1.0
    d = digits if digits is not None else (2 if unit == "fraction" else 1)
    text = f"{scale * stat.mean:.{d}f}"
    if stat.std is not None:
        text += f" ± {scale * stat.std:.{d}f}"
    return text + (f" (n={stat.n})" if stat.n < group_n else "")


Column = tuple[str, Callable[[Group], Any]]  # a caller's own column: header, cell of a group


def table(
    groups: Sequence[Group], protocol: str, markdown: bool = False, extra: Sequence[Column] = ()
) -> str:
    """One row per group: label, n, then mean ± std of each headline figure, then the ``extra``
    columns (the benchmarks' published anchors, say)."""
    metrics = METRICS[protocol]
    worst = [worst_class(g) for g in groups]
    header = ["group", "n", *(m.header for m in metrics)]
    if any(worst):
        header.append(GAP_HEADER)
    header += [h for h, _ in extra]
    rows = []
    for g, w in zip(groups, worst, strict=True):
        stats = group_stats(g, protocol)
        row: list[Any] = [g.label, len(g.runs)]
        row += [cell(stats[m.key], m.unit, len(g.runs)) for m in metrics]
        if any(worst):
            row.append("—" if w is None else f"{cell(w[1], 'fraction', len(g.runs), 1)} ({w[0]})")
        rows.append(row + [fn(g) for _, fn in extra])
    return format_table(header, rows, markdown=markdown)


CSV_HEADER = ["protocol", "group", "metric", "unit", "n", "mean", "std", "min", "max", "note"]


def csv_rows(groups: Sequence[Group], protocol: str) -> list[list[Any]]:
    """Long format, a row per group and figure; accuracies as fractions as in results.json."""
    rows = []
    for g in groups:
        stats = group_stats(g, protocol)
        named = [(m.key, m.unit, stats[m.key], "") for m in METRICS[protocol]]
        w = worst_class(g)
        if w is not None:
            named.append(("worst_class_gap", "fraction", w[1], f"class {w[0]}"))
        for key, unit, st, note in named:
            lo, hi = (min(st.values), max(st.values)) if st.values else (None, None)
            rows.append([protocol, g.label, key, unit, st.n, st.mean, st.std, lo, hi, note])
    return rows
