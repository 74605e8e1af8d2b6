"""The Flower ``ClientApp``: one party (FedMD) or one client (one-shot) of the federation.

The node's partition (``node_config["partition-id"]``) says which party it is. Its model lives in
the node's ``context.state`` between messages (an ArrayRecord of the state dict), so the app
works whether Flower keeps it in one process (simulation) or starts a fresh ClientApp process
per message (SuperNode, subprocess isolation). The data is rebuilt deterministically from the
config the server sends, and cached per process.

Every computation is a function of ``federated/`` (transfer learning, class scores, digest,
revisit, local teacher training) called with the same per-party seeds as the in-process runner,
so a Flower run reproduces an in-process run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fed_distill.federated.flower import quiet_flower_env
from fed_distill.federated.flower.common import (
    CLASS_STATS_PREFIX,
    cfg_from_json,
    from_record,
    inject_fault,
    to_record,
)

quiet_flower_env()
app = ClientApp()

_CACHE: dict[str, Any] = {}  # per process: built data, keyed by what determines it


def _cached(key: str, build):
    if key not in _CACHE:
        _CACHE.clear()  # one run's data at a time
        _CACHE[key] = build()
    return _CACHE[key]


def _partition(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def _threads(cfg_rec: ConfigRecord) -> None:
    # The same intra-op thread count as the reference run: float reductions then match.
    n = int(cfg_rec.get("num_threads", 0) or 0)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _reply(msg: Message, arrays: dict[str, torch.Tensor] | None = None, **metrics: Any) -> Message:
    rd = RecordDict()
    if arrays:
        rd["arrays"] = to_record(arrays)
    rd["metrics"] = ConfigRecord(
        {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in metrics.items()}
    )
    return Message(rd, reply_to=msg)


def _fault(msg: Message) -> tuple[str, float]:
    cfg = msg.content["config"]
    return str(cfg.get("fault", "") or ""), float(cfg.get("fault_sleep", 0.0) or 0.0)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Which partition this node holds (the server maps nodes to parties with it)."""
    return _reply(msg, partition=_partition(context))


# ============================================================================ FedMD


def _fedmd(cfg_json: str):
    """(cfg, FedMDConfig, FedMDData, architectures, device) for this run, cached per process."""
    from fed_distill.federated.config import FedMDConfig, check_fedmd_config, fedmd_config, split_of
    from fed_distill.federated.fedmd import party_architectures
    from fed_distill.federated.fedmd_data import build_fedmd_data
    from fed_distill.utils import resolve_device

    def build():
        cfg = cfg_from_json(cfg_json)
        c: FedMDConfig = fedmd_config(cfg.fedmd, known_only=True)
        check_fedmd_config(c, split_of(cfg), consensus=False)  # the rule: the server's
        if c.data_dir is None and cfg.get("dataset") is not None and cfg.dataset.get("data_dir"):
            c.data_dir = str(cfg.dataset.data_dir)
        archs = party_architectures(c)
        data = build_fedmd_data(c, len(archs), int(cfg.seed), split_of(cfg))
        return cfg, c, data, archs, resolve_device(str(cfg.device))

    return _cached(cfg_json, build)


def _party_model(context: Context, party: int):
    from fed_distill.federated.fedmd import build_party_model, step_seed

    cfg, c, data, archs, device = _fedmd(str(context.state["run"]["cfg"]))
    m = build_party_model(
        archs[party], data, c.width_scale, seed=step_seed(int(cfg.seed), party, 0)
    )
    if "model" in context.state:
        m.load_state_dict(from_record(context.state["model"]))
    return m.to(device)


def _check_party(msg: Message, context: Context) -> int:
    party = int(msg.content["config"]["party"])
    if party != _partition(context):
        raise RuntimeError(f"message for party {party} reached partition {_partition(context)}")
    return party


@app.train("fedmd_setup")
def fedmd_setup(msg: Message, context: Context) -> Message:
    """Transfer learning (public, then private data) -> alone accuracy; optionally the local
    baselines: pooled (an oracle: needs every party's private data, simulation only) and
    alone-extended. The model stays in this node's state."""
    import copy

    from fed_distill.federated.fedmd import Party, build_party_model, step_seed
    from fed_distill.federated.fedmd_baselines import (
        alone_extended,
        pooled_baseline,
        transfer_learning,
    )

    conf = msg.content["config"]
    _threads(conf)
    context.state["run"] = ConfigRecord({"cfg": str(conf["cfg"])})
    party = _check_party(msg, context)
    cfg, c, data, archs, device = _fedmd(str(conf["cfg"]))
    seed = int(cfg.seed)
    t0 = time.perf_counter()
    m = build_party_model(archs[party], data, c.width_scale, seed=step_seed(seed, party, 0)).to(
        device
    )
    me = Party(party, data, c, device, seed)
    tr = transfer_learning(m, me)
    out: dict[str, Any] = {
        "public_val_acc": tr["public_val_acc"],
        "public_epochs_run": tr["public_epochs_run"],
        "private_acc_after_public": tr["private_acc_after_public"],
        "alone_acc": tr["alone_acc"],
        "transfer_s": time.perf_counter() - t0,
    }
    if bool(conf.get("pooled", False)):
        t0 = time.perf_counter()
        p = build_party_model(archs[party], data, c.width_scale, seed=step_seed(seed, party, 0))
        p.load_state_dict(tr["public_state"])
        out["pooled_acc"] = pooled_baseline(p.to(device), me)
        out["pooled_s"] = time.perf_counter() - t0
    if bool(conf.get("extended", False)):
        t0 = time.perf_counter()
        out["alone_extended_acc"] = alone_extended(copy.deepcopy(m), me)
        out["alone_extended_s"] = time.perf_counter() - t0
    context.state["model"] = to_record(m.state_dict())
    return _reply(msg, {"test_logits": tr["test_logits"]}, **out)


@dataclass
class _RoundStep:
    """What a round's message handler starts from: the message's config (its thread count set),
    the party (checked against this node), the run's config, FedMD options, data and device,
    the message's arrays and the party's model from this node's state."""

    conf: Any
    party: int
    cfg: Any
    c: Any
    data: Any
    device: torch.device
    arrays: dict[str, torch.Tensor]
    model: torch.nn.Module

    @classmethod
    def of(cls, msg: Message, context: Context) -> _RoundStep:
        conf = msg.content["config"]
        _threads(conf)
        party = _check_party(msg, context)
        cfg, c, data, _, device = _fedmd(str(context.state["run"]["cfg"]))
        arrays = from_record(msg.content["arrays"])
        return cls(conf, party, cfg, c, data, device, arrays, _party_model(context, party))


@app.query("fedmd_scores")
def fedmd_scores(msg: Message, context: Context) -> Message:
    """Communicate: class scores of the party's model on the public samples the server names,
    and what the consensus rule needs besides (:func:`~fed_distill.federated.fedmd.party_report`)."""
    from fed_distill.federated.fedmd import Party, party_report

    r = _RoundStep.of(msg, context)
    me = Party(r.party, r.data, r.c, r.device, int(r.cfg.seed))
    sends = [s for s in str(r.conf.get("sends", "")).split(",") if s]  # what the rule needs
    scores = party_report(r.model, me, r.data.public_x[r.arrays["idx"]], sends)
    kind, sleep_s = _fault(msg)
    if kind:
        inject_fault(kind, scores, sleep_s)
    return _reply(msg, scores)


@app.train("fedmd_round")
def fedmd_round(msg: Message, context: Context) -> Message:
    """Digest the consensus on the round's public subset, revisit the private data, evaluate
    (the private accuracy after digest, ``digest_acc``, and after revisit, ``acc``)."""
    from fed_distill.federated.fedmd import Party, local_round

    r = _RoundStep.of(msg, context)
    data = r.data
    me = Party(r.party, data, r.c, r.device, int(r.cfg.seed))
    subset_x, consensus = data.public_x[r.arrays["idx"]], r.arrays["consensus"]
    logits, digest_acc, times = local_round(r.model, me, subset_x, consensus, int(r.conf["round"]))
    context.state["model"] = to_record(r.model.state_dict())
    from fed_distill.federated.fedmd import restricted_accuracy

    acc = restricted_accuracy(logits, data.test_y, data.offset, data.num_private)
    timed = {f"{k}_s": v for k, v in times.items()}
    return _reply(msg, {"test_logits": logits}, acc=acc, digest_acc=digest_acc, **timed)


# ============================================================================ one-shot


def _check_client(conf: ConfigRecord, context: Context) -> int:
    client = int(conf["client"])
    if client != _partition(context):
        raise RuntimeError(f"message for client {client} reached partition {_partition(context)}")
    return client


def _client_data(cfg, conf: ConfigRecord):
    """The dataset the server names (built once per process)."""
    from fed_distill.config import DatasetConfig, as_object
    from fed_distill.pipeline import load_data

    options = json.loads(str(conf["dataset_options"]))
    ds_cfg = as_object(cfg.dataset, DatasetConfig)
    ds_cfg.name = str(conf["dataset"])
    key = json.dumps([ds_cfg.name, ds_cfg.data_dir, options])
    return _cached(key, lambda: load_data(ds_cfg, options))


def _client_part(conf: ConfigRecord, arrays: dict[str, torch.Tensor]):
    """This client's part of the split, as the server sent it (popped from ``arrays``)."""
    from fed_distill.data.partition import ClientSplit

    return ClientSplit(
        train=arrays.pop("idx_train").tolist(),
        val=arrays.pop("idx_val").tolist(),
        test=arrays.pop("idx_test").tolist(),
        train_class_counts=json.loads(str(conf["train_class_counts"])),
        features=json.loads(str(conf.get("features", "{}"))),
    )


def _oneshot_message(msg: Message, context: Context):
    """What every one-shot message carries, unpacked on this client: its number (checked
    against the node's partition), the run's config, the dataset, its part of the split, the
    architecture it names and a model of it holding the weights sent."""
    from fed_distill.models import build_model

    conf = msg.content["config"]
    _threads(conf)
    client = _check_client(conf, context)
    cfg = cfg_from_json(str(conf["cfg"]))
    data = _client_data(cfg, conf)
    arrays = from_record(msg.content["arrays"])
    part = _client_part(conf, arrays)
    spec, info = json.loads(str(conf["spec"])), data.info
    model = build_model(
        spec["model"], info.num_classes, info.channels, info.image_size, **spec["model_kwargs"]
    )
    model.load_state_dict(arrays)
    return client, cfg, data, part, spec, model


@app.train("oneshot_teacher")
def oneshot_teacher(msg: Message, context: Context) -> Message:
    """Train this client's teacher once from the server's initial weights on its partition,
    and upload the weights with the training metrics."""
    from fed_distill.config import as_object
    from fed_distill.data.transforms import Normalizer
    from fed_distill.pipeline import client_class_stats, train_teacher
    from fed_distill.train.fit import TrainConfig
    from fed_distill.utils import resolve_device

    client, cfg, data, part, spec, model = _oneshot_message(msg, context)
    info = data.info
    tcfg = as_object(cfg.train, TrainConfig)
    hflip = info.hflip if tcfg.hflip is None else tcfg.hflip
    device = resolve_device(str(cfg.device))
    metrics = train_teacher(
        model,
        data,
        part,
        tcfg,
        Normalizer(info.mean, info.std),
        hflip=hflip,
        device=device,
        seed=int(cfg.seed) * 1000 + client,
        desc=f"teacher {client}",
        progress=False,
    )
    # the architecture beside the weights: the server checks it is the one it sent
    metrics.update(model=spec["model"], model_kwargs=spec["model_kwargs"])
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    upload = cfg.get("upload") or {}
    if upload.get("class_stats", True):
        # per-class BN input statistics on the client's labelled images (class_stats.py)
        t0 = time.perf_counter()
        norm = Normalizer(info.mean, info.std)
        features, pixels = bool(upload.get("features", False)), bool(upload.get("pixels", False))
        stats = client_class_stats(model, data, part, norm, device, features, pixels)
        metrics["class_stats_s"] = time.perf_counter() - t0
        weights.update({f"{CLASS_STATS_PREFIX}{k}": v for k, v in stats.items()})
    kind, sleep_s = _fault(msg)
    if kind:
        inject_fault(kind, weights, sleep_s)
    return _reply(msg, weights, metrics=metrics)


@app.query("oneshot_feature_stats")
def oneshot_feature_stats(msg: Message, context: Context) -> Message:
    """The statistics round (``refit=head``): run the distilled student the server sent over
    this client's labelled images and upload per-class sums of its features (refit.features)."""
    from fed_distill.config import as_object
    from fed_distill.data.transforms import Normalizer
    from fed_distill.federated.refit import client_feature_stats, round_info
    from fed_distill.federated.refit_config import RefitConfig
    from fed_distill.utils import resolve_device

    _, cfg, data, part, _, student = _oneshot_message(msg, context)
    info, conf = data.info, msg.content["config"]
    rcfg = as_object(cfg.refit, RefitConfig)
    device = resolve_device(str(cfg.device))
    norm = Normalizer(info.mean, info.std)
    stats = client_feature_stats(
        student.to(device), data, part, norm, device, rcfg, int(conf["noise_seed"])
    )
    kind, sleep_s = _fault(msg)
    if kind:
        inject_fault(kind, stats, sleep_s)
    return _reply(msg, stats, **round_info(cfg, rcfg, student))
