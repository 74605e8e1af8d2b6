"""Bad config values refused where they enter (issue 39): FedMD's ``aggregate_weights`` before
any transfer learning, an infinite weight wherever NaN is refused, a one-shot preset given to
FedMD, and pixel statistics whose mean and variance differ in width. Each is one ``error:``
line from the CLI and nothing is written into the run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fed_distill.cli import main
from fed_distill.errors import ProtocolError

FEDMD = ["fedmd", "fedmd=quick", "fedmd.num_parties=4", "device=cpu"]
ONESHOT = ["oneshot", "dataset=digits", "device=cpu"]


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, run: Path, *parts: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for part in parts:
        assert part in err, err
    assert not run.exists() or not any(run.iterdir())  # no checkpoint, no file at all


@pytest.mark.parametrize(
    "weights, message",
    [
        ("[1,-1,1,1]", "aggregate_weights[1] must be a finite number >= 0"),
        ("[1,nan,1,1]", "aggregate_weights[1] must be a finite number >= 0"),
        ("[1,1,inf,1]", "aggregate_weights[2] must be a finite number >= 0"),
        ("[0,0,0,0]", "aggregate_weights are all 0"),
        ("[1,1]", "aggregate_weights has 2 entries for 4 parties"),
    ],
)
def test_fedmd_aggregate_weights_are_refused_before_transfer_learning(
    tmp_path, capsys, weights, message
):
    run = tmp_path / "run"
    code, err = run_cli(capsys, *FEDMD, f"fedmd.aggregate_weights={weights}", f"run_dir={run}")
    assert_refused(code, err, run, message)


@pytest.mark.parametrize(
    "key", ["synthesis.pixel_scale", "synthesis.bn_scale", "synthesis.var_scale", "synthesis.lr"]
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_an_infinite_weight_is_refused_wherever_nan_is(tmp_path, capsys, key, value):
    run = tmp_path / "run"
    code, err = run_cli(capsys, *ONESHOT, "upload.pixels=true", f"{key}={value}", f"run_dir={run}")
    assert_refused(code, err, run, key)


@pytest.mark.parametrize(
    "override",
    ["student.lr=inf", "student.temperature=inf", "train.lr=inf", "fedmd.lr=inf"],
)
def test_infinite_rates_are_refused(tmp_path, capsys, override):
    run = tmp_path / "run"
    stage = FEDMD if override.startswith("fedmd") else ONESHOT
    code, err = run_cli(capsys, *stage, override, f"run_dir={run}")
    assert_refused(code, err, run, override.split("=")[0], "finite")


def test_a_one_shot_preset_given_to_fedmd_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "fedmd", "experiment=fmnist_hetero_5", f"run_dir={run}")
    assert_refused(code, err, run, "experiment=fmnist_hetero_5 is a one-shot preset", "fedmd=")


def test_every_built_in_preset_is_a_one_shot_one():
    from fed_distill.conf import preset_names
    from fed_distill.federated.config import preset_protocol

    names = preset_names("experiment")
    assert names and {preset_protocol(n) for n in names} == {"oneshot"}
    assert preset_protocol("no_such_preset") is None


def test_pixel_statistics_of_different_widths_name_both_keys():
    from fed_distill.class_stats import check_class_stats
    from fed_distill.models import build_model

    model = build_model("cnn_small", 10, 1, 8, width=4).eval()
    from fed_distill.class_stats import compute_class_stats

    x = torch.randint(0, 255, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(40) % 10

    def norm(t):
        return t.float() / 255

    stats = compute_class_stats(model, x, y, norm, 10, pixels=True)
    stats["pixel.mean"] = stats["pixel.mean"][:, :10]  # the mean is the wrong one
    with pytest.raises(ProtocolError) as e:
        check_class_stats(stats, model, 10, "client 1")
    text = str(e.value)
    assert "'pixel.mean' of shape (10, 10)" in text and "'pixel.var' of shape (10, 64)" in text
    assert "class statistic 'pixel.var' has shape" not in text  # the var is not blamed


def test_a_one_shot_preset_given_to_fedmd_makes_no_run_folder(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    code, err = run_cli(capsys, "fedmd", "experiment=fmnist_hetero_5", f"run_dir={run}")
    assert_refused(code, err, run, "experiment=fmnist_hetero_5 is a one-shot preset")
    assert not (tmp_path / "new").exists()  # refused before run_dir is made


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["fedmd", "experiment=fmnist_hetero_5"], "experiment=fmnist_hetero_5 is a one-shot"),
        (["split", "dataset=digits", "fedmd=fashion"], "fedmd=fashion is a FedMD preset"),
        (["oneshot", "dataset=digits", "fedmd.rounds=3"], "fedmd.rounds is a FedMD key"),
        (["train-teachers", "++fedmd.rounds=3"], "stage train-teachers does not read"),
    ],
)
def test_the_other_protocols_preset_leaves_a_run_folder_as_it_was(tmp_path, capsys, args, message):
    run = tmp_path / "run"
    assert main(["split", "dataset=digits", f"run_dir={run}"]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    code, err = run_cli(capsys, *args, f"run_dir={run}")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert _snapshot(run) == before


def test_a_fedmd_preset_is_refused_by_a_one_shot_stage(tmp_path, capsys, monkeypatch):
    """No built-in experiment=NAME preset sets the fedmd group; one that did would be refused
    by the one-shot stages as FedMD's, before anything is made."""
    monkeypatch.setattr("fed_distill.federated.config.preset_protocol", lambda name: "fedmd")
    run = tmp_path / "run"
    code, err = run_cli(capsys, *ONESHOT, "experiment=fmnist_hetero_5", f"run_dir={run}")
    assert_refused(code, err, run, "experiment=fmnist_hetero_5 is a FedMD preset", "oneshot")
    assert not run.exists()


def test_the_protocol_check_needs_no_typed_keys_from_python(tmp_path):
    """A config composed without fed_distill.compose (no record of typed keys) still gets the
    preset check; the one-shot stages accept it."""
    from fed_distill.config import compose_config
    from fed_distill.errors import ConfigError
    from fed_distill.validate import check_protocol

    cfg = compose_config(["experiment=fmnist_hetero_5", f"run_dir={tmp_path}"])
    check_protocol("oneshot", cfg)
    with pytest.raises(ConfigError, match="is a one-shot preset"):
        check_protocol("fedmd", cfg)
