"""``fed-distill report RUN_DIR``: a ``report.md`` with PNG figures beside it, for any run folder.

The report reads only what the stages wrote (JSON, safetensors-free tensors with
``weights_only=True``), detects the kind of run (one-shot pipeline, complete or partial, or
FedMD) and says what is missing instead of failing. A file that is present but malformed is an
error (one line, nothing written): a report must not paper over a corrupt result.

It also holds :func:`stage_summary`, the one-screen summary the CLI prints after stages that do
not print their own table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.artifacts import load_json, load_tensors, save_figure, write_text
from fed_distill.errors import FedDistillError

PREFIX = "report_"  # figures are written next to report.md as report_*.png
MAX_GRID_COLS = 10  # synthetic images per class in the grid
MAX_GRID_ROWS = 20  # classes in the grid (more are sampled evenly)


class ReportError(FedDistillError):
    """A run folder cannot be reported: it does not exist, holds nothing, or a file is malformed."""


# ============================================================================ reading, checked


def _read_json(path: Path, what: str) -> Any | None:
    """The file's JSON, None when it is absent; a malformed file is a ReportError."""
    if not path.is_file():
        return None
    try:
        return load_json(path, what)
    except FedDistillError as e:
        raise ReportError(str(e)) from None


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise ReportError(f"{path}: {msg}; the file is malformed, rerun the stage that writes it")


def _check_acc(v: Any, path: Path, key: str, optional: bool = True) -> None:
    ok = (v is None and optional) or (_is_num(v) and (math.isnan(v) or -1e-6 <= v <= 1 + 1e-6))
    _check(ok, path, f"'{key}' must be an accuracy in [0, 1], got {v!r}")


def _check_acc_list(v: Any, path: Path, key: str, length: int | None = None) -> None:
    _check(isinstance(v, list), path, f"'{key}' must be a list")
    if length is not None:
        _check(len(v) == length, path, f"'{key}' has {len(v)} entries, expected {length}")
    for i, a in enumerate(v):
        _check_acc(a, path, f"{key}[{i}]")


def _check_num_list(v: Any, path: Path, key: str) -> None:
    _check(
        isinstance(v, list) and all(x is None or _is_num(x) for x in v),
        path,
        f"'{key}' must be a list of numbers",
    )


def _check_times(v: Any, path: Path, key: str) -> None:
    _check(
        isinstance(v, dict) and all(isinstance(k, str) and _is_num(t) for k, t in v.items()),
        path,
        f"'{key}' must map names to seconds",
    )


def _get(d: Any, dotted: str, default: Any = None) -> Any:
    """``d["a"]["b"]`` for ``"a.b"``, or ``default`` where a level is missing or not a dict."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _pct(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _secs(v: float) -> str:
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


# ============================================================================ what a run holds


@dataclass
class Figure:
    file: str
    caption: str


@dataclass
class Report:
    """The report being assembled: markdown sections, figures written, what is missing."""

    run_dir: Path
    kind: str
    path: Path | None = None  # report.md, once written
    sections: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")

    def figure(self, name: str, caption: str, draw: Callable[[Path], None]) -> None:
        file = f"{PREFIX}{name}.png"
        draw(self.run_dir / file)
        self.figures.append(Figure(file, caption))
        self.add(f"![{name.replace('_', ' ')}]({file})\n\n*{caption}*")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = [
        "---:" if rows and all(_looks_numeric(r[j]) for r in rows) else "---"
        for j in range(len(header))
    ]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _looks_numeric(v: Any) -> bool:
    s = str(v).strip().lstrip("+-").replace(".", "", 1).replace(" s", "").replace("—", "")
    return s.isdigit() or s == ""


# ============================================================================ plotting helpers


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


# ============================================================================ the one-shot report


def _config_rows(cfg: dict[str, Any], keys: Sequence[str]) -> list[list[Any]]:
    rows = []
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and node != {} and node != []:
            rows.append([f"`{key}`", f"`{node}`"])
    return rows


ONESHOT_KEYS = (
    "dataset.name",
    "model.name",
    "seed",
    "device",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "synthesis.name",
    "synthesis.method",
    "synthesis.mode",
    "synthesis.batch_size",
    "synthesis.iterations",
    "synthesis.lr",
    "student.model",
    "student.epochs",
    "student.initial_batches",
    "student.adaptive",
    "student.loss",
    "student.ensemble",
    "student.server_data",
    "experiment",
)


def _oneshot(rep: Report) -> None:  # noqa: C901 - one section after another, read top to bottom
    from fed_distill.data.partition import load_split

    run = rep.run_dir
    results_path = run / "results.json"
    results = _read_json(results_path, "results.json")
    if results is not None:
        _check(isinstance(results, dict), results_path, "must hold a JSON object")
        _check_acc_list(results.get("teacher_acc"), results_path, "teacher_acc")
        for k in ("ensemble_acc", "fedavg_acc", "student_acc"):
            _check_acc(results.get(k), results_path, k)
        if "teacher_local_acc" in results:
            _check_acc_list(
                results["teacher_local_acc"],
                results_path,
                "teacher_local_acc",
                len(results["teacher_acc"]),
            )
        by_method = results.get("ensemble_acc_by_method") or {}
        _check(
            isinstance(by_method, dict), results_path, "'ensemble_acc_by_method' must be an object"
        )
        for m, a in by_method.items():
            _check_acc(a, results_path, f"ensemble_acc_by_method.{m}")
        if "stage_times_s" in results:
            _check_times(results["stage_times_s"], results_path, "stage_times_s")
        for k in ("wall_time_s", "synthesis_s", "synthesis_images_per_s", "synthetic_images"):
            v = results.get(k)
            _check(v is None or _is_num(v), results_path, f"'{k}' must be a number")
        _check(
            isinstance(results.get("config", {}), dict), results_path, "'config' must be an object"
        )

    # --- split --------------------------------------------------------------------------------
    split = None
    if (run / "split.json").is_file():
        try:
            split = load_split(run / "split.json")
        except FedDistillError as e:
            raise ReportError(str(e)) from None
    class_names: list[str] = []
    if split is not None:
        class_names = _class_names(split.dataset, split.dataset_options, split.num_classes)
    # --- teachers -------------------------------------------------------------------------------
    tdir = run / "teachers"
    spec = _read_json(tdir / "teachers.json", "teachers.json")
    if spec is not None:
        _check(
            isinstance(spec, dict)
            and isinstance(spec.get("num_teachers"), int)
            and spec["num_teachers"] >= 0,
            tdir / "teachers.json",
            "needs an integer 'num_teachers'",
        )
    n_teachers = (spec or {}).get("num_teachers") or (split.num_teachers if split else 0)
    tmetrics: dict[int, dict[str, Any]] = {}
    for i in range(n_teachers):
        p = tdir / f"metrics_teacher_{i}.json"
        m = _read_json(p, f"teacher {i} metrics")
        if m is None:
            continue
        _check(isinstance(m, dict), p, "must hold a JSON object")
        for k in ("train_loss", "train_acc", "val_acc"):
            if k in m:
                _check_num_list(m[k], p, k)
        for k in ("test_acc", "local_test_acc", "best_val_acc"):
            _check_acc(m.get(k), p, k)
        for k in ("train_time_s", "best_epoch"):
            _check(m.get(k) is None or _is_num(m[k]), p, f"'{k}' must be a number")
        tmetrics[i] = m
    # --- student --------------------------------------------------------------------------------
    sdir = run / "student"
    smetrics = _read_json(sdir / "metrics.json", "student metrics")
    if smetrics is not None:
        p = sdir / "metrics.json"
        _check(
            isinstance(smetrics, dict) and isinstance(smetrics.get("loss"), list),
            p,
            "needs a per-epoch 'loss' list",
        )
        for k in (
            "loss",
            "train_acc",
            "val_acc",
            "test_acc",
            "pool_size",
            "elapsed_s",
            "synthesis_s",
        ):
            if k in smetrics:
                _check_num_list(smetrics[k], p, k)
    pool_file = next((f for f in (sdir / "dataset.pt", sdir / "initial.pt") if f.is_file()), None)
    pool = None
    if pool_file is not None:
        try:
            pool = load_tensors(pool_file, "synthetic dataset")
        except FedDistillError as e:
            raise ReportError(str(e)) from None
        x, y = pool.get("images"), pool.get("labels")
        import torch

        _check(
            isinstance(x, torch.Tensor)
            and x.dim() == 4
            and x.is_floating_point()
            and isinstance(y, torch.Tensor)
            and y.dim() == 1
            and len(y) == len(x)
            and not y.is_floating_point(),
            pool_file,
            "needs float 'images' (N, C, H, W) and integer 'labels' (N,)",
        )
        _check(bool(torch.isfinite(x).all()), pool_file, "synthetic images contain NaN or Inf")
        if split is not None and len(y):
            _check(
                int(y.min()) >= 0 and int(y.max()) < split.num_classes,
                pool_file,
                f"labels outside 0..{split.num_classes - 1}",
            )
    initial = _read_json(sdir / "initial.json", "initial.json")
    di: dict[int, dict[str, Any]] = {}  # per-teacher synthesis statistics (optional)
    for i in range(n_teachers):
        p = sdir / f"di_metrics_teacher_{i}.json"
        d = _read_json(p, f"synthesis metrics of teacher {i}")
        if d is None:
            continue
        _check(isinstance(d, dict), p, "must hold a JSON object")
        for k in ("teacher_acc", "student_acc", "seconds"):
            if k in d:
                _check_num_list(d[k], p, k)
        if d.get("teacher_acc"):
            di[i] = d

    if (
        split is None
        and not tmetrics
        and spec is None
        and smetrics is None
        and results is None
        and pool is None
    ):
        raise ReportError(
            f"{run} holds no fed-distill run (no split.json, teachers/, student/ or results.json)"
        )

    # ---- title and config ------------------------------------------------------------------------
    cfg = (results or {}).get("config") or {}
    dataset = (
        split.dataset if split else (spec or {}).get("dataset") or _get(cfg, "dataset.name", "?")
    )
    stages = [
        s
        for s, ok in (
            ("split", split is not None),
            ("train-teachers", bool(tmetrics)),
            ("generate-initial", (sdir / "initial.pt").is_file()),
            ("train-student", smetrics is not None),
            ("oneshot (baselines)", results is not None),
        )
        if ok
    ]
    rep.add(
        f"# One-shot federated distillation — `{run.name}`\n\n"
        f"Dataset **{dataset}**; stages present: {', '.join(stages) or 'none'}.  \n"
        f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{run}`."
    )
    rep.add("## Configuration")
    rows = _config_rows(cfg, ONESHOT_KEYS) if cfg else []
    if split is not None:  # the split as written (only the parameters its strategy uses)
        rows.insert(
            1 if rows else 0,
            [
                "split (`split.json`)",
                f"`{split.strategy}` "
                + ", ".join(
                    f"{k}={v}"
                    for k, v in split.params.items()
                    if k not in ("client_classes", "classes")
                ),
            ],
        )
    if not cfg:
        if split is not None:
            rows.append(["`seed` (split)", f"`{split.seed}`"])
        if spec is not None:
            rows.append(
                ["teacher model", f"`{spec.get('model')}` {spec.get('model_kwargs') or ''}"]
            )
        if smetrics is not None:
            rows.append(["student model", f"`{smetrics.get('model', '?')}`"])
    rep.add(md_table(["key", "value"], rows) if rows else "_No configuration recorded._")

    # ---- results table -------------------------------------------------------------------------
    rep.add("## Results")
    acc_rows: list[tuple[str, float, str]] = []
    table: list[list[Any]] = []
    t_acc = (results or {}).get("teacher_acc") or (
        [tmetrics.get(i, {}).get("test_acc") for i in range(n_teachers)] if tmetrics else []
    )
    t_loc = (results or {}).get("teacher_local_acc") or [
        tmetrics.get(i, {}).get("local_test_acc") for i in range(n_teachers)
    ]
    for i, a in enumerate(t_acc):
        m = tmetrics.get(i, {})
        n = m.get(
            "num_train", len(split.clients[i].train) if split and i < split.num_clients else ""
        )
        table.append([f"teacher {i}", n, _pct(a), _pct(t_loc[i] if i < len(t_loc) else None)])
        acc_rows.append((f"teacher {i}", _f(a), "teacher"))
    if t_acc and any(a is not None for a in t_acc):
        known = [a for a in t_acc if a is not None]
        mean_t = float(np.mean(known))
        table.append(["mean teacher", "", _pct(mean_t), ""])
        if len(t_acc) > 12:  # one bar per teacher would drown the chart: summarise them
            acc_rows = [
                (f"best of {len(t_acc)} teachers", max(known), "teacher"),
                (f"mean of {len(t_acc)} teachers", mean_t, "teacher"),
                (f"worst of {len(t_acc)} teachers", min(known), "teacher"),
            ]
    if results is not None:
        used = results.get("ensemble_method")
        by_method = results.get("ensemble_acc_by_method") or {}
        if used is not None or results.get("ensemble_acc") is not None:
            table.append(
                [
                    f"ensemble ({used or '?'}) — the student's target",
                    "",
                    _pct(results.get("ensemble_acc")),
                    "",
                ]
            )
            acc_rows.append((f"ensemble ({used})", _f(results.get("ensemble_acc")), "ensemble"))
        for m, a in by_method.items():
            if m != used:
                table.append([f"ensemble ({m})", "", _pct(a), ""])
                acc_rows.append((f"ensemble ({m})", _f(a), "ensemble"))
        table.append(["FedAvg (one-shot)", "", _pct(results.get("fedavg_acc")), ""])
        acc_rows.append(("FedAvg (one-shot)", _f(results.get("fedavg_acc")), "fedavg"))
    s_acc = (results or {}).get("student_acc")
    if s_acc is None and smetrics and smetrics.get("test_acc"):
        s_acc = smetrics["test_acc"][-1]
    if s_acc is not None:
        name = f"student ({smetrics.get('model', '?')})" if smetrics else "student"
        n_syn = (results or {}).get("synthetic_images") or (len(pool["labels"]) if pool else "")
        table.append([name, f"{n_syn} synthetic" if n_syn != "" else "", _pct(s_acc), ""])
        acc_rows.append(("student", _f(s_acc), "student"))
    if table:
        rep.add(md_table(["model", "train samples", "test acc %", "own-test acc %"], table))
        rep.add(
            "Test accuracy is on the dataset's official test set; *own-test* is each client's "
            "local test part, which follows its own label distribution."
        )
    else:
        rep.add("_No accuracies yet._")
    if any(not math.isnan(a) for _, a, _ in acc_rows):
        rep.figure(
            "accuracy",
            "Test accuracy of every model in the run.",
            lambda p: plot_accuracy_bars(acc_rows, f"{dataset}: test accuracy", p),
        )

    # ---- figures -----------------------------------------------------------------------------
    if split is not None:
        rep.add("## Data: label distribution per client")
        counts = split.class_counts()
        server = split.num_clients - split.num_teachers
        note = (
            f" The last {server} client(s) hold the server's own data and train no teacher."
            if server
            else ""
        )
        rep.figure(
            "label_distribution",
            f"Training samples of each class held by each of the {split.num_clients} clients "
            f"({split.strategy}).{note}",
            lambda p: plot_label_distribution(
                counts,
                class_names,
                f"{split.dataset}: {split.strategy} "
                + ", ".join(
                    f"{k}={v}"
                    for k, v in split.params.items()
                    if k not in ("client_classes", "classes")
                ),
                p,
            ),
        )
        sizes = [len(c.train) + len(c.val) for c in split.clients]
        rep.add(
            f"Clients hold {min(sizes)}–{max(sizes)} samples (mean {np.mean(sizes):.0f}); "
            f"classes per client (> 0 samples): "
            f"{', '.join(str(int((c > 0).sum())) for c in counts)}."
        )
    else:
        rep.missing.append(f"`split.json` — run `fed-distill split run_dir={run}`")

    if tmetrics:
        rep.add("## Teachers: training curves")
        rep.figure(
            "teacher_curves",
            "Each teacher's training loss and validation accuracy per epoch; the checkpoint kept "
            "is the best on the client's validation part.",
            lambda p: plot_teacher_curves(tmetrics, p),
        )
        if len(tmetrics) < n_teachers:
            rep.missing.append(
                f"metrics of teachers {sorted(set(range(n_teachers)) - set(tmetrics))}"
            )
    else:
        rep.missing.append(f"teachers — run `fed-distill train-teachers run_dir={run}`")

    if smetrics is not None:
        rep.add("## Student: distillation curves")
        rep.figure(
            "student_curves",
            "Student distillation loss, its accuracy per epoch, "
            "and test accuracy against distillation wall time.",
            lambda p: plot_student_curves(smetrics, p),
        )
    else:
        rep.missing.append(
            "student — run `fed-distill generate-initial` and `fed-distill train-student`"
        )

    if pool is not None:
        rep.add("## Synthetic images")
        x = pool["images"].float()
        y = pool["labels"].long().numpy()
        n_cls = split.num_classes if split else int(y.max()) + 1 if len(y) else 0
        names = class_names or [str(k) for k in range(n_cls)]
        img = _denormalize(
            x, split.dataset if split else dataset, split.dataset_options if split else {}
        )
        per_class = np.bincount(y, minlength=n_cls)
        rep.figure(
            "synthetic_grid",
            f"Synthetic images from `{pool_file.relative_to(run)}` ({len(y)} in all), one row per "
            f"class, spread over the pool from the first batches to the last.",
            lambda p: plot_synthetic_grid(
                img, y, names, p, f"{dataset}: synthetic images per class"
            ),
        )
        rep.add(
            "Images per class: "
            + ", ".join(f"{names[k]} {per_class[k]}" for k in range(n_cls))
            + "."
        )
    else:
        rep.missing.append("synthetic images (`student/dataset.pt` or `student/initial.pt`)")

    if di:
        rep.add(
            "Synthesis, per teacher: how often the teacher and the current student agree with the "
            "label a batch was synthesised for (batches made during distillation).\n\n"
            + md_table(
                ["teacher", "batches", "teacher acc %", "student acc %", "s / batch"],
                [
                    [
                        i,
                        len(d["teacher_acc"]),
                        _pct(np.nanmean(_series(d["teacher_acc"]))),
                        _pct(np.nanmean(_series(d.get("student_acc") or [None]))),
                        f"{np.nanmean(_series(d.get('seconds') or [None])):.2f}",
                    ]
                    for i, d in di.items()
                ],
            )
        )

    # ---- wall time -------------------------------------------------------------------------------
    times = dict((results or {}).get("stage_times_s") or {})
    if not times:
        if tmetrics:
            times["train-teachers"] = float(
                sum(_f(m.get("train_time_s", 0)) for m in tmetrics.values())
            )
        if isinstance(initial, dict) and _is_num(initial.get("seconds")):
            times["generate-initial"] = float(initial["seconds"])
        if smetrics and smetrics.get("elapsed_s"):
            times["train-student"] = _f(smetrics["elapsed_s"][-1])
    if times:
        rep.add("## Wall time per stage")
        total = (results or {}).get("wall_time_s")
        extra = ""
        if results and results.get("synthesis_images_per_s"):
            extra = (
                f" Synthesis: {results.get('synthetic_images')} images in {_secs(results['synthesis_s'])}"
                f" ({results['synthesis_images_per_s']:.0f} images/s)."
            )
        rep.figure(
            "stage_times",
            "Wall time of each stage"
            + (f" (whole run {_secs(total)})." if total else " (from the stages' own records).")
            + extra,
            lambda p: plot_times(times, "wall time per stage", p),
        )
        rep.add(md_table(["stage", "wall time"], [[k, _secs(v)] for k, v in times.items()]))
    if results is None and (split is not None or tmetrics):
        rep.missing.append(
            "`results.json` (ensemble and FedAvg baselines) — written by `fed-distill oneshot`"
        )


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


# ============================================================================ the FedMD report

FEDMD_KEYS = (
    "fedmd.name",
    "fedmd.public",
    "fedmd.private",
    "fedmd.partition",
    "fedmd.samples_per_class",
    "fedmd.parties",
    "fedmd.rounds",
    "fedmd.public_subset_size",
    "fedmd.scores",
    "fedmd.aggregate",
    "fedmd.digest_loss",
    "fedmd.digest_epochs",
    "fedmd.revisit_epochs",
    "fedmd.width_scale",
    "seed",
)


def _fedmd(rep: Report, results: Any) -> None:
    path = rep.run_dir / "results.json"
    _check(
        isinstance(results.get("rounds"), int) and results["rounds"] >= 0,
        path,
        "'rounds' must be an integer >= 0",
    )
    r = results["rounds"]
    parties = results.get("parties")
    _check(
        isinstance(parties, list) and parties and all(isinstance(p, str) for p in parties),
        path,
        "'parties' must be a non-empty list of architecture names",
    )
    n = len(parties)
    pa = results["party_acc"]
    _check(
        isinstance(pa, list) and len(pa) == n,
        path,
        f"'party_acc' must hold one list per party ({n})",
    )
    for i, acc in enumerate(pa):
        _check_acc_list(acc, path, f"party_acc[{i}]", r + 1)
    _check_acc_list(results.get("alone_acc"), path, "alone_acc", n)
    _check_acc_list(results.get("pooled_acc", [None] * n), path, "pooled_acc", n)
    for k in ("alone_extended_acc",):
        if k in results:
            _check_acc_list(results[k], path, k, n)
    if results.get("ensemble_acc"):
        _check_acc_list(results["ensemble_acc"], path, "ensemble_acc", r + 1)
    if "round_times_s" in results:
        _check_num_list(results["round_times_s"], path, "round_times_s")
    for k in ("stage_times_s", "step_times_s"):
        if k in results:
            _check_times(results[k], path, k)
    dist = results.get("consensus_distance")
    if dist is not None:
        _check(
            isinstance(dist, list) and all(isinstance(d, list) and len(d) == n for d in dist),
            path,
            "'consensus_distance' must hold one list of per-party values per round",
        )
        for d in dist:
            _check_num_list(d, path, "consensus_distance")
    cfg = results.get("config") or {}
    data = results.get("data") or {}
    run = rep.run_dir
    preset = results.get("preset") or _get(cfg, "fedmd.name", "")
    fin = [a[-1] for a in pa]
    alone = results["alone_acc"]
    gain = 100 * (np.nanmean(_series(fin)) - np.nanmean(_series(alone)))
    rep.add(
        f"# FedMD — `{run.name}`\n\n"
        f"Preset **{preset or '?'}**: {n} heterogeneous parties, {r} rounds; mean private test accuracy "
        f"{_pct(np.nanmean(_series(alone)))}% alone → {_pct(np.nanmean(_series(fin)))}% after round {r} "
        f"(**{gain:+.1f} points**).  \n"
        f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{run}`."
    )
    rep.add("## Configuration")
    rows = _config_rows(cfg, FEDMD_KEYS)
    if results.get("device"):
        rows.append(["device (used)", f"`{results['device']}`"])
    if isinstance(data, dict) and data:
        rows += [
            [f"data: {k}", f"`{data[k]}`"]
            for k in (
                "public_train",
                "public_val",
                "private_test",
                "private_per_party",
                "num_outputs",
                "image",
            )
            if k in data
        ]
    rep.add(md_table(["key", "value"], rows) if rows else "_No configuration recorded._")

    rep.add("## Results")
    ext = results.get("alone_extended_acc") or [None] * n
    pooled = results.get("pooled_acc") or [None] * n
    table = [
        [
            i,
            f"`{parties[i]}`",
            _pct(alone[i]),
            _pct(ext[i]),
            _pct(fin[i]),
            _pct(pooled[i]),
            f"{100 * (_f(fin[i]) - _f(alone[i])):+.1f}",
        ]
        for i in range(n)
    ]

    def mean(v: Sequence[Any]) -> str:
        vals = [x for x in v if x is not None]
        return _pct(float(np.mean(vals))) if vals else "—"

    table.append(["mean", "", mean(alone), mean(ext), mean(fin), mean(pooled), f"{gain:+.1f}"])
    rep.add(
        md_table(
            [
                "party",
                "model",
                "alone %",
                "alone, extended %",
                f"FedMD round {r} %",
                "pooled %",
                "gain (points)",
            ],
            table,
        )
    )
    rep.add(
        "*Alone*: after transfer learning (public, then private data) — round 0. *Alone, extended*: the "
        "alone model trained on its own data for as many epochs as the rounds' revisits (a control). "
        "*Pooled*: each architecture trained on all parties' private data (the upper bound). "
        "Accuracy is on the private task's test set."
    )
    rep.figure(
        "fedmd_accuracy",
        "Private test accuracy of each party per round (round 0 = alone), with the mean, the mean alone "
        "and mean pooled levels, and each party's pooled accuracy as a star.",
        lambda p: _plot_fedmd(results, p),
    )
    left = [
        (k + 1, d)
        for k, lo in enumerate(results.get("left_out") or [])
        for d in (lo if isinstance(lo, list) else [])
        if isinstance(d, dict)
    ]
    if left:
        rep.add(
            "Parties left out of a round's consensus: "
            + "; ".join(
                f"round {k}: party {d.get('party')} ({d.get('reason', '')})" for k, d in left
            )
        )
    if dist:
        rep.figure(
            "consensus_distance",
            "How far each party's class scores were from the consensus in each round.",
            lambda p: plot_consensus_distance(dist, parties, p),
        )

    infos = data.get("party_info") if isinstance(data, dict) else None
    if (
        isinstance(infos, list)
        and infos
        and all(isinstance(d, dict) and isinstance(d.get("class_counts"), list) for d in infos)
    ):
        counts = np.array([d["class_counts"] for d in infos], dtype=float)
        names = data.get("private_classes") or [str(k) for k in range(counts.shape[1])]
        if len(names) != counts.shape[1]:
            names = [str(k) for k in range(counts.shape[1])]
        rep.add("## Data: private label distribution per party")
        rep.figure(
            "label_distribution",
            "Private training samples of each class held by each party.",
            lambda p: plot_label_distribution(
                counts,
                names,
                f"private data ({_get(cfg, 'fedmd.private', '')})",
                p,
                xlabel="party",
            ),
        )
    else:
        rep.missing.append("per-party label counts (`data.party_info` in results.json)")

    times = {**(results.get("stage_times_s") or {})}
    steps = results.get("step_times_s") or {}
    if times or steps:
        rep.add("## Wall time per stage")
        shown = {**times, **{f"rounds: {k}": v for k, v in steps.items()}}
        total = results.get("wall_time_s")
        rt = results.get("round_times_s") or []
        rep.figure(
            "stage_times",
            "Wall time per stage; the rounds' time is broken into its protocol steps."
            + (f" Whole run {_secs(total)}" if _is_num(total) else "")
            + (f"; {np.mean(rt):.1f} s per round." if rt else "."),
            lambda p: plot_times(shown, "FedMD wall time", p),
        )


def _plot_fedmd(results: dict[str, Any], path: Path) -> None:
    from fed_distill.federated.fedmd import plot_fedmd

    plot_fedmd(results, path)


# ============================================================================ entry points


def write_report(run_dir: str | Path) -> Report:
    """Write ``run_dir/report.md`` and its figures; return the report (``.path``, ``.figures``,
    ``.missing``, ``.kind``)."""
    run = Path(run_dir)
    if not run.exists():
        raise ReportError(f"run folder not found: {run}")
    if not run.is_dir():
        raise ReportError(f"{run} is not a folder; give the run folder (run_dir) of a stage")
    results = _read_json(run / "results.json", "results.json")
    if results is not None and not isinstance(results, dict):
        raise ReportError(f"{run / 'results.json'} must hold a JSON object; the file is malformed")
    if results is not None and "party_acc" not in results and "teacher_acc" not in results:
        raise ReportError(
            f"{run / 'results.json'} is neither a one-shot result (teacher_acc) nor a FedMD one "
            "(party_acc); the file is malformed"
        )
    rep = Report(run, "fedmd" if results is not None and "party_acc" in results else "oneshot")
    try:
        if rep.kind == "fedmd":
            _fedmd(rep, results)
        else:
            _oneshot(rep)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # The checks above name the file and key; this is the net under them, so that an odd
        # value nobody thought of still ends in one line rather than a traceback.
        raise ReportError(
            f"cannot report {run}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            " (a file in it is malformed?)"
        ) from None
    if rep.missing:
        rep.add("## Not in this run (yet)\n\n" + "\n".join(f"- {m}" for m in rep.missing))
    rep.add("---\n*Written by `fed-distill report`.*")
    rep.path = run / "report.md"
    write_text("\n".join(rep.sections), rep.path)
    return rep


def run_report(args: Sequence[str]) -> Path | None:
    """``fed-distill report RUN_DIR`` (or ``run_dir=RUN_DIR``)."""
    if any(a in ("-h", "--help") for a in args):
        print("usage: fed-distill report RUN_DIR\n\n" + (__doc__ or "").strip().split("\n\n")[0])
        return None
    dirs = []
    for a in args:
        if a.startswith("run_dir="):
            dirs.append(a.split("=", 1)[1])
        elif "=" in a or a.startswith("-"):
            raise ReportError(
                f"fed-distill report: unknown option '{a}'; usage: fed-distill report RUN_DIR"
            )
        else:
            dirs.append(a)
    if len(dirs) != 1:
        raise ReportError("usage: fed-distill report RUN_DIR (one run folder)")
    rep = write_report(dirs[0])
    figs = [f.file for f in rep.figures]
    print(f"wrote {rep.path} ({rep.kind} run) with {len(figs)} figure(s): {', '.join(figs)}")
    if rep.missing:
        print(f"not in the run yet: {len(rep.missing)} item(s), listed at the end of the report")
    return rep.path


# ============================================================================ stage summaries


def stage_summary(stage: str, run_dir: str | Path) -> str | None:
    """A one-screen summary for stages that do not print a table of their own (None otherwise).

    Read back from what the stage wrote, so it shows what a later stage will actually see.
    """
    try:
        return _stage_summary(stage, Path(run_dir))
    except (FedDistillError, KeyError, IndexError, TypeError, ValueError) as e:
        # the stage itself succeeded; a summary that cannot be read must not turn it into a failure
        return f"(no summary: {str(e).splitlines()[0] if str(e) else type(e).__name__})"


def _stage_summary(stage: str, run: Path) -> str | None:
    from fed_distill.pipeline import format_table

    hint = f"report: fed-distill report {run}"
    if stage == "generate-initial":
        info = _read_json(run / "student" / "initial.json", "initial.json")
        if not isinstance(info, dict):
            return None
        lines = [
            f"initial synthetic set: {info.get('images', 0)} images in {info.get('batches', 0)} batches, "
            f"{_f(info.get('seconds')):.1f}s ({_f(info.get('images_per_s')):.0f} images/s)"
        ]
        if (run / "student" / "initial.pt").is_file():
            y = load_tensors(run / "student" / "initial.pt", "initial synthetic batches")["labels"]
            counts = np.bincount(y.long().numpy())
            lines.append("images per class: " + " ".join(f"{k}:{c}" for k, c in enumerate(counts)))
        return "\n".join([*lines, hint])
    if stage == "train-student":
        m = _read_json(run / "student" / "metrics.json", "student metrics")
        if not m or not m.get("loss"):
            return None
        n = len(m["loss"])
        keep = sorted(set(np.linspace(0, n - 1, min(n, 10)).round().astype(int).tolist()))
        rows = [
            [
                e + 1,
                int(_f(m["pool_size"][e])),
                f"{_f(m['loss'][e]):.3f}",
                _pct(m["train_acc"][e]),
                _pct(m["val_acc"][e]),
                _pct(m["test_acc"][e]),
                f"{_f(m['elapsed_s'][e]):.0f}",
            ]
            for e in keep
        ]
        return "\n".join(
            [
                format_table(
                    ["epoch", "pool", "loss", "train %", "val %", "test %", "time s"], rows
                ),
                f"synthesis took {_f(m.get('synthesis_seconds')):.0f}s of {_f(m['elapsed_s'][-1]):.0f}s;"
                f" {hint}",
            ]
        )
    if stage in ("oneshot", "fedmd", "train-teachers", "split"):
        return hint
    return None
