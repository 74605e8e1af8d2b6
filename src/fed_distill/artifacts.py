"""Atomic, safe saving and loading of run artifacts.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed
process never leaves a half-written file that a later stage would trust. Nothing is unpickled:
weights are safetensors, tensors are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fed_distill.errors import CheckpointError, FedDistillError


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def _clean_floats(obj: Any) -> Any:
    """JSON has no NaN/Inf: store them as null rather than writing invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_floats(v) for v in obj]
    return obj


def save_json(obj: Any, path: str | Path, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (NaN/Inf become null)."""
    obj = json.loads(json.dumps(obj, default=_json_default))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_clean_floats(obj), indent=indent) + "\n")


def load_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FedDistillError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FedDistillError(
            f"{what} {path} is not valid JSON ({e}); delete it and rerun the stage that writes it"
        ) from None


def save_weights(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a model's state dict as safetensors, atomically."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header ("{"). Its first
    # byte can be 0x80 (a header of 128 + 256k bytes), so only a file that is not laid out like
    # that is taken for a zip or a pickle (protocol >= 2 starts with 0x80).
    looks_safetensors = head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path} is a pickle/zip checkpoint, not safetensors; refusing to unpickle it"
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})"
        ) from None


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load safetensors weights into ``model``; keys and shapes must match exactly."""
    state = read_weights(path)
    check_state_fits(model, state, source=str(path))
    model.load_state_dict(state)
    return model


def check_state_fits(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights"
) -> None:
    """Raise CheckpointError unless ``state`` has exactly the model's keys, shapes and finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not fit the model: missing keys {missing[:3]}, unexpected keys {extra[:3]}"
            " (was it trained with another architecture?)"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source} does not fit the model: '{k}' has shape {tuple(state[k].shape)},"
                f" the model expects {tuple(v.shape)}"
            )
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{source}: '{k}' contains NaN or Inf")


def save_tensors(tensors: Mapping[str, Any], path: str | Path) -> None:
    """Save a dict of tensors (and plain values) with torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(dict(tensors), tmp)


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, Any]:
    """Load a torch.save'd dict with ``weights_only=True``: no arbitrary code runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{what} {path} was refused or is corrupt ({first[:160]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} {path} does not hold a dict of tensors")
    return obj


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
