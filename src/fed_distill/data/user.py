"""A user's own images as a dataset: ``dataset=npz dataset.path=FILE`` and ``dataset=folder
dataset.path=DIR`` (or a name of their own, ``register_dataset`` in ``sources.py``).

- **npz**: one ``numpy.savez`` file with the arrays ``x_train``, ``y_train``, ``x_test``,
  ``y_test``: uint8 images ``N×H×W``, ``N×H×W×C`` or ``N×C×H×W`` (C = 1 or 3, H = W), integer
  labels 0..K-1; optionally ``class_names`` (K strings). Read with ``allow_pickle=False``.
- **folder**: ``DIR/train/CLASS/*.png|jpg|jpeg`` and ``DIR/test/CLASS/...``, one sub-folder per
  class (its name is the class name; ``test/`` may lack a class); read with Pillow. All images
  grey-scale gives 1 channel, else every image is converted to RGB. Images must share one
  square size unless ``dataset.image_size=N`` resizes them all to N×N (bilinear).

Class names, channels and size are inferred; mean and std are computed on the training part;
horizontal flips are off (``train.hflip=true`` turns them on). Every malformed case is one
:class:`DatasetError` line naming the file and what to do. The arrays are cached in-process
(keyed by path, size and modification time), so checking the config and loading read once.
"""

from __future__ import annotations

import os
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fed_distill.data.dataset import Dataset, DatasetInfo, to_dataset
from fed_distill.errors import DatasetError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAVEZ_HINT = "save it with numpy.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)"
_GREY_MODES = ("1", "L", "LA")


def no_files() -> Path:
    """The ``bundled`` hook of these sources: there is nothing to fetch or look up."""
    raise DatasetError("your own data is read from dataset.path; there is nothing to fetch")


def kind_of(path: str | os.PathLike[str]) -> str:
    """``npz`` for a file, ``folder`` for a folder; a missing path is a DatasetError."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "folder"
    if p.is_file():
        return "npz"
    raise DatasetError(f"{p} does not exist; give an .npz file or a folder with train/ and test/")


def _path(name: str, kind: str, opts: dict[str, Any]) -> Path:
    raw = opts.get("path")
    if not raw:
        what = "FILE (an .npz file)" if kind == "npz" else "DIR (a folder with train/ and test/)"
        raise DatasetError(f"dataset={name} needs dataset.path={what}")
    p = Path(str(raw)).expanduser().resolve()
    if not p.exists():
        raise DatasetError(f"dataset={name}: {p} does not exist; check dataset.path")
    if kind == "npz" and p.is_dir():
        raise DatasetError(
            f"dataset={name}: {p} is a folder; dataset=npz needs an .npz file"
            " (for a folder of images use dataset=folder)"
        )
    if kind == "folder" and not p.is_dir():
        raise DatasetError(
            f"dataset={name}: {p} is a file; dataset=folder needs a folder with train/ and test/"
            " (for an .npz file use dataset=npz)"
        )
    return p


def _info(name: str, arrays: tuple[np.ndarray, ...], class_names: tuple[str, ...]) -> DatasetInfo:
    train_x = arrays[0]
    pixels = train_x.astype(np.float64) / 255.0
    mean = pixels.mean(axis=(0, 2, 3))
    std = np.maximum(pixels.std(axis=(0, 2, 3)), 1.0 / 255)  # constant images: no division by 0
    return DatasetInfo(
        name,
        class_names,
        int(train_x.shape[1]),
        int(train_x.shape[2]),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        False,
    )


# ----------------------------------------------------------------------------- npz
def npz_info(opts: dict[str, Any], name: str = "npz") -> DatasetInfo:
    p = _path(name, "npz", opts)
    *arrays, names = _npz_cached(str(p), *_stamp(p), name)
    return _info(name, tuple(arrays), names)


def read_npz(folder: Any, info: DatasetInfo, opts: dict[str, Any], name: str = "npz") -> Dataset:
    p = _path(name, "npz", opts)
    return to_dataset(info, *_npz_cached(str(p), *_stamp(p), name)[:4])


def _stamp(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=4)
def _npz_cached(path: str, mtime: int, size: int, name: str) -> tuple[Any, ...]:
    raw = _read_npz_file(Path(path), name)
    where = f"dataset={name}: {path}"
    x_tr, x_te = (_nchw(raw[k], k, where) for k in ("x_train", "x_test"))
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DatasetError(
            f"{where}: x_train images are {_shape(x_tr)} but x_test images are {_shape(x_te)};"
            " both parts need one shape"
        )
    y_tr, y_te = (
        _labels(raw[k], k, len(x), where) for k, x in (("y_train", x_tr), ("y_test", x_te))
    )
    names = _class_names(raw.get("class_names"), y_tr, y_te, where)
    out = (x_tr, y_tr, x_te, y_te)
    for a in out:
        a.flags.writeable = False
    return (*out, names)


def _read_npz_file(p: Path, name: str) -> dict[str, np.ndarray]:
    where = f"dataset={name}: {p}"
    try:
        npz = np.load(p, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise DatasetError(
                f"{where} is not an .npz file (it holds pickled data); {SAVEZ_HINT}"
            ) from None
        raise DatasetError(f"{where} is not a readable .npz file ({e}); {SAVEZ_HINT}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{where} is not a readable .npz file ({e}); {SAVEZ_HINT}") from None
    if not hasattr(npz, "files"):
        raise DatasetError(f"{where} holds a single array, not named arrays; {SAVEZ_HINT}")
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DatasetError(
                f"{where} lacks {', '.join(missing)} (it has: {', '.join(npz.files) or 'nothing'});"
                f" {SAVEZ_HINT}"
            )
        out = {}
        for k in (*NPZ_KEYS, *(["class_names"] if "class_names" in npz.files else [])):
            try:
                out[k] = npz[k]
            except ValueError:
                raise DatasetError(
                    f"{where}: {k} is stored as Python objects (pickled); save plain numeric arrays"
                ) from None
            except Exception as e:  # noqa: BLE001 - zip/CRC errors of a damaged file
                raise DatasetError(
                    f"{where}: {k} cannot be read ({type(e).__name__}: {e})"
                ) from None
    return out


def _shape(x: np.ndarray) -> str:
    return "x".join(str(d) for d in x.shape[1:])


def _nchw(x: np.ndarray, key: str, where: str) -> np.ndarray:
    """uint8 images as N×C×H×W from N×H×W, N×H×W×C or N×C×H×W (C = 1 or 3, square)."""
    if x.dtype != np.uint8:
        raise DatasetError(
            f"{where}: {key} has dtype {x.dtype}; images must be uint8 0..255"
            " (e.g. (x * 255).round().astype(numpy.uint8) for floats in [0, 1])"
        )
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DatasetError(
            f"{where}: {key} has shape {x.shape}; expected N×H×W, N×H×W×C or N×C×H×W"
            " with C = 1 or 3 channels"
        )
    if len(x) == 0:
        raise DatasetError(f"{where}: {key} holds no images")
    if x.shape[2] != x.shape[3]:
        raise DatasetError(
            f"{where}: {key} images are {x.shape[2]}x{x.shape[3]}; fed-distill needs square"
            " images (pad or crop them to H = W)"
        )
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, key: str, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        raise DatasetError(
            f"{where}: {key} must be a 1-D array of integer class indices, got {y.dtype}"
            f" of shape {y.shape}"
        )
    if len(y) != n:
        raise DatasetError(f"{where}: {key} has {len(y)} labels for {n} images")
    if y.min() < 0:
        raise DatasetError(f"{where}: {key} has negative labels; use class indices 0..K-1")
    return y.astype(np.int64)


def _class_names(
    raw: np.ndarray | None, y_tr: np.ndarray, y_te: np.ndarray, where: str
) -> tuple[str, ...]:
    k = int(y_tr.max()) + 1
    if raw is not None:
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise DatasetError(f"{where}: class_names must be a 1-D array of strings")
        if len(raw) < k:
            raise DatasetError(
                f"{where}: class_names has {len(raw)} names but y_train has {k} classes"
            )
        k = len(raw)
    if k < 2:
        raise DatasetError(f"{where}: y_train has a single class; classification needs two or more")
    if int(y_te.max()) >= k:
        raise DatasetError(
            f"{where}: y_test has label {int(y_te.max())}, but y_train's classes are 0..{k - 1}"
        )
    if raw is not None:
        return tuple(str(s.decode() if isinstance(s, bytes) else s) for s in raw)
    return tuple(str(i) for i in range(k))


# ----------------------------------------------------------------------------- folder
def folder_info(opts: dict[str, Any], name: str = "folder") -> DatasetInfo:
    p = _path(name, "folder", opts)
    size = _image_size(opts.get("image_size"), name)
    *arrays, names = _folder_cached(str(p), _folder_stamp(p), size, name)
    return _info(name, tuple(arrays), names)


def read_folder(
    folder: Any, info: DatasetInfo, opts: dict[str, Any], name: str = "folder"
) -> Dataset:
    p = _path(name, "folder", opts)
    size = _image_size(opts.get("image_size"), name)
    return to_dataset(info, *_folder_cached(str(p), _folder_stamp(p), size, name)[:4])


def _image_size(size: Any, name: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not 1 <= size <= 1024:
        raise DatasetError(f"dataset={name}: image_size={size!r} is invalid; use 1..1024 or null")
    return int(size)


def _image_files(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(d: Path) -> list[Path]:
    return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))


def _folder_stamp(root: Path) -> tuple[tuple[str, int, int], ...]:
    """What the cache key sees of a folder: every image file's path, mtime and size."""
    out = []
    for part in ("train", "test"):
        d = root / part
        for c in _class_dirs(d) if d.is_dir() else []:
            for f in _image_files(c):
                st = f.stat()
                out.append((f"{part}/{c.name}/{f.name}", st.st_mtime_ns, st.st_size))
    return tuple(out)


@lru_cache(maxsize=4)
def _folder_cached(root: str, stamp: Any, size: int | None, name: str) -> tuple[Any, ...]:
    where = f"dataset={name}: {root}"
    base = Path(root)
    for part in ("train", "test"):
        if not (base / part).is_dir():
            raise DatasetError(
                f"{where} has no {part}/ folder; expected {part}/CLASS/*.png|jpg, one sub-folder"
                " per class"
            )
    classes = [c.name for c in _class_dirs(base / "train")]
    if len(classes) < 2:
        raise DatasetError(
            f"{where}: train/ has {len(classes)} class folder(s); put each class's images in a"
            " sub-folder of its own (train/CLASS/...), at least two classes"
        )
    unknown = sorted({c.name for c in _class_dirs(base / "test")} - set(classes))
    if unknown:
        raise DatasetError(f"{where}: test/ has classes that train/ lacks: {', '.join(unknown)}")
    images, labels = {}, {}
    for part in ("train", "test"):
        images[part], labels[part] = _read_part(base / part, classes, where)
    grey = all(im.mode in _GREY_MODES for part in images.values() for im in part)
    x = {part: _to_array(images[part], grey, size, base, where) for part in images}
    _same_size(x, where)
    out = (x["train"], labels["train"], x["test"], labels["test"])
    for a in out:
        a.flags.writeable = False
    return (*out, tuple(classes))


def _read_part(d: Path, classes: list[str], where: str) -> tuple[list[Any], np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    images, labels = [], []
    for k, cls in enumerate(classes):
        files = _image_files(d / cls) if (d / cls).is_dir() else []
        if not files and d.name == "train":
            raise DatasetError(f"{where}: train/{cls} holds no PNG or JPEG images")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    images.append(im.copy())
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                reason = (
                    "not an image Pillow can read"
                    if isinstance(e, UnidentifiedImageError)
                    else (str(e).replace(str(f), "").strip() or type(e).__name__)[:120]
                )
                raise DatasetError(f"{where}: cannot read image {f} ({reason})") from None
            images[-1].filename = f"{d.name}/{cls}/{f.name}"  # for error messages
            labels.append(k)
    if not images:
        raise DatasetError(f"{where}: {d.name}/ holds no PNG or JPEG images")
    return images, np.asarray(labels, dtype=np.int64)


def _to_array(
    images: list[Any], grey: bool, size: int | None, base: Path, where: str
) -> np.ndarray:
    from PIL import Image

    arrays = []
    for im in images:
        conv = im.convert("L" if grey else "RGB")
        if size is not None and conv.size != (size, size):
            conv = conv.resize((size, size), Image.Resampling.BILINEAR)
        elif size is None and conv.size[0] != conv.size[1]:
            raise DatasetError(
                f"{where}: {im.filename} is {conv.size[0]}x{conv.size[1]}, not square; give"
                " dataset.image_size=N to resize every image to NxN"
            )
        a = np.asarray(conv, dtype=np.uint8)
        arrays.append(a[None] if grey else a.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = next(
            im.filename for im, a in zip(images, arrays, strict=True) if a.shape != arrays[0].shape
        )
        raise DatasetError(
            f"{where}: images differ in size ({images[0].filename} is {arrays[0].shape[-1]}px,"
            f" {first} is not); give dataset.image_size=N to resize every image to NxN"
        )
    return np.ascontiguousarray(np.stack(arrays))


def _same_size(x: dict[str, np.ndarray], where: str) -> None:
    if x["train"].shape[1:] != x["test"].shape[1:]:
        raise DatasetError(
            f"{where}: train/ images are {_shape(x['train'])}, test/ images are {_shape(x['test'])};"
            " give dataset.image_size=N to resize every image to NxN"
        )
