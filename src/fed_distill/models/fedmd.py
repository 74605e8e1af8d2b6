"""The FedMD CNN family (Li & Wang 2019, "FedMD: Heterogenous Federated Learning via Model
Distillation") and its ten named party configurations ``fedmd_1`` ... ``fedmd_10``.

Layer layout follows the authors' Keras code (``cnn_2layer_fc_model`` / ``cnn_3layer_fc_model``):

2-layer (``fedmd_cnn2``, filters n1, n2)::

    Conv(n1, 3x3, stride 1, same)  - BN - ReLU - Dropout - AvgPool(2x2, stride 1, same)
    Conv(n2, 3x3, stride 2, valid) - BN - ReLU - Dropout
    Flatten - Dense(num_classes, no bias)

3-layer (``fedmd_cnn3``, filters n1, n2, n3)::

    Conv(n1, 3x3, stride 1, same)  - BN - ReLU - Dropout - AvgPool(2x2, stride 1, same)
    Conv(n2, 2x2, stride 2, valid) - BN - ReLU - Dropout - AvgPool(2x2, stride 2, valid)
    Conv(n3, 3x3, stride 2, valid) - BN - ReLU - Dropout
    Flatten - Dense(num_classes, no bias)

The flattened size is computed by a dummy forward of the conv stack at build time (no adaptive
pooling: the dense layer sees the spatial layout, as in the paper). For small inputs (8x8) the
stride-2 average pool of the 3-layer net is skipped when it would leave less than the last conv's
3x3 kernel, so 8x8 gives 8 -> 4 -> 4 -> 1.

Differences from the Keras original, on purpose: PyTorch BatchNorm defaults (momentum 0.1,
eps 1e-5 instead of Keras' 0.99 / 1e-3) and no L2 penalty on the dense kernel (that belongs to
the optimiser). ``width_scale`` multiplies every filter count (rounded, at least 4) so CPU presets
can shrink the nets; 1.0 keeps the paper's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.errors import ModelError
from fed_distill.models.registry import check_float, check_int, register_model

# name -> kwargs of fedmd_cnn{len(filters)} (the paper's EMNIST/CIFAR party list, in order).
FEDMD_CONFIGS: dict[str, dict[str, Any]] = {
    "fedmd_1": {"filters": (128, 256), "dropout": 0.2},
    "fedmd_2": {"filters": (128, 384), "dropout": 0.2},
    "fedmd_3": {"filters": (128, 512), "dropout": 0.2},
    "fedmd_4": {"filters": (256, 256), "dropout": 0.3},
    "fedmd_5": {"filters": (256, 512), "dropout": 0.4},
    "fedmd_6": {"filters": (64, 128, 256), "dropout": 0.2},
    "fedmd_7": {"filters": (64, 128, 192), "dropout": 0.2},
    "fedmd_8": {"filters": (128, 192, 256), "dropout": 0.2},
    "fedmd_9": {"filters": (128, 128, 128), "dropout": 0.3},
    "fedmd_10": {"filters": (128, 128, 192), "dropout": 0.3},
}


def fedmd_default_parties() -> list[str]:
    """The ten FedMD party model names, ``fedmd_1`` ... ``fedmd_10``, in the paper's order."""
    return list(FEDMD_CONFIGS)


def fedmd_base_model(name: str) -> str:
    """Registry name of the generic net behind a named config (``fedmd_cnn2`` / ``fedmd_cnn3``)."""
    if name not in FEDMD_CONFIGS:
        raise ModelError(f"unknown FedMD config {name!r}; available: {', '.join(FEDMD_CONFIGS)}")
    return f"fedmd_cnn{len(FEDMD_CONFIGS[name]['filters'])}"


class KerasSameAvgPool2d(nn.Module):
    """Keras ``AveragePooling2D(pool_size=2, strides=1, padding="same")``.

    Pads one row/column at the bottom/right and averages only the real cells of each window
    (Keras excludes padding from the mean), so the spatial size is unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, stride=1)
        ones = x.new_ones((1, 1, x.shape[-2], x.shape[-1]))
        frac = F.avg_pool2d(F.pad(ones, (0, 1, 0, 1)), 2, stride=1)  # share of real cells
        return summed / frac


def _block(cin: int, cout: int, kernel: int, stride: int, padding: int, p: float) -> list:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Dropout(p),
    ]


class FedMDCNN(nn.Module):
    """FedMD 2- or 3-layer CNN: conv stack (see module docstring), flatten, dense without bias."""

    def __init__(
        self,
        filters: Sequence[int],
        dropout: float,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.filters = tuple(filters)
        min_size = {2: 3, 3: 6}.get(len(self.filters), 1)
        if image_size < min_size:
            raise ModelError(
                f"FedMD {len(self.filters)}-layer CNN needs image_size >= {min_size}, "
                f"got {image_size}"
            )
        self.dropout_rate = dropout
        if len(self.filters) == 2:
            n1, n2 = self.filters
            layers = _block(in_channels, n1, 3, 1, 1, dropout) + [KerasSameAvgPool2d()]
            layers += _block(n1, n2, 3, 2, 0, dropout)
        elif len(self.filters) == 3:
            n1, n2, n3 = self.filters
            layers = _block(in_channels, n1, 3, 1, 1, dropout) + [KerasSameAvgPool2d()]
            layers += _block(n1, n2, 2, 2, 0, dropout)
            size = image_size // 2  # after the 2x2 stride-2 valid conv
            if size // 2 >= 3:  # keep the pool only while the last 3x3 conv still fits
                layers.append(nn.AvgPool2d(2, stride=2))
            layers += _block(n2, n3, 3, 2, 0, dropout)
        else:
            raise ModelError(f"FedMD CNN needs 2 or 3 filter counts, got {self.filters}")
        self.features = nn.Sequential(*layers)
        self.flat_features = self._flat_size(in_channels, image_size)
        self.classifier = nn.Linear(self.flat_features, num_classes, bias=False)

    def _flat_size(self, in_channels: int, image_size: int) -> int:
        # Dummy forward in eval mode: no dropout RNG draw, no BN running-stat update.
        self.features.eval()
        try:
            with torch.no_grad():
                out = self.features(torch.zeros(1, in_channels, image_size, image_size))
        except RuntimeError as exc:
            raise ModelError(
                f"FedMD CNN with {len(self.filters)} layers cannot take {image_size}x{image_size}"
                " images (too small)"
            ) from exc
        finally:
            self.features.train()
        return int(out[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _scaled_filters(filters: Any, layers: int, width_scale: Any, model: str) -> tuple[int, ...]:
    if isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence):
        raise ModelError(f"model {model!r}: filters must be a list of {layers} integers")
    if len(filters) != layers:
        raise ModelError(
            f"model {model!r}: filters must have {layers} entries, got {list(filters)!r}"
        )
    out = tuple(check_int("filters", f, minimum=1, model=model) for f in filters)
    scale = check_float(
        "width_scale", width_scale, 0.0, float("inf"), low_inclusive=False, model=model
    )
    if scale != 1.0:
        out = tuple(max(4, round(f * scale)) for f in out)
    return out


def _build(
    model: str,
    layers: int,
    num_classes: int,
    in_channels: int,
    image_size: int,
    filters: Any,
    dropout: Any,
    width_scale: Any,
) -> FedMDCNN:
    scaled = _scaled_filters(filters, layers, width_scale, model)
    p = check_float("dropout", dropout, 0.0, 1.0, model=model)
    return FedMDCNN(scaled, p, num_classes, in_channels, image_size)


@register_model("fedmd_cnn2")
def fedmd_cnn2(
    num_classes: int,
    in_channels: int,
    image_size: int,
    filters: Sequence[int] = (128, 256),
    dropout: float = 0.2,
    width_scale: float = 1.0,
) -> nn.Module:
    """FedMD 2-layer CNN: conv3x3-BN-ReLU-drop-avgpool, conv3x3/2-BN-ReLU-drop, dense."""
    return _build(
        "fedmd_cnn2", 2, num_classes, in_channels, image_size, filters, dropout, width_scale
    )


@register_model("fedmd_cnn3")
def fedmd_cnn3(
    num_classes: int,
    in_channels: int,
    image_size: int,
    filters: Sequence[int] = (128, 192, 256),
    dropout: float = 0.2,
    width_scale: float = 1.0,
) -> nn.Module:
    """FedMD 3-layer CNN: conv3x3-..-avgpool, conv2x2/2-..-avgpool/2, conv3x3/2-.., dense."""
    return _build(
        "fedmd_cnn3", 3, num_classes, in_channels, image_size, filters, dropout, width_scale
    )


def _register_named(name: str, cfg: dict[str, Any]) -> None:
    filters = tuple(cfg["filters"])
    dropout = float(cfg["dropout"])
    layers = len(filters)

    def builder(
        num_classes: int, in_channels: int, image_size: int, width_scale: float = 1.0
    ) -> nn.Module:
        return _build(
            name, layers, num_classes, in_channels, image_size, filters, dropout, width_scale
        )

    dims = "/".join(str(f) for f in filters)
    builder.__doc__ = (
        f"FedMD party {name.split('_')[1]} (Li & Wang 2019): {layers}-layer CNN "
        f"{dims}, dropout {dropout}"
    )
    builder.__name__ = builder.__qualname__ = name
    register_model(name)(builder)


for _name, _cfg in FEDMD_CONFIGS.items():
    _register_named(_name, _cfg)
