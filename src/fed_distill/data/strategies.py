"""The built-in partitions, each one function registered with ``@register_partition``.

Label skew: ``dirichlet`` (per class, client shares ~ Dir(alpha)), ``shards`` (k classes per
client), ``classes`` (an explicit class list per client), the seed project's ``heter``;
quantity skew: ``quantity`` (client sizes ~ Dir(alpha), each client with the global label mix);
feature skew: ``noise`` (IID labels, client i's images with Gaussian noise of std sigma*i/N);
and ``iid``. The last three complete NIID-Bench's set (Li et al., ICDE 2022).

Every function takes ``(labels, num_clients, rng, num_classes)`` and its own keyword-only
parameters (the ``split.*`` keys) and returns one sorted index array per client; its values
were checked by its ``check`` before it runs (``partition_registry.check_partition_params``),
what depends on the data (enough samples for ``min_size``) is checked here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fed_distill.data.partition_registry import is_int, is_number, register_partition
from fed_distill.errors import ConfigError, SplitError

MAX_TRIES = 1000  # redraws of a Dirichlet split before giving up on min_size


# ----------------------------------------------------------------------------- iid
@register_partition("iid")
def split_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, num_classes: int
) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts."""
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


# ----------------------------------------------------------------------------- Dirichlet
def _check_alpha_min_size(params: Mapping[str, Any], num_clients: Any, num_classes: Any) -> None:
    alpha = params["alpha"]
    if not (is_number(alpha) and 0 < alpha < math.inf):  # also refuses NaN
        raise ConfigError(f"split.alpha must be > 0 and finite, got {alpha}")
    if not is_int(params["min_size"], 0):
        raise ConfigError(f"split.min_size must be an integer >= 0, got {params['min_size']}")


def _min_size_fits(min_size: int, num_clients: int, n: int) -> None:
    if min_size * num_clients > n:
        raise SplitError(
            f"split.min_size={min_size} x {num_clients} clients exceeds the {n} samples;"
            " lower split.min_size or use fewer clients"
        )


def share_cuts(p: np.ndarray, n: int) -> np.ndarray:
    """Where to cut ``n`` indices so that client i gets the fraction ``p[i]`` of them."""
    return (np.cumsum(p) * n).astype(int)[:-1]


def deal(parts: list[list[int]], idx: np.ndarray, cuts: np.ndarray) -> None:
    """Hand the consecutive chunks of ``idx`` between ``cuts`` to ``parts``, in order."""
    for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
        q.extend(chunk.tolist())


def sorted_parts(parts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Each client's indices as a sorted int64 array (what every partition returns)."""
    return [np.sort(np.array(q, dtype=np.int64)) for q in parts]


def _no_draw(what: str, alpha: float, min_size: int) -> SplitError:
    return SplitError(
        f"no {what}(alpha={alpha}) split gave every client >= {min_size} samples in"
        f" {MAX_TRIES} draws; raise split.alpha or lower split.min_size"
    )


@register_partition("dirichlet", check=_check_alpha_min_size)
def split_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    alpha: float = 0.5,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label skew: for each class, client shares ~ Dir(alpha) (smaller alpha = more skew);
    redrawn until every client holds at least ``min_size`` samples. A client already above the
    mean size gets no more of a class (the usual NIID-Bench rule, which keeps sizes from
    exploding at small alpha)."""
    n = len(labels)
    _min_size_fits(min_size, num_clients, n)
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    for _ in range(MAX_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            if len(idx) == 0:
                continue
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            sizes = np.array([len(q) for q in parts])
            p = p * (sizes < n / num_clients)
            if p.sum() <= 0:
                p = np.full(num_clients, 1.0 / num_clients)
            p = p / p.sum()
            deal(parts, idx, share_cuts(p, len(idx)))
        if min(len(q) for q in parts) >= min_size:
            return sorted_parts(parts)
    raise _no_draw("Dirichlet", alpha, min_size)


@register_partition("quantity", check=_check_alpha_min_size)
def split_quantity(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    alpha: float = 0.5,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Quantity skew (NIID-Bench): client sizes ~ Dir(alpha) over the clients (smaller alpha =
    more unequal), each client with the global label mix (every class is cut in the same
    proportions); redrawn until every client holds at least ``min_size`` samples."""
    _min_size_fits(min_size, num_clients, len(labels))
    by_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    for _ in range(MAX_TRIES):
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = [share_cuts(p, len(idx)) for idx in by_class]
        sizes = sum(
            np.diff(np.concatenate([[0], c, [len(idx)]]))
            for c, idx in zip(cuts, by_class, strict=True)
        )
        if min(sizes) >= min_size:
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for idx, c in zip(by_class, cuts, strict=True):
                deal(parts, idx, c)
            return sorted_parts(parts)
    raise _no_draw("quantity Dirichlet", alpha, min_size)


# ----------------------------------------------------------------------------- classes
def assign_shards(
    num_clients: int, num_classes: int, classes_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """k distinct classes per client, classes visited round-robin in a random order so that
    every class is owned by someone whenever num_clients * k >= num_classes."""
    order = rng.permutation(num_classes).tolist()
    out, pos = [], 0
    for _ in range(num_clients):
        owned: list[int] = []
        while len(owned) < classes_per_client:
            c = order[pos % num_classes]
            pos += 1
            if c not in owned:
                owned.append(c)
        out.append(sorted(owned))
    return out


def split_by_classes(
    labels: np.ndarray,
    class_lists: Sequence[Sequence[int]],
    num_classes: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Each client owns the listed classes; a class shared by m clients is cut into m equal parts."""
    parts: list[list[int]] = [[] for _ in class_lists]
    for k in range(num_classes):
        owners = [i for i, cl in enumerate(class_lists) if k in cl]
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(labels == k))
        for i, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[i].extend(chunk.tolist())
    return sorted_parts(parts)


def _check_shards(params: Mapping[str, Any], num_clients: Any, num_classes: int | None) -> None:
    k = params["classes_per_client"]
    if not (is_int(k, 1) and (num_classes is None or k <= num_classes)):
        top = num_classes if num_classes is not None else "num_classes"
        raise ConfigError(f"split.classes_per_client must be in 1..{top}, got {k}")


@register_partition("shards", check=_check_shards)
def split_shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    classes_per_client: int = 2,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Label skew: ``classes_per_client`` distinct classes per client (``assign_shards``), a
    class shared by m clients cut into m equal parts; the classes are recorded in split.json."""
    owned = assign_shards(num_clients, num_classes, classes_per_client, rng)
    return split_by_classes(labels, owned, num_classes, rng), {"client_classes": owned}


def _check_classes(params: Mapping[str, Any], num_clients: Any, num_classes: int | None) -> None:
    lists = params["classes"]
    if not lists:
        raise ConfigError("split=classes needs split.classes, e.g. split.classes=[[0,1,2],[3,4]]")
    if not isinstance(lists, list | tuple) or not all(isinstance(cl, list | tuple) for cl in lists):
        raise ConfigError(f"split.classes must be a list of class lists, got {lists!r:.60}")
    top = num_classes if num_classes is not None else math.inf
    for i, cl in enumerate(lists):
        for c in cl:
            if not (is_int(c, 0) and c < top):
                rng = f"0..{num_classes - 1}" if num_classes is not None else "0, 1, ..."
                raise ConfigError(
                    f"split.classes: client {i} names class {c!r}, but the dataset has"
                    f" classes {rng}"
                )


@register_partition("classes", check=_check_classes, clients=lambda p: len(p["classes"]))
def split_classes(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    classes: list[list[int]] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Each client owns the classes listed for it (``split.classes=[[0,1],[2,3]]``; the number
    of clients is the list's length); a class listed for m clients is cut into m equal parts."""
    owned = [[int(c) for c in cl] for cl in classes or []]
    return split_by_classes(labels, owned, num_classes, rng), {"classes": owned}


# ----------------------------------------------------------------------------- heter
def _check_heter(params: Mapping[str, Any], num_clients: Any, num_classes: Any) -> None:
    u = params["unif_percentage"]
    if not (is_number(u) and 0.0 <= u <= 1.0):
        raise ConfigError(f"split.unif_percentage must be in [0, 1], got {u}")


@register_partition("heter", check=_check_heter, test="same")
def split_heter(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    unif_percentage: float = 0.5,
) -> list[np.ndarray]:
    """The seed project's split. A fraction ``unif_percentage`` of the (shuffled) indices is cut
    into ``num_clients`` equal uniform parts; the rest is sorted by label and cut into
    ``num_clients`` contiguous chunks; client i gets uniform part i + sorted chunk i.
    1.0 = IID, 0.5 = the seed's "heter", 0.0 = its "full" (class-disjoint when the chunks
    fall on class boundaries). The test labels are split the same way."""
    n = len(labels)
    perm = rng.permutation(n)
    n_unif = int(n * unif_percentage)
    unif, rest = perm[:n_unif], perm[n_unif:]
    rest = rest[np.argsort(labels[rest], kind="stable")]
    return [
        np.sort(np.concatenate([u, r]))
        for u, r in zip(
            np.array_split(unif, num_clients), np.array_split(rest, num_clients), strict=True
        )
    ]


# ----------------------------------------------------------------------------- noise
def _check_noise(params: Mapping[str, Any], num_clients: Any, num_classes: Any) -> None:
    s = params["sigma"]
    if not (is_number(s) and 0 <= s < math.inf):
        raise ConfigError(f"split.sigma must be a finite number >= 0, got {s}")


def noise_features(client: int, num_clients: int, seed: int, *, sigma: float) -> dict[str, Any]:
    """Client ``client``'s noise: std ``sigma * client / num_clients`` (client 0 is clean)."""
    std = float(sigma) * client / num_clients
    return {"noise_std": std, "noise_seed": int(seed)} if std > 0 else {}


def add_noise(
    x: torch.Tensor, index: torch.Tensor, part: str, *, noise_std: float, noise_seed: int
) -> torch.Tensor:
    """``x`` (uint8) plus Gaussian noise of std ``noise_std`` (in units of the [0, 1] pixel
    range), rounded and clipped back to uint8. Each image's noise is drawn from its own seed
    (``noise_seed``, the part, its dataset index), so the image is the same wherever it is
    taken: in the teacher's training, its class statistics, its local test."""
    shape = tuple(x.shape[1:])
    noise = np.empty((len(x), *shape), dtype=np.float32)
    code = 1 if part == "test" else 0
    for row, j in enumerate(torch.as_tensor(index).tolist()):
        # SeedSequence mixes all three numbers (torch's CPU generator keeps only 32 bits)
        noise[row] = np.random.default_rng([int(noise_seed) % 2**63, code, int(j)]).standard_normal(
            shape, dtype=np.float32
        )
    noise = torch.from_numpy(noise)
    return (x.float() + noise * (noise_std * 255.0)).round_().clamp_(0, 255).to(torch.uint8)


@register_partition("noise", check=_check_noise, features=noise_features, images=add_noise)
def split_noise(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    *,
    sigma: float = 0.1,
) -> list[np.ndarray]:
    """Feature skew by noise (NIID-Bench): IID labels (as ``iid``), and client i's images
    (train, validation and its local test part; never the official test set) carry Gaussian
    noise of std ``sigma * i / N`` in units of the [0, 1] pixel range."""
    return split_iid(labels, num_clients, rng, num_classes)
