"""Submit a Flower app to a SuperLink and wait for its results without trusting the log stream.

``flwr run --stream`` ties the run's outcome to one long HTTP stream: when that stream drops
(a busy machine answering the Control API late, a proxy closing idle connections) the CLI exits
with "Connection to the SuperLink is unavailable" although the run goes on and later succeeds.
So the run is submitted without ``--stream``, its logs are followed by a separate ``flwr log``
process (shown to the user, never relied on), and completion is decided by the files the
ServerApp writes (``results.json`` on success, ``flower_failed.txt`` on an error) and by the run's
status from ``flwr ls``, polled with retries.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from fed_distill.errors import FlowerError

CONNECTION = "fed-distill"  # the SuperLink connection written into $FLWR_HOME/config.toml
FAILED_FILE = "flower_failed.txt"  # written by the deployment ServerApp when it raises
_STARTED = re.compile(r"Successfully started run (\d+)")


def _flwr(flwr: str, env: dict[str, str], cwd: Path, *args: str, timeout: float = 120.0):
    return subprocess.run(
        [flwr, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def submit(flwr: str, app_dir: Path, job_path: Path, env: dict[str, str], cwd: Path) -> int:
    """``flwr run`` without streaming; returns the run id or raises with Flower's own message."""
    args = ["run", str(app_dir), CONNECTION, "--run-config", f'job="{job_path}"']
    try:
        proc = _flwr(flwr, env, cwd, *args)
    except subprocess.TimeoutExpired:
        raise FlowerError("flwr run did not submit the app within 120 s") from None
    out = f"{proc.stdout}\n{proc.stderr}"
    started = _STARTED.search(out)
    if proc.returncode != 0 or started is None:
        lines = [ln.strip(" │╭╮╰╯─") for ln in out.splitlines() if ln.strip(" │╭╮╰╯─")]
        why = " ".join(lines[-3:]) if lines else "no output"
        raise FlowerError(f"flwr run could not start the app (exit {proc.returncode}): {why}")
    print(started.group(0), flush=True)
    return int(started.group(1))


def run_status(flwr: str, run_id: int, env: dict[str, str], cwd: Path) -> str | None:
    """The run's status text (e.g. ``running``, ``finished:completed``), or None when unknown."""
    try:
        proc = _flwr(flwr, env, cwd, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    except subprocess.TimeoutExpired:
        return None
    try:
        runs = json.loads(proc.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        return None  # the SuperLink did not answer this time; the caller asks again
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")) or None
    return None


def follow_logs(flwr: str, run_id: int, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Show the run's logs as they come (best effort: the outcome never depends on it)."""
    return subprocess.Popen([flwr, "log", str(run_id), CONNECTION, "--stream"], env=env, cwd=cwd)


def await_run(
    run_dir: Path,
    status: Callable[[], str | None],
    alive: Callable[[], str | None],
    timeout_s: float,
    poll_s: float = 2.0,
) -> None:
    """Return once ``run_dir/results.json`` exists; raise on a failure marker, a finished run
    without results, a dead SuperLink (``alive`` returns why) or the timeout."""
    results, failed = run_dir / "results.json", run_dir / FAILED_FILE
    logs = run_dir / "flower_logs"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if results.is_file():
            return
        if failed.is_file():
            raise FlowerError(
                f"the Flower run failed: {failed.read_text().strip()} (logs in {logs})"
            )
        dead = alive()
        if dead:
            raise FlowerError(f"{dead}; logs in {logs}")
        state = status()
        if state is not None and state.startswith("finished"):
            if results.is_file():
                return
            raise FlowerError(f"the Flower run ended ({state}) without results; logs in {logs}")
        time.sleep(poll_s)
    raise FlowerError(f"the Flower run did not finish within {timeout_s:g}s; logs in {logs}")
