"""CIFAR-style ResNets: resnet18/34 (4 stages, 64-512) and resnet8/20 (He et al., 3 stages).

All use a 3x3 stride-1 stem without max-pool, BatchNorm after every convolution (the synthesis
code reads BatchNorm2d running statistics) and adaptive average pooling before the classifier,
so any image size >= 1 works (8 for sklearn digits, 28, 32, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from fed_distill.models.registry import check_int, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN projection shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Not in-place: BN-statistics hooks may hold on to a BatchNorm output.
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Projection shortcut (option B of He et al.); it also carries a BatchNorm.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: conv3x3 stem (stride 1), stages of BasicBlocks, GAP, linear.

    ``blocks[i]`` blocks of width ``widths[i]`` in stage i; stage 0 has stride 1, the others 2.
    """

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(self.pool(out), 1)
        return self.fc(out)


def _imagenet_layout(
    blocks: list[int], num_classes: int, in_channels: int, width: int, name: str
) -> CifarResNet:
    check_int("width", width, minimum=1, model=name)
    widths = [width, 2 * width, 4 * width, 8 * width]
    return CifarResNet(blocks, widths, num_classes, in_channels)


def _he_layout(n: int, num_classes: int, in_channels: int, width: int, name: str) -> CifarResNet:
    check_int("width", width, minimum=1, model=name)
    return CifarResNet([n, n, n], [width, 2 * width, 4 * width], num_classes, in_channels)


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    """CIFAR ResNet-18: BasicBlock [2,2,2,2], widths 64-128-256-512 (x width/64), BatchNorm."""
    return _imagenet_layout([2, 2, 2, 2], num_classes, in_channels, width, "resnet18")


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int, image_size: int, width: int = 64) -> nn.Module:
    """CIFAR ResNet-34: BasicBlock [3,4,6,3], widths 64-128-256-512 (x width/64), BatchNorm."""
    return _imagenet_layout([3, 4, 6, 3], num_classes, in_channels, width, "resnet34")


@register_model("resnet8")
def resnet8(num_classes: int, in_channels: int, image_size: int, width: int = 16) -> nn.Module:
    """He et al. CIFAR ResNet-8: 3 stages x 1 BasicBlock, widths w/2w/4w (w=16), BatchNorm."""
    return _he_layout(1, num_classes, in_channels, width, "resnet8")


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int, image_size: int, width: int = 16) -> nn.Module:
    """He et al. CIFAR ResNet-20: 3 stages x 3 BasicBlocks, widths w/2w/4w (w=16), BatchNorm."""
    return _he_layout(3, num_classes, in_channels, width, "resnet20")
