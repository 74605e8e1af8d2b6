#!/usr/bin/env python3
"""Peers side by side on the same teachers: our default one-shot run, DENSE's published recipe
(synthesis=dense) and Co-Boosting (synthesis=coboost, with its published per-client ensemble
weights and with per-client-per-class weights started at our class shares).

Fashion-MNIST, 5 clients, Dirichlet alpha (0.5 by default). The teachers are trained once per
alpha (or copied with --teachers, as benchmarks/synthesis.py does, whose helpers this reuses);
every method then runs `fed-distill oneshot` on a copy of them, recording the student's test
accuracy after every round against wall time. Prints a table: final student %, the worst
class gap (ensemble minus student, in points, with the class), the best accuracy over rounds (selected on the test set: what DENSE's and Co-Boosting's papers report,
not a choice a data-free server could make), minutes, and when our default first reached each
peer's final accuracy; writes one time-to-accuracy figure with every curve.

    .venv/bin/python benchmarks/peers.py                        # the published 200 rounds: hours
    .venv/bin/python benchmarks/peers.py --rounds 5             # a short-budget run
    .venv/bin/python benchmarks/peers.py --rounds 5 --only dense coboost --teachers runs/bench
    .venv/bin/python benchmarks/peers.py --reuse default dense  # re-read finished rows

Each finished row is saved as OUT/alpha*/ROW.json; --reuse reads it back instead of rerunning
it, and --resume continues the run directories in OUT (an interrupted student resumes from its
last round), so the published 200 rounds can be carried over several sittings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthesis as bench  # noqa: E402  (benchmarks/synthesis.py: prepare_teachers, run_one)
from fed_distill.artifacts import save_figure  # noqa: E402
from fed_distill.federated.per_class import worst_class_gap  # noqa: E402
from fed_distill.tables import format_table  # noqa: E402

# row -> (overrides, whether per-class statistics apply: the method matches BN statistics)
METHODS: dict[str, tuple[list[str], bool]] = {
    "default": (["synthesis=cpu", "student=long"], True),  # the default one-shot config
    "dense": (["synthesis=dense"], True),
    "coboost": (["synthesis=coboost"], False),  # published BN weight 0: no BN term
    "coboost/client_class": (
        ["synthesis=coboost", "synthesis.coboost_weights=client_class"],
        False,
    ),
}
PEERS = ("dense", "coboost", "coboost/client_class")


def best_over_rounds(curve: dict) -> float:
    """The highest test accuracy after any round (selected on the test set)."""
    return max(a for a in curve["test_acc"] if a is not None and a == a)


def run_method(label: str, src: Path, out: Path, alpha: float, args) -> dict:
    overrides, _ = METHODS[label]
    extra = [*overrides, *args.overrides]
    if label != "default" and args.rounds is not None:
        extra.append(f"student.epochs={args.rounds}")
    if label == "default" and args.default_epochs is not None:
        extra.append(f"student.epochs={args.default_epochs}")
    key = f"peers:{label}"
    bench.SYNTHESIZERS[key] = []  # run_one looks its overrides up by name; they come in `extra`
    return bench.run_one(key, src, out, alpha, args.seed, extra, keep=args.resume)


def rows_for(alpha: float, runs: dict) -> list[list]:
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
                label,
                "yes" if METHODS[label][1] else "n/a",
                len(c["test_acc"]),
                f"{100 * final:.2f}",
                worst_class_gap(r),
                f"{100 * best_over_rounds(c):.2f}",
                f"{c['elapsed_s'][-1] / 60:.1f}",
                f"{100 * r['ensemble_acc']:.2f}",
                reach,
            ]
        )
    return rows


HEADERS = [
    "alpha",
    "method",
    "class stats",
    "rounds",
    "final %",
    "worst class gap (class)",
    "best over rounds % (selected on test)",
    "student min",
    "ensemble %",
    "default reaches this final at min",
]


def plot(runs: dict, alpha: float, rounds: int | None, path: Path) -> None:
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
    ax.set_title(f"Fashion-MNIST, 5 clients, Dirichlet {alpha}: same teachers ({budget})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5])
    ap.add_argument("--only", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=None, help="peer rounds (default: 200)")
    ap.add_argument("--default-epochs", type=int, default=None, help="our default's epochs")
    ap.add_argument("--out", default="runs/bench_peers")
    ap.add_argument("--figures", default="docs/figures", help="where the figure goes")
    ap.add_argument("--teachers", default=None, help="copy split.json + teachers/ from DIR/alpha*/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the run directories already in OUT (an interrupted student resumes)",
    )
    ap.add_argument("--reuse", nargs="*", default=[], help="rows read from OUT/alpha*/ROW.json")
    ap.add_argument("overrides", nargs="*", help="extra fed-distill overrides (after --)")
    args = ap.parse_args()
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be a positive integer")
    base = Path(args.out)
    teachers_from = Path(args.teachers) if args.teachers else None
    rows, summary = [], {}
    for alpha in args.alphas:
        src = bench.prepare_teachers(base, alpha, args.seed, teachers_from)
        runs = {}
        for label in args.only:
            slug = label.replace("/", "_")
            saved = base / f"alpha{alpha}" / f"{slug}.json"
            if label in args.reuse and saved.is_file():
                runs[label] = json.loads(saved.read_text())
                continue
            runs[label] = run_method(label, src, base / f"alpha{alpha}" / slug, alpha, args)
            saved.write_text(json.dumps(runs[label], indent=1))
        summary[str(alpha)] = runs
        rows += rows_for(alpha, runs)
        plot(runs, alpha, args.rounds, Path(args.figures) / f"peers_alpha{alpha}.png")
    table = format_table(HEADERS, rows)
    print(table)
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    (base / "table.txt").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
