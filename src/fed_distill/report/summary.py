"""The one-screen summary the CLI prints after stages that do not print a table of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fed_distill.artifacts import load_tensors
from fed_distill.errors import FedDistillError
from fed_distill.report.common import _f, _pct, _read_json


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
