"""``coupling``: each party speaks only about the classes it holds, and the consensus is the one
distribution that agrees best with all of them (pairwise coupling, generalised to subsets).

Under label skew a party that holds none of class c still scores an image of c, and puts the
mass on the classes it knows: with ``class_share`` that vote counts fully in those classes'
columns, so an image of c held by few parties is called one of the classes more parties hold.
Here party p's softmax is read as what it is, a distribution *given that the class is one of
its own* S_p (the private classes it holds, plus the public outputs nobody holds privately):
r_p(c) = p_p(c) / p_p(S_p) on S_p. The consensus q minimises sum_p KL(r_p || q restricted to
S_p), found by the multiplicative fixed point of the generalised Bradley-Terry model (Huang,
Weng and Lin, JMLR 2006):

    q(c) <- q(c) * sum_{p: c in S_p} r_p(c) / sum_{p: c in S_p} q(c) / q(S_p)

So whether an image is c or c' is decided by the parties that hold both. On parties that all
hold every class it is the mean of their softmax (one step). Needs ``fedmd.scores=softmax`` and
each party's class counts (what ``class_share`` also sends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fed_distill.errors import ConfigError, ProtocolError
from fed_distill.federated.rules.registry import Inputs, RuleOptions, register_rule

ITERATIONS = 200  # a consistent set of views is recovered to ~2e-3 (tested; 500: ~3e-4)


@dataclass
class CouplingOptions(RuleOptions):
    """No option of its own; it combines probabilities, so it needs softmax scores."""

    def check(self, c) -> None:
        if c.scores != "softmax":
            raise ConfigError(
                "fedmd.aggregate=coupling combines probabilities: set fedmd.scores=softmax"
                f" (got fedmd.scores={c.scores})"
            )


def held_sets(class_counts: torch.Tensor) -> torch.Tensor:
    """(P, C) bool: the outputs each party speaks for, the classes it holds privately and every
    output nobody holds (the public classes)."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    return (counts > 0) | (counts.sum(0, keepdim=True) <= 0)


def couple(probs: torch.Tensor, held: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """(P, N, C) probabilities and (P, C) held outputs -> (N, C) consensus q."""
    m = held[:, None, :].to(probs.dtype)  # (P, 1, C)
    r = probs * m
    r = r / r.sum(-1, keepdim=True).clamp_min(1e-12)  # each party's view, given its own classes
    num = r.sum(0)  # (N, C); constant over the iterations
    q = num / num.sum(-1, keepdim=True).clamp_min(1e-12)
    q = (q + 1e-6) / (1 + 1e-6 * q.shape[-1])  # no class stuck at 0
    for _ in range(iterations):
        q_s = (q[None] * m).sum(-1, keepdim=True).clamp_min(1e-12)  # (P, N, 1): q(S_p)
        den = (m / q_s).sum(0) * q  # sum over the parties holding c of q(c) / q(S_p)
        q = q * num / den.clamp_min(1e-12)
        q = q / q.sum(-1, keepdim=True)
    return q


@register_rule("coupling", options=CouplingOptions, sends=("class_counts",))
def coupling(x: Inputs) -> torch.Tensor:
    if x.kind != "softmax":
        raise ConfigError("aggregate=coupling combines probabilities: it needs softmax scores")
    if x.class_counts is None:
        raise ProtocolError("aggregate=coupling needs every party's class counts")
    return couple(x.probs, held_sets(x.class_counts))
