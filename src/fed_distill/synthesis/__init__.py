"""Data-free synthesis: labelled images from frozen teachers (DeepInversion, Adaptive DI,
multi-teacher cycling / ensemble / sampling; generator-based DENSE and Fast; FedDF's public
transfer set) behind one :class:`Synthesizer` interface.

``build_synthesizer(cfg, teachers, class_counts, image_shape, normalizer, hflip, device, seed)``
returns a synthesizer whose ``synthesize(student=None)`` yields one :class:`SyntheticBatch`.

The torch-based modules are imported lazily, so ``fed_distill.synthesis.config`` (imported by
the root config schema at start-up) stays a light, dataclass-only import.
"""

from __future__ import annotations

import importlib
from typing import Any

from fed_distill.synthesis.config import SynthesisConfig

_LAZY = {
    "SyntheticBatch": "base",
    "Synthesizer": "base",
    "build_synthesizer": "base",
    "BNFeatureHooks": "bn_hooks",
    "BNStatsHook": "bn_hooks",
    "DeepInversion": "deepinversion",
    "GeneratorSynthesizer": "generator",
    "ImageGenerator": "generator",
    "adversarial_loss": "generator",
    "PublicDataSynthesizer": "public",
    "load_unlabeled_images": "public",
    "teacher_class_weights": "deepinversion",
    "class_weighted_ce": "losses",
    "competition_loss": "losses",
    "js_divergence": "losses",
    "kl_div_with_temperature": "losses",
    "l2_prior": "losses",
    "masked_logits": "losses",
    "total_variation": "losses",
}

__all__ = ["SynthesisConfig", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"fed_distill.synthesis.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'fed_distill.synthesis' has no attribute {name!r}")
