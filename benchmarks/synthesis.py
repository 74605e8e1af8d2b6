#!/usr/bin/env python3
"""Synthesis benchmark: time-to-accuracy of every synthesizer on the same teachers.

Fashion-MNIST, 5 clients, Dirichlet alpha (0.5 by default). The teachers are trained once per
alpha; then, for each synthesizer, `generate-initial` + `train-student` distil a student while
its test accuracy is recorded against wall-clock and synthesis seconds after every epoch. Prints
a table (final accuracy, the worst class gap: ensemble minus student in points with the class,
synthesis time, time to reach Adaptive DI's final accuracy and its fraction of Adaptive DI's
synthesis time) and writes a PNG of the curves.

    .venv/bin/python benchmarks/synthesis.py                         # all synthesizers, alpha 0.5
    .venv/bin/python benchmarks/synthesis.py --only adi generator --alphas 0.1 0.3 0.5
    .venv/bin/python benchmarks/synthesis.py --teachers runs/bench_oneshot  # reuse teachers

Synthesizers (see README "Protocols and synthesizers"): di (DeepInversion, not adaptive), adi
(Adaptive DeepInversion with the long T=1 student: the library default), adi_short (the same with
the short T=4 `student=default`), generator (DENSE), fast (Fast data-free KD), public (FedDF on
unlabeled MNIST images).

``--class-stats both`` runs every BN-matching synthesizer twice on the same teachers: with the
per-class statistics the clients upload (rows ``NAME``, the default) and with each client's
global BN statistics only (rows ``NAME/global``, ``synthesis.class_stats=false``):

    .venv/bin/python benchmarks/synthesis.py --only adi generator --class-stats both
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from fed_distill.artifacts import save_figure
from fed_distill.cli import run_stage
from fed_distill.federated.per_class import worst_class_gap
from fed_distill.tables import format_table

# DENSE (Zhang et al., NeurIPS 2022), Table 1, Fashion-MNIST, 5 clients, accuracy %.
DENSE = {0.1: 50.29, 0.3: 83.96, 0.5: 85.94}

# Named recipes: a synthesizer with the student it is benchmarked with.
RECIPES: dict[str, list[str]] = {
    "di": ["synthesis=cpu", "student=long", "student.adaptive=false"],
    "adi": ["synthesis=cpu", "student=long"],
    # Adaptive DI with the short T=4 student: the better pair at Dirichlet 0.1 (docs/results.md)
    "adi_short": ["synthesis=cpu", "student=default"],
    "generator": ["synthesis=generator", "student=generator"],
    "fast": ["synthesis=fast", "student=generator"],
    "public": ["synthesis=public", "student=public"],
}


def synthesizer_rows() -> dict[str, list[str]]:
    """The recipes, then every registered synthesizer no recipe runs (read from the registry)."""
    from importlib.resources import files

    from fed_distill.config import compose_config
    from fed_distill.synthesis import list_synthesizers

    rows = dict(RECIPES)
    covered = {compose_config(o).synthesis.method for o in RECIPES.values()}
    students = files("fed_distill.conf") / "student"
    for m in list_synthesizers():
        if m not in covered:
            own = (students / f"{m}.yaml").is_file()
            rows[m] = [f"synthesis={m}", *([f"student={m}"] if own else [])]
    return rows


SYNTHESIZERS = synthesizer_rows()


def matches_bn_statistics(name: str) -> bool:
    """Whether row ``name``'s synthesizer takes per-class BN statistics (``class_stats``)."""
    from dataclasses import fields

    from fed_distill.config import compose_config
    from fed_distill.synthesis import options_class

    method = compose_config(SYNTHESIZERS[name]).synthesis.method
    return "class_stats" in {f.name for f in fields(options_class(method))}


def variants(names: list[str], class_stats: str) -> list[tuple[str, str, list[str]]]:
    """(row label, synthesizer, extra overrides) for every run: per-class statistics (label
    NAME), global statistics (NAME/global), or both; a synthesizer that matches no BN
    statistics (``public``) runs once."""
    out = []
    for name in names:
        bn = matches_bn_statistics(name)
        if class_stats in ("on", "both") or not bn:
            out.append((name, name, []))
        if class_stats in ("off", "both") and bn:
            out.append((f"{name}/global", name, ["synthesis.class_stats=false"]))
    return out


def applicable(overrides: list[str]) -> list[str]:
    """The overrides that apply to the run's synthesizer; a note names those left out."""
    from fed_distill.config import applicable_overrides

    kept, dropped = applicable_overrides(overrides)
    if dropped:
        print(f"note: {' '.join(dropped)} left out (not options of this run's synthesizer)")
    return kept


def first_time_at(curve: dict, target: float, key: str) -> float | None:
    """Seconds (``key``: elapsed_s or synthesis_s) when test accuracy first reached ``target``."""
    for acc, t in zip(curve["test_acc"], curve[key], strict=True):
        if acc is not None and acc >= target:
            return t
    return None


def prepare_teachers(
    base: Path,
    alpha: float,
    seed: int,
    teachers_from: Path | None,
    dataset: str = "fashion_mnist",
    extra: tuple[str, ...] = (),
) -> Path:
    """split.json + teachers/ for this alpha (trained once, or copied from an earlier run);
    ``extra`` overrides (e.g. ``device=cuda``) go to both stages."""
    src = base / f"alpha{alpha}" / "_teachers"
    if teachers_from is not None:
        s = teachers_from / f"alpha{alpha}"
        if (s / "teachers" / "teachers.json").is_file():
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s / "split.json", src / "split.json")
            shutil.copytree(s / "teachers", src / "teachers", dirs_exist_ok=True)
    common = applicable(
        [
            f"dataset={dataset}",
            "split=dirichlet",
            f"split.alpha={alpha}",
            "split.num_clients=5",
            f"seed={seed}",
            f"run_dir={src}",
            *extra,
        ]
    )
    if not (src / "split.json").is_file():
        run_stage("split", common)
    run_stage("train-teachers", common)  # skips teachers whose metrics fingerprint matches
    return src


def run_one(
    name: str,
    src: Path,
    run_dir: Path,
    alpha: float,
    seed: int,
    extra: list[str],
    keep: bool = False,
    dataset: str = "fashion_mnist",
):
    """``fed-distill oneshot`` on a copy of ``src``'s teachers in ``run_dir`` (made afresh, or
    with ``keep`` an existing one continued: the student resumes from its checkpoint)."""
    if not (keep and (run_dir / "teachers").is_dir()):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        shutil.copy2(src / "split.json", run_dir / "split.json")
        shutil.copytree(src / "teachers", run_dir / "teachers")
    overrides = applicable(
        [
            f"dataset={dataset}",
            "split=dirichlet",
            f"split.alpha={alpha}",
            "split.num_clients=5",
            f"seed={seed}",
            f"run_dir={run_dir}",
            *SYNTHESIZERS[name],
            *extra,
        ]
    )
    t0 = time.perf_counter()
    run_stage("oneshot", overrides)
    wall = time.perf_counter() - t0
    r = json.loads((run_dir / "results.json").read_text())
    initial = json.loads((run_dir / "student" / "initial.json").read_text())
    m = json.loads((run_dir / "student" / "metrics.json").read_text())
    init_s = float(initial.get("seconds") or 0.0)
    t_init = r["stage_times_s"].get("generate-initial", init_s)
    curve = {
        "test_acc": m["test_acc"],
        # include generate-initial, which happens before the student's first step
        "elapsed_s": [t_init + e for e in m["elapsed_s"]],
        "synthesis_s": [init_s + s for s in m["synthesis_s"]],
    }
    return {"results": r, "curve": curve, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5])
    ap.add_argument("--only", nargs="+", choices=list(SYNTHESIZERS), default=list(SYNTHESIZERS))
    ap.add_argument("--out", default="runs/bench_synthesis")
    ap.add_argument("--teachers", default=None, help="copy teachers from OUT/alpha*/ of this dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--class-stats",
        choices=["on", "off", "both"],
        default="on",
        help="match per-class statistics (on, the default), global ones (off), or run both",
    )
    ap.add_argument(
        "--reuse",
        nargs="*",
        default=[],
        help="synthesizers whose saved OUT/alpha*/NAME.json is read instead of rerun",
    )
    ap.add_argument("overrides", nargs="*", help="extra fed-distill overrides (after --)")
    args = ap.parse_args()
    base = Path(args.out)
    teachers_from = Path(args.teachers) if args.teachers else None
    summary: dict[str, dict] = {}
    rows, tta_rows = [], []
    for alpha in args.alphas:
        src = prepare_teachers(base, alpha, args.seed, teachers_from)
        runs = {}
        for label, name, extra in variants(args.only, args.class_stats):
            slug = label.replace("/", "_")
            saved = base / f"alpha{alpha}" / f"{slug}.json"
            if label in args.reuse and saved.is_file():
                runs[label] = json.loads(saved.read_text())
                continue
            runs[label] = run_one(
                name,
                src,
                base / f"alpha{alpha}" / slug,
                alpha,
                args.seed,
                [*extra, *args.overrides],
            )
            saved.write_text(json.dumps(runs[label], indent=1))
        summary[str(alpha)] = runs
        ref = runs.get("adi")
        target = ref["results"]["student_acc"] if ref else None
        ref_synth = ref["curve"]["synthesis_s"][-1] if ref else None
        for name, run in runs.items():
            r, c = run["results"], run["curve"]
            ens = r["ensemble_acc"]
            rows.append(
                [
                    alpha,
                    name,
                    f"{100 * r['student_acc']:.2f}",
                    worst_class_gap(r),
                    f"{100 * r['student_acc'] / ens:.1f}%",
                    f"{100 * ens:.2f}",
                    f"{DENSE.get(alpha, float('nan')):.2f}",
                    f"{c['synthesis_s'][-1]:.0f}",
                    f"{run['wall_s'] / 60:.1f}",
                ]
            )
            if target is not None:
                ts = first_time_at(c, target, "synthesis_s")
                tw = first_time_at(c, target, "elapsed_s")
                tta_rows.append(
                    [
                        alpha,
                        name,
                        f"{100 * target:.2f}",
                        "never" if ts is None else f"{ts:.0f}",
                        "never" if tw is None else f"{tw:.0f}",
                        "—" if ts is None else f"{ts / ref_synth:.3f}",
                    ]
                )
        plot_curves(runs, alpha, target, base / f"time_to_accuracy_alpha{alpha}.png")
    table = format_table(
        [
            "alpha",
            "synthesizer",
            "student %",
            "worst class gap (class)",
            "student/ens",
            "ensemble %",
            "DENSE %",
            "synthesis s",
            "wall min",
        ],
        rows,
    )
    tta = format_table(
        [
            "alpha",
            "synthesizer",
            "ADI final %",
            "synthesis s to reach",
            "wall s to reach",
            "fraction of ADI synthesis",
        ],
        tta_rows,
    )
    print(table)
    print()
    print(tta)
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    (base / "table.txt").write_text(table + "\n\n" + tta + "\n")
    return 0


def plot_curves(runs: dict, alpha: float, target: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in runs.items():
        c = run["curve"]
        pts = [(t, a) for t, a in zip(c["elapsed_s"], c["test_acc"], strict=True) if a is not None]
        pts_s = [
            (t, a) for t, a in zip(c["synthesis_s"], c["test_acc"], strict=True) if a is not None
        ]
        axes[0].plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=".", label=name)
        axes[1].plot([p[0] for p in pts_s], [100 * p[1] for p in pts_s], marker=".", label=name)
    for ax, xl in zip(axes, ["wall-clock seconds", "synthesis seconds"], strict=True):
        if target is not None:
            ax.axhline(100 * target, color="grey", ls="--", lw=1, label="Adaptive DI final")
        if alpha in DENSE:
            ax.axhline(DENSE[alpha], color="black", ls=":", lw=1, label="DENSE (paper)")
        ax.set_xlabel(xl)
        ax.set_ylabel("student test accuracy %")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")  # synthesis seconds span 1 s (public data) to minutes
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Fashion-MNIST, 5 clients, Dirichlet alpha={alpha}: time to accuracy")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
