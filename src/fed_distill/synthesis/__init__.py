"""Data-free synthesis: labelled images from frozen teachers (DeepInversion, Adaptive DI,
multi-teacher cycling / ensemble / sampling; generator-based DENSE and Fast; FedDF's public
transfer set) behind one :class:`Synthesizer` interface.

``build_synthesizer(cfg, teachers, class_counts, image_shape, normalizer, hflip, device, seed)``
returns a synthesizer whose ``synthesize(student=None)`` yields one :class:`SyntheticBatch`;
``list_synthesizers()`` names the registered methods and ``synthesis_options(method, **values)``
builds a method's typed options. Synthesizers register themselves with
``@register_synthesizer(NAME, options=CLS)`` (``registry.py``). The first time a registry
function is asked for, this package imports every module of its own (a new synthesizer is one
new file here, nothing to list) and every ``fed_distill.synthesizers`` entry point of the
installed packages (a synthesizer shipped in another package).

The torch-based modules are imported lazily, so ``fed_distill.synthesis.options`` stays a
light, dataclass-only import.
"""

from __future__ import annotations

import importlib
from typing import Any

from fed_distill.plugins import registry_access
from fed_distill.synthesis.options import SynthesisOptions

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

# Handed out only once every synthesizer has registered itself.
_REGISTRY_NAMES = (
    "build_synthesizer",
    "list_synthesizers",
    "options_class",
    "options_from_node",
    "synthesis_options",
)
ENTRY_POINTS = "fed_distill.synthesizers"

__all__ = ["SynthesisOptions", *sorted((*_LAZY, *_REGISTRY_NAMES))]

# discover(): import every module of this package and every fed_distill.synthesizers entry
# point once (each registers the synthesizers it defines)
discover, _from_registry = registry_access(
    __name__, __path__, ENTRY_POINTS, "synthesizer", _REGISTRY_NAMES
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"fed_distill.synthesis.{_LAZY[name]}")
        return getattr(module, name)
    return _from_registry(name)
