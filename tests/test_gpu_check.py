"""scripts/gpu_check.sh (issue 20): without CUDA it fails with one line; its pieces (the
CIFAR-format files it writes, the convolution watch, the GPU verdict) work on the CPU. The CUDA
run itself needs a GPU (docs/gpu.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_cuda_it_fails_with_one_line(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 1
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: FAIL: no CUDA GPU visible"), p.stderr
    assert not list(tmp_path.iterdir()), "nothing is written before the CUDA check"


def test_written_cifar_files_load_as_cifar10(gpu_check, tmp_path):
    from fed_distill.data.sources import load_dataset

    root = gpu_check.write_cifar_files(tmp_path, 50, 20)
    ds = load_dataset("cifar10", data_dir=root, download=False)
    assert tuple(ds.train_x.shape) == (50, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert len(ds.test_y) == 20 and set(ds.train_y.tolist()) <= set(range(10))


def test_verdict_on_the_cpu_and_on_gpu_like_counts(gpu_check):
    conv = torch.nn.Conv2d(3, 4, 3).train()
    with gpu_check.ConvWatch() as watch:
        conv(torch.zeros(2, 3, 8, 8))
    assert watch.work == {("cpu", "float32", True): 2 * 3 * 8 * 8}
    conv(torch.zeros(1, 3, 8, 8))  # after exit: the hook is gone
    assert sum(watch.work.values()) == 2 * 3 * 8 * 8
    problems = gpu_check.check(watch, amp=True, peak_bytes=0)
    assert [p.split(" ")[0] for p in problems] == ["no", "only", "train.amp=true"]
    watch.work = {
        ("cuda", "float16", True): 990,
        ("cuda", "float32", False): 9,
        ("cpu", "float32", False): 1,
    }
    assert gpu_check.check(watch, amp=True, peak_bytes=1) == []
    watch.work = {("cuda", "float32", True): 100}
    assert gpu_check.check(watch, amp=False, peak_bytes=1) == []
    assert "no teacher training step ran in float16" in gpu_check.check(watch, True, 1)[0]


def _script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_peers_without_cuda_fails_with_one_line_before_any_stage(tmp_path):
    p = _script("--peers", "--out", str(tmp_path / "out"))
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peers: FAIL: device=cuda was asked for")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_peers_runs_the_benchmark_with_later_arguments_winning(tmp_path):
    # the CPU path of the one GPU command: --device cpu after --peers replaces its cuda
    small = ["train.epochs=1", "train.min_steps=10", "synthesis.iterations=2"]
    small += ["synthesis.batch_size=16", "synthesis.ngf=8"]
    out = tmp_path / "out"
    args = ["--peers", "--device", "cpu", "--dataset", "digits", "--rounds", "1"]
    args += ["--only", "dense/weighted", "--out", str(out), "--figures", str(tmp_path)]
    p = _script(*args, "--", *small, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "alpha0.5" / "dense_weighted" / "results.json").read_text())
    assert r["config"]["device"] == "cpu" and r["config"]["synthesis"]["method"] == "dense"
    assert "dense/weighted" in (out / "table.txt").read_text()
