"""The one synthesis interface: a :class:`Synthesizer` turns frozen teachers (and optionally the
current student) into one labelled batch of synthetic images, :class:`SyntheticBatch`.

Implementations register themselves (``registry.py``); this module imports none of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SyntheticBatch:
    """One synthetic batch.

    ``images``: normalised float (N, C, H, W), detached, on CPU; ``labels``: int64 (N,);
    ``teacher_ids``: the teachers that produced it; ``stats``: final loss terms, best loss,
    iterations, seconds, images/s.
    """

    images: torch.Tensor
    labels: torch.Tensor
    teacher_ids: list[int]
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@contextmanager
def frozen_student(student: nn.Module | None) -> Iterator[None]:
    """``student`` in eval mode with frozen weights for the duration (adaptive terms send
    gradients to the pixels or the generator through it, never into it); its mode and
    ``requires_grad`` flags are restored afterwards, also on exceptions. None: nothing to do."""
    if student is None:
        yield
        return
    mode, flags = student.training, [p.requires_grad for p in student.parameters()]
    student.eval().requires_grad_(False)
    try:
        yield
    finally:
        student.train(mode)
        for p, rg in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(rg)


class Synthesizer(ABC):
    """Produces labelled synthetic batches; subclasses keep this exact signature."""

    @abstractmethod
    def synthesize(self, student: nn.Module | None = None) -> SyntheticBatch:
        """One batch. With ``student`` given the synthesis is adaptive (Adaptive DeepInversion):
        images are pushed towards where teacher and student disagree."""

    #: Whether :meth:`sample` gives images (a trained generator does; pixel optimisation not).
    can_sample: bool = False

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor | None:
        """``n`` further normalised images (N, C, H, W) on the synthesizer's device, drawn
        cheaply from what it has learnt so far (no optimisation, no labels), with ``gen`` as
        the source of randomness; None where the method has nothing to sample from (pixel
        optimisation). ``student.fresh`` mixes such images into the student's pool steps."""
        return None

    def bind_pool(self, pool: Any) -> None:
        """The student loop hands over its synthetic pool (``len(pool)``, ``pool.tensors()`` →
        (images, labels)) before the first batch; a synthesizer that learns from the images
        made so far keeps it (Co-Boosting re-fits its ensemble weights on them). Default:
        ignored."""
        return None

    def student_probs(self, logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
        """The synthesizer's own rule for the student's soft labels from (T, N, C) teacher
        logits at ``temperature`` (Co-Boosting: its re-fitted ensemble weights), or None: the
        student's ``ensemble`` rule."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the *next* batches (RNG states, cursors, trained generator
        networks and their optimisers), as tensors and plain values, so that a resumed run
        continues the same sequence. Saved in checkpoints with ``save_checkpoint`` (no pickle).

        Subclasses must implement it (and :meth:`load_state_dict`) to make student training
        resumable; without it ``train-student`` runs without checkpoints and says so."""
        raise NotImplementedError(f"{type(self).__name__} does not implement state_dict()")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_state_dict()")
