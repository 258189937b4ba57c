"""The two halves of a federated round, shared by the in-process simulator and the Flower apps.

`client_step` is what the sampled clients hosted in one place do (all of them in-process, a
SuperNode's cohort under Flower): drop-outs, sub-tables, vectorised local training, uploads.
`server_step` is what the server does with whatever came back: reject malformed or absurd
uploads (logged with the client id), require `min_answered` of the sampled clients, aggregate
and apply. All randomness is keyed by (seed, round[, user]), so a round does not depend on
where its clients ran or on the rounds before it, and a resumed run replays it exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from fortress import faults
from fortress.client import objective, round_bytes, round_chunks, train_round
from fortress.config import Config
from fortress.data.dataset import Dataset
from fortress.models import Model, Params, dense_keys
from fortress.server.aggregate import GlobalOptimizer, fedavg
from fortress.updates import Updates, check, empty

log = logging.getLogger("fortress")


@dataclass
class Collected:
    """What reached the server in a round: the uploads, transport-level rejections, traffic."""

    updates: Updates
    rejected: list[tuple[int, str]] = field(default_factory=list)   # (client id, reason) before `check`
    bytes: int = 0                                                   # one direction, all answering clients


def sample_clients(cfg: Config, eligible: np.ndarray, r: int) -> np.ndarray:
    """The clients of round r (0-based), drawn from (seed, round) alone."""
    rng = np.random.default_rng([cfg.seed, r])
    return rng.choice(eligible, size=min(cfg.clients_per_round, len(eligible)), replace=False)


def dense_size(params: Params) -> int:
    return sum(params[k].numel() for k in dense_keys(params))


def client_step(cfg: Config, model: Model, ds: Dataset, params: Params, users: np.ndarray,
                r: int) -> Collected:
    """Local training of the sampled `users` held here, from the broadcast `params`."""
    users = faults.answering(cfg, r, np.asarray(users, dtype=np.int64))
    if not len(users):
        return Collected(empty(dense_size(params), cfg.dim, params["item_emb"].dtype))
    torch.manual_seed(cfg.seed * 1_000_003 + r)                # dropout masks of this round
    chunks = round_chunks(ds, cfg, users, r)                   # sub-tables (+ fortress draws) per user
    updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params, chunks, cfg.engine)
    updates = faults.corrupt(updates, cfg, r, ds.n_items)
    nbytes = round_bytes(chunks, dense_size(params), cfg.dim, params["item_emb"].element_size())
    return Collected(updates, [], nbytes)


def server_step(cfg: Config, params: Params, gopt: GlobalOptimizer, got: Collected, n_sampled: int,
                n_items: int, r: int) -> dict:
    """Check, aggregate and apply a round's uploads; returns what the round log records."""
    updates, rejected = check(got.updates, n_items, dense_size(params), cfg.dim, cfg.max_update_norm)
    rejected = got.rejected + rejected
    for client, why in rejected:
        log.warning("round %d: rejected client %d: %s", r + 1, client, why)
    info = {"clients": int(updates.n), "sampled": int(n_sampled), "rejected": len(rejected),
            "dropped": int(n_sampled - got.updates.n - len(got.rejected))}
    need = cfg.min_answered * n_sampled
    if updates.n == 0 or updates.n < need:
        info["skipped"] = f"{updates.n} of {n_sampled} clients answered with a valid update, need {need:g}"
        log.warning("round %d: skipped, %s", r + 1, info["skipped"])
    else:
        gopt.apply(params, dense_keys(params), params["item_emb"], fedavg(updates))
    w = updates.weight
    info["loss"] = float((w * updates.loss).sum() / w.sum()) if updates.n else float("nan")
    if updates.terms:           # each logged loss term (fortress), weighted like `loss`, over clients that log it
        info["terms"] = {}
        for k, t in updates.terms.items():
            ok = torch.isfinite(t)
            info["terms"][k] = float((w[ok] * t[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")
    info["rejected_clients"] = rejected
    return info
