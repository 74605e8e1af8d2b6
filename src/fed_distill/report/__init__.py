"""``fed-distill report RUN_DIR``: a ``report.md`` with PNG figures beside it, for any run folder.

The report reads only what the stages wrote (JSON, safetensors-free tensors with
``weights_only=True``), detects the kind of run (one-shot pipeline, complete or partial, or
FedMD) and says what is missing instead of failing. A file that is present but malformed is an
error (one line, nothing written): a report must not paper over a corrupt result.

The package: ``common`` (the Report being assembled, checked reading, tables), ``figures`` (the
plots), ``oneshot`` and ``fedmd`` (one module per run type, a function per section) and
``summary`` (:func:`stage_summary`, the one-screen summary the CLI prints after stages that do
not print their own table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fed_distill.artifacts import write_text
from fed_distill.report.common import (
    PREFIX,
    Figure,
    Report,
    ReportError,
    _read_json,
    md_table,
)
from fed_distill.report.fedmd import FEDMD_KEYS, fedmd_report
from fed_distill.report.figures import (
    plot_accuracy_bars,
    plot_consensus_distance,
    plot_label_distribution,
    plot_student_curves,
    plot_synthetic_grid,
    plot_teacher_curves,
    plot_times,
)
from fed_distill.report.oneshot import ONESHOT_KEYS, oneshot_report
from fed_distill.report.summary import stage_summary

__all__ = [
    "FEDMD_KEYS",
    "ONESHOT_KEYS",
    "PREFIX",
    "Figure",
    "Report",
    "ReportError",
    "md_table",
    "plot_accuracy_bars",
    "plot_consensus_distance",
    "plot_label_distribution",
    "plot_student_curves",
    "plot_synthetic_grid",
    "plot_teacher_curves",
    "plot_times",
    "run_report",
    "stage_summary",
    "write_report",
]


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
            fedmd_report(rep, results)
        else:
            oneshot_report(rep)
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
