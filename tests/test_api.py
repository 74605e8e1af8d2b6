"""The Python API (issue 20): ``fed_distill.run`` / ``compose``, the short public names, and the
example of docs/api.md, executed as written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fed_distill
from fed_distill.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
DIGITS2 = ["dataset=digits", "split=iid", "split.num_clients=2", "seed=0", "device=cpu"]


def test_import_is_light_and_every_public_name_resolves():
    code = (
        "import sys, fed_distill\n"
        "assert 'torch' not in sys.modules and 'hydra' not in sys.modules, 'heavy import'\n"
        "missing = [n for n in fed_distill.__all__ if getattr(fed_distill, n, None) is None]\n"
        "assert not missing, missing\n"
        "undocumented = [n for n in fed_distill.__all__ if n != '__version__'"
        " and not (getattr(fed_distill, n).__doc__ or '').strip()]\n"
        "assert not undocumented, undocumented\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_compose_applies_overrides_and_checks_keys():
    cfg = fed_distill.compose("split", overrides=["dataset=digits", "split.num_clients=2"])
    assert cfg.split.num_clients == 2 and cfg.dataset.name == "digits"
    assert cfg.logger == "none"
    with pytest.raises(ConfigError, match="unknown config key 'split.num_clientz'"):
        fed_distill.compose("split", ["split.num_clientz=2"])
    with pytest.raises(ConfigError, match="unknown stage 'splitt'; choose one of: split"):
        fed_distill.compose("splitt", [])
    with pytest.raises(ConfigError, match="list of 'key=value' strings"):
        fed_distill.compose("split", "dataset=digits")
    with pytest.raises(Exception, match="split.num_clientz"):  # the config stays typed
        cfg.split.num_clientz = 3


def test_run_returns_what_the_stage_wrote_and_raises_typed_errors(tmp_path):
    out = fed_distill.run("split", [*DIGITS2, f"run_dir={tmp_path}"])
    assert out == json.loads((tmp_path / "split.json").read_text())
    assert len(out["clients"]) == 2
    cfg = fed_distill.compose("split", [*DIGITS2, f"run_dir={tmp_path / 'b'}"])
    cfg.split.num_clients = 3
    assert len(fed_distill.run("split", cfg=cfg)["clients"]) == 3
    with pytest.raises(ConfigError, match="give overrides or cfg="):
        fed_distill.run("split", ["seed=1"], cfg=cfg)
    with pytest.raises(ConfigError, match="split.num_clients must be >= 1, got 0"):
        fed_distill.run("split", [*DIGITS2, "split.num_clients=0", f"run_dir={tmp_path / 'c'}"])
    assert not (tmp_path / "c" / "split.json").exists()


@pytest.mark.usefixtures("restore_registries")
def test_registered_synthesizer_is_a_valid_method_and_reregistering_the_same_class_is_fine():
    from fed_distill import Synthesizer, register_synthesizer
    from fed_distill.synthesis import synthesis_options

    with pytest.raises(ConfigError, match="synthesis=api_test_method is not a registered"):
        synthesis_options(method="api_test_method").validate()

    def define():
        class ApiTestSynth(Synthesizer):
            def synthesize(self, student=None):
                raise NotImplementedError

        return ApiTestSynth

    register_synthesizer("api_test_method")(define())
    register_synthesizer("api_test_method")(define())  # a re-run notebook cell
    synthesis_options(method="api_test_method").validate()

    class Other(Synthesizer):
        def synthesize(self, student=None):
            raise NotImplementedError

    with pytest.raises(ConfigError, match="already registered"):
        register_synthesizer("api_test_method")(Other)


def _doc_blocks() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4, "docs/api.md lost its example"
    return "\n".join(blocks)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_registries")
def test_docs_api_example_runs(tmp_path, monkeypatch, capsys):
    """The walk-through of docs/api.md, executed as written (in a fresh folder)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_doc_blocks(), "docs/api.md", "exec"), {"__name__": "docs_api"})
    out = capsys.readouterr().out
    assert re.search(r"student 0\.\d{3}, ensemble 0\.\d{3}", out)
    assert "error: split.num_clients must be >= 1, got 0" in out
    assert "torch.Size([8, 10])" in out
    assert "10 1 8" in out  # the registered npz of "Your own data"
    results = json.loads((tmp_path / "runs/api_demo/results.json").read_text())
    assert results["config"]["synthesis"]["method"] == "noise"
    assert results["config"]["synthesis"]["std"] == 0.5  # the synthesizer's own option
    assert re.search(r"FedMD, confident_power: \[0\.\d+", out)
    assert "error: fedmd.power=3.0 is an option of fedmd.aggregate=confident_power" in out
    fedmd = json.loads((tmp_path / "runs/api_fedmd/results.json").read_text())
    assert fedmd["config"]["fedmd"]["aggregate"] == "confident_power"
    assert fedmd["config"]["fedmd"]["power"] == 3.0
