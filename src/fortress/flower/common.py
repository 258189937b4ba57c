"""The one boundary between Flower's run config and ours, and data loading on either side.

`[tool.flwr.app.config]` in pyproject.toml holds every `Config` key in kebab-case plus a few
keys that only the Flower apps use (FLOWER_KEYS). `from_run_config` converts it once into a
validated `Config` and a `FlowerOptions`; nothing downstream sees kebab-case.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fortress import config as config_mod
from fortress.client import eligible_clients
from fortress.config import Config
from fortress.data.dataset import Dataset
from fortress.errors import InputError

# Flower-only keys: where the data and outputs are, resuming, and how long to wait for nodes
FLOWER_KEYS = {"data": str, "out": str, "resume": bool, "round-timeout": float, "min-nodes": int,
               "node-timeout": float}


@dataclass(frozen=True)
class FlowerOptions:
    data: str = "synthetic"          # file or folder, a name in $FORTRESS_DATA, or 'synthetic'
    out: str = "runs/flower"         # server: results.json, model.pt, checkpoint.pt
    resume: bool = False             # server: continue from out/checkpoint.pt
    round_timeout: float = 600.0     # server: seconds to wait for a round's replies; late nodes count as dropped
    min_nodes: int = 1               # server: SuperNodes to wait for before the first round
    node_timeout: float = 120.0      # server: how long to wait for them


def from_run_config(run_config: dict[str, Any]) -> tuple[Config, FlowerOptions]:
    """Kebab-case run config -> (validated Config, FlowerOptions); unknown keys are errors."""
    ours, flower = {}, {}
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            flower[key.replace("-", "_")] = FLOWER_KEYS[key](value)
        else:
            ours[key.replace("-", "_")] = value
    cfg = config_mod.override(Config(), ours, source="[tool.flwr.app.config]")
    if cfg.mode not in ("fedavg", "fortress"):
        raise InputError(f"mode={cfg.mode!r}: the Flower apps run federated training only (mode=fedavg or fortress)")
    return cfg, FlowerOptions(**flower)


def hosted_users(ds: Dataset, partition: int, n_partitions: int) -> np.ndarray:
    """The trainable users a SuperNode hosts: user u lives on partition u mod n_partitions."""
    if not 0 <= partition < n_partitions:
        raise InputError(f"partition-id={partition} must be in 0..{n_partitions - 1} (num-partitions={n_partitions})")
    users = eligible_clients(ds)
    return users[users % n_partitions == partition]


def resolve_out(out: str) -> Path:
    return Path(out).expanduser().resolve()
