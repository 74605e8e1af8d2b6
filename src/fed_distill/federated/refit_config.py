"""Options of the statistics round after distillation (group ``refit``; :mod:`.refit`).

``refit=none`` (the ``oneshot`` default) keeps a one-shot run one-shot. ``refit=head`` adds one
round: the server sends the distilled student to the clients, each returns per-class sums of the
student's penultimate features on its own images (:mod:`fed_distill.feature_stats`), and the
server re-fits the student's linear head on features drawn from the pooled per-class Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed_distill.errors import ConfigError
from fed_distill.feature_stats import FEATURES

REFIT_METHODS = ("none", "head")


@dataclass
class RefitConfig:
    method: str = "none"  # none | head (set by refit=NAME)
    # what the clients describe: the last block's whole map before global pooling (map: the
    # re-fitted head is one Linear on the flattened map, starting as the distilled head spread
    # over its positions; 6.5 MB per client for cnn_small) or the penultimate feature vector
    # (penultimate: the head's own input, 83 KB); map was 3-6 points better on six teacher sets
    features: str = "map"
    # the head's fit: SGD (momentum 0.9, cosine schedule) on features drawn from N(mean_k, cov_k),
    # in standardised feature coordinates (so lr does not depend on the features' scale)
    steps: int = 3000
    batch_size: int = 256
    lr: float = 0.5
    weight_decay: float = 0.0
    # cov_k <- (1 - shrinkage) cov_k + shrinkage * (trace(cov_k) / D) I
    shrinkage: float = 0.0
    # the head's starting point: the distilled head (distilled) or zeros (zero)
    init: str = "distilled"
    # client side: each feature vector scaled to L2 norm <= clip, then Gaussian noise of std
    # noise * clip (sums) and noise * clip^2 (outer products) added before upload; 0 = exact
    noise: float = 0.0
    clip: float | None = None
    # the widest penultimate layer the round accepts: each client uploads K * D^2 numbers
    max_features: int = 1024
    seed: int | None = None  # null = the server's seed (student.seed, else seed)

    def validate(self) -> RefitConfig:
        if self.method not in REFIT_METHODS:
            raise ConfigError(
                f"refit must be one of {', '.join(REFIT_METHODS)}, got '{self.method}'"
            )
        for key in ("steps", "batch_size", "max_features"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"refit.{key} must be a positive integer, got {v!r}")
        for key, low, high in (
            ("lr", 0.0, math.inf),
            ("weight_decay", 0.0, math.inf),
            ("shrinkage", 0.0, 1.0),
            ("noise", 0.0, math.inf),
        ):
            v = getattr(self, key)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or not low <= v <= high or (key == "lr" and v == 0):
                bound = f"in [{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
                what = "> 0" if key == "lr" else bound
                raise ConfigError(f"refit.{key} must be a finite number {what}, got {v!r}")
        if self.features not in FEATURES:
            raise ConfigError(
                f"refit.features must be {' or '.join(FEATURES)}, got '{self.features}'"
            )
        if self.init not in ("distilled", "zero"):
            raise ConfigError(f"refit.init must be distilled or zero, got '{self.init}'")
        if self.clip is not None and not (
            isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0
        ):
            raise ConfigError(f"refit.clip must be a finite number > 0 or null, got {self.clip!r}")
        if self.noise > 0 and self.clip is None:
            raise ConfigError(
                "refit.noise > 0 needs refit.clip (the feature norm the noise is scaled to),"
                " e.g. refit.clip=10"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"refit.seed must be an integer or null, got {self.seed!r}")
        return self
