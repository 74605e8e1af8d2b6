#!/usr/bin/env python3
"""One-shot benchmark: Fashion-MNIST, 5 clients, Dirichlet alpha = 0.1 / 0.3 / 0.5.

Runs the whole `fed-distill oneshot` pipeline once per alpha and prints FedAvg / ensemble /
student accuracy and wall time beside the published anchors for the same setting (DENSE,
NeurIPS 2022, Table 1, 5 clients), plus synthesis throughput and the worst class gap (the class
where the student is furthest under the ensemble, in points).

    .venv/bin/python benchmarks/oneshot.py                      # the main job's settings
    .venv/bin/python benchmarks/oneshot.py --alphas 0.5 -- student.epochs=5
    .venv/bin/python benchmarks/oneshot.py -- synthesis=cpu student=default   # Adaptive DI
    .venv/bin/python benchmarks/oneshot.py --alphas 0.5 --hetero also   # + five architectures

``--hetero also`` adds the row of ``experiment=fmnist_hetero_5`` (five clients, five different
architectures, FedAvg not applicable) beside the homogeneous one, in ``--out/alphaA_hetero``.

The main job's settings (``MAIN_JOB``: Adaptive DI with per-class statistics, the long student) apply unless an override names the
same key. Teachers already trained in ``--out/alphaA`` (same split and settings) are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fed_distill.artifacts import save_json, write_text
from fed_distill.cli import run_stage
from fed_distill.federated.per_class import worst_class_gap
from fed_distill.pipeline import format_table

# DENSE (Zhang et al., NeurIPS 2022), Table 1, Fashion-MNIST, 5 clients, accuracy %.
ANCHORS = {
    "FedAvg": {0.1: 41.69, 0.3: 82.96, 0.5: 83.72},
    "Fed-ADI": {0.1: 48.49, 0.3: 81.15, 0.5: 84.19},
    "DENSE": {0.1: 50.29, 0.3: 83.96, 0.5: 85.94},
    "Ensemble": {0.1: 67.71, 0.3: 87.25, 0.5: 89.42},
}


# scripts/run.sh's synthesis settings.
MAIN_JOB = ["synthesis=cpu", "student=long"]


def with_defaults(overrides: list[str]) -> list[str]:
    """``MAIN_JOB`` entries whose key no override sets, then the overrides."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return [d for d in MAIN_JOB if d.split("=", 1)[0] not in keys] + overrides


SETTING = ["dataset=fashion_mnist", "split=dirichlet", "split.num_clients=5"]  # DENSE's Table 1
HETERO = "fmnist_hetero_5"  # the heterogeneous row: five different architectures


def run_row(run_dir: Path, alpha: float, seed: int, overrides: list[str]) -> dict:
    """One ``fed-distill oneshot`` run; its results.json with the benchmark's timings."""
    t0 = time.perf_counter()
    setting = [*SETTING, f"split.alpha={alpha}", f"seed={seed}", f"run_dir={run_dir}"]
    run_stage("oneshot", [*setting, *with_defaults(overrides)])
    r = json.loads((run_dir / "results.json").read_text())
    r["bench_wall_s"] = time.perf_counter() - t0
    # Teacher training time as recorded when the teachers were trained (a rerun reuses them).
    metrics = [
        json.loads(f.read_text())
        for f in sorted((run_dir / "teachers").glob("metrics_teacher_*.json"))
    ]
    r["teacher_train_s"] = sum(m.get("train_time_s") or 0.0 for m in metrics)
    r["teacher_models"] = sorted({m.get("model", "?") for m in metrics})
    return r


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def table_rows(results: dict[str, dict]) -> list[list]:
    """One row per run: key "ALPHA" (homogeneous) or "ALPHA hetero" (per-client architectures)."""
    rows = []
    for key in sorted(results, key=lambda k: (-float(k.split()[0]), k)):
        alpha, r = float(key.split()[0]), results[key]
        ens = r["ensemble_acc"]
        models = r.get("teacher_models") or ["cnn_small"]
        rows.append(
            [
                alpha,
                f"{len(models)} archs" if len(models) > 1 else models[0],
                _pct(sum(r["teacher_acc"]) / len(r["teacher_acc"])),
                _pct(r["fedavg_acc"]),
                _pct(ens),
                _pct(r["student_acc"]),
                worst_class_gap(r),
                f"{100 * r['student_acc'] / ens:.1f}%",
                f"{ANCHORS['DENSE'].get(alpha, float('nan')):.2f}",
                f"{ANCHORS['Ensemble'].get(alpha, float('nan')):.2f}",
                f"{r['synthesis_images_per_s']:.1f}",
                f"{r.get('teacher_train_s', float('nan')) / 60:.1f}",
                f"{(r['wall_time_s'] - r['stage_times_s'].get('train-teachers', 0.0)) / 60:.1f}",
            ]
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--out", default="runs/bench_oneshot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--hetero",
        choices=["no", "also", "only"],
        default="no",
        help=f"the heterogeneous row (experiment={HETERO}) besides / instead of the homogeneous one",
    )
    ap.add_argument("overrides", nargs="*", help="extra fed-distill overrides (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    mine: dict[str, dict] = {}
    for alpha in args.alphas:
        if args.hetero != "only":
            mine[str(alpha)] = run_row(out / f"alpha{alpha}", alpha, args.seed, args.overrides)
        if args.hetero != "no":
            mine[f"{alpha} hetero"] = run_row(
                out / f"alpha{alpha}_hetero",
                alpha,
                args.seed,
                [f"experiment={HETERO}", *args.overrides],
            )
    # Rows for alphas benchmarked earlier into the same --out are kept, so one alpha per call
    # (even calls running side by side) builds up one table; read just before writing.
    results: dict[str, dict] = {}
    if (out / "summary.json").exists():
        results = json.loads((out / "summary.json").read_text())
    results.update(mine)
    header = ["alpha", "teachers", "teachers %", "FedAvg %", "ensemble %", "student %"]
    header += ["worst class gap (class)"]
    header += ["student/ens", "DENSE %", "DENSE ens %", "synth img/s", "teachers min", "server min"]
    table = format_table(header, table_rows(results))
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    save_json(results, out / "summary.json", indent=1)
    write_text(table + "\n", out / "table.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
