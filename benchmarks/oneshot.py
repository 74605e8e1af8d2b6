#!/usr/bin/env python3
"""One-shot benchmark: Fashion-MNIST, 5 clients, Dirichlet alpha = 0.1 / 0.3 / 0.5.

Runs the whole `fed-distill oneshot` pipeline once per alpha and seed, then prints the table of
`fed-distill compare` over every run in ``--out`` (a row per setting, mean ± std over seeds:
student, ensemble, FedAvg, student/ensemble, synthesis throughput, wall time, the worst class
gap) beside the published anchors for the same setting (DENSE, NeurIPS 2022, Table 1, 5
clients), with teacher and server minutes; compare.md, compare.csv and the curves go to --out.

    .venv/bin/python benchmarks/oneshot.py                      # the main job's settings
    .venv/bin/python benchmarks/oneshot.py --alphas 0.5 -- student.epochs=5
    .venv/bin/python benchmarks/oneshot.py -- synthesis=cpu student=default   # Adaptive DI
    .venv/bin/python benchmarks/oneshot.py --alphas 0.5 --hetero also   # + five architectures
    .venv/bin/python benchmarks/oneshot.py --alphas 0.5 --seed 0 1 2   # mean ± std over seeds

``--hetero also`` adds the row of ``experiment=fmnist_hetero_5`` (five clients, five different
architectures, FedAvg not applicable) beside the homogeneous one, in ``--out/alphaA_hetero``.

The main job's settings (``MAIN_JOB``: Adaptive DI with per-class statistics, the long student) apply unless an override names the
same key. Teachers already trained in ``--out/alphaA`` (same split and settings) are reused; seed
S > 0 runs in ``--out/alphaA_sS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fed_distill.cli import run_stage
from fed_distill.compare import compare
from fed_distill.compare.runs import Group, Run
from fed_distill.compare.summary import Stat, cell
from fed_distill.compare.summary import table as compare_table
from fed_distill.files import write_text

# DENSE (Zhang et al., NeurIPS 2022), Table 1, Fashion-MNIST, 5 clients, accuracy %.
ANCHORS = {
    "FedAvg": {0.1: 41.69, 0.3: 82.96, 0.5: 83.72},
    "Fed-ADI": {0.1: 48.49, 0.3: 81.15, 0.5: 84.19},
    "DENSE": {0.1: 50.29, 0.3: 83.96, 0.5: 85.94},
    "Ensemble": {0.1: 67.71, 0.3: 87.25, 0.5: 89.42},
}


# scripts/run.sh's settings: synthesis, student, and the statistics round after it (the table
# shows the one-shot student and the re-fitted one side by side).
MAIN_JOB = ["synthesis=cpu", "student=long", "refit=head"]


def with_defaults(overrides: list[str]) -> list[str]:
    """``MAIN_JOB`` entries whose key no override sets, then the overrides."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [d for d in MAIN_JOB if d.split("=", 1)[0] not in keys] + overrides


SETTING = ["dataset=fashion_mnist", "split=dirichlet", "split.num_clients=5"]  # DENSE's Table 1
HETERO = "fmnist_hetero_5"  # the heterogeneous row: five different architectures


def run_one(run_dir: Path, alpha: float, seed: int, overrides: list[str]) -> None:
    """One ``fed-distill oneshot`` run into ``run_dir`` (teachers trained there are reused)."""
    setting = [*SETTING, f"split.alpha={alpha}", f"seed={seed}", f"run_dir={run_dir}"]
    run_stage("oneshot", [*setting, *with_defaults(overrides)])


def _mean_cell(group: Group, value, unit: str = "s") -> str:
    """Mean ± std over the group's runs of ``value(run)``, as compare's cells."""
    return cell(Stat.of([value(r) for r in group.runs]), unit, len(group.runs))


def _alpha(group: Group) -> float:
    return group.runs[0].results["config"]["split"]["alpha"]


def _mean_teacher(run: Run) -> float:
    return sum(run.results["teacher_acc"]) / len(run.results["teacher_acc"])


def _teacher_minutes(run: Run) -> float:
    """Teacher training time as recorded when the teachers were trained (a rerun reuses them)."""
    files = sorted((run.path / "teachers").glob("metrics_teacher_*.json"))
    return sum(json.loads(f.read_text()).get("train_time_s") or 0.0 for f in files) / 60


def _server_minutes(run: Run) -> float:
    r = run.results
    return (r["wall_time_s"] - r["stage_times_s"].get("train-teachers", 0.0)) / 60


# The benchmark's columns beside compare's: the setting, the mean teacher, the published
# anchors (DENSE's student and ensemble), teacher and server minutes.
EXTRA = [
    ("alpha", _alpha),
    ("teachers %", lambda g: _mean_cell(g, _mean_teacher, "fraction")),
    ("DENSE %", lambda g: f"{ANCHORS['DENSE'].get(_alpha(g), float('nan')):.2f}"),
    ("DENSE ens %", lambda g: f"{ANCHORS['Ensemble'].get(_alpha(g), float('nan')):.2f}"),
    ("teachers min", lambda g: _mean_cell(g, _teacher_minutes)),
    ("server min", lambda g: _mean_cell(g, _server_minutes)),
]


def run_dir(out: Path, alpha: float, seed: int, hetero: bool) -> Path:
    """``OUT/alphaA[_hetero]`` for seed 0 (the folders earlier benchmarks wrote), else ``_sS``."""
    return out / f"alpha{alpha}{'_hetero' if hetero else ''}{f'_s{seed}' if seed else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--out", default="runs/bench_oneshot")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed")
    ap.add_argument(
        "--hetero",
        choices=["no", "also", "only"],
        default="no",
        help=f"the heterogeneous row (experiment={HETERO}) besides / instead of the homogeneous one",
    )
    ap.add_argument("overrides", nargs="*", help="extra fed-distill overrides (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    for alpha in args.alphas:
        for seed in args.seed:
            if args.hetero != "only":
                run_one(run_dir(out, alpha, seed, False), alpha, seed, args.overrides)
            if args.hetero != "no":
                extra = [f"experiment={HETERO}", *args.overrides]
                run_one(run_dir(out, alpha, seed, True), alpha, seed, extra)
    # Every run benchmarked into --out so far (earlier alphas and seeds, even calls running side
    # by side) is compared as `fed-distill compare OUT --out OUT` would: one row per setting,
    # mean ± std over its seeds; compare.md, compare.csv and the curves land in OUT.
    cmp = compare([out], out)
    table = compare_table(cmp.groups["oneshot"], "oneshot", extra=EXTRA)
    print(table)
    for s in cmp.skipped:
        print(s)
    write_text(table + "\n", out / "table.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
