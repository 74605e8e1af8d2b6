"""The registry of FedMD's consensus rules (``fedmd.aggregate=NAME``): ``register_rule`` /
``get_rule`` / ``list_rules`` (the pattern of the partition and synthesizer registries).

A rule is one function ``combine(x: Inputs) -> (N, C)`` turning the parties' class scores on the
round's public subset, (P, N, C), into one consensus, registered with
``@register_rule(NAME, options=CLS, sends=(...))``:

* ``options``: its typed options, a dataclass subclassing :class:`RuleOptions` with defaults
  and one ``check(self, c)`` (``c``: the whole FedMD config, e.g. for the number of parties).
  Its fields are ``fedmd.KEY`` config keys (``federated/config.py`` generates the ``fedmd``
  schema from the registry, as ``split`` is generated from the partitions); ``combine`` reads
  them from ``x.options``. A key of another rule set away from its default is refused.
* ``sends``: what each party must send besides its scores (``class_counts``, ``reliability``);
  the server asks for it and checks it (``fedmd_consensus.validate_extra``).

Neither this module nor ``fedmd_consensus.py`` defines a rule: the built-in ones live in the
modules of this package, which ``fed_distill.federated.rules`` imports (with every
``fed_distill.rules`` entry point) before it hands out the registry.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fed_distill.errors import ConfigError

SENDABLE = ("class_counts", "reliability")  # what a party can send besides its scores


@dataclass
class RuleOptions:
    """A rule's options (none by default). Subclasses add typed fields and extend ``check``."""

    def check(self, c: Any) -> None:
        """Raise ConfigError (one line, naming ``fedmd.KEY``) for a value this rule cannot use
        with the FedMD config ``c``."""


@dataclass(frozen=True)
class Inputs:
    """What a rule combines: the scores (P, N, C) as sent, the parties' probabilities (P, N, C),
    what the scores are (``kind``: logits | softmax), the rule's ``options``, the indices of
    the parties whose scores these are (``parties``; a round may leave some out) and what
    they sent besides (``class_counts`` (P, C), ``reliability`` (P,))."""

    scores: torch.Tensor
    probs: torch.Tensor
    kind: str
    options: RuleOptions
    parties: tuple[int, ...]
    class_counts: torch.Tensor | None = None
    reliability: torch.Tensor | None = None


@dataclass(frozen=True)
class Rule:
    """A registered consensus rule: ``combine(inputs) -> (N, C)``, its options class and what
    each party sends with its scores."""

    name: str
    combine: Callable[[Inputs], torch.Tensor]
    options: type[RuleOptions] = RuleOptions
    sends: tuple[str, ...] = ()


_REGISTRY: dict[str, Rule] = {}


def register_rule(
    name: str, options: type[RuleOptions] = RuleOptions, sends: tuple[str, ...] = ()
) -> Callable[[Callable[[Inputs], torch.Tensor]], Callable[[Inputs], torch.Tensor]]:
    """Decorator registering ``combine(x: Inputs) -> Tensor`` as ``fedmd.aggregate=name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_rule: {name!r} is not a valid name (an identifier)")
    if not (isinstance(options, type) and issubclass(options, RuleOptions)):
        raise ConfigError(f"register_rule({name!r}): options must subclass RuleOptions")
    bad = [s for s in sends if s not in SENDABLE]
    if bad:
        raise ConfigError(f"register_rule({name!r}): a party can send {SENDABLE}, not {bad}")

    def decorator(fn: Callable[[Inputs], torch.Tensor]) -> Callable[[Inputs], torch.Tensor]:
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.combine) != _qualname(fn):
            raise ConfigError(f"consensus rule {name!r} is already registered")
        for key, spec in _params(options).items():
            other = all_rule_params(exclude=name).get(key)
            if other is not None and other != spec:
                raise ConfigError(
                    f"register_rule({name!r}): fedmd.{key} is another rule's option with another"
                    " type or default; name it differently"
                )
        _REGISTRY[name] = Rule(name, fn, options, tuple(sends))
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> tuple[str, str]:
    return getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn))


def _params(options: type[RuleOptions]) -> dict[str, tuple[Any, Any]]:
    """name -> (type, default) of an options class's fields."""
    hints = typing.get_type_hints(options)
    out = {}
    for f in dataclasses.fields(options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (hints[f.name], default)
    return out


def all_rule_params(exclude: str | None = None) -> dict[str, tuple[Any, Any]]:
    """Every registered rule's options, ``fedmd.KEY`` -> (type, default)."""
    out: dict[str, tuple[Any, Any]] = {}
    for name, rule in _REGISTRY.items():
        if name != exclude:
            out.update(_params(rule.options))
    return out


def list_rules() -> list[str]:
    """The registered rule names, in registration order."""
    return list(_REGISTRY)


def get_rule(name: str) -> Rule:
    if name not in _REGISTRY:
        raise ConfigError(f"fedmd.aggregate must be one of {', '.join(_REGISTRY)}, got '{name}'")
    return _REGISTRY[name]


def rule_options(c: Any) -> RuleOptions:
    """The options of ``c.aggregate``'s rule, read from the FedMD config ``c`` (its fields are
    ``fedmd.KEY`` keys of the generated schema)."""
    rule = get_rule(c.aggregate)
    values = {
        f.name: getattr(c, f.name) for f in dataclasses.fields(rule.options) if hasattr(c, f.name)
    }
    return rule.options(**values)


def check_rule_keys(c: Any) -> None:
    """One ConfigError line for a ``fedmd.KEY`` that only other rules take, set to other than its
    default (``fedmd.aggregate=mean fedmd.trim=0.2``): it would be ignored."""
    own = {f.name for f in dataclasses.fields(get_rule(c.aggregate).options)}
    for key, (_, default) in all_rule_params().items():
        if key in own or not hasattr(c, key) or getattr(c, key) == default:
            continue
        owners = [r.name for r in _REGISTRY.values() if key in _params(r.options)]
        raise ConfigError(
            f"fedmd.{key}={getattr(c, key)!r} is an option of fedmd.aggregate={'|'.join(owners)},"
            f" not of {c.aggregate}; drop it or choose fedmd.aggregate={owners[0]}"
        )
