"""Atomic, safe saving and loading of run artifacts.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed
process never leaves a half-written file that a later stage would trust. Nothing is unpickled:
weights are safetensors, tensors are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fed_distill.errors import CheckpointError, FedDistillError
from fed_distill.files import atomic_path, save_figure, write_text  # noqa: F401 - re-exported


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


def file_digest(path: str | Path, length: int = 16) -> str:
    """Short sha256 of a file's bytes (what a later stage records about an input it used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:length]


def tensors_digest(tensors: Mapping[str, Any], length: int = 16) -> str:
    """Short sha256 of a dict of tensors' names, dtypes, shapes and values. Unlike the bytes of
    the file holding them it is reproducible: safetensors orders its metadata at random and
    torch.save records the (temporary) file name."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous()
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------- checkpoints
# A checkpoint is ONE safetensors file, written atomically: every tensor of a nested state
# (model, optimiser, RNG states, histories) is stored as a safetensors tensor, and the
# structure around them (dicts, lists, numbers, strings) as JSON in the file's metadata. One
# file means the parts can never come from different moments, and nothing is ever unpickled.

_CKPT_KEY = "fed_distill.checkpoint"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        # Non-string keys (an optimiser's {param index: state}) keep their type.
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_flatten(v, tensors) for v in obj]
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj  # NaN / Inf survive: the metadata is written with allow_nan
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write a nested state (tensors, dicts, lists, numbers, strings, None) as one safetensors
    file, atomically. Tuples come back as lists; dict keys keep their types."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(dict(state), tensors)
    meta = {_CKPT_KEY: json.dumps(skeleton)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_checkpoint` (refuses pickles and foreign files)."""
    path = Path(path)
    tensors = read_weights(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        skeleton = json.loads(meta[_CKPT_KEY])
        return _unflatten(skeleton, tensors)
    except (KeyError, json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a fed-distill checkpoint ({type(e).__name__})"
        ) from None


def remove_file(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)
