"""The report's figures: matplotlib plots written as PNG files, and image helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.artifacts import save_figure
from fed_distill.report.common import _f, _secs

MAX_GRID_COLS = 10  # synthetic images per class in the grid
MAX_GRID_ROWS = 20  # classes in the grid (more are sampled evenly)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _class_names(dataset: str, options: dict[str, Any], num_classes: int) -> list[str]:
    try:
        from fed_distill.data.sources import dataset_info

        names = list(dataset_info(dataset, **options).class_names)
        if len(names) == num_classes:
            return names
    except Exception:  # noqa: BLE001 - names are cosmetic; fall back to numbers
        pass
    return [str(k) for k in range(num_classes)]


def plot_label_distribution(
    counts: np.ndarray, class_names: Sequence[str], title: str, path: Path, xlabel: str = "client"
) -> None:
    """Stacked bars (samples of each class per client), or a heat map for many clients."""
    plt = _plt()
    n_clients, n_classes = counts.shape
    if n_clients > 30 or n_classes > 20:
        fig, ax = plt.subplots(
            figsize=(min(14, 3 + 0.15 * n_clients), min(10, 2 + 0.25 * n_classes))
        )
        im = ax.imshow(counts.T, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="train samples")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("class")
    else:
        fig, ax = plt.subplots(figsize=(max(5, 0.55 * n_clients + 2.5), 3.8))
        cmap = plt.get_cmap("tab20" if n_classes > 10 else "tab10")
        bottom = np.zeros(n_clients)
        for k in range(n_classes):
            ax.bar(
                range(n_clients),
                counts[:, k],
                bottom=bottom,
                color=cmap(k % cmap.N),
                label=class_names[k],
                width=0.8,
            )
            bottom += counts[:, k]
        ax.set_xticks(range(n_clients))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train samples")
        ax.legend(
            fontsize=7,
            bbox_to_anchor=(1.01, 1),
            loc="upper left",
            title="class",
            title_fontsize=8,
            frameon=False,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.06 * max(1, counts.sum(1).max()))
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_accuracy_bars(rows: list[tuple[str, float, str]], title: str, path: Path) -> None:
    """Horizontal bars of test accuracy, one per model, value printed at each bar's end."""
    plt = _plt()
    colors = {
        "teacher": "tab:blue",
        "ensemble": "tab:green",
        "fedavg": "tab:orange",
        "student": "tab:red",
        "other": "tab:grey",
    }
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(rows) + 1.2))
    ys = np.arange(len(rows))[::-1]
    vals = [0.0 if math.isnan(v) else v for _, v, _ in rows]
    ax.barh(ys, vals, color=[colors.get(g, "tab:grey") for _, _, g in rows], height=0.7)
    for y, (_, v, _) in zip(ys, rows, strict=True):
        ax.text(
            min(v, 1.0) + 0.01 if not math.isnan(v) else 0.01,
            y,
            "n/a" if math.isnan(v) else f"{100 * v:.1f}%",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(ys, [name for name, _, _ in rows], fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("accuracy on the official test set")
    ax.axvline(1.0, color="black", lw=0.5)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def _epochs(v: Sequence[Any]) -> np.ndarray:
    return np.arange(1, len(v) + 1)


def _series(v: Sequence[Any]) -> np.ndarray:
    return np.array([_f(x) for x in v], dtype=float)


def plot_teacher_curves(metrics: dict[int, dict[str, Any]], path: Path) -> None:
    """Per teacher: training loss and validation accuracy per epoch (kept epoch marked)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    cmap = plt.get_cmap("tab10")
    many = len(metrics) > 10
    for i, m in metrics.items():
        c = cmap(i % 10)
        kw = {"lw": 0.8, "alpha": 0.6} if many else {"lw": 1.3}
        if m.get("train_loss"):
            a1.plot(
                _epochs(m["train_loss"]),
                _series(m["train_loss"]),
                color=c,
                label=f"teacher {i}",
                **kw,
            )
        if m.get("val_acc"):
            va = _series(m["val_acc"])
            ok = ~np.isnan(va)  # evaluated every eval_every epochs: join the points that exist
            a2.plot(_epochs(va)[ok], va[ok], color=c, marker="." if ok.sum() < 40 else None, **kw)
            b = m.get("best_epoch")
            if isinstance(b, int) and 0 <= b < len(va) and ok[b]:
                a2.plot([b + 1], [va[b]], marker="o", color=c, ms=7, mfc="none", mew=1.5)
    a1.set_title("training loss", fontsize=10)
    a1.set_yscale("log")
    a2.set_title("validation accuracy (circle = kept checkpoint)", fontsize=10)
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    if not many:
        a1.legend(fontsize=7, frameon=False)
    save_figure(fig, path)


def plot_student_curves(m: dict[str, Any], path: Path) -> None:
    """Student: distillation loss; train/val/test accuracy per epoch; test accuracy vs wall time."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = _epochs(m["loss"])
    axes[0].plot(ep, _series(m["loss"]), color="tab:red")
    axes[0].set_title("distillation loss", fontsize=10)
    for key, c in (("train_acc", "tab:grey"), ("val_acc", "tab:blue"), ("test_acc", "tab:red")):
        if m.get(key):
            s = _series(m[key])
            ok = ~np.isnan(s)
            axes[1].plot(
                _epochs(s)[ok],
                s[ok],
                color=c,
                marker="." if ok.sum() < 30 else None,
                label=key.replace("_acc", "").replace("train", "train (synthetic)"),
            )
    axes[1].set_title("student accuracy", fontsize=10)
    axes[1].set_ylim(0, 1)
    axes[1].legend(fontsize=7, frameon=False)
    for a in axes[:2]:
        a.set_xlabel("epoch")
    if m.get("elapsed_s") and m.get("test_acc"):
        t, s = _series(m["elapsed_s"]), _series(m["test_acc"])
        ok = ~np.isnan(s) & ~np.isnan(t)
        axes[2].plot(t[ok], s[ok], color="tab:red", marker=".")
        if m.get("synthesis_s"):
            syn = _series(m["synthesis_s"])
            axes[2].set_title(
                f"test accuracy vs wall time (synthesis {syn[-1]:.0f}s of {t[-1]:.0f}s)",
                fontsize=10,
            )
        else:
            axes[2].set_title("test accuracy vs wall time", fontsize=10)
        axes[2].set_xlabel("seconds of distillation")
        axes[2].set_ylim(0, 1)
    if m.get("pool_size"):
        pool = _series(m["pool_size"])
        axes[0].set_title(
            f"distillation loss (pool {pool[0]:.0f} → {pool[-1]:.0f} images)", fontsize=10
        )
    for a in axes:
        a.grid(alpha=0.3)
    save_figure(fig, path)


def plot_synthetic_grid(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> None:
    """One row per class, up to MAX_GRID_COLS images each (images in [0, 1], (N, C, H, W)).

    Drawn as one mosaic image (a hundred small axes would take seconds to render)."""
    plt = _plt()
    n, c, h, w = images.shape
    shown = list(range(len(class_names)))
    if len(shown) > MAX_GRID_ROWS:  # e.g. CIFAR-100: evenly spaced classes among those present
        present = sorted(set(labels.tolist()))
        pick = np.linspace(0, len(present) - 1, min(MAX_GRID_ROWS, len(present))).round()
        shown = [present[int(i)] for i in pick]
        title = f"{title} ({len(shown)} of {len(class_names)} classes)"
    cols, pad = MAX_GRID_COLS, max(1, h // 8)
    mosaic = np.ones((len(shown) * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    empty = []
    for r, k in enumerate(shown):
        idx = np.flatnonzero(labels == k)
        if len(idx) > cols:  # spread over the pool: early (initial) and late (adaptive) batches
            idx = idx[np.linspace(0, len(idx) - 1, cols).round().astype(int)]
        if len(idx) == 0:
            empty.append(r)
        for j, i in enumerate(idx):
            img = images[i]
            rgb = np.repeat(img[:1], 3, 0) if c == 1 else img[:3]
            y0, x0 = pad + r * (h + pad), pad + j * (w + pad)
            mosaic[y0 : y0 + h, x0 : x0 + w] = np.transpose(rgb, (1, 2, 0))
    cell = 0.6 if h <= 16 else 0.8  # inches per image: small images drawn larger than 1:1
    fig, ax = plt.subplots(figsize=(cols * cell + 1.0, len(shown) * cell + 0.6))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(len(shown))])
    ax.set_yticklabels([str(class_names[k])[:12] for k in shown], fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    for r in empty:
        ax.text(
            pad + w / 2,
            pad + r * (h + pad) + h / 2,
            "none",
            ha="center",
            va="center",
            fontsize=7,
            color="grey",
        )
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_times(times: dict[str, float], title: str, path: Path) -> None:
    plt = _plt()
    names = list(times)
    vals = [times[n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ys = np.arange(len(names))[::-1]
    colors = ["plum" if ":" in n else "tab:purple" for n in names]  # "rounds: digest" = a part
    ax.barh(ys, vals, color=colors, height=0.65)
    top = max(vals) if vals else 1.0
    for y, v in zip(ys, vals, strict=True):
        ax.text(v + 0.01 * top, y, _secs(v), va="center", fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlim(0, top * 1.18 + 1e-9)
    ax.set_xlabel("wall time (s)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_consensus_distance(dist: list[list[Any]], parties: Sequence[str], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    arr = np.array([[_f(v) for v in row] for row in dist], dtype=float)  # (rounds, parties)
    cmap = plt.get_cmap("tab10")
    xs = np.arange(1, len(arr) + 1)
    for i in range(arr.shape[1]):
        ax.plot(xs, arr[:, i], color=cmap(i % 10), marker=".", label=f"{i}: {parties[i]}")
    ax.set_xlabel("round")
    ax.set_ylabel("mean |scores − consensus|")
    ax.set_title(
        "distance of each party's class scores to the consensus (before digest)", fontsize=10
    )
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
    save_figure(fig, path)


def _denormalize(x, dataset: str, options: dict[str, Any]) -> np.ndarray:
    """Synthetic images back to [0, 1] with the dataset's mean/std (min-max when unknown)."""
    try:
        from fed_distill.data.sources import dataset_info
        from fed_distill.data.transforms import Normalizer

        info = dataset_info(dataset, **options)
        if len(info.mean) == x.shape[1]:
            return Normalizer(info.mean, info.std).denormalize(x).numpy()
    except Exception:  # noqa: BLE001 - fall through to a per-image stretch
        pass
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-8)).numpy()


def _plot_fedmd(results: dict[str, Any], path: Path) -> None:
    from fed_distill.federated.fedmd_results import plot_fedmd

    plot_fedmd(results, path)
