"""FedMD per party and per class: where a round's private accuracy is won and lost.

Usage (from the project root)::

    .venv/bin/python benchmarks/fedmd_classes.py --preset fashion_unlabelled_pool_skewed \
        --seed 0 --out DIR mae= kl=fedmd.scores=softmax,fedmd.digest_loss=kl -- fedmd.rounds=8
    .venv/bin/python benchmarks/fedmd_classes.py --table DIR/kl/classes.json

Every variant (``NAME=override,override``; the overrides after ``--`` apply to all) branches
its rounds from one transfer learning (``fedmd_run.setup_run`` / ``branch_rounds``), so its
``DIR/NAME/results.json`` is what ``benchmarks/fedmd.py --rules`` gives for it. Beside it,
``classes.json`` holds, per party and private class, the test accuracy after transfer
learning (``alone``), after each round's digest (``digest``: party x round x class) and after
its revisit (``revisit``), the parties' private class counts, and per round and class the
consensus's accuracy and mean probability of the true class on the alignment images of that
class (labels only the benchmark knows). The table splits each party's classes into those it
holds images of and those it does not.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import fed_distill.federated.fedmd as fedmd
import fed_distill.federated.fedmd_run as fedmd_run

REC: dict[str, Any] = {}


def per_class(logits: torch.Tensor, data: Any) -> list[float]:
    """Accuracy per private class (argmax over the private outputs, as private_accuracy)."""
    y, lo, q = data.test_y, data.offset, data.num_private
    pred = logits[:, lo : lo + q].argmax(1) + lo
    return [float((pred[y == lo + k] == lo + k).float().mean()) for k in range(q)]


def instrument() -> None:
    """Record per-class accuracy after digest and after revisit, and the consensus per class."""
    digest, local_round, round_consensus = (
        fedmd.digest,
        fedmd_run.local_round,
        fedmd_run.round_consensus,
    )

    def digest_rec(model, *args, **kwargs):
        out = digest(model, *args, **kwargs)
        party = REC["party"]
        REC["digest"][party.index].append(per_class(party.test_logits(model), party.data))
        return out

    def local_round_rec(model, party, subset_x, consensus, r):
        REC["party"] = party
        out = local_round(model, party, subset_x, consensus, r)
        REC["revisit"][party.index].append(per_class(out[0], party.data))
        return out

    def round_consensus_rec(consensus, c, data, idx):
        cons = round_consensus(consensus, c, data, idx)
        true_y = data.public_true_y[idx]
        p = cons if c.scores == "softmax" else F.softmax(cons / c.temperature, 1)
        rows = []
        for k in range(data.num_private):
            pk = p[true_y == data.offset + k]
            private = pk[:, data.offset : data.offset + data.num_private]
            rows.append(
                {
                    "acc": float((private.argmax(1) == k).float().mean()),
                    "p_true": float(pk[:, data.offset + k].mean()),
                }
            )
        REC["consensus"].append(rows)
        return cons

    fedmd.digest = digest_rec
    fedmd_run.local_round = local_round_rec
    fedmd_run.round_consensus = round_consensus_rec


def run(preset: str, seed: int, out: Path, variants: list[str], common: list[str]) -> None:
    from fed_distill.api import compose

    instrument()
    base = [f"fedmd={preset}", f"seed={seed}", "progress=false", *common]
    setup = None
    for v in variants:
        name, _, overrides = v.partition("=")
        run_dir = out / name
        if (run_dir / "classes.json").is_file():
            continue
        cfg = compose(
            "fedmd", [*base, *overrides.split(",") * bool(overrides), f"run_dir={run_dir}"]
        )
        if setup is None:
            t0 = time.perf_counter()
            setup = fedmd_run.setup_run(cfg)
            print(f"== setup {time.perf_counter() - t0:.0f}s", flush=True)
            d, models = setup[0].data, setup[1].models
            alone = [
                per_class(fedmd.predict_logits(m, d.test_x, d.private_norm), d) for m in models
            ]
            counts = [
                torch.bincount(y - d.offset, minlength=d.num_private).tolist() for y in d.private_y
            ]
        n = len(setup[0].archs)
        REC.update(digest=[[] for _ in range(n)], revisit=[[] for _ in range(n)], consensus=[])
        t0 = time.perf_counter()
        res = fedmd_run.branch_rounds(setup, cfg)
        print(
            f"== {name}: {time.perf_counter() - t0:.0f}s, final {np.mean(res['final_acc']):.4f}",
            flush=True,
        )
        keep = {k: REC[k] for k in ("digest", "revisit", "consensus")}
        record = {"variant": name, "overrides": overrides, "alone": alone, "counts": counts, **keep}
        (run_dir / "classes.json").write_text(json.dumps(record))


def table(path: Path) -> str:
    """Per round: mean accuracy over (party, class) pairs the party holds / does not hold,
    after digest and after revisit; then the consensus per class (mean over rounds)."""
    d = json.loads(path.read_text())
    held = np.array(d["counts"]) > 0
    alone, dg, rv = (np.array(d[k]) for k in ("alone", "digest", "revisit"))

    def cells(a: np.ndarray) -> str:
        return f"{100 * a[held].mean():5.1f} {100 * a[~held].mean():5.1f} {100 * a.mean():5.1f}"

    lines = [
        f"{d['variant']} ({d['overrides']}): held / not held / all classes, %",
        f"alone     {cells(alone)}",
    ]
    for r in range(dg.shape[1]):
        lines.append(f"round {r + 1:>2}  digest {cells(dg[:, r])}  revisit {cells(rv[:, r])}")
    for k in range(held.shape[1]):
        c = np.array([[row[k]["acc"], row[k]["p_true"]] for row in d["consensus"]]).mean(0)
        lines.append(
            f"class {k}: {int(held[:, k].sum())} parties hold it; consensus acc {100 * c[0]:.1f},"
            f" p(true) {c[1]:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fashion_unlabelled_pool_skewed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_fedmd_classes")
    ap.add_argument("--table", default=None, help="only print the table of a classes.json")
    ap.add_argument("variants", nargs="*", help="NAME=override,override (NAME= for none)")
    args = ap.parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    run(args.preset, args.seed, Path(args.out), args.variants, common)
    for v in args.variants:
        print(table(Path(args.out) / v.partition("=")[0] / "classes.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
