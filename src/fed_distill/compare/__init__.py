"""``fed-distill compare PATH... [--by KEY,...] --out DIR``: runs side by side, as a table of
means and spreads over seeds.

Reads each run's ``results.json`` (run folders, a ``--multirun`` sweep folder, globs), groups the
runs by the config keys whose values differ between them (seed, run_dir and other bookkeeping
left out; ``--by`` names the keys instead), and per protocol prints a table of mean ± std and n
of the headline figures. Writes ``compare.md`` (the tables, which runs are in which group, what
was skipped), ``compare.csv`` (a row per group and figure) and ``compare_oneshot.png`` /
``compare_fedmd.png`` (accuracy against epochs or rounds and against wall time, the mean with a
band of one std per group) into ``--out``. One-shot and FedMD runs are never mixed in a table.

The package: ``runs`` (finding, reading, grouping), ``summary`` (the statistics, tables, CSV
rows), ``figures``. None of it imports torch, so the command starts in about a second.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fed_distill.compare.figures import AXES, plot_curves
from fed_distill.compare.runs import (
    PROTOCOLS,
    CompareError,
    Group,
    Run,
    Skipped,
    differing_keys,
    find_runs,
    group_runs,
)
from fed_distill.compare.summary import CSV_HEADER, csv_rows, table
from fed_distill.files import write_text

__all__ = ["CompareError", "Comparison", "compare", "run_compare"]

USAGE = "usage: fed-distill compare PATH... [--by KEY,...] --out DIR"


@dataclass
class Comparison:
    """What ``compare`` found and wrote."""

    out: Path
    groups: dict[str, list[Group]]  # protocol -> its groups of runs
    shown: dict[str, list[str]]  # protocol -> the keys its group labels show
    varied: dict[str, list[str]]  # protocol -> keys that differ between the runs
    skipped: list[Skipped]
    figures: dict[str, str] = field(default_factory=dict)  # protocol -> file name in out
    replaced: list[str] = field(default_factory=list)  # files of an earlier compare overwritten

    @property
    def runs(self) -> int:
        return sum(len(g.runs) for gs in self.groups.values() for g in gs)


def compare(
    paths: Sequence[str | Path],
    out: str | Path,
    by: Sequence[str] | None = None,
    command: str | None = None,
) -> Comparison:
    """Compare the runs under ``paths`` and write compare.md, compare.csv and the figures into
    ``out``; a CompareError (one line) when no complete run is found or ``out`` cannot take
    the files (checked before anything is read or written). ``command``, if given, is quoted
    at the top of compare.md."""
    out = check_out(out)
    runs, skipped = find_runs(paths)
    if not runs:
        why = f": {skipped[0]}" if len(skipped) == 1 else f" ({len(skipped)} paths skipped)"
        raise CompareError(f"nothing to compare, no complete run found{why}")
    cmp = Comparison(out, {}, {}, {}, skipped)
    for protocol in PROTOCOLS:
        mine: list[Run] = [r for r in runs if r.protocol == protocol]
        if mine:
            cmp.groups[protocol], cmp.shown[protocol] = group_runs(mine, by)
            cmp.varied[protocol] = differing_keys(mine)
    before = {name for name in OUTPUTS if (out / name).exists()}
    try:
        _write(cmp, by, command)
    except OSError as e:  # the disk filled, the folder went away: still one line
        raise CompareError(f"--out {out}: cannot write the comparison ({e})") from None
    written = ["compare.md", "compare.csv", *cmp.figures.values()]
    cmp.replaced = [name for name in written if name in before]
    return cmp


def _write(cmp: Comparison, by: Sequence[str] | None, command: str | None) -> None:
    for protocol, groups in cmp.groups.items():
        name = f"compare_{protocol}.png"
        if plot_curves(groups, protocol, cmp.out / name):
            cmp.figures[protocol] = name
    write_text(markdown(cmp, by, command), cmp.out / "compare.md")
    write_text(csv_text(cmp), cmp.out / "compare.csv")


OUTPUTS = ("compare.md", "compare.csv", *(f"compare_{p}.png" for p in PROTOCOLS))


def check_out(out: str | Path) -> Path:
    """``--out DIR``: a folder (existing, or creatable: its nearest existing parent is a
    writable folder) whose ``compare.*`` files are not folders; else one CompareError line
    naming the path. Creates and writes nothing."""
    out = Path(out).expanduser()
    fix = "choose another --out"
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file, not a folder; {fix}")
    base = out
    while not base.exists():
        if base.parent == base:
            break
        base = base.parent
    if base != out and not base.is_dir():
        raise CompareError(f"--out {out} cannot be created: {base} is a file; {fix}")
    try:  # a real probe (a permission check alone says yes to root on a read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=".fed-distill-probe-", dir=base))
    except OSError as e:
        what = "is not writable" if base == out else f"cannot be created in {base}"
        raise CompareError(f"--out {out} {what} ({e.strerror or e}); {fix}") from None
    for name in OUTPUTS:
        if (out / name).exists() and not (out / name).is_file():
            raise CompareError(f"--out {out}: {name} there is not a file; {fix}")
    return out


def csv_text(cmp: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for protocol, groups in cmp.groups.items():
        w.writerows([["" if v is None else v for v in row] for row in csv_rows(groups, protocol)])
    return buf.getvalue()


LEGEND = {
    "oneshot": (
        "Accuracies in % on the dataset's official test split; *student/ens*: the student's "
        "accuracy as a share of the teachers' ensemble's; *synth img/s*: synthetic images per "
        "second of synthesis; *wall s*: the whole run; *worst class gap*: ensemble minus student "
        "in points on the class where it is largest on average over the group's runs."
    ),
    "fedmd": (
        "Means over the parties of each run, in % on the private task's test set: *alone* after "
        "transfer learning, *alone ext.* the no-collaboration control, *final* after the last "
        "round, *pooled* the upper bound; *gain*: final minus alone, in points; *gap closed*: "
        "(final - alone) / (pooled - alone); *wall s*: the whole run."
    ),
}


def _grouping_line(cmp: Comparison, protocol: str, by: Sequence[str] | None) -> str:
    shown, varied = cmp.shown[protocol], cmp.varied[protocol]
    if by:
        within = [k for k in varied if k not in shown]
        line = "Grouped by " + ", ".join(f"`{k}`" for k in shown) + " (`--by`)."
        if within:
            line += " Also differing between runs of one group: " + ", ".join(
                f"`{k}`" for k in within
            )
        return line + "."
    if not varied:
        return "The runs differ only in seed and bookkeeping: one group."
    rest = [k for k in varied if k not in shown]
    line = "Grouped by the config keys that differ between the runs (seed, run_dir and other "
    line += "bookkeeping left out): " + ", ".join(f"`{k}`" for k in shown)
    if rest:
        line += f"; {len(rest)} more follow from these ({', '.join(f'`{k}`' for k in rest[:6])}"
        line += ", …)" if len(rest) > 6 else ")"
    return line + "."


def markdown(cmp: Comparison, by: Sequence[str] | None = None, command: str | None = None) -> str:
    """compare.md: per protocol the grouping, the table, the figure and the runs of each group;
    then what was skipped."""
    parts = [f"# Comparison of {cmp.runs} run(s)\n"]
    if command:
        parts.append(f"`{command}`\n")
    for protocol, groups in cmp.groups.items():
        n = sum(len(g.runs) for g in groups)
        name = PROTOCOLS[protocol][:1].upper() + PROTOCOLS[protocol][1:]
        parts.append(f"## {name}: {n} run(s) in {len(groups)} group(s)\n")
        parts.append(
            _grouping_line(cmp, protocol, by) + " Mean ± sample std over a group's runs.\n"
        )
        parts.append(table(groups, protocol, markdown=True) + "\n")
        parts.append(LEGEND[protocol] + "\n")
        if protocol in cmp.figures:
            x, t, _, title = AXES[protocol]
            parts.append(f"![{title}]({cmp.figures[protocol]})\n")
            parts.append(f"*{title}: against {x} and against {t}; band = ± 1 std.*\n")
        parts.append("Runs:\n")
        parts += [f"- {g.label}: " + ", ".join(f"`{r.path}`" for r in g.runs) for g in groups]
        parts.append("")
    if cmp.skipped:
        parts.append("## Skipped\n")
        parts += [f"- `{s.path}`: {s.why}" for s in cmp.skipped]
        parts.append("")
    parts.append("---\n*Written by `fed-distill compare`.*\n")
    return "\n".join(parts)


def parse_args(args: Sequence[str]) -> tuple[list[str], list[str] | None, str]:
    """PATH..., ``--by KEY,...`` (or ``--by=...``) and ``--out DIR`` (or ``--out=DIR``)."""
    paths: list[str] = []
    opts: dict[str, str] = {}
    it = iter(args)
    for a in it:
        name, eq, value = a.partition("=")
        if name in ("--by", "--out"):
            value = value if eq else next(it, "")
            if not value:
                raise CompareError(f"{name} needs a value; {USAGE}")
            opts[name] = value
        elif a.startswith("-"):
            raise CompareError(f"unknown option '{a}'; {USAGE}")
        else:
            paths.append(a)
    if not paths or "--out" not in opts:
        raise CompareError(f"{'no PATH given' if not paths else '--out DIR is required'}; {USAGE}")
    by = [k.strip() for k in opts["--by"].split(",") if k.strip()] if "--by" in opts else None
    return paths, by, opts["--out"]


def run_compare(args: Sequence[str]) -> Comparison | None:
    """``fed-distill compare``: print the tables and what was skipped, write the files."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n")[1].strip())
        return None
    paths, by, out = parse_args(args)
    cmp = compare(paths, out, by, command=f"fed-distill compare {shlex.join(args)}")
    for protocol, groups in cmp.groups.items():
        print(f"== {PROTOCOLS[protocol]} ({sum(len(g.runs) for g in groups)} runs)")
        print(table(groups, protocol))
        print()
    for s in cmp.skipped:
        print(s)
    files = ["compare.md", "compare.csv", *cmp.figures.values()]
    again = f" (replacing the earlier {', '.join(cmp.replaced)})" if cmp.replaced else ""
    print(f"wrote {', '.join(files)} in {cmp.out}{again}")
    return cmp
