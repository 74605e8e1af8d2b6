"""Who owns which index: client partitions of a dataset's train and test sets.

Every partition (``split=NAME``: the registry in ``partition_registry.py``, the built-in ones in
``strategies.py``) maps train labels to one index list per client. The test set is split to
match: each client's local test part follows its own train label distribution (a partition
registered with ``test="same"``, the seed's ``heter``, is applied to the test labels instead).
A validation part is then held out of each client's train part; teachers select checkpoints on
it, never on test. A partition with a feature skew (``noise``) records per client what makes its
images its own (``ClientSplit.features``), and :func:`client_images` is how any stage takes a
client's images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_distill.artifacts import load_json, save_json
from fed_distill.data.partition_registry import (
    COMMON_KEYS,
    check_partition_params,
    check_split_params,
    get_partition,
    list_partitions,
    own_params,
    register_partition,
    split_kwargs,
)
from fed_distill.data.strategies import (  # importing it registers the built-in partitions
    deal,
    sorted_parts,
)
from fed_distill.errors import SplitError

__all__ = [
    "COMMON_KEYS",
    "ClientSplit",
    "Split",
    "apply_features",
    "check_partition_params",
    "check_split",
    "check_split_params",
    "client_features",
    "client_images",
    "clients_images",
    "get_partition",
    "list_partitions",
    "load_split",
    "make_split",
    "own_params",
    "partition_indices",
    "register_partition",
    "save_split",
    "split_kwargs",
]


@dataclass
class ClientSplit:
    train: list[int]
    val: list[int]
    test: list[int]
    train_class_counts: list[int] = field(default_factory=list)
    # what makes this client's images its own ({"partition": NAME, ...}; {} = the images as
    # they are): the partition's ``features``, applied by :func:`client_images`
    features: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "train_class_counts": self.train_class_counts,
        }
        if self.features:  # only then: split files without features stay as they were
            out["features"] = self.features
        return out


@dataclass
class Split:
    """A partition of one dataset among clients (the content of ``split.json``)."""

    dataset: str
    strategy: str
    params: dict[str, Any]
    seed: int
    num_classes: int
    clients: list[ClientSplit]
    dataset_options: dict[str, Any] = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0
    label_digest: str = ""

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def num_teachers(self) -> int:
        """Clients that train a teacher; the last ``server_clients`` hold the server's own data."""
        return len(self.clients) - int(self.params.get("server_clients", 0))

    def class_counts(self) -> np.ndarray:
        """(num_clients, num_classes) train class counts (train + val, i.e. all a client owns)."""
        return np.array([c.train_class_counts for c in self.clients], dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_options": self.dataset_options,
            "strategy": self.strategy,
            "params": self.params,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "label_digest": self.label_digest,
            "clients": [c.to_json() for c in self.clients],
        }


def label_digest(train_y: torch.Tensor | np.ndarray, test_y: torch.Tensor | np.ndarray) -> str:
    """A short fingerprint of a dataset's labels, so a split is never applied to other data."""
    h = hashlib.sha256()
    for y in (train_y, test_y):
        h.update(np.asarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def split_test_like(
    test_labels: np.ndarray, train_counts: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Cut each test class among clients in proportion to their train counts of that class."""
    num_clients, num_classes = train_counts.shape
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(test_labels == k))
        total = train_counts[:, k].sum()
        if total == 0 or len(idx) == 0:
            continue
        cuts = np.round(np.cumsum(train_counts[:, k]) / total * len(idx)).astype(int)[:-1]
        deal(parts, idx, cuts)
    return sorted_parts(parts)


def hold_out_val(
    idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random validation part of a client's train indices (at least one sample when >= 2)."""
    n_val = int(round(len(idx) * val_fraction))
    if val_fraction > 0 and len(idx) >= 2:
        n_val = max(1, n_val)
    perm = rng.permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def partition_indices(
    strategy: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    num_classes: int,
    params: dict[str, Any],
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Partition ``strategy``'s index arrays (one per client) and what it records besides its
    parameters; ``params`` checked already (:func:`check_split_params`). What the partition
    returns is checked here, where the split is made (:func:`check_parts`)."""
    if num_clients > len(labels):
        raise SplitError(
            f"cannot split {len(labels)} samples among {num_clients} clients; use fewer clients"
        )
    out = get_partition(strategy).fn(labels, num_clients, rng, num_classes, **params)
    # (parts, record) where the second item is the record, else the parts alone (a tuple of
    # two index arrays for two clients is parts)
    paired = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)
    parts, record = out if paired else (out, {})
    return check_parts(strategy, parts, num_clients, len(labels)), dict(record)


def check_parts(strategy: str, parts: Any, num_clients: int, n: int) -> list[np.ndarray]:
    """A partition's output as int64 arrays, or one SplitError line naming the partition: one
    part per client, each a non-empty 1-D list of integer indices into the ``n`` samples,
    with no index twice within a client or across clients."""
    bad = f"partition '{strategy}'"
    if isinstance(parts, np.ndarray) and parts.dtype != object and parts.ndim == 1:
        parts = [parts]  # one flat array: the count check below says what is wrong
    try:
        count = len(parts)
    except TypeError:
        raise SplitError(
            f"{bad} returned {type(parts).__name__}, not one index list per client"
        ) from None
    if count != num_clients:
        raise SplitError(f"{bad} returned {count} parts for {num_clients} clients")
    out: list[np.ndarray] = []
    owner = np.full(n, -1, dtype=np.int64)
    for i, p in enumerate(parts):
        a = np.asarray(p)
        if a.size == 0:
            raise SplitError(
                f"{bad} gave client {i} no samples; use fewer clients or another split"
            )
        if a.ndim != 1 or a.dtype.kind not in "iu":
            what = f"{a.ndim}-D" if a.ndim != 1 else f"{a.dtype} values"
            raise SplitError(
                f"{bad}: client {i}'s part must be a flat list of integer indices, got {what}"
            )
        if a.min() < 0 or a.max() >= n:
            j = int(a.min() if a.min() < 0 else a.max())
            raise SplitError(f"{bad}: client {i} holds index {j}, outside the samples 0..{n - 1}")
        a = a.astype(np.int64)
        uniq, counts = np.unique(a, return_counts=True)
        if (counts > 1).any():
            raise SplitError(f"{bad}: client {i} holds index {int(uniq[counts > 1][0])} twice")
        taken = owner[a] >= 0
        if taken.any():
            j = int(a[taken][0])
            raise SplitError(
                f"{bad}: index {j} is held by client {int(owner[j])} and client {i}; clients"
                " must hold disjoint samples"
            )
        owner[a] = i
        out.append(a)
    return out


def client_features(
    strategy: str, client: int, num_clients: int, seed: int, params: dict[str, Any]
) -> dict[str, Any]:
    """What makes client ``client``'s images its own under ``strategy`` ({} = nothing)."""
    spec = get_partition(strategy)
    if spec.features is None:
        return {}
    f = spec.features(client, num_clients, seed, **params)
    return {"partition": strategy, **f} if f else {}


def apply_features(
    features: dict[str, Any], x: torch.Tensor, index: Any, part: str = "train"
) -> torch.Tensor:
    """The images ``x`` (dataset indices ``index`` of ``part``) as a client with ``features``
    holds them (``x`` itself where there are none)."""
    if not features:
        return x
    rest = dict(features)
    name = rest.pop("partition", None)
    if name not in list_partitions():
        raise SplitError(
            f"a client's images need partition '{name}', which is not registered in this"
            " process; register it (register_partition) before this stage runs"
        )
    return get_partition(name).images(x, torch.as_tensor(index, dtype=torch.long), part, **rest)


def client_images(
    client: ClientSplit, source: torch.Tensor, index: Any, part: str = "train"
) -> torch.Tensor:
    """``source[index]`` as ``client`` holds those images: ``source`` is the dataset's train
    (``part="train"``: the client's train and val parts) or test array (``"test"``: its local test
    part). The one way a stage takes a client's images, so a feature skew (``split=noise``)
    reaches the teacher, its class statistics and its local test, never the official test set."""
    index = torch.as_tensor(index, dtype=torch.long)
    return apply_features(client.features, source[index], index, part)


def clients_images(clients: Sequence[ClientSplit], source: torch.Tensor) -> torch.Tensor:
    """The train and val images of ``clients``, client after client, as they hold them."""
    return torch.cat([client_images(c, source, c.train + c.val) for c in clients])


def make_split(
    dataset: str,
    train_y: torch.Tensor | np.ndarray,
    test_y: torch.Tensor | np.ndarray,
    num_classes: int,
    strategy: str,
    num_clients: int,
    seed: int,
    *,
    val_fraction: float = 0.1,
    server_clients: int = 0,
    dataset_options: dict[str, Any] | None = None,
    **params: Any,
) -> Split:
    """Partition a dataset's train and test sets among clients with the registered partition
    ``strategy``; ``params`` are its ``split.*`` parameters (those of other partitions are
    ignored, unknown ones refused). Same seed → identical split."""
    own, n = check_split_params(
        strategy, num_clients, val_fraction, server_clients, num_classes, **params
    )
    ytr = np.asarray(train_y, dtype=np.int64)
    yte = np.asarray(test_y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_parts, record = partition_indices(strategy, ytr, n, rng, num_classes, own)
    counts = np.stack([np.bincount(ytr[p], minlength=num_classes) for p in train_parts])
    if get_partition(strategy).test == "same":
        test_parts = partition_indices(strategy, yte, n, rng, num_classes, own)[0]
    else:
        test_parts = split_test_like(yte, counts, rng)
    clients = []
    for i, (p, t, c) in enumerate(zip(train_parts, test_parts, counts, strict=True)):
        tr, va = hold_out_val(p, val_fraction, rng)
        feats = client_features(strategy, i, n, seed, own)
        clients.append(ClientSplit(tr.tolist(), va.tolist(), t.tolist(), c.tolist(), feats))
    recorded: dict[str, Any] = {"num_clients": n, "val_fraction": val_fraction}
    if server_clients:
        recorded["server_clients"] = server_clients
    return Split(
        dataset=dataset,
        strategy=strategy,
        params={**recorded, **own, **record},
        seed=seed,
        num_classes=num_classes,
        clients=clients,
        dataset_options=dict(dataset_options or {}),
        num_train=len(ytr),
        num_test=len(yte),
        label_digest=label_digest(ytr, yte),
    )


# ----------------------------------------------------------------------------- file I/O
def save_split(split: Split, path: str | Path) -> None:
    save_json(split.to_json(), path, indent=None)


def _as_index_list(v: Any, where: str, limit: int) -> list[int]:
    if not isinstance(v, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in v
    ):
        raise SplitError(f"split file: {where} must be a list of integers")
    if v and (min(v) < 0 or max(v) >= limit):
        raise SplitError(
            f"split file: {where} has an index outside 0..{limit - 1}; the file was made"
            " for another dataset or is corrupt — rerun `fed-distill split`"
        )
    return v


def _client_from_json(c: Any, i: int, path: Path, n_tr: int, n_te: int) -> ClientSplit:
    """Client ``i`` of a split file, its index lists checked against the dataset's sizes."""
    if not isinstance(c, dict) or any(
        k not in c for k in ("train", "val", "test", "train_class_counts")
    ):
        raise SplitError(
            f"split file {path}: client {i} needs 'train', 'val', 'test' and 'train_class_counts'"
        )
    features = c.get("features") or {}
    if not isinstance(features, dict) or (
        features and not isinstance(features.get("partition"), str)
    ):
        raise SplitError(
            f"split file {path}: client {i} 'features' must be an object naming its"
            " 'partition'; rerun `fed-distill split`"
        )
    return ClientSplit(
        _as_index_list(c["train"], f"client {i} 'train'", n_tr),
        _as_index_list(c["val"], f"client {i} 'val'", n_tr),
        _as_index_list(c["test"], f"client {i} 'test'", n_te),
        _as_index_list(c["train_class_counts"], f"client {i} 'train_class_counts'", 2**62),
        dict(features),
    )


def load_split(path: str | Path) -> Split:
    """Read and validate ``split.json`` (structure only; see :func:`check_split`)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(
            f"no split file at {path}; run `fed-distill split run_dir={path.parent}` first"
        )
    raw = load_json(path, "split file")
    if not isinstance(raw, dict):
        raise SplitError(f"split file {path} must hold a JSON object")
    for k in ("dataset", "strategy", "params", "seed", "num_classes", "clients"):
        if k not in raw:
            raise SplitError(f"split file {path} lacks '{k}'; rerun `fed-distill split`")
    if not isinstance(raw["clients"], list) or not raw["clients"]:
        raise SplitError(f"split file {path}: 'clients' must be a non-empty list")
    for k, types in (
        ("dataset", str),
        ("strategy", str),
        ("params", dict),
        ("seed", int),
        ("num_classes", int),
        ("num_train", int),
        ("num_test", int),
        ("dataset_options", dict),
    ):
        v = raw.get(k)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise SplitError(
                f"split file {path}: '{k}' must be {'a JSON object' if types is dict else 'an integer' if types is int else 'a string'},"
                f" got {v!r:.40}; rerun `fed-distill split`"
            )
    n_tr = int(raw.get("num_train") or 2**62)
    n_te = int(raw.get("num_test") or 2**62)
    clients = [_client_from_json(c, i, path, n_tr, n_te) for i, c in enumerate(raw["clients"])]
    # Clients own disjoint samples: an index held twice would leak data between clients (or
    # between a client's train and val parts).
    for part, names in (("train", ("train", "val")), ("test", ("test",))):
        seen: set[int] = set()
        for i, c in enumerate(clients):
            for name in names:
                for j in getattr(c, name):
                    if j in seen:
                        raise SplitError(
                            f"split file {path}: {part} index {j} is held more than once"
                            f" (again in client {i} '{name}'); rerun `fed-distill split`"
                        )
                    seen.add(j)
    return Split(
        dataset=str(raw["dataset"]),
        strategy=str(raw["strategy"]),
        params=dict(raw["params"]),
        seed=int(raw["seed"]),
        num_classes=int(raw["num_classes"]),
        clients=clients,
        dataset_options=dict(raw.get("dataset_options") or {}),
        num_train=int(raw.get("num_train") or 0),
        num_test=int(raw.get("num_test") or 0),
        label_digest=str(raw.get("label_digest") or ""),
    )


def check_split(
    split: Split, dataset_name: str, train_y: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> None:
    """Refuse a split made for other data: name, sizes, label fingerprint and class counts."""
    fix = "rerun `fed-distill split` for this dataset"
    if split.dataset != dataset_name:
        raise SplitError(
            f"split.json was made for dataset '{split.dataset}', not '{dataset_name}'; {fix}"
        )
    if split.num_classes != num_classes:
        raise SplitError(
            f"split.json has {split.num_classes} classes, dataset '{dataset_name}' has {num_classes}; {fix}"
        )
    if split.num_train and (split.num_train != len(train_y) or split.num_test != len(test_y)):
        raise SplitError(
            f"split.json was made for {split.num_train}/{split.num_test} train/test samples,"
            f" '{dataset_name}' has {len(train_y)}/{len(test_y)}; {fix}"
        )
    if split.label_digest and split.label_digest != label_digest(train_y, test_y):
        raise SplitError(f"split.json's labels do not match '{dataset_name}' as loaded here; {fix}")
    ytr = np.asarray(train_y)
    for i, c in enumerate(split.clients):
        if max(c.train + c.val, default=-1) >= len(ytr) or max(c.test, default=-1) >= len(test_y):
            raise SplitError(f"split.json client {i} indexes beyond '{dataset_name}'; {fix}")
        counts = np.bincount(ytr[c.train + c.val], minlength=num_classes).tolist()
        if counts != list(c.train_class_counts):
            raise SplitError(f"split.json client {i}: class counts do not match the labels; {fix}")
