"""Client partitions: every registered partition on real labels (scikit-learn digits), the\nsplit file, bad parameters; quantity and noise skew; a partition registered from Python."""

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fed_distill.data.partition import (
    check_split,
    client_images,
    get_partition,
    list_partitions,
    load_split,
    make_split,
    save_split,
)
from fed_distill.data.strategies import split_dirichlet, split_heter
from fed_distill.errors import ConfigError, SplitError

DIGITS = load_digits()
Y = DIGITS.target.astype(np.int64)
YTR, YTE = Y[:1400], Y[1400:]
# the digits' 8x8 images as uint8 (N, 1, 8, 8), train part
X = (
    torch.as_tensor(DIGITS.images[:1400] * 16, dtype=torch.float32)
    .clamp(0, 255)
    .to(torch.uint8)[:, None]
)


def _all_train(split):
    return sorted(i for c in split.clients for i in c.train + c.val)


# Parameters a partition needs on these labels (the others run on their defaults).
EXAMPLE = {"classes": {"classes": [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9], [1, 9]]}}


def _example(strategy, num_clients=5, seed=0, **kw):
    params = {**EXAMPLE.get(strategy, {}), **kw}
    return make_split("digits", YTR, YTE, 10, strategy, num_clients, seed=seed, **params)


def test_the_registry_holds_niid_benchs_set():
    assert {"iid", "dirichlet", "quantity", "shards", "noise", "heter", "classes"} <= set(
        list_partitions()
    )


@pytest.mark.parametrize("strategy", list_partitions())
def test_every_partition_partitions_train_and_test_disjointly(strategy):
    s = _example(strategy)
    assert s.num_clients == 5 and s.strategy == strategy
    assert _all_train(s) == list(range(len(YTR)))  # each train index owned exactly once
    test = sorted(i for c in s.clients for i in c.test)
    assert test == list(range(len(YTE)))  # ... and each test index
    for c in s.clients:
        assert not set(c.train) & set(c.val)
        assert len(c.val) == round(0.1 * (len(c.train) + len(c.val)))
        assert np.bincount(YTR[c.train + c.val], minlength=10).tolist() == c.train_class_counts
    assert get_partition(strategy).params.keys() <= s.params.keys()  # every parameter recorded


@pytest.mark.parametrize("strategy", list_partitions())
def test_every_partition_is_reproducible_and_survives_its_file(strategy, tmp_path):
    s = _example(strategy, seed=3)
    assert s.to_json() == _example(strategy, seed=3).to_json()
    save_split(s, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert loaded.to_json() == s.to_json()
    check_split(loaded, "digits", YTR, YTE, 10)
    for c, d in zip(s.clients, loaded.clients, strict=True):  # a client's images, read back
        assert torch.equal(client_images(c, X, c.train[:20]), client_images(d, X, d.train[:20]))


@pytest.mark.parametrize("strategy", list_partitions())
def test_every_partition_refuses_a_bad_parameter_with_one_line(strategy):
    for key in get_partition(strategy).params:
        with pytest.raises(ConfigError) as e:
            _example(strategy, **{key: "many"})
        line = str(e.value)
        assert "\n" not in line and (f"split.{key}" in line or f"split={strategy}" in line), line
    if get_partition(strategy).clients is None:  # not fixed by the parameters (classes)
        with pytest.raises(ConfigError, match="split.num_clients must be >= 1, got 0"):
            make_split("digits", YTR, YTE, 10, strategy, 0, seed=0)
    with pytest.raises(ConfigError, match="unknown split parameter 'alhpa'"):
        _example(strategy, alhpa=0.3)


def test_same_seed_same_split_other_seed_differs():
    a = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=3, alpha=0.3)
    b = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=3, alpha=0.3)
    c = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=4, alpha=0.3)
    assert a.to_json() == b.to_json()
    assert a.to_json()["clients"] != c.to_json()["clients"]


def test_dirichlet_skew_grows_as_alpha_shrinks_and_min_size_holds():
    def mean_max_share(alpha):
        parts = split_dirichlet(YTR, 5, np.random.default_rng(0), 10, alpha=alpha, min_size=20)
        assert min(len(p) for p in parts) >= 20
        return np.mean([np.bincount(YTR[p], minlength=10).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_heter_matches_the_seed_definition():
    y = np.repeat(np.arange(10), 10)  # 100 samples, sorted classes
    rng = np.random.default_rng(0)
    # unif_percentage 0 ("full"): sorted chunks -> client i owns exactly classes 2i, 2i+1
    parts = split_heter(y, 5, rng, 10, unif_percentage=0.0)
    assert [sorted(set(y[p])) for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # 0.5: half of each client's samples are uniform, the other half a contiguous label chunk
    parts = split_heter(y, 2, np.random.default_rng(1), 10, unif_percentage=0.5)
    assert [len(p) for p in parts] == [50, 50]
    # reproduce the definition by hand with the same generator draws
    rng = np.random.default_rng(1)
    perm = rng.permutation(100)
    unif, rest = perm[:50], perm[50:]
    rest = rest[np.argsort(y[rest], kind="stable")]
    expected = [
        np.sort(np.concatenate([unif[:25], rest[:25]])),
        np.sort(np.concatenate([unif[25:], rest[25:]])),
    ]
    assert all((p == e).all() for p, e in zip(parts, expected, strict=True))
    # 1.0 is IID-like: every client sees every class
    parts = split_heter(y, 2, np.random.default_rng(2), 10, unif_percentage=1.0)
    assert all(len(set(y[p])) == 10 for p in parts)


def test_shards_and_classes_own_exactly_their_classes():
    s = make_split("digits", YTR, YTE, 10, "shards", 5, seed=0, classes_per_client=2)
    for c in s.clients:
        owned = {k for k, n in enumerate(c.train_class_counts) if n}
        assert len(owned) == 2
        assert set(YTE[c.test]) <= owned
    s = make_split("digits", YTR, YTE, 10, "classes", 0, seed=0, classes=[[0, 1, 2], [2, 3]])
    assert s.num_clients == 2
    assert {k for k, n in enumerate(s.clients[1].train_class_counts) if n} == {2, 3}


def test_split_file_round_trip_and_check(tmp_path):
    s = make_split("digits", YTR, YTE, 10, "iid", 3, seed=1)
    save_split(s, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert loaded.to_json() == s.to_json()
    check_split(loaded, "digits", YTR, YTE, 10)
    raw = json.loads((tmp_path / "split.json").read_text())
    for key in ["dataset", "strategy", "params", "seed", "num_classes", "clients"]:
        assert key in raw


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"strategy": "dirichlet", "alpha": 0.0}, ConfigError, "alpha must be > 0"),
        ({"strategy": "dirichlet", "alpha": -1.0}, ConfigError, "alpha must be > 0"),
        ({"strategy": "dirichlet", "alpha": float("inf")}, ConfigError, "alpha must be > 0"),
        ({"strategy": "quantity", "alpha": float("inf")}, ConfigError, "alpha must be > 0"),
        ({"strategy": "quantity", "alpha": float("nan")}, ConfigError, "alpha must be > 0"),
        ({"strategy": "quantity", "min_size": 500}, SplitError, "exceeds the 1400 samples"),
        ({"strategy": "noise", "sigma": -0.1}, ConfigError, "sigma must be a finite number"),
        ({"strategy": "noise", "sigma": float("inf")}, ConfigError, "sigma must be a finite"),
        ({"strategy": "shards", "classes_per_client": 11}, ConfigError, r"in 1\.\.10, got 11"),
        ({"strategy": "iid", "num_clients": 5000}, SplitError, "cannot split 1400 samples among"),
        ({"strategy": "classes", "classes": [[0, 1], [12]]}, ConfigError, "names class 12"),
        ({"strategy": "classes"}, ConfigError, "split=classes needs split.classes"),
        ({"strategy": "nonsense"}, ConfigError, "unknown split strategy 'nonsense'; choose one"),
        ({"strategy": "heter", "unif_percentage": 1.5}, ConfigError, r"must be in \[0, 1\]"),
        (
            {"strategy": "iid", "val_fraction": 1.0},
            ConfigError,
            r"val_fraction must be in \[0, 1\)",
        ),
        ({"strategy": "iid", "server_clients": 3}, ConfigError, "server_clients must be in 0..2"),
    ],
)
def test_impossible_splits_are_refused(kwargs, error, match):
    args = {"strategy": "iid", "num_clients": 3, **kwargs}
    with pytest.raises(error, match=match):
        make_split(
            "digits", YTR, YTE, 10, args.pop("strategy"), args.pop("num_clients"), seed=0, **args
        )


def test_quantity_skews_sizes_not_labels():
    s = make_split("digits", YTR, YTE, 10, "quantity", 5, seed=0, alpha=0.1, min_size=20)
    sizes = [len(c.train) + len(c.val) for c in s.clients]
    assert min(sizes) >= 20 and max(sizes) > 5 * min(sizes)  # unequal sizes (67 .. 753)
    share = np.bincount(YTR, minlength=10) / len(YTR)
    for c, n in zip(s.clients, sizes, strict=True):  # each client: the global label mix
        assert np.abs(np.array(c.train_class_counts) / n - share).max() < 10 / n + 0.01
    # a large alpha gives near-equal sizes
    even = make_split("digits", YTR, YTE, 10, "quantity", 5, seed=0, alpha=1000.0)
    assert np.ptp([len(c.train) + len(c.val) for c in even.clients]) < 60


def test_noise_gives_client_i_noise_of_std_sigma_i_over_n():
    s = make_split("digits", YTR, YTE, 10, "noise", 4, seed=2, sigma=0.2)
    iid = make_split("digits", YTR, YTE, 10, "iid", 4, seed=2)
    assert [c.train for c in s.clients] == [c.train for c in iid.clients]  # IID labels
    assert s.clients[0].features == {}  # client 0 is clean
    grey = torch.full_like(X, 128)  # far from 0 and 255: no clipping at these noise levels
    for i, c in enumerate(s.clients):
        diff = client_images(c, grey, c.train).float() - 128
        assert diff.std().item() / 255 == pytest.approx(0.2 * i / 4, abs=0.004)
        own = client_images(c, X, c.train)
        # the same image gets the same noise however it is taken (train part, train + val)
        assert torch.equal(client_images(c, X, c.train + c.val)[: len(c.train)], own)
        assert torch.equal(own, X[c.train]) == (i == 0)
        local = client_images(c, X, c.test, "test")  # X stands in for the test array here
        assert torch.equal(local, X[c.test]) == (i == 0)  # its local test part is noisy too
        assert not torch.equal(local, client_images(c, X, c.test)) or i == 0  # not train's noise
    # the noise is recorded per client in split.json
    assert s.clients[2].features == {"partition": "noise", "noise_std": 0.1, "noise_seed": 2}


def test_a_partition_registered_from_python_is_a_split_option(restore_registries, tmp_path):
    import fed_distill

    @fed_distill.register_partition("halves")
    def halves(labels, num_clients, rng, num_classes, *, share: float = 0.5):
        """The first client gets ``share`` of the shuffled samples, the others the rest."""
        perm = rng.permutation(len(labels))
        cut = int(len(labels) * share)
        rest = np.array_split(perm[cut:], num_clients - 1)
        return [np.sort(perm[:cut]), *[np.sort(r) for r in rest]]

    s = make_split("digits", YTR, YTE, 10, "halves", 3, seed=0, share=0.6)
    assert len(s.clients[0].train) + len(s.clients[0].val) == 840
    cfg = fed_distill.compose("split", ["split=halves", "split.share=0.25", "split.num_clients=2"])
    assert cfg.split.strategy == "halves" and cfg.split.share == 0.25
    with pytest.raises(ConfigError, match="unknown config key 'split.shar'"):
        fed_distill.compose("split", ["split=halves", "split.shar=0.25"])
    with pytest.raises(ConfigError, match="split.share must be a number"):
        make_split("digits", YTR, YTE, 10, "halves", 3, seed=0, share="half")
    with pytest.raises(ConfigError, match="needs a type and a default"):
        fed_distill.register_partition("bad")(lambda labels, n, rng, k, *, x: [])


def test_split_files_without_features_load_as_before(tmp_path):
    # a split.json written before per-client features: no 'features' key anywhere
    d = make_split("digits", YTR, YTE, 10, "dirichlet", 3, seed=1, alpha=0.5).to_json()
    assert all("features" not in c for c in d["clients"])
    (tmp_path / "split.json").write_text(json.dumps(d))
    assert all(c.features == {} for c in load_split(tmp_path / "split.json").clients)
    d["clients"][0]["features"] = {"noise_std": 0.1}  # no partition named
    (tmp_path / "split.json").write_text(json.dumps(d))
    with pytest.raises(SplitError, match="'features' must be an object naming its 'partition'"):
        load_split(tmp_path / "split.json")


def test_split_for_other_data_is_refused(tmp_path):
    s = make_split("digits", YTR, YTE, 10, "iid", 3, seed=1)
    with pytest.raises(SplitError, match="made for dataset 'digits'"):
        check_split(s, "fashion_mnist", YTR, YTE, 10)
    with pytest.raises(SplitError, match="train/test samples"):
        check_split(s, "digits", YTR[:-1], YTE, 10)
    shuffled = YTR.copy()
    shuffled[:2] = shuffled[1::-1] if shuffled[0] != shuffled[1] else (shuffled[:2] + 1) % 10
    with pytest.raises(SplitError, match="labels do not match"):
        check_split(s, "digits", shuffled, YTE, 10)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("clients"), "lacks 'clients'"),
        (lambda d: d["clients"][0].pop("val"), "needs 'train', 'val'"),
        (lambda d: d["clients"][0].__setitem__("train", ["a"]), "list of integers"),
        (lambda d: d["clients"][0].__setitem__("test", [10**6]), "index outside"),
    ],
)
def test_malformed_split_files(tmp_path, mutate, match):
    d = make_split("digits", YTR, YTE, 10, "iid", 2, seed=1).to_json()
    mutate(d)
    (tmp_path / "split.json").write_text(json.dumps(d))
    with pytest.raises(SplitError, match=match):
        load_split(tmp_path / "split.json")


def test_missing_and_non_json_split_files(tmp_path):
    with pytest.raises(SplitError, match="run `fed-distill split"):
        load_split(tmp_path / "split.json")
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        load_split(tmp_path / "split.json")
