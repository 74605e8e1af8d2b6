"""A user's own data (issue 20): ``dataset=npz dataset.path=FILE``, ``dataset=folder
dataset.path=DIR`` and ``register_dataset``, on files the tests write; every malformed case is
one DatasetError line."""

import json

import numpy as np
import pytest
import torch

from conftest import FAST_TRAIN
from fed_distill.data import dataset_info, load_dataset, register_dataset
from fed_distill.errors import DatasetError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *FAST_TRAIN,
    "split=iid",
    "split.num_clients=2",
    "seed=0",
    "synthesis.iterations=5",
    "synthesis.batch_size=32",
    "student.epochs=2",
    "student.initial_batches=1",
    "student.new_batches_per_epoch=1",
    "student.steps_per_epoch=5",
    "student.batch_size=32",
]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def write_npz(path, digits, **replace):
    arrays = {
        "x_train": digits.train_x.numpy()[:, 0],  # N×H×W
        "y_train": digits.train_y.numpy(),
        "x_test": digits.test_x.numpy().transpose(0, 2, 3, 1),  # N×H×W×C
        "y_test": digits.test_y.numpy(),
    }
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_folder(root, images_by_part, fmt="png"):
    """images_by_part: {"train": [(class_name, HxW or HxWx3 uint8 array), ...], "test": ...}."""
    from PIL import Image

    for part, items in images_by_part.items():
        for i, (cls, a) in enumerate(items):
            d = root / part / cls
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(d / f"{i}.{fmt}")
    return root


def digit_images(digits, n_train=120, n_test=40, size=None):
    def items(x, y, n):
        return [(f"d{int(y[i])}", x[i, 0].numpy()) for i in range(n)]

    return {
        "train": items(digits.train_x, digits.train_y, n_train),
        "test": items(digits.test_x, digits.test_y, n_test),
    }


# ----------------------------------------------------------------------------- npz
def test_npz_layouts_read_the_same_images_and_stats_match_the_training_part(tmp_path, digits):
    f = write_npz(tmp_path / "d.npz", digits)
    ds = load_dataset("npz", path=str(f))
    assert torch.equal(ds.train_x, digits.train_x) and torch.equal(ds.test_x, digits.test_x)
    assert torch.equal(ds.train_y, digits.train_y) and torch.equal(ds.test_y, digits.test_y)
    ref = dataset_info("digits")  # digits' own stats are measured on its training part too
    assert ds.info.mean == pytest.approx(ref.mean) and ds.info.std == pytest.approx(ref.std)
    assert ds.info.num_classes == 10 and ds.info.channels == 1 and ds.info.image_size == 8
    rgb = np.repeat(digits.train_x.numpy(), 3, axis=1)  # N×C×H×W, 3 channels
    names = np.array([f"class {k}" for k in range(10)])
    f2 = write_npz(tmp_path / "c.npz", digits, x_train=rgb, x_test=np.repeat(
        digits.test_x.numpy(), 3, axis=1), class_names=names)  # fmt: skip
    info = dataset_info("npz", path=str(f2))
    assert info.channels == 3 and info.class_names[3] == "class 3" and not info.hflip


def _bad_npz_cases(digits):
    x, y = digits.train_x.numpy()[:, 0], digits.train_y.numpy()
    return {
        "lacks y_test": dict(y_test=None),
        "has dtype float32": dict(x_train=x.astype(np.float32) / 255),
        "expected N×H×W, N×H×W×C or N×C×H×W": dict(x_train=np.zeros((len(y), 8, 8, 2), np.uint8)),
        "needs square": dict(x_train=np.zeros((len(y), 8, 6), np.uint8)),
        "holds no images": dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=y[:0]),
        "both parts need one shape": dict(x_test=np.zeros((len(digits.test_y), 9, 9), np.uint8)),
        "labels for": dict(y_train=y[:-1]),
        "integer class indices": dict(y_train=y.astype(np.float64)),
        "negative labels": dict(y_train=y - 1),
        "single class": dict(y_train=np.zeros_like(y), y_test=np.zeros_like(digits.test_y)),
        "but y_train's classes are 0..9": dict(y_test=digits.test_y.numpy() + 1),
        "class_names has 3 names": dict(class_names=np.array(["a", "b", "c"])),
    }


def test_every_malformed_npz_is_one_line(tmp_path, digits):
    for i, (needle, replace) in enumerate(_bad_npz_cases(digits).items()):
        f = write_npz(tmp_path / f"bad{i}.npz", digits, **replace)
        with pytest.raises(DatasetError) as e:
            dataset_info("npz", path=str(f))
        msg = str(e.value)
        assert needle in msg and "\n" not in msg and str(f) in msg, (needle, msg)


def test_files_that_are_no_npz_are_one_line(tmp_path, digits):
    (tmp_path / "notes.npz").write_text("not numpy")
    np.save(tmp_path / "one.npy", digits.train_x.numpy())
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=[0],
             x_test=np.zeros((1, 8, 8), np.uint8), y_test=[0])  # fmt: skip
    cases = {
        tmp_path / "missing.npz": "does not exist",
        tmp_path: "is a folder; dataset=npz needs an .npz file",
        tmp_path / "notes.npz": "is not an .npz file (it holds pickled data)",
        tmp_path / "one.npy": "holds a single array",
        tmp_path / "obj.npz": "x_train is stored as Python objects",
    }
    for path, needle in cases.items():
        with pytest.raises(DatasetError) as e:
            dataset_info("npz", path=str(path))
        assert needle in str(e.value) and "\n" not in str(e.value), (path, str(e.value))
    with pytest.raises(DatasetError, match=r"dataset=npz needs dataset.path=FILE"):
        dataset_info("npz")
    with pytest.raises(DatasetError, match="unknown option"):
        dataset_info("cifar10", path=str(tmp_path))


@pytest.mark.slow
def test_npz_oneshot_end_to_end_from_the_command_line(cli, tmp_path, digits):
    f = write_npz(tmp_path / "mine.npz", digits)
    code, _, err = cli(
        "oneshot", "dataset=npz", f"dataset.path={f}", *TINY, f"run_dir={tmp_path / 'r'}"
    )
    assert code == 0, err
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert split["dataset"] == "npz" and split["dataset_options"] == {"path": str(f)}
    assert len(r["teacher_acc"]) == 2 and 0 <= r["student_acc"] <= 1
    # a later stage finds the file through split.json, from any working directory
    code, _, err = cli("train-teachers", f"run_dir={tmp_path / 'r'}", *FAST_TRAIN)
    assert code == 0, err


def test_bad_npz_stops_the_cli_before_any_work(cli, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = cli("oneshot", "dataset=npz", f"dataset.path={tmp_path / 'x.npz'}", *TINY,
                       f"run_dir={tmp_path / 'r'}")  # fmt: skip
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: dataset=npz:")
    assert not (tmp_path / "r" / "split.json").exists()
    code, _, err = cli(
        "split", "dataset=digits", f"dataset.path={tmp_path}", f"run_dir={tmp_path / 'r'}"
    )
    assert code == 1 and err.count("\n") == 1 and "dataset.path is for your own data" in err


# ----------------------------------------------------------------------------- folder
def test_folder_reads_classes_channels_and_size(tmp_path, digits):
    root = write_folder(tmp_path / "g", digit_images(digits))
    ds = load_dataset("folder", path=str(root))
    assert ds.info.class_names == tuple(f"d{k}" for k in range(10))
    assert tuple(ds.train_x.shape) == (120, 1, 8, 8) and len(ds.test_y) == 40
    names = [f"d{int(v)}" for v in digits.train_y[:120]]
    assert [ds.info.class_names[k] for k in ds.train_y.tolist()] == sorted(names)
    # a colour JPEG among grey PNGs: every image becomes RGB; image_size resizes
    write_folder(root, {"train": [("d3", np.full((8, 8, 3), 200, np.uint8))]}, fmt="jpg")
    ds = load_dataset("folder", path=str(root), image_size=16)
    assert tuple(ds.train_x.shape) == (121, 3, 16, 16) and ds.info.channels == 3


def test_every_malformed_folder_is_one_line(tmp_path, digits):
    good = digit_images(digits, 30, 10)
    a8, a9 = np.zeros((8, 8), np.uint8), np.zeros((9, 9), np.uint8)
    cases = {
        "no test/ folder": ({"train": good["train"]}, {}),
        "train/ has 1 class folder(s)": ({"train": [("a", a8)], "test": [("a", a8)]}, {}),
        "test/ has classes that train/ lacks: zzz": (
            {**good, "test": [*good["test"], ("zzz", a8)]},
            {},
        ),
        "images differ in size": ({**good, "train": [*good["train"], ("d1", a9)]}, {}),
        "not square": ({**good, "train": [*good["train"], ("d1", np.zeros((8, 6), np.uint8))]}, {}),
        "image_size=0 is invalid": (good, {"image_size": 0}),
    }
    for i, (needle, (parts, opts)) in enumerate(cases.items()):
        root = write_folder(tmp_path / f"f{i}", parts)
        with pytest.raises(DatasetError) as e:
            dataset_info("folder", path=str(root), **opts)
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    root = write_folder(tmp_path / "broken", good)
    (root / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train/empty holds no PNG or JPEG images"):
        dataset_info("folder", path=str(root))
    (root / "train" / "empty").rmdir()
    (root / "train" / "d0" / "zz.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=r"cannot read image .*zz\.png \(not an image Pillow"):
        dataset_info("folder", path=str(root))
    with pytest.raises(DatasetError, match="is a file; dataset=folder needs a folder"):
        dataset_info("folder", path=str(root / "train" / "d0" / "zz.png"))


def test_folder_oneshot_end_to_end_from_the_command_line(cli, tmp_path, digits):
    root = write_folder(tmp_path / "imgs", digit_images(digits, 300, 100))
    code, _, err = cli("oneshot", "dataset=folder", f"dataset.path={root}", "dataset.image_size=12",
                       *TINY, f"run_dir={tmp_path / 'r'}")  # fmt: skip
    assert code == 0, err
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(r["teacher_acc"]) == 2 and 0 <= r["student_acc"] <= 1
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert split["dataset_options"] == {"image_size": 12, "path": str(root)}


# ----------------------------------------------------------------------------- from Python
@pytest.mark.usefixtures("restore_registries")
def test_register_dataset_makes_a_dataset_option(tmp_path, digits):
    import fed_distill

    f = write_npz(tmp_path / "mine.npz", digits)
    info = register_dataset("my_digits_npz", f)
    assert info.name == "my_digits_npz" and info.num_classes == 10
    out = fed_distill.run(
        "split", ["dataset=my_digits_npz", "split=iid", "split.num_clients=2", f"run_dir={tmp_path / 'r'}"]
    )  # fmt: skip
    assert out["dataset"] == "my_digits_npz" and out["num_classes"] == 10
    root = write_folder(tmp_path / "imgs", digit_images(digits, 40, 10))
    assert register_dataset("my_digits_npz", root, image_size=10).image_size == 10  # replaced
    for bad, needle in (("cifar10", "not a free dataset name"), ("my data", "not a free")):
        with pytest.raises(DatasetError, match=needle):
            register_dataset(bad, f)
    with pytest.raises(DatasetError, match="does not exist"):
        register_dataset("nothing_here", tmp_path / "nope.npz")
    with pytest.raises(DatasetError, match="image_size applies to a folder"):
        register_dataset("npz_sized", f, image_size=8)
