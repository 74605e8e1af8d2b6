"""The Flower ``ServerApp``: drives one-shot FL or FedMD through messages to the ClientApps.

* one-shot: the server sends each client the shared initial weights and its partition; every
  client trains its teacher once and uploads the weights; the server checks them, then
  synthesises and distils exactly as ``fed-distill oneshot`` does (:func:`run_oneshot` with the
  teacher stage replaced by this upload).
* FedMD: after transfer learning on every client, each round the server names the public
  samples to score (stratified, as in-process), validates the class scores, aggregates them and
  sends the consensus back; the clients digest, revisit and report their private-test accuracy.

Every reply is validated on arrival: a missing answer (timeout), an error raised in the
ClientApp, a wrong shape, a wrong dtype, NaN or Inf. The client is left out for that round with
a logged reason, the others carry on, and ``results.json["left_out"]`` records who and why.

The run's description (protocol, resolved config, timeouts) is a JSON "job" file: the
deployment ``ServerApp`` (:data:`app`) reads its path from the run config key ``job``; the
simulation runner builds the app around the job directly (:func:`make_server_app`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fed_distill.errors import FlowerError, ProtocolError
from fed_distill.federated.flower import quiet_flower_env
from fed_distill.federated.flower.common import (
    CLASS_STATS_PREFIX,
    FEDMD_ROUND,
    FEDMD_SCORES,
    FEDMD_SETUP,
    HELLO,
    ONESHOT_TRAIN,
    cfg_from_json,
    content,
    from_record,
    parse_faults,
)

quiet_flower_env()
log = logging.getLogger("fed_distill.flower")


def _say(text: str) -> None:
    print(text, flush=True)


# ============================================================================ messaging


class Exchange:
    """Send messages to parties and collect the replies that arrive in time.

    A party whose reply is late stays *pending*: before it is sent anything new, the server
    waits (up to a timeout) for the late reply, so one node never runs two messages at once.
    """

    def __init__(self, grid: Grid, nodes: dict[int, int], names: list[str]):
        self.grid, self.nodes, self.names = grid, nodes, names
        self.pending: dict[int, str] = {}  # party -> id of a message it has not answered

    def _drain(self, parties: list[int], timeout: float) -> dict[int, str]:
        """Wait for late replies of ``parties``; returns those still busy -> reason."""
        waiting = {p: self.pending[p] for p in parties if p in self.pending}
        end = time.monotonic() + timeout
        while waiting:
            got = list(self.grid.pull_messages(list(waiting.values())))
            done = {m.metadata.reply_to_message_id for m in got}
            waiting = {p: mid for p, mid in waiting.items() if mid not in done}
            for p in list(self.pending):
                if self.pending[p] in done:
                    del self.pending[p]
            if not waiting or time.monotonic() > end:
                break
            time.sleep(0.05)
        return {
            p: f"{self.names[p]}: still busy with an earlier message it never answered"
            for p in waiting
        }

    def ask(
        self, message_type: str, contents: dict[int, Any], timeout: float, group: str
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Send ``contents[party]`` to each party; return (replies with content, left out -> reason)."""
        left: dict[int, str] = self._drain(list(contents), timeout)
        send = {p: c for p, c in contents.items() if p not in left}
        msgs = [
            Message(c, dst_node_id=self.nodes[p], message_type=message_type, group_id=group)
            for p, c in send.items()
        ]
        ids = list(self.grid.push_messages(msgs))
        by_id = dict(zip(ids, send, strict=True))
        replies: dict[int, Message] = {}
        end = time.monotonic() + timeout
        waiting = set(ids)
        while waiting:
            for m in self.grid.pull_messages(list(waiting)):
                mid = m.metadata.reply_to_message_id
                waiting.discard(mid)
                replies[by_id[mid]] = m
            if not waiting or time.monotonic() > end:
                break
            time.sleep(0.02)
        for mid in waiting:
            p = by_id[mid]
            self.pending[p] = mid
            left[p] = f"{self.names[p]}: no answer within {timeout:g}s (timeout)"
        ok: dict[int, Message] = {}
        for p, m in replies.items():
            if m.has_error():
                left[p] = f"{self.names[p]}: the ClientApp failed: {_one_line(m.error.reason)}"
            else:
                ok[p] = m
        for _p, reason in sorted(left.items()):
            _say(f"left out: {reason}")
        return ok, left


def _one_line(reason: str, limit: int = 300) -> str:
    """The gist of a ClientApp's error report (Ray wraps it in a multi-line traceback)."""
    text = str(reason)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    text = " ".join(text.replace("'>", " ").split())
    return text[:limit]


def connect(
    grid: Grid, num: int, names: list[str], wait_s: float, answer_s: float | None = None
) -> Exchange:
    """Wait until ``num`` nodes are connected and map each party (partition id) to its node.

    ``answer_s`` bounds the wait for each node's first answer (default ``wait_s``): a ClientApp
    can take long to start on a busy machine (Ray actors import torch and build the data)."""
    end = time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < num:
        if time.monotonic() > end:
            raise FlowerError(
                f"only {len(nodes)} of {num} SuperNodes connected within {wait_s:g}s; start one "
                "SuperNode per party (node config partition-id=0..N-1)"
            )
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    ex = Exchange(grid, dict(enumerate(nodes)), [f"node {n}" for n in nodes])
    replies, left = ex.ask(
        HELLO, {i: content() for i in range(len(nodes))}, answer_s or wait_s, "hello"
    )
    mapping: dict[int, int] = {}
    for i, m in replies.items():
        part = int(m.content["metrics"]["partition"])
        if part in mapping or not 0 <= part < num:
            raise FlowerError(
                f"node {nodes[i]} has partition-id {part}; need 0..{num - 1}, each once"
            )
        mapping[part] = nodes[i]
    if len(mapping) != num:
        raise FlowerError(
            f"nodes hold partitions {sorted(mapping)}, but parties 0..{num - 1} are needed"
            + (f" ({'; '.join(left.values())})" if left else "")
        )
    return Exchange(grid, mapping, names)


def _fault(faults: dict[tuple[int, int], str], party: int, round_: int, timeout: float) -> dict:
    kind = faults.get((party, round_), "")
    return {"fault": kind, "fault_sleep": timeout + 3.0} if kind else {}


# ============================================================================ FedMD


def serve_fedmd(grid: Grid, job: dict[str, Any]) -> dict[str, Any]:
    """FedMD over Flower; writes ``run_dir/results.json`` like ``fed-distill fedmd``."""
    from fed_distill.artifacts import save_json
    from fed_distill.config import as_object, to_container
    from fed_distill.federated.config import FedMDConfig, check_fedmd_config
    from fed_distill.federated.fedmd import (
        aggregate,
        collect_scores,
        consensus_distance,
        draw_public_subset,
        party_architectures,
        restricted_accuracy,
    )
    from fed_distill.federated.fedmd_data import build_fedmd_data
    from fed_distill.federated.fedmd_results import plot_fedmd, summary_table
    from fed_distill.utils import resolve_device, seed_everything

    t_start = time.perf_counter()
    cfg = cfg_from_json(job["cfg"])
    c: FedMDConfig = as_object(cfg.fedmd, FedMDConfig)
    check_fedmd_config(c)
    if c.data_dir is None and cfg.get("dataset") is not None and cfg.dataset.get("data_dir"):
        c.data_dir = str(cfg.dataset.data_dir)
    seed = int(cfg.seed)
    run_dir = Path(str(cfg.run_dir))
    archs = party_architectures(c)
    n = len(archs)
    names = [f"party {i} ({a})" for i, a in enumerate(archs)]
    faults = parse_faults(job.get("faults"))
    timeout, train_timeout = float(job["timeout"]), float(job["train_timeout"])
    seed_everything(seed)
    stage_times: dict[str, float] = {}

    # The server draws the public subsets (needs the public labels) and scores the ensemble
    # diagnostic (needs the test labels); the same deterministic build as every client's.
    t0 = time.perf_counter()
    data = build_fedmd_data(c, n, seed)
    stage_times["data"] = time.perf_counter() - t0
    ex = connect(grid, n, names, float(job["wait_nodes_s"]), float(job["train_timeout"]))
    _say(f"fedmd '{c.name}' on Flower ({job['runner']}): {n} parties connected")
    common = {"num_threads": int(job["num_threads"])}

    # --- transfer learning and the local baselines, on every client -----------------------------
    t0 = time.perf_counter()
    extended_on = bool(c.extended_alone and c.rounds * c.revisit_epochs > 0)
    setup = {
        i: content(cfg=job["cfg"], party=i, pooled=bool(c.pooled), extended=extended_on, **common)
        for i in range(n)
    }
    replies, left = ex.ask(FEDMD_SETUP, setup, train_timeout, "0")
    if left:
        raise FlowerError("transfer learning failed: " + "; ".join(left.values()))
    tr = {i: dict(replies[i].content["metrics"]) for i in range(n)}
    test_logits = {i: from_record(replies[i].content["arrays"])["test_logits"] for i in range(n)}
    for i in range(n):
        _say(
            f"{names[i]}: public val {tr[i]['public_val_acc']:.4f} ({tr[i]['public_epochs_run']} "
            f"epochs), private test after public {tr[i]['private_acc_after_public']:.4f}, "
            f"alone {tr[i]['alone_acc']:.4f}"
        )
    stage_times["setup"] = time.perf_counter() - t0
    for key in ("transfer", "pooled", "alone_extended"):
        stage_times[f"{key}_client_sum"] = float(sum(tr[i].get(f"{key}_s", 0.0) for i in range(n)))
    alone = [float(tr[i]["alone_acc"]) for i in range(n)]
    ensemble = [
        restricted_accuracy(
            torch.stack([test_logits[i] for i in range(n)]).mean(0),
            data.test_y,
            data.offset,
            data.num_private,
        )
    ]

    # --- rounds ------------------------------------------------------------------------------------
    party_acc: list[list[float | None]] = [[a] for a in alone]
    distances: list[list[float | None]] = []
    left_out_log: list[list[dict[str, Any]]] = []
    round_times: list[float] = []
    steps = {"communicate": 0.0, "aggregate": 0.0, "digest": 0.0, "revisit": 0.0, "evaluate": 0.0}
    for r in range(1, c.rounds + 1):
        t_round = time.perf_counter()
        idx = torch.as_tensor(draw_public_subset(data.public_y, c.public_subset_size, seed, r))
        expected = (len(idx), data.num_outputs)

        t0 = time.perf_counter()
        asks = {
            i: content({"idx": idx}, party=i, round=r, **common, **_fault(faults, i, r, timeout))
            for i in range(n)
        }
        replies, left = ex.ask(FEDMD_SCORES, asks, timeout, str(r))
        steps["communicate"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        answered = sorted(replies)
        messages = []
        for i in answered:
            rec = replies[i].content.get("arrays")
            messages.append(from_record(rec).get("scores") if rec is not None else None)
        left_out = [{"party": p, "reason": why} for p, why in sorted(left.items())]
        if answered:
            valid, used_pos, rejected = collect_scores(
                messages, expected, [names[i] for i in answered], "skip"
            )
        else:
            valid, used_pos, rejected = [], [], []
        used = [answered[k] for k in used_pos]
        for d in rejected:
            d["party"] = answered[d["party"]]
            _say(f"left out: {d['reason']}")
        left_out = sorted(left_out + rejected, key=lambda d: d["party"])
        if not valid:
            raise ProtocolError(
                f"round {r}: no party's class scores could be used: "
                + "; ".join(d["reason"] for d in left_out)
            )
        weights = (
            [c.aggregate_weights[i] for i in used] if c.aggregate_weights is not None else None
        )
        consensus = aggregate(valid, c.aggregate, weights, c.trim)
        dist: list[float | None] = [None] * n
        for i, s in zip(used, valid, strict=True):
            dist[i] = consensus_distance(s, consensus)
        distances.append(dist)
        steps["aggregate"] += time.perf_counter() - t0

        # Parties whose scores arrived but were rejected still digest the consensus, as
        # in-process; a party that did not answer is out of this round altogether.
        rounds = {
            i: content({"idx": idx, "consensus": consensus}, party=i, round=r, **common)
            for i in answered
        }
        replies, late = ex.ask(FEDMD_ROUND, rounds, train_timeout, str(r))
        for p, why in sorted(late.items()):
            left_out.append({"party": p, "reason": why, "step": "digest"})
        left_out_log.append(left_out)
        logit_sum = torch.zeros(len(data.test_y), data.num_outputs)
        for i in range(n):
            if i in replies:
                m = replies[i].content["metrics"]
                party_acc[i].append(float(m["acc"]))
                logit_sum += from_record(replies[i].content["arrays"])["test_logits"]
                for k in ("digest", "revisit", "evaluate"):
                    steps[k] += float(m[f"{k}_s"])
            else:
                party_acc[i].append(None)
        ensemble.append(
            restricted_accuracy(
                logit_sum / max(1, len(replies)), data.test_y, data.offset, data.num_private
            )
            if replies
            else None
        )
        round_times.append(time.perf_counter() - t_round)
        now = [a[-1] for a in party_acc if a[-1] is not None]
        _say(
            f"round {r}/{c.rounds}: mean private accuracy {np.mean(now):.4f} "
            f"(alone {np.mean(alone):.4f}), {round_times[-1]:.1f}s"
            + (f", left out {[d['party'] for d in left_out]}" if left_out else "")
        )
    stage_times["rounds"] = float(sum(round_times))

    def mean_of(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return float(np.mean(vals)) if vals else None

    final = [a[-1] for a in party_acc]
    mean_final = mean_of(final)
    results: dict[str, Any] = {
        "rounds": c.rounds,
        "parties": archs,
        "party_acc": party_acc,
        "alone_acc": alone,
        "pooled_acc": [tr[i].get("pooled_acc") for i in range(n)],
        "alone_extended_acc": [tr[i].get("alone_extended_acc") for i in range(n)],
        "final_acc": final,
        "mean_acc": [mean_of([a[r] for a in party_acc]) for r in range(c.rounds + 1)],
        "mean_gain": None if mean_final is None else mean_final - float(np.mean(alone)),
        "ensemble_acc": ensemble,
        "public_val_acc": [tr[i]["public_val_acc"] for i in range(n)],
        "private_acc_after_public": [tr[i]["private_acc_after_public"] for i in range(n)],
        "consensus_distance": distances,
        "left_out": left_out_log,
        "wall_time_s": time.perf_counter() - t_start,
        "round_times_s": round_times,
        "step_times_s": steps,
        "stage_times_s": stage_times,
        "device": str(resolve_device(str(cfg.device))),
        "data": data.summary(),
        "preset": c.name,
        "runner": job["runner"],
        "flower": _flower_summary(job),
        "config": to_container(cfg),
    }
    save_json(results, run_dir / "results.json")
    shown = {
        **results,
        "party_acc": [[float("nan") if v is None else v for v in a] for a in party_acc],
        "mean_gain": results["mean_gain"] if results["mean_gain"] is not None else float("nan"),
        "ensemble_acc": [float("nan") if v is None else v for v in ensemble],
    }
    plot_fedmd(shown, run_dir / "fedmd_accuracy.png")
    _say(summary_table(shown))
    _say(f"results in {run_dir / 'results.json'}")
    return results


def _flower_summary(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("timeout", "train_timeout", "faults") if k in job}


# ============================================================================ one-shot


def validate_weights(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], who: str
) -> None:
    """An uploaded state dict must have the reference's keys, shapes and dtypes, all finite."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise ProtocolError(
            f"{who}: weights have missing keys {missing[:3]} / unknown keys {extra[:3]}"
        )
    for k, ref in reference.items():
        t = state[k]
        if t.dtype != ref.dtype:
            raise ProtocolError(f"{who}: weight '{k}' has dtype {t.dtype}, expected {ref.dtype}")
        if tuple(t.shape) != tuple(ref.shape):
            raise ProtocolError(
                f"{who}: weight '{k}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if torch.is_floating_point(t) and not bool(torch.isfinite(t).all()):
            n_nan = int(torch.isnan(t).sum())
            raise ProtocolError(
                f"{who}: weight '{k}' contains {n_nan} NaN and {int((~torch.isfinite(t)).sum()) - n_nan}"
                " Inf values; the client's training has diverged"
            )


def serve_oneshot(grid: Grid, job: dict[str, Any]) -> dict[str, Any]:
    """One-shot FL over Flower: teachers trained on the clients and uploaded once, then the
    same synthesis, distillation and evaluation as ``fed-distill oneshot``."""
    from dataclasses import asdict

    from fed_distill.artifacts import remove_file, save_json, save_weights
    from fed_distill.class_stats import STATS_FILE, check_class_stats, save_class_stats
    from fed_distill.config import ModelConfig, as_object
    from fed_distill.data.partition import save_split
    from fed_distill.federated.oneshot import run_oneshot
    from fed_distill.models import build_model
    from fed_distill.pipeline import TeacherSpec, load_split_and_data
    from fed_distill.utils import seed_everything

    cfg = cfg_from_json(job["cfg"])
    faults = parse_faults(job.get("faults"))
    train_timeout = float(job["train_timeout"])
    extra: dict[str, Any] = {"runner": job["runner"], "flower": _flower_summary(job)}

    def flower_train_teachers(cfg) -> list[dict[str, Any]]:
        run_dir = Path(str(cfg.run_dir))
        split, data = load_split_and_data(cfg)
        info = data.info
        mcfg: ModelConfig = as_object(cfg.model, ModelConfig)
        # the shared initial weights, as run_train_teachers makes them
        seed_everything(cfg.seed)
        init = build_model(
            mcfg.name, info.num_classes, info.channels, info.image_size, **mcfg.kwargs
        )
        init_state = {k: v.clone() for k, v in init.state_dict().items()}
        n = split.num_teachers
        names = [f"client {i}" for i in range(n)]
        ex = connect(grid, n, names, float(job["wait_nodes_s"]), train_timeout)
        spec = {"model": mcfg.name, "model_kwargs": dict(mcfg.kwargs)}
        asks = {}
        for i, cl in enumerate(split.clients[:n]):
            arrays = {
                **init_state,
                "idx_train": torch.as_tensor(cl.train, dtype=torch.long),
                "idx_val": torch.as_tensor(cl.val, dtype=torch.long),
                "idx_test": torch.as_tensor(cl.test, dtype=torch.long),
            }
            asks[i] = content(
                arrays,
                cfg=job["cfg"],
                client=i,
                dataset=split.dataset,
                dataset_options=split.dataset_options,
                train_class_counts=cl.train_class_counts,
                spec=spec,
                num_threads=int(job["num_threads"]),
                **_fault(faults, i, 0, train_timeout),
            )
        replies, left = ex.ask(ONESHOT_TRAIN, asks, train_timeout, "0")
        left_out = [{"party": p, "reason": why} for p, why in sorted(left.items())]
        kept: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
        stats: dict[int, dict[str, torch.Tensor]] = {}
        for i, m in sorted(replies.items()):
            try:
                if m.content.get("arrays") is None:
                    raise ProtocolError(f"{names[i]}: the reply holds no weights")
                w = from_record(m.content["arrays"])
                st = {
                    k[len(CLASS_STATS_PREFIX) :]: w.pop(k)
                    for k in list(w)
                    if k.startswith(CLASS_STATS_PREFIX)
                }
                validate_weights(w, init_state, names[i])
                if st:
                    check_class_stats(st, init, info.num_classes, names[i])
                    stats[i] = st
                kept[i] = (w, json.loads(str(m.content["metrics"]["metrics"])))
            except ProtocolError as e:
                _say(f"left out: {e}")
                left_out.append({"party": i, "reason": str(e)})
        left_out.sort(key=lambda d: d["party"])
        extra["left_out"] = left_out
        if not kept:
            raise ProtocolError(
                "every client's teacher was rejected: " + "; ".join(d["reason"] for d in left_out)
            )
        if left_out:
            # The later stages read the teachers and split.json: keep the clients that uploaded
            # (and any server clients), renumbered; results name the left-out originals.
            save_split(split, run_dir / "split_all.json")  # every client, as split
            split.clients = [split.clients[i] for i in kept] + split.clients[n:]
            save_split(split, run_dir / "split.json")
            extra["teacher_clients"] = list(kept)
        out = run_dir / "teachers"
        tspec = TeacherSpec(
            mcfg.name,
            dict(mcfg.kwargs),
            info.num_classes,
            info.channels,
            info.image_size,
            len(kept),
            info.name,
            int(cfg.seed),
        )
        save_json(asdict(tspec), out / "teachers.json")
        summary = []
        for j, (i, (w, metrics)) in enumerate(kept.items()):
            model = build_model(
                mcfg.name, info.num_classes, info.channels, info.image_size, **mcfg.kwargs
            )
            model.load_state_dict(w)
            metrics["client"] = i
            save_weights(
                model,
                out / f"teacher_{j}.safetensors",
                metadata={"model": mcfg.name, "teacher": str(j)},
            )
            save_json(metrics, out / f"metrics_teacher_{j}.json")
            if i in stats:
                save_class_stats(stats[i], out / STATS_FILE.format(j))
            else:
                remove_file(out / STATS_FILE.format(j))
            _say(
                f"teacher {j} (client {i}): val {metrics['best_val_acc']:.4f}, test {metrics['test_acc']:.4f}"
            )
            summary.append(metrics)
        return summary

    return run_oneshot(cfg, train_teachers=flower_train_teachers, extra=extra)


# ============================================================================ the apps


def serve(grid: Grid, job: dict[str, Any]) -> dict[str, Any]:
    if job["protocol"] == "fedmd":
        return serve_fedmd(grid, job)
    if job["protocol"] == "oneshot":
        return serve_oneshot(grid, job)
    raise FlowerError(f"unknown protocol '{job['protocol']}' (oneshot or fedmd)")


def make_server_app(job: dict[str, Any], results: list[dict[str, Any]] | None = None) -> ServerApp:
    """A ServerApp that runs ``job`` (simulation: built in this process)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        res = serve(grid, job)
        if results is not None:
            results.append(res)

    return server


app = ServerApp()  # deployment: `flwr run` with run config job=PATH/flower_job.json


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = Path(str(context.run_config.get("job", "")))
    if not path.is_file():
        raise FlowerError(f"run config 'job' must name a flower_job.json, got '{path}'")
    serve(grid, json.loads(path.read_text()))
