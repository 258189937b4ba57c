"""The one boundary between Flower's run config and ours, and the records nodes and server exchange.

`[tool.flwr.app.config]` in pyproject.toml holds every `Config` key in kebab-case plus a few
keys that only the Flower apps use (FLOWER_KEYS). `from_run_config` converts it once into a
validated `Config` and a `FlowerOptions`; nothing downstream sees kebab-case.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fortress import config as config_mod
from fortress.config import Config
from fortress.errors import InputError
from fortress.metrics import KS, Sums
from fortress.population import Population
from fortress.wire import BadUpload

# Flower-only keys: where the data and outputs are, resuming, and how long to wait for nodes
FLOWER_KEYS = {"data": str, "out": str, "resume": bool, "round-timeout": float, "min-nodes": int,
               "node-timeout": float}
ROLES = ("users", "attacker")        # what a SuperNode does: host users, or run the attack's malicious clients


@dataclass(frozen=True)
class FlowerOptions:
    data: str = "synthetic"          # nodes: file or folder, a name in $FORTRESS_DATA, or 'synthetic'; the server reads none
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
    if cfg.training != "federated":
        raise InputError(f"training={cfg.training!r}: the Flower apps run federated training only (training=federated)")
    if cfg.objective == "fedcl" and cfg.fedcl_lambda > 0:
        raise InputError("objective='fedcl': its exchange of user representations for hard negatives before each "
                         "round is not carried by the Flower apps yet; run it in-process (fortress run)")
    return cfg, FlowerOptions(**flower)


def role(node_config: dict[str, Any]) -> str:
    """A SuperNode's role from its node config: `users` (hosts a partition of the data) or `attacker`."""
    r = str(node_config.get("role", "users"))
    if r not in ROLES:
        raise InputError(f"role={r!r} in the node config is not known; choose one of: {', '.join(ROLES)}")
    return r


# ---- what travels besides the model and the uploads: a node's population and its evaluation sums ----
# Both are parsed strictly on the server (`BadUpload` names what is wrong), like the uploads.

def population_record(pop: Population) -> RecordDict:
    """A node's `query` reply: counts and the catalogue in a ConfigRecord, ids (and item counts) as arrays."""
    arrays = {"eligible": Array(pop.eligible.astype(np.int64))}
    if pop.item_counts is not None:
        arrays["item-counts"] = Array(np.asarray(pop.item_counts, dtype=np.int64))
    return RecordDict({
        "node": ConfigRecord({"role": "users", "name": pop.name, "n-items": pop.n_items, "n-users": pop.n_users,
                              "users": pop.users, "interactions": pop.interactions, "n-valid": pop.n_valid,
                              "n-test": pop.n_test, "fingerprint": pop.fingerprint, "item-ids": list(pop.item_ids)}),
        "hosted": ArrayRecord(arrays),
    })


def read_population(content: RecordDict) -> Population:
    """The Population in a node's `query` reply, or BadUpload."""
    try:
        c, a = content["node"], content["hosted"]
        eligible = np.asarray(a["eligible"].numpy())
        counts = np.asarray(a["item-counts"].numpy()) if "item-counts" in a else None
        pop = Population(str(c["name"]), int(c["n-items"]), int(c["n-users"]), [str(i) for i in c["item-ids"]],
                         eligible, int(c["users"]), int(c["interactions"]), int(c["n-valid"]), int(c["n-test"]),
                         str(c["fingerprint"]), counts)
    except (KeyError, TypeError, ValueError) as err:
        raise BadUpload(f"not a population ({type(err).__name__}: {err})") from None
    if eligible.dtype != np.int64 or eligible.ndim != 1 or len(pop.item_ids) != pop.n_items + 1:
        raise BadUpload(f"eligible ids of dtype {eligible.dtype}, {len(pop.item_ids)} item ids for {pop.n_items} items")
    if len(eligible) and (eligible.min() < 0 or eligible.max() >= pop.n_users):
        raise BadUpload(f"eligible ids outside 0..{pop.n_users - 1}")
    if counts is not None and (counts.dtype != np.int64 or counts.shape != (pop.n_items + 1,) or (counts < 0).any()):
        raise BadUpload(f"item counts of dtype {counts.dtype} and shape {counts.shape}, expected ({pop.n_items + 1},)")
    return replace(pop, eligible=np.sort(eligible))


def sums_record(s: Sums) -> ArrayRecord:
    return ArrayRecord({"users": Array(np.array([s.users], dtype=np.int64)), "hr": Array(s.hr), "ndcg": Array(s.ndcg),
                        "er-hits": Array(s.er_hits), "er-users": Array(s.er_users)})


def read_sums(record: ArrayRecord, n_targets: int, n_ks: int = len(KS)) -> Sums:
    """A node's evaluation sums, or BadUpload."""
    want = {"users": (1,), "hr": (n_ks,), "ndcg": (n_ks,), "er-hits": (n_targets, n_ks), "er-users": (n_targets,)}
    try:
        a = {k: np.asarray(record[k].numpy()) for k in want}
    except KeyError as err:
        raise BadUpload(f"evaluation sums missing {err}") from None
    for k, shape in want.items():
        kind = "int64" if k == "users" else "float64"
        if a[k].shape != shape or str(a[k].dtype) != kind or not np.isfinite(a[k]).all() or (a[k] < 0).any():
            raise BadUpload(f"{k} has dtype {a[k].dtype} and shape {a[k].shape}, expected non-negative {kind} {shape}")
    return Sums(int(a["users"][0]), a["hr"], a["ndcg"], a["er-hits"], a["er-users"])


def resolve_out(out: str) -> Path:
    return Path(out).expanduser().resolve()
