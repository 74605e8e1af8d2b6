"""The dataset types every source returns, and the checks every file reader shares.

:class:`Dataset` holds the official train/test splits as tensors (``uint8`` images ``(N, C, H,
W)``, ``int64`` labels); :class:`DatasetInfo` its static facts. The helpers turn numpy arrays read
from a file into a :class:`Dataset`, refusing labels or pixels that no official file holds, with
one line that says to re-fetch the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fed_distill.errors import DatasetError

DIGIT_NAMES = tuple(str(i) for i in range(10))


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


def to_dataset(
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


def check_labels(name: str, path: Path, y: np.ndarray, low: int, high: int) -> np.ndarray:
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


def check_pixels(name: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Pixels as uint8; a float/int array must already hold integers in 0..255."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DatasetError(f"{name}: {path} stores images as {x.dtype}; re-fetch the file")
    if x.size and (x.min() < 0 or x.max() > 255 or not np.all(np.mod(x, 1) == 0)):
        raise DatasetError(f"{name}: {path} has pixel values outside 0..255; re-fetch the file")
    return x.astype(np.uint8)


def corrupt_error(name: str, path: Path, exc: BaseException) -> DatasetError:
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
    return DatasetError(
        f"{name}: cannot read {path} ({reason}); the file is truncated or not the official "
        "format, delete it and re-fetch"
    )
