"""``cnn_small``: a fast 4-conv BatchNorm CNN for 28x28 grey images (works at 8..32 and beyond).

Layout (w = ``width``)::

    conv(w)-BN-ReLU-pool | conv(w)-BN-ReLU-pool | conv(2w)-BN-ReLU | conv(2w)-BN-ReLU-pool
    -> adaptive avg pool -> [dropout] -> linear

Pooling early (after the first conv rather than the second) keeps the 28x28 stage to one cheap
1->w convolution, which is what makes this model train quickly on a small CPU. A 2x2 max-pool is
skipped when the feature map is already smaller than 4x4, so an 8x8 input still works
(8 -> 4 -> 2 -> 2); adaptive pooling makes the classifier independent of the image size.
"""

from __future__ import annotations

import torch
from torch import nn

from fed_distill.models.registry import check_float, check_int, register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (w, w, 2w, 2w) with max-pools, GAP and a linear head."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        plan = [(in_channels, width, True), (width, width, True)]
        plan += [(width, 2 * width, False), (2 * width, 2 * width, True)]
        layers: list[nn.Module] = []
        size = image_size
        for cin, cout, pool in plan:
            layers += _conv_bn_relu(cin, cout)
            if pool and size >= 4:  # never pool a map below 2x2
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.dropout(out))


@register_model("cnn_small")
def cnn_small(
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 16,
    dropout: float = 0.0,
) -> nn.Module:
    """Small 4-conv BatchNorm CNN (widths w,w,2w,2w; w=16 by default: ~3x faster than 32 on 2 CPU cores for ~1 point), GAP + linear."""
    check_int("width", width, minimum=1, model="cnn_small")
    dropout = check_float("dropout", dropout, 0.0, 1.0, model="cnn_small")
    return SmallCNN(num_classes, in_channels, image_size, width=width, dropout=dropout)
