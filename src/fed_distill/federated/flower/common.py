"""What ServerApp and ClientApp share: message types, tensor <-> record codecs, the resolved
config as JSON, and the fault injection knob used by the tests."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from omegaconf import DictConfig, OmegaConf

# message types: "<category>.<action>" routes to the ClientApp handler of that action
HELLO = "query.hello"  # which partition (party / client) does this node hold?
FEDMD_SETUP = "train.fedmd_setup"  # transfer learning (+ the local baselines)
FEDMD_SCORES = "query.fedmd_scores"  # class scores on the given public samples
FEDMD_ROUND = "train.fedmd_round"  # digest the consensus, revisit, evaluate
ONESHOT_TRAIN = "train.oneshot_teacher"  # train the local teacher once, upload its weights

# reply keys of a one-shot client's class statistics, beside its weights' keys
CLASS_STATS_PREFIX = "class_stats."

FAULTS = ("nan", "inf", "shape", "dtype", "timeout", "error", "extra_nan", "extra_range")


def to_record(tensors: dict[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Tensors as an ArrayRecord (numpy's .npy bytes: dtype and shape travel exactly)."""
    out = ArrayRecord()
    for k, v in tensors.items():
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        out[k] = Array(np.array(a, order="C"))  # keeps 0-d arrays 0-d
    return out


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord back to CPU tensors (copies: the record's buffers are read-only)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def cfg_to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True))


def cfg_from_json(text: str) -> DictConfig:
    return OmegaConf.create(json.loads(text))


def config_record(**values: Any) -> ConfigRecord:
    """A ConfigRecord; dicts and lists of mixed things travel as JSON strings."""
    return ConfigRecord(
        {k: json.dumps(v) if isinstance(v, dict | list | tuple) else v for k, v in values.items()}
    )


def content(arrays: dict[str, Any] | None = None, **config: Any) -> RecordDict:
    rd = RecordDict()
    if arrays:
        rd["arrays"] = to_record(arrays)
    rd["config"] = config_record(**config)
    return rd


def client_message(
    split: Any, cl: Any, weights: dict[str, torch.Tensor], job: dict[str, Any], **config: Any
):
    """What a one-shot client is sent: ``weights`` (a model to train or to run), its part of
    the split (indices, label counts, what makes its images its own) and the run's config."""
    arrays = {
        **weights,
        "idx_train": torch.as_tensor(cl.train, dtype=torch.long),
        "idx_val": torch.as_tensor(cl.val, dtype=torch.long),
        "idx_test": torch.as_tensor(cl.test, dtype=torch.long),
    }
    return content(
        arrays,
        cfg=job["cfg"],
        dataset=split.dataset,
        dataset_options=split.dataset_options,
        train_class_counts=cl.train_class_counts,
        features=cl.features,  # what makes its images its own (split=noise), as split.json says
        num_threads=int(job["num_threads"]),
        **config,
    )


# ----------------------------------------------------------------------------- faults (tests)
def inject_fault(kind: str, tensors: dict[str, torch.Tensor], sleep_s: float) -> None:
    """Make a reply bad in the way ``kind`` names, in place (a testing knob: ``--fault``).

    nan/inf poison one value of every float tensor, shape drops the last row, dtype casts to
    int64, timeout sleeps past the server's deadline, error raises inside the ClientApp;
    extra_nan / extra_range set what a FedMD party sends besides its scores (class counts,
    reliability) to NaN / 1.5 (out of range, not a whole number).
    """
    if kind in ("extra_nan", "extra_range"):
        for k, t in list(tensors.items()):
            if k != "scores":
                tensors[k] = torch.full_like(t, float("nan") if kind == "extra_nan" else 1.5)
        return
    if kind == "timeout":
        time.sleep(sleep_s)
        return
    if kind == "error":
        raise RuntimeError("injected fault: the client crashed")
    for k, t in list(tensors.items()):
        if not torch.is_floating_point(t):
            continue
        if kind in ("nan", "inf"):
            t = t.contiguous().clone()
            t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
        elif kind == "shape":
            t = t[:-1] if t.dim() else t.reshape(1, 1)
        elif kind == "dtype":
            t = t.round().to(torch.int64)
        tensors[k] = t


def parse_faults(specs: list[str] | dict[str, str] | None) -> dict[tuple[int, int], str]:
    """``["PARTY:ROUND:KIND", ...]`` -> {(party, round): kind}. One-shot has only round 0."""
    from fed_distill.errors import ConfigError

    if not specs:
        return {}
    if isinstance(specs, dict):
        specs = [f"{k}:{v}" for k, v in specs.items()]
    out: dict[tuple[int, int], str] = {}
    for s in specs:
        parts = str(s).split(":")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            raise ConfigError(f"--fault must be PARTY:ROUND:KIND, got '{s}'")
        if parts[2] not in FAULTS:
            raise ConfigError(f"--fault kind must be one of {', '.join(FAULTS)}, got '{parts[2]}'")
        out[(int(parts[0]), int(parts[1]))] = parts[2]
    return out
