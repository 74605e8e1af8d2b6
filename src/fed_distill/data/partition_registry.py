"""Partition registry: ``register_partition`` / ``get_partition`` / ``list_partitions`` (the
pattern of the model and synthesizer registries).

A partition is one function ``fn(labels, num_clients, rng, num_classes, *, PARAM=DEFAULT, ...)``
returning one index array per client (or ``(parts, record)``, ``record`` a dict kept in
``split.json``'s ``params``), registered as ``split=NAME``. Its keyword-only parameters, with
their annotations and defaults, become the ``split.PARAM`` config keys (``config.py`` generates
the ``split`` group from this registry). Its ``check(params, num_clients, num_classes)`` is the
one place its values are checked: ``make_split``, the start-up validation and FedMD all call it
through :func:`check_partition_params`, never a copy. A partition may also make each client's
images its own (feature skew): ``features`` gives the per-client values recorded in
``split.json``, ``images`` applies them whenever a client's images are taken.

Neither this module nor ``partition.py`` defines a partition: the built-in ones live in
``strategies.py``, which ``partition.py`` imports.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fed_distill.errors import ConfigError

# Keys every split has (``SplitConfig`` in config.py); a partition's parameters take other names.
COMMON_KEYS = ("strategy", "num_clients", "val_fraction", "server_clients")
# ``SplitConfig.num_clients``'s default: a partition whose parameters fix the number of
# clients (``split=classes``) refuses any other value that differs from its own count.
DEFAULT_NUM_CLIENTS = 5


@dataclass(frozen=True)
class Partition:
    """A registered partition (see the module doc); ``params``: name -> (type, default)."""

    name: str
    fn: Callable[..., Any]
    params: dict[str, tuple[Any, Any]]
    check: Callable[..., None] | None = None
    # "like": each client's test part follows its train label counts; "same": ``fn`` is applied
    # to the test labels with the same parameters (the seed's heter split)
    test: str = "like"
    clients: Callable[[dict[str, Any]], int] | None = None  # where the parameters fix the count
    features: Callable[..., dict[str, Any]] | None = None
    images: Callable[..., Any] | None = None
    doc: str = field(default="", compare=False)


_REGISTRY: dict[str, Partition] = {}


def register_partition(
    name: str,
    *,
    check: Callable[..., None] | None = None,
    test: str = "like",
    clients: Callable[[dict[str, Any]], int] | None = None,
    features: Callable[..., dict[str, Any]] | None = None,
    images: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(labels, num_clients, rng, num_classes, *, params...)`` as
    ``split=name``.

    ``check(params, num_clients, num_classes)`` raises :class:`ConfigError` (one line, naming
    ``split.KEY``) for a value no data can use; ``num_classes`` is None where unknown. ``test``:
    "like" or "same" (module doc). ``clients(params)``: the number of clients where the
    parameters fix it (``split=classes``). ``features(client, num_clients, seed, **params)``:
    a JSON-able dict of what makes this client's images its own ({} = none), and ``images(x,
    index, part, **features)``: the client's view of the uint8 images ``x`` at dataset indices
    ``index`` of ``part`` ("train" or "test"), a function of the image, its index and the
    features only, so it is the same wherever the image is taken."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_partition: {name!r} is not a valid name (an identifier)")
    if test not in ("like", "same"):
        raise ConfigError(f"register_partition: test must be 'like' or 'same', got {test!r}")
    if (features is None) != (images is None):
        raise ConfigError("register_partition: give features and images together, or neither")

    for what, hook in (("check", check), ("clients", clients), ("features", features)):
        if hook is not None and not callable(hook):
            raise ConfigError(
                f"register_partition {name!r}: {what} must be a function, got {hook!r:.40}"
            )
    if images is not None and not callable(images):
        raise ConfigError(
            f"register_partition {name!r}: images must be a function, got {images!r:.40}"
        )

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise ConfigError(
                f"register_partition({name!r}) decorates a function"
                f" fn(labels, num_clients, rng, num_classes, *, params...), got {fn!r:.40}"
            )
        params = _declared_params(name, fn)
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.fn) != _qualname(fn):
            raise ConfigError(f"partition name {name!r} is already registered")
        _REGISTRY[name] = Partition(
            name, fn, params, check, test, clients, features, images, inspect.getdoc(fn) or ""
        )
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> tuple[str, str]:
    return fn.__module__, fn.__qualname__


def _declared_params(name: str, fn: Callable[..., Any]) -> dict[str, tuple[Any, Any]]:
    """The keyword-only parameters of ``fn`` with their types and defaults; each must have both,
    take no common key's name, and agree in type with any other partition's parameter of that
    name (they share one ``split.KEY``)."""
    hints = typing.get_type_hints(fn)
    out: dict[str, tuple[Any, Any]] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not p.KEYWORD_ONLY:
            continue
        if p.default is p.empty or p.name not in hints:
            raise ConfigError(
                f"register_partition {name!r}: parameter {p.name!r} needs a type and a default"
            )
        if p.name in COMMON_KEYS:
            raise ConfigError(
                f"register_partition {name!r}: {p.name!r} is a common split key; rename it"
            )
        for other in _REGISTRY.values():
            kind = other.params.get(p.name, (hints[p.name],))[0]
            if other.name != name and kind != hints[p.name]:
                raise ConfigError(
                    f"register_partition {name!r}: split.{p.name} is {kind} in partition"
                    f" {other.name!r}; use that type"
                )
        out[p.name] = (hints[p.name], p.default)
    return out


def list_partitions() -> list[str]:
    """The registered ``split=NAME`` options, sorted."""
    return sorted(_REGISTRY)


def get_partition(name: str) -> Partition:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"unknown split strategy '{name}'; choose one of {', '.join(list_partitions())}"
        )
    return _REGISTRY[name]


def all_params() -> dict[str, tuple[Any, Any]]:
    """Every registered partition's parameters (the first default of a shared name)."""
    out: dict[str, tuple[Any, Any]] = {}
    for spec in _REGISTRY.values():  # in registration order: the built-in ones first
        for key, typed in spec.params.items():
            out.setdefault(key, typed)
    return out


# ----------------------------------------------------------------------------- checks
def is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_type(key: str, value: Any, kind: Any) -> None:
    if kind is float and not is_number(value):
        raise ConfigError(f"split.{key} must be a number, got {value!r}")
    if kind is int and not is_int(value, -(2**62)):
        raise ConfigError(f"split.{key} must be an integer, got {value!r}")


def check_partition_params(
    strategy: str, params: Mapping[str, Any], num_clients: Any, num_classes: int | None = None
) -> tuple[dict[str, Any], int]:
    """The partition's parameters (its defaults filled in, others' keys dropped) and its number
    of clients, after its own check; a key no registered partition declares is a ConfigError."""
    spec = get_partition(strategy)
    known = all_params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown split parameter '{unknown[0]}'; the partitions take {', '.join(known)}"
        )
    full = {k: params.get(k, default) for k, (_, default) in spec.params.items()}
    for key, (kind, _) in spec.params.items():
        _check_type(key, full[key], kind)
    if spec.check is not None:
        spec.check(full, num_clients, num_classes)
    n = spec.clients(full) if spec.clients is not None else num_clients
    if not is_int(n, 1):
        raise ConfigError(f"split.num_clients must be >= 1, got {n}")
    return full, n


def check_split_params(
    strategy: str,
    num_clients: Any,
    val_fraction: Any = 0.1,
    server_clients: Any = 0,
    num_classes: int | None = None,
    **params: Any,
) -> tuple[dict[str, Any], int]:
    """Every split key, checked once, before any data is read (``make_split`` and the start-up
    validation both call this); returns what :func:`check_partition_params` returns."""
    full, n = check_partition_params(strategy, params, num_clients, num_classes)
    # None or 0 from Python, or the schema's default: "not given" (a typed 5 is refused by
    # check_explicit_split, which sees the user's overrides)
    if get_partition(strategy).clients is not None and num_clients not in (
        n,
        None,
        0,
        DEFAULT_NUM_CLIENTS,
    ):
        raise ConfigError(
            f"split.num_clients={num_clients}, but split={strategy} makes {n} clients from its"
            f" own parameters; drop split.num_clients or make its parameters name {num_clients}"
        )
    if not (is_number(val_fraction) and 0 <= val_fraction < 1):
        raise ConfigError(f"split.val_fraction must be in [0, 1), got {val_fraction}")
    if not (is_int(server_clients, 0) and server_clients < n):
        raise ConfigError(
            f"split.server_clients must be in 0..{n - 1} (at least one teacher), got {server_clients}"
        )
    return full, n


def positive_finite(params: Mapping[str, Any], key: str, what: str = "") -> None:
    """``split.KEY`` must be a finite number > 0 (refuses inf and NaN)."""
    v = params[key]
    if not (is_number(v) and 0 < v < math.inf):
        raise ConfigError(f"split.{key} must be a finite number > 0{what}, got {v}")


def split_kwargs(node: Mapping[str, Any]) -> dict[str, Any]:
    """From a ``split`` config (a mapping with ``strategy``, the common keys and every
    partition's parameters) the keyword arguments of ``make_split`` / ``check_split_params``:
    the common keys and the chosen partition's own parameters."""
    out = {k: node[k] for k in COMMON_KEYS if k in node}
    out.update(own_params(node.get("strategy"), node))
    return out


def own_params(strategy: str, node: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``strategy``'s own parameters in ``node`` (a ``split`` config); a key of
    another partition set to other than its default is refused (:func:`check_foreign_keys`)."""
    check_foreign_keys(strategy, node)
    return {k: node[k] for k in get_partition(strategy).params if k in node}


def check_foreign_keys(strategy: str, node: Mapping[str, Any]) -> None:
    """One ConfigError line for a ``split.KEY`` that only other partitions take, set to other
    than its default (``split=dirichlet split.sigma=-1``): it would be ignored, so the user
    meant another partition. A ``split`` config carries every partition's keys at their
    defaults, so only a value that differs can have been set."""
    own = get_partition(strategy).params
    for key, (_, default) in all_params().items():
        if key in own or key not in node or _same(node[key], default):
            continue
        raise foreign_key_error(key, node[key], strategy)


def foreign_key_error(key: str, value: Any, strategy: str, what: str = "split") -> ConfigError:
    """The one line for ``split.KEY`` of other partitions given with ``what=strategy``."""
    owners = [p.name for p in _REGISTRY.values() if key in p.params]
    return ConfigError(
        f"split.{key}={value!r} is a parameter of split={'|'.join(owners)}, not of"
        f" {what}={strategy}; drop it or choose {what}={owners[0]}"
    )


def check_explicit_split(
    strategy: str,
    node: Mapping[str, Any],
    explicit: Iterable[str],
    n: int | None = None,
    what: str = "split",
) -> None:
    """The ``split.KEY`` overrides the user typed (``explicit``: override keys, as
    ``fed_distill.api.mark_explicit`` records them), checked where a value at its default
    cannot be told from one not given: a key of another partition is refused even at its
    default (``split=dirichlet split.sigma=<noise's default>``), and a typed
    ``split.num_clients`` that differs from the ``n`` clients a partition fixing its own count
    makes (``split=classes``), even the schema's default. ``what``: the key that chose
    ``strategy`` (``fedmd.partition`` for FedMD)."""
    keys = [k.removeprefix("split.").split(".")[0] for k in explicit if k.startswith("split.")]
    own = get_partition(strategy).params
    for key in keys:
        if key in all_params() and key not in own:
            raise foreign_key_error(key, node.get(key), strategy, what)
    num = node.get("num_clients")
    fixed = n is not None and get_partition(strategy).clients is not None
    if "num_clients" in keys and fixed and num != n:
        raise ConfigError(
            f"split.num_clients={num}, but split={strategy} makes {n} clients from its own"
            f" parameters; drop split.num_clients or make its parameters name {num}"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    return type(a) is type(b) and a == b or (is_number(a) and is_number(b) and a == b)
