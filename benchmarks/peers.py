#!/usr/bin/env python3
"""Peers side by side on the same teachers: our default one-shot run, DENSE's published recipe
(synthesis=dense), DENSE's recipe distilling our class-share ensemble (dense/weighted:
synthesis.ensemble=weighted) and Co-Boosting (synthesis=coboost, with its published per-client
ensemble weights and with per-client-per-class weights started at our class shares).

A dataset (Fashion-MNIST by default; --dataset digits for the 8x8 scikit-learn digits), 5
clients, Dirichlet alpha (0.5 by default), one or more seeds. The teachers are trained once per
alpha and seed (or copied with --teachers, as benchmarks/synthesis.py does, whose helpers this
reuses); every method then runs `fed-distill oneshot` on a copy of them, recording the student's
test accuracy after every round against wall time. Prints a table: final student %, the worst
class gap (ensemble minus student, in points, with the class), the best accuracy over rounds
(selected on the test set: what DENSE's and Co-Boosting's papers report, not a choice a
data-free server could make), minutes, the final student as a share of the class-share
ensemble, and when our default first reached each peer's final accuracy; then the mean over
seeds; writes one time-to-accuracy figure per alpha and seed with every curve.

    .venv/bin/python benchmarks/peers.py                        # the published 200 rounds: hours
    .venv/bin/python benchmarks/peers.py --rounds 5             # a short-budget run
    .venv/bin/python benchmarks/peers.py --rounds 5 --only dense coboost --teachers runs/bench
    .venv/bin/python benchmarks/peers.py --reuse default dense  # re-read finished rows
    .venv/bin/python benchmarks/peers.py --dataset digits --alphas 0.5 0.3 --seeds 0 1
    .venv/bin/python benchmarks/peers.py --device cuda          # every stage on the GPU
    .venv/bin/python benchmarks/peers.py --progress --out DIR   # how far each row has got

Each finished row is saved as OUT/alpha*/ROW.json (OUT/seedS/alpha*/ for a seed S other than
0); --reuse reads it back instead of rerunning it, and --resume continues the run directories in
OUT (an interrupted student resumes from its last round), so the published 200 rounds can be
carried over several sittings. --device and the overrides after `--` reach every stage (split,
teachers and each run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthesis as bench  # noqa: E402  (benchmarks/synthesis.py: prepare_teachers, run_one)
from fed_distill.artifacts import load_checkpoint, save_figure  # noqa: E402
from fed_distill.errors import ConfigError  # noqa: E402
from fed_distill.federated.per_class import worst_class_gap  # noqa: E402
from fed_distill.tables import format_table  # noqa: E402
from fed_distill.utils import resolve_device  # noqa: E402

# row -> (overrides, whether per-class statistics apply: the method matches BN statistics)
METHODS: dict[str, tuple[list[str], bool]] = {
    "default": (["synthesis=cpu", "student=long"], True),  # the default one-shot config
    "dense": (["synthesis=dense"], True),
    # DENSE's recipe on our class-share ensemble (generator CE/adversarial terms and soft labels)
    "dense/weighted": (["synthesis=dense", "synthesis.ensemble=weighted"], True),
    "coboost": (["synthesis=coboost"], False),  # published BN weight 0: no BN term
    "coboost/client_class": (
        ["synthesis=coboost", "synthesis.coboost_weights=client_class"],
        False,
    ),
}
PEERS = ("dense", "dense/weighted", "coboost", "coboost/client_class")


def best_over_rounds(curve: dict) -> float:
    """The highest test accuracy after any round (selected on the test set)."""
    return max(a for a in curve["test_acc"] if a is not None and a == a)


def common(args) -> list[str]:
    """Overrides every stage gets: the device (if asked) and the ones after `--`."""
    return [*([f"device={args.device}"] if args.device else []), *args.overrides]


def run_method(label: str, src: Path, out: Path, alpha: float, seed: int, args) -> dict:
    overrides, _ = METHODS[label]
    extra = [*overrides, *common(args)]
    if label != "default" and args.rounds is not None:
        extra.append(f"student.epochs={args.rounds}")
    if label == "default" and args.default_epochs is not None:
        extra.append(f"student.epochs={args.default_epochs}")
    key = f"peers:{label}"
    bench.SYNTHESIZERS[key] = []  # run_one looks its overrides up by name; they come in `extra`
    return bench.run_one(key, src, out, alpha, seed, extra, keep=args.resume, dataset=args.dataset)


def class_share_acc(results: dict) -> float:
    """The class-share ensemble's accuracy (the same teachers for every row of a seed)."""
    return (results.get("ensemble_acc_by_method") or {}).get("weighted", results["ensemble_acc"])


def rows_for(alpha: float, runs: dict, seed: int = 0) -> list[list]:
    ours = runs.get("default")
    rows = []
    for label, run in runs.items():
        r, c = run["results"], run["curve"]
        final = r["student_acc"]
        reach = "—"
        if ours is not None and label in PEERS:
            t = bench.first_time_at(ours["curve"], final, "elapsed_s")
            own = c["elapsed_s"][-1]
            reach = "never" if t is None else f"{t / 60:.1f} ({t / own:.2f} of its time)"
        rows.append(
            [
                alpha,
                seed,
                label,
                "yes" if METHODS[label][1] else "n/a",
                len(c["test_acc"]),
                f"{100 * final:.2f}",
                worst_class_gap(r),
                f"{100 * best_over_rounds(c):.2f}",
                f"{c['elapsed_s'][-1] / 60:.1f}",
                f"{100 * r['ensemble_acc']:.2f}",
                f"{final / class_share_acc(r):.3f}",
                reach,
            ]
        )
    return rows


HEADERS = [
    "alpha",
    "seed",
    "method",
    "class stats",
    "rounds",
    "final %",
    "worst class gap (class)",
    "best over rounds % (selected on test)",
    "student min",
    "ensemble % (its rule)",
    "share of class-share ensemble",
    "default reaches this final at min",
]
MEAN_HEADERS = [
    "alpha",
    "method",
    "seeds",
    "final %",
    "best over rounds % (selected on test)",
    "student min",
    "share of class-share ensemble",
]


def mean_rows(rows: list[list]) -> list[list]:
    """One row per (alpha, method): the mean over its seeds of final %, best %, minutes and
    share (columns of HEADERS)."""
    groups: dict[tuple, list[list]] = {}
    for row in rows:
        groups.setdefault((row[0], row[2]), []).append(row)
    out = []
    for (alpha, label), rs in groups.items():
        mean = [sum(float(r[i]) for r in rs) / len(rs) for i in (5, 7, 8, 10)]
        out.append(
            [alpha, label, len(rs), f"{mean[0]:.2f}", f"{mean[1]:.2f}", f"{mean[2]:.1f}"]
            + [f"{mean[3]:.3f}"]
        )
    return out


def plot(runs: dict, title: str, rounds: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, run in runs.items():
        c = run["curve"]
        pts = [(t, a) for t, a in zip(c["elapsed_s"], c["test_acc"], strict=True) if a == a]
        ax.plot([p[0] / 60 for p in pts], [100 * p[1] for p in pts], marker=".", label=label)
    budget = "published rounds" if rounds is None else f"short budget: {rounds} peer rounds"
    ax.set_xlabel("wall-clock minutes (student stage, 1 run each)")
    ax.set_ylabel("student test accuracy %")
    ax.set_title(f"{title}: same teachers ({budget})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def seed_dir(base: Path, seed: int) -> Path:
    """Seed 0 keeps the top folder (as before seeds were added); seed S: OUT/seedS."""
    return base if seed == 0 else base / f"seed{seed}"


def figure_path(args, alpha: float, seed: int) -> Path:
    name = "peers" if args.dataset == "fashion_mnist" else f"peers_{args.dataset}"
    suffix = "" if seed == 0 else f"_seed{seed}"
    return Path(args.figures) / f"{name}_alpha{alpha}{suffix}.png"


def run_alpha(alpha: float, seed: int, args) -> dict:
    """Every asked-for row on one alpha and seed's teachers (finished rows read back with
    --reuse); each row is saved as it finishes."""
    base = seed_dir(Path(args.out), seed)
    teachers_from = seed_dir(Path(args.teachers), seed) if args.teachers else None
    src = bench.prepare_teachers(
        base, alpha, seed, teachers_from, dataset=args.dataset, extra=tuple(common(args))
    )
    runs = {}
    for label in args.only:
        slug = label.replace("/", "_")
        saved = base / f"alpha{alpha}" / f"{slug}.json"
        if label in args.reuse and saved.is_file():
            runs[label] = json.loads(saved.read_text())
            continue
        runs[label] = run_method(label, src, base / f"alpha{alpha}" / slug, alpha, seed, args)
        saved.write_text(json.dumps(runs[label], indent=1))
    title = f"{args.dataset}, 5 clients, Dirichlet {alpha}, seed {seed}"
    plot(runs, title, args.rounds, figure_path(args, alpha, seed))
    return runs


def partial_curve(run_dir: Path) -> dict | None:
    """An unfinished run's curve so far, from its student checkpoint (None: there is none).
    Minutes are the student loop's (without generate-initial, which the peers skip)."""
    path = run_dir / "checkpoints" / "student.safetensors"
    if not path.is_file():
        return None
    m = load_checkpoint(path)["metrics"]
    return {"test_acc": list(m["test_acc"]), "elapsed_s": list(m["elapsed_s"])}


PROGRESS_HEADERS = [
    "alpha",
    "seed",
    "method",
    "state",
    "rounds reached",
    "last %",
    "best so far % (selected on test)",
    "student min",
]


def progress(args) -> int:
    """--progress: where every asked-for row stands, finished (its ROW.json) or not (its
    checkpoint), without running anything; one figure per alpha and seed with the curves."""
    rows = []
    for alpha in args.alphas:
        for seed in args.seeds:
            base = seed_dir(Path(args.out), seed) / f"alpha{alpha}"
            runs = {}
            for label in args.only:
                slug = label.replace("/", "_")
                saved = base / f"{slug}.json"
                curve = (
                    json.loads(saved.read_text())["curve"]
                    if saved.is_file()
                    else partial_curve(base / slug)
                )
                if curve is None:
                    continue
                runs[label] = {"curve": curve}
                last = [a for a in curve["test_acc"] if a is not None and a == a][-1]
                state = "finished" if saved.is_file() else "unfinished"
                rows.append([alpha, seed, label, state, len(curve["test_acc"])])
                rows[-1] += [f"{100 * last:.2f}", f"{100 * best_over_rounds(curve):.2f}"]
                rows[-1].append(f"{curve['elapsed_s'][-1] / 60:.1f}")
            if runs:
                title = f"{args.dataset}, 5 clients, Dirichlet {alpha}, seed {seed}"
                plot(runs, title, args.rounds, figure_path(args, alpha, seed))
    print(format_table(PROGRESS_HEADERS, rows))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", default="fashion_mnist", help="fed-distill dataset name")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="peer rounds (default: 200)")
    ap.add_argument("--default-epochs", type=int, default=None, help="our default's epochs")
    ap.add_argument("--device", default=None, help="device=... for every stage (cpu, cuda)")
    ap.add_argument("--out", default="runs/bench_peers")
    ap.add_argument("--figures", default="docs/figures", help="where the figures go")
    ap.add_argument("--teachers", default=None, help="copy split.json + teachers/ from DIR/alpha*/")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run directories already in OUT (an interrupted student resumes)",
    )
    ap.add_argument("--reuse", nargs="*", default=[], help="rows read from OUT/alpha*/ROW.json")
    ap.add_argument(
        "--progress",
        action="store_true",
        help="run nothing: how far each row in OUT has got (finished or from its checkpoint)",
    )
    ap.add_argument("overrides", nargs="*", help="extra fed-distill overrides (after --)")
    args = ap.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be a positive integer")
    if args.device:  # before any stage writes: `cuda` without a GPU is one line, exit 1
        try:
            resolve_device(args.device)
        except ConfigError as e:
            print(f"peers: FAIL: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.progress:
        return progress(args)
    base = Path(args.out)
    rows, summary = [], {}
    for alpha in args.alphas:
        for seed in args.seeds:
            runs = run_alpha(alpha, seed, args)
            summary[f"{alpha}/{seed}"] = runs
            rows += rows_for(alpha, runs, seed)
    table = format_table(HEADERS, rows)
    means = format_table(MEAN_HEADERS, mean_rows(rows))
    print(table + "\n\nmean over seeds\n" + means)
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    (base / "table.txt").write_text(table + "\n\nmean over seeds\n" + means + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
