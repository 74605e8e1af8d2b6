"""FedMD's phases around the rounds, for one party: transfer learning (public data, then the
party's private data: the *alone* baseline), the *pooled* upper bound, and the *alone_extended*
control (see :mod:`fed_distill.federated.fedmd` for the protocol). The in-process run
(:mod:`fed_distill.federated.fedmd_run`) and the Flower client both call them, with the same seeds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fed_distill.federated.fedmd import Party, restricted_accuracy, revisit, round_lr


def transfer_learning(
    model: torch.nn.Module, party: Party, progress: bool = False
) -> dict[str, Any]:
    """Transfer learning for one party: public data, then its private data.

    Returns ``public_val_acc``, ``private_acc_after_public``, ``alone_acc`` (private test task
    after both steps), the epochs run, ``public_state`` (weights after the public step, the
    starting point of the pooled baseline) and ``test_logits`` on the private test task.
    """
    c, data, crop = party.c, party.data, party.c.crop_padding
    res = revisit(
        model,
        *data.public_labelled(),  # unlabelled public images: alignment only
        data.public_norm,
        val=data.public_val(),
        patience=c.public_patience,
        epochs=c.public_epochs,
        batch_size=c.public_batch_size,
        lr=c.lr,
        head_l2=c.head_l2,
        crop_padding=crop,
        hflip=bool(crop) and data.public_hflip,
        device=party.device,
        seed=party.seed_for(1),
        desc=f"party {party.index} public",
        progress=progress,
    )
    public_state = copy.deepcopy(res.state_dict)
    after_public = party.test_accuracy(model)
    schedule = (c.private_epochs, c.private_batch_size, c.lr)
    desc = f"party {party.index} private"
    party.revisit(model, party.own_data(), schedule, (2,), desc=desc, progress=progress)
    test_logits = party.test_logits(model)
    return {
        "public_val_acc": res.best_val_acc,
        "public_epochs_run": len(res.history.get("train_loss", [])),
        "private_acc_after_public": after_public,
        "alone_acc": restricted_accuracy(test_logits, data.test_y, data.offset, data.num_private),
        "public_state": public_state,
        "test_logits": test_logits,
    }


def pooled_baseline(model: torch.nn.Module, party: Party) -> float:
    """Upper bound for one architecture: ``model`` (public-pretrained weights) trained on the
    union of every party's private data, evaluated on the private test task."""
    c = party.c
    schedule = (c.pooled_epochs, c.pooled_batch_size, c.lr)
    party.revisit(model, party.data.pooled(), schedule, (3,), desc=f"party {party.index} pooled")
    return party.test_accuracy(model)


def alone_extended(model: torch.nn.Module, party: Party) -> float | None:
    """Control for one party: the alone model (changed in place) trained on its own private data
    for as many epochs as the rounds' revisits add up to; private test accuracy."""
    c = party.c
    if not (c.extended_alone and c.rounds * c.revisit_epochs > 0):
        return None
    schedule = (c.rounds * c.revisit_epochs, c.revisit_batch_size, round_lr(c))
    party.revisit(model, party.own_data(), schedule, (4,))
    return party.test_accuracy(model)
