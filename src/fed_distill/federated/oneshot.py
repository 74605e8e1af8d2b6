"""One-shot federated learning by data-free distillation: the stages and the whole pipeline.

split → train-teachers (each client once) → teachers uploaded → generate-initial (synthetic
batches from the teachers) → train-student (distil on a growing synthetic dataset) → evaluate the
teachers, their ensemble, one-shot FedAvg and the student on the official test set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from fed_distill.artifacts import (
    file_digest,
    load_json,
    load_tensors,
    load_weights,
    remove_file,
    save_checkpoint,
    save_json,
    save_tensors,
    save_weights,
    tensors_digest,
)
from fed_distill.config import as_object, to_container
from fed_distill.data.partition import clients_images
from fed_distill.ensemble import class_shares
from fed_distill.errors import FedDistillError
from fed_distill.federated import per_class
from fed_distill.federated.baselines import fedavg_state
from fed_distill.federated.oneshot_summary import print_summary
from fed_distill.federated.server_context import (  # noqa: F401 - re-exported
    ServerContext,
    server_context,
    server_seed,
    uses_class_stats,
)
from fed_distill.models import build_model
from fed_distill.pipeline import (
    _fingerprint,
    checkpoint_dir,
    held_local_accuracy,
    run_split,
    run_train_teachers,
)
from fed_distill.synthesis import build_synthesizer, options_from_node
from fed_distill.synthesis.options import legacy_settings
from fed_distill.tracking import epoch_logger, log_scalars
from fed_distill.train.fit import load_resumable
from fed_distill.train.student import StudentResult, SyntheticPool, distill
from fed_distill.train.student_config import StudentConfig
from fed_distill.utils import seed_everything

# Why one-shot FedAvg has no number when the clients' architectures differ.
FEDAVG_MIXED_NOTE = "the teachers' architectures differ, their weights cannot be averaged"
MAX_VAL = 2000  # validation images evaluated per student epoch (diagnostic only)


def _inputs_digest(cfg: DictConfig, ctx: ServerContext) -> dict[str, Any]:
    """What the server's stages depend on besides their own config: the split and the uploaded
    teachers (by content), so a retrained teacher invalidates the synthetic data and student."""
    run_dir = Path(cfg.run_dir)
    out = {
        "split": file_digest(run_dir / "split.json"),
        "teachers": [tensors_digest(t.state_dict()) for t in ctx.teachers],
        "seed": server_seed(cfg),
    }
    if ctx.class_stats is not None:  # only then: older runs keep their fingerprints
        out["class_stats"] = [tensors_digest(s) for s in ctx.class_stats]
    return out


def _fingerprint_settings(node: DictConfig) -> dict[str, Any]:
    """A stage's settings for its fingerprint, without ``checkpoint_every`` (how often a stage
    saves, not what it makes) and ``student.seed``: the seed the server uses (:func:`server_seed`) is in every fingerprint already, so ``student.seed`` equal
    to ``seed`` redoes nothing and folders made before the key keep their fingerprints."""
    return {k: v for k, v in to_container(node).items() if k not in ("checkpoint_every", "seed")}


def _synthesizer(cfg: DictConfig, ctx: ServerContext, seed: int):
    scfg = options_from_node(cfg.synthesis)
    return build_synthesizer(
        scfg,
        ctx.teachers,
        ctx.class_counts,
        ctx.image_shape,
        ctx.normalizer,
        ctx.hflip,
        ctx.device,
        seed,
        data_dir=cfg.dataset.get("data_dir"),
        class_stats=ctx.class_stats,
    )


def run_generate_initial(cfg: DictConfig) -> SyntheticPool:
    """``fed-distill generate-initial``: ``student.initial_batches`` non-adaptive synthetic batches
    from the uploaded teachers → ``run_dir/student/initial.pt``.

    Skipped when ``initial.json`` records the same settings and teachers (``force=true`` redoes
    it); interrupted, it continues from the last batch in ``run_dir/checkpoints/initial.safetensors``.
    """
    scfg: StudentConfig = as_object(cfg.student, StudentConfig).validate()
    ctx = server_context(cfg, class_stats=uses_class_stats(cfg))
    out = Path(cfg.run_dir) / "student"
    ckpt_path = checkpoint_dir(cfg.run_dir) / "initial.safetensors"
    fp = _fingerprint(
        {
            "synthesis": legacy_settings(_fingerprint_settings(cfg.synthesis)),
            "initial_batches": scfg.initial_batches,
            **_inputs_digest(cfg, ctx),
        }
    )
    if cfg.force:
        remove_file(ckpt_path)
    elif (out / "initial.json").is_file():
        done = load_json(out / "initial.json", "initial.json")
        if done.get("fingerprint") == fp and (
            done.get("batches") == 0 or (out / "initial.pt").is_file()
        ):
            print(
                f"initial batches already generated ({done.get('images')} images in"
                f" {out / 'initial.pt'}); force=true to redo"
            )
            if not done.get("batches"):
                return SyntheticPool()
            return SyntheticPool.from_state(
                load_tensors(out / "initial.pt", "initial synthetic batches"),
                ctx.image_shape,
                ctx.data.info.num_classes,
            )
    seed_everything(server_seed(cfg))
    synth = _synthesizer(cfg, ctx, seed=server_seed(cfg))
    pool = SyntheticPool()
    seconds = 0.0
    every = scfg.checkpoint_every
    try:
        synth.state_dict()
    except NotImplementedError as e:
        print(f"generate-initial: no checkpoints ({e})")
        every = 0
    meta = {"fingerprint": fp}
    ckpt = load_resumable(ckpt_path if every > 0 else None, meta, "generate-initial")
    if ckpt is not None:
        synth.load_state_dict(ckpt["synthesizer"])
        pool = SyntheticPool.from_state(ckpt["pool"], ctx.image_shape, ctx.data.info.num_classes)
        seconds = ckpt["seconds"]
        print(
            f"generate-initial: resuming after batch {len(pool.labels)}/{scfg.initial_batches}"
            f" (checkpoint {ckpt_path})"
        )
    from fed_distill.utils import progress_bar

    for _ in progress_bar(
        range(len(pool.labels), scfg.initial_batches),
        desc="initial batches",
        enabled=cfg.progress,
    ):
        t0 = time.perf_counter()
        batch = synth.synthesize(None)
        dt = time.perf_counter() - t0
        seconds += dt
        pool.append(batch)
        log_scalars("synthesis", _batch_scalars(batch, dt), len(pool.labels))
        print(
            f"initial batch {len(pool.labels)}/{scfg.initial_batches}: teachers {batch.teacher_ids}, "
            f"teacher accuracy on it {batch.stats.get('teacher_acc', float('nan')):.3f}, "
            f"{batch.stats.get('seconds', float('nan')):.1f}s"
        )
        n = len(pool.labels)
        if every > 0 and n % every == 0 and n < scfg.initial_batches:
            save_checkpoint(
                {
                    "meta": meta,
                    "synthesizer": synth.state_dict(),
                    "pool": pool.state(),
                    "seconds": seconds,
                },
                ckpt_path,
            )
    if len(pool):
        save_tensors(pool.state(), out / "initial.pt")
    save_json(
        {
            "batches": len(pool.labels),
            "images": len(pool),
            "seconds": seconds,
            "images_per_s": len(pool) / seconds if seconds > 0 else None,
            "fingerprint": fp,
        },
        out / "initial.json",
    )
    remove_file(ckpt_path)
    print(f"{len(pool)} initial synthetic images in {seconds:.1f}s -> {out / 'initial.pt'}")
    return pool


def _batch_scalars(batch: Any, seconds: float) -> dict[str, float]:
    return {"initial_batch_s": seconds, "initial_teacher_acc": batch.stats.get("teacher_acc")}


def run_train_student(cfg: DictConfig) -> dict[str, Any]:
    """``fed-distill train-student``: distil the teachers into a student on a growing synthetic
    dataset (starting from ``student/initial.pt``) → ``run_dir/student/``.

    Skipped when ``student/metrics.json`` records the same settings, teachers and initial batches
    (``force=true`` redoes it); interrupted, it continues from the last checkpoint in
    ``run_dir/checkpoints/student.safetensors``.
    """
    scfg: StudentConfig = as_object(cfg.student, StudentConfig).validate()
    ctx = server_context(cfg, class_stats=uses_class_stats(cfg))
    run_dir = Path(cfg.run_dir)
    out = run_dir / "student"
    info = ctx.data.info
    if scfg.initial_batches > 0 and not (out / "initial.pt").is_file():
        raise FedDistillError(
            f"no initial synthetic batches in {out}; run `fed-distill generate-initial"
            f" run_dir={run_dir}` first"
        )
    name = scfg.model or ctx.spec.model
    kwargs = dict(scfg.model_kwargs) if scfg.model else dict(ctx.spec.model_kwargs)
    ckpt_path = checkpoint_dir(run_dir) / "student.safetensors"
    fp = _student_fingerprint(cfg, scfg, ctx, out)
    if cfg.force:
        remove_file(ckpt_path)
    else:
        done = _finished_student(out, fp, name, kwargs, ctx)
        if done is not None:
            acc = done["result"].metrics["test_acc"][-1]
            print(
                f"student already trained (test accuracy {acc:.4f}, {out / 'student.safetensors'});"
                " force=true to redo"
            )
            return done
    pool = _initial_pool(scfg, ctx, out)
    student = _new_student(cfg, scfg, ctx, name, kwargs)
    # A different stream from generate-initial, so new batches are not copies of initial ones.
    synth = _synthesizer(cfg, ctx, seed=server_seed(cfg) + 7919)
    val = _validation_sample(ctx)
    res = distill(
        student,
        ctx.teachers,
        synth,
        pool,
        scfg,
        normalizer=ctx.normalizer,
        hflip=ctx.hflip,
        device=ctx.device,
        seed=server_seed(cfg),
        test=(ctx.data.test_x, ctx.data.test_y),
        val=val,
        server_data=_server_data(scfg, ctx),
        num_classes=info.num_classes,
        shares=class_shares(ctx.class_counts),
        progress=cfg.progress,
        on_epoch=epoch_logger("student"),  # logger=tensorboard: a curve per epoch
        checkpoint_path=ckpt_path,
        checkpoint_every=scfg.checkpoint_every,
        checkpoint_meta={"fingerprint": fp},
    )
    _save_student(out, student, pool, res, name, kwargs, fp)
    remove_file(ckpt_path)
    acc = res.metrics["test_acc"][-1]
    print(
        f"student ({name}): test accuracy {acc:.4f} after {scfg.epochs} epochs on {len(pool)} synthetic images"
    )
    return {"student": student, "result": res, "pool": pool}


def _student_fingerprint(
    cfg: DictConfig, scfg: StudentConfig, ctx: ServerContext, out: Path
) -> str:
    """What the student depends on: its and the synthesis settings (not how often they are
    checkpointed), the initial batches by content, the split and the teachers."""
    return _fingerprint(
        {
            "student": _fingerprint_settings(cfg.student),
            "synthesis": legacy_settings(_fingerprint_settings(cfg.synthesis)),
            "initial": (
                tensors_digest(load_tensors(out / "initial.pt", "initial synthetic batches"))
                if scfg.initial_batches > 0
                else None
            ),
            **_inputs_digest(cfg, ctx),
        }
    )


def _initial_pool(scfg: StudentConfig, ctx: ServerContext, out: Path) -> SyntheticPool:
    """The pool the student starts from: generate-initial's batches, or none."""
    if scfg.initial_batches == 0:
        return SyntheticPool()
    return SyntheticPool.from_state(
        load_tensors(out / "initial.pt", "initial synthetic batches"),
        ctx.image_shape,
        ctx.data.info.num_classes,
    )


def _new_student(
    cfg: DictConfig, scfg: StudentConfig, ctx: ServerContext, name: str, kwargs: dict[str, Any]
) -> nn.Module:
    """The student before distillation: seeded random weights, or one-shot FedAvg's."""
    info = ctx.data.info
    seed_everything(server_seed(cfg) + 1)
    student = build_model(name, info.num_classes, info.channels, info.image_size, **kwargs)
    if scfg.init == "fedavg":
        if ctx.spec.mixed:
            # Presets set init=fedavg (student=generator); with mixed teachers there is no
            # average to start from, so the run goes on from the seeded random weights.
            print(f"note: student.init=fedavg ignored: {FEDAVG_MIXED_NOTE}; random init")
            return student
        arch = ctx.spec.architectures()[0]
        if (name, kwargs) != arch:
            raise FedDistillError(
                f"student.init=fedavg needs the teachers' architecture ({arch[0]}), but"
                f" the student is {name}; use student.init=random"
            )
        student.load_state_dict(fedavg_model(ctx).state_dict())
    return student


def _validation_sample(ctx: ServerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``MAX_VAL`` of the clients' validation images (a fixed draw), for the diagnostic
    validation accuracy per student epoch."""
    val_idx = torch.as_tensor([i for c in ctx.split.clients for i in c.val], dtype=torch.long)
    val_idx = val_idx[
        torch.randperm(len(val_idx), generator=torch.Generator().manual_seed(0))[:MAX_VAL]
    ]
    return ctx.data.train_x[val_idx], ctx.data.train_y[val_idx]


def _server_data(
    scfg: StudentConfig, ctx: ServerContext
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server clients' real images (``student.server_data``), else None."""
    if not scfg.server_data:
        return None
    idx = [i for c in ctx.split.clients[ctx.split.num_teachers :] for i in c.train + c.val]
    if not idx:
        raise FedDistillError(
            "student.server_data=true but the split has no server clients;"
            " split again with split.server_clients=1"
        )
    t = torch.as_tensor(idx, dtype=torch.long)
    print(f"server holds {len(idx)} real images of its own")
    x = clients_images(ctx.split.clients[ctx.split.num_teachers :], ctx.data.train_x)  # as held
    return x, ctx.data.train_y[t]


def _save_student(
    out: Path,
    student: nn.Module,
    pool: SyntheticPool,
    res: StudentResult,
    name: str,
    kwargs: dict[str, Any],
    fp: str,
) -> None:
    save_weights(student, out / "student.safetensors", metadata={"model": name})
    save_tensors(pool.state(), out / "dataset.pt")
    for t, d in res.di_metrics.items():
        save_json(d, out / f"di_metrics_teacher_{t}.json")
    # metrics.json last: with its fingerprint it marks the stage as finished
    save_json(
        {
            **res.metrics,
            "model": name,
            "model_kwargs": kwargs,
            "synthesis_seconds": res.synthesis_seconds,
            "synthesized_images": res.synthesized_images,
            "fingerprint": fp,
        },
        out / "metrics.json",
    )


def _finished_student(
    out: Path, fp: str, name: str, kwargs: dict[str, Any], ctx: ServerContext
) -> dict[str, Any] | None:
    """The student a previous run finished with the same fingerprint, else None."""
    files = [out / f for f in ("metrics.json", "student.safetensors", "dataset.pt")]
    if not all(f.is_file() for f in files):
        return None
    m = load_json(out / "metrics.json", "student metrics")
    if m.get("fingerprint") != fp:
        return None
    info = ctx.data.info
    student = build_model(name, info.num_classes, info.channels, info.image_size, **kwargs)
    load_weights(student, out / "student.safetensors")
    pool = SyntheticPool.from_state(
        load_tensors(out / "dataset.pt", "synthetic dataset"), ctx.image_shape, info.num_classes
    )
    res = StudentResult(
        metrics={k: v for k, v in m.items() if isinstance(v, list)},
        synthesis_seconds=float(m.get("synthesis_seconds") or 0.0),
        synthesized_images=int(m.get("synthesized_images") or 0),
    )
    return {"student": student.to(ctx.device), "result": res, "pool": pool}


def fedavg_model(ctx: ServerContext) -> nn.Module:
    """One-shot FedAvg: the teachers' weights averaged by their clients' data sizes.
    Meaningful only for one architecture from one shared initialisation, which train-teachers
    guarantees (teachers.json records both); undefined for mixed architectures."""
    if ctx.spec.mixed:
        raise FedDistillError(f"one-shot FedAvg is not applicable: {FEDAVG_MIXED_NOTE}")
    sizes = [len(c.train) + len(c.val) for c in ctx.split.clients[: ctx.split.num_teachers]]
    name, kwargs = ctx.spec.architectures()[0]
    avg = build_model(
        name, ctx.spec.num_classes, ctx.spec.in_channels, ctx.spec.image_size, **kwargs
    )
    avg.load_state_dict(fedavg_state([t.state_dict() for t in ctx.teachers], sizes))
    return avg


def evaluate_oneshot(
    cfg: DictConfig,
    ctx: ServerContext,
    student: nn.Module | None,
    pool: SyntheticPool | None = None,
) -> dict[str, Any]:
    """Teachers (local and official test), ensemble, one-shot FedAvg and the student, overall and
    per class (one forward pass each, :mod:`per_class`); the final ``pool``'s per-class agreement."""
    shares = class_shares(ctx.class_counts)
    method = cfg.student.ensemble
    local = [c.test for c in ctx.split.clients[: len(ctx.teachers)]]
    fedavg = None if ctx.spec.mixed else fedavg_model(ctx)
    test = (ctx.data.test_x, ctx.data.test_y, ctx.normalizer, ctx.device)
    out = per_class.evaluate_on_test(ctx.teachers, local, fedavg, student, *test, method, shares)
    held_local_accuracy(out["teacher_local_acc"], ctx.teachers, ctx.split, ctx.data, *test[2:])
    out["class_names"] = list(ctx.data.info.class_names)
    if ctx.spec.mixed:
        out["fedavg_note"] = f"not applicable: {FEDAVG_MIXED_NOTE}"
    if pool is not None and len(pool):
        x, y = pool.tensors()
        out["pool_agreement"] = per_class.pool_agreement(
            ctx.teachers, x, y, method, shares, ctx.device
        )
    return out


def run_oneshot(
    cfg: DictConfig,
    train_teachers: Callable[[DictConfig], Any] | None = None,
    extra: dict[str, Any] | None = None,
    collect_stats: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """``fed-distill oneshot``: split → teachers → synthesis → student, with the baselines; writes
    ``run_dir/results.json`` and prints a summary table.

    ``train_teachers`` replaces the in-process teacher stage (the Flower runner has the clients
    train and upload them), ``collect_stats`` the in-process statistics round (``refit=head``,
    :mod:`.refit`); ``extra`` keys are added to results.json."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def stage(name: str, fn):
        s = time.perf_counter()
        print(f"== {name}")
        r = fn(cfg)
        times[name] = time.perf_counter() - s
        return r

    stage("split", run_split)
    stage("train-teachers", train_teachers or run_train_teachers)
    stage("generate-initial", run_generate_initial)
    trained = stage("train-student", run_train_student)
    refit = None
    if cfg.refit.method != "none":  # the statistics round (refit=head): one more message each
        from fed_distill.federated.refit import run_refit

        refit = stage("refit", lambda c: run_refit(c, collect=collect_stats, report=False))
    s = time.perf_counter()
    ctx = server_context(cfg)
    res = evaluate_oneshot(cfg, ctx, trained["student"], trained["pool"])
    if refit is not None:
        from fed_distill.federated.refit import merge_refit, refit_evaluation

        merge_refit(res, refit_evaluation(ctx, refit["student_refit"]), refit["refit"])
    times["evaluate"] = time.perf_counter() - s
    sres = trained["result"]
    initial = load_json(Path(cfg.run_dir) / "student" / "initial.json", "initial.json")
    synth_s = sres.synthesis_seconds + float(initial.get("seconds") or 0.0)
    synth_n = sres.synthesized_images + int(initial.get("images") or 0)
    res.update(
        {
            "student_curve": {
                "test_acc": sres.metrics["test_acc"],
                "elapsed_s": sres.metrics["elapsed_s"],
                "synthesis_s": sres.metrics["synthesis_s"],
                # what DENSE's and Co-Boosting's papers report; a data-free server cannot
                # make this choice (student_acc is the last student)
                "best_test_acc_selected_on_test": max(
                    (a for a in sres.metrics["test_acc"] if a == a), default=None
                ),
            },
            "synthetic_images": synth_n,
            "synthesis_s": synth_s,
            "synthesis_images_per_s": synth_n / synth_s if synth_s > 0 else None,
            "stage_times_s": times,
            "wall_time_s": time.perf_counter() - t0,
            "config": {k: v for k, v in to_container(cfg).items() if not str(k).startswith("_")},
            **(extra or {}),
        }
    )
    save_json(res, Path(cfg.run_dir) / "results.json")
    print_summary(res)
    return res
