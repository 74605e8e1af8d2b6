#!/usr/bin/env python3
"""How fast can the student learn from the teachers at all? Distil the teachers of a one-shot run
folder into a fresh student on *real* training images (an oracle transfer set no data-free server
has) and print its test accuracy during training, for each temperature / learning rate given.

It separates the two limits of a one-shot student: with real images the only limit left is the
distillation itself (loss temperature, optimiser, steps); the gap to a synthetic-data student is
what the synthetic images cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_real.py runs/bench_oneshot/alpha0.5 \\
        --temperatures 1 4 --lrs 0.1 0.05 --steps 1200

With ``--pool`` the transfer set is instead the run's final synthetic pool
(``student/dataset.pt``), the first ``--images`` of it: a fresh student on the same number of
real and synthetic images tells whether the synthetic images lack in number or in kind. With
``--pool --swap-real C ...`` the pool's images made for classes C are replaced by as many real
training images of those classes (labelled by the teachers like the rest): whether the classes
the student loses are short of the right *images* or of something else. The final per-class
accuracies of the student are printed beside the ensemble's.

The teachers' soft labels are computed once on the images (no augmentation; with
``--jitter J`` every batch is rolled by up to J pixels, as in the student loop, and labelled
afresh); SGD with Nesterov momentum 0.9, weight decay 1e-4 and a cosine schedule, as
``student.optimizer=sgd``; the soft labels are those of ``student.ensemble=weighted``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fed_distill.artifacts import load_tensors
from fed_distill.data.sources import load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.errors import FedDistillError
from fed_distill.models import build_model
from fed_distill.pipeline import load_teachers
from fed_distill.tables import format_table
from fed_distill.train.fit import evaluate, predict_logits
from fed_distill.train.student import SyntheticPool, teacher_targets, weighted_kd_loss


def sharpen(q: torch.Tensor, s: float) -> torch.Tensor:
    """q^(1/s) per row, renormalised; s = 1 leaves q as it is, s = 0 gives the argmax one-hot."""
    if s == 0:
        return torch.nn.functional.one_hot(q.argmax(dim=1), q.shape[1]).to(q.dtype)
    if s == 1:
        return q
    return q.clamp_min(1e-12).log().div(s).softmax(dim=1)  # q^(1/s) / sum, without overflow


def swap_real(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    data,
    norm: Normalizer,
    gen: torch.Generator,
) -> torch.Tensor:
    """``images`` with those made for ``classes`` replaced by real training images of the same
    classes, one for one (normalised like the pool)."""
    out = images.clone()
    for c in classes:
        slots = (labels == c).nonzero().flatten()
        real = (data.train_y == c).nonzero().flatten()
        pick = real[torch.randperm(len(real), generator=gen)[: len(slots)]]
        out[slots[: len(pick)]] = norm(data.train_x[pick])
        print(f"class {c}: {len(pick)} of {len(slots)} pool images replaced by real ones")
    return out


def print_class_accuracy(student, teachers, shares, data, norm: Normalizer) -> None:
    """The student's and the ensemble's test accuracy per class, one line each."""
    y = data.test_y
    s_pred = predict_logits(student, data.test_x, norm, "cpu").argmax(1)
    t_logits = torch.stack([predict_logits(t, data.test_x, norm, "cpu") for t in teachers])
    e_pred = ensemble_probs(t_logits, "weighted", shares).argmax(1)
    k = shares.shape[1]
    for name, pred in (("student", s_pred), ("ensemble", e_pred)):
        accs = [100 * float((pred[y == c] == c).float().mean()) for c in range(k)]
        print(f"  per class, {name:8s}: " + " ".join(f"{a:5.1f}" for a in accs), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_dir", help="a run folder with split.json and teachers/")
    ap.add_argument("--images", type=int, default=20000, help="transfer images used")
    ap.add_argument(
        "--pool",
        action="store_true",
        help="distil on the run's synthetic pool (student/dataset.pt) instead of real images",
    )
    ap.add_argument(
        "--swap-real",
        type=int,
        nargs="+",
        default=[],
        metavar="CLASS",
        help="with --pool: replace the pool's images of these intended classes by as many real"
        " training images of them",
    )
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.1])
    ap.add_argument(
        "--sharpen",
        type=float,
        nargs="+",
        default=[1.0],
        help="targets q^(1/s), renormalised, of the ensemble's soft labels q; 1 = as they are,"
        " 0 = the ensemble's argmax as a one-hot label",
    )
    ap.add_argument(
        "--jitter",
        type=int,
        default=0,
        help="augment every batch as the student loop does (a random roll of up to this many"
        " pixels) and recompute the soft labels on it; 0 = no augmentation, labels computed once",
    )
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.jitter < 0:
        ap.error(f"--jitter must be >= 0, got {args.jitter}")
    if args.swap_real and not args.pool:
        ap.error("--swap-real replaces images of the synthetic pool: add --pool")
    if any(s < 0 for s in args.sharpen):
        ap.error("--sharpen values must be >= 0 (1 = soft labels as they are, 0 = one-hot argmax)")

    run = Path(args.run_dir)
    if not (run / "split.json").is_file() or not (run / "teachers" / "teachers.json").is_file():
        print(
            f"error: {run} has no split.json and teachers/; run `fed-distill split` and"
            " `fed-distill train-teachers` there first (or benchmarks/oneshot.py)",
            file=sys.stderr,
        )
        return 2
    split = json.loads((run / "split.json").read_text())
    teachers, spec = load_teachers(run, "cpu")
    data = load_dataset(split["dataset"])
    norm = Normalizer(data.info.mean, data.info.std)
    shares = class_shares([c["train_class_counts"] for c in split["clients"][: len(teachers)]])
    gen = torch.Generator().manual_seed(args.seed)
    if args.pool:
        # Read and checked as train-student reads a pool (shapes, labels, NaN); the images are
        # already normalised, as the student loop stores them.
        shape = (spec.in_channels, spec.image_size, spec.image_size)
        try:
            state = load_tensors(run / "student" / "dataset.pt", "synthetic dataset")
            images, labels = SyntheticPool.from_state(state, shape, spec.num_classes).tensors()
        except FedDistillError as e:
            print(f"error: {e}; run `fed-distill train-student` there first", file=sys.stderr)
            return 2
        images, labels = images[: args.images], labels[: args.images]
        bad = [c for c in args.swap_real if not 0 <= c < spec.num_classes]
        if bad:
            ap.error(f"--swap-real: classes {bad} are not in 0..{spec.num_classes - 1}")
        if args.swap_real:
            images = swap_real(images, labels, args.swap_real, data, norm, gen)
        x = images.contiguous(memory_format=torch.channels_last)
    else:
        pick = torch.randperm(len(data.train_y), generator=gen)[: args.images]
        x = norm(data.train_x[pick]).contiguous(memory_format=torch.channels_last)
    print(f"transfer set: {len(x)} {'synthetic' if args.pool else 'real'} images", flush=True)
    if not args.jitter:
        logits = torch.stack([predict_logits(t, x, None, "cpu") for t in teachers])
    checkpoints = [round(args.steps * k / 4) for k in (1, 2, 3, 4)]
    rows = []
    grid = [(a, b, c) for a in args.lrs for b in args.temperatures for c in args.sharpen]
    for lr, temp, sharp in grid:
        if not args.jitter:
            targets = sharpen(ensemble_probs(logits, "weighted", shares, temp), sharp)
        torch.manual_seed(args.seed)
        student = build_model(
            spec.model, spec.num_classes, spec.in_channels, spec.image_size, **spec.model_kwargs
        ).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(
            student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps))
        )
        accs, t0 = [], time.perf_counter()
        for step in range(1, args.steps + 1):
            b = torch.randint(0, len(x), (args.batch_size,), generator=gen)
            if args.jitter:
                j = args.jitter
                dx, dy = torch.randint(-j, j + 1, (2,), generator=gen).tolist()
                xb = torch.roll(x[b], shifts=(dx, dy), dims=(2, 3))
                xb = xb.contiguous(memory_format=torch.channels_last)
                tb = sharpen(teacher_targets(teachers, xb, temp, "weighted", shares), sharp)
            else:
                xb, tb = x[b], targets[b]
            student.train()
            loss = weighted_kd_loss(student(xb), tb, temp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step in checkpoints:
                accs.append(evaluate(student, data.test_x, data.test_y, norm, "cpu"))
        rows.append(
            [temp, lr, sharp, *(f"{100 * a:.2f}" for a in accs), f"{time.perf_counter() - t0:.0f}"]
        )
        print_class_accuracy(student, teachers, shares, data, norm)
        print(f"T={temp} lr={lr} sharpen={sharp}: {', '.join(rows[-1][3:-1])} %", flush=True)
    print(
        format_table(
            ["T", "lr", "sharpen", *(f"test % @{s}" for s in checkpoints), "seconds"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
