"""Benchmark FedMD on a CPU-scale preset: per party alone -> after R rounds -> pooled.

Usage (from the project root)::

    .venv/bin/python benchmarks/fedmd.py                          # default preset, seed 0
    .venv/bin/python benchmarks/fedmd.py --preset fashion --seed 1 fedmd.rounds=10
    .venv/bin/python benchmarks/fedmd.py --report runs/bench_fedmd/results.json   # table only
    # consensus rules against the plain mean, on the same parties (one transfer learning and
    # baselines per preset and seed, shared by every rule that changes only the rounds):
    .venv/bin/python benchmarks/fedmd.py --rules mean,confidence,class_share,sharpen \
        --presets fashion_unlabelled_pool,fashion_unlabelled_pool_skewed --seeds 0,1,2
    .venv/bin/python benchmarks/fedmd.py --rules-table runs/bench_fedmd_rules   # table only

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


# The rules --rules compares: name -> overrides. Rules that change only the rounds share the
# transfer learning and baselines; `reliability` holds images out of training (other parties),
# so it is compared with `mean_holdout`, the plain mean on those very parties.
def _registered_rules() -> dict[str, list[str]]:
    """Every registered consensus rule as a row of its own, named explicitly (a preset may
    choose another rule than the schema's ``mean``)."""
    from fed_distill.federated.rules import list_rules

    return {name: [f"fedmd.aggregate={name}"] for name in list_rules()}


# The registered rules (a new one is a row at once), then variants beside them; a rule that
# needs a setting (reliability: its held-out images) is named again with it.
RULES = {
    **_registered_rules(),
    "sharpen": ["fedmd.aggregate=mean", "fedmd.sharpen=0.5"],
    "class_share_sharpen": ["fedmd.aggregate=class_share", "fedmd.sharpen=0.5"],
    # a diagnostic, not a rule: the mean with its errors on known-label images corrected, so
    # FedMD's final accuracy is what a right consensus (same margins) gives this digest/revisit
    "oracle": ["fedmd.aggregate=mean", "fedmd.oracle_consensus=true"],
    "mean_holdout": ["fedmd.aggregate=mean", "fedmd.reliability_holdout=2"],
    "reliability": ["fedmd.aggregate=reliability", "fedmd.reliability_holdout=2"],
}


def _setup_key(cfg: Any) -> str:
    """What a rule's parties depend on: every fedmd setting but the round-only ones."""
    from dataclasses import asdict

    from fed_distill.federated.config import fedmd_config
    from fed_distill.federated.fedmd_run import round_only_keys

    c, skip = asdict(fedmd_config(cfg.fedmd)), round_only_keys()
    return json.dumps({k: v for k, v in c.items() if k not in skip}, sort_keys=True)


def run_rules(
    rules: list[str], presets: list[str], seeds: list[int], out: Path, extra: list[str]
) -> None:
    """Every rule on every preset and seed; ``out/PRESET_sSEED/RULE/results.json`` each. A
    rule whose results are there is not rerun."""
    from fed_distill.api import compose
    from fed_distill.federated.fedmd_run import branch_rounds, setup_run

    for preset in presets:
        for seed in seeds:
            setups: dict[str, Any] = {}
            for rule in rules:
                run_dir = out / f"{preset}_s{seed}" / rule
                if (run_dir / "results.json").is_file():
                    continue
                base = [f"fedmd={preset}", f"seed={seed}", "progress=false", *extra]
                cfg = compose("fedmd", [*base, *RULES[rule], f"run_dir={run_dir}"])
                key = _setup_key(cfg)
                if key not in setups:  # kept: the parties are small
                    t0 = time.perf_counter()
                    setups[key] = setup_run(cfg)
                    print(f"== {preset} seed {seed}: setup {time.perf_counter() - t0:.0f}s")
                t0 = time.perf_counter()
                branch_rounds(setups[key], cfg)
                print(f"== {preset} seed {seed} {rule}: {time.perf_counter() - t0:.0f}s")


def _mean_std(values: list[float | None], scale: float = 100.0) -> str:
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def _round_mean(values: list[float | None] | None) -> float | None:
    vals = [v for v in values or [] if v is not None]
    return float(np.mean(vals)) if vals else None


def ends_on_digest(r: dict[str, Any]) -> dict[str, Any] | None:
    """``r`` as ``fedmd.final_revisit=false`` gives it: each party's last accuracy the one after
    the last digest (``party_acc_digest``); None for runs without it."""
    digest = r.get("party_acc_digest")
    if not digest or any(not d or d[-1] is None for d in digest):
        return None
    return {
        **r,
        "party_acc": [a[:-1] + [d[-1]] for a, d in zip(r["party_acc"], digest, strict=True)],
    }


def rules_table(out: Path, markdown: bool = False) -> str:
    """mean ± std over seeds (n = seeds found) per preset and rule, from ``out``'s results:
    accuracies in %, the share of the alone-to-pooled gap closed, the same two after the last
    digest (what ``fedmd.final_revisit=false`` ends on), and the consensus's accuracy on the
    alignment subsets (mean over rounds; private: the private classes' images)."""
    from fed_distill.federated.fedmd_results import headline
    from fed_distill.tables import format_table

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*_s*/*/results.json")):
        preset = path.parent.parent.name.rsplit("_s", 1)[0]
        groups.setdefault((preset, path.parent.name), []).append(json.loads(path.read_text()))
    order = {name: i for i, name in enumerate(RULES)}
    rows = []
    for (preset, rule), runs in sorted(
        groups.items(), key=lambda g: (g[0][0], order.get(g[0][1], 99))
    ):
        hs = [headline(r) for r in runs]
        ds = [headline(e) for r in runs if (e := ends_on_digest(r)) is not None]
        rows.append(
            [
                preset,
                rule,
                len(runs),
                runs[0]["rounds"],
                *(_mean_std([h[k] for h in hs]) for k in ("alone", "alone_extended", "final")),
                _mean_std([h["pooled"] for h in hs]),
                _mean_std([h["gap_closed"] for h in hs]),
                _mean_std([h["final"] for h in ds]),
                _mean_std([h["gap_closed"] for h in ds]),
                _mean_std([_round_mean(r.get("consensus_acc")) for r in runs]),
                _mean_std([_round_mean(r.get("consensus_private_acc")) for r in runs]),
            ]
        )
    header = [
        "preset",
        "rule",
        "n",
        "rounds",
        "alone",
        "alone ext.",
        "FedMD final",
        "pooled",
        "gap closed %",
        "after last digest",
        "its gap closed %",
        "consensus acc",
        "consensus private",
    ]
    return format_table(header, rows, markdown=markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--report", default=None, help="only print the table of a results.json")
    ap.add_argument("--rules", default=None, help=f"compare rules: any of {', '.join(RULES)}")
    ap.add_argument("--presets", default=f"{DEFAULT_PRESET},{DEFAULT_PRESET}_skewed")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="runs/bench_fedmd_rules")
    ap.add_argument("--rules-table", default=None, help="only print the rules table of a folder")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)

    if args.rules_table:
        print(rules_table(Path(args.rules_table), args.markdown))
        return 0
    if args.rules:
        unknown = [r for r in args.rules.split(",") if r not in RULES]
        if unknown:
            ap.error(f"unknown rule {unknown[0]}; available: {', '.join(RULES)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        out = Path(args.out)
        run_rules(args.rules.split(","), args.presets.split(","), seeds, out, args.overrides)
        print(rules_table(out, args.markdown))
        return 0
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
