"""The table a one-shot run prints at its end (teachers, ensemble, FedAvg, student and, with the
statistics round, the re-fitted student beside it)."""

from __future__ import annotations

from typing import Any

from fed_distill.federated import per_class
from fed_distill.tables import format_table


def _pct(v: float | None) -> str:
    return "—" if v is None or v != v else f"{100 * v:.2f}"


def print_summary(res: dict[str, Any]) -> None:
    rows = [
        [f"teacher {i}", _pct(a), _pct(b)]
        for i, (a, b) in enumerate(zip(res["teacher_acc"], res["teacher_local_acc"], strict=True))
    ]
    rows += [
        [f"ensemble ({res['ensemble_method']})", _pct(res["ensemble_acc"]), ""],
        *[
            [f"ensemble ({m})", _pct(a), ""]
            for m, a in res["ensemble_acc_by_method"].items()
            if m != res["ensemble_method"]
        ],
        ["FedAvg (one-shot)", _pct(res["fedavg_acc"]), ""],
        ["student (one-shot, data-free)", _pct(res["student_acc"]), ""],
    ]
    if res.get("student_refit_acc") is not None:
        rows.append(["student + statistics round", _pct(res["student_refit_acc"]), ""])
    print(format_table(["model", "test acc %", "local test %"], rows))
    if res.get("fedavg_note"):
        print(f"FedAvg (one-shot): {res['fedavg_note']}")
    if line := per_class.worst_classes_line(res):
        print(line)
    if res.get("student_refit_acc") is not None:
        who = "student + statistics round"
        if line := per_class.worst_classes_line(res, key="student_refit", who=who):
            print(line)
    times = ", ".join(f"{k} {v:.0f}s" for k, v in res["stage_times_s"].items())
    print(
        f"wall time {res['wall_time_s']:.0f}s ({times}); synthesis {res['synthetic_images']} images at"
        f" {res['synthesis_images_per_s'] or 0:.0f} images/s"
    )
