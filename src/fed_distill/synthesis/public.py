"""FedDF's transfer set (Lin et al., NeurIPS 2020): distil on unlabeled images of another dataset
instead of synthetic ones (``synthesis=public``).

Only the public dataset's training *images* are read; its labels are never looked at (FedDF
assumes unlabeled public data). Images are converted to the task's shape (grey ↔ RGB, bilinear
resize with antialiasing) and normalised with the task's statistics. Each batch's label is the
teachers' ensemble decision; the student's KD loss uses the ensemble's soft labels as for
synthetic batches.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fed_distill.ensemble import ensemble_probs
from fed_distill.errors import ConfigError
from fed_distill.synthesis.base import SyntheticBatch
from fed_distill.synthesis.inputs import TeacherSynthesizer
from fed_distill.synthesis.options import PublicOptions
from fed_distill.synthesis.registry import register_synthesizer


def load_unlabeled_images(
    name: str,
    image_shape: tuple[int, int, int],
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """The training images of dataset ``name`` as uint8 (N, C, H, W) in ``image_shape``; labels
    are dropped here, so nothing downstream can use them. ``limit`` keeps a seeded random subset."""
    from fed_distill.data.sources import load_dataset

    data = load_dataset(name, data_dir=data_dir, download=False)
    x = data.train_x
    del data  # the labels go with it
    if limit is not None and limit < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        x = x[keep.sort().values]
    return convert_images(x, image_shape)


def convert_images(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (N, C', H', W') → uint8 (N, C, H, W): channels by luminance / replication, size by
    antialiased bilinear resizing."""
    c, h, w = image_shape
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ConfigError(
            f"public images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    if x.shape[1] == c and tuple(x.shape[2:]) == (h, w):
        return x
    out = []
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for chunk in x.split(4096):
        f = chunk.float()
        if f.shape[1] != c:
            if c == 1 and f.shape[1] == 3:
                f = (f * lum).sum(dim=1, keepdim=True)
            elif f.shape[1] == 1:
                f = f.expand(-1, c, -1, -1)
            else:
                raise ConfigError(
                    f"cannot convert public images with {f.shape[1]} channels to {c} channels"
                )
        if tuple(f.shape[2:]) != (h, w):
            f = F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out.append(f.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


@register_synthesizer("public", options=PublicOptions)
class PublicDataSynthesizer(TeacherSynthesizer):
    """Batches of unlabeled public images, labelled by the teachers' ensemble (FedDF)."""

    uses_bn = False  # no synthesis: the teachers only label the images

    def __init__(
        self,
        *inputs: Any,
        images: torch.Tensor | None = None,
        data_dir: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(*inputs, **options)  # TeacherSynthesizer's arguments
        cfg = self.cfg
        if images is None:
            images = load_unlabeled_images(
                cfg.public_dataset,
                self.image_shape,
                data_dir=cfg.public_data_dir or data_dir,
                limit=cfg.public_limit,
                seed=self.seed,
            )
        else:
            images = convert_images(images, self.image_shape)
        if len(images) == 0:
            raise ConfigError(f"public dataset '{cfg.public_dataset}' holds no images")
        self.images = images
        self._order = torch.empty(0, dtype=torch.long)

    def _next_indices(self, n: int) -> torch.Tensor:
        # Walk through seeded permutations, so every image is used before any repeats.
        parts = []
        while n > 0:
            if len(self._order) == 0:
                self._order = torch.randperm(len(self.images), generator=self.generator)
            take, self._order = self._order[:n], self._order[n:]
            parts.append(take)
            n -= len(take)
        return torch.cat(parts)

    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        t0 = time.perf_counter()
        idx = self._next_indices(self.cfg.batch_size)
        x = self.normalizer(self.images[idx].to(self.device))
        with torch.inference_mode():
            logits = torch.stack([t(x) for t in self.teachers])
            probs = ensemble_probs(logits, self.cfg.ensemble, self.shares)
            conf = probs.max(dim=1).values.mean()
        y = probs.argmax(dim=1)
        seconds = time.perf_counter() - t0
        return SyntheticBatch(
            images=x.detach().to("cpu", copy=True),
            labels=y.to("cpu", copy=True),
            teacher_ids=list(range(len(self.teachers))),
            stats={
                "teacher_acc": 1.0,  # the labels are the teachers' own decisions
                "confidence": float(conf),
                "iterations": 0.0,
                "seconds": seconds,
                "images_per_s": len(idx) / max(seconds, 1e-9),
            },
        )

    def state_dict(self) -> dict[str, Any]:
        """The RNG stream and what is left of the current permutation (for checkpoints)."""
        return {"rng": self.generator.get_state(), "order": self._order.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self._order = state["order"].long()
