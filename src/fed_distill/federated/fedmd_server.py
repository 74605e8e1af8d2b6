"""FedMD's server side: check each party's class scores, aggregate them into the consensus, and
draw each round's public subset. Plain functions of tensors: the in-process rounds
(:mod:`fed_distill.federated.fedmd_run`) and the Flower server both call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.config import AGGREGATES
from fed_distill.federated.fedmd_data import stratified_subset


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


def aggregate(
    scores_list: Sequence[torch.Tensor],
    method: str = "mean",
    weights: Sequence[float] | None = None,
    trim: float = 0.1,
) -> torch.Tensor:
    """Aggregate (server): the consensus of the parties' scores, element-wise.

    * ``mean`` -- the paper's average; optional per-party ``weights`` (normalised to sum 1).
    * ``median`` -- coordinate-wise median (the mean of the two middle values for an even count).
    * ``trimmed_mean`` -- per coordinate, drop the ``floor(trim * n)`` lowest and highest values
      and average the rest.

    The robust options bound the influence of a few outlier parties.
    """
    if len(scores_list) == 0:
        raise ProtocolError("aggregate: no party sent class scores")
    if method not in AGGREGATES:
        raise ConfigError(f"fedmd.aggregate must be one of {', '.join(AGGREGATES)}, got '{method}'")
    stack = torch.stack([s.float() for s in scores_list])  # (P, N, C)
    n = stack.shape[0]
    if weights is not None:
        if method != "mean":
            raise ConfigError(f"aggregate weights only apply to mean, not '{method}'")
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        if w.shape != (n,) or not bool(torch.isfinite(w).all()) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(
                f"aggregate weights must be {n} non-negative numbers with a positive sum, "
                f"got {list(weights)}"
            )
        return torch.einsum("p,pnc->nc", w / w.sum(), stack)
    if method == "mean":
        return stack.mean(0)
    ordered = stack.sort(dim=0).values
    if method == "median":
        mid = n // 2
        return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    if not 0 <= trim < 0.5:
        raise ConfigError(f"fedmd.trim must be in [0, 0.5), got {trim}")
    k = int(math.floor(trim * n))
    return ordered[k : n - k].mean(0)


def collect_scores(
    messages: Sequence[Any],
    expected_shape: Sequence[int],
    party_names: Sequence[str],
    on_invalid: str = "error",
) -> tuple[list[torch.Tensor], list[int], list[dict[str, Any]]]:
    """Validate every party's message (server side).

    Returns the valid scores, the indices of the parties they came from, and the left-out
    parties (``{"party", "reason"}``). ``on_invalid="error"`` raises the first ProtocolError;
    ``"skip"`` leaves the party out of this round's consensus (at least one must remain).
    """
    valid, used, left_out = [], [], []
    for i, (msg, name) in enumerate(zip(messages, party_names, strict=True)):
        try:
            valid.append(validate_scores(msg, expected_shape, name))
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
