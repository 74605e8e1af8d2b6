"""The averaging rules: ``mean`` (the paper's, with optional static per-party weights),
``median`` and ``trimmed_mean`` (coordinate-wise robust options)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fed_distill.errors import ConfigError
from fed_distill.federated.rules.registry import Inputs, RuleOptions, register_rule


def weighted(w: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per-party weights (P,) or per party and sample (P, N), normalised over parties."""
    w = w / w.sum(0, keepdim=True)
    return (w.reshape(*w.shape, *([1] * (scores.dim() - w.dim()))) * scores).sum(0)


@dataclass
class MeanOptions(RuleOptions):
    aggregate_weights: list[float] | None = None  # per-party weights of the mean; None = equal

    def check(self, c) -> None:
        """One finite weight >= 0 per party, not all zero; refused before any training."""
        w = self.aggregate_weights
        if w is None:
            return
        n = c.num_parties or len(c.parties)
        if len(w) != n:
            raise ConfigError(f"fedmd.aggregate_weights has {len(w)} entries for {n} parties")
        for i, x in enumerate(w):
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x < math.inf:
                raise ConfigError(
                    f"fedmd.aggregate_weights[{i}] must be a finite number >= 0 (party {i}'s"
                    f" weight), got {x!r}"
                )
        if not any(w):
            raise ConfigError(
                "fedmd.aggregate_weights are all 0: no party counts; give at least one a weight > 0"
            )


def party_weights(weights: list[float], parties: tuple[int, ...]) -> torch.Tensor:
    """The weights of the parties whose scores are combined (a round may leave some out)."""
    w = torch.as_tensor([float(weights[i]) for i in parties], dtype=torch.float32)
    if not bool(torch.isfinite(w).all()) or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(
            f"aggregate weights must be non-negative numbers with a positive sum, got {w.tolist()}"
        )
    return w


@register_rule("mean", options=MeanOptions)
def mean(x: Inputs) -> torch.Tensor:
    w = x.options.aggregate_weights  # type: ignore[attr-defined]
    return x.scores.mean(0) if w is None else weighted(party_weights(w, x.parties), x.scores)


@register_rule("median")
def median(x: Inputs) -> torch.Tensor:
    n, ordered = x.scores.shape[0], x.scores.sort(dim=0).values
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


@dataclass
class TrimOptions(RuleOptions):
    trim: float = 0.1  # fraction of the parties cut at each end, per coordinate

    def check(self, c) -> None:
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"fedmd.trim must be in [0, 0.5), got {self.trim}")


@register_rule("trimmed_mean", options=TrimOptions)
def trimmed_mean(x: Inputs) -> torch.Tensor:
    trim = x.options.trim  # type: ignore[attr-defined]
    n = x.scores.shape[0]
    k = int(math.floor(trim * n))
    return x.scores.sort(dim=0).values[k : n - k].mean(0)
