#!/usr/bin/env python3
"""The statistics round (refit=head) on finished one-shot run folders: what the head re-fit is
worth, how near it is to its limit, and what was tried beyond it — each row on the *same*
distilled student and the same clients' statistics, overall and per class.

    .venv/bin/python benchmarks/refit.py RUN_DIR [RUN_DIR ...] [--seeds 0 1]

Rows (each head fit is repeated for every ``--seeds`` value: the fit's own noise):

* ``as distilled``: the one-shot student; ``ensemble``: its teachers' ensemble.
* ``head, features=…``: the library's re-fit (``refit=head``: the clients describe the last
  block's whole map, ``map``, the default; or the pooled ``penultimate`` vector) and variants of
  the map head's knobs (steps, learning rate, shrinkage, a zero start).
* ``bound: … on real features``: a linear head trained on the clients' *real* features (every
  client's images pooled on one machine: a diagnostic no federated server can run), on the
  pooled vector and on the whole map — how far the Gaussian model of each class is from what
  the body allows.
* ``AdaBN + map head``: the student's BN statistics re-estimated on the clients' real images
  before the round (also pooled: the ideal version of a per-layer BN statistics round).
* ``2nd round: body on pool + map head``: after the re-fit, 600 steps of the usual distillation
  (KL to the weighted ensemble on the final synthetic pool, augmented) on the body with the
  re-fitted head frozen, then a second statistics round and head re-fit.

Figures: docs/results.md "Statistics round after distillation".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from fed_distill.api import compose
from fed_distill.artifacts import load_tensors
from fed_distill.data.partition import clients_images
from fed_distill.data.transforms import augment
from fed_distill.ensemble import class_shares, ensemble_probs
from fed_distill.feature_stats import compute_feature_stats, feature_site, pool
from fed_distill.federated import per_class
from fed_distill.federated.oneshot import server_context
from fed_distill.federated.refit import load_distilled_student
from fed_distill.federated.refit_config import RefitConfig
from fed_distill.federated.refit_head import fit_head, refit_head_layer, refit_model
from fed_distill.train.fit import predict_logits
from fed_distill.train.pool import SyntheticPool

HEAD_VARIANTS = {
    "head, features=map (refit=head defaults)": {},
    "head, features=penultimate": {"features": "penultimate"},
    "map head: steps=1000": {"steps": 1000},
    "map head: steps=10000": {"steps": 10000},
    "map head: lr=0.05": {"lr": 0.05},
    "map head: shrinkage=0.1": {"shrinkage": 0.1},
    "map head: init=zero": {"init": "zero"},
}


class Bench:
    """One run folder: its student, the clients' pooled images, evaluation and row printing."""

    def __init__(self, run: Path) -> None:
        self.cfg = compose("refit", [f"run_dir={run}", "progress=false"])
        self.ctx = ctx = server_context(self.cfg)
        self.student, _, _ = load_distilled_student(run, ctx)
        self.results = json.loads((run / "results.json").read_text())
        self.run = run
        clients = ctx.split.clients[: ctx.split.num_teachers]
        self.x = clients_images(clients, ctx.data.train_x)
        self.y = torch.cat([ctx.data.train_y[torch.as_tensor(c.train + c.val)] for c in clients])
        self._gaussians: dict[tuple[int, str], object] = {}

    def evaluate(self, logits: torch.Tensor) -> tuple[float, list]:
        y, pred = self.ctx.data.test_y, logits.argmax(1)
        return per_class.accuracy(pred, y), per_class.class_accuracy(pred, y, len(logits[0]))

    def model_row(self, m: nn.Module) -> tuple[float, list]:
        ctx = self.ctx
        return self.evaluate(predict_logits(m, ctx.data.test_x, ctx.normalizer, ctx.device))

    def refit(self, m: nn.Module, seed: int, **kw) -> nn.Module:
        """What the round gives: statistics of ``m`` on the clients' images (the sums over the
        pooled images are the clients' sums added; computed once per model and features), then
        the head."""
        rcfg = RefitConfig(method="head", **kw)
        k, key = self.ctx.data.info.num_classes, (id(m), rcfg.features)
        if key not in self._gaussians:
            norm = self.ctx.normalizer
            st = compute_feature_stats(m, self.x, self.y, norm, k, features=rcfg.features)
            self._gaussians[key] = pool([st])
        width = self._gaussians[key].mean.shape[1]
        out = refit_model(m, rcfg.features, width, k)
        fit_head(refit_head_layer(out), self._gaussians[key], rcfg, seed)
        return out


def features(m: nn.Module, x: torch.Tensor, b: Bench, kind: str) -> torch.Tensor:
    got: list[torch.Tensor] = []
    site = feature_site(m, kind)
    h = site.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].detach().flatten(1)))
    predict_logits(m, x, b.ctx.normalizer, b.ctx.device)
    h.remove()
    return torch.cat(got)


def head_on_real_features(
    b: Bench, seed: int, steps: int = 6000, kind: str = "penultimate"
) -> tuple[float, list]:
    """A linear head (SGD on standardised features) on the real features of every client's
    images, evaluated on the test set's real features."""
    f, ft = features(b.student, b.x, b, kind), features(b.student, b.ctx.data.test_x, b, kind)
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    f, ft = (f - mu) / sd, (ft - mu) / sd
    head = nn.Linear(f.shape[1], b.ctx.data.info.num_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * s / steps))
        idx = torch.randint(0, len(b.y), (256,), generator=gen)
        loss = nn.functional.cross_entropy(head(f[idx]), b.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return b.evaluate(head(ft))


def adabn(b: Bench) -> nn.Module:
    m = copy.deepcopy(b.student)
    for layer in m.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # the cumulative average over every batch
    m.train()
    perm = torch.randperm(len(b.y), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(0, len(perm), 500):
            m(b.ctx.normalizer(b.x[perm[i : i + 500]]))
    return m.eval()


def second_round(b: Bench, refitted: nn.Module, seed: int, steps: int = 600) -> nn.Module:
    """The body distilled further on the final pool with the re-fitted head frozen."""
    ctx = b.ctx
    state = load_tensors(b.run / "student" / "dataset.pt", "synthetic dataset")
    px, _ = SyntheticPool.from_state(state, ctx.image_shape, ctx.data.info.num_classes).tensors()
    shares = class_shares(ctx.class_counts)
    m = copy.deepcopy(refitted).train()
    head = refit_head_layer(m)
    body = [p for p in m.parameters() if all(p is not q for q in head.parameters())]
    opt = torch.optim.SGD(body, lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * s / steps))
        x = augment(px[torch.randint(0, len(px), (128,), generator=gen)], 2, ctx.hflip, gen)
        with torch.no_grad():
            target = ensemble_probs(torch.stack([t(x) for t in ctx.teachers]), "weighted", shares)
        loss = nn.functional.kl_div(m(x).log_softmax(1), target, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b.refit(getattr(m, "base", m).eval(), seed)  # a MapHead's body: the student


def bench(run: Path, seeds: list[int], quick: bool = False) -> None:
    """Print the table for ``run``; ``quick``: every fit 50 steps (the benchmark's test)."""
    b = Bench(run)
    variants = {k: {**v, "steps": 50} for k, v in HEAD_VARIANTS.items()} if quick else HEAD_VARIANTS
    names = b.results["class_names"]
    ens = b.results["class_acc"]["ensemble"]
    print(f"\n{run}  (cells: test accuracy %; last column: the class furthest under the ensemble)")
    print(f"| row | acc % | {' | '.join(names)} | worst gap |")
    print("|---" * (len(names) + 3) + "|")

    def row(label: str, acc: float, ca: list) -> None:
        k = max(range(len(ens)), key=lambda c: ens[c] - ca[c])
        cells = " | ".join(f"{100 * c:.1f}" for c in ca)
        gap = f"{names[k]} {100 * (ens[k] - ca[k]):.1f}"
        print(f"| {label} | {100 * acc:.2f} | {cells} | {gap} |", flush=True)

    row("ensemble", b.results["ensemble_acc"], ens)
    row("as distilled", *b.model_row(b.student))
    for label, kw in variants.items():
        for s in seeds:
            row(f"{label}, seed {s}", *b.model_row(b.refit(b.student, s, **kw)))
    for kind in ("penultimate", "map"):
        for s in seeds:
            real = head_on_real_features(b, s, 50 if quick else 6000, kind)
            row(f"bound: {kind} head on real features, seed {s}", *real)
    adapted = adabn(b)
    for s in seeds:
        row(f"AdaBN + map head, seed {s}", *b.model_row(b.refit(adapted, s)))
    for s in seeds:
        refitted = b.refit(b.student, s)
        again = second_round(b, refitted, s, 20 if quick else 600)
        row(f"2nd round: body on pool + map head, seed {s}", *b.model_row(again))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("runs", nargs="+", type=Path, help="finished one-shot run folders")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    for run in args.runs:
        bench(run, args.seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
