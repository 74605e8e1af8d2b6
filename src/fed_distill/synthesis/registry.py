"""Synthesizer registry: ``register_synthesizer`` / ``build_synthesizer`` / ``list_synthesizers``
(the pattern of ``models/registry.py``).

A :class:`~fed_distill.synthesis.base.Synthesizer` subclass registers itself as
``synthesis.method=NAME`` with ``@register_synthesizer(NAME)``. Its constructor takes ``(cfg,
teachers, class_counts, image_shape, normalizer)`` and whichever of the keyword arguments
``hflip``, ``device``, ``seed``, ``data_dir``, ``class_stats`` it declares (a constructor that
passes ``**options`` on to its base class declares the base's too); keywords given to the
decorator (``meta=True``) are fixed for that name. Neither this module nor ``base.py`` imports
any synthesizer: the package ``fed_distill.synthesis`` imports the built-in ones before it hands
out ``build_synthesizer`` and ``list_synthesizers``, as ``fed_distill.models`` does for models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import Synthesizer
from fed_distill.synthesis.config import REGISTERED_METHODS, SynthesisConfig

# name -> (class, keyword arguments fixed for that name)
_REGISTRY: dict[str, tuple[type[Synthesizer], dict[str, Any]]] = {}


def register_synthesizer(
    name: str, **fixed: Any
) -> Callable[[type[Synthesizer]], type[Synthesizer]]:
    """Class decorator registering a synthesizer as ``synthesis.method=name``, built with the
    keyword arguments ``fixed`` besides the ones ``build_synthesizer`` offers."""

    def decorator(cls: type[Synthesizer]) -> type[Synthesizer]:
        old = _REGISTRY.get(name)
        # the same class defined again (a re-run notebook cell) replaces itself
        if old is not None and _qualname(old[0]) != _qualname(cls):
            raise ConfigError(f"synthesizer name {name!r} is already registered")
        _REGISTRY[name] = (cls, fixed)
        REGISTERED_METHODS.add(name)  # a valid synthesis.method from now on
        return cls

    return decorator


def _qualname(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def list_synthesizers() -> list[str]:
    """The registered ``synthesis.method`` names, sorted."""
    return sorted(_REGISTRY)


def has_own_soft_labels(cls: type[Synthesizer]) -> bool:
    """Whether the synthesizer class labels the student's batches by its own rule
    (:meth:`Synthesizer.student_probs`, e.g. Co-Boosting's re-fitted weights)."""
    return cls.student_probs is not Synthesizer.student_probs


def own_soft_labels(method: str) -> bool:
    """:func:`has_own_soft_labels` of the synthesizer registered as ``method`` (False when
    none is: the name is checked where the synthesizer is built)."""
    entry = _REGISTRY.get(method)
    return entry is not None and has_own_soft_labels(entry[0])


def build_synthesizer(
    cfg: SynthesisConfig,
    teachers: list[nn.Module],
    class_counts: np.ndarray,
    image_shape: tuple[int, int, int],
    normalizer: Normalizer,
    hflip: bool,
    device: torch.device | str,
    seed: int,
    data_dir: str | None = None,
    class_stats: list[dict[str, torch.Tensor] | None] | None = None,
) -> Synthesizer:
    """The synthesizer ``cfg.method`` names.

    ``class_counts`` (num_teachers, num_classes): training-label counts per teacher;
    ``image_shape`` (C, H, W); ``hflip``: whether the dataset allows horizontal flips (used when
    ``cfg.flip`` is None); ``seed`` makes the sequence of batches reproducible; ``data_dir``: where
    ``method=public`` looks for its public dataset when ``cfg.public_data_dir`` is unset;
    ``class_stats``: per teacher, the class statistics its client uploaded (or None), for the
    per-class BN term of the synthesizers that match BN statistics. Each synthesizer receives
    the keyword arguments its constructor declares.
    """
    cfg.validate(num_available=len(teachers))
    if cfg.method not in _REGISTRY:
        raise ConfigError(
            f"synthesis.method '{cfg.method}' is not registered;"
            f" available: {', '.join(list_synthesizers())}"
        )
    cls, fixed = _REGISTRY[cfg.method]
    offered = dict(hflip=hflip, device=device, seed=seed, data_dir=data_dir)
    offered.update(class_stats=class_stats, **fixed)
    accepted = _declared(cls)
    kwargs = {k: v for k, v in offered.items() if k in accepted}
    return cls(cfg, teachers, class_counts, image_shape, normalizer, **kwargs)  # type: ignore[call-arg]


def _declared(cls: type) -> set[str]:
    """The keyword arguments ``cls``'s constructor declares: its own named parameters and,
    where it passes ``**options`` on to its base class, those of the base's constructor too."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names
