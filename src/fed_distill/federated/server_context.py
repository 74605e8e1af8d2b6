"""What the one-shot server holds after the upload (:class:`ServerContext`): the split and
dataset, the teachers, their clients' label counts and, where asked, their class statistics; and
the server's seed. The stages after the upload (synthesis, distillation, the statistics round)
all start from it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fed_distill.data.partition import Split
from fed_distill.data.sources import Dataset
from fed_distill.data.transforms import Normalizer
from fed_distill.errors import FedDistillError
from fed_distill.pipeline import (
    TeacherSpec,
    load_split_and_data,
    load_teacher_class_stats,
    load_teachers,
)
from fed_distill.utils import resolve_device


@dataclass
class ServerContext:
    """What the server holds after the upload: teachers, their class counts, the test task."""

    split: Split
    data: Dataset
    teachers: list[nn.Module]
    spec: TeacherSpec
    class_counts: np.ndarray  # (num_teachers, num_classes) training-label counts
    normalizer: Normalizer
    hflip: bool
    device: torch.device
    # per teacher, the class statistics its client uploaded; None where some have none
    class_stats: list[dict[str, torch.Tensor]] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.spec.in_channels, self.spec.image_size, self.spec.image_size)


def server_context(cfg: DictConfig, class_stats: bool = False) -> ServerContext:
    """What the server holds; ``class_stats``: also load the uploaded class statistics (when
    ``synthesis.class_stats`` is on)."""
    split, data = load_split_and_data(cfg)
    device = resolve_device(cfg.device)
    teachers, spec = load_teachers(cfg.run_dir, device)
    if spec.num_teachers != split.num_teachers or spec.num_classes != data.info.num_classes:
        raise FedDistillError(
            f"teachers in {cfg.run_dir} do not match split.json ({spec.num_teachers} teachers for"
            f" {split.num_teachers} clients); rerun `fed-distill train-teachers force=true`"
        )
    counts = split.class_counts()[: split.num_teachers]
    hflip = data.info.hflip if cfg.train.hflip is None else bool(cfg.train.hflip)
    stats = None
    if class_stats:
        stats = load_teacher_class_stats(cfg.run_dir, teachers, data.info.num_classes)
    return ServerContext(
        split,
        data,
        teachers,
        spec,
        counts,
        Normalizer(data.info.mean, data.info.std),
        hflip,
        device,
        stats,
    )


def uses_class_stats(cfg: DictConfig) -> bool:
    """Whether this run's synthesizer asks for the uploaded class statistics (its options'
    ``needs_class_stats``)."""
    from fed_distill.synthesis import options_from_node

    return options_from_node(cfg.synthesis).needs_class_stats()


def server_seed(cfg: DictConfig) -> int:
    """The seed of the server's side: ``student.seed``, or the run's ``seed`` when unset."""
    seed = cfg.student.get("seed")
    return int(cfg.seed if seed is None else seed)
