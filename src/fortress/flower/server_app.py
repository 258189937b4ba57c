"""Flower ServerApp: the simulator's round loop with Flower messages as the transport.

Glue only: find the SuperNodes and the users they host, then hand `simulate.run` a transport
that sends each node the model and its sampled users and unpacks the replies. Sampling,
checks, aggregation, evaluation, checkpoints and `resume` are the in-process code itself.
A node that fails or misses `round-timeout` drops its users for that round; a reply that
cannot be read rejects all of that node's users, logged by client id.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fortress import simulate
from fortress.errors import InputError
from fortress.data import load_data
from fortress.flower.common import FlowerOptions, from_run_config, resolve_out
from fortress.rounds import Collected, dense_size
from fortress.updates import concat, empty
from fortress.wire import BadUpload, from_arrays

app = ServerApp()
log = logging.getLogger("fortress")


def discover(grid: Grid, opts: FlowerOptions) -> dict[int, np.ndarray]:
    """Wait for `min-nodes` SuperNodes, then ask each which users it hosts: node id -> users."""
    deadline = time.monotonic() + opts.node_timeout
    while len(list(grid.get_node_ids())) < opts.min_nodes:
        if time.monotonic() > deadline:
            raise InputError(f"only {len(list(grid.get_node_ids()))} of min-nodes={opts.min_nodes} SuperNodes "
                             f"connected within node-timeout={opts.node_timeout:g} s")
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    hosted, seen = {}, set()
    for reply in grid.send_and_receive(msgs, timeout=opts.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say which users it hosts (%s); leaving it out", node, reply.error.reason)
            continue
        users = np.asarray(reply.content["hosted"]["users"].numpy(), dtype=np.int64)
        dup = np.isin(users, list(seen))
        if dup.any():
            log.warning("node %d claims %d users another node hosts; ignoring those", node, int(dup.sum()))
        hosted[node] = users[~dup]
        seen.update(users.tolist())
    if not hosted:
        raise InputError("no SuperNode answered with the users it hosts")
    return hosted


class FlowerClients:
    """The round transport: one train message per node holding sampled users, replies parsed strictly."""

    def __init__(self, grid: Grid, hosted: dict[int, np.ndarray], timeout: float):
        self.grid, self.timeout = grid, timeout
        self.owner = {int(u): node for node, users in hosted.items() for u in users}

    def __call__(self, run: simulate.Run, r: int, users: np.ndarray) -> Collected:
        cfg, params = run.cfg, run.params
        if not len(users):                                 # a round of malicious clients only
            return Collected(empty(dense_size(params), cfg.dim, params["item_emb"].dtype))
        groups: dict[int, list[int]] = defaultdict(list)
        for u in users.tolist():
            groups[self.owner[u]].append(u)
        alive = set(self.grid.get_node_ids())              # nodes the SuperLink has seen go away are not waited for
        for node in [n for n in groups if n not in alive]:
            log.warning("round %d: node %d is offline; its %d clients dropped", r + 1, node, len(groups.pop(node)))
        model = ArrayRecord({k: Array(v.numpy()) for k, v in params.items()})
        msgs = [Message(RecordDict({"params": model, "task": ConfigRecord({"round": r}),
                                    "users": ArrayRecord({"users": Array(np.asarray(g, dtype=np.int64))})}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for node, g in groups.items()]
        replies = {rep.metadata.src_node_id: rep for rep in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        parts, rejected, nbytes, node_seconds = [], [], 0, [0.0, 0.0]
        for node in sorted(groups):                        # fixed order: aggregation does not depend on timing
            sent = groups[node]
            if node not in replies:
                log.warning("round %d: node %d sent no reply within %g s; its %d clients dropped",
                            r + 1, node, self.timeout, len(sent))
                continue
            rep = replies[node]
            if rep.has_error():
                log.warning("round %d: node %d failed (%s); its %d clients dropped", r + 1, node, rep.error.reason,
                            len(sent))
                continue
            try:
                arrays = {k: a.numpy() for k, a in rep.content["updates"].items()}
                got = from_arrays(arrays, dense_size(params), cfg.dim, params["item_emb"].dtype)
                stray = set(got.clients.tolist()) - set(sent)
                if stray:
                    raise BadUpload(f"uploads for clients it was not sent, e.g. {min(stray)}")
            except (BadUpload, KeyError) as err:
                rejected += [(u, f"node {node}: unreadable reply: {err}") for u in sent]
                continue
            parts.append(got)
            metrics = rep.content["metrics"]
            nbytes += int(metrics["bytes"])
            node_seconds = [max(node_seconds[0], float(metrics.get("train-seconds", 0.0))),
                            max(node_seconds[1], float(metrics.get("load-seconds", 0.0)))]
        updates = concat(parts) if parts else empty(dense_size(params), cfg.dim, params["item_emb"].dtype)
        print(f"round {r + 1}: {len(users)} clients sampled on {len(groups)} nodes, "
              f"{updates.n} uploads, {len(rejected)} rejected on arrival; slowest node: "
              f"{node_seconds[0]:.2f} s training, {node_seconds[1]:.2f} s loading data", flush=True)
        return Collected(updates, rejected, nbytes)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = from_run_config(dict(context.run_config))
    ds = load_data(opts.data, cfg)
    hosted = discover(grid, opts)
    eligible = np.sort(np.concatenate(list(hosted.values())))
    out = resolve_out(opts.out)
    print(f"fortress: {ds.name}, {len(hosted)} SuperNodes hosting {len(eligible)} users; writing {out}", flush=True)
    results = simulate.run(cfg, ds, out, progress=False, resume=opts.resume,
                           clients=FlowerClients(grid, hosted, opts.round_timeout), eligible=eligible)
    print(simulate.summary(results), flush=True)
