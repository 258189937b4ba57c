"""Flower ClientApp: a SuperNode hosts a cohort of users, or runs an attack's malicious clients.

Glue only. A `users` node (the default role) loads the data, keeps its partition (user u lives
on partition u mod num-partitions) and answers three messages: `query` with its population
(`population.hosted`: ids and counts, no history), `train` with `rounds.client_step` for its
sampled users (the simulator's own client half), `evaluate` with `metrics.rank_sums` over its
users (sums only). An `attacker` node (node config `role="attacker"`) loads no data: its `train`
runs `rounds.malicious_step` for the malicious ids it is sent, on the broadcast model and the
targets the experimenter names, exactly what the in-process simulator runs.
One message per node and round, not one per user.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fortress.data import load_data
from fortress.data.dataset import Dataset
from fortress.errors import InputError
from fortress.flower.common import from_run_config, population_record, role, sums_record
from fortress.metrics import rank_sums
from fortress.models import from_config
from fortress.population import hosted, partition
from fortress.rounds import client_step, malicious_step
from fortress.simulate import model_scorer, setup_torch
from fortress.wire import to_arrays

app = ClientApp()
_DATA: dict[tuple, Dataset] = {}            # a node process that lives across rounds loads once


def _node(context: Context):
    """(config, partition, number of partitions, dataset, seconds spent loading it) of a `users` node."""
    cfg, opts = from_run_config(dict(context.run_config))
    node = context.node_config
    part, n_part = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    spec = str(node.get("data", opts.data))             # a machine may keep the data elsewhere
    key = (spec, cfg.data_format, cfg.kcore, cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_len, cfg.synthetic_taste, cfg.seed)
    t0 = time.perf_counter()
    if key not in _DATA:
        _DATA[key] = load_data(spec, cfg)
    return cfg, part, n_part, _DATA[key], time.perf_counter() - t0


def _params(msg: Message) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(a.numpy()) for k, a in msg.content["params"].items()}


def _mine(users: np.ndarray, part: int, n_part: int) -> np.ndarray:
    foreign = users[users % n_part != part]
    if len(foreign):
        raise InputError(f"partition {part}/{n_part} was sent users it does not host, e.g. {int(foreign[0])}")
    return users


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's role and, for a `users` node, its population (item counts only if asked)."""
    if role(context.node_config) == "attacker":
        return Message(RecordDict({"node": ConfigRecord({"role": "attacker"})}), reply_to=msg)
    _, part, n_part, ds, _ = _node(context)
    counts = bool(msg.content["ask"]["item-counts"]) if "ask" in msg.content else False
    return Message(population_record(hosted(ds, partition(ds, part, n_part), counts)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this round's sampled clients here from the broadcast model; reply with their uploads."""
    cfg, _ = from_run_config(dict(context.run_config))
    setup_torch(cfg)
    params = _params(msg)
    task = msg.content["task"]
    r = int(task["round"])
    users = msg.content["users"]["users"].numpy().astype(np.int64)
    if role(context.node_config) == "attacker":          # sees the broadcast model and its own ids, nothing else
        n_items = params["item_emb"].shape[0] - 1
        targets = msg.content["targets"]["targets"].numpy().astype(np.int64).tolist()
        load_seconds, t0 = 0.0, time.perf_counter()
        got = malicious_step(cfg, from_config(cfg), params, n_items, targets, users, r)
    else:
        cfg, part, n_part, ds, load_seconds = _node(context)
        t0 = time.perf_counter()
        got = client_step(cfg, from_config(cfg), ds, params, _mine(users, part, n_part), r)
    train_seconds = time.perf_counter() - t0
    return Message(RecordDict({
        "updates": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in to_arrays(got.updates).items()}),
        "metrics": MetricRecord({"bytes": int(got.bytes), "clients": int(got.updates.n),
                                 "train-seconds": train_seconds, "load-seconds": load_seconds}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Full-ranking evaluation of the broadcast model over this node's users; reply with sums only."""
    if role(context.node_config) == "attacker":
        raise InputError("an attacker node hosts no users to evaluate")
    cfg, part, n_part, ds, load_seconds = _node(context)
    setup_torch(cfg)
    params = _params(msg)
    task = msg.content["task"]
    targets = msg.content["targets"]["targets"].numpy().astype(np.int64).tolist()
    t0 = time.perf_counter()
    sums = rank_sums(ds, model_scorer(from_config(cfg), params, ds), str(task["split"]), cfg.eval_batch,
                     targets or None, users=partition(ds, part, n_part))
    return Message(RecordDict({
        "sums": sums_record(sums),
        "metrics": MetricRecord({"eval-seconds": time.perf_counter() - t0, "load-seconds": load_seconds}),
    }), reply_to=msg)
