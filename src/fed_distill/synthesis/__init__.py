"""Data-free synthesis: labelled images from frozen teachers (DeepInversion, Adaptive DI,
multi-teacher cycling / ensemble / sampling; generator-based DENSE and Fast; FedDF's public
transfer set) behind one :class:`Synthesizer` interface.

``build_synthesizer(cfg, teachers, class_counts, image_shape, normalizer, hflip, device, seed)``
returns a synthesizer whose ``synthesize(student=None)`` yields one :class:`SyntheticBatch`;
``list_synthesizers()`` names the registered methods. Synthesizers register themselves with
``@register_synthesizer(NAME)`` (``registry.py``); this package imports the built-in ones the
first time either function is asked for.

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
    "register_synthesizer": "registry",
    "BNFeatureHooks": "bn_hooks",
    "BNStatsHook": "bn_hooks",
    "DeepInversion": "deepinversion",
    "GeneratorSynthesizer": "generator",
    "ImageGenerator": "generator",
    "adversarial_loss": "generator",
    "DenseSynthesizer": "peers",
    "CoBoostSynthesizer": "peers",
    "PublicDataSynthesizer": "public",
    "load_unlabeled_images": "public",
    "teacher_class_weights": "inputs",
    "class_weighted_ce": "losses",
    "competition_loss": "losses",
    "js_divergence": "losses",
    "kl_div_with_temperature": "losses",
    "l2_prior": "losses",
    "masked_logits": "losses",
    "total_variation": "losses",
}

# Handed out only once the built-in synthesizers have registered themselves.
_REGISTRY_NAMES = ("build_synthesizer", "list_synthesizers")

__all__ = ["SynthesisConfig", *sorted((*_LAZY, *_REGISTRY_NAMES))]


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        # imported for their side effect: each registers its synthesis.method names
        from fed_distill.synthesis import (  # noqa: F401
            deepinversion,
            generator,
            peers,
            public,
            registry,
        )

        return getattr(registry, name)
    if name in _LAZY:
        module = importlib.import_module(f"fed_distill.synthesis.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'fed_distill.synthesis' has no attribute {name!r}")
