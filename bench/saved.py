"""A saved defended run, loaded for the scripts that study it outside a run (bench/target_pushes.py,
bench/push_directions.py), and the rounds they simulate from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortress import attacks
from fortress import config as config_mod
from fortress.client import build_chunks, eligible_clients, objective, train_round
from fortress.data import Dataset, load_data
from fortress.models import Model, from_config
from fortress.updates import Updates


@dataclass
class Saved:
    run: str
    cfg: Any                # the run's config, with defence=fortress (and the overrides given)
    ds: Dataset
    model: Model
    params: dict[str, torch.Tensor]
    state: dict[str, Any]   # the FORTRESS monitor's saved state
    target: int             # the attack's (first) target index


def load(run: str, data: str, **overrides: Any) -> Saved:
    """RUN_DIR/model.pt (a model with a FORTRESS monitor state) and RUN_DIR/results.json (its attack's target)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)                                   # the simulated clients' dropout
    blob = torch.load(Path(run) / "model.pt", weights_only=False)
    target = json.loads((Path(run) / "results.json").read_text())["attack"]["target_index"][0]
    cfg = config_mod.from_dict({**config_mod.upgrade(blob["config"]), "defence": "fortress", **overrides})
    return Saved(run, cfg, load_data(data, cfg), from_config(cfg), {k: v.float() for k, v in blob["params"].items()},
                 (blob.get("defence") or {}).get("state") or {}, target)


def attacked_round(s: Saved, rng: np.random.Generator, r: int) -> tuple[Updates, Updates]:
    """Round r simulated from the saved model: the uploads of clients_per_round - k honest users (drawn by rng,
    trained with the loaded config's objective: the scripts load with objective=next_item, FedAvg clients) and of
    k = attack_ratio x clients_per_round of the run's attackers."""
    cfg, ds = s.cfg, s.ds
    k = max(1, round(cfg.attack_ratio * cfg.clients_per_round))
    users = rng.choice(eligible_clients(ds), cfg.clients_per_round - k, replace=False)
    chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, cfg.chunk_size, rng)
    honest = train_round(s.model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, s.params,
                         chunks, cfg.engine)
    bad = attacks.malicious_updates(cfg.attack, cfg, s.model, s.params, ds.n_items, [s.target],
                                    np.arange(ds.n_users, ds.n_users + k), (cfg.seed, 10_000 + r, 1))
    return honest, bad
