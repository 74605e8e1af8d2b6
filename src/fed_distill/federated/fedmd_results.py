"""FedMD's results for people: the per-party summary table and the accuracy-per-round figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.tables import format_table


def summary_table(results: dict[str, Any]) -> str:
    """Per party: alone -> after R rounds -> pooled, gain; then the means and timings."""
    r = results["rounds"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = []
    for i, arch in enumerate(results["parties"]):
        acc = results["party_acc"][i]
        rows.append(
            [
                i,
                arch,
                f(results["alone_acc"][i]),
                f(results.get("alone_extended_acc", [None] * (i + 1))[i]),
                f(acc[-1]),
                f(results["pooled_acc"][i]),
                f"{100 * (acc[-1] - results['alone_acc'][i]):+.1f}",
            ]
        )

    h = headline(results)
    rows.append(
        [
            "mean",
            "",
            *(f(h[k]) for k in ("alone", "alone_extended", "final", "pooled")),
            f"{100 * h['gain']:+.1f}",
        ]
    )
    header = ["party", "model", "alone", "alone ext.", f"FedMD r{r}", "pooled", "gain pts"]
    rt = results.get("round_times_s") or [0.0]
    tail = f"mean time per round {np.mean(rt):.1f}s; wall time {results['wall_time_s']:.1f}s"
    return format_table(header, rows) + "\n" + tail


def _mean(values: list[float | None] | None) -> float | None:
    vals = [v for v in values or [] if v is not None]
    return float(np.mean(vals)) if vals else None


def headline(results: dict[str, Any]) -> dict[str, float | None]:
    """A FedMD run in a few numbers, each the mean over parties: ``alone`` (after transfer
    learning), ``alone_extended`` (the control), ``final`` (after the last round), ``pooled``
    (the upper bound), ``gain`` = final - alone, and ``gap_closed``, the share of the distance
    from alone to pooled that the rounds closed, over the parties with a pooled accuracy
    (None where no party has one or pooled is not above alone)."""
    alone, pooled = results["alone_acc"], results.get("pooled_acc") or []
    final = [a[-1] for a in results["party_acc"]]
    both = [i for i, p in enumerate(pooled) if p is not None and alone[i] is not None]
    gap = sum(pooled[i] - alone[i] for i in both)
    out = {
        "alone": _mean(alone),
        "alone_extended": _mean(results.get("alone_extended_acc")),
        "final": _mean(final),
        "pooled": _mean(pooled),
        "gain": float(np.mean(final) - np.mean(alone)),
        "gap_closed": sum(final[i] - alone[i] for i in both) / gap if both and gap > 0 else None,
    }
    return out


def plot_fedmd(results: dict[str, Any], path: str | Path) -> None:
    """Per-party private test accuracy per round (round 0 = alone), with the mean in black, the
    mean alone and mean pooled levels as horizontal lines, the mean right after each round's
    digest (before its revisit; ``party_acc_digest``) dashed, each party's pooled accuracy as a
    star at the right edge, and the consensus's accuracy on each round's alignment subset (red;
    ``consensus_acc``, and ``consensus_private_acc`` dotted) from round 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fed_distill.artifacts import save_figure

    rounds = results["rounds"]
    xs = np.arange(rounds + 1)
    x_pooled = rounds + max(0.6, 0.08 * rounds)  # the pooled column, right of the last round
    fig, ax = plt.subplots(figsize=(8.5, 5))
    cmap = plt.get_cmap("tab10")
    pooled = results["pooled_acc"]
    for i, acc in enumerate(results["party_acc"]):
        color = cmap(i % 10)
        ax.plot(xs, acc, color=color, lw=1.2, alpha=0.8, label=f"{i}: {results['parties'][i]}")
        if pooled[i] is not None:
            ax.plot([x_pooled], [pooled[i]], marker="*", ms=9, color=color, ls="none")
    mean = np.mean(np.asarray(results["party_acc"], dtype=float), axis=0)
    ax.plot(xs, mean, color="black", lw=2.6, label="mean of parties")
    digest = results.get("party_acc_digest")  # per party, each round's accuracy before revisit
    if digest and all(len(a) == rounds for a in digest) and rounds > 0:
        d = np.asarray(digest, dtype=float)  # NaN where a party missed a round's digest
        seen = np.isfinite(d).any(axis=0)  # a round every party missed has no point (a gap)
        after = np.full(d.shape[1], np.nan)
        after[seen] = np.nanmean(d[:, seen], axis=0)
        ax.plot(
            xs[1:],
            after,
            color="black",
            lw=1.4,
            ls="--",
            marker="v",
            ms=5,
            label="mean after digest (before revisit)",
        )
    if results.get("ensemble_acc"):
        ax.plot(
            xs,
            results["ensemble_acc"],
            color="purple",
            lw=1.6,
            ls="--",
            label="ensemble (diagnostic)",
        )
    for key, ls, label in (
        ("consensus_acc", "-", "consensus, alignment subset"),
        ("consensus_private_acc", ":", "consensus, private classes' images"),
    ):
        vals = [np.nan if v is None else v for v in results.get(key) or []]
        if vals and not np.all(np.isnan(vals)):
            ax.plot(xs[1:], vals, color="crimson", lw=2.0, ls=ls, marker="o", ms=4, label=label)
    ax.axhline(np.mean(results["alone_acc"]), color="grey", ls="--", lw=1.5, label="mean alone")
    pooled_vals = [p for p in pooled if p is not None]
    if pooled_vals:
        ax.axhline(np.mean(pooled_vals), color="black", ls=":", lw=1.5, label="mean pooled")
        ax.plot([], [], marker="*", color="grey", ls="none", ms=9, label="pooled (per party)")
    ext = [v for v in results.get("alone_extended_acc", []) if v is not None]
    if ext:
        ax.axhline(np.mean(ext), color="tab:brown", ls="-.", lw=1.2, label="mean alone, extended")
    ax.set_xlim(-0.3, x_pooled + 0.5)
    ticks: list[float] = list(range(0, rounds + 1, max(1, rounds // 10)))
    labels = [str(t) for t in ticks]
    if pooled_vals:
        ticks.append(x_pooled)
        labels.append("pooled")
    ax.set_xticks(ticks, labels)
    ax.set_xlabel("round (0 = after transfer learning = alone)")
    ax.set_ylabel("private test accuracy")
    ax.set_title(
        f"FedMD ({results.get('preset', '')}): {len(results['parties'])} parties, "
        f"mean gain {100 * results.get('mean_gain', mean[-1] - mean[0]):+.1f} points"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    save_figure(fig, path)
