"""Teachers of several architectures (``teachers.models``) as one network, grouped only where
their architectures match.

:class:`StackedTeachers` needs one module tree. With per-client architectures the teachers
split into sets of identical architecture; :class:`ArchitectureGroups` runs each set as one
grouped network (a set of one: that teacher's converted network) and gives the same (T, N, K)
logits, teacher t in row t, as a :class:`StackedTeachers` of all of them would.
:class:`ArchitectureGroupHooks` is its BN-statistics term: (T,), entry t from teacher t's own
BN layers (and its own class targets). Built only where every teacher has BatchNorm layers
(otherwise the synthesizers run the teachers one after another).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fed_distill.class_stats import ClassTargets
from fed_distill.synthesis.stacked import StackedBNHooks, StackedTeachers, try_stack, use_grouped

log = logging.getLogger(__name__)


def architecture_sets(teachers: Sequence[nn.Module]) -> list[list[int]]:
    """Teacher indices grouped by identical architecture (class, parameter and buffer names
    and shapes), in order of first appearance."""
    sets: dict[tuple, list[int]] = {}
    for i, t in enumerate(teachers):
        key = (type(t), tuple((k, tuple(v.shape)) for k, v in t.state_dict().items()))
        sets.setdefault(key, []).append(i)
    return list(sets.values())


class ArchitectureGroups(nn.Module):
    """Several :class:`StackedTeachers` (``groups``: (teacher ids, grouped net)) covering T
    teachers; ``forward`` as :meth:`StackedTeachers.forward`: (N, C, H, W) shared or
    (T, N, C, H, W) one batch per teacher → (T, N, K)."""

    def __init__(self, groups: list[tuple[list[int], StackedTeachers]], num_teachers: int):
        super().__init__()
        self.groups = groups
        self.num_teachers = num_teachers
        self.nets = nn.ModuleList(net for _, net in groups)  # registered, for .to() / eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows: list[torch.Tensor | None] = [None] * self.num_teachers
        for ids, net in self.groups:
            out = net(x if x.dim() == 4 else x[ids])
            for j, i in enumerate(ids):
                rows[i] = out[j]
        return torch.stack(rows)  # type: ignore[arg-type]


def try_group_by_architecture(
    teachers: list[nn.Module],
    input_shape: tuple[int, int, int],
    memory_format: torch.memory_format = torch.preserve_format,
) -> tuple[ArchitectureGroups | None, str]:
    """``(ArchitectureGroups, "")`` where the teachers fall into fewer sets than teachers (some
    architecture is shared), every teacher has BatchNorm layers and every set groups; else
    ``(None, reason)``."""
    if not all(any(isinstance(m, nn.BatchNorm2d) for m in t.modules()) for t in teachers):
        return None, "a teacher has no BatchNorm layers"
    sets = architecture_sets(teachers)
    if len(sets) == len(teachers):
        return None, "no two teachers share an architecture"
    groups = []
    for ids in sets:
        net, why = try_stack([teachers[i] for i in ids], input_shape, memory_format)
        if net is None:
            return None, f"teachers {ids}: {why}"
        groups.append((ids, net))
    return ArchitectureGroups(groups, len(teachers)), ""


def convert_teachers(
    teachers: list[nn.Module],
    input_shape: tuple[int, int, int],
    device: torch.device,
    grouped: bool | None,
    group: bool,
) -> tuple[StackedTeachers | ArchitectureGroups | None, list[StackedTeachers | None], str]:
    """The teachers as converted networks (same math, BN statistics fused), for the
    synthesizers: where every step uses all of them (``group``) and ``synthesis.grouped``
    (``grouped``) is on, ONE grouped network (one per architecture where they differ);
    otherwise, or where they do not group, one converted network per teacher (None for one that
    cannot be converted: it runs as it is, plain BN + hooks). Returns the grouped network or
    None, the per-teacher networks (all None when grouped) and a note saying what was done."""
    fmt = torch.channels_last if device.type == "cpu" else torch.preserve_format
    notes = []
    net: StackedTeachers | ArchitectureGroups | None = None
    if group and use_grouped(grouped, device) and len(teachers) > 1:
        net, why = try_stack(teachers, input_shape, fmt)
        if net is None:  # mixed architectures: one group per architecture
            net, why_sets = try_group_by_architecture(teachers, input_shape, fmt)
            why = f"{why}; by architecture: {why_sets}"
        notes.append("grouped" if net is not None else f"not grouped: {why}")
        if net is None:
            log.info("teachers not grouped, run one after another (%s)", why)
    fused: list[StackedTeachers | None] = [None] * len(teachers)
    if net is None:
        for i, t in enumerate(teachers):
            fused[i], why = try_stack([t], input_shape, fmt)
            if fused[i] is None:
                notes.append(f"teacher {i} as is: {why}")
    return net, fused, "; ".join(notes) or "fused BN statistics"


class ArchitectureGroupHooks:
    """:class:`StackedBNHooks` of every set of an :class:`ArchitectureGroups`, read as one:
    ``loss`` is (T,) in teacher order; ``set_classes`` takes labels (N,) or (T, N) and class
    weights (K,) or (T, K) and hands each set its own rows."""

    def __init__(self, grouped: ArchitectureGroups, class_targets: list[ClassTargets] | None):
        self.grouped = grouped
        self.hooks = [
            StackedBNHooks(net, None if class_targets is None else [class_targets[i] for i in ids])
            for ids, net in grouped.groups
        ]

    def __enter__(self) -> ArchitectureGroupHooks:
        entered = []
        try:
            for h in self.hooks:
                entered.append(h.__enter__())
        except BaseException:
            for h in entered:
                h.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()

    @property
    def enabled(self) -> bool:
        return all(h.enabled for h in self.hooks)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for h in self.hooks:
            h.enabled = value

    def set_classes(self, labels: torch.Tensor, weights: torch.Tensor) -> None:
        for (ids, _), h in zip(self.grouped.groups, self.hooks, strict=True):
            h.set_classes(
                labels if labels.dim() == 1 else labels[ids],
                weights if weights.dim() == 1 else weights[ids],
            )

    def loss(self, first_bn_multiplier: float = 1.0) -> torch.Tensor:
        rows: list[torch.Tensor | None] = [None] * self.grouped.num_teachers
        for (ids, _), h in zip(self.grouped.groups, self.hooks, strict=True):
            term = h.loss(first_bn_multiplier)
            for j, i in enumerate(ids):
                rows[i] = term[j]
        return torch.stack(rows)  # type: ignore[arg-type]


def grouped_bn_hooks(
    net: StackedTeachers | ArchitectureGroups, class_targets: list[ClassTargets] | None
) -> StackedBNHooks | ArchitectureGroupHooks:
    """The BN-statistics hooks of a grouped network of either kind."""
    if isinstance(net, ArchitectureGroups):
        return ArchitectureGroupHooks(net, class_targets)
    return StackedBNHooks(net, class_targets)
