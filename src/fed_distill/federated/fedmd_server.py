"""FedMD's server side: check each party's class scores, aggregate them into the consensus, and
draw each round's public subset. Plain functions of tensors: the in-process rounds
(:mod:`fed_distill.federated.fedmd_run`) and the Flower server both call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.config import FedMDConfig
from fed_distill.federated.fedmd_consensus import aggregate, get_rule, validate_extra
from fed_distill.federated.fedmd_data import FedMDData, stratified_subset
from fed_distill.federated.rules import rule_options


def validate_scores(scores: Any, expected_shape: Sequence[int], party: str | int) -> torch.Tensor:
    """Check one party's message (server side): a finite float tensor of ``expected_shape``.

    Raises :class:`ProtocolError` with a one-line message naming the party; returns the scores
    as float32 on the CPU.
    """
    who = party if isinstance(party, str) else f"party {party}"
    expected = tuple(int(s) for s in expected_shape)
    if not isinstance(scores, torch.Tensor):
        raise ProtocolError(
            f"{who}: class scores must be a tensor of shape {expected}, got {type(scores).__name__}"
        )
    if not torch.is_floating_point(scores):
        raise ProtocolError(f"{who}: class scores must be floating point, got dtype {scores.dtype}")
    if tuple(scores.shape) != expected:
        raise ProtocolError(
            f"{who}: class scores have shape {tuple(scores.shape)}, expected {expected} "
            "(public subset size x number of outputs)"
        )
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(scores).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise ProtocolError(
            f"{who}: class scores contain {n_nan} NaN and {n_inf} Inf values "
            f"(of {scores.numel()}); the party's model has diverged"
        )
    return scores.detach().to("cpu", torch.float32)


def validate_report(
    msg: Any, expected_shape: Sequence[int], party: str | int, sends: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """Check one party's whole message (server side): its scores (:func:`validate_scores`) and
    what the rule needs besides (``sends``: ``class_counts``, ``reliability``). ``msg``: a dict
    of tensors, or the scores alone. A ProtocolError naming the party for anything amiss."""
    who = party if isinstance(party, str) else f"party {party}"
    parts = msg if isinstance(msg, dict) else {"scores": msg}
    report = {"scores": validate_scores(parts.get("scores"), expected_shape, who)}
    for name in sends:
        if name not in parts:
            raise ProtocolError(f"{who}: the message lacks '{name}', which the rule needs")
        report[name] = validate_extra(name, parts[name], int(expected_shape[-1]), who)
    return report


def collect_scores(
    messages: Sequence[Any],
    expected_shape: Sequence[int],
    party_names: Sequence[str],
    on_invalid: str = "error",
    sends: Sequence[str] = (),
) -> tuple[list[dict[str, torch.Tensor]], list[int], list[dict[str, Any]]]:
    """Validate every party's message (server side, :func:`validate_report`).

    Returns the valid reports (``{"scores", *sends}``), the indices of the parties they came
    from, and the left-out parties (``{"party", "reason"}``). ``on_invalid="error"`` raises the
    first ProtocolError; ``"skip"`` leaves the party out of this round's consensus (at least
    one must remain).
    """
    valid, used, left_out = [], [], []
    for i, (msg, name) in enumerate(zip(messages, party_names, strict=True)):
        try:
            valid.append(validate_report(msg, expected_shape, name, sends))
            used.append(i)
        except ProtocolError as e:
            if on_invalid != "skip":
                raise
            left_out.append({"party": i, "reason": str(e)})
    if not valid:
        raise ProtocolError(
            "every party's class scores were rejected this round: "
            + "; ".join(d["reason"] for d in left_out)
        )
    return valid, used, left_out


def consensus_of(
    reports: Sequence[dict[str, torch.Tensor]], c: FedMDConfig, used: Sequence[int]
) -> torch.Tensor:
    """Aggregate (server): the consensus of the valid reports of parties ``used`` by the run's
    rule (``fedmd.aggregate`` with its options, sharpen). Both runners call this."""
    extra = {
        name: torch.stack([r[name] for r in reports]).squeeze(-1)
        if name == "reliability"
        else torch.stack([r[name] for r in reports])
        for name in get_rule(c.aggregate).sends
    }
    return aggregate(
        [r["scores"] for r in reports],
        c.aggregate,
        rule_options(c),
        parties=used,
        kind=c.scores,
        temperature=c.temperature,
        sharpen_t=c.sharpen,
        **extra,
    )


def consensus_accuracy(
    consensus: torch.Tensor, true_y: torch.Tensor, blocks: Sequence[tuple[int, int]]
) -> float | None:
    """The consensus's accuracy on the public subset's images whose true label the benchmark
    knows (``true_y`` >= 0; never shown to a party), each image scored as the parties are:
    by the argmax over its own task's outputs, ``blocks`` = (first output, count) per task
    (the public classes, the private ones). None where no image's label is in a block."""
    right, total = 0, 0
    for lo, count in blocks:
        keep = (true_y >= lo) & (true_y < lo + count)
        pred = consensus[keep][:, lo : lo + count].argmax(1) + lo
        right += int((pred == true_y[keep]).sum())
        total += int(keep.sum())
    return right / total if total else None


def _task_blocks(data: FedMDData) -> list[tuple[int, int]]:
    """(first output, count) per task: the public classes (where they have outputs), the
    private ones."""
    private = (data.offset, data.num_private)
    return [(0, data.offset), private] if data.offset > 0 else [private]


def oracle_corrected(
    consensus: torch.Tensor, true_y: torch.Tensor, blocks: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """A diagnostic consensus (``fedmd.oracle_consensus``): on every image whose true label
    the benchmark knows and whose argmax over its task's outputs is wrong, the scores of the
    predicted and the true class are swapped. Scale and softness stay those of the rule's
    consensus; its accuracy on those images becomes 1. What FedMD reaches with it is what a
    consensus right on every such image, with the rule's margins, gives the same digest and
    revisit (not a ceiling: another rule's score shape can do better)."""
    out = consensus.clone()
    for lo, count in blocks:
        rows = torch.nonzero((true_y >= lo) & (true_y < lo + count)).flatten()
        pred = out[rows, lo : lo + count].argmax(1) + lo
        wrong = pred != true_y[rows]
        rows, pred, true = rows[wrong], pred[wrong], true_y[rows][wrong]
        a, b = out[rows, pred].clone(), out[rows, true].clone()
        out[rows, pred], out[rows, true] = b, a
    return out


def round_consensus(
    consensus: torch.Tensor, c: FedMDConfig, data: FedMDData, idx: torch.Tensor
) -> torch.Tensor:
    """The consensus a round distributes: the rule's, or its oracle-corrected form where
    ``fedmd.oracle_consensus`` (a diagnostic only the benchmark's labels make possible)."""
    if not c.oracle_consensus:
        return consensus
    return oracle_corrected(consensus, data.public_true_y[idx], _task_blocks(data))


def record_consensus(st: Any, consensus: torch.Tensor, data: FedMDData, idx: torch.Tensor) -> None:
    """The consensus's accuracy on the round's subset where the benchmark knows the labels,
    each image over its own task's outputs (``consensus_acc``), and on the private classes'
    images only (``consensus_private_acc``), appended to ``st`` (a RunState or the Flower
    server's log)."""
    true_y, private = data.public_true_y[idx], (data.offset, data.num_private)
    st.consensus_acc.append(consensus_accuracy(consensus, true_y, _task_blocks(data)))
    st.consensus_private_acc.append(consensus_accuracy(consensus, true_y, [private]))


def consensus_distance(scores: torch.Tensor, consensus: torch.Tensor) -> float:
    """Mean absolute difference between one party's scores and the consensus."""
    return (scores.float() - consensus.float()).abs().mean().item()


def draw_public_subset(public_y: torch.Tensor, size: int, seed: int, round_: int) -> np.ndarray:
    """Indices of this round's stratified public subset (the same for every party).

    Strata are the public labels; the unlabelled public images (label -1) form one stratum, so
    no label of theirs is ever used.
    """
    if size > len(public_y):
        raise ConfigError(
            f"fedmd.public_subset_size={size} is larger than the public set ({len(public_y)})"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 4242, int(round_)]))
    return stratified_subset(public_y.numpy(), size, rng)
