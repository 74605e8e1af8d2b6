"""FedMD's consensus rules (``fedmd.aggregate``) and DS-FL's sharpening (``fedmd.sharpen``).

A rule turns the parties' class scores on the round's public subset, (P, N, C), into one
(N, C) consensus. What the parties send (``fedmd.scores``) is kept: with ``logits`` the
consensus is logits (what the paper's MAE digest matches), with ``softmax`` it is a
distribution (what the KL digest, or MAE on softmax, matches). Rules that need a party's
confidence read it from its probabilities: ``softmax(logits / fedmd.temperature)`` for logits,
the scores themselves for softmax.

The rules themselves live in ``federated/rules/`` (one registry, each rule with its own typed
options and what parties send for it; ``fed-distill fedmd --cfg`` lists them), with any rule a
user registers (``fed_distill.register_rule``).

``sharpen`` (T, 1 = off) then divides the consensus's log-probabilities by T: logits / T, or
p^(1/T) renormalised. T < 1 lowers the entropy (DS-FL's entropy-reduction averaging; DS-FL
writes it as softmax(mean p / T), which is not the identity at T = 1, so this is its
temperature form on log-probabilities).

The start-up validation (``check_fedmd_config``) calls :func:`check_consensus_config`: the
rule's name, a key of another rule, the rule's own check, ``sharpen``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.rules import (
    Inputs,
    RuleOptions,
    check_rule_keys,
    get_rule,
    list_rules,
    rule_options,
)
from fed_distill.federated.rules.weighted import confidence_weights

__all__ = [
    "aggregate",
    "check_consensus_config",
    "confidence_weights",
    "get_rule",
    "list_rules",
    "sharpen",
    "validate_extra",
]


def check_consensus_config(c: Any) -> None:
    """The consensus settings of a FedMD config: the rule's name, a key of another rule set
    (refused: it would be ignored), the rule's own options check, ``sharpen``."""
    check_rule_keys(c)  # the rule's name first
    rule_options(c).check(c)
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


def aggregate(
    scores_list: Sequence[torch.Tensor],
    method: str = "mean",
    options: RuleOptions | None = None,
    *,
    parties: Sequence[int] | None = None,
    kind: str = "logits",
    temperature: float = 1.0,
    sharpen_t: float = 1.0,
    class_counts: torch.Tensor | None = None,
    reliability: torch.Tensor | None = None,
) -> torch.Tensor:
    """Aggregate (server): the consensus of the parties' scores by rule ``method`` with its
    ``options`` (default: the rule's defaults), then sharpened by ``sharpen_t``. ``parties``:
    the indices of the parties whose scores these are (default 0..P-1); ``kind``: what the
    scores are (logits | softmax); ``temperature``: the softmax temperature of logits, for the
    rules that weigh by confidence."""
    if len(scores_list) == 0:
        raise ProtocolError("aggregate: no party sent class scores")
    rule = get_rule(method)
    options = rule.options() if options is None else options
    if not isinstance(options, rule.options):
        raise ConfigError(f"aggregate={method} takes {rule.options.__name__}, got {options!r}")
    stack = torch.stack([s.float() for s in scores_list])  # (P, N, C)
    who = tuple(range(stack.shape[0]) if parties is None else (int(i) for i in parties))
    probs = F.softmax(stack / temperature, dim=-1) if kind == "logits" else stack
    x = Inputs(stack, probs, kind, options, who, class_counts, reliability)
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
