"""Optional live curves: ``logger=tensorboard`` writes TensorBoard event files under
``run_dir/tb/`` while a stage runs (``tensorboard --logdir runs/`` then shows runs side by side).

The loops call :func:`log_scalars` (or pass :func:`epoch_logger` as their ``on_epoch``); it does
nothing unless a stage runs inside :func:`tracking` with ``logger=tensorboard``, so the library
costs nothing and needs no TensorBoard when the logger is off (``logger=none``, the default).
Tags: ``teacher_{i}/...`` and ``student/...`` per epoch, ``synthesis/initial_batch_s`` per
initial batch, ``fedmd/...`` and ``party_{i}/private_acc`` per FedMD round (round 0 = after
transfer learning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fed_distill.errors import ConfigError

LOGGERS = ("none", "tensorboard")
INSTALL_HINT = (
    "logger=tensorboard needs the tensorboard package: pip install 'fed-distill[tensorboard]'"
    " (or run with logger=none)"
)

_writer: Any = None  # the active SummaryWriter, or None


def check_logger(name: str) -> None:
    """One ConfigError line if ``logger`` is unknown or its package is missing."""
    if name not in LOGGERS:
        raise ConfigError(f"logger must be one of {', '.join(LOGGERS)}, got '{name}'")
    if name == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None


@contextmanager
def tracking(name: str, run_dir: str | Path, stage: str = "") -> Iterator[None]:
    """Within the block, :func:`log_scalars` writes to ``run_dir/tb/`` (``logger=tensorboard``)
    or nowhere (``logger=none``). The writer is flushed and closed on exit, also on errors."""
    global _writer
    check_logger(name)
    if name == "none" or _writer is not None:  # off, or a stage inside a stage: one writer
        yield
        return
    from torch.utils.tensorboard import SummaryWriter

    _writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), filename_suffix=f".{stage}")
    try:
        yield
    finally:
        writer, _writer = _writer, None
        writer.close()


def log_scalars(prefix: str, values: Mapping[str, Any], step: int) -> None:
    """``prefix/key`` = value at ``step`` for every finite number in ``values`` (NaN marks an
    epoch without evaluation: skipped). Does nothing when no logger is active."""
    if _writer is None:
        return
    for key, v in values.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            _writer.add_scalar(f"{prefix}/{key}", float(v), int(step))


def epoch_logger(
    prefix: str, then: Callable[[int, dict[str, float]], None] | None = None
) -> Callable[[int, dict[str, float]], None]:
    """An ``on_epoch(epoch, row)`` callback for ``fit``/``distill`` logging ``row`` under
    ``prefix`` at step ``epoch + 1`` (then calling ``then``, if given)."""

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        log_scalars(prefix, row, epoch + 1)
        if then is not None:
            then(epoch, row)

    return on_epoch
