"""The report's per-class section of a one-shot run: per-class accuracy of the student against
the ensemble (``report_per_class.png`` and a table with the synthetic pool's agreement per
class), and the confusions the student adds. Read from ``results.json``'s ``class_acc``,
``confusion`` and ``pool_agreement`` (see ``federated/per_class.py``); a run written before
these keys gets a note instead of the section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.artifacts import save_figure
from fed_distill.report.common import Report, _check, _check_acc_list, _f, _is_num, _pct, md_table
from fed_distill.report.figures import _plt

MAX_CLASSES = 30  # more classes: the chart and the table keep the ones with the largest gap
MAX_CONFUSIONS = 8  # rows of "Confusions the student adds"


def check_per_class(results: dict[str, Any], path: Path) -> int | None:
    """Check ``class_acc``, ``confusion`` and ``pool_agreement`` where present (a malformed value
    is one ReportError line); the number of classes, None where the run has no ``class_acc``."""
    acc = results.get("class_acc")
    if acc is None:
        return None
    _check(isinstance(acc, dict), path, "'class_acc' must be an object")
    _check(isinstance(acc.get("ensemble"), list), path, "'class_acc.ensemble' must be a list")
    n = len(acc["ensemble"])
    for k in ("student", "student_refit", "ensemble", "fedavg"):
        if acc.get(k) is not None:
            _check_acc_list(acc[k], path, f"class_acc.{k}", n)
    teachers = acc.get("teachers") or []
    _check(isinstance(teachers, list), path, "'class_acc.teachers' must be a list of lists")
    for i, t in enumerate(teachers):
        _check_acc_list(t, path, f"class_acc.teachers[{i}]", n)
    conf = results.get("confusion") or {}
    _check(isinstance(conf, dict), path, "'confusion' must be an object")
    for k, m in conf.items():
        ok = m is None or (
            isinstance(m, list)
            and len(m) == n
            and all(isinstance(r, list) and len(r) == n for r in m)
            and all(isinstance(v, int) and v >= 0 for r in m for v in r)
        )
        _check(ok, path, f"'confusion.{k}' must be a {n}x{n} matrix of counts")
    pool = results.get("pool_agreement")
    if pool is not None:
        _check(isinstance(pool, dict), path, "'pool_agreement' must be an object")
        for k in ("ensemble", "holders"):
            _check_acc_list(pool.get(k), path, f"pool_agreement.{k}", n)
        counts = pool.get("count")
        ok = isinstance(counts, list) and len(counts) == n
        _check(
            ok and all(isinstance(c, int) and c >= 0 for c in counts),
            path,
            "'pool_agreement.count' must be counts",
        )
    return n


def _names(results: dict[str, Any], fallback: list[str], n: int) -> list[str]:
    names = results.get("class_names")
    if isinstance(names, list) and len(names) == n:
        return [str(v) for v in names]
    return fallback if len(fallback) == n else [str(k) for k in range(n)]


def _shown(acc: dict[str, Any], n: int) -> list[int]:
    """The classes to show: all, or the ``MAX_CLASSES`` with the largest ensemble-student gap."""
    if n <= MAX_CLASSES or acc.get("student") is None:
        return list(range(min(n, MAX_CLASSES)))
    gap = [_f(e) - _f(s) for s, e in zip(acc["student"], acc["ensemble"], strict=True)]
    return sorted(sorted(range(n), key=lambda k: -np.nan_to_num(gap[k], nan=-2.0))[:MAX_CLASSES])


def plot_per_class(
    series: dict[str, list[Any]], names: list[str], classes: list[int], path: Path
) -> None:
    """Grouped bars: per class, each series' accuracy (student, ensemble, FedAvg)."""
    plt = _plt()
    colors = {
        "ensemble": "tab:green",
        "student": "tab:red",
        "student + statistics round": "tab:purple",
        "FedAvg": "tab:orange",
    }
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.3 * len(classes) * len(series) + 2)), 4.2))
    width = 0.8 / len(series)
    xs = np.arange(len(classes))
    for j, (label, vals) in enumerate(series.items()):
        v = [100 * _f(vals[k]) for k in classes]
        ax.bar(
            xs + (j - (len(series) - 1) / 2) * width, v, width, label=label, color=colors.get(label)
        )
    ax.set_xticks(xs, [names[k] for k in classes], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_ylim(0, 118)  # room for the legend above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    ax.set_title("accuracy per class on the official test set", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _class_table(results: dict[str, Any], names: list[str], classes: list[int]) -> str:
    acc, pool = results["class_acc"], results.get("pool_agreement")
    header = ["class", "ensemble %", "student %", "student − ensemble"]
    header += ["FedAvg %"] if acc.get("fedavg") is not None else []
    header += ["+ statistics round %"] if acc.get("student_refit") is not None else []
    if pool is not None:
        header += ["pool images", "pool: ensemble p(class)", "pool: holders p(class)"]
    rows = []
    for k in classes:
        s, e = acc["student"][k] if acc.get("student") else None, acc["ensemble"][k]
        gap = "—" if s is None or e is None else f"{100 * (s - e):+.1f}"
        row = [names[k], _pct(e), _pct(s), gap]
        row += [_pct(acc["fedavg"][k])] if acc.get("fedavg") is not None else []
        row += [_pct(acc["student_refit"][k])] if acc.get("student_refit") is not None else []
        if pool is not None:
            row += [pool["count"][k], *(_prob(pool[m][k]) for m in ("ensemble", "holders"))]
        rows.append(row)
    return md_table(header, rows)


def _prob(v: Any) -> str:
    return "—" if not _is_num(v) else f"{v:.2f}"


def added_confusions(
    student: list[list[int]], ensemble: list[list[int]], top: int = MAX_CONFUSIONS
) -> list[tuple[int, int, int, int]]:
    """(true, predicted, student count, ensemble count) of the off-diagonal cells where the
    student's count most exceeds the ensemble's (only those where it does), largest first."""
    s, e = np.asarray(student), np.asarray(ensemble)
    diff = s - e
    np.fill_diagonal(diff, 0)
    cells = [(int(i), int(j)) for i, j in zip(*np.nonzero(diff > 0), strict=True)]
    cells.sort(key=lambda c: (-diff[c], c))
    return [(i, j, int(s[i, j]), int(e[i, j])) for i, j in cells[:top]]


def per_class_section(rep: Report, results: dict[str, Any] | None, fallback: list[str]) -> None:
    """``## Per class``: the chart, the table with the pool's agreement, the added confusions;
    a note for results written before the per-class keys. ``fallback``: class names from the
    split, where results.json names none."""
    if results is None:
        return
    rep.add("## Per class")
    n = check_per_class(results, rep.run_dir / "results.json")
    if n is None:
        rep.add(
            "_This run's `results.json` has no per-class figures (`class_acc`): it was written"
            " before fed-distill recorded them. Rerun `fed-distill oneshot` on the folder to get"
            " them (finished stages are reused)._"
        )
        return
    acc, names = results["class_acc"], _names(results, fallback, n)
    classes = _shown(acc, n)
    series = {"ensemble": acc["ensemble"]}
    series.update({"student": acc["student"]} if acc.get("student") is not None else {})
    if acc.get("student_refit") is not None:
        series["student + statistics round"] = acc["student_refit"]
    series.update({"FedAvg": acc["fedavg"]} if acc.get("fedavg") is not None else {})
    what = "" if len(classes) == n else f" ({len(classes)} of {n} classes: the largest gaps)"
    rep.figure(
        "per_class",
        f"Test accuracy per class of the ensemble ({results.get('ensemble_method', '?')}), the"
        f" student{' and one-shot FedAvg' if 'FedAvg' in series else ''}{what}.",
        lambda p: plot_per_class(series, names, classes, p),
    )
    rep.add(_class_table(results, names, classes))
    if results.get("pool_agreement") is not None:
        rep.add(
            "*pool*: the final synthetic pool (`student/dataset.pt`) by intended class: its"
            " images, the ensemble's mean probability of the intended class, and its holders'"
            " (each teacher's probability weighted by its share of the class's training data)."
            " A low value marks the classes whose synthetic images the teachers find least"
            " convincing."
        )
    _confusions(rep, results, names)


def _confusions(rep: Report, results: dict[str, Any], names: list[str]) -> None:
    conf = results.get("confusion") or {}
    if conf.get("student") is None or conf.get("ensemble") is None:
        return
    rows = [
        [f"{names[i]} → {names[j]}", s, e, s - e]
        for i, j, s, e in added_confusions(conf["student"], conf["ensemble"])
    ]
    rep.add("### Confusions the student adds")
    if not rows:
        rep.add("_The student makes no confusion more often than the ensemble._")
        return
    rep.add(
        "Test images of the true class the student sends to the predicted class more often than"
        " the ensemble does (counts).\n\n"
        + md_table(["true → predicted", "student", "ensemble", "added"], rows)
    )
