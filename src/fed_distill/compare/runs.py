"""Finding, reading and grouping the runs that ``fed-distill compare`` is given.

A PATH is a run folder (it holds ``results.json``), a folder of run folders at any depth (a
``--multirun`` sweep), a ``results.json`` file, or a glob of any of these. A folder with a
stage's outputs but no ``results.json`` is a partial run; it is listed and skipped, as is a
``results.json`` that cannot be read, each with one line naming the file. Runs are grouped by
the config keys whose values differ between them, bookkeeping left out (seed, run_dir, device,
checkpoint and data locations): the seeds of one setting become one group.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_distill.errors import FedDistillError

# Keys that say where or how often, not what was run: never a reason to split groups.
BOOKKEEPING = {"seed", "run_dir", "device", "progress", "force", "logger", "student.seed"}
BOOKKEEPING_LEAVES = {"checkpoint_every", "data_dir", "public_data_dir"}
# What a stage leaves in a run folder before results.json exists.
RUN_MARKERS = ("split.json", "teachers", "student", "checkpoints", "parties")
PROTOCOLS = {"oneshot": "one-shot", "fedmd": "FedMD"}
MAX_DEPTH = 6  # how deep a sweep folder is searched for run folders


class CompareError(FedDistillError):
    """Nothing to compare, or a request that cannot be met (an unknown ``--by`` key)."""


@dataclass
class Run:
    path: Path  # the run folder
    protocol: str  # "oneshot" | "fedmd"
    results: dict[str, Any]
    config: dict[str, str]  # flattened config: dotted key -> its value as JSON


@dataclass
class Skipped:
    path: Path
    why: str

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.why}"


@dataclass
class Group:
    label: str  # "synthesis=cpu", "split.alpha=0.3, synthesis=generator"
    values: dict[str, str]  # the grouping keys' values (JSON)
    runs: list[Run] = field(default_factory=list)


# ============================================================================ finding


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[Skipped]]:
    """Every complete run under ``paths`` (each folder once, in path order) and what was
    skipped, with why."""
    runs: list[Run] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    for folder, why in _expand(paths):
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        got = why or read_run(folder)
        if isinstance(got, Run):
            runs.append(got)
        else:
            skipped.append(Skipped(folder, got))
    return runs, skipped


def _expand(paths: Sequence[str | Path]) -> Iterable[tuple[Path, str | None]]:
    """(folder, None) for each run folder found, (path, why) for a path that gave none."""
    for raw in paths:
        p = Path(raw)
        matches = [Path(m) for m in sorted(glob.glob(str(raw)))] if _is_glob(str(raw)) else [p]
        if not matches or not all(m.exists() for m in matches):
            yield p, "no such file or folder"
            continue
        for m in matches:
            if m.is_file():
                if m.name == "results.json":
                    yield m.parent, None
                else:
                    yield m, "not a run folder or a results.json"
                continue
            found = list(_run_folders(m, 0))
            yield from ((f, None) for f in found)
            if not found:
                yield m, "no run folder (results.json or a stage's outputs) under it"


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[") and not Path(s).exists()


def _is_run_folder(folder: Path) -> bool:
    return (folder / "results.json").exists() or any((folder / m).exists() for m in RUN_MARKERS)


def _run_folders(folder: Path, depth: int) -> Iterable[Path]:
    """``folder`` itself if it is a run, else the run folders below it (sorted, no hidden)."""
    if _is_run_folder(folder):
        yield folder
        return
    if depth >= MAX_DEPTH:
        return
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and not sub.name.startswith("."):
            yield from _run_folders(sub, depth + 1)


# ============================================================================ reading


def read_run(folder: Path) -> Run | str:
    """The run in ``folder``, or why it cannot be compared (one line)."""
    file = folder / "results.json"
    if not file.exists():
        done = [m for m in RUN_MARKERS if (folder / m).exists()]
        return f"partial run, no results.json yet (has {', '.join(done)})"
    try:
        results = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{file} is not valid JSON ({str(e).splitlines()[0]})"
    if not isinstance(results, dict):
        return f"{file} must hold a JSON object"
    protocol = "fedmd" if "party_acc" in results else "oneshot" if "teacher_acc" in results else ""
    if not protocol:
        return f"{file} is neither a one-shot result (teacher_acc) nor a FedMD one (party_acc)"
    problem = check_results(results, protocol)
    if problem:
        return f"{file} is malformed: {problem}"
    config = protocol_config(results.get("config") or {}, protocol)
    return Run(folder, protocol, results, flat_config(config))


# The config groups each protocol reads (its results.json records the whole config, the other
# protocol's groups at their defaults): FedMD reads ``split`` only for ``fedmd.partition`` set
# to a registered partition, not to one of its own.
READS = {"fedmd": ("fedmd", "split"), "oneshot": None}
FEDMD_OWN_PARTITIONS = ("balanced", "writer", "subclass")


def protocol_config(cfg: dict[str, Any], protocol: str) -> dict[str, Any]:
    """``cfg`` without the groups ``protocol`` does not read (top-level values are kept), so a
    FedMD run is never labelled by the one-shot ``synthesis`` it did not run."""
    fedmd = cfg.get("fedmd") if isinstance(cfg.get("fedmd"), dict) else {}
    own_split = fedmd.get("partition", "balanced") in FEDMD_OWN_PARTITIONS
    reads = READS[protocol]
    if reads is None:  # one-shot: every group but FedMD's
        return {k: v for k, v in cfg.items() if k != "fedmd" or not isinstance(v, dict)}
    skip = {"split"} if own_split else set()
    return {
        k: v for k, v in cfg.items() if not isinstance(v, dict) or (k in reads and k not in skip)
    }


def _num(v: Any, none_ok: bool = True) -> bool:
    if v is None:
        return none_ok
    return isinstance(v, int | float) and not isinstance(v, bool)


def _nums(v: Any) -> bool:
    return isinstance(v, list) and all(_num(x) for x in v)


def check_results(r: dict[str, Any], protocol: str) -> str | None:
    """The first value ``compare`` would trip on, described; None when the results are usable."""
    need: dict[str, Any] = {"wall_time_s": lambda v: _num(v, False)}
    if protocol == "oneshot":
        need |= {
            "teacher_acc": _nums,
            **{k: _num for k in ("student_acc", "ensemble_acc", "fedavg_acc")},
        }
        opt: dict[str, Any] = {"synthesis_images_per_s": _num, "class_acc": _class_acc}
        opt["student_refit_acc"] = _num
        opt["student_curve"] = lambda c: (
            isinstance(c, dict) and all(_nums(c.get(k, [])) for k in ("test_acc", "elapsed_s"))
        )
    else:
        need |= {
            "party_acc": lambda v: isinstance(v, list) and v and all(_nums(a) and a for a in v),
            "alone_acc": lambda v: _nums(v) and len(v) == len(r.get("party_acc") or []),
        }
        opt = {"pooled_acc": _nums, "alone_extended_acc": _nums, "round_times_s": _nums}
    for key, ok in need.items():
        if key not in r:
            return f"'{key}' is missing"
        if not ok(r[key]):
            return f"'{key}' has an unexpected value {_short(r[key])}"
    for key, ok in opt.items():
        if r.get(key) is not None and not ok(r[key]):
            return f"'{key}' has an unexpected value {_short(r[key])}"
    if "config" in r and not isinstance(r["config"], dict):
        return "'config' must be a mapping"
    return check_ranges(r)


# Figures that are times or rates: finite and >= 0. Every ``*_acc`` key (top level, in
# ``class_acc`` and ``student_curve``) is an accuracy: a fraction in [0, 1].
NON_NEGATIVE = ("wall_time_s", "synthesis_images_per_s", "round_times_s")


def check_ranges(r: dict[str, Any]) -> str | None:
    """The first accuracy outside [0, 1] or time below 0, or any such value not finite (NaN,
    inf), described; None when all are in range."""
    where: list[tuple[str, Any, float]] = [
        (k, v, 1.0) for k, v in r.items() if k.endswith("_acc") and not isinstance(v, dict)
    ]
    for group, keys in (("class_acc", None), ("student_curve", ("test_acc",))):
        inner = r.get(group)
        if isinstance(inner, dict):
            where += [
                (f"{group}.{k}", v, 1.0) for k, v in inner.items() if keys is None or k in keys
            ]
    where += [(k, r[k], math.inf) for k in NON_NEGATIVE if k in r]
    for key, value, top in where:
        for x in _leaves(value):
            if not (isinstance(x, int | float) and 0 <= x <= top and math.isfinite(x)):
                what = "an accuracy in [0, 1]" if top == 1.0 else "a finite number >= 0"
                return f"'{key}' holds {json.dumps(x)}, not {what}"
    return None


def _leaves(v: Any) -> Iterable[Any]:
    """The numbers in a value, nested lists flattened; None (a figure a run lacks) left out."""
    if isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    elif v is not None:
        yield v


def _class_acc(v: Any) -> bool:
    return isinstance(v, dict) and all(
        v.get(k) is None or _nums(v[k]) for k in ("student", "ensemble", "fedavg")
    )


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"synthesis.lr": "0.25", ...}``: nested mappings flattened to dotted keys, each value
    as JSON text (so lists compare and hash)."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{key}."))
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out


# ============================================================================ grouping


def is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING or key.rsplit(".", 1)[-1] in BOOKKEEPING_LEAVES


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The config keys whose value is not the same in every run, bookkeeping left out."""
    keys = sorted({k for r in runs for k in r.config})
    return [
        k
        for k in keys
        if not is_bookkeeping(k) and len({r.config.get(k, ABSENT) for r in runs}) > 1
    ]


ABSENT = "(absent)"


def resolve_by(runs: Sequence[Run], by: Sequence[str]) -> list[str]:
    """``--by`` keys as config keys: ``synthesis`` stands for ``synthesis.name``; a key no run
    of this protocol reads is one CompareError line naming the protocol."""
    known = {k for r in runs for k in r.config}
    out = []
    for key in by:
        if key in known:
            out.append(key)
        elif f"{key}.name" in known:
            out.append(f"{key}.name")
        else:
            differ = ", ".join(differing_keys(runs)) or "none: the runs differ only in seed"
            kind = PROTOCOLS[runs[0].protocol] if runs else ""
            raise CompareError(
                f"--by {key}: no {kind} run's config has this key (compare the protocols apart"
                f" if only the other reads it); keys that differ between these runs: {differ}"
            )
    return out


def label_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The fewest of ``keys`` that still tell the groups apart, for short labels: preset and
    group names first (``experiment``, ``synthesis.name``), then each other key only where it
    is not already decided by those chosen (``synthesis.lr`` follows from ``synthesis.name``)."""
    order = sorted(keys, key=lambda k: (k != "experiment", not k.endswith(".name"), k))
    chosen: list[str] = []
    for key in order:
        seen: dict[tuple[str, ...], str] = {}
        for r in runs:
            sig = tuple(r.config.get(c, ABSENT) for c in chosen)
            if seen.setdefault(sig, r.config.get(key, ABSENT)) != r.config.get(key, ABSENT):
                chosen.append(key)
                break
    return chosen


def _label(values: dict[str, str], keys: Sequence[str]) -> str:
    def show(key: str) -> str:
        v = values[key]
        text = json.loads(v) if v != ABSENT else v
        return f"{key.removesuffix('.name')}={text if isinstance(text, str) else v}"

    return ", ".join(show(k) for k in keys)


def group_runs(
    runs: Sequence[Run], by: Sequence[str] | None = None
) -> tuple[list[Group], list[str]]:
    """Runs of one protocol in groups of equal values of the ``by`` keys (default: every key
    that differs between the runs), sorted by those values (numbers as numbers); with the keys
    the labels show."""
    keys = resolve_by(runs, by) if by else differing_keys(runs)
    groups: dict[tuple[str, ...], Group] = {}
    for r in runs:
        values = {k: r.config.get(k, ABSENT) for k in keys}
        groups.setdefault(tuple(values.values()), Group("", values)).runs.append(r)
    shown = list(keys) if by else label_keys(runs, keys)
    for g in groups.values():
        g.label = _label(g.values, shown) if shown else "all runs"
    return sorted(groups.values(), key=lambda g: _sort_key(g, shown)), shown


def _sort_key(g: Group, keys: Sequence[str]) -> tuple:
    """Numbers in numeric order, the rest as text."""
    out = []
    for k in keys:
        try:
            v = json.loads(g.values[k])
        except json.JSONDecodeError:
            v = g.values[k]
        is_num = isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
        out.append((0, v, "") if is_num else (1, 0, str(v)))
    return tuple(out)
