"""Flower ClientApp: a SuperNode hosts a cohort of users and trains the sampled ones vectorised.

Glue only: unpack the Message, call `rounds.client_step` (the simulator's own client half),
pack the uploads with `wire.to_arrays`. One message per node and round, not one per user.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fortress.data.dataset import Dataset
from fortress.errors import InputError
from fortress.data import load_data
from fortress.flower.common import from_run_config, hosted_users
from fortress.models import from_config
from fortress.rounds import client_step
from fortress.simulate import setup_torch
from fortress.wire import to_arrays

app = ClientApp()
_DATA: dict[tuple, Dataset] = {}            # a node process that lives across rounds loads once


def _node(context: Context):
    """(config, partition, number of partitions, dataset, seconds spent loading it) from the contexts."""
    cfg, opts = from_run_config(dict(context.run_config))
    node = context.node_config
    part, n_part = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    spec = str(node.get("data", opts.data))             # a machine may keep the data elsewhere
    key = (spec, cfg.data_format, cfg.kcore, cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_len, cfg.synthetic_taste, cfg.seed)
    t0 = time.perf_counter()
    if key not in _DATA:
        _DATA[key] = load_data(spec, cfg)
    return cfg, part, n_part, _DATA[key], time.perf_counter() - t0


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which users this node hosts."""
    _, part, n_part, ds, _ = _node(context)
    users = hosted_users(ds, part, n_part)
    return Message(RecordDict({
        "hosted": ArrayRecord({"users": Array(users.astype(np.int64))}),
        "node": ConfigRecord({"partition-id": part, "num-partitions": n_part}),
    }), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train this round's sampled users of the cohort from the broadcast model; reply with their uploads."""
    cfg, part, n_part, ds, load_seconds = _node(context)
    setup_torch(cfg)
    params = {k: torch.tensor(a.numpy()) for k, a in msg.content["params"].items()}
    r = int(msg.content["task"]["round"])
    users = msg.content["users"]["users"].numpy().astype(np.int64)
    foreign = users[users % n_part != part]
    if len(foreign):
        raise InputError(f"partition {part}/{n_part} was sent users it does not host, e.g. {int(foreign[0])}")
    t0 = time.perf_counter()
    got = client_step(cfg, from_config(cfg), ds, params, users, r)
    train_seconds = time.perf_counter() - t0
    return Message(RecordDict({
        "updates": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in to_arrays(got.updates).items()}),
        "metrics": MetricRecord({"bytes": int(got.bytes), "clients": int(got.updates.n),
                                 "train-seconds": train_seconds, "load-seconds": load_seconds}),
    }), reply_to=msg)
