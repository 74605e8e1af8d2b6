"""Model registry: ``register_model`` / ``build_model`` / ``list_models`` (the timm pattern).

A builder is a function ``fn(num_classes, in_channels, image_size, **kwargs) -> nn.Module``.
``build_model`` checks the common arguments, rejects keyword arguments the builder does not
declare, and turns any failure while building into one ``ModelError`` line that lists the
available model names.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from fed_distill.errors import ModelError

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}

# The three positional arguments every builder receives; everything else is a model kwarg.
_COMMON_ARGS = ("num_classes", "in_channels", "image_size")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(num_classes, in_channels, image_size, **kwargs)`` as ``name``."""

    def decorator(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _natural_key(name: str) -> list:
    # "resnet8" < "resnet18", "fedmd_2" < "fedmd_10"
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_models() -> list[str]:
    """Names of all registered models, in natural sort order (resnet8 before resnet18)."""
    return sorted(_REGISTRY, key=_natural_key)


def _available() -> str:
    return "available models: " + ", ".join(list_models())


def _get_builder(name: str) -> Builder:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; {_available()}")
    return _REGISTRY[name]


def model_kwargs(name: str) -> dict[str, Any]:
    """The extra keyword arguments model ``name`` accepts, with their defaults."""
    sig = inspect.signature(_get_builder(name))
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in _COMMON_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name`` for (N, in_channels, image_size, image_size) float input.

    The model returns logits of shape (N, num_classes). Extra ``kwargs`` (``width``,
    ``dropout``, ``filters``, ``width_scale``, ...) go to the builder; unknown ones raise
    ``ModelError``.
    """
    builder = _get_builder(name)
    check_int("num_classes", num_classes, minimum=1, model=name)
    check_int("in_channels", in_channels, minimum=1, model=name)
    check_int("image_size", image_size, minimum=1, model=name)

    sig = inspect.signature(builder)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any:
        accepted = model_kwargs(name)
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            accepts = ", ".join(accepted) if accepted else "no extra arguments"
            raise ModelError(
                f"model {name!r} got unknown argument(s) {', '.join(unknown)}; "
                f"it accepts: {accepts}; {_available()}"
            )
    try:
        return builder(num_classes, in_channels, image_size, **kwargs)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot build model {name!r}: {msg}; {_available()}") from exc


def model_info(name: str) -> str:
    """One-line description of model ``name`` (first line of its builder's docstring)."""
    builder = _get_builder(name)
    doc = (builder.__doc__ or "").strip().splitlines()
    desc = doc[0] if doc else "(no description)"
    kw = model_kwargs(name)
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return f"{name}: {desc}" + (f" [kwargs: {args}]" if args else "")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in ``model`` (all of them, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- argument checks shared by the builders -------------------------------------------------


def check_int(arg: str, value: Any, minimum: int = 1, model: str | None = None) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise a one-line ``ModelError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        where = f"model {model!r}: " if model else ""
        raise ModelError(f"{where}{arg} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    arg: str,
    value: Any,
    low: float,
    high: float,
    high_inclusive: bool = False,
    low_inclusive: bool = True,
    model: str | None = None,
) -> float:
    """Return ``float(value)`` if it lies in the interval, else raise a one-line ``ModelError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v >= low if low_inclusive else v > low) and (
            v <= high if high_inclusive else v < high
        )
    if not ok:
        where = f"model {model!r}: " if model else ""
        if high == float("inf"):
            rng = f"{'>=' if low_inclusive else '>'} {low}"
        else:
            lb, rb = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
            rng = f"in {lb}{low}, {high}{rb}"
        raise ModelError(f"{where}{arg} must be a number {rng}, got {value!r}")
    return float(value)
