"""The rules that weigh parties by what their scores or messages say: ``confidence`` (per sample,
entropy-weighted, as in FedDS), ``class_share`` (per class, by the share of that class's private
data each party holds; the one-shot ``weighted`` ensemble's rule) and ``reliability`` (by each
party's accuracy on a held-out part of its own private data)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fed_distill.ensemble import class_shares
from fed_distill.errors import ProtocolError
from fed_distill.federated.rules.average import weighted
from fed_distill.federated.rules.registry import Inputs, RuleOptions, register_rule


def confidence_weights(probs: torch.Tensor) -> torch.Tensor:
    """(P, N) certainty of each party on each sample: ``1 - H(p) / log C`` (1 = one-hot,
    0 = uniform), floored at 1e-6 so a sample where every party is unsure gets the mean."""
    c = probs.shape[-1]
    if c < 2:
        return torch.ones(probs.shape[:-1])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return (1.0 - entropy / math.log(c)).clamp_min(1e-6)


@register_rule("confidence")
def confidence(x: Inputs) -> torch.Tensor:
    return weighted(confidence_weights(x.probs), x.scores)


@register_rule("class_share", sends=("class_counts",))
def class_share(x: Inputs) -> torch.Tensor:
    """Columns nobody holds privately (the public classes) are averaged equally; with softmax
    scores the rows are renormalised. With FedMD's balanced partition it is the mean."""
    if x.class_counts is None:
        raise ProtocolError("aggregate=class_share needs every party's class counts")
    shares = class_shares(x.class_counts)  # (P, C); columns sum to 1
    out = (shares[:, None, :] * x.scores).sum(0)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-12) if x.kind == "softmax" else out


@dataclass
class ReliabilityOptions(RuleOptions):
    """No option of its own; it needs ``fedmd.reliability_holdout`` >= 1 (the private images
    per party held out of training to measure it, a setting of the parties' data)."""

    def check(self, c) -> None:
        from fed_distill.errors import ConfigError

        if c.reliability_holdout < 1:
            raise ConfigError(
                "fedmd.aggregate=reliability needs fedmd.reliability_holdout >= 1 (private images"
                f" per party held out to measure it), got {c.reliability_holdout}"
            )


@register_rule("reliability", options=ReliabilityOptions, sends=("reliability",))
def reliability(x: Inputs) -> torch.Tensor:
    if x.reliability is None:
        raise ProtocolError("aggregate=reliability needs every party's reliability")
    w = x.reliability.float()
    return weighted(w if w.sum() > 0 else torch.ones_like(w), x.scores)
