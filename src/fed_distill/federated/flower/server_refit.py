"""The statistics round (``refit=head``) over Flower: the server sends the distilled student to
every client that uploaded a teacher, each returns per-class sums of the student's features on
its own images (the ClientApp's ``oneshot_feature_stats``, which calls the same protocol function
as the in-process runner), and every reply is checked on arrival: for the student sent and this
round's settings, well-formed (:func:`fed_distill.federated.refit.check_upload`). A client whose
reply is missing or refused is left out with its reason; the others' statistics are written to
``feedback/`` exactly as in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from fed_distill.config import as_object
from fed_distill.errors import ProtocolError
from fed_distill.feature_stats import (
    FEATURE_STATS_FILE,
    FEEDBACK_DIR,
    save_feature_stats,
)
from fed_distill.federated.flower.common import client_message, from_record, parse_faults
from fed_distill.federated.flower.exchange import connect, fault_options, late_parties, say
from fed_distill.federated.refit import Round, check_upload, client_noise_seed
from fed_distill.federated.refit_config import RefitConfig

ONESHOT_STATS = "query.oneshot_feature_stats"  # run the student, upload feature statistics
REFIT_ROUND = 1  # --fault CLIENT:1:KIND targets this round (the teachers' upload is round 0)


def flower_feature_stats(
    grid: Grid,
    job: dict[str, Any],
    cfg,
    ctx: Any,
    rnd: Round,
    extra: dict[str, Any],
) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Ask each kept client (renumbered as in split.json; its node is its original client's)
    for its statistics; returns the accepted ones by client and who was left out, and why."""
    rcfg: RefitConfig = as_object(cfg.refit, RefitConfig)
    split, n = ctx.split, ctx.split.num_teachers
    nodes = list(extra.get("teacher_clients") or range(n))  # kept client j runs on node nodes[j]
    total = int(job["num_nodes"])  # every client's node, as the teachers' round connected
    timeout = float(job["timeout"])
    ex = connect(
        grid, total, [f"client {i}" for i in range(total)], float(job["wait_nodes_s"]), timeout
    )
    faults = parse_faults(job.get("faults"))
    weights = {k: v.detach().cpu() for k, v in rnd.student.state_dict().items()}
    spec = {"model": rnd.model, "model_kwargs": rnd.model_kwargs}
    asks = {
        nodes[j]: client_message(
            split,
            split.clients[j],
            weights,
            job,
            client=nodes[j],
            spec=spec,
            noise_seed=client_noise_seed(cfg, rcfg, j),
            **fault_options(faults, nodes[j], REFIT_ROUND, timeout, forced=True),
        )
        for j in range(n)
    }
    late = late_parties(faults, REFIT_ROUND)
    replies, left = ex.ask(ONESHOT_STATS, asks, timeout, "refit", late=late)
    back = {node: j for j, node in enumerate(nodes)}
    # "party": the teacher's index in split.json; "client": the client (node) it came from
    left_out = [{"party": back[p], "client": p, "reason": why} for p, why in sorted(left.items())]
    stats: dict[int, dict[str, torch.Tensor]] = {}
    k = ctx.data.info.num_classes
    fb = Path(str(cfg.run_dir)) / FEEDBACK_DIR
    for node, m in sorted(replies.items()):
        j, who = back[node], f"client {node}"
        try:
            if m.content.get("arrays") is None:
                raise ProtocolError(f"{who}: the reply holds no statistics")
            st = from_record(m.content["arrays"])
            said = {key: m.content["metrics"].get(key) for key in ("student", "round")}
            check_upload(st, said, rnd.want, rnd.dim, k, rcfg, who)
        except ProtocolError as e:
            say(f"left out: {e}")
            left_out.append({"party": j, "client": node, "reason": str(e)})
            continue
        save_feature_stats(st, fb / FEATURE_STATS_FILE.format(j), rnd.want)
        stats[j] = st
    left_out.sort(key=lambda d: d["party"])
    return stats, left_out
