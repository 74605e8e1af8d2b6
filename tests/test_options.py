"""Each component owns its options (issue 40): ``synthesis=NAME`` composes exactly the keys of
that synthesizer's options class, a key of another method is one clear line, run folders made
when every method shared one flat config keep their fingerprints, and a synthesizer module
is found without being listed anywhere."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from fed_distill.conf import preset_names
from fed_distill.config import applicable_overrides, compose_config, to_container
from fed_distill.errors import ConfigError
from fed_distill.synthesis import list_synthesizers, options_class, options_from_node
from fed_distill.synthesis.options import legacy_settings

SYNTHESIS_PRESETS = preset_names("synthesis")

# The synthesis fingerprint of every preset as the flat config of c4a890c computed it
# (sha256 of its settings): a run folder made then resumes instead of starting again.
FINGERPRINTS_BEFORE = {
    "coboost": "9e4c54a1fd366625",
    "cpu": "ef082eff33638cfd",
    "cpu_more_iterations": "807016d663953364",
    "cpu_paper": "5441e98f2ef3d7ae",
    "cpu_sampling": "39bb3cbe058315e8",
    "custom": "18458c7a93f8af32",
    "dense": "e39436653bf3eec2",
    "fast": "ab0533513fcb3040",
    "generator": "b2cdb9d594a63a2b",
    "generator synthesis.nz=7": "d4fbb3a9d09b1627",
    "more_iterations": "0c5ef0abcde0bfdc",
    "paper": "e709007c34c6b83f",
    "public": "5637220cf0065cf0",
    "sampling": "3a3844fefe0e2e37",
}


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


@pytest.mark.parametrize("case", sorted(FINGERPRINTS_BEFORE))
def test_fingerprints_of_unchanged_settings_are_unchanged(case):
    preset, *rest = case.split()
    node = compose_config([f"synthesis={preset}", *rest]).synthesis
    assert _hash(legacy_settings(to_container(node))) == FINGERPRINTS_BEFORE[case]


@pytest.mark.parametrize("method", list_synthesizers())
def test_synthesis_name_composes_only_its_own_keys(method):
    node = compose_config([f"synthesis={method}"]).synthesis
    own = {f.name for f in dataclasses.fields(options_class(method))}
    assert set(node) == own
    options = options_from_node(node).validate()
    if method not in SYNTHESIS_PRESETS:  # no preset file of that name: the class's defaults
        assert options == options_class(method)(name=method, method=method)


def test_generator_cfg_shows_no_deepinversion_key_and_the_choices(capsys):
    from omegaconf import OmegaConf

    from fed_distill.cli import main
    from fed_distill.synthesis.options import DeepInversionOptions, GeneratorOptions

    assert main(["oneshot", "synthesis=generator", "--cfg"]) in (0, None)
    out = capsys.readouterr().out
    shown = set(OmegaConf.create(out).synthesis)
    assert shown == {f.name for f in dataclasses.fields(GeneratorOptions)}
    di_only = {f.name for f in dataclasses.fields(DeepInversionOptions)} - shown
    assert {"comp_scale", "var_scale", "mode", "betas"} <= di_only
    choices = [ln for ln in out.splitlines() if ln.startswith("# ")]
    assert any(ln.startswith("# synthesis=") and "coboost" in ln for ln in choices)
    assert any(ln.startswith("# fedmd.aggregate=") and "class_share" in ln for ln in choices)


def test_a_key_of_another_method_is_one_line_naming_its_owner_and_the_options():
    with pytest.raises(ConfigError) as e:
        compose_config(["synthesis=generator", "synthesis.comp_scale=3"])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("synthesis.comp_scale is not an option of synthesis=generator")
    assert "synthesis=deepinversion" in msg and "nz" in msg
    with pytest.raises(
        ConfigError, match="synthesis.iterations is not an option of synthesis=public"
    ):
        compose_config(["synthesis=public", "synthesis.iterations=4"])
    with pytest.raises(
        ConfigError, match="synthesis.no_such_key is not an option of synthesis=deep"
    ):
        compose_config(["synthesis.no_such_key=1"])


def test_the_cli_refuses_a_foreign_key_before_any_work(tmp_path, capsys):
    from fed_distill.cli import main

    run = tmp_path / "run"
    code = main(["oneshot", "dataset=digits", "synthesis=generator", "synthesis.comp_scale=3",
                 f"run_dir={run}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "comp_scale" in err and "Traceback" not in err
    assert not run.exists()


def test_changing_method_under_a_preset_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="use synthesis=public"):
        options_from_node(compose_config(["synthesis=cpu", "synthesis.method=public"]).synthesis)


def test_applicable_overrides_keep_each_methods_own_keys():
    over = ["dataset=digits", "synthesis.ngf=8", "synthesis.batch_size=16", "seed=2"]
    kept, dropped = applicable_overrides(["synthesis=cpu", *over])
    assert dropped == ["synthesis.ngf=8"] and "synthesis.batch_size=16" in kept
    kept, dropped = applicable_overrides(["synthesis=generator", *over])
    assert dropped == [] and "synthesis.ngf=8" in kept


def test_needs_class_stats_is_the_methods_own_declaration():
    from fed_distill.synthesis import synthesis_options

    assert synthesis_options("deepinversion").needs_class_stats()
    assert not synthesis_options("deepinversion", bn_scale=0.0).needs_class_stats()
    assert not synthesis_options("deepinversion", class_stats=False).needs_class_stats()
    assert synthesis_options("generator").needs_class_stats()
    assert not synthesis_options("public").needs_class_stats()


def test_a_new_module_in_the_package_is_discovered(tmp_path, monkeypatch, restore_registries):
    """A synthesizer in a module nobody lists: discovery imports every module on the package's
    path (here one more folder of it)."""
    import fed_distill.synthesis as pkg
    from fed_distill.plugins import import_all

    (tmp_path / "zz_found.py").write_text(
        "from fed_distill.synthesis.base import Synthesizer\n"
        "from fed_distill.synthesis.registry import register_synthesizer\n\n"
        "@register_synthesizer('zz_found')\n"
        "class Found(Synthesizer):\n"
        "    def synthesize(self, student=None):\n"
        "        raise NotImplementedError\n"
    )
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    import_all(pkg.__name__, pkg.__path__, pkg.ENTRY_POINTS, "synthesizer")
    assert "zz_found" in pkg.list_synthesizers()
    assert compose_config(["synthesis=zz_found"]).synthesis.method == "zz_found"


def _registered() -> list[tuple[str, str]]:
    from fed_distill.data.partition import list_partitions
    from fed_distill.data.sources import list_datasets
    from fed_distill.federated.rules import list_rules
    from fed_distill.models import list_models

    kinds = {
        "synthesizer": list_synthesizers(),
        "consensus rule": list_rules(),
        "partition": list_partitions(),
        "dataset": list_datasets(),
        "model": list_models(),
    }
    return [(kind, name) for kind, names in kinds.items() for name in names]


@pytest.mark.parametrize("kind, name", _registered(), ids=lambda v: str(v))
def test_readme_or_docs_name_every_registered_component(kind, name):
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    text = "\n".join(
        p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    )
    assert re.search(rf"`[^`\n]*\b{re.escape(name)}\b[^`\n]*`", text), (
        f"the {kind} {name!r} is registered but neither README.md nor docs/ name it (in code"
        " quotes): add its docs line (docs/architecture.md, 'Registered today')"
    )


def test_help_lists_every_registered_choice(capsys):
    from fed_distill.cli import main
    from fed_distill.federated.rules import list_rules

    assert main(["oneshot", "--help"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("synthesis="))
    assert all(m in line for m in list_synthesizers())
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("fedmd.aggregate="))
    assert line.strip() == "fedmd.aggregate=" + ", ".join(list_rules())
