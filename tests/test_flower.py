"""Both protocols on real Flower: simulation engine and real processes (SuperLink + SuperNodes
on loopback), equal to the in-process runs; faulty clients left out with reasons."""

import json
import os
import subprocess
import sys

import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import FLOWER_ONESHOT  # noqa: E402
from fed_distill.artifacts import read_weights  # noqa: E402
from fed_distill.cli import main  # noqa: E402
from fed_distill.errors import ProtocolError  # noqa: E402
from fed_distill.federated.flower.runner import FlowerOptions, run_flower  # noqa: E402
from fed_distill.federated.flower.server_app import (  # noqa: E402
    validate_architecture,
    validate_weights,
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread in this process and (sent by the server) on every client."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FED_DISTILL_NO_PROGRESS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FEDMD = [
    "fedmd=quick",
    "fedmd.parties=[fedmd_1,fedmd_6,fedmd_4]",
    "fedmd.rounds=2",
    "fedmd.public_epochs=1",
    "fedmd.private_epochs=3",
    "fedmd.pooled_epochs=2",
    "progress=false",
    "seed=3",
]
# three rounds and no baselines: what the fault tests need of FedMD
FEDMD_FAULTS = [*FEDMD, "fedmd.rounds=3", "fedmd.pooled=false", "fedmd.extended_alone=false"]
ONESHOT = FLOWER_ONESHOT


def _close(a, b, path="results"):
    """Equal within float tolerance, recursively (None and lists included)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


# ----------------------------------------------------------------------------- no Flower needed
def test_core_does_not_import_flower():
    code = (
        "import sys, fed_distill.cli, fed_distill.federated.fedmd, fed_distill.federated.oneshot;"
        "sys.exit(1 if 'flwr' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], env=os.environ).returncode == 0


def test_missing_flower_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "flwr", None)  # makes `import flwr` fail
    assert main(["flower", "fedmd"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: Flower is not installed; pip install fed-distill[flower]"


@pytest.mark.parametrize(
    "args, message",
    [
        (["flower"], "usage: fed-distill flower oneshot|fedmd"),
        (["flower", "fedavg"], "usage: fed-distill flower oneshot|fedmd"),
        (["flower", "fedmd", "--mode", "cloud"], "--mode must be simulation or deployment"),
        (["flower", "fedmd", "--timeout", "soon"], "--timeout must be a number of seconds"),
        (["flower", "fedmd", "--fault", "1:nan"], "--fault must be PARTY:ROUND:KIND"),
        (["flower", "fedmd", "--fault", "1:1:melt"], "--fault kind must be one of"),
        (["flower", "fedmd", "--colour"], "unknown option '--colour'"),
        (["flower", "fedmd", "fedmd.rounds=-1"], "fedmd.rounds must be >= 0"),
        (["flower", "oneshot", "synthesis.batch_size=0"], "synthesis.batch_size must be"),
        (["flower", "oneshot", "student.init=warm"], "student.init must be one of"),
    ],
)
def test_bad_flower_arguments_give_one_line(args, message, capsys, tmp_path):
    assert main([*args, f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_uploaded_weights_are_validated():
    ref = {"w": torch.zeros(3, 2), "n": torch.tensor(0)}
    validate_weights({"w": torch.ones(3, 2), "n": torch.tensor(5)}, ref, "client 0")
    bad = [
        ({"w": torch.ones(2, 2), "n": torch.tensor(0)}, "has shape (2, 2), expected (3, 2)"),
        ({"w": torch.ones(3, 2, dtype=torch.float64), "n": torch.tensor(0)}, "dtype torch.float64"),
        ({"w": torch.full((3, 2), float("nan")), "n": torch.tensor(0)}, "6 NaN and 0 Inf"),
        ({"w": torch.full((3, 2), float("inf")), "n": torch.tensor(0)}, "0 NaN and 6 Inf"),
        ({"w": torch.ones(3, 2)}, "missing keys ['n']"),
    ]
    for state, message in bad:
        with pytest.raises(ProtocolError, match="client 0") as e:
            validate_weights(state, ref, "client 0")
        assert message in str(e.value)


def test_uploaded_architecture_is_validated():
    validate_architecture({"model": "resnet8", "model_kwargs": {}}, ("resnet8", {}), "client 1")
    bad = [
        ({"model": "cnn_small", "model_kwargs": {}}, "architecture cnn_small, expected resnet8"),
        ({"model": "resnet8", "model_kwargs": {"width": 8}}, "expected resnet8"),
        ({}, "architecture none, expected resnet8"),
    ]
    for metrics, message in bad:
        with pytest.raises(ProtocolError, match="client 1") as e:
            validate_architecture(metrics, ("resnet8", {}), "client 1")
        assert message in str(e.value)


# ----------------------------------------------------------------------------- simulation
def test_fedmd_on_flower_simulation_equals_in_process(tmp_path):
    assert main(["fedmd", *FEDMD, f"run_dir={tmp_path / 'local'}"]) == 0
    flower = run_flower("fedmd", [*FEDMD, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    local = _results(tmp_path / "local")
    assert _results(tmp_path / "sim") == flower
    assert flower["runner"] == "flower-simulation"
    assert flower["left_out"] == [[], []]
    for key in (
        "rounds",
        "parties",
        "party_acc",
        "party_acc_digest",
        "alone_acc",
        "pooled_acc",
        "alone_extended_acc",
        "final_acc",
        "mean_acc",
        "mean_gain",
        "ensemble_acc",
        "public_val_acc",
        "private_acc_after_public",
        "consensus_distance",
        "consensus_acc",
        "consensus_private_acc",
        "left_out",
        "device",
        "data",
        "preset",
    ):
        _close(local[key], flower[key], key)
    assert len(flower["party_acc"][0]) == 3 and flower["pooled_acc"][0] is not None
    assert len(flower["party_acc_digest"][0]) == 2  # one per round, before revisit


def test_fedmd_faulty_clients_are_left_out_with_reasons(tmp_path):
    """Every kind of fault, each round leaving at least one healthy party. The outcome hangs
    on the injected faults only: the healthy parties have the default, generous deadline
    (a loaded machine never times them out), the injected timeout's is forced by the server."""
    opts = FlowerOptions(
        faults=["0:1:nan", "1:1:inf", "0:2:shape", "1:2:dtype", "1:3:error", "2:3:timeout"],
    )
    overrides = [*FEDMD_FAULTS, f"run_dir={tmp_path}"]
    r = run_flower("fedmd", overrides, opts)
    assert _results(tmp_path) == r
    reasons = {
        (d["party"], rnd): d["reason"] for rnd, ds in enumerate(r["left_out"], 1) for d in ds
    }
    assert set(reasons) == {(0, 1), (1, 1), (0, 2), (1, 2), (1, 3), (2, 3)}
    assert "1 NaN and 0 Inf" in reasons[(0, 1)]
    assert "0 NaN and 1 Inf" in reasons[(1, 1)]
    assert "have shape (399, 10), expected (400, 10)" in reasons[(0, 2)]
    assert "must be floating point, got dtype torch.int64" in reasons[(1, 2)]
    assert "the ClientApp failed: injected fault: the client crashed" in reasons[(1, 3)]
    assert f"no answer within {opts.timeout:g}s (timeout)" in reasons[(2, 3)]
    # the left-out parties are not in the consensus; the others carry on every round
    dist = r["consensus_distance"]
    assert dist[0][:2] == [None, None] and dist[0][2] is not None
    assert dist[1][:2] == [None, None] and dist[1][2] is not None
    assert dist[2][0] is not None and dist[2][1:] == [None, None]
    assert all(isinstance(a, float) for a in r["party_acc"][0])
    # rejected scores still digest (as in-process); parties that never answered skip the round
    assert isinstance(r["party_acc"][1][2], float) and r["party_acc"][1][3] is None
    assert r["party_acc"][2][3] is None and len(r["party_acc"][2]) == 4
    assert r["party_acc_digest"][2][2] is None and len(r["party_acc_digest"][2]) == 3
    assert isinstance(r["party_acc_digest"][1][1], float)


def test_a_round_every_party_misses_is_skipped_in_one_line_and_the_run_kept(tmp_path, capsys):
    """Every party times out in round 2 (injected, forced: no wall clock): one line says so,
    the round is recorded as missed, round 1 is kept and round 3 runs with every party."""
    n = 3  # FEDMD's parties (fedmd.parties lists three)
    opts = FlowerOptions(faults=[f"{p}:2:timeout" for p in range(n)])
    overrides = [*FEDMD_FAULTS, f"run_dir={tmp_path}"]
    r = run_flower("fedmd", overrides, opts)
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "every party was left out for timeout" in line]
    assert len(said) == 1 and said[0].startswith("round 2: ")
    assert _results(tmp_path) == r
    assert all(a[1] is not None and a[2] is None and a[3] is not None for a in r["party_acc"])
    assert all(a[0] is not None and a[1] is None for a in r["party_acc_digest"])
    assert r["consensus_acc"][1] is None and r["consensus_acc"][2] is not None
    assert [d["party"] for d in r["left_out"][1]] == list(range(n))
    assert all("(timeout)" in d["reason"] for d in r["left_out"][1])
    assert r["left_out"][2] == []  # the late replies drained, every party back in round 3


def test_fedmd_consensus_rule_on_flower_equals_in_process_and_refuses_bad_reports(tmp_path):
    """The server applies the same rule as in-process (reliability from held-out images, then
    sharpened); a party reporting a NaN or out-of-range reliability is refused, named."""
    rule = [
        *FEDMD,
        "fedmd.aggregate=reliability",
        "fedmd.reliability_holdout=1",
        "fedmd.sharpen=0.5",
        "fedmd.revisit_outputs=held",  # the round's own options reach the clients
        "fedmd.final_revisit=false",
        "fedmd.pooled=false",
        "fedmd.extended_alone=false",
    ]
    assert main(["fedmd", *rule, f"run_dir={tmp_path / 'local'}"]) == 0
    flower = run_flower("fedmd", [*rule, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    local = _results(tmp_path / "local")
    for key in (
        "party_acc",
        "party_acc_digest",
        "consensus_acc",
        "consensus_private_acc",
        "consensus_distance",
    ):
        _close(local[key], flower[key], key)
    assert flower["left_out"] == [[], []] and len(flower["consensus_acc"]) == 2
    opts = FlowerOptions(faults=["0:1:extra_nan", "2:2:extra_range"])
    r = run_flower("fedmd", [*rule, f"run_dir={tmp_path / 'faults'}"], opts)
    reasons = {(d["party"], k): d["reason"] for k, ds in enumerate(r["left_out"], 1) for d in ds}
    assert set(reasons) == {(0, 1), (2, 2)}
    assert reasons[(0, 1)].startswith("party 0 (fedmd_1): reliability is not finite")
    assert (
        "party 2 (fedmd_4): reliability must be one number in [0, 1], got [1.5]" in reasons[(2, 2)]
    )
    assert r["consensus_distance"][0][0] is None and r["consensus_distance"][1][2] is None


@pytest.mark.usefixtures("restore_registries")
def test_a_users_rule_from_the_docs_on_flower_equals_in_process(tmp_path, monkeypatch):
    """docs/api.md's own consensus rule (one file's worth of code, registered from Python with
    one option): the block runs as written (in-process), then the same run on the Flower
    simulation, whose parties never heard of the rule, gives the same numbers."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "register_rule(" in b)
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "docs_api_rule"}
    exec("from dataclasses import dataclass\nimport fed_distill\n" + block, scope)
    local = _results(tmp_path / "runs" / "api_fedmd")
    args = [*scope["fedmd"], *scope["rule"], f"run_dir={tmp_path / 'sim'}"]
    flower = run_flower("fedmd", args, FlowerOptions())
    assert flower["config"]["fedmd"]["power"] == 3.0
    for key in ("party_acc", "consensus_acc", "consensus_distance"):
        _close(local[key], flower[key], key)


def test_oneshot_on_flower_simulation_equals_in_process(tmp_path):
    args = [*ONESHOT, "split.num_clients=3"]
    assert main(["oneshot", *args, f"run_dir={tmp_path / 'local'}"]) == 0
    flower = run_flower("oneshot", [*args, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    local = _results(tmp_path / "local")
    assert flower["runner"] == "flower-simulation" and flower["left_out"] == []
    for key in ("teacher_acc", "teacher_local_acc", "ensemble_acc_by_method", "fedavg_acc"):
        _close(local[key], flower[key], key)
    _close(local["student_acc"], flower["student_acc"], "student_acc")
    for key in ("class_acc", "confusion", "pool_agreement", "class_names"):  # per-class figures
        _close(local[key], flower[key], key)
    for i in range(3):
        m = json.loads((tmp_path / "sim" / "teachers" / f"metrics_teacher_{i}.json").read_text())
        assert m["client"] == i and "train_loss" in m and "local_test_acc" in m
        # the class statistics travelled with the weights and were checked and kept
        name = f"teachers/class_stats_{i}.safetensors"
        a, b = read_weights(tmp_path / "local" / name), read_weights(tmp_path / "sim" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)


def test_oneshot_noise_split_on_flower_equals_in_process(tmp_path):
    """split=noise: each Flower client adds its own noise (the features split.json records for
    it) to its images, as in-process; its teacher and statistics come out the same."""
    args = [*ONESHOT, "split=noise", "split.sigma=0.6", "split.num_clients=3"]
    assert main(["oneshot", *args, f"run_dir={tmp_path / 'local'}"]) == 0
    flower = run_flower("oneshot", [*args, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    local = _results(tmp_path / "local")
    for key in ("teacher_acc", "teacher_local_acc", "ensemble_acc_by_method", "student_acc"):
        _close(local[key], flower[key], key)
    split = json.loads((tmp_path / "sim" / "split.json").read_text())
    stds = [c.get("features", {}).get("noise_std", 0.0) for c in split["clients"]]
    assert stds == pytest.approx([0.0, 0.2, 0.4])
    for i in range(3):
        a, b = (
            json.loads((tmp_path / d / "teachers" / f"metrics_teacher_{i}.json").read_text())
            for d in ("local", "sim")
        )
        _close(a["local_test_acc"], b["local_test_acc"], f"teacher {i} local_test_acc")
        # results.json scores each teacher's local test part as its client holds it (noisy)
        _close(local["teacher_local_acc"][i], a["local_test_acc"], f"teacher {i} local")
        _close(a["train_loss"], b["train_loss"], f"teacher {i} train_loss")
        name = f"teachers/class_stats_{i}.safetensors"
        a, b = read_weights(tmp_path / "local" / name), read_weights(tmp_path / "sim" / name)
        assert all(torch.allclose(a[k], b[k]) for k in a)


def test_oneshot_mixed_architectures_on_flower_equal_in_process(tmp_path):
    """Each client trains its own architecture, sends it with its weights; same numbers."""
    args = [*ONESHOT, "split.num_clients=3", "teachers.models=[cnn_small,resnet8]"]
    assert main(["oneshot", *args, f"run_dir={tmp_path / 'local'}"]) == 0
    flower = run_flower("oneshot", [*args, f"run_dir={tmp_path / 'sim'}"], FlowerOptions())
    local = _results(tmp_path / "local")
    assert flower["left_out"] == [] and flower["fedavg_acc"] is None and flower["fedavg_note"]
    for key in ("teacher_acc", "teacher_local_acc", "ensemble_acc_by_method", "student_acc"):
        _close(local[key], flower[key], key)
    for i, name in enumerate(["cnn_small", "resnet8", "cnn_small"]):
        m = json.loads((tmp_path / "sim" / "teachers" / f"metrics_teacher_{i}.json").read_text())
        assert m["model"] == name and m["client"] == i
    spec = json.loads((tmp_path / "sim" / "teachers" / "teachers.json").read_text())
    assert [m["name"] for m in spec["models"]] == ["cnn_small", "resnet8", "cnn_small"]


def test_oneshot_faulty_clients_are_left_out(tmp_path):
    # round 0: the teachers' upload; round 1: the statistics round (refit=head)
    opts = FlowerOptions(faults=["1:0:nan", "2:0:dtype", "3:1:timeout"])
    args = [*ONESHOT, "split.num_clients=4", "refit=head", "refit.steps=100"]
    r = run_flower("oneshot", [*args, f"run_dir={tmp_path}"], opts)
    assert [d["party"] for d in r["left_out"]] == [1, 2]
    assert "NaN" in r["left_out"][0]["reason"] and "client 1" in r["left_out"][0]["reason"]
    assert "dtype torch.int64" in r["left_out"][1]["reason"]
    # the run carried on with clients 0 and 3: two teachers, a student, the baselines
    assert r["teacher_clients"] == [0, 3] and len(r["teacher_acc"]) == 2
    assert r["student_acc"] is not None and r["fedavg_acc"] is not None
    assert len(json.loads((tmp_path / "split.json").read_text())["clients"]) == 2
    assert len(json.loads((tmp_path / "split_all.json").read_text())["clients"]) == 4
    # client 3 (teacher 1) never returned its statistics: the head was re-fitted from client 0's
    assert r["refit"]["left_out"] == [
        {
            "party": 1,
            "client": 3,
            "reason": f"client 3: no answer within {opts.timeout:g}s (timeout)",
        }
    ]
    assert r["refit"]["clients"] == [0] and r["student_refit_acc"] is not None


# ----------------------------------------------------------------------------- real processes
def test_oneshot_on_real_superlink_and_supernodes_equals_in_process(tmp_path):
    """A SuperLink and 2 SuperNodes as separate processes on loopback ports, stopped by PID."""
    args = [*ONESHOT, "split.num_clients=2"]
    assert main(["oneshot", *args, f"run_dir={tmp_path / 'local'}"]) == 0
    opts = FlowerOptions(mode="deployment", wait_nodes_s=120, train_timeout=300)
    flower = run_flower("oneshot", [*args, f"run_dir={tmp_path / 'dep'}"], opts)
    local = _results(tmp_path / "local")
    assert flower["runner"] == "flower-deployment" and flower["left_out"] == []
    for key in ("teacher_acc", "ensemble_acc_by_method", "fedavg_acc", "student_acc"):
        _close(local[key], flower[key], key)
    logs = tmp_path / "dep" / "flower_logs"
    assert (logs / "superlink.log").is_file() and (logs / "supernode_1.log").is_file()


def _started_here(marker) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our run folder)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if str(marker) in ln and "ps -eo" not in ln]


def test_a_server_app_failure_in_deployment_is_one_line_and_stops_everything(tmp_path):
    """Too few SuperNodes: the ServerApp raises; the error reaches the caller as one line
    (from the marker it writes, not from a log stream) and every process is stopped."""
    from fed_distill.config import compose_config
    from fed_distill.errors import FlowerError
    from fed_distill.federated.flower.runner import run_deployment

    cfg = compose_config([*ONESHOT, "split.num_clients=2", f"run_dir={tmp_path}"])
    opts = FlowerOptions(mode="deployment", wait_nodes_s=3, train_timeout=60)
    with pytest.raises(FlowerError, match="only 1 of 2 SuperNodes connected") as err:
        run_deployment("oneshot", cfg, opts, 1)
    assert "\n" not in str(err.value)
    assert "only 1 of 2" in (tmp_path / "flower_failed.txt").read_text()
    assert not (tmp_path / "results.json").exists()
    assert _started_here(tmp_path) == []


def test_submitting_to_a_superlink_that_is_not_there_is_one_line(tmp_path):
    from fed_distill.errors import FlowerError
    from fed_distill.federated.flower.runner import free_port

    overrides = [*ONESHOT, "split.num_clients=2", f"run_dir={tmp_path}"]
    opts = FlowerOptions(mode="deployment", superlink=f"127.0.0.1:{free_port()}")
    with pytest.raises(FlowerError, match="flwr run could not start the app") as err:
        run_flower("oneshot", overrides, opts)
    assert "\n" not in str(err.value)
