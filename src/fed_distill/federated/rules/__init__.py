"""FedMD's consensus rules (``fedmd.aggregate=NAME``), one registry (``registry.py``) and the
built-in rules in the modules of this package: ``average.py`` (mean, median, trimmed_mean),
``coupling.py`` (coupling) and ``weighted.py`` (confidence, class_share, reliability). A new rule is one new module here (found
without being listed: this package imports every module of its own, and every
``fed_distill.rules`` entry point of the installed packages, the first time the registry is
asked for), or ``fed_distill.register_rule`` from Python."""

from __future__ import annotations

from fed_distill.plugins import registry_access

ENTRY_POINTS = "fed_distill.rules"
_REGISTRY_NAMES = (
    "Inputs",
    "Rule",
    "RuleOptions",
    "all_rule_params",
    "check_rule_keys",
    "get_rule",
    "list_rules",
    "register_rule",
    "rule_options",
)
__all__ = ["discover", *_REGISTRY_NAMES]

# discover(): import every module of this package and every fed_distill.rules entry point once
# (each registers the rules it defines)
discover, __getattr__ = registry_access(
    __name__, __path__, ENTRY_POINTS, "consensus-rule", _REGISTRY_NAMES
)
