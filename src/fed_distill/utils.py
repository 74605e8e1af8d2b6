"""Seeding, device selection and small shared helpers."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from fed_distill.errors import ConfigError


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@contextmanager
def fork_seeded(seed: int, device: torch.device | str = "cpu"):
    """Run a block with torch's global RNG (dropout) seeded to ``seed``, restoring it after:
    the block's numbers then do not depend on what ran before it (or was skipped on a resume)."""
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU. ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda was asked for but no CUDA GPU is available; use device=auto or device=cpu"
        )
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got '{name}'")
    return torch.device(name)


def configure_threads() -> None:
    """Use one intra-op thread per physical core; oversubscription slows small models on CPU."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def progress_bar(iterable: Iterable, desc: str = "", enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on interactive terminals; silent in logs, in CI and with progress=false
    (or FED_DISTILL_NO_PROGRESS=1)."""
    off = not enabled or os.environ.get("FED_DISTILL_NO_PROGRESS") == "1" or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=off, leave=False, dynamic_ncols=True, **kwargs)


@contextmanager
def timed(store: dict[str, float], key: str):
    """Accumulate the wall time of a block into ``store[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - t0
