"""The Flower ``ServerApp``: drives one-shot FL or FedMD through messages to the ClientApps.

* one-shot: the server sends each client the shared initial weights and its partition; every
  client trains its teacher once and uploads the weights; the server checks them, then
  synthesises and distils exactly as ``fed-distill oneshot`` does (:func:`run_oneshot` with the
  teacher stage replaced by this upload).
* FedMD: after transfer learning on every client, each round the server names the public
  samples to score (stratified, as in-process), validates the class scores, aggregates them and
  sends the consensus back; the clients digest, revisit and report their private-test accuracy
  (:mod:`.server_fedmd`).

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fed_distill.artifacts import remove_file, save_json, save_weights
from fed_distill.class_stats import STATS_FILE, check_class_stats, check_keys, save_class_stats
from fed_distill.config import ModelConfig, as_object
from fed_distill.data.partition import save_split
from fed_distill.errors import FlowerError, ProtocolError
from fed_distill.federated.flower import quiet_flower_env
from fed_distill.federated.flower.common import (
    CLASS_STATS_PREFIX,
    ONESHOT_TRAIN,
    cfg_from_json,
    client_message,
    from_record,
    parse_faults,
)
from fed_distill.federated.flower.exchange import (
    connect,
    fault_options,
    flower_summary,
    late_parties,
    say,
)
from fed_distill.federated.flower.server_fedmd import serve_fedmd
from fed_distill.federated.flower.submit import FAILED_FILE
from fed_distill.models import describe
from fed_distill.models.families import Architecture
from fed_distill.pipeline import load_split_and_data
from fed_distill.teachers import (
    architecture_record,
    build_teacher,
    configured_architectures,
    initial_teachers,
    teacher_spec,
)

quiet_flower_env()
log = logging.getLogger("fed_distill.flower")


# ============================================================================ one-shot


def validate_weights(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], who: str
) -> None:
    """An uploaded state dict must have the reference's keys, shapes and dtypes, all finite."""
    check_keys(state, reference, who, "weight")
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


def validate_architecture(metrics: dict[str, Any], arch: Architecture, who: str) -> None:
    """The architecture a client says it trained (``model``, ``model_kwargs`` beside its
    weights) must be the one the server sent it."""
    got = (metrics.get("model"), metrics.get("model_kwargs", {}))
    if got != arch:
        said = "none" if got[0] is None else describe([(str(got[0]), dict(got[1] or {}))])
        raise ProtocolError(
            f"{who}: uploaded a teacher of architecture {said}, expected {describe([arch])}"
        )


def serve_oneshot(grid: Grid, job: dict[str, Any]) -> dict[str, Any]:
    """One-shot FL over Flower: teachers trained on the clients and uploaded once, then the
    same synthesis, distillation and evaluation as ``fed-distill oneshot``."""
    from fed_distill.federated.oneshot import run_oneshot

    cfg = cfg_from_json(job["cfg"])
    extra: dict[str, Any] = {"runner": job["runner"], "flower": flower_summary(job)}

    def train_teachers(cfg) -> list[dict[str, Any]]:
        return flower_train_teachers(grid, job, cfg, extra)

    def collect_stats(cfg, ctx, rnd):  # refit=head: the statistics round
        from fed_distill.federated.flower.server_refit import flower_feature_stats

        return flower_feature_stats(grid, job, cfg, ctx, rnd, extra)

    return run_oneshot(cfg, train_teachers=train_teachers, extra=extra, collect_stats=collect_stats)


def flower_train_teachers(
    grid: Grid, job: dict[str, Any], cfg, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """The train-teachers stage over Flower: each client trains its teacher from the shared
    initial weights and uploads it; the server checks the uploads and writes the teachers of
    those it keeps as ``run_train_teachers`` does. Who was left out, and the original client of
    each kept teacher where some were, go to ``extra``."""
    run_dir = Path(str(cfg.run_dir))
    split, data = load_split_and_data(cfg)
    info = data.info
    mcfg: ModelConfig = as_object(cfg.model, ModelConfig)
    n = split.num_teachers
    archs = configured_architectures(cfg, n)
    inits = initial_teachers(archs, info, cfg.seed)  # as run_train_teachers makes them
    names = [f"client {i}" for i in range(n)]
    train_timeout = float(job["train_timeout"])
    ex = connect(grid, n, names, float(job["wait_nodes_s"]), train_timeout)
    faults = parse_faults(job.get("faults"))
    asks = {
        i: client_message(
            split,
            cl,
            inits[i][1],
            job,
            client=i,
            spec=architecture_record(archs[i]),
            **fault_options(faults, i, 0, train_timeout, forced=True),
        )
        for i, cl in enumerate(split.clients[:n])
    }
    late = late_parties(faults, 0)  # an injected timeout: its deadline is forced, not waited for
    replies, left = ex.ask(ONESHOT_TRAIN, asks, train_timeout, "0", late=late)
    kept, stats, left_out = _check_teachers(replies, left, names, archs, inits, info)
    extra["left_out"] = left_out
    if left_out:
        # The later stages read the teachers and split.json: keep the clients that uploaded
        # (and any server clients), renumbered; results name the left-out originals.
        save_split(split, run_dir / "split_all.json")  # every client, as split
        split.clients = [split.clients[i] for i in kept] + split.clients[n:]
        save_split(split, run_dir / "split.json")
        extra["teacher_clients"] = list(kept)
    kept_archs = {i: archs[i] for i in kept}
    return _save_teachers(run_dir / "teachers", kept, stats, kept_archs, mcfg, info, cfg.seed)


def _check_teachers(
    replies: dict[int, Message],
    left: dict[int, str],
    names: list[str],
    archs: list[Architecture],
    inits: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]],
    info: Any,
) -> tuple[
    dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]],
    dict[int, dict[str, torch.Tensor]],
    list[dict[str, Any]],
]:
    """The uploads that pass the checks (the architecture the client names is the one it was
    sent, weights fit it, metrics; by client), their class statistics, and who was left out
    and why; fails when no teacher is left."""
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
            metrics = json.loads(str(m.content["metrics"]["metrics"]))
            validate_architecture(metrics, archs[i], names[i])
            validate_weights(w, inits[i][1], names[i])
            if st:
                check_class_stats(st, inits[i][0], info.num_classes, names[i])
                stats[i] = st
            kept[i] = (w, metrics)
        except ProtocolError as e:
            say(f"left out: {e}")
            left_out.append({"party": i, "reason": str(e)})
    left_out.sort(key=lambda d: d["party"])
    if not kept:
        raise ProtocolError(
            "every client's teacher was rejected: " + "; ".join(d["reason"] for d in left_out)
        )
    return kept, stats, left_out


def _save_teachers(
    out: Path,
    kept: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]],
    stats: dict[int, dict[str, torch.Tensor]],
    archs: dict[int, Architecture],
    mcfg: ModelConfig,
    info: Any,
    seed: int,
) -> list[dict[str, Any]]:
    """The kept teachers, renumbered 0.., written as ``run_train_teachers`` writes them."""
    spec = teacher_spec(mcfg, info, [archs[i] for i in kept], seed)
    save_json(asdict(spec), out / "teachers.json")
    summary = []
    for j, (i, (w, metrics)) in enumerate(kept.items()):
        model = build_teacher(archs[i], info)
        model.load_state_dict(w)
        metrics["client"] = i
        save_weights(
            model,
            out / f"teacher_{j}.safetensors",
            metadata={"model": archs[i][0], "teacher": str(j)},
        )
        save_json(metrics, out / f"metrics_teacher_{j}.json")
        if i in stats:
            save_class_stats(stats[i], out / STATS_FILE.format(j))
        else:
            remove_file(out / STATS_FILE.format(j))
        say(
            f"teacher {j} (client {i}): val {metrics['best_val_acc']:.4f}, test {metrics['test_acc']:.4f}"
        )
        summary.append(metrics)
    return summary


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
    try:
        serve(grid, json.loads(path.read_text()))
    except BaseException as e:  # the submitting side waits for results.json or this marker
        (path.parent / FAILED_FILE).write_text(f"{type(e).__name__}: {e}\n")
        raise
