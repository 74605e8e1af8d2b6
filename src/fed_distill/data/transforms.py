"""Batch-level tensor transforms: normalisation and augmentation on whole batches, on any device.

Datasets are kept as uint8 (N, C, H, W) tensors; a batch is indexed, moved to the device, scaled
and augmented there in a handful of vectorised ops instead of per-sample PIL transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class Normalizer:
    """uint8 images ↔ normalised float tensors, for one dataset's mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (0..255) or float images in [0, 1] → normalised float32."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float → [0, 1] float (clamped), e.g. for image grids."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)

    def bounds(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid pixel values in normalised space."""
        lo = (0 - self.mean) / self.std
        hi = (1 - self.mean) / self.std
        return lo.to(device), hi.to(device)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad by ``padding`` (zeros) and crop back to the input size at a random offset per sample."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(dev)
    rows = oy.view(n, 1) + torch.arange(h, device=dev).view(1, h)  # (n, h)
    cols = ox.view(n, 1) + torch.arange(w, device=dev).view(1, w)  # (n, w)
    idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, padded.shape[3])
    out = padded.gather(2, idx_r)
    idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, idx_c)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each sample horizontally with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def augment(
    x: torch.Tensor,
    crop_padding: int = 0,
    hflip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The standard light augmentation: random crop with padding, optional horizontal flip."""
    if crop_padding:
        x = random_crop(x, crop_padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return x
