#!/usr/bin/env python3
"""One-shot as the federation grows: Fashion-MNIST, Dirichlet alpha = 0.5, the library
defaults, for 5, 10, 20, 50 and 100 clients.

    .venv/bin/python benchmarks/scale.py                          # 5 10 20 50 100 clients, seed 0
    .venv/bin/python benchmarks/scale.py --clients 5 100 --seeds 0 1
    .venv/bin/python benchmarks/scale.py --table-only             # the table of what has run
    .venv/bin/python benchmarks/scale.py --clients 20 -- student.targets=live   # the old loop
    .venv/bin/python benchmarks/scale.py --synthesis-cost 5 20 100   # ms per synthetic image
    .venv/bin/python benchmarks/scale.py --student-cost 5 20 100     # ms per student batch

Each (clients, seed) runs ``fed-distill oneshot split.num_clients=N seed=S`` in its own process
(so that its peak memory is its own) into ``--out/clientsN_seedS``; a run whose results.json
exists is read back, not rerun, and an interrupted one resumes where it stopped (every stage
does). Per run, the table gives:

- wall minutes per stage: split; the teachers as the sum over clients and as the slowest
  single client (``train_time_s`` of its metrics: in a real federation clients train in
  parallel); synthesis (generate-initial and the student's new batches); the student's own
  steps (train-student and generate-initial minus synthesis); the server's work (synthesis +
  student); evaluation (every teacher, the ensemble, FedAvg and the student on the test set);
- peak resident memory of the run's process (``peak.json``, written beside results.json);
- mean teacher accuracy, ensemble, one-shot FedAvg, student (%), and student / ensemble;
- the student's soft-label mode (``student.targets`` as resolved: ``sampled`` draws
  ``target_teachers`` teachers per image, the whole ensemble when there are no more).

The figure (``--figure``, default docs/figures/scale.png) draws cost and accuracy against the
number of clients on a log axis. Arguments after ``--`` are overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fed_distill.files import save_figure
from fed_distill.tables import format_table

SETTING = ["dataset=fashion_mnist", "split=dirichlet", "split.alpha=0.5", "progress=false"]
HEADER = [
    "clients",
    "seed",
    "split min",
    "teachers min (sum)",
    "slowest client min",
    "synthesis min",
    "student min",
    "server min",
    "evaluate min",
    "peak GiB",
    "mean teacher %",
    "ensemble %",
    "FedAvg %",
    "student %",
    "student / ensemble",
    "targets",
]


def run_dir(out: Path, clients: int, seed: int) -> Path:
    return out / f"clients{clients}_seed{seed}"


def run_one(path: Path, clients: int, seed: int, overrides: list[str]) -> None:
    """``fed-distill oneshot`` in a child process; its peak RSS goes to ``path/peak.json``."""
    keys = {o.split("=", 1)[0] for o in overrides}
    setting = [s for s in SETTING if s.split("=", 1)[0] not in keys]  # an override wins
    args = [*setting, f"split.num_clients={clients}", f"seed={seed}", f"run_dir={path}"]
    code = "import sys; from fed_distill.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "oneshot", *args, *overrides])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scale: the {clients}-client run failed; its output is above")
    peak = {"peak_rss_gib": usage.ru_maxrss / 2**20, "how": "wait4 ru_maxrss of the run"}
    (path / "peak.json").write_text(json.dumps(peak, indent=1))


def row(path: Path) -> list[Any] | None:
    """The table row of one finished run (None while it has no results.json)."""
    res_path = path / "results.json"
    if not res_path.is_file():
        return None
    r = json.loads(res_path.read_text())
    st, cfg = r["stage_times_s"], r["config"]
    teachers = [
        json.loads(p.read_text())["train_time_s"]
        for p in sorted((path / "teachers").glob("metrics_teacher_*.json"))
    ]
    server = st.get("generate-initial", 0.0) + st["train-student"]
    synthesis = r.get("synthesis_s") or 0.0
    peak_file = path / "peak.json"
    peak = json.loads(peak_file.read_text())["peak_rss_gib"] if peak_file.is_file() else None
    fedavg = r.get("fedavg_acc")
    mean_teacher = sum(r["teacher_acc"]) / len(r["teacher_acc"])
    return [
        cfg["split"]["num_clients"],
        cfg["seed"],
        f"{st['split'] / 60:.1f}",
        f"{sum(teachers) / 60:.2f}",
        f"{max(teachers) / 60:.2f}",
        f"{synthesis / 60:.1f}",
        f"{(server - synthesis) / 60:.1f}",
        f"{server / 60:.1f}",
        f"{st['evaluate'] / 60:.1f}",
        "-" if peak is None else f"{peak:.2f}",
        f"{100 * mean_teacher:.2f}",
        f"{100 * r['ensemble_acc']:.2f}",
        "-" if fedavg is None else f"{100 * fedavg:.2f}",
        f"{100 * r['student_acc']:.2f}",
        f"{r['student_acc'] / r['ensemble_acc']:.3f}",
        _targets(cfg),
    ]


def _targets(cfg: dict[str, Any]) -> str:
    s = cfg["student"]
    mode = s.get("targets", "live")
    k = s.get("target_teachers")
    n = cfg["split"]["num_clients"]
    if mode in ("auto", "sampled") and k is not None:
        return f"{mode}: all {n}" if k >= n else f"{mode}: {k} of {n}"
    return mode


def plot(rows: list[list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r[1], r[0]))
    fig, (cost, acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for seed in sorted({r[1] for r in rows}):
        rs = [r for r in rows if r[1] == seed]
        x = [r[0] for r in rs]
        tag = f" (seed {seed})" if len({r[1] for r in rows}) > 1 else ""
        for col, name in (
            (3, "teachers, sum"),
            (4, "slowest client"),
            (7, "server"),
            (8, "evaluate"),
        ):
            cost.plot(x, [float(r[col]) for r in rs], marker="o", label=name + tag)
        for col, name in ((10, "mean teacher"), (11, "ensemble"), (12, "FedAvg"), (13, "student")):
            ys = [float("nan") if r[col] == "-" else float(r[col]) for r in rs]
            acc.plot(x, ys, marker="o", label=name + tag)
    for ax, yl in ((cost, "wall minutes"), (acc, "test accuracy %")):
        ax.set_xscale("log")
        ax.set_xlabel("number of clients")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST, Dirichlet alpha=0.5, library defaults: cost and accuracy")
    fig.tight_layout()
    save_figure(fig, path)


def _random_teachers(n: int) -> tuple[list[Any], Any, Any]:
    """``n`` random cnn_small teachers (BN statistics warmed on noise), their uint8 images and
    the Fashion-MNIST normaliser: cost does not depend on what the weights learnt."""
    import torch

    from fed_distill.data.transforms import Normalizer
    from fed_distill.models import build_model

    norm = Normalizer((0.286,), (0.353,))
    torch.manual_seed(n)
    teachers = [build_model("cnn_small", 10, 1, 28).train() for _ in range(n)]
    images = torch.randint(0, 256, (n, 100, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        for t, x in zip(teachers, images, strict=True):
            t(norm(x))  # BN running statistics of some input
    return [t.eval() for t in teachers], images, norm


def student_cost(teacher_counts: list[int], repeats: int = 5) -> list[list[Any]]:
    """Milliseconds per student batch (``student.batch_size`` images) of the soft labels, for
    the live loop (every teacher on every image) and ``sampled`` (``target_teachers`` drawn per
    group of images), against the number of teachers, beside the student's own forward and backward on
    that batch; Dirichlet(0.5) class shares, the ``weighted`` rule, median of ``repeats``."""
    import time

    import numpy as np
    import torch

    from fed_distill.models import build_model
    from fed_distill.train.student import teacher_targets
    from fed_distill.train.student_config import StudentConfig
    from fed_distill.train.targets import TeacherSampler

    scfg = StudentConfig()
    rng, rows = np.random.default_rng(0), []
    x = torch.randn(scfg.batch_size, 1, 28, 28)
    student, T = build_model("cnn_small", 10, 1, 28), scfg.temperature

    def timed(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1000 * float(np.median(times))

    own = timed(lambda: student(x).logsumexp(1).mean().backward())
    for n in teacher_counts:
        teachers, _, _ = _random_teachers(n)
        counts = rng.dirichlet([0.5] * n, size=10).T * 6000
        shares = torch.tensor(counts / counts.sum(0, keepdims=True), dtype=torch.float32)
        sampler = TeacherSampler(n, scfg.target_teachers, "weighted", shares, 0)
        live = timed(lambda ts=teachers, sh=shares: teacher_targets(ts, x, T, "weighted", sh))
        sampled = timed(lambda ts=teachers, smp=sampler: smp.label(ts, x, T))
        rows.append([n, scfg.batch_size, f"{live:.1f}", f"{sampled:.1f}", f"{own:.1f}"])
        print(format_table(STUDENT_COST, rows[-1:]))
    return rows


STUDENT_COST = ["teachers", "batch", "live ms", "sampled ms", "student fwd+bwd ms"]


# The synthesizers whose cost per image is timed against the number of teachers.
SYNTHESIZERS = {
    "cpu (cycling, the default)": ["synthesis=cpu"],
    "cpu_sampling (2 per step)": ["synthesis=cpu_sampling"],
    "cpu, mode=ensemble": ["synthesis=cpu", "synthesis.mode=ensemble"],
    "generator": ["synthesis=generator"],
}


def synthesis_cost(teacher_counts: list[int], iterations: int) -> list[list[Any]]:
    """Seconds per synthetic image of one batch (adaptive: against a student), for every
    synthesizer of ``SYNTHESIZERS`` and number of teachers: random cnn_small teachers on
    Fashion-MNIST's image size, BN statistics warmed on noise, Dirichlet(0.5) label counts and
    per-class statistics as clients upload them. Cost does not depend on what the weights
    learnt, so no teacher is trained; the build (converting T teachers) is timed apart."""
    import time

    import numpy as np
    import torch

    from fed_distill.api import compose
    from fed_distill.class_stats import compute_class_stats
    from fed_distill.models import build_model
    from fed_distill.synthesis import build_synthesizer, options_from_node

    rng, rows = np.random.default_rng(0), []
    labels = torch.arange(100) % 10
    for n in teacher_counts:
        teachers, images, norm = _random_teachers(n)
        stats = [
            compute_class_stats(t, images[i], labels, norm, 10) for i, t in enumerate(teachers)
        ]
        counts = (rng.dirichlet([0.5] * n, size=10).T * 6000).round().astype(np.int64)
        student = build_model("cnn_small", 10, 1, 28)
        for name, overrides in SYNTHESIZERS.items():
            over = [*overrides, f"synthesis.iterations={iterations}"]
            scfg = options_from_node(compose("oneshot", over).synthesis)
            t0 = time.perf_counter()
            synth = build_synthesizer(
                scfg, teachers, counts, (1, 28, 28), norm, True, "cpu", 0, class_stats=stats
            )
            built = time.perf_counter() - t0
            synth.synthesize(student)  # warm-up
            t0 = time.perf_counter()
            batch = synth.synthesize(student)
            per_image = (time.perf_counter() - t0) / len(batch)
            rows.append([n, name, f"{built:.2f}", f"{1000 * per_image:.1f}"])
            print(format_table(["teachers", "synthesizer", "build s", "ms per image"], rows[-1:]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--figure", type=Path, default=Path("docs/figures/scale.png"))
    ap.add_argument("--table-only", action="store_true", help="run nothing; table what has run")
    ap.add_argument(
        "--synthesis-cost",
        type=int,
        nargs="+",
        metavar="T",
        help="only time each synthesizer's cost per image with T random teachers",
    )
    ap.add_argument("--iterations", type=int, default=10, help="for --synthesis-cost")
    ap.add_argument(
        "--student-cost",
        type=int,
        nargs="+",
        metavar="T",
        help="only time a student batch's soft labels (live, sampled) with T random teachers",
    )
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    a = ap.parse_args()
    if a.student_cost:
        print(format_table(STUDENT_COST, student_cost(a.student_cost), True))
        return 0
    if a.synthesis_cost:
        rows = synthesis_cost(a.synthesis_cost, a.iterations)
        print(format_table(["teachers", "synthesizer", "build s", "ms per image"], rows, True))
        return 0
    if any(n < 1 for n in a.clients):
        ap.error("--clients must be positive")
    rows = []
    for seed in a.seeds:
        for n in a.clients:
            path = run_dir(a.out, n, seed)
            if not a.table_only and not (path / "results.json").is_file():
                run_one(path, n, seed, a.overrides)
            r = row(path)
            if r is not None:
                rows.append(r)
    if not rows:
        print(f"scale: no finished run in {a.out}")
        return 1
    print(format_table(HEADER, rows, markdown=True))
    plot(rows, a.figure)
    print(f"figure: {a.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
