"""FedMD's consensus rules (``fedmd.aggregate``) and DS-FL's sharpening (``fedmd.sharpen``).

A rule turns the parties' class scores on the round's public subset, (P, N, C), into one
(N, C) consensus. What the parties send (``fedmd.scores``) is kept: with ``logits`` the
consensus is logits (what the paper's MAE digest matches), with ``softmax`` it is a
distribution (what the KL digest, or MAE on softmax, matches). Rules that need a party's
confidence read it from its probabilities: ``softmax(logits / fedmd.temperature)`` for logits,
the scores themselves for softmax.

* ``mean`` -- the paper's average (optional static per-party ``aggregate_weights``).
* ``median`` / ``trimmed_mean`` -- coordinate-wise robust options.
* ``confidence`` -- per sample, party k's scores weighted by its certainty on that sample,
  ``1 - H(p_k) / log C`` (entropy-weighted ensembles, as in FedDS).
* ``class_share`` -- per class, party k's scores weighted by its share of that class's private
  data (the counts each party sends; the one-shot ``weighted`` ensemble's rule). Columns
  nobody holds privately (the public classes) are averaged equally; with softmax scores the
  rows are renormalised. With FedMD's balanced partition every share is equal: the mean.
* ``reliability`` -- party k weighted by its accuracy on a held-out part of its own private
  data (``fedmd.reliability_holdout`` images per party, never trained on), sent with its scores.

``sharpen`` (T, 1 = off) then divides the consensus's log-probabilities by T: logits / T, or
p^(1/T) renormalised. T < 1 lowers the entropy (DS-FL's entropy-reduction averaging; DS-FL
writes it as softmax(mean p / T), which is not the identity at T = 1, so this is its
temperature form on log-probabilities).

Every rule lives in :data:`RULES` with what parties must send for it and its own config check;
the start-up validation (``check_fedmd_config``) calls :func:`check_consensus_config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fed_distill.ensemble import class_shares
from fed_distill.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class Inputs:
    """What a rule combines: the scores (P, N, C) as sent, the parties' probabilities (P, N, C)
    and what parties sent besides (``class_counts`` (P, C), ``reliability`` (P,))."""

    scores: torch.Tensor
    probs: torch.Tensor
    kind: str
    weights: torch.Tensor | None = None
    trim: float = 0.1
    class_counts: torch.Tensor | None = None
    reliability: torch.Tensor | None = None


@dataclass(frozen=True)
class Rule:
    """A consensus rule: ``combine(inputs) -> (N, C)``, what each party sends with its scores,
    and its config check (a message for a value it cannot use, else None)."""

    combine: Callable[[Inputs], torch.Tensor]
    sends: tuple[str, ...] = ()
    check: Callable[[Any], str | None] = lambda c: None


def _weighted(w: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-party weights (P,) or per party and sample (P, N), normalised over parties."""
    w = w / w.sum(0, keepdim=True)
    return (w.reshape(*w.shape, *([1] * (scores.dim() - w.dim()))) * scores).sum(0)


def _mean(x: Inputs) -> torch.Tensor:
    return x.scores.mean(0) if x.weights is None else _weighted(x.weights, x.scores)


def _median(x: Inputs) -> torch.Tensor:
    n, ordered = x.scores.shape[0], x.scores.sort(dim=0).values
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _trimmed_mean(x: Inputs) -> torch.Tensor:
    if not 0 <= x.trim < 0.5:
        raise ConfigError(f"fedmd.trim must be in [0, 0.5), got {x.trim}")
    n = x.scores.shape[0]
    k = int(math.floor(x.trim * n))
    return x.scores.sort(dim=0).values[k : n - k].mean(0)


def confidence_weights(probs: torch.Tensor) -> torch.Tensor:
    """(P, N) certainty of each party on each sample: ``1 - H(p) / log C`` (1 = one-hot,
    0 = uniform), floored at 1e-6 so a sample where every party is unsure gets the mean."""
    c = probs.shape[-1]
    if c < 2:
        return torch.ones(probs.shape[:-1])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return (1.0 - entropy / math.log(c)).clamp_min(1e-6)


def _confidence(x: Inputs) -> torch.Tensor:
    return _weighted(confidence_weights(x.probs), x.scores)


def _class_share(x: Inputs) -> torch.Tensor:
    if x.class_counts is None:
        raise ProtocolError("aggregate=class_share needs every party's class counts")
    shares = class_shares(x.class_counts)  # (P, C); columns sum to 1
    out = (shares[:, None, :] * x.scores).sum(0)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12) if x.kind == "softmax" else out


def _reliability(x: Inputs) -> torch.Tensor:
    if x.reliability is None:
        raise ProtocolError("aggregate=reliability needs every party's reliability")
    w = x.reliability.float()
    return _weighted(w if w.sum() > 0 else torch.ones_like(w), x.scores)


def _needs_holdout(c: Any) -> str | None:
    if c.reliability_holdout < 1:
        return (
            "aggregate=reliability needs fedmd.reliability_holdout >= 1 (private images per"
            f" party held out to measure it), got {c.reliability_holdout}"
        )
    return None


RULES: dict[str, Rule] = {
    "mean": Rule(_mean),
    "median": Rule(_median),
    "trimmed_mean": Rule(_trimmed_mean),
    "confidence": Rule(_confidence),
    "class_share": Rule(_class_share, sends=("class_counts",)),
    "reliability": Rule(_reliability, sends=("reliability",), check=_needs_holdout),
}


def list_rules() -> list[str]:
    return list(RULES)


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ConfigError(f"fedmd.aggregate must be one of {', '.join(RULES)}, got '{name}'")
    return RULES[name]


def check_consensus_config(c: Any) -> None:
    """The consensus settings of a FedMDConfig: the rule's name and own check, ``sharpen``."""
    rule = get_rule(c.aggregate)
    msg = rule.check(c)
    if msg is not None:
        raise ConfigError(f"fedmd.{msg}")
    s = c.sharpen
    if not (isinstance(s, int | float) and math.isfinite(s) and s > 0):
        raise ConfigError(f"fedmd.sharpen must be a finite number > 0 (1 = off), got {s}")


def sharpen(consensus: torch.Tensor, t: float, kind: str = "logits") -> torch.Tensor:
    """Divide the consensus's log-probabilities by ``t``: logits / t, or p^(1/t) renormalised
    (``t`` = 1: unchanged; < 1: sharper, lower entropy)."""
    if t == 1:
        return consensus
    if kind == "logits":
        return consensus / t
    return F.softmax(consensus.clamp_min(1e-12).log() / t, dim=-1)


def _party_weights(weights: Sequence[float], n: int) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.shape != (n,) or not bool(torch.isfinite(w).all()) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"aggregate weights must be {n} non-negative numbers with a positive sum, "
            f"got {list(weights)}"
        )
    return w


def aggregate(
    scores_list: Sequence[torch.Tensor],
    method: str = "mean",
    weights: Sequence[float] | None = None,
    trim: float = 0.1,
    *,
    kind: str = "logits",
    temperature: float = 1.0,
    sharpen_t: float = 1.0,
    class_counts: torch.Tensor | None = None,
    reliability: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate (server): the consensus of the parties' scores by rule ``method`` (see the
    module), then sharpened by ``sharpen_t``. ``kind``: what the scores are (logits |
    softmax); ``temperature``: the softmax temperature of logits, for the rules' weights."""
    if len(scores_list) == 0:
        raise ProtocolError("aggregate: no party sent class scores")
    rule = get_rule(method)
    stack = torch.stack([s.float() for s in scores_list])  # (P, N, C)
    w = None
    if weights is not None:
        if method != "mean":
            raise ConfigError(f"aggregate weights only apply to mean, not '{method}'")
        w = _party_weights(weights, stack.shape[0])
    probs = F.softmax(stack / temperature, dim=-1) if kind == "logits" else stack
    x = Inputs(stack, probs, kind, w, trim, class_counts, reliability)
    return sharpen(rule.combine(x), sharpen_t, kind)


# ----------------------------------------------------------------------------- what parties send
def validate_extra(name: str, value: Any, num_outputs: int, who: str) -> torch.Tensor:
    """Check what a party sends besides its scores (server side); a ProtocolError naming the
    party otherwise. ``class_counts``: (num_outputs,) whole numbers >= 0, some > 0.
    ``reliability``: one number in [0, 1]."""
    if not isinstance(value, torch.Tensor) or not torch.is_floating_point(value):
        raise ProtocolError(f"{who}: {name} must be a float tensor, got {type(value).__name__}")
    v = value.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(v).all()):
        raise ProtocolError(f"{who}: {name} is not finite ({v.flatten()[:5].tolist()})")
    if name == "class_counts":
        if tuple(v.shape) != (num_outputs,):
            raise ProtocolError(
                f"{who}: class_counts have shape {tuple(v.shape)}, expected ({num_outputs},)"
            )
        if (v < 0).any() or (v != v.round()).any() or v.sum() <= 0:
            raise ProtocolError(f"{who}: class_counts must be whole numbers >= 0, some > 0")
        return v
    if name == "reliability":
        if v.numel() != 1 or not 0 <= float(v.flatten()[0]) <= 1:
            raise ProtocolError(
                f"{who}: reliability must be one number in [0, 1], got {v.flatten().tolist()}"
            )
        return v.reshape(1)
    raise ProtocolError(f"{who}: unknown message part '{name}'")
