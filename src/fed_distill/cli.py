"""``fed-distill STAGE [hydra overrides…]`` — one command for every stage.

Errors a user can fix (bad config, missing data, malformed files) are printed as one line
starting with ``error:`` and exit with status 1; nothing earlier in ``run_dir`` is touched.
"""

from __future__ import annotations

import os
import sys
import time

# The stages and the functions behind them live in the Python API (fed_distill.api).
from fed_distill.api import STAGES, stage_function

USAGE = """usage: fed-distill STAGE [key=value ...] [--cfg] [--multirun]
       fed-distill data info|fetch NAME [data_dir=DIR]
       fed-distill report RUN_DIR
       fed-distill compare PATH... [--by KEY,...] --out DIR
       fed-distill models
       fed-distill flower oneshot|fedmd [--mode simulation|deployment] [key=value ...]

Stages:
{stages}

Common keys: dataset=NAME split=NAME split.num_clients=N split.alpha=A model=NAME seed=N
             run_dir=PATH device=auto|cpu|cuda train.epochs=N  (`fed-distill STAGE --cfg` shows all)
Examples:
  fed-distill split dataset=digits split=dirichlet split.alpha=0.3 split.num_clients=7 seed=3 run_dir=runs/d
  fed-distill train-teachers run_dir=runs/d
  fed-distill split --multirun seed=1,2,3 'run_dir=runs/s${{seed}}'
"""


def _usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in STAGES.items()]
    lines.append(f"  {'data'.ljust(width)}  inspect or fetch a dataset (info NAME | fetch NAME)")
    lines.append(
        f"  {'report'.ljust(width)}  report.md with figures for a run folder (report RUN_DIR)"
    )
    lines.append(
        f"  {'compare'.ljust(width)}  runs side by side, mean ± std over seeds (compare PATH... --out DIR)"
    )
    lines.append(f"  {'models'.ljust(width)}  list the registered model architectures")
    lines.append(
        f"  {'flower'.ljust(width)}  oneshot|fedmd on Flower (simulation or real processes)"
    )
    return USAGE.format(stages="\n".join(lines))


def run_stage(stage: str, overrides: list[str]) -> None:
    """Compose the config and run one stage in this process (``fed_distill.run`` without the
    return value), then print the stage's summary."""
    from fed_distill.api import compose, execute
    from fed_distill.report import stage_summary

    cfg = compose(stage, overrides)
    execute(stage, cfg)
    summary = stage_summary(stage, cfg.run_dir)
    if summary:
        print(summary)


def _multirun(stage: str, overrides: list[str]) -> int:
    """Hydra's own sweeper: ``key=a,b`` runs the stage once per value. A job whose config or
    inputs are bad prints one ``error:`` line naming its overrides; the other jobs still run,
    and the exit status is 1 if any job failed."""
    import hydra

    from fed_distill.api import execute, mark_explicit
    from fed_distill.config import register_configs
    from fed_distill.errors import FedDistillError

    register_configs()
    failed: list[str] = []
    swept = _check_sweep(overrides)

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        job_overrides = list(HydraConfig.get().overrides.task)
        label = _job_label(job_overrides, swept)
        try:
            execute(stage, mark_explicit(cfg, job_overrides))
        except FedDistillError as e:
            print(f"error: job {label}: {e}", file=sys.stderr)
            failed.append(label)

    sys.argv = [
        "fed-distill",
        "--multirun",
        *overrides,
        "hydra.output_subdir=null",
        "hydra/job_logging=disabled",
        "hydra/hydra_logging=disabled",
    ]
    task()
    return 1 if failed else 0


def _check_sweep(overrides: list[str]) -> set[str]:
    """Compose every job's config of a sweep before any job runs: a value that is not even a
    config (wrong type, unknown key) stops the sweep with one line. Returns the swept keys."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fed_distill.config import compose_config, describe_config_error
    from fed_distill.errors import ConfigError

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as e:  # noqa: BLE001 - Hydra's parser errors: all are config errors
        raise ConfigError(describe_config_error(e)) from None
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    for job in jobs:
        try:
            compose_config([o for o in job if not o.lstrip("+~").startswith("hydra")])
        except ConfigError as e:
            raise ConfigError(f"job {_job_label(job, swept)}: {e}; no job was run") from None
    return swept


def _job_label(job: list[str], swept: set[str]) -> str:
    """The swept ``key=value`` pairs that tell one job of a sweep from the others."""
    picked = [o for o in job if o.split("=", 1)[0].lstrip("+~") in swept]
    return " ".join(picked or job)


def _data_command(args: list[str]) -> None:
    from fed_distill.data.sources import dataset_info, fetch_dataset, find_dataset_dir, load_dataset
    from fed_distill.errors import ConfigError

    if len(args) < 2 or args[0] not in ("info", "fetch"):
        raise ConfigError("usage: fed-distill data info|fetch NAME [data_dir=DIR]")
    action, name = args[0], args[1]
    data_dir = None
    for a in args[2:]:
        key, _, value = a.partition("=")
        if key not in ("data_dir", "dataset.data_dir"):
            raise ConfigError(f"fed-distill data: unknown option '{a}' (only data_dir=DIR)")
        data_dir = value
    if action == "fetch":
        where = fetch_dataset(name, data_dir)
        print(f"{name}: files ready in {where}")
        return
    info = dataset_info(name)
    print(f"name:       {info.name}")
    print(
        f"classes:    {info.num_classes} ({', '.join(info.class_names[:12])}{' …' if info.num_classes > 12 else ''})"
    )
    print(
        f"images:     {info.channels} x {info.image_size} x {info.image_size}, horizontal flip {'ok' if info.hflip else 'off'}"
    )
    print(
        f"mean / std: {tuple(round(m, 4) for m in info.mean)} / {tuple(round(s, 4) for s in info.std)}"
    )
    where = find_dataset_dir(name, data_dir)
    print(
        f"files:      {where if where else 'not found locally (run `fed-distill data fetch ' + name + '`)'}"
    )
    if where is not None or name in ("digits", "mnist5k"):
        t0 = time.perf_counter()
        data = load_dataset(name, data_dir=data_dir, download=False)
        print(
            f"samples:    {len(data.train_y)} train / {len(data.test_y)} test (loaded in {time.perf_counter() - t0:.1f}s)"
        )


def _flower_command(args: list[str]) -> None:
    """``fed-distill flower oneshot|fedmd [flags] [overrides]`` (needs fed-distill[flower])."""
    from fed_distill.federated.flower import require_flower

    if any(a in ("-h", "--help") for a in args):
        from fed_distill.federated.flower import runner

        print(runner.__doc__)
        print(runner.parse_args.__doc__)
        return
    require_flower()
    from fed_distill.federated.flower.runner import parse_args, run_flower

    protocol, opts, overrides = parse_args(args)
    run_flower(protocol, overrides, opts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    from fed_distill.errors import FedDistillError

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fed_distill import __version__

        print(f"fed-distill {__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    try:
        if stage == "data":
            _data_command(rest)
            return 0
        if stage == "report":
            from fed_distill.report import run_report

            run_report(rest)
            return 0
        if stage == "compare":
            from fed_distill.compare import run_compare

            run_compare(rest)
            return 0
        if stage == "flower":
            _flower_command(rest)
            return 0
        if stage == "models":
            from fed_distill.models import list_models

            print("\n".join(list_models()))
            return 0
        if stage not in STAGES:
            print(
                f"error: unknown stage '{stage}'; choose one of: {', '.join([*STAGES, 'data', 'report', 'compare', 'models', 'flower'])}",
                file=sys.stderr,
            )
            return 2
        if any(a in ("-h", "--help") for a in rest):
            print(f"fed-distill {stage}: {STAGES[stage][1]}\n")
            print((stage_function(stage).__doc__ or "").strip())
            from fed_distill.config import choices_comment

            print("\nAll keys with their defaults: fed-distill " + stage + " --cfg; the choices:")
            print(choices_comment().replace("# ", "  "))
            return 0
        if "--cfg" in rest:
            from omegaconf import OmegaConf

            from fed_distill.config import choices_comment, compose_config, shown_config

            print(
                OmegaConf.to_yaml(shown_config(compose_config([a for a in rest if a != "--cfg"])))
            )
            print(choices_comment())
            return 0
        if "--multirun" in rest or "-m" in rest:
            return _multirun(stage, [a for a in rest if a not in ("--multirun", "-m")])
        run_stage(stage, rest)
        return 0
    except FedDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted; finished artifacts in run_dir are kept, rerun the same command to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
