#!/usr/bin/env python3
"""DeepInversion speed: iterations per second before and after the stacked-teacher work.

Same teachers, same batch, same config for every variant; only the speed keys differ:

- ``before``: the sequential path (``synthesis.stacked=false``, ``parallel=false``): every
  teacher used at a step runs on its own, as in commit 0ad78bd;
- ``ref``    (with ``--ref COMMIT``): that commit's ``deepinversion.py`` itself, loaded from git;
- ``fused``:  ``stacked=true grouped=false``: converted teachers (fused BN-statistics
  forward/backward), still one teacher after another;
- ``grouped``: ``stacked=true grouped=true``: ensemble = one grouped forward for all teachers;
  cycling also ``parallel=true`` (one batch per teacher at once).

Cycling is timed over T ``synthesize()`` calls (one batch from each teacher), ensemble and
sampling over one call. ``batch-it/s`` = batches × gradient steps per second (for cycling-before
= 1 batch per step); ``img-steps/s`` = that × the batch size. Variants run interleaved, the table
shows medians over ``--repeats``.

    PYTHONPATH=src .venv/bin/python benchmarks/di_speed.py
    PYTHONPATH=src .venv/bin/python benchmarks/di_speed.py --run-dir runs/x/alpha0.5 --ref 0ad78bd
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fed_distill  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch starts)
from fed_distill.data.transforms import Normalizer
from fed_distill.models import build_model
from fed_distill.synthesis.deepinversion import DeepInversion
from fed_distill.synthesis.options import DeepInversionOptions
from fed_distill.tables import format_table

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


def random_teachers(n: int, width: int, warm: str, seed: int) -> tuple[list, np.ndarray]:
    """``n`` cnn_small teachers, random weights, BN running statistics warmed on real images
    (Fashion-MNIST when it is at hand, else random noise) so the BN term is realistic."""
    norm = Normalizer(FMNIST_MEAN, FMNIST_STD)
    x = None
    if warm == "fmnist":
        try:
            from fed_distill.data.sources import load_dataset

            x = norm(load_dataset("fashion_mnist", download=False).train_x[:2048])
        except Exception as exc:  # noqa: BLE001 - a benchmark: fall back to noise
            print(f"(no Fashion-MNIST: {exc}; BN statistics warmed on noise)")
    if x is None:
        x = torch.randn(2048, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    teachers = []
    for t in range(n):
        torch.manual_seed(seed + t)
        m = build_model("cnn_small", 10, 1, 28, width=width)
        m.train()
        with torch.no_grad():
            for s in range(0, len(x), 256):
                m(x[s : s + 256])
        teachers.append(m.eval())
    return teachers, np.ones((n, 10), dtype=np.int64)


def trained_teachers(run_dir: str, n: int) -> tuple[list, np.ndarray]:
    from fed_distill.pipeline import load_teachers

    teachers, _spec = load_teachers(run_dir)
    split = json.loads((Path(run_dir) / "split.json").read_text())
    counts = np.array([c["train_class_counts"] for c in split["clients"]])[: len(teachers)]
    return teachers[:n], counts[:n]


def load_ref(commit: str):
    """``DeepInversion`` of ``commit``'s deepinversion.py, imported under a private name."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "-C", str(root), "show", f"{commit}:src/fed_distill/synthesis/deepinversion.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"di_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"di_ref_{commit}", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.DeepInversion


def time_variant(cls, cfg, teachers, counts, calls: int) -> float:
    norm = Normalizer(FMNIST_MEAN, FMNIST_STD)
    synth = cls(cfg, teachers, counts, (1, 28, 28), norm, hflip=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    for _ in range(calls):
        synth.synthesize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--teachers", type=int, default=5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch intra-op threads; several values are interleaved like the variants",
    )
    ap.add_argument("--modes", nargs="+", default=["ensemble", "cycling", "sampling"])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["before", "fused", "grouped"],
        help="which of before / fused / grouped to time (--ref adds the commit's own)",
    )
    ap.add_argument("--num-sampled", type=int, default=3, help="sampling: teachers per step")
    ap.add_argument("--run-dir", default=None, help="use the trained teachers of this run")
    ap.add_argument("--warm", choices=["fmnist", "noise"], default="fmnist")
    ap.add_argument("--ref", default=None, help="also time this commit's DeepInversion")
    args = ap.parse_args()
    thread_counts = args.threads or [torch.get_num_threads()]

    if args.run_dir:
        teachers, counts = trained_teachers(args.run_dir, args.teachers)
        source = f"trained teachers of {args.run_dir}"
    else:
        teachers, counts = random_teachers(args.teachers, args.width, args.warm, seed=0)
        source = f"random cnn_small width {args.width}, BN warmed on {args.warm}"
    n_t = len(teachers)
    ref_cls = load_ref(args.ref) if args.ref else None
    base = dict(batch_size=args.batch, iterations=args.iterations, jitter=2)

    variants: list[tuple] = []
    for mode in args.modes:
        extra = {"num_teachers": min(args.num_sampled, n_t)} if mode == "sampling" else {}
        calls = n_t if mode == "cycling" else 1

        def mk(mode=mode, extra=extra, **kw) -> DeepInversionOptions:
            return DeepInversionOptions(mode=mode, **base, **extra, **kw)

        if ref_cls is not None:
            variants.append((mode, f"ref {args.ref}", ref_cls, mk(), calls))
        variants.append((mode, "before", DeepInversion, mk(stacked=False, parallel=False), calls))
        variants.append((mode, "fused", DeepInversion, mk(grouped=False, parallel=False), calls))
        if mode != "sampling":  # sampling never groups
            grouped = mk(grouped=True, parallel=mode == "cycling")
            variants.append((mode, "grouped", DeepInversion, grouped, calls))

    keep = set(args.variants) | {"before"} | ({f"ref {args.ref}"} if args.ref else set())
    variants = [v for v in variants if v[1] in keep]
    if len(thread_counts) > 1:  # every variant at every thread count, labelled "name @Nt"
        variants = [
            (m, f"{v} @{th}t", cls, cfg, calls, th)
            for m, v, cls, cfg, calls in variants
            for th in thread_counts
        ]
        base_name = f"before @{thread_counts[0]}t"
    else:
        variants = [(*v, thread_counts[0]) for v in variants]
        base_name = "before"

    times: dict[tuple[str, str], list[float]] = {(m, v): [] for m, v, *_ in variants}
    # one untimed warm-up call of each (allocator, oneDNN primitive caches)
    for _mode, _name, cls, cfg, _calls, th in variants:
        torch.set_num_threads(th)
        time_variant(
            cls, DeepInversionOptions(**{**vars(cfg), "iterations": 2}), teachers, counts, 1
        )
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # interleaved, alternating order
        for mode, name, cls, cfg, calls, th in order:
            torch.set_num_threads(th)
            times[(mode, name)].append(time_variant(cls, cfg, teachers, counts, calls))
            print(f"  repeat {r} {mode:9s} {name:16s} {times[(mode, name)][-1]:.2f}s", flush=True)

    rows = []
    for mode, name, _cls, _cfg, calls, _th in variants:
        med = statistics.median(times[(mode, name)])
        batch_steps = calls * args.iterations
        before = statistics.median(times[(mode, base_name)])
        rows.append(
            [
                mode,
                name,
                f"{med:.2f}",
                f"{batch_steps / med:.2f}",
                f"{batch_steps * args.batch / med:.0f}",
                f"{before / med:.2f}x",
            ]
        )
    load = os.getloadavg()
    print()
    print(
        f"{n_t} teachers ({source}), batch {args.batch}x1x28x28, {args.iterations} steps, "
        f"threads {'/'.join(map(str, thread_counts))}, median of {args.repeats}; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        format_table(
            ["mode", "variant", "seconds", "batch-it/s", "img-steps/s", f"vs {base_name}"], rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
