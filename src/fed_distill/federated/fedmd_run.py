"""``fed-distill fedmd``: FedMD in one process, phase by phase.

The phases — transfer learning, baselines (pooled upper bound, alone-extended control), the
collaboration rounds and the results — each a function over one :class:`RunState`, which is
also what a checkpoint holds: a run killed at any point continues from
``run_dir/checkpoints/fedmd.safetensors`` (written after every party's transfer learning and
baselines, and every ``fedmd.checkpoint_every`` rounds). The protocol steps themselves are the
plain functions of :mod:`fed_distill.federated.fedmd`, which the Flower runner calls too.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fed_distill.artifacts import save_checkpoint
from fed_distill.errors import ConfigError
from fed_distill.federated.config import (
    FedMDConfig,
    check_fedmd_config,
    check_preset_for_fedmd,
    fedmd_config,
    private_split_params,
    split_of,
)
from fed_distill.federated.fedmd import (
    Party,
    build_party_model,
    local_round,
    party_architectures,
    party_report,
    restricted_accuracy,
    step_seed,
)
from fed_distill.federated.fedmd_baselines import alone_extended, pooled_baseline, transfer_learning
from fed_distill.federated.fedmd_consensus import get_rule
from fed_distill.federated.fedmd_data import FedMDData, build_fedmd_data
from fed_distill.federated.fedmd_results import plot_fedmd, summary_table
from fed_distill.federated.fedmd_server import (
    collect_scores,
    consensus_distance,
    consensus_of,
    draw_public_subset,
    record_consensus,
    round_consensus,
)
from fed_distill.federated.rules import all_rule_params
from fed_distill.tracking import log_scalars


@dataclass
class RunState:
    """Everything a FedMD run has computed so far: what a checkpoint saves and restores."""

    models: list[torch.nn.Module] = field(default_factory=list)
    transfer: list[dict[str, Any]] = field(default_factory=list)
    ensemble: list[float] = field(default_factory=list)
    pooled: list[float | None] = field(default_factory=list)
    extended: list[float | None] = field(default_factory=list)
    party_acc: list[list[float]] = field(default_factory=list)
    party_acc_digest: list[list[float]] = field(default_factory=list)  # per round, before revisit
    distances: list[list[float | None]] = field(default_factory=list)
    consensus_acc: list[float | None] = field(default_factory=list)  # per round, all known labels
    consensus_private_acc: list[float | None] = field(default_factory=list)  # private classes
    left_out: list[list[dict[str, Any]]] = field(default_factory=list)
    round_times: list[float] = field(default_factory=list)
    steps: dict[str, float] = field(
        default_factory=lambda: {
            "communicate": 0.0,
            "aggregate": 0.0,
            "digest": 0.0,
            "revisit": 0.0,
            "evaluate": 0.0,
        }
    )
    done: dict[str, int] = field(
        default_factory=lambda: {"transfer": 0, "pooled": 0, "extended": 0, "rounds": 0}
    )
    stage_times: dict[str, float] = field(default_factory=dict)
    t_start: float = 0.0


@dataclass
class FedMDRun:
    """What the phases share: the settings, the data and where the checkpoint goes."""

    c: FedMDConfig
    data: FedMDData
    archs: list[str]
    names: list[str]
    device: torch.device
    seed: int
    show: bool  # progress bars
    ckpt_path: Path
    meta: dict[str, Any]

    def party(self, i: int) -> Party:
        """Party ``i`` of this run (what its steps need besides its model)."""
        return Party(i, self.data, self.c, self.device, self.seed)

    def new_model(self, i: int) -> torch.nn.Module:
        """Party ``i``'s model as first built (the same seed in every runner)."""
        return build_party_model(
            self.archs[i], self.data, self.c.width_scale, seed=step_seed(self.seed, i, 0)
        )


# ============================================================================ checkpointing


def save_state(run: FedMDRun, st: RunState) -> None:
    """Checkpoint the run so far (nothing when ``fedmd.checkpoint_every`` is 0)."""
    if run.c.checkpoint_every <= 0:
        return
    state = {
        "meta": run.meta,
        "done": st.done,
        "models": [m.state_dict() for m in st.models],
        "transfer": st.transfer,
        "ensemble": st.ensemble,
        "pooled": st.pooled,
        "extended": st.extended,
        "party_acc": st.party_acc,
        "party_acc_digest": st.party_acc_digest,
        "distances": st.distances,
        "consensus_acc": st.consensus_acc,
        "consensus_private_acc": st.consensus_private_acc,
        "left_out": st.left_out,
        "round_times": st.round_times,
        "steps": st.steps,
        "stage_times": st.stage_times,
        "elapsed": time.perf_counter() - st.t_start,
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(state, run.ckpt_path)


def restore_state(run: FedMDRun, st: RunState) -> None:
    """Continue from the checkpoint when one matches this run's settings."""
    from fed_distill.train.fit import load_resumable

    every = run.c.checkpoint_every
    ckpt = load_resumable(run.ckpt_path if every > 0 else None, run.meta, "fedmd")
    if ckpt is None:
        return
    for i, state in enumerate(ckpt["models"]):
        m = run.new_model(i)
        m.load_state_dict(state)
        st.models.append(m.to(run.device))
    st.transfer, st.ensemble = ckpt["transfer"], ckpt["ensemble"]
    st.pooled, st.extended, st.party_acc = ckpt["pooled"], ckpt["extended"], ckpt["party_acc"]
    st.distances, st.left_out = ckpt["distances"], ckpt["left_out"]
    st.party_acc_digest = ckpt.get("party_acc_digest", [])
    st.consensus_acc = ckpt.get("consensus_acc", [None] * len(st.distances))
    st.consensus_private_acc = ckpt.get("consensus_private_acc", [None] * len(st.distances))
    st.round_times, st.steps, st.done = ckpt["round_times"], ckpt["steps"], ckpt["done"]
    st.stage_times = {**ckpt["stage_times"], "data": st.stage_times["data"]}
    st.t_start -= ckpt["elapsed"]
    torch.set_rng_state(ckpt["rng"])
    done = st.done
    print(
        f"fedmd: resuming after {done['transfer']}/{len(run.archs)} parties' transfer learning,"
        f" {done['pooled']} pooled and {done['extended']} extended baselines,"
        f" {done['rounds']}/{run.c.rounds} rounds (checkpoint {run.ckpt_path})"
    )


def _finished(run_dir: Path, fp: str, ckpt_path: Path, force: bool) -> dict[str, Any] | None:
    """A finished run's results when its fingerprint matches (the run is not redone)."""
    from fed_distill.artifacts import load_json, remove_file

    if force:
        remove_file(ckpt_path)
        return None
    if not (run_dir / "results.json").is_file():
        return None
    old = load_json(run_dir / "results.json", "results.json")
    if not (isinstance(old, dict) and old.get("fingerprint") == fp):
        return None
    print(
        f"fedmd already finished (mean accuracy {old['mean_acc'][0]:.4f} alone ->"
        f" {old['mean_acc'][-1]:.4f} after {old['rounds']} rounds, {run_dir / 'results.json'});"
        " force=true to redo"
    )
    if not (run_dir / "fedmd_accuracy.png").is_file():  # killed just before the plot
        plot_fedmd(old, run_dir / "fedmd_accuracy.png")
    return old


# ============================================================================ the phases


def _add_time(st: RunState, stage: str, t0: float) -> None:
    st.stage_times[stage] = st.stage_times.get(stage, 0.0) + time.perf_counter() - t0


def transfer_phase(run: FedMDRun, st: RunState) -> None:
    """Every party's transfer learning (public, then private data): the "alone" models."""
    t0 = time.perf_counter()
    for i in range(len(run.archs)):
        if i < st.done["transfer"]:
            continue  # restored from the checkpoint
        m = run.new_model(i).to(run.device)
        tr = transfer_learning(m, run.party(i), progress=run.show)
        print(
            f"{run.names[i]}: public val {tr['public_val_acc']:.4f} "
            f"({tr['public_epochs_run']} epochs), private test after public "
            f"{tr['private_acc_after_public']:.4f}, alone {tr['alone_acc']:.4f}"
        )
        st.models.append(m)
        st.transfer.append(tr)
        st.done["transfer"] = i + 1
        save_state(run, st)
    _add_time(st, "transfer_learning", t0)
    # diagnostic: the mean-logit ensemble of the parties on the private test task, per round
    if not st.ensemble:
        data = run.data
        st.ensemble = [
            restricted_accuracy(
                torch.stack([tr.pop("test_logits") for tr in st.transfer]).mean(0),
                data.test_y,
                data.offset,
                data.num_private,
            )
        ]


def baselines_phase(run: FedMDRun, st: RunState) -> None:
    """Pooled (each architecture on all private data: the upper bound) and alone extended (each
    alone model trained on as many more private epochs as the rounds give: the control)."""
    c = run.c
    t0 = time.perf_counter()
    if c.pooled:
        for i in range(len(run.archs)):
            if i < st.done["pooled"]:
                continue
            m = run.new_model(i)
            m.load_state_dict(st.transfer[i]["public_state"])
            st.pooled[i] = pooled_baseline(m.to(run.device), run.party(i))
            del m
            st.done["pooled"] = i + 1
            save_state(run, st)
    _add_time(st, "pooled", t0)
    t0 = time.perf_counter()
    if c.extended_alone and c.rounds * c.revisit_epochs > 0:
        for i in range(len(run.archs)):
            if i < st.done["extended"]:
                continue
            st.extended[i] = alone_extended(copy.deepcopy(st.models[i]), run.party(i))
            st.done["extended"] = i + 1
            save_state(run, st)
    _add_time(st, "alone_extended", t0)
    for transfer_result in st.transfer:
        transfer_result.pop("public_state", None)


def one_round(run: FedMDRun, st: RunState, r: int) -> list[dict[str, Any]]:
    """Round ``r``: draw, communicate, aggregate, distribute, digest, revisit, evaluate.
    Returns the parties left out of the consensus."""
    c, data, models = run.c, run.data, st.models
    idx = torch.as_tensor(draw_public_subset(data.public_y, c.public_subset_size, run.seed, r))
    subset_x = data.public_x[idx]

    t0 = time.perf_counter()
    sends = get_rule(c.aggregate).sends
    messages = [party_report(m, run.party(i), subset_x, sends) for i, m in enumerate(models)]
    st.steps["communicate"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    expected = (len(idx), data.num_outputs)
    valid, used, left_out = collect_scores(
        messages, expected, run.names, c.on_invalid_scores, sends
    )
    consensus = round_consensus(consensus_of(valid, c, used), c, data, idx)
    dist: list[float | None] = [None] * len(models)
    for i, rep in zip(used, valid, strict=True):
        dist[i] = consensus_distance(rep["scores"], consensus)
    st.distances.append(dist)
    st.left_out.append(left_out)
    record_consensus(st, consensus, data, idx)
    st.steps["aggregate"] += time.perf_counter() - t0

    logit_sum = torch.zeros(len(data.test_y), data.num_outputs)
    for i, m in enumerate(models):
        logits, digest_acc, times = local_round(m, run.party(i), subset_x, consensus, r)
        st.party_acc[i].append(
            restricted_accuracy(logits, data.test_y, data.offset, data.num_private)
        )
        st.party_acc_digest[i].append(digest_acc)
        logit_sum += logits
        for step, seconds in times.items():
            st.steps[step] += seconds
    st.ensemble.append(
        restricted_accuracy(logit_sum / len(models), data.test_y, data.offset, data.num_private)
    )
    return left_out


def _log_round(st: RunState, r: int) -> float:
    """Round ``r``'s accuracies to the logger (logger=tensorboard); returns their mean."""
    mean_now = float(np.mean([a[-1] for a in st.party_acc]))
    row = {"mean_acc": mean_now, "round_s": st.round_times[-1] if r > 0 else None}
    if st.ensemble:
        row["ensemble_acc"] = st.ensemble[-1]
    log_scalars("fedmd", row, r)
    for i, acc in enumerate(st.party_acc):
        log_scalars(f"party_{i}", {"private_acc": acc[-1]}, r)
    return mean_now


def rounds_phase(run: FedMDRun, st: RunState, alone: list[float]) -> None:
    """The collaboration rounds still to run, with a checkpoint every ``checkpoint_every``."""
    from fed_distill.utils import progress_bar

    c, every = run.c, run.c.checkpoint_every
    if not st.party_acc:
        st.party_acc = [[a] for a in alone]
    if not st.party_acc_digest:  # a fresh run, or a checkpoint from before the key: None there
        st.party_acc_digest = [[None] * st.done["rounds"] for _ in alone]
    if st.done["rounds"] == 0:
        _log_round(st, 0)
    bar = progress_bar(
        range(st.done["rounds"] + 1, c.rounds + 1), desc="fedmd rounds", enabled=run.show
    )
    for r in bar:
        t_round = time.perf_counter()
        left_out = one_round(run, st, r)
        st.round_times.append(time.perf_counter() - t_round)
        mean_now = _log_round(st, r)
        bar.set_postfix(mean_acc=f"{mean_now:.4f}")
        if not run.show:
            print(
                f"round {r}/{c.rounds}: mean private accuracy {mean_now:.4f} "
                f"(alone {np.mean(alone):.4f}), {st.round_times[-1]:.1f}s"
                + (f", left out {[d['party'] for d in left_out]}" if left_out else "")
            )
        st.done["rounds"] = r
        if every > 0 and r % every == 0 and r < c.rounds:
            save_state(run, st)
    bar.close()
    st.stage_times["rounds"] = float(sum(st.round_times))


def results_of(
    run: FedMDRun, st: RunState, alone: list[float], cfg: DictConfig, fp: str
) -> dict[str, Any]:
    """The run's ``results.json`` content."""
    from fed_distill.config import to_container

    c, party_acc, transfer = run.c, st.party_acc, st.transfer
    final = [a[-1] for a in party_acc]
    return {
        "rounds": c.rounds,
        "parties": run.archs,
        "party_acc": party_acc,
        "party_acc_digest": st.party_acc_digest,
        "alone_acc": alone,
        "pooled_acc": st.pooled,
        "alone_extended_acc": st.extended,
        "final_acc": final,
        "mean_acc": [float(np.mean([a[r] for a in party_acc])) for r in range(c.rounds + 1)],
        "mean_gain": float(np.mean(final) - np.mean(alone)),
        "ensemble_acc": st.ensemble,
        "public_val_acc": [tr["public_val_acc"] for tr in transfer],
        "private_acc_after_public": [tr["private_acc_after_public"] for tr in transfer],
        "consensus_distance": st.distances,
        "consensus_acc": st.consensus_acc,
        "consensus_private_acc": st.consensus_private_acc,
        "left_out": st.left_out,
        "wall_time_s": time.perf_counter() - st.t_start,
        "round_times_s": st.round_times,
        "step_times_s": st.steps,
        "stage_times_s": st.stage_times,
        "device": str(run.device),
        "data": run.data.summary(),
        "preset": c.name,
        "config": {k: v for k, v in to_container(cfg).items() if not str(k).startswith("_")},
        "fingerprint": fp,
    }


def _print_data(run: FedMDRun) -> None:
    c, data = run.c, run.data
    print(
        f"fedmd '{c.name}': {len(run.archs)} parties; public {c.public} ({len(data.public_y)} train,"
        f" {len(data.public_val_y)} val, {len(data.public_names)} classes); private {c.private}"
        f" ({c.partition}, {sum(len(y) for y in data.private_y)} images in all, "
        f"{data.num_private} classes at outputs {data.offset}..{data.offset + data.num_private - 1}"
        f" of {data.num_outputs}); test {len(data.test_y)} images; device {run.device}"
    )


# ============================================================================ the runner


def start_run(cfg: DictConfig) -> tuple[FedMDRun | None, RunState, dict[str, Any] | None]:
    """Check the config, build the data and restore a checkpoint: the run, its state so far
    and None; or None, an empty state and the results when the same run is already done."""
    from fed_distill.pipeline import _fingerprint, checkpoint_dir
    from fed_distill.utils import progress_bar, resolve_device, seed_everything

    st = RunState(t_start=time.perf_counter())
    check_preset_for_fedmd(cfg)
    c: FedMDConfig = fedmd_config(cfg.fedmd)
    split = split_of(cfg)
    check_fedmd_config(c, split)
    if c.data_dir is None and cfg.get("dataset") is not None and cfg.dataset.get("data_dir"):
        c.data_dir = str(cfg.dataset.data_dir)  # dataset.data_dir=DIR works here too
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)
    probe = progress_bar([], enabled=bool(cfg.progress))
    show = not probe.disable  # progress bars on interactive terminals only
    probe.close()
    run_dir = Path(str(cfg.run_dir))
    archs = party_architectures(c)
    # A finished run with the same settings is not redone; an interrupted one continues from
    # its checkpoint. force=true starts afresh.
    shaped: dict[str, Any] = {
        "fedmd": {k: v for k, v in asdict(c).items() if k != "checkpoint_every"},
        "seed": seed,
    }
    if (params := private_split_params(c, split)) is not None:  # only then: older runs keep theirs
        shaped["split"] = params
    fp = _fingerprint(shaped)
    ckpt_path = checkpoint_dir(run_dir) / "fedmd.safetensors"
    names = [f"party {i} ({a})" for i, a in enumerate(archs)]
    old = _finished(run_dir, fp, ckpt_path, bool(cfg.force))
    if old is not None:
        return None, st, old
    seed_everything(seed)

    t0 = time.perf_counter()
    data = build_fedmd_data(c, len(archs), seed, split)
    st.stage_times["data"] = time.perf_counter() - t0
    run = FedMDRun(c, data, archs, names, device, seed, show, ckpt_path, {"fingerprint": fp})
    _print_data(run)
    st.pooled, st.extended = [None] * len(archs), [None] * len(archs)
    restore_state(run, st)
    return run, st, None


def finish_run(run: FedMDRun, st: RunState, cfg: DictConfig) -> dict[str, Any]:
    """Save the parties' models, ``results.json`` and the figure; remove the checkpoint."""
    from fed_distill.artifacts import remove_file, save_json, save_weights

    run_dir = Path(str(cfg.run_dir))
    if run.c.save_models:
        for i, m in enumerate(st.models):
            save_weights(m, run_dir / "parties" / f"party_{i}.safetensors", {"arch": run.archs[i]})
    alone = [tr["alone_acc"] for tr in st.transfer]
    results = results_of(run, st, alone, cfg, run.meta["fingerprint"])
    save_json(results, run_dir / "results.json")
    remove_file(run.ckpt_path)
    plot_fedmd(results, run_dir / "fedmd_accuracy.png")
    print(summary_table(results))
    print(f"results in {run_dir / 'results.json'}, figure {run_dir / 'fedmd_accuracy.png'}")
    return results


def run_fedmd(cfg: DictConfig) -> dict[str, Any]:
    """``fed-distill fedmd``: transfer learning, R rounds of FedMD, alone and pooled baselines.

    Writes ``run_dir/results.json`` (``rounds``, ``party_acc`` [per party, rounds+1 values,
    round 0 = after transfer learning], ``party_acc_digest`` [per party, rounds values, each
    right after that round's digest, before its revisit], ``alone_acc``, ``pooled_acc``, ``alone_extended_acc``,
    ``wall_time_s``, ``round_times_s``, ``parties``, per-round ``consensus_distance``,
    ``consensus_acc`` and ``left_out`` parties, the resolved ``config``) and
    ``run_dir/fedmd_accuracy.png``.
    Presets: ``fedmd=quick|fashion|fashion_same_domain|mnist_femnist_balanced|...``.
    """
    run, st, old = start_run(cfg)
    if run is None:
        return old
    transfer_phase(run, st)
    baselines_phase(run, st)
    rounds_phase(run, st, [tr["alone_acc"] for tr in st.transfer])
    return finish_run(run, st, cfg)


# Settings that only change the rounds: runs that differ in nothing else share the data,
# transfer learning and baselines (branch_rounds).
ROUND_ONLY = (
    "name",
    "aggregate",  # and every rule's options (rules.all_rule_params)
    "sharpen",
    "oracle_consensus",
    "scores",
    "temperature",
    "digest_loss",
    "digest_epochs",
    "digest_batch_size",
    "revisit_outputs",
    "final_revisit",
    "on_invalid_scores",
    "checkpoint_every",
)


def round_only_keys() -> set[str]:
    """The fedmd keys that change only the rounds: :data:`ROUND_ONLY` and every registered
    rule's options."""
    return {*ROUND_ONLY, *all_rule_params()}


def setup_run(cfg: DictConfig) -> tuple[FedMDRun, RunState]:
    """Transfer learning and the baselines of ``cfg``, in memory (no checkpoint, nothing
    written): the common start :func:`branch_rounds` continues from."""
    run, st, _ = start_run(cfg)
    if run is None:
        raise ConfigError("setup_run: run_dir holds this run's results already; use force=true")
    transfer_phase(run, st)
    baselines_phase(run, st)
    st.stage_times["setup"] = time.perf_counter() - st.t_start
    return run, st


def branch_rounds(base: tuple[FedMDRun, RunState], cfg: DictConfig) -> dict[str, Any]:
    """The rounds of ``cfg`` from a copy of ``base`` (:func:`setup_run`): the very parties and
    baselines, so rules differ only in their rounds. ``cfg`` may differ from the base's only
    in :data:`ROUND_ONLY` keys. Writes and returns ``cfg.run_dir``'s results like a run."""
    from fed_distill.pipeline import _fingerprint

    run0, st0 = base
    c: FedMDConfig = fedmd_config(cfg.fedmd)
    check_fedmd_config(c, split_of(cfg))
    c.data_dir = run0.c.data_dir
    a, b = asdict(run0.c), asdict(c)
    round_only = round_only_keys()
    differ = sorted(k for k in a if a[k] != b[k] and k not in round_only)
    if differ or int(cfg.seed) != run0.seed:
        raise ConfigError(f"branch_rounds: the runs differ in more than the rounds: {differ}")
    shaped = {"fedmd": {k: v for k, v in b.items() if k != "checkpoint_every"}, "seed": run0.seed}
    if (params := private_split_params(c, split_of(cfg))) is not None:
        shaped["split"] = params
    meta = {"fingerprint": _fingerprint(shaped)}
    ckpt = run0.ckpt_path.parent / "unused.safetensors"
    d = run0
    run = FedMDRun(c, d.data, d.archs, d.names, d.device, d.seed, d.show, ckpt, meta)
    st = copy.deepcopy(st0)
    st.t_start = time.perf_counter() - st0.stage_times["setup"]
    c.checkpoint_every = 0
    rounds_phase(run, st, [tr["alone_acc"] for tr in st.transfer])
    return finish_run(run, st, cfg)
