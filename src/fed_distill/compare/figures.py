"""The comparison's figures: per group, the mean accuracy curve over its runs with a band of one
standard deviation, against training progress (one-shot: student epochs; FedMD: rounds) and
against wall time (the mean over the group's runs of the time each point was reached)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fed_distill.compare.runs import Group, Run
from fed_distill.compare.summary import Stat

AXES = {
    "oneshot": (
        "student epoch",
        "seconds into the student stage",
        "student test accuracy %",
        "One-shot: the student during distillation",
    ),
    "fedmd": (
        "round (0 = after transfer learning)",
        "seconds of rounds (after transfer learning)",
        "mean private test accuracy of the parties %",
        "FedMD: the parties over the rounds",
    ),
}


def run_curve(run: Run) -> tuple[list[float], list[float] | None]:
    """(accuracy per point, seconds per point or None): the student's test accuracy after each
    epoch (NaN where it was not evaluated), or the parties' mean accuracy after each round."""
    r = run.results
    if run.protocol == "oneshot":
        c = r.get("student_curve") or {}
        acc = [math.nan if a is None else float(a) for a in c.get("test_acc") or []]
        t = [float(s) for s in c.get("elapsed_s") or []]
        return acc, t if len(t) == len(acc) else None
    parties = r["party_acc"]
    acc = [sum(p[k] for p in parties) / len(parties) for k in range(min(map(len, parties)))]
    rt = r.get("round_times_s") or []
    t = [0.0]
    for s in rt:
        t.append(t[-1] + float(s))
    return acc, t if len(t) == len(acc) else None


def mean_curve(group: Group) -> dict[str, list[float]]:
    """Point by point over the group's runs: x (index, from 1 for epochs, 0 for rounds), mean
    time, mean and std of the accuracy; a point is kept where at least one run has it."""
    curves = [run_curve(r) for r in group.runs]
    start = 0 if group.runs and group.runs[0].protocol == "fedmd" else 1
    out: dict[str, list[float]] = {"x": [], "t": [], "mean": [], "std": []}
    for k in range(max((len(a) for a, _ in curves), default=0)):
        acc = Stat.of([a[k] for a, _ in curves if k < len(a)])
        if acc.mean is None:
            continue
        t = Stat.of([ts[k] for _, ts in curves if ts is not None and k < len(ts)])
        out["x"].append(k + start)
        out["t"].append(math.nan if t.mean is None else t.mean)
        out["mean"].append(acc.mean)
        out["std"].append(acc.std or 0.0)
    return out


def plot_curves(groups: Sequence[Group], protocol: str, path: Path) -> bool:
    """Two panels, progress and wall time, a line with a band per group; False (nothing
    written) when no run has a curve."""
    curves = [(g, mean_curve(g)) for g in groups]
    curves = [(g, c) for g, c in curves if c["x"]]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fed_distill.files import save_figure

    x_label, t_label, y_label, title = AXES[protocol]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for i, (g, c) in enumerate(curves):
        color = plt.get_cmap("tab10")(i % 10)
        lo = [100 * (m - s) for m, s in zip(c["mean"], c["std"], strict=True)]
        hi = [100 * (m + s) for m, s in zip(c["mean"], c["std"], strict=True)]
        y = [100 * m for m in c["mean"]]
        for ax, xs in ((axes[0], c["x"]), (axes[1], c["t"])):
            keep = [j for j, v in enumerate(xs) if not math.isnan(v)]
            if not keep:
                continue
            pick = [xs[j] for j in keep]
            ax.plot(pick, [y[j] for j in keep], color=color, marker=".", label=_legend(g))
            ax.fill_between(
                pick, [lo[j] for j in keep], [hi[j] for j in keep], color=color, alpha=0.2
            )
    axes[0].set_xlabel(x_label)
    axes[1].set_xlabel(t_label)
    axes[0].set_ylabel(y_label)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}: mean over runs, band = ± 1 std")
    fig.tight_layout()
    save_figure(fig, path)
    return True


def _legend(g: Group) -> str:
    return f"{g.label} (n={len(g.runs)})"
