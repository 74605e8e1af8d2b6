"""Shared test set-up: quiet progress bars, CPU only, fast small configs."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["FED_DISTILL_NO_PROGRESS"] = "1"

import pytest  # noqa: E402

from fed_distill.cli import main  # noqa: E402

FAST_TRAIN = ["train.epochs=2", "train.min_steps=20", "device=cpu"]


@pytest.fixture
def cli(capsys):
    """Run ``fed-distill ARGS`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def benchmark_module():
    """Import ``benchmarks/NAME.py`` (a script, not a package) as a module."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
