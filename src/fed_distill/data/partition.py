"""Who owns which index: client partitions of a dataset's train and test sets.

Every strategy maps train labels to one index list per client. The test set is split to match:
each client's local test part follows its own train label distribution (for ``heter`` the seed
project's definition is applied to the test labels directly, as it did). A validation part is
then held out of each client's train part; teachers select checkpoints on it, never on test.
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
from fed_distill.errors import SplitError

STRATEGIES = ("iid", "dirichlet", "shards", "heter", "classes")


@dataclass
class ClientSplit:
    train: list[int]
    val: list[int]
    test: list[int]
    train_class_counts: list[int] = field(default_factory=list)


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
            "clients": [
                {
                    "train": c.train,
                    "val": c.val,
                    "test": c.test,
                    "train_class_counts": c.train_class_counts,
                }
                for c in self.clients
            ],
        }


def label_digest(train_y: torch.Tensor | np.ndarray, test_y: torch.Tensor | np.ndarray) -> str:
    """A short fingerprint of a dataset's labels, so a split is never applied to other data."""
    h = hashlib.sha256()
    for y in (train_y, test_y):
        h.update(np.asarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- strategies
def _check_common(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise SplitError(f"split.num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise SplitError(f"cannot split {n} samples among {num_clients} clients; use fewer clients")


def split_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` near-equal parts."""
    _check_common(len(labels), num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(len(labels)), num_clients)]


def split_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    num_classes: int | None = None,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: for each class, client shares ~ Dir(alpha); redrawn until every client holds
    at least ``min_size`` samples. A client already above the mean size gets no more of a class
    (the usual NIID-Bench rule, which keeps sizes from exploding at small alpha)."""
    if not 0 < alpha < float("inf"):  # also refuses NaN; inf would loop over degenerate draws
        raise SplitError(f"split.alpha must be > 0 for a Dirichlet split, got {alpha}")
    n = len(labels)
    _check_common(n, num_clients)
    if min_size * num_clients > n:
        raise SplitError(
            f"split.min_size={min_size} x {num_clients} clients exceeds the {n} samples;"
            " lower split.min_size or use fewer clients"
        )
    classes = range(num_classes if num_classes is not None else int(labels.max()) + 1)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    for _ in range(max_tries):
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
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
                q.extend(chunk.tolist())
        if min(len(q) for q in parts) >= min_size:
            return [np.sort(np.array(q, dtype=np.int64)) for q in parts]
    raise SplitError(
        f"no Dirichlet(alpha={alpha}) split gave every client >= {min_size} samples in"
        f" {max_tries} draws; raise split.alpha or lower split.min_size"
    )


def assign_shards(
    num_clients: int, num_classes: int, classes_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """k distinct classes per client, classes visited round-robin in a random order so that
    every class is owned by someone whenever num_clients * k >= num_classes."""
    if not 1 <= classes_per_client <= num_classes:
        raise SplitError(
            f"split.classes_per_client must be in 1..{num_classes}, got {classes_per_client}"
        )
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
    for i, cl in enumerate(class_lists):
        for c in cl:
            if not (isinstance(c, int | np.integer) and 0 <= c < num_classes):
                raise SplitError(
                    f"split.classes: client {i} names class {c!r}, but the dataset has"
                    f" classes 0..{num_classes - 1}"
                )
    _check_common(len(labels), len(class_lists))
    parts: list[list[int]] = [[] for _ in class_lists]
    for k in range(num_classes):
        owners = [i for i, cl in enumerate(class_lists) if k in cl]
        if not owners:
            continue
        idx = rng.permutation(np.flatnonzero(labels == k))
        for i, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[i].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def split_heter(
    labels: np.ndarray, num_clients: int, unif_percentage: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The seed project's split. A fraction ``unif_percentage`` of the (shuffled) indices is cut
    into ``num_clients`` equal uniform parts; the rest is sorted by label and cut into
    ``num_clients`` contiguous chunks; client i gets uniform part i + sorted chunk i.
    1.0 = IID, 0.5 = the seed's "heter", 0.0 = its "full" (class-disjoint when the chunks
    fall on class boundaries)."""
    if not 0.0 <= unif_percentage <= 1.0:
        raise SplitError(f"split.unif_percentage must be in [0, 1], got {unif_percentage}")
    n = len(labels)
    _check_common(n, num_clients)
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
        for q, chunk in zip(parts, np.split(idx, cuts), strict=True):
            q.extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def hold_out_val(
    idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random validation part of a client's train indices (at least one sample when >= 2)."""
    if not 0.0 <= val_fraction < 1.0:
        raise SplitError(f"split.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(idx) * val_fraction))
    if val_fraction > 0 and len(idx) >= 2:
        n_val = max(1, n_val)
    perm = rng.permutation(idx)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_split(
    dataset: str,
    train_y: torch.Tensor | np.ndarray,
    test_y: torch.Tensor | np.ndarray,
    num_classes: int,
    strategy: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
    classes_per_client: int = 2,
    unif_percentage: float = 0.5,
    classes: Sequence[Sequence[int]] | None = None,
    val_fraction: float = 0.1,
    dataset_options: dict[str, Any] | None = None,
    server_clients: int = 0,
) -> Split:
    """Partition a dataset's train and test sets among clients. Same seed → identical split."""
    ytr = np.asarray(train_y, dtype=np.int64)
    yte = np.asarray(test_y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {"num_clients": num_clients, "val_fraction": val_fraction}
    if server_clients:
        params["server_clients"] = server_clients
    if strategy == "iid":
        train_parts = split_iid(ytr, num_clients, rng)
    elif strategy == "dirichlet":
        params.update(alpha=alpha, min_size=min_size)
        train_parts = split_dirichlet(ytr, num_clients, alpha, rng, min_size, num_classes)
    elif strategy == "shards":
        params.update(classes_per_client=classes_per_client)
        owned = assign_shards(num_clients, num_classes, classes_per_client, rng)
        params["client_classes"] = owned
        train_parts = split_by_classes(ytr, owned, num_classes, rng)
    elif strategy == "classes":
        if not classes:
            raise SplitError(
                "split=classes needs split.classes, e.g. split.classes=[[0,1,2],[3,4]]"
            )
        owned = [[int(c) if isinstance(c, int | np.integer) else c for c in cl] for cl in classes]
        params["classes"] = owned
        params["num_clients"] = num_clients = len(owned)
        train_parts = split_by_classes(ytr, owned, num_classes, rng)
    elif strategy == "heter":
        params.update(unif_percentage=unif_percentage)
        train_parts = split_heter(ytr, num_clients, unif_percentage, rng)
    else:
        raise SplitError(
            f"unknown split strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}"
        )

    if not 0 <= server_clients < len(train_parts):
        raise SplitError(
            f"split.server_clients must be in 0..{len(train_parts) - 1} (at least one teacher),"
            f" got {server_clients}"
        )
    for i, p in enumerate(train_parts):
        if len(p) == 0:
            raise SplitError(
                f"client {i} received no training samples; use fewer clients or another split"
            )
    counts = np.stack([np.bincount(ytr[p], minlength=num_classes) for p in train_parts])
    if strategy == "heter":
        test_parts = split_heter(yte, num_clients, unif_percentage, rng)
    else:
        test_parts = split_test_like(yte, counts, rng)
    clients = []
    for p, t, c in zip(train_parts, test_parts, counts, strict=True):
        tr, va = hold_out_val(p, val_fraction, rng)
        clients.append(ClientSplit(tr.tolist(), va.tolist(), t.tolist(), c.tolist()))
    return Split(
        dataset=dataset,
        strategy=strategy,
        params=params,
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
    clients = []
    for i, c in enumerate(raw["clients"]):
        if not isinstance(c, dict) or any(
            k not in c for k in ("train", "val", "test", "train_class_counts")
        ):
            raise SplitError(
                f"split file {path}: client {i} needs 'train', 'val', 'test' and 'train_class_counts'"
            )
        clients.append(
            ClientSplit(
                _as_index_list(c["train"], f"client {i} 'train'", n_tr),
                _as_index_list(c["val"], f"client {i} 'val'", n_tr),
                _as_index_list(c["test"], f"client {i} 'test'", n_te),
                _as_index_list(c["train_class_counts"], f"client {i} 'train_class_counts'", 2**62),
            )
        )
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
