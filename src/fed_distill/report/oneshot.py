"""The report of a one-shot run, complete or partial: what each stage wrote is read and checked
first (:func:`load_oneshot`), then each section is written from it, one function a section."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.artifacts import load_tensors
from fed_distill.errors import FedDistillError
from fed_distill.report.common import (
    Report,
    ReportError,
    _check,
    _check_acc,
    _check_acc_list,
    _check_num_list,
    _check_times,
    _config_rows,
    _f,
    _get,
    _is_num,
    _pct,
    _read_json,
    _secs,
    md_table,
)
from fed_distill.report.figures import (
    _class_names,
    _denormalize,
    _series,
    plot_accuracy_bars,
    plot_label_distribution,
    plot_student_curves,
    plot_synthetic_grid,
    plot_teacher_curves,
    plot_times,
)
from fed_distill.report.per_class import check_per_class, per_class_section

ONESHOT_KEYS = (
    "dataset.name",
    "model.name",
    "teachers.models",
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


@dataclass
class OneshotRun:
    """What the stages of a one-shot run wrote, read and checked (None / empty where absent)."""

    run: Path
    results: dict[str, Any] | None = None
    split: Any = None  # data.partition.Split
    class_names: list[str] = field(default_factory=list)
    spec: dict[str, Any] | None = None  # teachers/teachers.json
    n_teachers: int = 0
    tmetrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    smetrics: dict[str, Any] | None = None
    pool_file: Path | None = None
    pool: dict[str, Any] | None = None
    initial: Any = None  # student/initial.json
    di: dict[int, dict[str, Any]] = field(default_factory=dict)  # per-teacher synthesis stats

    @property
    def sdir(self) -> Path:
        return self.run / "student"

    @property
    def cfg(self) -> dict[str, Any]:
        return (self.results or {}).get("config") or {}

    @property
    def dataset(self) -> str:
        split, spec = self.split, self.spec
        return (
            split.dataset
            if split
            else (spec or {}).get("dataset") or _get(self.cfg, "dataset.name", "?")
        )


# ============================================================================ reading, checked


def _read_results(run: Path) -> dict[str, Any] | None:
    results_path = run / "results.json"
    results = _read_json(results_path, "results.json")
    if results is None:
        return None
    _check(isinstance(results, dict), results_path, "must hold a JSON object")
    _check_acc_list(results.get("teacher_acc"), results_path, "teacher_acc")
    for k in ("ensemble_acc", "fedavg_acc", "student_acc", "student_refit_acc"):
        _check_acc(results.get(k), results_path, k)
    if "teacher_local_acc" in results:
        _check_acc_list(
            results["teacher_local_acc"],
            results_path,
            "teacher_local_acc",
            len(results["teacher_acc"]),
        )
    by_method = results.get("ensemble_acc_by_method") or {}
    _check(isinstance(by_method, dict), results_path, "'ensemble_acc_by_method' must be an object")
    for m, a in by_method.items():
        _check_acc(a, results_path, f"ensemble_acc_by_method.{m}")
    if "stage_times_s" in results:
        _check_times(results["stage_times_s"], results_path, "stage_times_s")
    for k in ("wall_time_s", "synthesis_s", "synthesis_images_per_s", "synthetic_images"):
        v = results.get(k)
        _check(v is None or _is_num(v), results_path, f"'{k}' must be a number")
    _check(isinstance(results.get("config", {}), dict), results_path, "'config' must be an object")
    check_per_class(results, results_path)
    return results


def _read_split(o: OneshotRun) -> None:
    from fed_distill.data.partition import load_split

    if (o.run / "split.json").is_file():
        try:
            o.split = load_split(o.run / "split.json")
        except FedDistillError as e:
            raise ReportError(str(e)) from None
    if o.split is not None:
        o.class_names = _class_names(o.split.dataset, o.split.dataset_options, o.split.num_classes)


def _read_teachers(o: OneshotRun) -> None:
    tdir = o.run / "teachers"
    spec = _read_json(tdir / "teachers.json", "teachers.json")
    if spec is not None:
        _check(
            isinstance(spec, dict)
            and isinstance(spec.get("num_teachers"), int)
            and spec["num_teachers"] >= 0,
            tdir / "teachers.json",
            "needs an integer 'num_teachers'",
        )
    o.spec = spec
    o.n_teachers = (spec or {}).get("num_teachers") or (o.split.num_teachers if o.split else 0)
    for i in range(o.n_teachers):
        p = tdir / f"metrics_teacher_{i}.json"
        m = _read_object(p, f"teacher {i} metrics", ("train_loss", "train_acc", "val_acc"))
        if m is None:
            continue
        for k in ("test_acc", "local_test_acc", "best_val_acc"):
            _check_acc(m.get(k), p, k)
        for k in ("train_time_s", "best_epoch"):
            _check(m.get(k) is None or _is_num(m[k]), p, f"'{k}' must be a number")
        o.tmetrics[i] = m


def _read_object(path: Path, what: str, lists: tuple[str, ...]) -> dict[str, Any] | None:
    """A JSON object (None where the file is absent), its number lists ``lists`` checked where
    present."""
    d = _read_json(path, what)
    if d is None:
        return None
    _check(isinstance(d, dict), path, "must hold a JSON object")
    for k in lists:
        if k in d:
            _check_num_list(d[k], path, k)
    return d


def _read_student_metrics(sdir: Path) -> dict[str, Any] | None:
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
    return smetrics


def _read_pool(o: OneshotRun) -> None:
    sdir, split = o.sdir, o.split
    pool_file = next((f for f in (sdir / "dataset.pt", sdir / "initial.pt") if f.is_file()), None)
    o.pool_file = pool_file
    if pool_file is None:
        return
    try:
        o.pool = pool = load_tensors(pool_file, "synthetic dataset")
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


def _read_di(o: OneshotRun) -> None:
    for i in range(o.n_teachers):
        p = o.sdir / f"di_metrics_teacher_{i}.json"
        lists = ("teacher_acc", "student_acc", "seconds")
        d = _read_object(p, f"synthesis metrics of teacher {i}", lists)
        if d is not None and d.get("teacher_acc"):
            o.di[i] = d


def load_oneshot(run: Path) -> OneshotRun:
    """Read and check every file a one-shot run may hold; a run holding none is an error."""
    o = OneshotRun(run, results=_read_results(run))
    _read_split(o)
    _read_teachers(o)
    o.smetrics = _read_student_metrics(o.sdir)
    _read_pool(o)
    o.initial = _read_json(o.sdir / "initial.json", "initial.json")
    _read_di(o)
    if (
        o.split is None
        and not o.tmetrics
        and o.spec is None
        and o.smetrics is None
        and o.results is None
        and o.pool is None
    ):
        raise ReportError(
            f"{run} holds no fed-distill run (no split.json, teachers/, student/ or results.json)"
        )
    return o


# ============================================================================ the sections


def _split_params(split: Any) -> str:
    """The split's parameters as written (only those its strategy uses)."""
    return ", ".join(
        f"{k}={v}" for k, v in split.params.items() if k not in ("client_classes", "classes")
    )


def _title_and_config(rep: Report, o: OneshotRun) -> None:
    run, split, spec, smetrics, cfg = o.run, o.split, o.spec, o.smetrics, o.cfg
    stages = [
        s
        for s, ok in (
            ("split", split is not None),
            ("train-teachers", bool(o.tmetrics)),
            ("generate-initial", (o.sdir / "initial.pt").is_file()),
            ("train-student", smetrics is not None),
            ("oneshot (baselines)", o.results is not None),
        )
        if ok
    ]
    rep.add(
        f"# One-shot federated distillation — `{run.name}`\n\n"
        f"Dataset **{o.dataset}**; stages present: {', '.join(stages) or 'none'}.  \n"
        f"Report written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{run}`."
    )
    rep.add("## Configuration")
    rows = _config_rows(cfg, ONESHOT_KEYS) if cfg else []
    if split is not None:
        rows.insert(
            1 if rows else 0,
            ["split (`split.json`)", f"`{split.strategy}` " + _split_params(split)],
        )
    if not cfg:
        if split is not None:
            rows.append(["`seed` (split)", f"`{split.seed}`"])
        if spec is not None:
            models = spec.get("models") or [
                {"name": spec.get("model"), "kwargs": spec.get("model_kwargs")}
            ]
            shown = sorted({f"`{m.get('name')}` {m.get('kwargs') or ''}".strip() for m in models})
            rows.append(["teacher model", ", ".join(shown)])
        if smetrics is not None:
            rows.append(["student model", f"`{smetrics.get('model', '?')}`"])
    rep.add(md_table(["key", "value"], rows) if rows else "_No configuration recorded._")


def _teacher_rows(
    o: OneshotRun, table: list[list[Any]], acc_rows: list[tuple[str, float, str]]
) -> list[tuple[str, float, str]]:
    """Each teacher and the mean teacher into ``table``; their bars (summarised when many)."""
    results, tmetrics, split, n_teachers = o.results, o.tmetrics, o.split, o.n_teachers
    t_acc = (results or {}).get("teacher_acc") or (
        [tmetrics.get(i, {}).get("test_acc") for i in range(n_teachers)] if tmetrics else []
    )
    t_loc = (results or {}).get("teacher_local_acc") or [
        tmetrics.get(i, {}).get("local_test_acc") for i in range(n_teachers)
    ]
    # per-client architectures: each teacher's model beside its name
    mixed = (
        len({json.dumps(m.get("model_kwargs")) + str(m.get("model")) for m in tmetrics.values()})
        > 1
    )
    for i, a in enumerate(t_acc):
        m = tmetrics.get(i, {})
        n = m.get(
            "num_train", len(split.clients[i].train) if split and i < split.num_clients else ""
        )
        name = f"teacher {i}" + (f" ({m.get('model')})" if mixed else "")
        table.append([name, n, _pct(a), _pct(t_loc[i] if i < len(t_loc) else None)])
        acc_rows.append((name, _f(a), "teacher"))
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
    return acc_rows


def _baseline_rows(
    results: dict[str, Any], table: list[list[Any]], acc_rows: list[tuple[str, float, str]]
) -> None:
    """The ensemble by each rule (the student's target first) and one-shot FedAvg."""
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
    fedavg, note = results.get("fedavg_acc"), results.get("fedavg_note")
    if fedavg is None and note:  # mixed architectures: a dash with the reason, no bar
        table.append(["FedAvg (one-shot)", "", f"— ({note})", ""])
        return
    table.append(["FedAvg (one-shot)", "", _pct(fedavg), ""])
    acc_rows.append(("FedAvg (one-shot)", _f(fedavg), "fedavg"))


def _results_section(rep: Report, o: OneshotRun) -> None:
    results, smetrics, pool = o.results, o.smetrics, o.pool
    rep.add("## Results")
    table: list[list[Any]] = []
    acc_rows = _teacher_rows(o, table, [])
    if results is not None:
        _baseline_rows(results, table, acc_rows)
    s_acc = (results or {}).get("student_acc")
    if s_acc is None and smetrics and smetrics.get("test_acc"):
        s_acc = smetrics["test_acc"][-1]
    if s_acc is not None:
        name = f"student ({smetrics.get('model', '?')})" if smetrics else "student"
        n_syn = (results or {}).get("synthetic_images") or (len(pool["labels"]) if pool else "")
        table.append([name, f"{n_syn} synthetic" if n_syn != "" else "", _pct(s_acc), ""])
        acc_rows.append(("student", _f(s_acc), "student"))
    r_acc = (results or {}).get("student_refit_acc")
    if r_acc is not None:  # refit=head: the statistics round's student, beside the one-shot one
        clients = len(((results or {}).get("refit") or {}).get("clients") or [])
        table.append(
            ["student + statistics round", f"{clients} clients' statistics", _pct(r_acc), ""]
        )
        acc_rows.append(("student +stats round", _f(r_acc), "student"))
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
            lambda p: plot_accuracy_bars(acc_rows, f"{o.dataset}: test accuracy", p),
        )


def _split_section(rep: Report, o: OneshotRun) -> None:
    split = o.split
    if split is None:
        rep.missing.append(f"`split.json` — run `fed-distill split run_dir={o.run}`")
        return
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
            o.class_names,
            f"{split.dataset}: {split.strategy} " + _split_params(split),
            p,
        ),
    )
    sizes = [len(c.train) + len(c.val) for c in split.clients]
    rep.add(
        f"Clients hold {min(sizes)}–{max(sizes)} samples (mean {np.mean(sizes):.0f}); "
        f"classes per client (> 0 samples): "
        f"{', '.join(str(int((c > 0).sum())) for c in counts)}."
    )


def _curves_sections(rep: Report, o: OneshotRun) -> None:
    tmetrics, smetrics, n_teachers = o.tmetrics, o.smetrics, o.n_teachers
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
        rep.missing.append(f"teachers — run `fed-distill train-teachers run_dir={o.run}`")

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


def _synthetic_section(rep: Report, o: OneshotRun) -> None:
    pool, split, dataset = o.pool, o.split, o.dataset
    if pool is None:
        rep.missing.append("synthetic images (`student/dataset.pt` or `student/initial.pt`)")
        return
    assert o.pool_file is not None
    rep.add("## Synthetic images")
    x = pool["images"].float()
    y = pool["labels"].long().numpy()
    n_cls = split.num_classes if split else int(y.max()) + 1 if len(y) else 0
    names = o.class_names or [str(k) for k in range(n_cls)]
    img = _denormalize(
        x, split.dataset if split else dataset, split.dataset_options if split else {}
    )
    per_class = np.bincount(y, minlength=n_cls)
    rep.figure(
        "synthetic_grid",
        f"Synthetic images from `{o.pool_file.relative_to(o.run)}` ({len(y)} in all), one row per "
        f"class, spread over the pool from the first batches to the last.",
        lambda p: plot_synthetic_grid(img, y, names, p, f"{dataset}: synthetic images per class"),
    )
    rep.add(
        "Images per class: " + ", ".join(f"{names[k]} {per_class[k]}" for k in range(n_cls)) + "."
    )


def _di_table(rep: Report, di: dict[int, dict[str, Any]]) -> None:
    if not di:
        return
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


def _stage_times(o: OneshotRun) -> dict[str, float]:
    """Seconds per stage: from results.json, else from the stages' own records."""
    times = dict((o.results or {}).get("stage_times_s") or {})
    if not times:
        if o.tmetrics:
            times["train-teachers"] = float(
                sum(_f(m.get("train_time_s", 0)) for m in o.tmetrics.values())
            )
        if isinstance(o.initial, dict) and _is_num(o.initial.get("seconds")):
            times["generate-initial"] = float(o.initial["seconds"])
        if o.smetrics and o.smetrics.get("elapsed_s"):
            times["train-student"] = _f(o.smetrics["elapsed_s"][-1])
    return times


def _time_section(rep: Report, o: OneshotRun) -> None:
    results = o.results
    times = _stage_times(o)
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
    if results is None and (o.split is not None or o.tmetrics):
        rep.missing.append(
            "`results.json` (ensemble and FedAvg baselines) — written by `fed-distill oneshot`"
        )


def oneshot_report(rep: Report) -> None:
    """The one-shot report's sections, one after another, read top to bottom."""
    o = load_oneshot(rep.run_dir)
    _title_and_config(rep, o)
    _results_section(rep, o)
    per_class_section(rep, o.results, o.class_names)
    _split_section(rep, o)
    _curves_sections(rep, o)
    _synthetic_section(rep, o)
    _di_table(rep, o.di)
    _time_section(rep, o)
