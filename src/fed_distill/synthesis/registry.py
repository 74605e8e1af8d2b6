"""Synthesizer registry: ``register_synthesizer`` / ``build_synthesizer`` / ``list_synthesizers``
(the pattern of ``models/registry.py``).

A :class:`~fed_distill.synthesis.base.Synthesizer` subclass registers itself as
``synthesis=NAME`` with ``@register_synthesizer(NAME, options=CLS)``: ``CLS`` is its typed
options, a dataclass subclassing :class:`~fed_distill.synthesis.options.SynthesisOptions` with
its defaults and one ``check`` (default: ``SynthesisOptions`` itself: ``batch_size`` and
``flip``); ``synthesis=NAME`` composes exactly its keys. Its constructor takes ``(cfg,
teachers, class_counts, image_shape, normalizer)`` and whichever of the keyword arguments
``hflip``, ``device``, ``seed``, ``data_dir``, ``class_stats`` it declares (a constructor that
passes ``**options`` on to its base class declares the base's too); keywords given to the
decorator (``meta=True``) are fixed for that name. Neither this module nor ``base.py`` imports
any synthesizer: the package ``fed_distill.synthesis`` imports every module of its own (and
every ``fed_distill.synthesizers`` entry point) before it hands out the registry's functions.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import Synthesizer
from fed_distill.synthesis.options import SynthesisOptions

# name -> (class, keyword arguments fixed for that name, options class)
_REGISTRY: dict[str, tuple[type[Synthesizer], dict[str, Any], type[SynthesisOptions]]] = {}


def register_synthesizer(
    name: str, options: type[SynthesisOptions] = SynthesisOptions, **fixed: Any
) -> Callable[[type[Synthesizer]], type[Synthesizer]]:
    """Class decorator registering a synthesizer as ``synthesis=name`` with its typed
    ``options``, built with the keyword arguments ``fixed`` besides the ones
    ``build_synthesizer`` offers."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_synthesizer: {name!r} is not a valid name (an identifier)")
    if not (
        isinstance(options, type)
        and issubclass(options, SynthesisOptions)
        and dataclasses.is_dataclass(options)
    ):
        raise ConfigError(
            f"register_synthesizer({name!r}): options must be a dataclass subclassing"
            f" SynthesisOptions, got {options!r}"
        )

    def decorator(cls: type[Synthesizer]) -> type[Synthesizer]:
        old = _REGISTRY.get(name)
        # the same class defined again (a re-run notebook cell) replaces itself
        if old is not None and _qualname(old[0]) != _qualname(cls):
            raise ConfigError(f"synthesizer name {name!r} is already registered")
        _REGISTRY[name] = (cls, fixed, options)
        return cls

    return decorator


def options_class(method: str) -> type[SynthesisOptions]:
    """The options class of the synthesizer registered as ``method``."""
    if method not in _REGISTRY:
        raise ConfigError(
            f"synthesis={method} is not a registered synthesizer;"
            f" available: {', '.join(list_synthesizers())}"
        )
    return _REGISTRY[method][2]


def synthesis_options(method: str = "deepinversion", **values: Any) -> SynthesisOptions:
    """``method``'s options with ``values`` over its defaults (``method`` set to ``method``); a
    key the method does not take is one ConfigError line listing those it does."""
    cls = options_class(method)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise foreign_key_error(key, method)
    return cls(**{**values, "method": method})


def options_from_node(node: Mapping[str, Any]) -> SynthesisOptions:
    """A composed ``synthesis`` config (a mapping with ``method``) as its method's options. A
    composed node carries the options class ``synthesis=NAME`` chose: a ``method`` changed
    under it (``synthesis.method=public`` on a DeepInversion preset) is refused."""
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    values = dict(values)  # type: ignore[arg-type]
    method = str(values.pop("method", "deepinversion"))
    typed = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if typed not in (None, dict) and typed is not options_class(method):
        raise ConfigError(
            f"synthesis.method={method} does not choose the synthesizer: use synthesis={method}"
            f" (synthesis={values.get('name')} composes the options of another method)"
        )
    return synthesis_options(method, **values)


def foreign_key_error(key: str, method: str) -> ConfigError:
    """The one line for ``synthesis.KEY`` given with a method that does not take it."""
    cls = options_class(method)
    own = sorted(f.name for f in dataclasses.fields(cls) if f.name not in ("name", "method"))
    owners = [m for m in list_synthesizers() if key in _field_names(_REGISTRY[m][2])]
    hint = f"; it is an option of synthesis={'|'.join(owners)}" if owners else ""
    return ConfigError(
        f"synthesis.{key} is not an option of synthesis={method}{hint};"
        f" the options of {method} are: {', '.join(own)}"
    )


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _qualname(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def list_synthesizers() -> list[str]:
    """The registered synthesizer names (``synthesis=NAME``), sorted."""
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
    cfg: SynthesisOptions,
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
    """The synthesizer ``cfg.method`` names (``cfg``: its options, :func:`synthesis_options`).

    ``class_counts`` (num_teachers, num_classes): training-label counts per teacher;
    ``image_shape`` (C, H, W); ``hflip``: whether the dataset allows horizontal flips (used when
    ``cfg.flip`` is None); ``seed`` makes the sequence of batches reproducible; ``data_dir``: where
    ``method=public`` looks for its public dataset when ``cfg.public_data_dir`` is unset;
    ``class_stats``: per teacher, the class statistics its client uploaded (or None), for the
    per-class BN term of the synthesizers that match BN statistics. Each synthesizer receives
    the keyword arguments its constructor declares.
    """
    want = options_class(cfg.method)
    if not isinstance(cfg, want):
        raise ConfigError(
            f"synthesis={cfg.method} takes {want.__name__}, got {type(cfg).__name__}"
            " (build it with synthesis_options)"
        )
    cfg.validate(num_available=len(teachers))
    cls, fixed, _ = _REGISTRY[cfg.method]
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
