"""A diversity term for pixel synthesis: spread the teacher's penultimate features of a batch
apart from each other and from the teacher's recent images (``synthesis.div_scale``).

DeepInversion optimises every batch against the same targets (the class's BN statistics and
label), so batches of one teacher and class tend to land on similar images; contrastive model
inversion (CMI, Fang et al., IJCAI 2021) counters this with an instance-discrimination loss
against a memory bank of earlier synthetic images. This is the simpler *uniformity* form of the
same idea (Wang & Isola, ICML 2020), among images of the same class (the CE term already
separates classes): on L2-normalised features f of images labelled y,

    L_div = mean_i log mean_{j != i, y_j = y_i} exp(-t * ||f_i - f_j||^2),   t = 2,

over the batch's own images and a bank of the teacher's last ``div_bank`` images (held
fixed). It needs no augmented views (one forward per step, as DeepInversion's), and it is
minimal when the features are spread evenly on the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

UNIFORMITY_T = 2.0


def head_module(net: nn.Module) -> nn.Module | None:
    """The network's last linear layer (plain or grouped): its input is the feature vector."""
    from fed_distill.synthesis.stacked import GroupedLinear

    heads = [m for m in net.modules() if isinstance(m, nn.Linear | GroupedLinear)]
    return heads[-1] if heads else None


class FeatureCapture:
    """Keeps the input of ``head`` at every forward (with its graph) while entered."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.features: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.features = inputs[0].flatten(1)

    def __enter__(self) -> FeatureCapture:
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.features = None


def uniformity_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    bank: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """L_div of the module docstring for (N, D) ``features`` of images labelled ``labels``,
    over pairs of the same class, against the batch itself and ``bank`` = (features, labels)
    of earlier images (features normalised, no gradient). 0 when no image has a partner."""
    f = F.normalize(features, dim=1)
    others, other_y = f, labels
    if bank is not None and bank[0].numel():
        others = torch.cat([f, bank[0].to(f)], dim=0)
        other_y = torch.cat([labels, bank[1].to(labels)], dim=0)
    sq = (2.0 - 2.0 * f @ others.t()).clamp_min(0.0)  # ||f_i - f_j||^2 on the unit sphere
    n = f.shape[0]
    pairs = labels[:, None] == other_y[None, :]
    pairs &= ~torch.eye(n, others.shape[0], dtype=torch.bool, device=f.device)
    count = pairs.sum(dim=1)
    rows = count > 0
    if not bool(rows.any()):
        return f.sum() * 0.0  # nothing to spread from
    logits = (-UNIFORMITY_T * sq).masked_fill(~pairs, float("-inf"))[rows]
    return (torch.logsumexp(logits, dim=1) - count[rows].float().log()).mean()


class FeatureBank:
    """Per teacher, the normalised features and labels of its last ``size`` synthetic images."""

    def __init__(self, num_teachers: int, size: int) -> None:
        self.size = size
        self.banks: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_teachers

    def get(self, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.banks[t]

    def add(self, t: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.size <= 0:
            return
        f = F.normalize(features.detach().float(), dim=1).cpu()
        y = labels.detach().cpu()
        old = self.banks[t]
        if old is not None:
            f, y = torch.cat([old[0], f]), torch.cat([old[1], y])
        self.banks[t] = (f[-self.size :].contiguous(), y[-self.size :].contiguous())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for t, b in enumerate(self.banks):
            if b is not None:
                state[f"{t}.features"], state[f"{t}.labels"] = b
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.banks = [
            (state[f"{t}.features"], state[f"{t}.labels"]) if f"{t}.features" in state else None
            for t in range(len(self.banks))
        ]
