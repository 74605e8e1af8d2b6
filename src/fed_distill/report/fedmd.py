"""The report of a FedMD run: results.json checked first, then each section from it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fed_distill.report.common import (
    Report,
    _check,
    _check_acc_list,
    _check_num_list,
    _check_times,
    _config_rows,
    _f,
    _get,
    _is_num,
    _pct,
    _secs,
    md_table,
)
from fed_distill.report.figures import (
    _plot_fedmd,
    _series,
    plot_consensus_distance,
    plot_label_distribution,
    plot_times,
)

FEDMD_KEYS = (
    "fedmd.name",
    "fedmd.public",
    "fedmd.private",
    "fedmd.partition",
    "fedmd.samples_per_class",
    "fedmd.parties",
    "fedmd.rounds",
    "fedmd.public_subset_size",
    "fedmd.scores",
    "fedmd.aggregate",
    "fedmd.sharpen",
    "fedmd.digest_loss",
    "fedmd.digest_epochs",
    "fedmd.revisit_epochs",
    "fedmd.revisit_outputs",
    "fedmd.width_scale",
    "seed",
)


def _check_fedmd_results(rep: Report, results: Any) -> None:
    """Every key the report reads, checked; a malformed results.json is one ReportError line."""
    path = rep.run_dir / "results.json"
    _check(
        isinstance(results.get("rounds"), int) and results["rounds"] >= 0,
        path,
        "'rounds' must be an integer >= 0",
    )
    r = results["rounds"]
    parties = results.get("parties")
    _check(
        isinstance(parties, list) and parties and all(isinstance(p, str) for p in parties),
        path,
        "'parties' must be a non-empty list of architecture names",
    )
    n = len(parties)
    pa = results["party_acc"]
    _check(
        isinstance(pa, list) and len(pa) == n,
        path,
        f"'party_acc' must hold one list per party ({n})",
    )
    for i, acc in enumerate(pa):
        _check_acc_list(acc, path, f"party_acc[{i}]", r + 1)
    digest = results.get("party_acc_digest")  # after each round's digest (older runs: none)
    if digest is not None:
        _check(
            isinstance(digest, list) and len(digest) == n,
            path,
            f"'party_acc_digest' must hold one list per party ({n})",
        )
        for i, acc in enumerate(digest):
            _check_acc_list(acc, path, f"party_acc_digest[{i}]", r)
    _check_acc_list(results.get("alone_acc"), path, "alone_acc", n)
    _check_acc_list(results.get("pooled_acc", [None] * n), path, "pooled_acc", n)
    for k in ("alone_extended_acc",):
        if k in results:
            _check_acc_list(results[k], path, k, n)
    if results.get("ensemble_acc"):
        _check_acc_list(results["ensemble_acc"], path, "ensemble_acc", r + 1)
    for k in ("consensus_acc", "consensus_private_acc"):  # one value per round (older runs: none)
        if k in results:
            _check_acc_list(results[k], path, k, r)
    if "round_times_s" in results:
        _check_num_list(results["round_times_s"], path, "round_times_s")
    for k in ("stage_times_s", "step_times_s"):
        if k in results:
            _check_times(results[k], path, k)
    dist = results.get("consensus_distance")
    if dist is not None:
        _check(
            isinstance(dist, list) and all(isinstance(d, list) and len(d) == n for d in dist),
            path,
            "'consensus_distance' must hold one list of per-party values per round",
        )
        for d in dist:
            _check_num_list(d, path, "consensus_distance")


def _title_and_config(rep: Report, results: dict[str, Any]) -> None:
    r, parties, pa = results["rounds"], results["parties"], results["party_acc"]
    n = len(parties)
    cfg = results.get("config") or {}
    data = results.get("data") or {}
    run = rep.run_dir
    preset = results.get("preset") or _get(cfg, "fedmd.name", "")
    fin = [a[-1] for a in pa]
    alone = results["alone_acc"]
    gain = 100 * (np.nanmean(_series(fin)) - np.nanmean(_series(alone)))
    rep.add(
        f"# FedMD — `{run.name}`\n\n"
        f"Preset **{preset or '?'}**: {n} heterogeneous parties, {r} rounds; mean private test accuracy "
        f"{_pct(np.nanmean(_series(alone)))}% alone → {_pct(np.nanmean(_series(fin)))}% after round {r} "
        f"(**{gain:+.1f} points**).  \n"
        f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{run}`."
    )
    rep.add("## Configuration")
    rows = _config_rows(cfg, FEDMD_KEYS)
    if results.get("device"):
        rows.append(["device (used)", f"`{results['device']}`"])
    if isinstance(data, dict) and data:
        rows += [
            [f"data: {k}", f"`{data[k]}`"]
            for k in (
                "public_train",
                "public_val",
                "private_test",
                "private_per_party",
                "num_outputs",
                "image",
            )
            if k in data
        ]
    rep.add(md_table(["key", "value"], rows) if rows else "_No configuration recorded._")


def _results_section(rep: Report, results: dict[str, Any]) -> None:
    r, parties, pa = results["rounds"], results["parties"], results["party_acc"]
    n = len(parties)
    fin = [a[-1] for a in pa]
    alone = results["alone_acc"]
    gain = 100 * (np.nanmean(_series(fin)) - np.nanmean(_series(alone)))
    rep.add("## Results")
    ext = results.get("alone_extended_acc") or [None] * n
    pooled = results.get("pooled_acc") or [None] * n
    table = [
        [
            i,
            f"`{parties[i]}`",
            _pct(alone[i]),
            _pct(ext[i]),
            _pct(fin[i]),
            _pct(pooled[i]),
            f"{100 * (_f(fin[i]) - _f(alone[i])):+.1f}",
        ]
        for i in range(n)
    ]

    def mean(v: Sequence[Any]) -> str:
        vals = [x for x in v if x is not None]
        return _pct(float(np.mean(vals))) if vals else "—"

    table.append(["mean", "", mean(alone), mean(ext), mean(fin), mean(pooled), f"{gain:+.1f}"])
    rep.add(
        md_table(
            [
                "party",
                "model",
                "alone %",
                "alone, extended %",
                f"FedMD round {r} %",
                "pooled %",
                "gain (points)",
            ],
            table,
        )
    )
    rep.add(
        "*Alone*: after transfer learning (public, then private data) — round 0. *Alone, extended*: the "
        "alone model trained on its own data for as many epochs as the rounds' revisits (a control). "
        "*Pooled*: each architecture trained on all parties' private data (the upper bound). "
        "Accuracy is on the private task's test set."
    )


def _round_figures(rep: Report, results: dict[str, Any]) -> None:
    parties, dist = results["parties"], results.get("consensus_distance")
    rep.figure(
        "fedmd_accuracy",
        "Private test accuracy of each party per round (round 0 = alone), with the mean, the mean alone "
        "and mean pooled levels, and each party's pooled accuracy as a star; in red, the consensus's "
        "accuracy on each round's alignment subset, where the benchmark knows the labels (solid: "
        "every known image, each over its own task's outputs; dotted: the private classes' images) "
        "— if it sits near the parties, the rule has not raised the ceiling they digest.",
        lambda p: _plot_fedmd(results, p),
    )
    left = [
        (k + 1, d)
        for k, lo in enumerate(results.get("left_out") or [])
        for d in (lo if isinstance(lo, list) else [])
        if isinstance(d, dict)
    ]
    if left:
        rep.add(
            "Parties left out of a round's consensus: "
            + "; ".join(
                f"round {k}: party {d.get('party')} ({d.get('reason', '')})" for k, d in left
            )
        )
    if dist:
        rep.figure(
            "consensus_distance",
            "How far each party's class scores were from the consensus in each round.",
            lambda p: plot_consensus_distance(dist, parties, p),
        )


def _label_section(rep: Report, results: dict[str, Any]) -> None:
    cfg = results.get("config") or {}
    data = results.get("data") or {}
    infos = data.get("party_info") if isinstance(data, dict) else None
    if (
        isinstance(infos, list)
        and infos
        and all(isinstance(d, dict) and isinstance(d.get("class_counts"), list) for d in infos)
    ):
        counts = np.array([d["class_counts"] for d in infos], dtype=float)
        names = data.get("private_classes") or [str(k) for k in range(counts.shape[1])]
        if len(names) != counts.shape[1]:
            names = [str(k) for k in range(counts.shape[1])]
        rep.add("## Data: private label distribution per party")
        rep.figure(
            "label_distribution",
            "Private training samples of each class held by each party.",
            lambda p: plot_label_distribution(
                counts,
                names,
                f"private data ({_get(cfg, 'fedmd.private', '')})",
                p,
                xlabel="party",
            ),
        )
    else:
        rep.missing.append("per-party label counts (`data.party_info` in results.json)")


def _time_section(rep: Report, results: dict[str, Any]) -> None:
    times = {**(results.get("stage_times_s") or {})}
    steps = results.get("step_times_s") or {}
    if times or steps:
        rep.add("## Wall time per stage")
        shown = {**times, **{f"rounds: {k}": v for k, v in steps.items()}}
        total = results.get("wall_time_s")
        rt = results.get("round_times_s") or []
        rep.figure(
            "stage_times",
            "Wall time per stage; the rounds' time is broken into its protocol steps."
            + (f" Whole run {_secs(total)}" if _is_num(total) else "")
            + (f"; {np.mean(rt):.1f} s per round." if rt else "."),
            lambda p: plot_times(shown, "FedMD wall time", p),
        )


def fedmd_report(rep: Report, results: Any) -> None:
    """The FedMD report's sections, one after another, read top to bottom."""
    _check_fedmd_results(rep, results)
    _title_and_config(rep, results)
    _results_section(rep, results)
    _round_figures(rep, results)
    _label_section(rep, results)
    _time_section(rep, results)
