"""The student's growing synthetic dataset: the batches made so far, as the loop keeps them and
as a checkpoint or ``dataset.pt`` stores them."""

from __future__ import annotations

import torch

from fed_distill.errors import FedDistillError
from fed_distill.synthesis.base import SyntheticBatch


class SyntheticPool:
    """The growing synthetic dataset: normalised float images, labels, producing teachers."""

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.teacher_ids: list[list[int]] = []
        self._cat: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, batch: SyntheticBatch) -> None:
        self.images.append(batch.images.detach().cpu())
        self.labels.append(batch.labels.detach().cpu())
        self.teacher_ids.append(list(batch.teacher_ids))
        self._cat = None

    def __len__(self) -> int:
        return sum(len(y) for y in self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cat is None:
            if not self.images:
                raise FedDistillError("the synthetic pool is empty")
            self._cat = (torch.cat(self.images), torch.cat(self.labels))
        return self._cat

    def replace_with(self, other: SyntheticPool) -> None:
        """Take over ``other``'s batches (a pool restored from a checkpoint)."""
        self.images, self.labels, self.teacher_ids = other.images, other.labels, other.teacher_ids
        self._cat = None

    def state(self) -> dict[str, torch.Tensor]:
        x, y = self.tensors()
        sizes = torch.tensor([len(b) for b in self.labels])
        width = max(len(t) for t in self.teacher_ids)
        ids = torch.full((len(self.teacher_ids), width), -1, dtype=torch.long)
        for i, t in enumerate(self.teacher_ids):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return {"images": x, "labels": y, "batch_sizes": sizes, "batch_teachers": ids}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], image_shape: tuple[int, ...], num_classes: int
    ) -> SyntheticPool:
        """Rebuild a pool from ``dataset.pt``-style tensors, checking shapes and values."""
        for k in ("images", "labels", "batch_sizes", "batch_teachers"):
            if k not in state or not isinstance(state[k], torch.Tensor):
                raise FedDistillError(
                    f"synthetic dataset lacks tensor '{k}'; regenerate it (fed-distill generate-initial)"
                )
        x, y, sizes = state["images"], state["labels"], state["batch_sizes"]
        if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape) or not x.is_floating_point():
            raise FedDistillError(
                f"synthetic images have shape {tuple(x.shape)}, expected (N, {', '.join(map(str, image_shape))}) floats"
            )
        if (
            len(y) != len(x)
            or y.dtype != torch.long
            or (len(y) and (y.min() < 0 or y.max() >= num_classes))
        ):
            raise FedDistillError(
                "synthetic labels do not match the images or the number of classes"
            )
        if int(sizes.sum()) != len(x) or not torch.isfinite(x).all():
            raise FedDistillError(
                "synthetic dataset is inconsistent (batch sizes) or holds NaN/Inf"
            )
        pool = cls()
        start = 0
        for b, n in enumerate(sizes.tolist()):
            ids = [int(t) for t in state["batch_teachers"][b].tolist() if t >= 0]
            pool.append(SyntheticBatch(x[start : start + n], y[start : start + n], ids))
            start += n
        return pool
