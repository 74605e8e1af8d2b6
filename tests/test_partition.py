"""Client partitions: every strategy on real labels (scikit-learn digits), files, bad input."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fed_distill.data.partition import (
    check_split,
    load_split,
    make_split,
    save_split,
    split_dirichlet,
    split_heter,
)
from fed_distill.errors import SplitError

Y = load_digits().target.astype(np.int64)
YTR, YTE = Y[:1400], Y[1400:]


def _all_train(split):
    return sorted(i for c in split.clients for i in c.train + c.val)


@pytest.mark.parametrize("strategy", ["iid", "dirichlet", "shards", "heter"])
def test_every_strategy_partitions_train_and_test_disjointly(strategy):
    s = make_split("digits", YTR, YTE, 10, strategy, 5, seed=0, alpha=0.3, min_size=5)
    assert _all_train(s) == list(range(len(YTR)))  # each train index owned exactly once
    test = sorted(i for c in s.clients for i in c.test)
    assert len(test) == len(set(test)) and len(test) == len(YTE)
    for c in s.clients:
        assert not set(c.train) & set(c.val)
        assert np.bincount(YTR[c.train + c.val], minlength=10).tolist() == c.train_class_counts


def test_same_seed_same_split_other_seed_differs():
    a = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=3, alpha=0.3)
    b = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=3, alpha=0.3)
    c = make_split("digits", YTR, YTE, 10, "dirichlet", 7, seed=4, alpha=0.3)
    assert a.to_json() == b.to_json()
    assert a.to_json()["clients"] != c.to_json()["clients"]


def test_dirichlet_skew_grows_as_alpha_shrinks_and_min_size_holds():
    def mean_max_share(alpha):
        parts = split_dirichlet(YTR, 5, alpha, np.random.default_rng(0), min_size=20)
        assert min(len(p) for p in parts) >= 20
        return np.mean([np.bincount(YTR[p], minlength=10).max() / len(p) for p in parts])

    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.2


def test_heter_matches_the_seed_definition():
    y = np.repeat(np.arange(10), 10)  # 100 samples, sorted classes
    rng = np.random.default_rng(0)
    # unif_percentage 0 ("full"): sorted chunks -> client i owns exactly classes 2i, 2i+1
    parts = split_heter(y, 5, 0.0, rng)
    assert [sorted(set(y[p])) for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    # 0.5: half of each client's samples are uniform, the other half a contiguous label chunk
    parts = split_heter(y, 2, 0.5, np.random.default_rng(1))
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
    parts = split_heter(y, 2, 1.0, np.random.default_rng(2))
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
    "kwargs, match",
    [
        ({"strategy": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        ({"strategy": "dirichlet", "alpha": -1.0}, "alpha must be > 0"),
        ({"strategy": "iid", "num_clients": 5000}, "cannot split 1400 samples among 5000"),
        ({"strategy": "classes", "classes": [[0, 1], [12]]}, "names class 12"),
        ({"strategy": "nonsense"}, "unknown split strategy"),
        ({"strategy": "heter", "unif_percentage": 1.5}, r"unif_percentage must be in \[0, 1\]"),
    ],
)
def test_impossible_splits_are_refused(kwargs, match):
    args = {"strategy": "iid", "num_clients": 3, **kwargs}
    with pytest.raises(SplitError, match=match):
        make_split(
            "digits", YTR, YTE, 10, args.pop("strategy"), args.pop("num_clients"), seed=0, **args
        )


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
