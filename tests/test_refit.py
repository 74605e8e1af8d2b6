"""The statistics round after distillation (refit=head): the client's feature sums, their checks
on receipt, the pooled Gaussians, the head's re-fit, and the stage on a real run folder."""

import pickle

import pytest
import torch
from torch import nn

from fed_distill.artifacts import read_weights, save_weights
from fed_distill.errors import ProtocolError
from fed_distill.feature_stats import (
    ClassGaussians,
    add_noise,
    check_feature_stats,
    compute_feature_stats,
    pool,
    read_feature_stats,
    save_feature_stats,
)
from fed_distill.federated.refit_config import RefitConfig
from fed_distill.federated.refit_head import fit_head
from fed_distill.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Identity:
    def __call__(self, x):
        return x.float()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got = []
    h = model.fc.register_forward_pre_hook(lambda _m, inp: got.append(inp[0]))
    with torch.no_grad():
        model.eval()(x.float())
    h.remove()
    return got[0].double()


class _TinyNet(nn.Module):
    def __init__(self, d: int = 4, k: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, d), nn.Tanh())
        self.fc = nn.Linear(d, k)

    def forward(self, x):
        return self.fc(self.body(x))


def _stats(seed: int = 0, n: int = 60, k: int = 3):
    torch.manual_seed(seed)
    model = _TinyNet(k=k)
    x = torch.randint(0, 255, (n, 1, 3, 4), dtype=torch.uint8)
    y = torch.arange(n) % k
    return model, x, y, compute_feature_stats(model, x, y, _Identity(), k, batch_size=7)


def test_feature_sums_match_the_features_class_by_class():
    model, x, y, st = _stats()
    f = _features(model, x)
    for c in range(3):
        fc = f[y == c]
        assert int(st["counts"][c]) == len(fc)
        torch.testing.assert_close(st["sum"][c], fc.sum(0))
        torch.testing.assert_close(st["outer"][c], fc.T @ fc)
    assert st["sum"].dtype == torch.float64 and st["counts"].dtype == torch.int64
    check_feature_stats(st, 4, 3, "client 0")  # real sums pass the receipt checks


def test_pooled_clients_equal_the_union_of_their_images():
    model, x, y, _ = _stats()
    a = compute_feature_stats(model, x[:25], y[:25], _Identity(), 3)
    b = compute_feature_stats(model, x[25:], y[25:], _Identity(), 3)
    g = pool([a, b])
    f = _features(model, x)
    for c in range(3):
        fc = f[y == c]
        torch.testing.assert_close(g.mean[c], fc.mean(0))
        torch.testing.assert_close(g.cov[c], torch.cov(fc.T, correction=0), atol=1e-9, rtol=1e-6)


def _bad(kind: str, st: dict) -> dict:
    st = {k: v.clone() for k, v in st.items()}
    if kind == "nan":
        st["sum"][0, 0] = float("nan")
    elif kind == "inf":
        st["outer"][1, 0, 0] = float("inf")
    elif kind == "shape":
        st["outer"] = st["outer"][:, :3, :3]
    elif kind == "negative count":
        st["counts"][2] = -1
    elif kind == "fractional count":
        st["counts"] = st["counts"].double() + 0.5
    elif kind == "not psd":
        st["outer"][0] = -st["outer"][0]
    elif kind == "asymmetric":
        st["outer"][1, 0, 1] += 1.0
    elif kind == "missing key":
        del st["outer"]
    elif kind == "integer sums":
        st["sum"] = st["sum"].round().long()
    elif kind == "empty class with sums":
        st["counts"][2] = 0
    return st


@pytest.mark.parametrize(
    "kind, words",
    [
        ("nan", "'sum' contains NaN or Inf"),
        ("inf", "'outer' contains NaN or Inf"),
        ("shape", "'outer' has shape (3, 3, 3), expected (3, 4, 4)"),
        ("negative count", "whole numbers >= 0"),
        ("fractional count", "whole numbers >= 0"),
        ("not psd", "not positive semi-definite"),
        ("asymmetric", "not symmetric"),
        ("missing key", "missing keys ['outer']"),
        ("integer sums", "'sum' has dtype torch.int64"),
        ("empty class with sums", "class 2 has no images but non-zero feature sums"),
    ],
)
def test_bad_uploads_are_refused_naming_the_client(kind, words):
    *_, st = _stats()
    with pytest.raises(ProtocolError) as e:
        check_feature_stats(_bad(kind, st), 4, 3, "client 3")
    assert str(e.value).startswith("client 3: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_noise_keeps_uploads_symmetric_and_empty_classes_zero():
    model, x, y, _ = _stats(k=4)  # 4 classes; the client below holds none of class 3
    st = compute_feature_stats(model, x[y < 3], y[y < 3], _Identity(), 4, clip=1.0)
    assert bool((st["sum"].norm(dim=1) <= st["counts"] + 1e-9).all())  # each vector clipped to 1
    noisy = add_noise(st, 0.5, 1.0, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy["sum"], st["sum"]) and torch.equal(noisy["counts"], st["counts"])
    torch.testing.assert_close(noisy["outer"], noisy["outer"].transpose(1, 2))
    assert float(noisy["sum"][3].abs().max()) == 0.0 and float(noisy["outer"][3].abs().max()) == 0
    with pytest.raises(ProtocolError, match="not positive semi-definite|not symmetric"):
        outer = noisy["outer"].clone()
        outer[:3] -= 1e3 * torch.eye(4, dtype=torch.float64)  # far beyond the noise
        bad = {**noisy, "outer": outer}
        check_feature_stats(bad, 4, 4, "client 0", noise_tol=1.0)


def test_head_refit_learns_the_gaussians_and_keeps_unheld_rows():
    # two separable classes and one nobody holds
    k, d = 3, 2
    mean = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    cov = torch.eye(d, dtype=torch.float64).expand(k, d, d).clone() * 0.25
    g = ClassGaussians(torch.tensor([50.0, 150.0, 0.0], dtype=torch.float64), mean, cov)
    head = nn.Linear(d, k)
    torch.nn.init.zeros_(head.weight)
    row = head.weight[2].detach().clone()
    fit = fit_head(head, g, RefitConfig(method="head", steps=300, weight_decay=1e-3), seed=0)
    assert fit["classes"] == 2
    torch.testing.assert_close(head.weight[2].detach(), row)
    x = torch.tensor([[1.5, 0.1], [-1.5, -0.1]])
    assert head(x)[:, :2].argmax(1).tolist() == [0, 1]
    # the gradient hooks are gone: the head trains normally afterwards
    head(x.abs()).sum().backward()
    assert float(head.weight.grad[2].abs().sum()) > 0


def test_upload_files_are_safetensors_with_their_round(tmp_path):
    *_, st = _stats()
    path = tmp_path / "feature_stats_0.safetensors"
    save_feature_stats(st, path, {"student": "abc", "round": "r1"})
    got, said = read_feature_stats(path)
    assert said == {"student": "abc", "round": "r1"} and torch.equal(got["outer"], st["outer"])
    path.write_bytes(pickle.dumps(st))
    with pytest.raises(Exception, match="refusing to unpickle"):
        read_feature_stats(path)


@pytest.mark.parametrize(
    "override, words",
    [
        ("refit.steps=0", "refit.steps must be a positive integer"),
        ("refit.lr=inf", "refit.lr must be a finite number"),
        ("refit.shrinkage=1.5", "refit.shrinkage must be a finite number in [0, 1]"),
        ("refit.noise=0.5", "refit.noise > 0 needs refit.clip"),
        ("refit.clip=-1", "refit.clip must be a finite number > 0"),
        ("refit.init=random", "refit.init must be distilled or zero"),
        ("refit.features=logits", "refit.features must be penultimate or map"),
        ("refit=tail", "unknown refit 'tail'; available: head, none"),
    ],
)
def test_bad_refit_options_are_one_line_before_work(cli, tmp_path, override, words):
    code, out, err = cli("oneshot", "dataset=digits", f"run_dir={tmp_path / 'r'}", override)
    assert code == 1 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "split.json").exists()


def test_refit_is_not_run_without_a_student(cli, tmp_path):
    code, _, err = cli("refit", "dataset=digits", f"run_dir={tmp_path}")
    assert code == 1 and err.count("\n") == 1
    assert "split.json" in err or "no distilled student" in err


def test_student_with_too_wide_a_head_is_refused(tmp_path):
    from fed_distill.errors import ConfigError
    from fed_distill.federated.refit import check_student_fits

    m = build_model("resnet18", 10, 1, 28)
    with pytest.raises(ConfigError, match="512 penultimate features"):
        rcfg = RefitConfig(method="head", features="penultimate", max_features=256)
        check_student_fits(m, rcfg, "resnet18", (1, 28, 28))
    save_weights(m, tmp_path / "w.safetensors")  # (the width is the head's input)
    assert read_weights(tmp_path / "w.safetensors")["fc.weight"].shape == (10, 512)


def test_config_shows_the_refit_group(cli):
    code, out, _ = cli("oneshot", "refit=head", "--cfg")
    assert code == 0 and "refit:" in out and "method: head" in out
    code, out, _ = cli("oneshot", "--cfg")
    assert "method: none" in out  # a one-shot run stays one-shot unless asked


def test_map_head_starts_as_the_student_and_sees_every_position():
    from fed_distill.feature_stats import feature_width
    from fed_distill.federated.refit_head import refit_head_layer, refit_model

    torch.manual_seed(0)
    student = build_model("cnn_small", 10, 1, 28).eval()
    width = feature_width(student, "map", (1, 28, 28))
    assert width == 32 * 3 * 3  # the last block's map before the global average pool
    model = refit_model(student, "map", width, 10).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():  # the distilled head spread over the positions: the same logits
        torch.testing.assert_close(model(x), student(x), rtol=1e-4, atol=1e-5)
    head = refit_head_layer(model)
    assert head.in_features == width and head is model.head
    # the statistics of the map: D = 288 numbers per image
    y = torch.arange(5) % 10
    st = compute_feature_stats(
        student, (x * 40 + 100).clamp(0, 255).to(torch.uint8), y, _Identity(), 10, features="map"
    )
    assert st["outer"].shape == (10, width, width)
    check_feature_stats(st, width, 10, "client 0")


def test_map_features_wider_than_allowed_are_refused():
    from fed_distill.errors import ConfigError
    from fed_distill.federated.refit import check_student_fits

    m = build_model("resnet8", 10, 1, 28)
    with pytest.raises(ConfigError, match="3136 map features"):
        check_student_fits(m, RefitConfig(method="head", features="map"), "resnet8", (1, 28, 28))
    pen = RefitConfig(method="head", features="penultimate")
    assert check_student_fits(m, pen, "resnet8", (1, 28, 28)) == 64
