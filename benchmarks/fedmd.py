"""Benchmark FedMD on a CPU-scale preset: per party alone -> after R rounds -> pooled.

Usage (from the project root)::

    .venv/bin/python benchmarks/fedmd.py                          # default preset, seed 0
    .venv/bin/python benchmarks/fedmd.py --preset fashion --seed 1 fedmd.rounds=10
    .venv/bin/python benchmarks/fedmd.py --report runs/bench_fedmd/results.json   # table only

The issue's targets: an average gain of at least +15 points over "alone", within 5 points of
"pooled", and R = 20 rounds in under 20 minutes on this machine. The script runs
``fed-distill fedmd`` in this process, then prints the per-party table, the averages, timing
(wall and CPU time, the load average, since other work on the machine slows the run) and whether
each target was met. Nothing is tuned here: the numbers are those of the preset as shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# fashion_unlabelled_pool showed the largest gain of the presets that run on this machine
# (seed 0: +9.1 points, against +4.5 for fashion_same_domain and +2.6 for fashion); it departs
# from the paper by adding unlabelled images of the private classes' kind to the public pool.
DEFAULT_PRESET = "fashion_unlabelled_pool"


def report(r: dict[str, Any], wall_s: float | None = None, cpu_s: float | None = None) -> str:
    """The benchmark table and target lines for one ``results.json``."""
    from fed_distill.federated.fedmd_results import headline
    from fed_distill.tables import format_table

    rounds = r["rounds"]
    rows = []
    ext = r.get("alone_extended_acc") or [None] * len(r["parties"])
    for i, arch in enumerate(r["parties"]):
        alone, final, pooled = r["alone_acc"][i], r["party_acc"][i][-1], r["pooled_acc"][i]
        rows.append(
            [
                i,
                arch,
                f"{alone:.4f}",
                "-" if ext[i] is None else f"{ext[i]:.4f}",
                f"{final:.4f}",
                "-" if pooled is None else f"{pooled:.4f}",
                f"{100 * (final - alone):+.1f}",
                "-" if pooled is None else f"{100 * (final - pooled):+.1f}",
            ]
        )
    h = headline(r)  # the means over parties, as the run's own summary and compare take them
    alone, final = h["alone"], h["final"]
    pooled = float("nan") if h["pooled"] is None else h["pooled"]
    ext_mean = "-" if h["alone_extended"] is None else f"{h['alone_extended']:.4f}"
    rows.append(
        [
            "mean",
            "",
            f"{alone:.4f}",
            ext_mean,
            f"{final:.4f}",
            f"{pooled:.4f}",
            f"{100 * (final - alone):+.1f}",
            f"{100 * (final - pooled):+.1f}",
        ]
    )
    header = [
        "party",
        "model",
        "alone",
        "alone ext.",
        f"FedMD r{rounds}",
        "pooled",
        "gain",
        "vs pooled",
    ]
    best = max(range(rounds + 1), key=lambda k: r["mean_acc"][k])
    per_round = float(np.mean(r["round_times_s"])) if r["round_times_s"] else 0.0
    gain, gap = 100 * (final - alone), 100 * (pooled - final)
    total = wall_s if wall_s is not None else r["wall_time_s"]
    lines = [
        format_table(header, rows),
        "",
        f"preset {r.get('preset')}, seed {r['config'].get('seed')}, {len(r['parties'])} parties,"
        f" {rounds} rounds, device {r.get('device')}",
        f"average gain over alone: {gain:+.1f} points (target >= +15)"
        f" -> {'met' if gain >= 15 else f'missed by {15 - gain:.1f}'}",
        f"average gap to pooled:   {gap:.1f} points (target <= 5)"
        f" -> {'met' if gap <= 5 else f'missed by {gap - 5:.1f}'}",
        "share of the gap from alone to pooled closed: "
        + ("-" if h["gap_closed"] is None else f"{100 * h['gap_closed']:.0f}%"),
        f"control 'alone extended' (no collaboration, same extra private epochs): {ext_mean}",
        "ensemble of the parties (mean logits; diagnostic) by round: "
        + " ".join(f"{v:.3f}" for v in r.get("ensemble_acc", [])),
        f"best mean round: {best} ({r['mean_acc'][best]:.4f}); mean by round: "
        + " ".join(f"{v:.3f}" for v in r["mean_acc"]),
        f"time per round {per_round:.1f}s (steps: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in r.get("step_times_s", {}).items())
        + ")",
        "stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.get("stage_times_s", {}).items()),
        f"total wall time {total / 60:.1f} min (target < 20 min for 20 rounds)"
        + (f", CPU time {cpu_s / 60:.1f} min" if cpu_s is not None else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--report", default=None, help="only print the table of a results.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)

    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    from fed_distill.cli import main as cli_main

    run_dir = args.run_dir or f"runs/bench_fedmd_{args.preset}_s{args.seed}"
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    rc = cli_main(
        [
            "fedmd",
            f"fedmd={args.preset}",
            f"seed={args.seed}",
            f"run_dir={run_dir}",
            "progress=false",
            *args.overrides,
        ]
    )
    if rc != 0:
        return rc
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("\n== benchmark ==")
    print(report(json.loads((Path(run_dir) / "results.json").read_text()), wall, cpu))
    print(
        f"load average at start {load0:.1f}, at end {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
