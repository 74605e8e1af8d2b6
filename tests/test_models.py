"""Tests for the model registry and every registered architecture (fast: CPU, tiny batches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fed_distill.errors import ModelError
from fed_distill.models import (
    FEDMD_CONFIGS,
    build_model,
    count_parameters,
    fedmd_base_model,
    fedmd_default_parties,
    list_models,
    model_info,
    register_model,
)
from fed_distill.models import registry as registry_mod
from fed_distill.models.fedmd import KerasSameAvgPool2d

# Big models get fewer, smaller configs so the whole file stays fast on a slow 2-core CPU.
# (The named FedMD configs share fedmd_cnn2/3's code, which gets every shape.)
_FEW_SHAPES = {"resnet18": [(3, 8)], "resnet34": [(1, 8)]}
_FEW_SHAPES |= {name: [(1, 8), (1, 28), (3, 32)] for name in fedmd_default_parties()}
_SHAPES = [(1, 8), (3, 8), (1, 16), (1, 28), (3, 32)]


def _cases() -> list[tuple[str, int, int]]:
    cases = []
    for name in list_models():
        cases += [(name, c, s) for c, s in _FEW_SHAPES.get(name, _SHAPES)]
    return cases


def _cheap_kwargs(name: str) -> dict:
    """Shrinking kwargs for tests where width does not matter (layer types stay the same)."""
    if name.startswith("resnet") or name == "cnn_small":
        return {"width": 4}
    if name.startswith("fedmd_"):
        return {"width_scale": 0.1}
    return {}


@pytest.mark.parametrize(("name", "in_channels", "image_size"), _cases())
def test_forward_shape_and_finite(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=in_channels, image_size=image_size)
    model.eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_expected_names_registered() -> None:
    names = set(list_models())
    expected = {"resnet8", "resnet18", "resnet20", "resnet34", "cnn_small"}
    expected |= {"fedmd_cnn2", "fedmd_cnn3"} | {f"fedmd_{i}" for i in range(1, 11)}
    assert expected <= names
    assert list_models() == sorted(set(list_models()), key=list_models().index)  # no dupes
    assert list_models().index("resnet8") < list_models().index("resnet18")


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_batchnorm(name: str) -> None:
    # The synthesis code (DeepInversion) matches BatchNorm2d running statistics.
    model = build_model(name, num_classes=10, in_channels=1, image_size=8, **_cheap_kwargs(name))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cnn_small", {"width": 8}),
        ("resnet8", {"width": 8}),
        ("fedmd_cnn3", {"filters": (8, 8, 8), "dropout": 0.2}),
        ("fedmd_1", {"width_scale": 0.05}),
    ],
)
def test_train_step_backward(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, image_size=28, **kwargs)
    model.train()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0  # synthesis needs input gradients


@pytest.mark.parametrize("name", ["cnn_small", "resnet8", "fedmd_7"])
def test_same_seed_same_weights(name: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, num_classes=10, in_channels=1, image_size=28).state_dict()

    a, b, c = weights(3), weights(3), weights(4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# --- FedMD family -------------------------------------------------------------------------------


def test_fedmd_configs_match_paper() -> None:
    assert fedmd_default_parties() == [f"fedmd_{i}" for i in range(1, 11)]
    paper = [
        ((128, 256), 0.2),
        ((128, 384), 0.2),
        ((128, 512), 0.2),
        ((256, 256), 0.3),
        ((256, 512), 0.4),
        ((64, 128, 256), 0.2),
        ((64, 128, 192), 0.2),
        ((128, 192, 256), 0.2),
        ((128, 128, 128), 0.3),
        ((128, 128, 192), 0.3),
    ]
    for name, (filters, p) in zip(fedmd_default_parties(), paper, strict=True):
        assert tuple(FEDMD_CONFIGS[name]["filters"]) == filters
        assert FEDMD_CONFIGS[name]["dropout"] == p
        assert fedmd_base_model(name) == f"fedmd_cnn{len(filters)}"


@pytest.mark.parametrize("name", fedmd_default_parties())
def test_fedmd_named_model_modules(name: str) -> None:
    cfg = FEDMD_CONFIGS[name]
    model = build_model(name, num_classes=10, in_channels=1, image_size=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert tuple(c.out_channels for c in convs) == tuple(cfg["filters"])
    assert [d.p for d in drops] == [cfg["dropout"]] * len(cfg["filters"])
    assert len(bns) == len(cfg["filters"])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].bias is None  # Dense(use_bias=False) as in the paper


def test_fedmd_flatten_sizes_follow_paper_layout() -> None:
    # 28x28: 2-layer -> 13x13 x n2; 3-layer -> 28 -> 14 -> 7 -> 3, so 3x3 x n3.
    assert build_model("fedmd_1", 10, 1, 28).classifier.in_features == 13 * 13 * 256
    assert build_model("fedmd_8", 10, 1, 28).classifier.in_features == 3 * 3 * 256
    assert build_model("fedmd_8", 10, 3, 32).classifier.in_features == 3 * 3 * 256
    # 8x8: the 3-layer net skips its stride-2 pool so the last 3x3 conv still fits.
    assert build_model("fedmd_8", 10, 1, 8).classifier.in_features == 1 * 1 * 256
    # Paper-size parameter count of party 1 on 28x28 grey images, computed by hand.
    conv1 = 1 * 128 * 9 + 128
    conv2 = 128 * 256 * 9 + 256
    bn = 2 * (128 + 256)
    dense = 13 * 13 * 256 * 10
    assert count_parameters(build_model("fedmd_1", 10, 1, 28)) == conv1 + conv2 + bn + dense


def test_fedmd_width_scale() -> None:
    model = build_model("fedmd_5", 10, 1, 28, width_scale=0.25)
    assert model.filters == (64, 128)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.4, 0.4]
    tiny = build_model("fedmd_cnn3", 10, 1, 28, filters=(16, 32, 8), width_scale=0.1)
    assert tiny.filters == (4, 4, 4)  # never below 4 filters
    assert build_model("fedmd_cnn2", 10, 1, 28, filters=[2, 3]).filters == (2, 3)
    big = count_parameters(build_model("fedmd_9", 10, 1, 28))
    small = count_parameters(build_model("fedmd_9", 10, 1, 28, width_scale=0.5))
    assert small < big / 2


def test_keras_same_avgpool_excludes_padding() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    out = KerasSameAvgPool2d()(x).reshape(2, 2)
    expected = torch.tensor([[(1 + 2 + 3 + 4) / 4, (2 + 4) / 2], [(3 + 4) / 2, 4.0]])
    assert torch.allclose(out, expected)


# --- other architectures ------------------------------------------------------------------------


def test_resnet_depths_and_widths() -> None:
    def n_convs(model: nn.Module) -> int:
        # 3x3 convs only: the 1x1 projection shortcuts are not counted as depth.
        return sum(
            1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        )

    assert n_convs(build_model("resnet8", 10)) + 1 == 8
    assert n_convs(build_model("resnet20", 10)) + 1 == 20
    r8 = build_model("resnet8", 10, width=8)
    assert r8.fc.in_features == 32
    assert build_model("resnet20", 10).fc.in_features == 64
    r18 = build_model("resnet18", 10, in_channels=1, image_size=8, width=8)
    assert r18.conv1.stride == (1, 1) and r18.conv1.kernel_size == (3, 3)
    assert r18.fc.in_features == 64
    assert n_convs(r18) + 1 == 18
    assert n_convs(build_model("resnet34", 10, width=4)) + 1 == 34
    assert not any(isinstance(m, nn.MaxPool2d) for m in r18.modules())


def test_cnn_small_width_and_sizes() -> None:
    model = build_model("cnn_small", 10, in_channels=1, image_size=28, width=8, dropout=0.1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]
    model.eval()
    for size in (8, 16, 28, 32):
        out = model(torch.randn(2, 1, size, size))  # adaptive pooling: any size works
        assert out.shape == (2, 10)


# --- registry behaviour -------------------------------------------------------------------------


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ModelError) as err:
        build_model("resnet9000", 10)
    msg = str(err.value)
    assert "resnet9000" in msg and "\n" not in msg
    assert all(name in msg for name in list_models())


def test_unknown_kwarg_lists_available() -> None:
    with pytest.raises(ModelError) as err:
        build_model("resnet8", 10, depth=3)
    msg = str(err.value)
    assert "depth" in msg and "width" in msg and "\n" not in msg
    assert all(name in msg for name in list_models())
    with pytest.raises(ModelError, match="filters"):
        build_model("fedmd_1", 10, filters=(1, 2))  # named configs only take width_scale


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet8", {"width": 0}),
        ("resnet18", {"width": 2.5}),
        ("cnn_small", {"dropout": 1.0}),
        ("fedmd_cnn2", {"filters": (8, 8, 8)}),
        ("fedmd_cnn3", {"filters": "abc"}),
        ("fedmd_cnn3", {"filters": (8, 0, 8)}),
        ("fedmd_2", {"width_scale": 0}),
        ("fedmd_cnn3", {"image_size": 5}),
        ("cnn_small", {"num_classes": 0}),
        ("cnn_small", {"in_channels": True}),
    ],
)
def test_bad_arguments_raise_model_error(name: str, kwargs: dict) -> None:
    args = {"num_classes": 10, "in_channels": 1, "image_size": 28}
    args.update(kwargs)
    with pytest.raises(ModelError) as err:
        build_model(name, **args)
    assert "\n" not in str(err.value)


def test_register_model_custom_and_duplicate() -> None:
    @register_model("_test_tiny")
    def _tiny(num_classes: int, in_channels: int, image_size: int, hidden: int = 4) -> nn.Module:
        """Tiny test model."""
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    try:
        assert "_test_tiny" in list_models()
        model = build_model("_test_tiny", 3, in_channels=1, image_size=4, hidden=2)
        assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
        assert model_info("_test_tiny").startswith("_test_tiny: Tiny test model.")
        with pytest.raises(ModelError, match="already registered"):
            register_model("_test_tiny")(_tiny)
    finally:
        registry_mod._REGISTRY.pop("_test_tiny", None)
    assert "_test_tiny" not in list_models()


def test_model_info_and_count_parameters() -> None:
    for name in list_models():
        info = model_info(name)
        assert info.startswith(f"{name}: ") and "\n" not in info
    assert count_parameters(nn.Linear(3, 2)) == 8
    frozen = nn.Linear(3, 2)
    frozen.bias.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == 6
    with pytest.raises(ModelError, match="available models"):
        model_info("nope")
