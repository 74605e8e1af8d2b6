"""The stages that every protocol shares: load data, split it among clients, train teachers.

Each stage reads its inputs from ``run_dir`` (what earlier stages wrote) and writes its outputs
there, so stages can be run one by one from the CLI or chained by a whole pipeline.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fed_distill.artifacts import (
    load_json,
    load_weights,
    remove_file,
    save_figure,
    save_json,
    save_weights,
)
from fed_distill.class_stats import (
    STATS_FILE,
    compute_class_stats,
    load_class_stats,
    save_class_stats,
)
from fed_distill.config import DatasetConfig, ModelConfig, UploadConfig, as_object, to_container
from fed_distill.data.partition import (
    Split,
    check_split,
    client_images,
    load_split,
    make_split,
    save_split,
    split_kwargs,
)
from fed_distill.data.sources import Dataset, load_dataset, source_options
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, SplitError
from fed_distill.models.families import Architecture
from fed_distill.tables import format_table  # noqa: F401 - the stages' tables; re-exported
from fed_distill.teachers import (  # noqa: F401 - the teacher stage's names, re-exported
    TeacherSpec,
    architecture_record,
    build_teacher,
    configured_architectures,
    initial_teachers,
    load_teachers,
    teacher_spec,
)
from fed_distill.tracking import epoch_logger, log_scalars
from fed_distill.train.fit import TrainConfig, evaluate, fit
from fed_distill.utils import fork_seeded, resolve_device


# ----------------------------------------------------------------------------- data
def dataset_options(ds: DatasetConfig) -> dict[str, Any]:
    """The options that change what a dataset *is* (recorded in split.json)."""
    opts: dict[str, Any] = {}
    accepted = source_options(ds.name)
    if ds.image_size and "image_size" in accepted:
        opts["image_size"] = int(ds.image_size)
    if ds.name == "cifar100" and ds.label != "fine":
        opts["label"] = ds.label
    if ds.path is not None and "path" not in accepted:
        raise ConfigError(
            f"dataset.path is for your own data (dataset=npz or dataset=folder), not"
            f" dataset={ds.name}; drop it (dataset.data_dir=DIR says where built-in files are)"
        )
    if ds.path is not None:
        opts["path"] = str(Path(ds.path).expanduser().resolve())
    return opts


def load_data(ds: DatasetConfig, options: dict[str, Any] | None = None) -> Dataset:
    opts = dataset_options(ds) if options is None else options
    return load_dataset(ds.name, data_dir=ds.data_dir, download=ds.download, **opts)


def load_split_and_data(cfg: DictConfig) -> tuple[Split, Dataset]:
    """``run_dir/split.json`` and the dataset it was made for (checked to match)."""
    run_dir = Path(cfg.run_dir)
    split = load_split(run_dir / "split.json")
    ds_cfg: DatasetConfig = as_object(cfg.dataset, DatasetConfig)
    if cfg.get("_explicit_dataset") and ds_cfg.name != split.dataset:
        raise SplitError(
            f"{run_dir}/split.json was made for dataset '{split.dataset}', but dataset={ds_cfg.name}"
            " was given; drop the override or rerun `fed-distill split`"
        )
    ds_cfg.name = split.dataset
    data = load_data(ds_cfg, split.dataset_options)
    check_split(split, data.info.name, data.train_y, data.test_y, data.info.num_classes)
    return split, data


# ----------------------------------------------------------------------------- split
def run_split(cfg: DictConfig) -> Split:
    """``fed-distill split``: write ``run_dir/split.json`` and a PNG of the label distribution."""
    ds_cfg: DatasetConfig = as_object(cfg.dataset, DatasetConfig)
    data = load_data(ds_cfg)
    split = make_split(
        data.info.name,
        data.train_y,
        data.test_y,
        data.info.num_classes,
        seed=cfg.seed,
        dataset_options=dataset_options(ds_cfg),
        **split_kwargs(to_container(cfg.split)),
    )
    run_dir = Path(cfg.run_dir)
    save_split(split, run_dir / "split.json")
    plot_label_distribution(split, data.info.class_names, run_dir / "split.png")
    print(
        f"split {data.info.name} ({len(data.train_y)} train / {len(data.test_y)} test) among"
        f" {split.num_clients} clients with '{split.strategy}' {_short_params(split.params)}"
    )
    print(
        format_table(
            ["client", "train", "val", "test", "classes (>0)"],
            [
                [
                    i,
                    len(c.train),
                    len(c.val),
                    len(c.test),
                    sum(1 for n in c.train_class_counts if n),
                ]
                for i, c in enumerate(split.clients)
            ],
        )
    )
    print(f"wrote {run_dir / 'split.json'} and {run_dir / 'split.png'}")
    return split


def _short_params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in params.items() if k not in ("client_classes", "classes")
    )


def plot_label_distribution(
    split: Split, class_names: list[str] | tuple[str, ...], path: Path
) -> None:
    """Stacked bars: samples of each class held by each client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = split.class_counts()
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * split.num_clients + 2), 3.5))
    bottom = np.zeros(split.num_clients)
    cmap = plt.get_cmap("tab20" if split.num_classes > 10 else "tab10")
    for k in range(split.num_classes):
        label = class_names[k] if split.num_classes <= 20 else None
        ax.bar(
            range(split.num_clients),
            counts[:, k],
            bottom=bottom,
            color=cmap(k % cmap.N),
            label=label,
        )
        bottom += counts[:, k]
    ax.set_xlabel("client")
    ax.set_ylabel("train samples")
    ax.set_xticks(range(split.num_clients))
    ax.set_title(f"{split.dataset}: {split.strategy} {_short_params(split.params)}", fontsize=9)
    if split.num_classes <= 20:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- teachers
def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where resumable mid-stage checkpoints live (deleted as each unit of work finishes)."""
    return Path(run_dir) / "checkpoints"


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_train_teachers(cfg: DictConfig) -> list[dict[str, Any]]:
    """``fed-distill train-teachers``: one teacher per client, all from one seed-initialised model."""
    run_dir = Path(cfg.run_dir)
    split, data = load_split_and_data(cfg)
    info = data.info
    device = resolve_device(cfg.device)
    tcfg: TrainConfig = as_object(cfg.train, TrainConfig)
    mcfg: ModelConfig = as_object(cfg.model, ModelConfig)
    hflip = info.hflip if tcfg.hflip is None else tcfg.hflip
    norm = Normalizer(info.mean, info.std)
    upload: UploadConfig = as_object(cfg.upload, UploadConfig)

    archs = configured_architectures(cfg, split.num_teachers)
    inits = initial_teachers(archs, info, cfg.seed)
    tcfg.validate()  # a bad train.* value fails before teachers.json (also from Python)
    spec = teacher_spec(mcfg, info, archs, cfg.seed)
    out = run_dir / "teachers"
    fp = _teachers_fingerprint(spec, tcfg, split)
    save_json(asdict(spec), out / "teachers.json")
    if not upload.class_stats:  # the server must not find statistics of an earlier run
        for i in range(split.num_teachers):
            remove_file(out / STATS_FILE.format(i))

    summary = []
    t_start = time.perf_counter()
    for i, c in enumerate(split.clients[: split.num_teachers]):
        wpath, mpath = out / f"teacher_{i}.safetensors", out / f"metrics_teacher_{i}.json"
        ckpt = checkpoint_dir(run_dir) / f"teacher_{i}.safetensors"
        if cfg.force:
            remove_file(ckpt)  # force=true redoes the teacher from scratch
        else:
            old = _reused_teacher(i, c, fp, out, archs[i], data, norm, device, upload)
            if old is not None:
                summary.append(old)
                continue
        model = build_teacher(archs[i], info)
        model.load_state_dict(inits[i][1])
        metrics = train_teacher(
            model,
            data,
            c,
            tcfg,
            norm,
            hflip=hflip,
            device=device,
            seed=cfg.seed * 1000 + i,
            desc=f"teacher {i + 1}/{split.num_teachers}",
            log_as=f"teacher_{i}",
            progress=cfg.progress,
            checkpoint_path=ckpt,
            checkpoint_meta={"fingerprint": fp, "teacher": i},
        )
        metrics.update(fingerprint=fp, **architecture_record(archs[i]))
        if upload.class_stats:
            metrics["class_stats_s"] = _write_class_stats(
                model, data, c, norm, device, out, i, upload
            )
        save_weights(model, wpath, metadata={"model": archs[i][0], "teacher": str(i)})
        save_json(metrics, mpath)
        remove_file(ckpt)  # the finished teacher is on disk: its checkpoint has done its job
        print(
            f"teacher {i}: {archs[i][0]}, {len(c.train)} train samples, best epoch {metrics['best_epoch'] + 1}, val"
            f" {metrics['best_val_acc']:.4f}, local test {metrics['local_test_acc']:.4f}, test {metrics['test_acc']:.4f}"
            f" ({metrics['train_time_s']:.1f}s)"
        )
        summary.append(metrics)
    _print_teachers(summary)
    print(f"{split.num_teachers} teachers in {out} ({time.perf_counter() - t_start:.1f}s)")
    return summary


def _reused_teacher(
    i: int,
    client: Any,
    fp: str,
    out: Path,
    arch: Architecture,
    data: Dataset,
    norm: Normalizer,
    device: torch.device,
    upload: UploadConfig,
) -> dict[str, Any] | None:
    """Teacher ``i``'s metrics where a previous run trained it with the same fingerprint (its
    class statistics written now if asked for and missing), else None."""
    wpath, mpath = out / f"teacher_{i}.safetensors", out / f"metrics_teacher_{i}.json"
    if not (wpath.exists() and mpath.exists()):
        return None
    old = load_json(mpath, "teacher metrics")
    if old.get("fingerprint") != fp:
        return None
    print(
        f"teacher {i}: already trained (val {old['best_val_acc']:.4f}, test {old['test_acc']:.4f});"
        " force=true retrains"
    )
    if "model" not in old:  # a teacher of a run before per-client architectures
        old.update(architecture_record(arch))
        save_json(old, mpath)
    if upload.class_stats and not (out / STATS_FILE.format(i)).is_file():
        model = build_teacher(arch, data.info)
        load_weights(model, wpath)
        _write_class_stats(model.to(device), data, client, norm, device, out, i, upload)
    return old


def _teachers_fingerprint(spec: TeacherSpec, tcfg: TrainConfig, split: Split) -> str:
    """A teacher is reused only when everything that shaped it is unchanged."""
    shaped = asdict(spec)
    if (
        shaped["models"] is not None
        and not spec.mixed
        and spec.architectures()[0]
        == (
            spec.model,
            spec.model_kwargs,
        )
    ):
        shaped.pop("models")  # homogeneous: the fingerprint of before per-client architectures
    return _fingerprint(
        {
            "spec": shaped,
            # how often checkpoints are written does not change the teacher
            "train": {k: v for k, v in asdict(tcfg).items() if k != "checkpoint_every"},
            "split": split.label_digest,
            "split_seed": split.seed,
            "clients": [[c.train, c.val] for c in split.clients[: split.num_teachers]],
            # what makes the clients' images their own (split=noise); only then, so the
            # fingerprints of splits without it stay as they were
            **(
                {"features": [c.features for c in split.clients[: split.num_teachers]]}
                if any(c.features for c in split.clients)
                else {}
            ),
        }
    )


def _print_teachers(summary: list[dict[str, Any]]) -> None:
    print(
        format_table(
            ["teacher", "model", "train", "val acc", "local test", "test acc"],
            [
                [
                    i,
                    m.get("model", "?"),
                    m["num_train"],
                    f"{m['best_val_acc']:.4f}",
                    f"{m['local_test_acc']:.4f}",
                    f"{m['test_acc']:.4f}",
                ]
                for i, m in enumerate(summary)
            ],
        )
    )


def client_class_stats(
    model: torch.nn.Module,
    data: Dataset,
    client: Any,
    norm: Normalizer,
    device: torch.device | str,
    features: bool,
    pixels: bool = False,
) -> dict[str, torch.Tensor]:
    """The client's side of the upload: per-class statistics of its teacher on all its labelled
    images (train and val parts, those its label counts describe)."""
    idx = torch.as_tensor(client.train + client.val, dtype=torch.long)
    return compute_class_stats(
        model,
        client_images(client, data.train_x, idx),
        data.train_y[idx],
        norm,
        data.info.num_classes,
        device,
        features=features,
        pixels=pixels,
    )


def _write_class_stats(
    model: torch.nn.Module,
    data: Dataset,
    client: Any,
    norm: Normalizer,
    device: torch.device,
    out: Path,
    i: int,
    upload: UploadConfig,
) -> float:
    """Teacher ``i``'s class statistics (:func:`client_class_stats`) →
    ``out/class_stats_{i}.safetensors``; returns the seconds it took."""
    t0 = time.perf_counter()
    stats = client_class_stats(model, data, client, norm, device, upload.features, upload.pixels)
    save_class_stats(stats, out / STATS_FILE.format(i))
    return time.perf_counter() - t0


def load_teacher_class_stats(
    run_dir: str | Path, teachers: list[torch.nn.Module], num_classes: int
) -> list[dict[str, torch.Tensor]] | None:
    """The class statistics uploaded with the teachers of ``run_dir`` (checked against each
    teacher), or None with a one-line note where some teacher has none (a run folder from
    before they existed, or upload.class_stats=false): synthesis then uses global statistics."""
    tdir = Path(run_dir) / "teachers"
    stats = [
        load_class_stats(tdir / STATS_FILE.format(i), t, num_classes)
        for i, t in enumerate(teachers)
    ]
    if any(s is None for s in stats):
        missing = [i for i, s in enumerate(stats) if s is None]
        print(
            f"note: no class statistics for teacher(s) {missing} in {tdir}; synthesis matches"
            " each client's global BN statistics (retrain with upload.class_stats=true for them)"
        )
        return None
    return stats  # type: ignore[return-value]


def local_test_accuracy(
    model: torch.nn.Module,
    data: Dataset,
    client: Any,
    norm: Normalizer,
    device: torch.device | str,
) -> float:
    """``model``'s accuracy on the client's local test part, as the client holds it."""
    te = torch.as_tensor(client.test, dtype=torch.long)
    return evaluate(
        model, client_images(client, data.test_x, te, "test"), data.test_y[te], norm, device
    )


def held_local_accuracy(
    accs: list[float], teachers: list[torch.nn.Module], split: Split, data: Dataset, *on: Any
) -> None:
    """In ``accs`` (each teacher's accuracy on its client's local test part, taken from the
    official test images), those of clients whose images carry a feature skew (``split=noise``)
    measured on the part as the client holds it instead; ``on``: normaliser, device."""
    for i, c in enumerate(split.clients[: len(teachers)]):
        if c.features:
            accs[i] = local_test_accuracy(teachers[i], data, c, *on)


def train_teacher(
    model: torch.nn.Module,
    data: Dataset,
    client: Any,
    tcfg: TrainConfig,
    norm: Normalizer,
    *,
    hflip: bool,
    device: torch.device | str,
    seed: int,
    desc: str = "teacher",
    log_as: str | None = None,
    progress: bool = False,
    checkpoint_path: str | Path | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One client's local training (what a client computes in one-shot FL): fit ``model`` in
    place on the client's train part, select on its val part; return the teacher's metrics.
    Runs under its own global-RNG stream (``seed``; dropout), so skipping or resuming one
    teacher never changes another, and a Flower client computes exactly what in-process does;
    with ``checkpoint_path`` it checkpoints every ``tcfg.checkpoint_every`` epochs and resumes."""
    tr, va, te = (
        torch.as_tensor(v, dtype=torch.long) for v in (client.train, client.val, client.test)
    )
    t0 = time.perf_counter()
    log = epoch_logger(log_as) if log_as else None  # logger=tensorboard: a curve per epoch
    with fork_seeded(seed, device):
        res = fit(
            model,
            client_images(client, data.train_x, tr),
            data.train_y[tr],
            client_images(client, data.train_x, va),
            data.train_y[va],
            tcfg,
            norm,
            hflip=hflip,
            device=device,
            seed=seed,
            desc=desc,
            progress=progress,
            checkpoint_path=checkpoint_path,
            checkpoint_every=tcfg.checkpoint_every,
            checkpoint_meta=checkpoint_meta,
            on_epoch=log,
        )
    metrics = {
        **res.history,
        "best_epoch": res.best_epoch,
        "best_val_acc": res.best_val_acc,
        "local_test_acc": local_test_accuracy(model, data, client, norm, device),
        "test_acc": evaluate(model, data.test_x, data.test_y, norm, device),
        "num_train": len(client.train),
        "train_class_counts": client.train_class_counts,
        "train_time_s": time.perf_counter() - t0,
    }
    if log_as:  # the kept checkpoint's accuracies, at its epoch
        kept = {k: metrics[k] for k in ("local_test_acc", "test_acc")}
        log_scalars(log_as, kept, res.best_epoch + 1)
    return metrics
