"""Flower ServerApp: the simulator's round loop with Flower messages as the transport, and no data.

Glue only. The server is given no dataset: it asks the SuperNodes what they host (`discover`:
each `users` node's population, ids and counts, no history; which nodes are `attacker`s), then
hands `simulate.run` that population and a transport (`FlowerClients`) that sends each node the
model and its sampled clients, sends the attacker nodes the malicious ids drawn, and adds up the
nodes' evaluation sums. Sampling, checks, aggregation, validation, checkpoints and `resume` are
the in-process code itself. A node that fails or misses `round-timeout` drops its clients for
that round (or its users from that evaluation); a reply that cannot be read rejects all of that
node's clients, logged by client id.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fortress import simulate
from fortress.config import Config
from fortress.errors import InputError
from fortress.flower.common import FlowerOptions, from_run_config, read_population, read_sums, resolve_out
from fortress.metrics import Strata, Sums, zero_sums
from fortress.models import Params
from fortress.population import Population, combine
from fortress.rounds import Collected, dense_size
from fortress.updates import concat, empty
from fortress.wire import BadUpload, from_arrays

app = ServerApp()
log = logging.getLogger("fortress")


@dataclass
class Federation:
    """What `discover` learnt: the population, which users each node hosts, and the attacker nodes."""

    pop: Population
    hosts: dict[int, np.ndarray]               # node id -> eligible user ids it hosts
    evaluators: list[int]                      # nodes that host users (all of them evaluate)
    attackers: list[int] = field(default_factory=list)


def wants_item_counts(cfg: Config) -> bool:
    """Only `unpopular` targets need the item train counts, the one aggregate of histories a node sends."""
    return cfg.training == "federated" and cfg.targets >= 1 and cfg.target_pick == "unpopular"


def discover(grid: Grid, opts: FlowerOptions, cfg: Config) -> Federation:
    """Wait for `min-nodes` SuperNodes, then ask each what it hosts (its population) or whether it is an attacker."""
    deadline = time.monotonic() + opts.node_timeout
    while len(list(grid.get_node_ids())) < opts.min_nodes:
        if time.monotonic() > deadline:
            raise InputError(f"only {len(list(grid.get_node_ids()))} of min-nodes={opts.min_nodes} SuperNodes "
                             f"connected within node-timeout={opts.node_timeout:g} s")
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    ask = RecordDict({"ask": ConfigRecord({"item-counts": wants_item_counts(cfg)})})
    msgs = [Message(ask, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    pops, hosts, attackers, seen = [], {}, [], set()
    for reply in sorted(grid.send_and_receive(msgs, timeout=opts.round_timeout), key=lambda m: m.metadata.src_node_id):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say what it hosts (%s); leaving it out", node, reply.error.reason)
            continue
        if reply.content["node"]["role"] == "attacker":
            attackers.append(node)
            continue
        try:
            pop = read_population(reply.content)
        except BadUpload as err:
            log.warning("node %d: unreadable population (%s); leaving it out", node, err)
            continue
        dup = np.isin(pop.eligible, list(seen))
        if dup.any():
            log.warning("node %d claims %d users another node hosts; ignoring those", node, int(dup.sum()))
        hosts[node] = pop.eligible[~dup]
        seen.update(pop.eligible.tolist())
        pops.append(replace(pop, eligible=pop.eligible[~dup]))
    if not pops:
        raise InputError("no SuperNode answered with the users it hosts")
    if cfg.attack != "none" and not attackers:
        raise InputError(f"attack={cfg.attack}: no SuperNode with role=attacker joined; start one with "
                         "--node-config 'role=\"attacker\"' (fortress deploy-demo starts one)")
    return Federation(combine(pops), hosts, sorted(hosts), attackers)


def _model(params: Params) -> ArrayRecord:
    return ArrayRecord({k: Array(v.numpy()) for k, v in params.items()})


def _ids(name: str, ids) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(ids, dtype=np.int64))})


class FlowerClients:
    """The transport: train messages to the nodes hosting sampled users, attack messages to the
    attacker nodes, evaluate messages to every hosting node; replies parsed strictly."""

    def __init__(self, grid: Grid, fed: Federation, timeout: float):
        self.grid, self.fed, self.timeout = grid, fed, timeout
        self.owner = {int(u): node for node, users in fed.hosts.items() for u in users}
        self.evaluations: list[dict] = []          # the cost of each federated evaluation

    def __call__(self, run: simulate.Run, r: int, users: np.ndarray) -> Collected:
        """A round's benign clients, each trained on the node that hosts it."""
        groups: dict[int, list[int]] = defaultdict(list)
        for u in users.tolist():
            groups[self.owner[u]].append(u)
        return self._round(run, r, groups, {}, "clients")

    def attack(self, run: simulate.Run, r: int, bad: np.ndarray) -> Collected:
        """A round's malicious clients, run by the attacker nodes (malicious id i on attacker i mod count)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i in bad.tolist():
            groups[self.fed.attackers[i % len(self.fed.attackers)]].append(i)
        return self._round(run, r, groups, {"targets": _ids("targets", run.campaign.targets)}, "malicious clients")

    def _round(self, run: simulate.Run, r: int, groups: dict[int, list[int]], extra: dict, what: str) -> Collected:
        cfg, params = run.cfg, run.params
        nothing = empty(dense_size(params), cfg.dim, params["item_emb"].dtype)
        if not groups:
            return Collected(nothing)
        n_sampled, n_nodes = sum(len(g) for g in groups.values()), len(groups)
        alive = set(self.grid.get_node_ids())              # nodes the SuperLink has seen go away are not waited for
        dropped = []
        for node in [n for n in groups if n not in alive]:
            log.warning("round %d: node %d is offline; its %d clients dropped", r + 1, node, len(groups[node]))
            dropped += [(u, f"node {node}: offline") for u in groups.pop(node)]
        model = _model(params)
        msgs = [Message(RecordDict({"params": model, "task": ConfigRecord({"round": r}), "users": _ids("users", g),
                                    **extra}),
                        dst_node_id=node, message_type=MessageType.TRAIN, ttl=self.timeout)   # a node that
                for node, g in groups.items()]                                         # rejoins skips stale rounds
        replies = {rep.metadata.src_node_id: rep for rep in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        parts, rejected, nbytes, node_seconds = [], [], 0, [0.0, 0.0]
        for node in sorted(groups):                        # fixed order: aggregation does not depend on timing
            sent = groups[node]
            if node not in replies:
                log.warning("round %d: node %d sent no reply within %g s; its %d clients dropped",
                            r + 1, node, self.timeout, len(sent))
                dropped += [(u, f"node {node}: no reply within {self.timeout:g} s") for u in sent]
                continue
            rep = replies[node]
            if rep.has_error():
                log.warning("round %d: node %d failed (%s); its %d clients dropped", r + 1, node, rep.error.reason,
                            len(sent))
                dropped += [(u, f"node {node}: failed ({rep.error.reason})") for u in sent]
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
        updates = concat(parts) if parts else nothing
        print(f"round {r + 1}: {n_sampled} {what} sampled on {n_nodes} nodes, "
              f"{updates.n} uploads, {len(rejected)} rejected on arrival; slowest node: "
              f"{node_seconds[0]:.2f} s training, {node_seconds[1]:.2f} s loading data", flush=True)
        return Collected(updates, rejected, nbytes, dropped)

    def evaluate(self, params: Params, split: str, targets: list[int] | None = None, progress=None,
                 groups: Strata | None = None) -> Sums:
        """Every hosting node scores its own users; the server adds their sums (`metrics.from_sums` does the rest).

        No strata: their cut points (item train counts) are the whole federation's, which no node holds.
        """
        if groups is not None:
            raise ValueError("a federated evaluation on the nodes cannot be stratified")
        t0 = time.perf_counter()
        targets = list(targets or [])
        model = _model(params)
        alive = set(self.grid.get_node_ids())
        for node in [n for n in self.fed.evaluators if n not in alive]:
            log.warning("evaluate %s: node %d is offline; its users are not in this evaluation", split, node)
        msgs = [Message(RecordDict({"params": model, "task": ConfigRecord({"split": split}),
                                    "targets": _ids("targets", targets)}), dst_node_id=n,
                        message_type=MessageType.EVALUATE, ttl=self.timeout) for n in self.fed.evaluators if n in alive]
        replies = {rep.metadata.src_node_id: rep for rep in self.grid.send_and_receive(msgs, timeout=self.timeout)}
        total, answered, up, slowest = zero_sums(len(targets)), 0, 0, 0.0
        for node in [m.metadata.dst_node_id for m in msgs]:    # fixed order: the sums do not depend on timing
            rep = replies.get(node)
            if rep is None or rep.has_error():
                why = "no reply" if rep is None else rep.error.reason
                log.warning("evaluate %s: node %d left out (%s); its users are not in this evaluation", split, node, why)
                continue
            try:
                sums = read_sums(rep.content["sums"], len(targets))
            except (BadUpload, KeyError) as err:
                log.warning("evaluate %s: node %d left out (unreadable sums: %s)", split, node, err)
                continue
            total, answered = total + sums, answered + 1
            up += sum(a.numpy().nbytes for a in rep.content["sums"].values())
            slowest = max(slowest, float(rep.content["metrics"].get("eval-seconds", 0.0)))
            if progress is not None:
                progress(sums.users)
        down = len(msgs) * sum(v.numel() * v.element_size() for v in params.values())
        self.evaluations.append({"split": split, "targets": len(targets), "nodes": len(msgs), "answered": answered,
                                 "users": total.users, "bytes_down": down, "bytes_up": up,
                                 "seconds": time.perf_counter() - t0, "slowest_node_seconds": slowest})
        return total


def cost(evaluations: list[dict]) -> dict:
    """The `federated_eval` entry of results.json: what evaluating on the nodes cost, per evaluation."""
    n = max(1, len(evaluations))
    return {"evaluations": len(evaluations),
            "bytes_down_per_eval": sum(e["bytes_down"] for e in evaluations) / n,
            "bytes_up_per_eval": sum(e["bytes_up"] for e in evaluations) / n,
            "seconds_per_eval": sum(e["seconds"] for e in evaluations) / n,
            "log": evaluations}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, opts = from_run_config(dict(context.run_config))
    fed = discover(grid, opts, cfg)
    out = resolve_out(opts.out)
    print(f"fortress: {fed.pop.name}, {len(fed.hosts)} SuperNodes hosting {len(fed.pop.eligible)} users"
          f"{f' and {len(fed.attackers)} attacker nodes' if fed.attackers else ''}; no data on the server; "
          f"writing {out}", flush=True)
    results = serve(cfg, fed, grid, out, opts)
    print(simulate.summary(results), flush=True)


def serve(cfg: Config, fed: Federation, grid: Grid, out, opts: FlowerOptions) -> dict:
    """`simulate.run` with no data: the nodes' population, the Flower transport and federated evaluation."""
    fc = FlowerClients(grid, fed, opts.round_timeout)
    results = simulate.run(cfg, None, out, progress=False, resume=opts.resume, clients=fc, pop=fed.pop,
                           evaluator=fc.evaluate, attackers=fc.attack)
    results["federated_eval"] = cost(fc.evaluations)
    simulate.write_json(Path(out) / "results.json", results)
    return results
