"""FedMD's phases around the rounds, for one party: transfer learning (public data, then the
party's private data: the *alone* baseline), the *pooled* upper bound, and the *alone_extended*
control (see :mod:`fed_distill.federated.fedmd` for the protocol). The in-process run
(:mod:`fed_distill.federated.fedmd_run`) and the Flower client both call them, with the same seeds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fed_distill.federated.config import FedMDConfig
from fed_distill.federated.fedmd import (
    pretrain_public,
    private_test_accuracy,
    restricted_accuracy,
    revisit_private,
    round_lr,
    step_seed,
)
from fed_distill.federated.fedmd_data import FedMDData
from fed_distill.train.fit import predict_logits


def transfer_learning(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Transfer learning for one party: public data, then its private data.

    Returns ``public_val_acc``, ``private_acc_after_public``, ``alone_acc`` (private test task
    after both steps), the epochs run, ``public_state`` (weights after the public step, the
    starting point of the pooled baseline) and ``test_logits`` on the private test task.
    """
    crop = c.crop_padding
    public_x, public_y = data.public_labelled()  # unlabelled public images: alignment only
    res = pretrain_public(
        model,
        public_x,
        public_y,
        data.public_val_x if len(data.public_val_y) else None,
        data.public_val_y if len(data.public_val_y) else None,
        data.public_norm,
        epochs=c.public_epochs,
        batch_size=c.public_batch_size,
        lr=c.lr,
        head_l2=c.head_l2,
        patience=c.public_patience,
        crop_padding=crop,
        hflip=bool(crop) and data.public_hflip,
        device=device,
        seed=step_seed(seed, party, 1),
        desc=f"party {party} public",
        progress=progress,
    )
    public_state = copy.deepcopy(res.state_dict)
    after_public = private_test_accuracy(model, data, device)
    revisit_private(
        model,
        data,
        c,
        (data.private_x[party], data.private_y[party]),
        epochs=c.private_epochs,
        batch_size=c.private_batch_size,
        lr=c.lr,
        device=device,
        seed=step_seed(seed, party, 2),
        desc=f"party {party} private",
        progress=progress,
    )
    test_logits = predict_logits(model, data.test_x, data.private_norm, device)
    alone = restricted_accuracy(test_logits, data.test_y, data.offset, data.num_private)
    return {
        "public_val_acc": res.best_val_acc,
        "public_epochs_run": len(res.history.get("train_loss", [])),
        "private_acc_after_public": after_public,
        "alone_acc": alone,
        "public_state": public_state,
        "test_logits": test_logits,
    }


def pooled_baseline(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float:
    """Upper bound for one architecture: ``model`` (public-pretrained weights) trained on the
    union of every party's private data, evaluated on the private test task."""
    revisit_private(
        model,
        data,
        c,
        data.pooled(),
        epochs=c.pooled_epochs,
        batch_size=c.pooled_batch_size,
        lr=c.lr,
        device=device,
        seed=step_seed(seed, party, 3),
        desc=f"party {party} pooled",
    )
    return private_test_accuracy(model, data, device)


def alone_extended(
    model: torch.nn.Module,
    data: FedMDData,
    party: int,
    c: FedMDConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> float | None:
    """Control for one party: the alone model (changed in place) trained on its own private data
    for as many epochs as the rounds' revisits add up to; private test accuracy."""
    if not (c.extended_alone and c.rounds * c.revisit_epochs > 0):
        return None
    revisit_private(
        model,
        data,
        c,
        (data.private_x[party], data.private_y[party]),
        epochs=c.rounds * c.revisit_epochs,
        batch_size=c.revisit_batch_size,
        lr=round_lr(c),
        device=device,
        seed=step_seed(seed, party, 4),
    )
    return private_test_accuracy(model, data, device)
