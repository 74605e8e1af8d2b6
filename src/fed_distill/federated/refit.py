"""``fed-distill refit``: the statistics round after distillation (``refit=head``).

The server sends the distilled student to the clients once; each returns per-class sums of the
student's penultimate features on its own images (:func:`client_feature_stats`, the protocol
function both runners call; :mod:`fed_distill.feature_stats` has the format); the server checks
every upload, pools them and re-fits the student's head (:mod:`.refit_head`). Written:

* ``feedback/feature_stats_{i}.safetensors``: client i's upload (metadata: the student's digest
  and the round's client-side settings, so an upload for another student is never used);
* ``student/student_refit.safetensors`` and ``student/refit.json`` (settings, fingerprint,
  what the round cost); ``results.json`` gains ``student_refit_acc`` and
  ``class_acc.student_refit`` where a finished ``oneshot`` left one (``student_acc`` stays the
  pure one-shot, data-free student).

Resumable: a finished refit with the same fingerprint is skipped (``force=true`` redoes it);
uploads already in ``feedback/`` for this student and these settings are reused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from fed_distill.artifacts import file_digest, load_json, load_weights, save_json, save_weights
from fed_distill.config import as_object, to_container
from fed_distill.errors import CheckpointError, ConfigError, FedDistillError, ProtocolError
from fed_distill.feature_stats import (
    FEATURE_STATS_FILE,
    FEEDBACK_DIR,
    add_noise,
    check_feature_stats,
    compute_feature_stats,
    feature_width,
    pool,
    read_feature_stats,
    save_feature_stats,
    student_digest,
)
from fed_distill.federated import per_class
from fed_distill.federated.refit_config import RefitConfig
from fed_distill.federated.refit_head import fit_head, refit_head_layer, refit_model
from fed_distill.federated.server_context import ServerContext, server_context, server_seed
from fed_distill.models import build_model
from fed_distill.pipeline import _fingerprint
from fed_distill.train.fit import predict_logits

REFIT_FILE = "student_refit.safetensors"


@dataclass
class Round:
    """What the server sends in the statistics round and what it expects back."""

    student: nn.Module
    model: str  # the student's architecture, as student/metrics.json records it
    model_kwargs: dict[str, Any]
    dim: int  # D, the width of the features described
    want: dict[str, str]  # round_info: the student's digest and the client-side settings


# (cfg, ctx, round) -> {client: statistics}, [{"party": i, "reason": ...}]: how the statistics
# reach the server (in-process below; Flower: flower/server_refit.flower_feature_stats)
Collect = Callable[
    [DictConfig, ServerContext, Round],
    tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, Any]]],
]


def refit_seed(cfg: DictConfig, rcfg: RefitConfig) -> int:
    return server_seed(cfg) if rcfg.seed is None else int(rcfg.seed)


def round_info(cfg: DictConfig, rcfg: RefitConfig, student: nn.Module) -> dict[str, str]:
    """What identifies this round's uploads: the student sent (by content) and the settings
    the clients apply (clip, noise and its seed)."""
    client_side = {"clip": rcfg.clip, "noise": rcfg.noise, "seed": refit_seed(cfg, rcfg)}
    if rcfg.features != "penultimate":  # (so earlier rounds' digests stay as they were)
        client_side["features"] = rcfg.features
    return {"student": student_digest(student), "round": _fingerprint(client_side)}


def client_feature_stats(
    student: nn.Module, data: Any, client: Any, norm: Any, device: Any, rcfg: RefitConfig, seed: int
) -> dict[str, torch.Tensor]:
    """The client's side of the round: the per-class feature sums of ``student`` on all its
    labelled images (train and val parts, as its label counts), noised when ``refit.noise``."""
    from fed_distill.data.partition import client_images

    idx = torch.as_tensor(client.train + client.val, dtype=torch.long)
    images = client_images(client, data.train_x, idx)
    k = data.info.num_classes
    stats = compute_feature_stats(
        student, images, data.train_y[idx], norm, k, device, clip=rcfg.clip, features=rcfg.features
    )
    return add_noise(stats, rcfg.noise, rcfg.clip or 1.0, torch.Generator().manual_seed(seed))


def client_noise_seed(cfg: DictConfig, rcfg: RefitConfig, client: int) -> int:
    return refit_seed(cfg, rcfg) * 1000 + 500 + client


def noise_tolerance(rcfg: RefitConfig, dim: int) -> float:
    """How far from exact a noised upload may be (8 times the noise's spectral norm)."""
    return 0.0 if rcfg.noise == 0 else 16.0 * rcfg.noise * (rcfg.clip or 1.0) ** 2 * math.sqrt(dim)


def check_upload(
    stats: dict[str, torch.Tensor],
    said: dict[str, str | None],
    want: dict[str, str],
    dim: int,
    num_classes: int,
    rcfg: RefitConfig,
    who: str,
) -> None:
    """One client's upload: for this round's student and settings, and well-formed."""
    if said.get("student") != want["student"]:
        raise ProtocolError(
            f"{who}: feature statistics of another student (digest {said.get('student')},"
            f" the student sent is {want['student']})"
        )
    if said.get("round") != want["round"]:
        raise ProtocolError(
            f"{who}: feature statistics made with other refit.features/clip/noise/seed"
        )
    check_feature_stats(stats, dim, num_classes, who, noise_tolerance(rcfg, dim))


def collect_in_process(
    cfg: DictConfig, ctx: ServerContext, rnd: Round
) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """The round on this machine: uploads already in ``feedback/`` for this round are checked
    (all of them first, before any client works) and reused; the other clients compute theirs."""
    rcfg: RefitConfig = as_object(cfg.refit, RefitConfig)
    fb = Path(cfg.run_dir) / FEEDBACK_DIR
    n, k, want = ctx.split.num_teachers, ctx.data.info.num_classes, rnd.want
    stats: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(n):
        path = fb / FEATURE_STATS_FILE.format(i)
        if not path.is_file():
            continue
        who = f"client {i} ({path})"
        try:
            st, said = read_feature_stats(path)
        except CheckpointError as e:
            raise ProtocolError(f"client {i}: {e}; delete it to ask the client again") from None
        if said != want:
            print(f"note: {path} is from an earlier round (another student or settings); redone")
            continue
        check_upload(st, said, want, rnd.dim, k, rcfg, who)
        stats[i] = st
    for i in range(n):
        if i not in stats:
            st = client_feature_stats(
                rnd.student,
                ctx.data,
                ctx.split.clients[i],
                ctx.normalizer,
                ctx.device,
                rcfg,
                client_noise_seed(cfg, rcfg, i),
            )
            save_feature_stats(st, fb / FEATURE_STATS_FILE.format(i), want)
            stats[i] = st
    return stats, []


def load_distilled_student(run_dir: Path, ctx: ServerContext) -> tuple[nn.Module, str, dict]:
    """The student ``train-student`` left in ``run_dir/student/``."""
    out = run_dir / "student"
    if not (out / "metrics.json").is_file() or not (out / "student.safetensors").is_file():
        raise FedDistillError(
            f"no distilled student in {out}; run `fed-distill train-student run_dir={run_dir}`"
            " (or `fed-distill oneshot`) first"
        )
    m = load_json(out / "metrics.json", "student metrics")
    name, kwargs = str(m.get("model") or ctx.spec.model), dict(m.get("model_kwargs") or {})
    info = ctx.data.info
    student = build_model(name, info.num_classes, info.channels, info.image_size, **kwargs)
    load_weights(student, out / "student.safetensors")
    return student.to(ctx.device), name, kwargs


def check_student_fits(
    student: nn.Module, rcfg: RefitConfig, name: str, image_shape: tuple[int, ...]
) -> int:
    """D, the width the round describes; one ConfigError line when the student has no such
    layer or D is wider than ``refit.max_features``."""
    d = feature_width(student, rcfg.features, image_shape)
    if d is None:
        what = "a global average pool" if rcfg.features == "map" else "a Linear head"
        raise ConfigError(
            f"refit.features={rcfg.features} needs a student with {what}; {name} has none"
        )
    if d > rcfg.max_features:
        raise ConfigError(
            f"refit=head: the student {name} has {d} {rcfg.features} features, so each client"
            f" would upload {d * d} numbers per class; refit.max_features={rcfg.max_features}"
            " allows fewer (raise it, use refit.features=penultimate, or a narrower student)"
        )
    return d


def run_refit(
    cfg: DictConfig, collect: Collect | None = None, report: bool = True
) -> dict[str, Any]:
    """``fed-distill refit``: the statistics round on a run folder with a distilled student
    → ``student/student_refit.safetensors``; returns ``{"student_refit": model, "refit": info}``.
    ``collect``: how the uploads arrive (default: the clients on this machine); ``report``:
    evaluate the re-fitted student and add it to a finished run's results.json."""
    rcfg: RefitConfig = as_object(cfg.refit, RefitConfig).validate()
    if rcfg.method == "none":
        raise ConfigError("refit=none: nothing to re-fit; pass refit=head")
    run_dir = Path(cfg.run_dir)
    ctx = server_context(cfg)
    student, name, kwargs = load_distilled_student(run_dir, ctx)
    dim = check_student_fits(student, rcfg, name, ctx.image_shape)
    want = round_info(cfg, rcfg, student)
    settings = {k: v for k, v in to_container(cfg.refit).items() if k != "max_features"}
    fp = _fingerprint({"refit": settings, **want, "split": file_digest(run_dir / "split.json")})
    out = run_dir / "student"
    k = ctx.data.info.num_classes
    done = _finished_refit(out, fp, refit_model(student, rcfg.features, dim, k))
    if done is not None and not cfg.force:
        done["student_refit"] = done["student_refit"].to(ctx.device)
        print(f"student already re-fitted ({out / REFIT_FILE}); force=true to redo")
        if report:
            _update_results(run_dir, ctx, done["student_refit"], done["refit"])
        return done
    t0 = time.perf_counter()
    rnd = Round(student, name, kwargs, dim, want)
    stats, left_out = (collect or collect_in_process)(cfg, ctx, rnd)
    client_s = time.perf_counter() - t0
    if not stats:
        raise ProtocolError("no client returned feature statistics; the head cannot be re-fitted")
    g = pool([stats[i] for i in sorted(stats)])
    upload = next(iter(stats.values()))  # every client's has the same shapes
    refit = refit_model(student, rcfg.features, dim, k)
    t1 = time.perf_counter()
    fit = fit_head(refit_head_layer(refit), g, rcfg, refit_seed(cfg, rcfg))
    info = {
        "method": rcfg.method,
        "features": rcfg.features,
        "clients": sorted(stats),
        "left_out": left_out,
        "feature_dim": dim,
        "upload_floats_per_client": sum(t.numel() for t in upload.values()),
        "upload_bytes_per_client": sum(t.numel() * t.element_size() for t in upload.values()),
        "classes_refitted": fit["classes"],
        "fit_loss": fit["loss"],
        "client_s": client_s,
        "fit_s": time.perf_counter() - t1,
        "fingerprint": fp,
    }
    save_weights(refit, out / REFIT_FILE, metadata={"model": name, "features": rcfg.features})
    save_json(info, out / "refit.json")  # last: with its fingerprint it marks the stage as done
    refit = refit.to(ctx.device)
    if report:
        _update_results(run_dir, ctx, refit, info)
    return {"student_refit": refit, "refit": info}


def _finished_refit(out: Path, fp: str, refit: nn.Module) -> dict[str, Any] | None:
    """The re-fitted student (loaded into ``refit``) a finished round left, else None."""
    if not (out / "refit.json").is_file() or not (out / REFIT_FILE).is_file():
        return None
    info = load_json(out / "refit.json", "refit.json")
    if info.get("fingerprint") != fp:
        return None
    load_weights(refit, out / REFIT_FILE)
    return {"student_refit": refit, "refit": info}


def refit_evaluation(ctx: ServerContext, refit: nn.Module) -> dict[str, Any]:
    """``student_refit_acc`` and its per-class accuracies on the official test set."""
    y = ctx.data.test_y.cpu()
    pred = predict_logits(refit, ctx.data.test_x, ctx.normalizer, ctx.device).argmax(1)
    return {
        "student_refit_acc": per_class.accuracy(pred, y),
        "class_acc_student_refit": per_class.class_accuracy(pred, y, ctx.data.info.num_classes),
    }


def merge_refit(res: dict[str, Any], ev: dict[str, Any], info: dict[str, Any]) -> None:
    """Put the re-fitted student's figures into a results dict (``student_acc`` untouched)."""
    res["student_refit_acc"] = ev["student_refit_acc"]
    res.setdefault("class_acc", {})["student_refit"] = ev["class_acc_student_refit"]
    res["refit"] = {k: v for k, v in info.items() if k != "fingerprint"}


def _update_results(run_dir: Path, ctx: ServerContext, refit: nn.Module, info: dict) -> None:
    """Print the re-fitted student's accuracy; add it to a finished run's results.json."""
    ev = refit_evaluation(ctx, refit)
    print(
        f"student re-fitted from {len(info['clients'])} clients' feature statistics"
        f" ({info['upload_bytes_per_client'] / 1024:.1f} KiB each): test accuracy"
        f" {ev['student_refit_acc']:.4f}"
    )
    path = run_dir / "results.json"
    if path.is_file():
        res = load_json(path, "results.json")
        merge_refit(res, ev, info)
        save_json(res, path)
