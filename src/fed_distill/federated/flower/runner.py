"""``fed-distill flower oneshot|fedmd``: run a protocol on Flower.

* ``--mode simulation`` (default): Flower's simulation engine (Ray) on this machine, one virtual
  SuperNode per party / client.
* ``--mode deployment``: real processes. With ``--superlink HOST:PORT`` the run is submitted to
  a running SuperLink (the address of its HTTP API: ``flower-superlink --host H --port P``)
  whose SuperNodes you started;
  without it, a SuperLink and one SuperNode per party are started here on loopback, the run is
  submitted with ``flwr run``, and every process is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fed_distill.errors import ConfigError, FlowerError
from fed_distill.federated.flower import QUIET_ENV, require_flower
from fed_distill.federated.flower.submit import (
    CONNECTION,
    FAILED_FILE,
    await_run,
    follow_logs,
    run_status,
    submit,
)

MODES = ("simulation", "deployment")


@dataclass
class FlowerOptions:
    mode: str = "simulation"
    timeout: float = 300.0  # seconds to wait for class scores (and other quick replies)
    train_timeout: float = 3600.0  # seconds to wait for local training replies
    wait_nodes_s: float = 120.0  # seconds to wait for the SuperNodes to connect
    superlink: str | None = None  # deployment: HTTP API address of a running SuperLink
    root_certificates: str | None = None  # deployment with TLS: CA certificate (PEM)
    faults: list[str] = field(default_factory=list)  # testing: PARTY:ROUND:KIND
    keep_logs: bool = True  # deployment: SuperLink/SuperNode logs under run_dir/flower_logs


def parse_args(args: list[str]) -> tuple[str, FlowerOptions, list[str]]:
    """``PROTOCOL [--mode M] [--timeout S] [--train-timeout S] [--superlink ADDR]
    [--root-certificates PEM] [--fault P:R:KIND] [overrides]``."""
    usage = (
        "usage: fed-distill flower oneshot|fedmd [--mode simulation|deployment] [--timeout S]"
        " [--train-timeout S] [--superlink HOST:PORT] [--root-certificates CA.pem] [key=value ...]"
    )
    if not args or args[0] not in ("oneshot", "fedmd"):
        raise ConfigError(usage)
    protocol, rest = args[0], list(args[1:])
    opts = FlowerOptions()
    overrides: list[str] = []
    flags = {
        "--mode": "mode",
        "--timeout": "timeout",
        "--train-timeout": "train_timeout",
        "--wait-nodes": "wait_nodes_s",
        "--superlink": "superlink",
        "--root-certificates": "root_certificates",
        "--fault": "faults",
    }
    i = 0
    while i < len(rest):
        a = rest[i]
        key, eq, val = a.partition("=")
        if key in flags:
            if not eq:
                if i + 1 >= len(rest):
                    raise ConfigError(f"{key} needs a value; {usage}")
                val = rest[i + 1]
                i += 1
            name = flags[key]
            if name == "faults":
                opts.faults.append(val)
            elif name in ("timeout", "train_timeout", "wait_nodes_s"):
                try:
                    setattr(opts, name, float(val))
                except ValueError:
                    raise ConfigError(f"{key} must be a number of seconds, got '{val}'") from None
                if getattr(opts, name) <= 0:
                    raise ConfigError(f"{key} must be > 0, got {val}")
            else:
                setattr(opts, name, val)
        elif a.startswith("--"):
            raise ConfigError(f"unknown option '{a}'; {usage}")
        else:
            overrides.append(a)
        i += 1
    if opts.mode not in MODES:
        raise ConfigError(f"--mode must be simulation or deployment, got '{opts.mode}'")
    return protocol, opts, overrides


def num_nodes(protocol: str, cfg) -> int:
    """SuperNodes a run needs: one per FedMD party, one per one-shot client with a teacher."""
    if protocol == "fedmd":
        from fed_distill.federated.config import fedmd_config
        from fed_distill.federated.fedmd import party_architectures

        return len(party_architectures(fedmd_config(cfg.fedmd)))
    return int(cfg.split.num_clients) - int(cfg.split.get("server_clients", 0) or 0)


def make_job(protocol: str, cfg, opts: FlowerOptions, runner: str) -> dict[str, Any]:
    import torch

    from fed_distill.federated.flower.common import cfg_to_json, parse_faults

    parse_faults(opts.faults)  # fail early on a malformed --fault
    return {
        "protocol": protocol,
        "runner": runner,
        "cfg": cfg_to_json(cfg),
        "timeout": opts.timeout,
        "train_timeout": opts.train_timeout,
        "wait_nodes_s": opts.wait_nodes_s,
        "faults": list(opts.faults),
        "num_threads": torch.get_num_threads(),
        "num_nodes": num_nodes(protocol, cfg),
    }


def run_flower(protocol: str, overrides: list[str], opts: FlowerOptions) -> dict[str, Any]:
    """Compose the config, run ``protocol`` on Flower, return (and write) results.json."""
    require_flower()
    from fed_distill.api import mark_explicit
    from fed_distill.config import compose_config
    from fed_distill.utils import configure_threads
    from fed_distill.validate import validate_config

    # the keys the user typed are recorded, as for in-process stages (a typed split key of
    # another partition is refused even at its default value)
    cfg = mark_explicit(compose_config(overrides), overrides)
    if protocol == "fedmd":
        from fed_distill.federated.config import check_preset_for_fedmd

        check_preset_for_fedmd(cfg)  # a one-shot preset would be ignored
    validate_config(protocol, cfg)  # the whole config and run_dir, before any node starts
    configure_threads()
    if not cfg.progress:
        os.environ["FED_DISTILL_NO_PROGRESS"] = "1"
    n = num_nodes(protocol, cfg)
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    if opts.mode == "simulation":
        return run_simulation(protocol, cfg, opts, n)
    return run_deployment(protocol, cfg, opts, n)


# ============================================================================ simulation


def run_simulation(protocol: str, cfg, opts: FlowerOptions, n: int) -> dict[str, Any]:
    """Flower's simulation engine: the ServerApp in this process, ClientApps on Ray actors."""
    import torch
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fed_distill.federated.flower.client_app import app as client_app
    from fed_distill.federated.flower.server_app import make_server_app

    job = make_job(protocol, cfg, opts, "flower-simulation")
    results: list[dict[str, Any]] = []
    threads = max(1, torch.get_num_threads())
    cpus = os.cpu_count() or 1
    backend_config = {
        # as many actors as the cores allow at the reference run's thread count each
        "client_resources": {"num_cpus": min(threads, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }
    if str(cfg.device) == "cuda" or (str(cfg.device) == "auto" and torch.cuda.is_available()):
        backend_config["client_resources"]["num_gpus"] = 1.0 / max(1, n)
    import ray

    own_ray = not ray.is_initialized()  # shut Ray down afterwards only if this run started it
    try:
        flwr_run_simulation(
            server_app=make_server_app(job, results),
            client_app=client_app,
            num_supernodes=n,
            backend_config=backend_config,
        )
    finally:
        if own_ray:
            _ray_shutdown()
    if not results:
        raise FlowerError("the Flower simulation ended without results; see the log above")
    return results[0]


def _ray_shutdown() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort cleanup
        pass


# ============================================================================ deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FlowerError(f"'{name}' not found; pip install fed-distill[flower]")
    return found


def write_app(app_dir: Path) -> Path:
    """A minimal Flower app project: its components live in the installed fed_distill."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "fed-distill-flower"
            version = "1.0.0"
            description = "fed-distill protocols (one-shot FL, FedMD) as a Flower app"
            license = "MIT"
            dependencies = ["fed-distill[flower]"]

            [tool.hatch.build.targets.wheel]
            packages = ["."]

            [tool.flwr.app]
            publisher = "fed-distill"

            [tool.flwr.app.components]
            serverapp = "fed_distill.federated.flower.server_app:app"
            clientapp = "fed_distill.federated.flower.client_app:app"

            [tool.flwr.app.config]
            job = ""
            """
        )
    )
    (app_dir / "README.md").write_text("fed-distill on Flower: see the fed-distill README.\n")
    return app_dir


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    # the Flower processes import fed_distill from the same place this process does
    src = str(Path(__file__).resolve().parents[3])
    # the SuperLink / SuperNode start flower-superexec, flwr-serverapp, ... by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        [src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop what we started, by process id (SIGTERM, then SIGKILL)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_local_federation(
    n: int, log_dir: Path, env: dict[str, str]
) -> tuple[str, list[subprocess.Popen]]:
    """A SuperLink and ``n`` SuperNodes (partition-id 0..n-1) on loopback, without TLS.

    Returns the SuperLink's Control API address and the processes (stop them with :func:`_stop`).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()  # the SuperLink's HTTP API: Fleet (SuperNodes) and Control (flwr run)
    procs: list[subprocess.Popen] = []
    try:
        link_log = open(log_dir / "superlink.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [
                    _bin("flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--database",
                    str(log_dir / "state.db"),
                ],
                stdout=link_log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=log_dir,
            )
        )
        _wait_port(port, procs[0], log_dir / "superlink.log")
        for i in range(n):
            node_log = open(log_dir / f"supernode_{i}.log", "w")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [
                        _bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--node-config",
                        f"partition-id={i} num-partitions={n}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                    ],
                    stdout=node_log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=log_dir,
                )
            )
    except BaseException:
        _stop(procs)
        raise
    return f"127.0.0.1:{port}", procs


def _wait_port(port: int, proc: subprocess.Popen, log: Path, wait_s: float = 60.0) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FlowerError(f"the SuperLink exited ({proc.returncode}); see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerError(f"the SuperLink did not open port {port} within {wait_s:g}s; see {log}")


def _write_connection(flwr_home: Path, superlink: str, root_certificates: str | None) -> None:
    """`flwr run APP CONNECTION`: the connection lives in $FLWR_HOME/config.toml."""
    tls = (
        f'root-certificates = "{Path(root_certificates).resolve()}"'
        if root_certificates
        else "insecure = true"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{superlink}"\n{tls}\n'
    )


def _link_gone(procs: list[subprocess.Popen]) -> str | None:
    """Why the SuperLink started here is gone, or None (also when it runs elsewhere)."""
    if procs and procs[0].poll() is not None:
        return f"the SuperLink exited ({procs[0].returncode}) before the run finished"
    return None


def run_deployment(protocol: str, cfg, opts: FlowerOptions, n: int) -> dict[str, Any]:
    """Real processes: submit the app with ``flwr run`` to a SuperLink and wait for results."""
    run_dir = Path(str(cfg.run_dir)).resolve()
    job = make_job(protocol, cfg, opts, "flower-deployment")
    job_path = run_dir / "flower_job.json"
    job_path.write_text(json.dumps(job))
    results_path = run_dir / "results.json"
    for stale in (results_path, run_dir / FAILED_FILE):
        stale.unlink(missing_ok=True)  # the ServerApp writes them afresh: success or failure
    env = _env()
    # Flower's home (installed apps, CLI config) inside the run folder, not in ~/.flwr
    flwr_home = run_dir / "flower_logs" / "flwr_home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    env["FLWR_HOME"] = str(flwr_home)
    procs: list[subprocess.Popen] = []
    superlink = opts.superlink
    if superlink is None:
        superlink, procs = start_local_federation(n, run_dir / "flower_logs", env)
    flwr = _bin("flwr")
    try:
        app_dir = write_app(run_dir / "flower_app")
        _write_connection(flwr_home, superlink, opts.root_certificates)
        run_id = submit(flwr, app_dir, job_path, env, run_dir)
        logs = follow_logs(flwr, run_id, env, run_dir)
        try:
            await_run(
                run_dir,
                status=lambda: run_status(flwr, run_id, env, run_dir),
                alive=lambda: _link_gone(procs),
                timeout_s=opts.train_timeout * 4,
            )
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                logs.wait(timeout=10)  # the log stream ends with the run
            _stop([logs])
    finally:
        _stop(procs)
    return json.loads(results_path.read_text())
