"""FedMD data: a labelled public dataset, few-shot private data per party, the private test task.

Label space (see ``fed_distill.federated.config``): with ``label_space=joint`` the public classes
take outputs ``0 .. P-1`` and the private classes ``P .. P+Q-1`` in the order given by
``private_classes`` (the paper: 10 digits, then letters a-f at 10..15). With ``shared`` public
and private data name the same classes and share outputs ``0 .. Q-1``.

Private partitions (the paper's three):

* ``balanced``  -- each party gets ``samples_per_class`` images of every private class, drawn
  without replacement, disjoint across parties.
* ``writer``    -- each party gets every image of one writer (needs the dataset's
  ``train_writer`` extra, e.g. ``emnist_letters``); only writers with at least
  ``samples_per_class * Q`` images of the private classes qualify.
* ``subclass``  -- the private classes are superclasses (``cifar100`` with ``label: coarse``);
  party ``i`` gets ``samples_per_class`` images of subclass ``i mod S`` of each superclass
  (``S`` subclasses per superclass) and is tested on the superclasses.

Or any registered partition (``split=NAME``'s options: ``iid``, ``dirichlet``, ``quantity``,
``noise``, ...) with its ``split.*`` parameters: a stratified pool of ``samples_per_class`` x
``Q`` x parties images of the private classes is partitioned among the parties by it (it sees
the private classes as 0..Q-1, in ``private_classes`` order); with a feature skew (``noise``)
each party's private images carry its noise, the test task none.

The private test task is every test image of the private classes (official test split). When
the public and private datasets are the same files, the public pool excludes every image a party
owns, so public and private data never overlap. Nothing here looks at the private test labels
except to build the test task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fed_distill.data.partition import apply_features
from fed_distill.data.sources import Dataset, load_dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import ConfigError, DatasetError
from fed_distill.federated.config import FedMDConfig, private_split_params


@dataclass
class FedMDData:
    """Everything the parties see: uint8 images (N, C, H, W) and joint int64 labels."""

    # Public pool: the alignment subsets are drawn from all of it; transfer learning uses only
    # the labelled part (label >= 0, :meth:`public_labelled`). Label -1 marks an image of
    # ``public_unlabelled_classes``, whose label nobody uses.
    public_x: torch.Tensor
    public_y: torch.Tensor
    public_val_x: torch.Tensor  # held out of the public pool: early stopping only
    public_val_y: torch.Tensor
    private_x: list[torch.Tensor]  # one entry per party
    private_y: list[torch.Tensor]
    test_x: torch.Tensor  # the private test task (official test split, private classes)
    test_y: torch.Tensor
    public_norm: Normalizer
    private_norm: Normalizer
    public_names: list[str]
    private_names: list[str]
    offset: int  # output index of the first private class
    num_outputs: int
    in_channels: int
    image_size: int
    public_hflip: bool = False
    private_hflip: bool = False
    party_info: list[dict[str, Any]] = field(default_factory=list)
    # The benchmark's answer key for the public pool: the joint label of every image whose
    # class is known (the unlabelled images of private classes included), -1 elsewhere. Only
    # the server's consensus_acc reads it; no party trains or selects on it.
    public_true_y: torch.Tensor | None = None
    # per party, private images held out of all its training (fedmd.reliability_holdout)
    holdout_x: list[torch.Tensor] = field(default_factory=list)
    holdout_y: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_parties(self) -> int:
        return len(self.private_y)

    @property
    def num_private(self) -> int:
        return len(self.private_names)

    def public_labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled part of the public pool (transfer learning trains on it)."""
        keep = self.public_y >= 0
        if bool(keep.all()):
            return self.public_x, self.public_y
        return self.public_x[keep], self.public_y[keep]

    def public_val(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The held-out public part transfer learning selects on (None when there is none)."""
        return (self.public_val_x, self.public_val_y) if len(self.public_val_y) else None

    def pooled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of every party's private data (the pooled upper bound trains on it)."""
        return torch.cat(self.private_x), torch.cat(self.private_y)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (sizes, classes, label offsets, what each party owns)."""
        return {
            "public_train": int((self.public_y >= 0).sum()),
            "public_unlabelled": int((self.public_y < 0).sum()),
            "public_val": len(self.public_val_y),
            "public_classes": self.public_names,
            "private_classes": self.private_names,
            "private_test": len(self.test_y),
            "private_per_party": [len(y) for y in self.private_y],
            "holdout_per_party": [len(y) for y in self.holdout_y],
            "offset": self.offset,
            "num_outputs": self.num_outputs,
            "image": [self.in_channels, self.image_size, self.image_size],
            "party_info": self.party_info,
        }


# ----------------------------------------------------------------------------- label spaces
def joint_labels(y: torch.Tensor | np.ndarray, classes: list[int], offset: int) -> torch.Tensor:
    """Map original class ids to ``offset + position in classes`` (the joint output layer).

    ``joint_labels([12, 10], classes=[10, 11, 12], offset=10)`` is ``[12, 10]`` -> ``[12, 10]``;
    with ``classes=[0, 2]`` and ``offset=10``, label 2 becomes output 11. Every id must be listed.
    """
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64).reshape(-1)
    if len(y) == 0:
        return y
    size = max(max(classes), int(y.max())) + 1
    table = torch.full((size,), -1, dtype=torch.int64)
    table[torch.as_tensor(classes, dtype=torch.int64)] = torch.arange(len(classes)) + offset
    out = table[y.clamp(min=0)]
    out[y < 0] = -1
    if (out < 0).any():
        missing = sorted(set(y[out < 0].tolist()))[:5]
        raise ConfigError(f"labels {missing} are not among the classes {classes}")
    return out


# ----------------------------------------------------------------------------- sampling
def stratified_subset(
    y: np.ndarray | torch.Tensor, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` indices into ``y`` drawn without replacement, class proportions kept (sorted).

    Per-class quotas follow the largest-remainder rule, so ``size=5000`` over 10 equal classes
    is exactly 500 per class. ``size >= len(y)`` returns every index.
    """
    y = np.asarray(y)
    n = len(y)
    if size >= n:
        return np.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * size / n
    take = np.floor(quota).astype(np.int64)
    rest = size - int(take.sum())
    if rest > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:rest]] += 1
    picked = [
        rng.choice(np.flatnonzero(y == c), size=int(k), replace=False)
        for c, k in zip(classes, take, strict=True)
        if k > 0
    ]
    return np.sort(np.concatenate(picked))


def partition_balanced(
    y: np.ndarray,
    classes: list[int],
    num_parties: int,
    samples_per_class: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per party: ``samples_per_class`` indices of each class, disjoint across parties (the
    subclass partition with one subclass per class)."""
    one_subclass = np.zeros_like(y)
    return partition_by_subclass(y, one_subclass, classes, num_parties, samples_per_class, rng)[0]


def partition_by_writer(
    y: np.ndarray,
    writers: np.ndarray,
    classes: list[int],
    num_parties: int,
    min_samples: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[int]]:
    """One writer per party: all of that writer's images of ``classes`` (writers with enough)."""
    in_use = np.isin(y, classes)
    ids, counts = np.unique(writers[in_use], return_counts=True)
    eligible = ids[counts >= min_samples]
    if len(eligible) < num_parties:
        raise ConfigError(
            f"fedmd: only {len(eligible)} writers have >= {min_samples} images of the private "
            f"classes, {num_parties} parties need one each; lower fedmd.samples_per_class or "
            "fedmd.num_parties"
        )
    chosen = rng.choice(eligible, size=num_parties, replace=False)
    parts = [np.flatnonzero(in_use & (writers == w)) for w in chosen]
    return parts, [int(w) for w in chosen]


def partition_by_subclass(
    y: np.ndarray,
    sub: np.ndarray,
    classes: list[int],
    num_parties: int,
    samples_per_class: int,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Party ``i`` gets ``samples_per_class`` images of subclass ``i mod S`` of each class.

    Parties that share a subclass get disjoint images. Returns the indices and, per party, the
    subclass ids it owns (one per class, in ``classes`` order).
    """
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parties)]
    owned: list[list[int]] = [[] for _ in range(num_parties)]
    for c in classes:
        subs = np.unique(sub[y == c])
        if len(subs) == 0:
            raise ConfigError(f"fedmd: private class {c} has no training images")
        for k_sub, s in enumerate(subs):
            holders = [p for p in range(num_parties) if p % len(subs) == k_sub]
            if not holders:
                continue
            pool = np.flatnonzero((y == c) & (sub == s))
            need = samples_per_class * len(holders)
            if len(pool) < need:
                what = f"private class {c}" if len(subs) == 1 else f"subclass {s} of class {c}"
                raise ConfigError(
                    f"fedmd: {what} has {len(pool)} training images, but samples_per_class="
                    f"{samples_per_class} x {len(holders)} parties needs {need}; "
                    "lower fedmd.samples_per_class or fedmd.num_parties"
                )
            chosen = rng.choice(pool, size=need, replace=False)
            for k, p in enumerate(holders):
                parts[p].append(chosen[k * samples_per_class : (k + 1) * samples_per_class])
                owned[p].append(int(s))
    return [np.sort(np.concatenate(p)) for p in parts], owned


# ----------------------------------------------------------------------------- assembly
def _load(name: str, options: dict[str, Any], c: FedMDConfig) -> Dataset:
    return load_dataset(name, data_dir=c.data_dir, download=c.download, **dict(options))


def _check_classes(key: str, classes: list[int] | None, data: Dataset) -> list[int]:
    n = data.info.num_classes
    if classes is None:
        return list(range(n))
    bad = [k for k in classes if not 0 <= int(k) < n]
    if bad:
        raise ConfigError(
            f"fedmd.{key}: classes {bad} do not exist in {data.info.name} (classes 0..{n - 1})"
        )
    return [int(k) for k in classes]


def _label_space(
    c: FedMDConfig, pub: Any, priv: Any
) -> tuple[list[int], list[int], list[str], list[str], int, int]:
    """Public and private classes, their names, the private labels' offset and the outputs."""
    pub_classes = _check_classes("public_classes", c.public_classes, pub)
    priv_classes = _check_classes("private_classes", c.private_classes, priv)
    pub_names = [pub.info.class_names[k] for k in pub_classes]
    priv_names = [priv.info.class_names[k] for k in priv_classes]
    if c.label_space == "shared":
        if pub_names != priv_names:
            raise ConfigError(
                "fedmd.label_space=shared needs the same classes in public and private data, "
                f"got {pub_names} and {priv_names}; use label_space=joint"
            )
        offset, num_outputs = 0, len(priv_classes)
    else:
        offset, num_outputs = len(pub_classes), len(pub_classes) + len(priv_classes)
    return pub_classes, priv_classes, pub_names, priv_names, offset, num_outputs


def partition_registered(
    c: FedMDConfig,
    y: np.ndarray,
    classes: list[int],
    num_parties: int,
    rng: np.random.Generator,
    split: tuple[dict[str, Any], int],
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """``fedmd.partition`` naming a registered partition: a stratified pool of
    ``samples_per_class`` x private classes x parties images (what ``balanced`` hands out in
    all) partitioned among the parties by it; returns the indices and each party's features
    (``split=noise``: its noise, applied to its private images only)."""
    from fed_distill.data.partition import client_features, partition_indices

    params, seed = split
    eligible = np.flatnonzero(np.isin(y, classes))
    size = c.samples_per_class * len(classes) * num_parties
    if size > len(eligible):
        raise ConfigError(
            f"fedmd: the private classes have {len(eligible)} training images, but"
            f" samples_per_class={c.samples_per_class} x {len(classes)} classes x {num_parties}"
            f" parties needs {size}; lower fedmd.samples_per_class"
        )
    pool = eligible[stratified_subset(y[eligible], size, rng)]
    # the partition sees the private task's classes as 0..Q-1 (split.classes numbers them so)
    position = np.zeros(max(classes) + 1, dtype=np.int64)
    position[classes] = np.arange(len(classes))
    labels = position[y[pool]]
    parts, _ = partition_indices(c.partition, labels, num_parties, rng, len(classes), params)
    for p, ix in enumerate(parts):
        if len(ix) == 0:
            raise ConfigError(
                f"fedmd: party {p} received no private images from partition={c.partition};"
                " raise fedmd.samples_per_class (or split.min_size)"
            )
    features = [
        client_features(c.partition, p, num_parties, seed, params) for p in range(num_parties)
    ]
    return [np.sort(pool[ix]) for ix in parts], features


def _partition_private(
    c: FedMDConfig,
    priv: Any,
    priv_classes: list[int],
    num_parties: int,
    rng: np.random.Generator,
    split: tuple[dict[str, Any], int] | None,
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Each party's private train indices (``fedmd.partition``) and what defines its share."""
    y_tr = priv.train_y.numpy()
    info: list[dict[str, Any]] = [{} for _ in range(num_parties)]
    if c.partition == "balanced":
        parts = partition_balanced(y_tr, priv_classes, num_parties, c.samples_per_class, rng)
    elif c.partition == "writer":
        writers = priv.extras.get("train_writer")
        if writers is None:
            raise DatasetError(
                f"fedmd.partition=writer needs writer ids, and {c.private} has none "
                "(emnist_letters has them)"
            )
        min_samples = c.samples_per_class * len(priv_classes)
        parts, ids = partition_by_writer(
            y_tr, writers.numpy(), priv_classes, num_parties, min_samples, rng
        )
        for p, w in enumerate(ids):
            info[p]["writer"] = w
    elif c.partition != "subclass":  # a registered partition (split=NAME's options)
        parts, features = partition_registered(c, y_tr, priv_classes, num_parties, rng, split)
        for p, f in enumerate(features):
            if f:
                info[p]["features"] = f
    else:
        sub = priv.extras.get("train_fine")
        if sub is None:
            raise DatasetError(
                f"fedmd.partition=subclass needs subclass ids (extra 'train_fine'), and "
                f"{c.private} has none (use cifar100 with private_options.label=coarse)"
            )
        parts, owned = partition_by_subclass(
            y_tr, sub.numpy(), priv_classes, num_parties, c.samples_per_class, rng
        )
        for p, s in enumerate(owned):
            info[p]["subclasses"] = s
    return parts, info


def _public_pool(
    c: FedMDConfig,
    pub: Any,
    pub_classes: list[int],
    owned: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Public train and validation indices and the train labels (-1 for unlabelled images).

    ``owned``: private indices of the same files, never drawn into the public pool."""
    keep = np.isin(pub.train_y.numpy(), pub_classes)
    if owned is not None:
        keep[owned] = False
    pool = np.flatnonzero(keep)
    if c.public_size is not None and c.public_size < len(pool):
        pool = pool[stratified_subset(pub.train_y.numpy()[pool], c.public_size, rng)]
    if c.public_val_size >= len(pool):
        raise ConfigError(
            f"fedmd.public_val_size={c.public_val_size} leaves nothing to train on: the public "
            f"pool of {c.public} has {len(pool)} images"
        )
    val_pos = (
        stratified_subset(pub.train_y.numpy()[pool], c.public_val_size, rng)
        if c.public_val_size
        else np.array([], dtype=np.int64)
    )
    is_val = np.zeros(len(pool), dtype=bool)
    is_val[val_pos] = True
    train_ix, val_ix = pool[~is_val], pool[is_val]
    public_y = joint_labels(pub.train_y.numpy()[train_ix], pub_classes, 0)

    # --- unlabelled public images (alignment only): their labels are replaced by -1 here
    if c.public_unlabelled_classes:
        unl_classes = _check_classes("public_unlabelled_classes", c.public_unlabelled_classes, pub)
        unl_keep = np.isin(pub.train_y.numpy(), unl_classes)
        if owned is not None:
            unl_keep[owned] = False
        unl_ix = np.flatnonzero(unl_keep)
        if c.public_unlabelled_size is not None and c.public_unlabelled_size < len(unl_ix):
            unl_ix = np.sort(rng.choice(unl_ix, size=c.public_unlabelled_size, replace=False))
        train_ix = np.concatenate([train_ix, unl_ix])
        public_y = torch.cat([public_y, torch.full((len(unl_ix),), -1, dtype=torch.int64)])
    if c.public_subset_size > len(train_ix):
        raise ConfigError(
            f"fedmd.public_subset_size={c.public_subset_size} is larger than the public set "
            f"({len(train_ix)} images of {c.public} after holding out {len(val_ix)} for "
            "validation); lower it"
        )
    return train_ix, val_ix, public_y


def known_labels(y: np.ndarray, classes: list[int], offset: int) -> torch.Tensor:
    """Like :func:`joint_labels`, but a class not in ``classes`` becomes -1 (unknown)."""
    table = np.full(max([*classes, int(y.max(initial=0))]) + 1, -1, dtype=np.int64)
    table[classes] = np.arange(len(classes)) + offset
    return torch.from_numpy(table[y])


def hold_out(
    x: list[torch.Tensor], y: list[torch.Tensor], k: int, rng: np.random.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``k`` images of each party, drawn at random, taken out of its private data: (kept x,
    kept y, held-out x, held-out y). At least one image must be left to train on."""
    kx, ky, hx, hy = [], [], [], []
    for p, (xp, yp) in enumerate(zip(x, y, strict=True)):
        if k >= len(yp):
            raise ConfigError(
                f"fedmd.reliability_holdout={k} leaves party {p} nothing to train on"
                f" ({len(yp)} private images)"
            )
        out = torch.zeros(len(yp), dtype=torch.bool)
        out[torch.as_tensor(rng.choice(len(yp), size=k, replace=False))] = True
        kx.append(xp[~out])
        ky.append(yp[~out])
        hx.append(xp[out])
        hy.append(yp[out])
    return kx, ky, hx, hy


def build_fedmd_data(
    c: FedMDConfig, num_parties: int, seed: int, split: Mapping[str, Any] | None = None
) -> FedMDData:
    """Load public and private datasets and assemble the FedMD data (deterministic per seed).
    ``split``: the ``split`` config, for ``fedmd.partition`` naming a registered partition."""
    params = private_split_params(c, split, num_parties)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7331]))
    priv = _load(c.private, c.private_options, c)
    same_files = c.public == c.private and dict(c.public_options) == dict(c.private_options)
    pub = priv if same_files else _load(c.public, c.public_options, c)
    shape_pub, shape_priv = tuple(pub.train_x.shape[1:]), tuple(priv.train_x.shape[1:])
    if shape_pub != shape_priv:
        raise ConfigError(
            f"fedmd: public images ({c.public}) are {'x'.join(map(str, shape_pub))} but private "
            f"images ({c.private}) are {'x'.join(map(str, shape_priv))}; every party model "
            "takes both, so they must match (e.g. fedmd.private_options.image_size=28 for digits)"
        )
    pub_classes, priv_classes, pub_names, priv_names, offset, num_outputs = _label_space(
        c, pub, priv
    )

    # --- private data per party, then the test task
    own = None if params is None else (params, seed)
    parts, info = _partition_private(c, priv, priv_classes, num_parties, rng, own)
    y_tr = priv.train_y.numpy()
    private_x = [
        apply_features(info[p].get("features", {}), priv.train_x[torch.as_tensor(ix)], ix)
        for p, ix in enumerate(parts)
    ]
    private_y = [joint_labels(y_tr[ix], priv_classes, offset) for ix in parts]
    holdout_x, holdout_y = [], []
    if c.reliability_holdout > 0:  # its own stream: the rest of the build is unchanged
        hold_rng = np.random.default_rng(np.random.SeedSequence([seed, 7331, 1]))
        private_x, private_y, holdout_x, holdout_y = hold_out(
            private_x, private_y, c.reliability_holdout, hold_rng
        )
    for p, y in enumerate(private_y):
        info[p]["num_samples"] = len(y)
        info[p]["class_counts"] = torch.bincount(y - offset, minlength=len(priv_classes)).tolist()
    test_mask = np.isin(priv.test_y.numpy(), priv_classes)
    test_x = priv.test_x[torch.as_tensor(test_mask)]
    test_y = joint_labels(priv.test_y.numpy()[test_mask], priv_classes, offset)

    # --- public pool: public classes, minus anything a party owns when the files are the same
    owned = np.concatenate(parts) if same_files else None
    train_ix, val_ix, public_y = _public_pool(c, pub, pub_classes, owned, rng)
    pub_offset_labels = 0  # public classes always start at output 0
    true_y = public_y.clone()
    unlabelled = (public_y < 0).numpy()
    if unlabelled.any() and same_files:  # images of the private classes: known to the benchmark
        true_y[unlabelled] = known_labels(
            pub.train_y.numpy()[train_ix][unlabelled], priv_classes, offset
        )
    return FedMDData(
        public_x=pub.train_x[torch.as_tensor(train_ix)],
        public_y=public_y,
        public_val_x=pub.train_x[torch.as_tensor(val_ix, dtype=torch.int64)],
        public_val_y=joint_labels(pub.train_y.numpy()[val_ix], pub_classes, pub_offset_labels)
        if len(val_ix)
        else torch.empty(0, dtype=torch.int64),
        private_x=private_x,
        private_y=private_y,
        test_x=test_x,
        test_y=test_y,
        public_norm=Normalizer(pub.info.mean, pub.info.std),
        private_norm=Normalizer(priv.info.mean, priv.info.std),
        public_names=pub_names,
        private_names=priv_names,
        offset=offset,
        num_outputs=num_outputs,
        in_channels=shape_priv[0],
        image_size=shape_priv[1],
        public_hflip=pub.info.hflip,
        private_hflip=priv.info.hflip,
        party_info=info,
        public_true_y=true_y,
        holdout_x=holdout_x,
        holdout_y=holdout_y,
    )
