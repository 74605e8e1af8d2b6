"""FedMD over Flower: after transfer learning on every client, each round the server names the
public samples to score (stratified, as in-process), validates the class scores, aggregates them
and sends the consensus back; the clients digest, revisit and report their private-test
accuracy. Writes ``results.json`` like ``fed-distill fedmd``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp import Grid

from fed_distill.artifacts import save_json
from fed_distill.config import to_container
from fed_distill.errors import FlowerError, ProtocolError
from fed_distill.federated import fedmd_server as server
from fed_distill.federated.config import FedMDConfig, check_fedmd_config, fedmd_config, split_of
from fed_distill.federated.fedmd import party_architectures, restricted_accuracy
from fed_distill.federated.fedmd_consensus import get_rule
from fed_distill.federated.fedmd_data import build_fedmd_data
from fed_distill.federated.fedmd_results import plot_fedmd, summary_table
from fed_distill.federated.flower.common import (
    FEDMD_ROUND,
    FEDMD_SCORES,
    FEDMD_SETUP,
    cfg_from_json,
    content,
    from_record,
    parse_faults,
)
from fed_distill.federated.flower.exchange import (
    Exchange,
    connect,
    fault_options,
    flower_summary,
    late_parties,
    say,
)
from fed_distill.utils import resolve_device, seed_everything


@dataclass
class _RoundLog:
    """What the rounds record: per party its accuracy after each round (None where it was out),
    the ensemble's, the distances to the consensus, who was left out and the times."""

    party_acc: list[list[float | None]]
    ensemble: list[float | None]
    party_acc_digest: list[list[float | None]] = field(default_factory=list)  # before revisit
    distances: list[list[float | None]] = field(default_factory=list)
    consensus_acc: list[float | None] = field(default_factory=list)
    consensus_private_acc: list[float | None] = field(default_factory=list)
    left_out: list[list[dict[str, Any]]] = field(default_factory=list)
    round_times: list[float] = field(default_factory=list)
    steps: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("communicate", "aggregate", "digest", "revisit", "evaluate"), 0.0
        )
    )


@dataclass
class _FedMD:
    """What the FedMD server holds during a run: the parties' connection, the options, the data
    (public labels for the draws, test labels for the ensemble diagnostic) and the time-outs."""

    ex: Exchange
    c: Any  # FedMDConfig
    data: Any  # FedMDData
    names: list[str]
    common: dict[str, Any]
    faults: dict[tuple[int, int], str]
    timeout: float
    train_timeout: float
    seed: int

    @property
    def n(self) -> int:
        return len(self.names)

    def ensemble_accuracy(self, mean_logits: torch.Tensor) -> float:
        d = self.data
        return restricted_accuracy(mean_logits, d.test_y, d.offset, d.num_private)

    def setup(self, job: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], float]:
        """Transfer learning and the local baselines, on every client: their metrics and the
        ensemble's accuracy before any round."""
        c, n = self.c, self.n
        extended_on = bool(c.extended_alone and c.rounds * c.revisit_epochs > 0)
        setup = {
            i: content(
                cfg=job["cfg"], party=i, pooled=bool(c.pooled), extended=extended_on, **self.common
            )
            for i in range(n)
        }
        replies, left = self.ex.ask(FEDMD_SETUP, setup, self.train_timeout, "0")
        if left:
            raise FlowerError("transfer learning failed: " + "; ".join(left.values()))
        tr = {i: dict(replies[i].content["metrics"]) for i in range(n)}
        for i in range(n):
            say(
                f"{self.names[i]}: public val {tr[i]['public_val_acc']:.4f} "
                f"({tr[i]['public_epochs_run']} epochs), private test after public "
                f"{tr[i]['private_acc_after_public']:.4f}, alone {tr[i]['alone_acc']:.4f}"
            )
        logits = [from_record(replies[i].content["arrays"])["test_logits"] for i in range(n)]
        return tr, self.ensemble_accuracy(torch.stack(logits).mean(0))

    def consensus(
        self, r: int, idx: torch.Tensor, steps: dict[str, float]
    ) -> tuple[list[int], torch.Tensor | None, list[float | None], list[dict[str, Any]]]:
        """Round ``r``'s communicate and aggregate steps: the parties that answered, the
        consensus of the valid scores (None when no party answered in time: the round is
        skipped), each party's distance to it and who was left out."""
        n, c = self.n, self.c
        t0 = time.perf_counter()
        asks = {
            i: content(
                {"idx": idx},
                party=i,
                round=r,
                sends=",".join(get_rule(c.aggregate).sends),
                **self.common,
                **fault_options(self.faults, i, r, self.timeout, forced=True),
            )
            for i in range(n)
        }
        late = late_parties(self.faults, r)
        replies, left = self.ex.ask(FEDMD_SCORES, asks, self.timeout, str(r), late=late)
        steps["communicate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        answered = sorted(replies)
        messages = []
        for i in answered:
            rec = replies[i].content.get("arrays")
            messages.append(from_record(rec) if rec is not None else None)
        left_out = [{"party": p, "reason": why} for p, why in sorted(left.items())]
        if not answered:  # every party timed out (or is still busy): skip, keep the run
            say(
                f"round {r}: every party was left out for timeout (no class scores within"
                f" {self.timeout:g}s); the round is skipped, the rounds before it are kept"
            )
            return [], None, [None] * n, left_out
        valid, used_pos, rejected = server.collect_scores(
            messages,
            (len(idx), self.data.num_outputs),
            [self.names[i] for i in answered],
            "skip",
            get_rule(c.aggregate).sends,
        )
        used = [answered[k] for k in used_pos]
        for d in rejected:
            d["party"] = answered[d["party"]]
            say(f"left out: {d['reason']}")
        left_out = sorted(left_out + rejected, key=lambda d: d["party"])
        if not valid:
            raise ProtocolError(
                f"round {r}: no party's class scores could be used: "
                + "; ".join(d["reason"] for d in left_out)
            )
        consensus = server.round_consensus(server.consensus_of(valid, c, used), c, self.data, idx)
        dist: list[float | None] = [None] * n
        for i, rep in zip(used, valid, strict=True):
            dist[i] = server.consensus_distance(rep["scores"], consensus)
        steps["aggregate"] += time.perf_counter() - t0
        return answered, consensus, dist, left_out

    def round(self, r: int, log: _RoundLog) -> None:
        """Round ``r``: draw the public subset, communicate, aggregate, distribute, digest,
        revisit and evaluate; its numbers go to ``log``."""
        t_round = time.perf_counter()
        c, steps = self.c, log.steps
        idx = torch.as_tensor(
            server.draw_public_subset(self.data.public_y, c.public_subset_size, self.seed, r)
        )
        answered, consensus, dist, left_out = self.consensus(r, idx, steps)
        log.distances.append(dist)
        if consensus is None:  # a round every party missed: nothing to record but that
            log.consensus_acc.append(None)
            log.consensus_private_acc.append(None)
            log.left_out.append(left_out)
            for a in (*log.party_acc, *log.party_acc_digest):
                a.append(None)
            log.ensemble.append(None)
            log.round_times.append(time.perf_counter() - t_round)
            return
        server.record_consensus(log, consensus, self.data, idx)
        accs, digest_accs, ens, late = self.digest(r, idx, consensus, answered, steps)
        for p, why in sorted(late.items()):
            left_out.append({"party": p, "reason": why, "step": "digest"})
        log.left_out.append(left_out)
        for a, acc in zip(log.party_acc, accs, strict=True):
            a.append(acc)
        for a, acc in zip(log.party_acc_digest, digest_accs, strict=True):
            a.append(acc)
        log.ensemble.append(ens)
        log.round_times.append(time.perf_counter() - t_round)
        now = [a[-1] for a in log.party_acc if a[-1] is not None]
        alone = [a[0] for a in log.party_acc]
        say(
            f"round {r}/{c.rounds}: mean private accuracy {np.mean(now):.4f} "
            f"(alone {np.mean(alone):.4f}), {log.round_times[-1]:.1f}s"
            + (f", left out {[d['party'] for d in left_out]}" if left_out else "")
        )

    def digest(
        self,
        r: int,
        idx: torch.Tensor,
        consensus: torch.Tensor,
        answered: list[int],
        steps: dict[str, float],
    ) -> tuple[list[float | None], list[float | None], float | None, dict[int, str]]:
        """Round ``r``'s distribute, digest, revisit and evaluate steps on the parties that
        answered: each party's accuracy after revisit and after digest (None where out), the
        ensemble's, who came back late.

        Parties whose scores arrived but were rejected still digest the consensus, as
        in-process; a party that did not answer is out of this round altogether."""
        rounds = {
            i: content({"idx": idx, "consensus": consensus}, party=i, round=r, **self.common)
            for i in answered
        }
        replies, late = self.ex.ask(FEDMD_ROUND, rounds, self.train_timeout, str(r))
        accs: list[float | None] = []
        digest_accs: list[float | None] = []
        logit_sum = torch.zeros(len(self.data.test_y), self.data.num_outputs)
        for i in range(self.n):
            if i in replies:
                m = replies[i].content["metrics"]
                accs.append(float(m["acc"]))
                digest_accs.append(float(m["digest_acc"]))
                logit_sum += from_record(replies[i].content["arrays"])["test_logits"]
                for k in ("digest", "revisit", "evaluate"):
                    steps[k] += float(m[f"{k}_s"])
            else:
                accs.append(None)
                digest_accs.append(None)
        ensemble = self.ensemble_accuracy(logit_sum / max(1, len(replies))) if replies else None
        return accs, digest_accs, ensemble, late


def serve_fedmd(grid: Grid, job: dict[str, Any]) -> dict[str, Any]:
    """FedMD over Flower; writes ``run_dir/results.json`` like ``fed-distill fedmd``."""
    t_start = time.perf_counter()
    cfg = cfg_from_json(job["cfg"])
    c: FedMDConfig = fedmd_config(cfg.fedmd)
    check_fedmd_config(c, split_of(cfg))
    if c.data_dir is None and cfg.get("dataset") is not None and cfg.dataset.get("data_dir"):
        c.data_dir = str(cfg.dataset.data_dir)
    seed = int(cfg.seed)
    archs = party_architectures(c)
    n = len(archs)
    names = [f"party {i} ({a})" for i, a in enumerate(archs)]
    seed_everything(seed)
    stage_times: dict[str, float] = {}

    # The server draws the public subsets (needs the public labels) and scores the ensemble
    # diagnostic (needs the test labels); the same deterministic build as every client's.
    t0 = time.perf_counter()
    data = build_fedmd_data(c, n, seed, split_of(cfg))
    stage_times["data"] = time.perf_counter() - t0
    ex = connect(grid, n, names, float(job["wait_nodes_s"]), float(job["train_timeout"]))
    say(f"fedmd '{c.name}' on Flower ({job['runner']}): {n} parties connected")
    srv = _FedMD(
        ex,
        c,
        data,
        names,
        {"num_threads": int(job["num_threads"])},
        parse_faults(job.get("faults")),
        float(job["timeout"]),
        float(job["train_timeout"]),
        seed,
    )

    t0 = time.perf_counter()
    tr, ensemble_0 = srv.setup(job)
    ensemble: list[float | None] = [ensemble_0]
    stage_times["setup"] = time.perf_counter() - t0
    for key in ("transfer", "pooled", "alone_extended"):
        stage_times[f"{key}_client_sum"] = float(sum(tr[i].get(f"{key}_s", 0.0) for i in range(n)))
    alone = [float(tr[i]["alone_acc"]) for i in range(n)]

    log = _RoundLog([[a] for a in alone], ensemble, [[] for _ in alone])
    for r in range(1, c.rounds + 1):
        srv.round(r, log)
    party_acc, round_times = log.party_acc, log.round_times
    stage_times["rounds"] = float(sum(round_times))
    final = [a[-1] for a in party_acc]
    mean_final = _mean_of(final)
    results: dict[str, Any] = {
        "rounds": c.rounds,
        "parties": archs,
        "party_acc": party_acc,
        "party_acc_digest": log.party_acc_digest,
        "alone_acc": alone,
        "pooled_acc": [tr[i].get("pooled_acc") for i in range(n)],
        "alone_extended_acc": [tr[i].get("alone_extended_acc") for i in range(n)],
        "final_acc": final,
        "mean_acc": [_mean_of([a[r] for a in party_acc]) for r in range(c.rounds + 1)],
        "mean_gain": None if mean_final is None else mean_final - float(np.mean(alone)),
        "ensemble_acc": ensemble,
        "public_val_acc": [tr[i]["public_val_acc"] for i in range(n)],
        "private_acc_after_public": [tr[i]["private_acc_after_public"] for i in range(n)],
        "consensus_distance": log.distances,
        "consensus_acc": log.consensus_acc,
        "consensus_private_acc": log.consensus_private_acc,
        "left_out": log.left_out,
        "wall_time_s": time.perf_counter() - t_start,
        "round_times_s": round_times,
        "step_times_s": log.steps,
        "stage_times_s": stage_times,
        "device": str(resolve_device(str(cfg.device))),
        "data": data.summary(),
        "preset": c.name,
        "runner": job["runner"],
        "flower": flower_summary(job),
        "config": {k: v for k, v in to_container(cfg).items() if not str(k).startswith("_")},
    }
    _write_fedmd_results(results, Path(str(cfg.run_dir)))
    return results


def _mean_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _write_fedmd_results(results: dict[str, Any], run_dir: Path) -> None:
    """``results.json``, the accuracy figure and the summary table (None shown as NaN)."""
    save_json(results, run_dir / "results.json")
    shown = {
        **results,
        **{
            k: [[float("nan") if v is None else v for v in a] for a in results[k]]
            for k in ("party_acc", "party_acc_digest")
        },
        "mean_gain": results["mean_gain"] if results["mean_gain"] is not None else float("nan"),
        "ensemble_acc": [float("nan") if v is None else v for v in results["ensemble_acc"]],
    }
    plot_fedmd(shown, run_dir / "fedmd_accuracy.png")
    say(summary_table(shown))
    say(f"results in {run_dir / 'results.json'}")
