"""The two halves of a federated round, shared by the in-process simulator and the Flower apps.

`client_step` is what the sampled clients hosted in one place do (all of them in-process, a
SuperNode's cohort under Flower): drop-outs, sub-tables, vectorised local training, uploads.
`server_step` is what the server does with whatever came back: reject malformed or absurd
uploads (logged with the client id), require `min_answered` of the sampled clients, aggregate
with the run's defence (`fortress.server.defences`) and apply. All randomness is keyed by
(seed, round[, user]), so a round does not depend on where its clients ran or on the rounds
before it, and a resumed run replays it exactly.

Under attack (`fortress.attacks`), malicious clients (ids n_users, n_users + 1, ...) are sampled
with the benign users; `malicious_step` makes their uploads from a copy of the broadcast model
and puts them on the wire like a node's reply (`wire.to_arrays` / `from_arrays`); `merge` adds
them to what the benign clients sent, and the same `server_step` checks and aggregates all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from fortress import attacks, faults, memory
from fortress.client import iter_round_chunks, objective, round_bytes, round_chunks, train_round, user_representations
from fortress.config import Config
from fortress.data.dataset import Dataset
from fortress.models import Model, Params, dense_keys
from fortress.objectives import fedcl_noise, fedcl_perturb
from fortress.server import fedcl
from fortress.server.aggregate import FedAvgSum, GlobalOptimizer
from fortress.updates import Updates, check, concat, empty, skeleton
from fortress.wire import from_arrays, to_arrays

log = logging.getLogger("fortress")


class Stream:
    """A round's uploads as parts (chunks of clients) made when they are read.

    In-process rounds train chunk by chunk as `server_step` reads them, so that FedAvg holds one
    chunk of uploads at a time rather than the round's: memory does not grow with the clients.
    Between parts, the heap's free pages go back to the kernel once resident memory is `slack_mb`
    above what was live (`memory.release_above`). `n` counts the clients of the first read.
    `make()` gives the parts anew: a server that cannot hold a round's uploads reads them again
    (`FortressServer.aggregate_stream`), each read training the same chunks to the same uploads.
    """

    def __init__(self, make: Callable[[], Iterable[Updates]], slack_mb: float = 512):
        self._make, self.n, self.slack_mb, self.reads = make, 0, slack_mb, 0

    def __iter__(self) -> Iterator[Updates]:
        first = self.reads == 0
        self.reads += 1
        memory.release_above(self.slack_mb)
        for u in self._make():
            if first:
                self.n += u.n
            yield u
            del u
            memory.release_above(self.slack_mb)


def parts(u: "Updates | Stream") -> Iterable[Updates]:
    return u if isinstance(u, Stream) else [u]


@dataclass
class Collected:
    """What reached the server in a round: the uploads, transport-level rejections, traffic.

    A `Stream` of uploads is read once, by `server_step`; `bytes` is complete after that.
    """

    updates: Updates | Stream
    rejected: list[tuple[int, str]] = field(default_factory=list)   # (client id, reason) before `check`
    bytes: int = 0                                                   # one direction, all answering clients
    dropped: list[tuple[int, str]] = field(default_factory=list)    # (client id, reason): its host never answered
    up_extra: int = 0               # bytes uploaded beyond `bytes` (FedCL: the perturbed user representations)
    down_extra: int = 0             # bytes sent beyond `bytes` (FedCL: the hard negatives' ids)


def sample_clients(cfg: Config, eligible: np.ndarray, r: int, malicious: np.ndarray | None = None) -> np.ndarray:
    """The clients of round r (0-based), drawn from (seed, round) alone.

    Under attack they are drawn uniformly from the eligible users and the `malicious` ids
    together, so a malicious client is sampled as often as anyone; with no malicious ids the
    draw is exactly the attack-free one.
    """
    rng = np.random.default_rng([cfg.seed, r])
    pool = eligible if malicious is None or not len(malicious) else np.concatenate([eligible, malicious])
    return rng.choice(pool, size=min(cfg.clients_per_round, len(pool)), replace=False)


def split_sampled(chosen: np.ndarray, malicious: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(benign users, malicious ids) of a round's draw."""
    if malicious is None or not len(malicious):
        return chosen, np.zeros(0, dtype=np.int64)
    bad = np.isin(chosen, malicious)
    return chosen[~bad], chosen[bad]


def dense_size(params: Params) -> int:
    return sum(params[k].numel() for k in dense_keys(params))


def client_step(cfg: Config, model: Model, ds: Dataset, params: Params, users: np.ndarray,
                r: int, stream: bool = False, hard: "Exchange | None" = None) -> Collected:
    """Local training of the sampled `users` held here, from the broadcast `params` (for FedCL with the
    hard negatives of the round's `fedcl_exchange`, whose traffic it adds to the round's).

    With `stream`, the uploads are a `Stream`: each chunk is built and trained when the server
    reads it (the same chunks, in the same order, so the same uploads).
    """
    users = faults.answering(cfg, r, np.asarray(users, dtype=np.int64))
    if not len(users):
        return Collected(empty(dense_size(params), cfg.dim, params["item_emb"].dtype))
    torch.manual_seed(cfg.seed * 1_000_003 + r)                # dropout masks of this round
    got = Collected(empty(0, 0, params["item_emb"].dtype))
    if hard is not None:
        got.up_extra, got.down_extra = hard.up_bytes, hard.down_bytes
    lists = None if hard is None else hard.lists()
    loss_fn, size, fbytes = objective(cfg, ds.n_items, r), dense_size(params), params["item_emb"].element_size()

    dropout: list[torch.Tensor] = []         # the global RNG's state when the first read began

    def trained() -> Iterator[Updates]:
        first = not dropout
        if first:
            dropout.append(torch.get_rng_state())
        else:                                # a second read draws the first read's dropout masks again
            torch.set_rng_state(dropout[0])
        for chunk in iter_round_chunks(ds, cfg, users, r, lists):    # sub-tables (+ draws) per user
            u = train_round(model, loss_fn, cfg.local_epochs, cfg.lr, cfg.client_opt, params, [chunk], cfg.engine)
            if first:
                got.bytes += round_bytes([chunk], size, cfg.dim, fbytes)
            yield faults.corrupt(u, cfg, r, ds.n_items)
    if stream:
        got.updates = Stream(trained)
        return got
    chunks = round_chunks(ds, cfg, users, r, lists)
    updates = train_round(model, loss_fn, cfg.local_epochs, cfg.lr, cfg.client_opt, params, chunks, cfg.engine)
    got.updates = faults.corrupt(updates, cfg, r, ds.n_items)
    got.bytes = round_bytes(chunks, size, cfg.dim, fbytes)
    return got


@dataclass
class Exchange:
    """FedCL's exchange before a round's training (server/fedcl.py): the answering clients, the perturbed
    representations they uploaded (n, d), the server's hard negatives for each (n, m), its cluster (n,),
    and the bytes it moved each way."""

    users: np.ndarray
    uploaded: torch.Tensor
    items: torch.Tensor
    cluster: torch.Tensor
    up_bytes: int
    down_bytes: int

    def lists(self) -> dict[int, np.ndarray]:
        """user -> the item ids it was sent."""
        items = self.items.cpu().numpy()
        return {int(u): items[i] for i, u in enumerate(self.users)}


def fedcl_exchange(cfg: Config, model: Model, ds: Dataset, params: Params, users: np.ndarray, r: int) -> Exchange:
    """FedCL's round-r exchange: each answering client uploads its user representation, clipped and
    Laplace-noised (`objectives.fedcl_perturb`); the server clusters them and sends each client its
    cluster's `fedcl_hard` hard negatives (`server.fedcl.mine`)."""
    users = faults.answering(cfg, r, np.asarray(users, dtype=np.int64))
    if not len(users):
        nothing = torch.zeros(0, dtype=torch.int64)
        return Exchange(users, params["item_emb"].new_zeros(0, cfg.dim), nothing[:, None], nothing, 0, 0)
    h = user_representations(model, params, ds, users)                           # (n, d)
    z = fedcl_perturb(h, cfg.fedcl_clip, fedcl_noise(cfg, r, users).to(h.device))  # (n, d): what is uploaded
    items, cluster = fedcl.mine(model, params, z, cfg.fedcl_clusters, cfg.fedcl_hard, cfg.seed, r)
    fbytes = params["item_emb"].element_size()
    return Exchange(users, z, items, cluster, len(users) * cfg.dim * fbytes, int(items.numel()) * 4)


def upload_bytes(u: Updates) -> int:
    """Bytes of a set of uploads: item rows (+ their int32 ids) and encoder deltas."""
    size = u.rows_delta.element_size()
    return int(u.rows_delta.numel() * size + 4 * len(u.rows_item) + u.dense.numel() * size)


def malicious_step(cfg: Config, model: Model, params: Params, n_items: int, targets: list[int],
                   clients: np.ndarray, r: int) -> Collected:
    """The uploads of round r's malicious `clients`, made by `cfg.attack` from a copy of the broadcast model.

    They cross the same wire format as a SuperNode's reply, so an attack can send nothing a
    benign node could not; `server_step` then treats them like any other upload.
    """
    u = attacks.malicious_updates(cfg.attack, cfg, model, params, n_items, targets, clients, (cfg.seed, r, 1))
    u = from_arrays(to_arrays(u), dense_size(params), cfg.dim, params["item_emb"].dtype)
    return Collected(u, [], upload_bytes(u))


def merge(a: Collected, b: Collected) -> Collected:
    """Two sets of arrivals of one round as one (a `Stream` stays one, read after the other's uploads)."""
    extra = (a.up_extra + b.up_extra, a.down_extra + b.down_extra)
    if isinstance(a.updates, Stream) or isinstance(b.updates, Stream):
        out = Collected(a.updates, a.rejected + b.rejected, a.bytes + b.bytes, a.dropped + b.dropped, *extra)

        def both() -> Iterator[Updates]:
            yield from chain(parts(a.updates), parts(b.updates))
            out.bytes = a.bytes + b.bytes          # a stream's traffic is known once it has been read
        out.updates = Stream(both)
        return out
    return Collected(concat([a.updates, b.updates]), a.rejected + b.rejected, a.bytes + b.bytes, a.dropped + b.dropped,
                     *extra)


def home(defence, params: Params) -> torch.device:
    """Where a defence runs: the model's device, or the CPU for a defence whose state and generators live
    there (`on_host`: FORTRESS, UNION, HiCS), which then gets the round's uploads and a copy of the model
    on the CPU, and whose after-update changes are copied back (nothing moves when the model is on the CPU)."""
    return torch.device("cpu") if getattr(defence, "on_host", False) else params["item_emb"].device


@dataclass
class ServerResult:
    """What the server made of a round: its log entries, the aggregated clients' ids and the share of
    each one's update that reached the model ((n,) in [0, 1]), the rejected uploads, and the
    defence's flagged items (None without a defence)."""

    log: dict
    clients: torch.Tensor
    weights: torch.Tensor
    rejected: list[tuple[int, str]]
    flagged: torch.Tensor | None = None
    sizes: torch.Tensor | None = None       # (n,) the aggregated clients' interaction counts, as uploaded


def server_step(cfg: Config, params: Params, gopt: GlobalOptimizer, got: Collected, n_sampled: int,
                n_items: int, r: int, defence=None) -> ServerResult:
    """Check, aggregate (with `defence`; FedAvg if None) and apply a round's uploads.

    Uploads come held whole or, above `hold_clients` (`defences.reads_in_passes`), as a `Stream`: FedAvg
    reads it part by part, checking each part and adding it to running sums; the FORTRESS server reads it
    three times, part by part (`FortressServer.aggregate_stream`); other defences get the uploads at once
    (their rules compare clients with each other).
    """
    size = dense_size(params)
    if defence is not None and defence.name == "none" and isinstance(got.updates, Stream):
        defence = None                             # FedAvg reads a stream into running sums
    if defence is None:
        total = FedAvgSum(size, cfg.dim, n_items, params["item_emb"].dtype, params["item_emb"].device)
        kept, rejected = [], list(got.rejected)
        for part in parts(got.updates):
            part, bad = check(part, n_items, size, cfg.dim, cfg.max_update_norm)
            rejected += bad
            total.add(part)
            kept.append(skeleton(part))
        updates = concat(kept) if kept else empty(0, cfg.dim, params["item_emb"].dtype)
    elif isinstance(got.updates, Stream):          # a defence that reads the round in passes (`reads_in_passes`)
        rejected, at = list(got.rejected), home(defence, params)

        def read() -> Iterator[Updates]:
            first = got.updates.reads == 0
            for part in got.updates:
                part, bad = check(part.to(at), n_items, size, cfg.dim, cfg.max_update_norm)
                if first:
                    rejected.extend(bad)
                yield part
        first = defence.first_pass(read())
        updates = first.updates if first.updates is not None else empty(0, cfg.dim, params["item_emb"].dtype)
    else:
        updates = concat([u.to(home(defence, params)) for u in parts(got.updates)])
        updates, rejected = check(updates, n_items, size, cfg.dim, cfg.max_update_norm)
        rejected = got.rejected + rejected
    for client, why in rejected:
        log.warning("round %d: rejected client %d: %s", r + 1, client, why)
    info = {"clients": int(updates.n), "sampled": int(n_sampled), "rejected": len(rejected),
            "dropped": int(n_sampled - updates.n - len(rejected))}
    need = cfg.min_answered * n_sampled
    weights, flagged = torch.ones(updates.n), None
    if updates.n == 0 or updates.n < need:
        info["skipped"] = f"{updates.n} of {n_sampled} clients answered with a valid update, need {need:g}"
        log.warning("round %d: skipped, %s", r + 1, info["skipped"])
        weights = torch.zeros(updates.n)
    elif defence is None:
        gopt.apply(params, dense_keys(params), params["item_emb"], total.result())
    else:
        at = home(defence, params)
        seen = {k: v.to(at) for k, v in params.items()}     # the model itself where the defence runs there
        outcome = (defence.aggregate_stream(first, read, seen) if isinstance(got.updates, Stream)
                   else defence.aggregate(updates, seen))
        gopt.apply(params, dense_keys(params), params["item_emb"], outcome.aggregate.to(params["item_emb"].device))
        seen = {k: v.to(at) for k, v in params.items()}
        info["defence"] = {**outcome.log, **defence.after_apply(seen, outcome)}
        for k, v in seen.items():                            # what after_apply changed, back on the model's device
            if v is not params[k]:
                params[k].copy_(v)
        weights, flagged = outcome.weights, outcome.flagged
    w = updates.weight
    info["loss"] = float((w * updates.loss).sum() / w.sum()) if updates.n else float("nan")
    if updates.terms:           # each logged loss term (fortress), weighted like `loss`, over clients that log it
        info["terms"] = {}
        for k, t in updates.terms.items():
            ok = torch.isfinite(t)
            info["terms"][k] = float((w[ok] * t[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")
    return ServerResult(info, updates.clients.cpu(), weights.cpu(), rejected, flagged, updates.weight.cpu())
