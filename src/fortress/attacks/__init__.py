"""Poisoning attacks: malicious clients that join federated rounds to push target items into top-K.

How a run uses them (`fortress.simulate`):
- `pick_targets` chooses the target items once per run from the training counts (the
  experimenter's choice, not the attacker's knowledge): the same seed gives the same targets for
  every attack, so tables compare methods on the same items;
- `malicious_ids` gives `attack_ratio` x n_users malicious clients ids n_users, n_users + 1, ...;
- every round `rounds.sample_clients` draws `clients_per_round` clients uniformly from the benign
  eligible users *and* the malicious ids together, so malicious clients come as often as anyone;
- `malicious_updates` runs the attack for the malicious clients drawn this round, vectorised
  (each attack trains its clients with the benign engine's vmap), and returns their uploads in
  the benign format; `rounds.malicious_step` puts them on the wire like a node's reply, and the
  server's `rounds.server_step` checks (`max_update_norm` included) and aggregates them with the
  benign uploads. A rejected malicious upload is counted in the report (`malicious_rejected`).
- `Campaign.state` / `restore` carry the attack's bookkeeping through checkpoints; everything
  else an attack uses is drawn from (seed, round), so a resumed run replays it exactly.
The threat model (what an attack can see) is in `fortress.attacks.base`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fortress.attacks import adaptive, ahum, baselines, psmu
from fortress.attacks.base import Attack, AttackConfig, AttackView
from fortress.errors import InputError
from fortress.models import Model, Params
from fortress.updates import Updates

ATTACKS: dict[str, Attack] = {
    "ahum": ahum.attack,
    "psmu": psmu.attack,
    "random": baselines.random_attack,
    "popular": baselines.popular_attack,
    "rows": baselines.rows_attack,
    "boost": baselines.boost_attack,
    "stealth": adaptive.stealth_attack,
    "ramp": adaptive.ramp_attack,
    "evade": adaptive.evade_attack,
    "weight": adaptive.weight_attack,
    "adaptive": adaptive.adaptive_attack,
}
UNPOPULAR_SHARE = 0.1     # `unpopular` targets come from this least popular share of the catalogue
TARGET_STREAM = 0x7A46    # seeds target picking apart from every other random stream
ATTACK_STREAM = 0xA77     # seeds an attack's torch randomness (dropout) apart from the benign clients'


def get(name: str) -> Attack:
    if name not in ATTACKS:
        raise InputError(f"attack={name!r} is not known; choose one of: none, {', '.join(ATTACKS)}")
    return ATTACKS[name]


def target_list(spec: str) -> list[str]:
    """Item ids of an explicit `target_pick` ("12,40" or a TOML list "[12, 40]"), as strings."""
    return [t.strip().strip("'\"") for t in spec.strip("[] ").replace(" ", ",").split(",") if t.strip()]


def pick_targets(counts: np.ndarray, item_ids: list[str], how: str, k: int, seed: int) -> list[int]:
    """k target item ids (1..n_items) from train counts (n_items + 1,), deterministic for a seed.

    unpopular: uniformly from the 10% least popular items (train interactions, ties in random
    order); random: uniformly from the catalogue; otherwise an explicit list of original ids.
    """
    n_items = len(counts) - 1
    if how not in ("unpopular", "random"):
        index = {name: i for i, name in enumerate(item_ids) if i > 0}
        wanted = target_list(how)
        unknown = [t for t in wanted if t not in index]
        if unknown:
            raise InputError(f"target_pick: item id(s) {', '.join(unknown)} are not in the data")
        return [index[t] for t in wanted]
    if k > n_items:
        raise InputError(f"targets={k} but the data has only {n_items} items")
    rng = np.random.default_rng([seed, TARGET_STREAM])
    if how == "random":
        return sorted(int(i) for i in rng.choice(np.arange(1, n_items + 1), size=k, replace=False))
    tie = rng.random(n_items)
    order = np.lexsort((tie, counts[1:])) + 1                   # least popular first
    pool = order[:max(k, int(np.ceil(UNPOPULAR_SHARE * n_items)))]
    return sorted(int(i) for i in rng.choice(pool, size=k, replace=False))


def malicious_ids(n_users: int, ratio: float) -> np.ndarray:
    """Ids of the malicious clients: round(ratio x n_users) of them (at least 1 when ratio > 0)."""
    m = max(1, round(ratio * n_users)) if ratio > 0 else 0
    return np.arange(n_users, n_users + m, dtype=np.int64)


def malicious_updates(name: str, cfg, model: Model, params: Params, n_items: int, targets: list[int],
                      clients: np.ndarray, seed: tuple[int, ...]) -> Updates:
    """Run attack `name` for this round's malicious clients on a copy of the broadcast model, on the CPU
    (an attack's generators and tensors live there; its uploads cross the wire as arrays anyway)."""
    view = AttackView(model, {k: v.detach().cpu().clone() for k, v in params.items()}, n_items,
                      torch.as_tensor(targets, dtype=torch.int64), torch.as_tensor(clients, dtype=torch.int64),
                      AttackConfig.from_config(cfg), seed, int(seed[1]) if len(seed) > 1 else 0)
    # its own torch stream too (dropout in local training), restored afterwards, so the uploads
    # depend on the model and the seed only and benign clients' randomness is left as it was
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(np.random.default_rng([*seed, ATTACK_STREAM]).integers(2 ** 62)))
        u = get(name)(view)
    if set(u.clients.tolist()) != set(view.clients.tolist()):
        raise RuntimeError(f"attack {name!r} uploaded for clients it does not control")
    return u


ER_KEYS = ("ER@5", "ER@10", "ER@20")


@dataclass
class Campaign:
    """A run's attack bookkeeping: targets, malicious clients, their cost, and ER over rounds."""

    attack: str
    targets: list[int]
    malicious: np.ndarray
    seconds: float = 0.0                 # time spent computing malicious uploads
    uploads: int = 0                     # malicious client-rounds so far
    rejected: int = 0                    # malicious uploads the server's checks rejected
    history: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (targets and ids too, to check that a resumed run agrees)."""
        return {"attack": self.attack, "targets": list(self.targets), "malicious": self.malicious.tolist(),
                "seconds": self.seconds, "uploads": self.uploads, "rejected": self.rejected,
                "history": [dict(h) for h in self.history]}

    def restore(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's `state()`; the targets and malicious ids must be the same."""
        if state is None:
            raise InputError("cannot resume: the checkpoint has no attack state (made by an older fortress)")
        if (state["attack"], state["targets"], state["malicious"]) != (self.attack, list(self.targets),
                                                                          self.malicious.tolist()):
            raise InputError("cannot resume: the checkpoint's attack, targets or malicious clients differ from this run's")
        self.seconds, self.uploads, self.rejected = state["seconds"], state["uploads"], state["rejected"]
        self.history = [dict(h) for h in state["history"]]

    def record(self, round_: int, test: dict[str, Any]) -> dict[str, float]:
        """Keep the ER@K (and test HR@10) of an evaluation of the test split with the targets; with several targets
        also each target's ER@10 (by target index), so a target's own exposure can be averaged like the mean's."""
        entry = {"round": round_, **{k: test[k] for k in ER_KEYS}, "HR@10": test["HR@10"]}
        if len(self.targets) > 1 and "ER_per_target" in test:
            entry["ER@10_per_target"] = {t: v["ER@10"] for t, v in test["ER_per_target"].items()}
        self.history.append(entry)
        return entry

    def report(self, cfg, item_ids: list[str], test: dict[str, Any], rounds: int, last: int = 5) -> dict[str, Any]:
        """The `attack` section of results.json: final ER@K, the mean of the last evaluations, history."""
        tail = self.history[-last:]
        out = {
            "attack": self.attack, "attack_ratio": cfg.attack_ratio if self.attack != "none" else 0.0,
            "malicious_clients": int(len(self.malicious)),
            "targets": [item_ids[t] for t in self.targets], "target_index": list(self.targets),
            **{k: test[k] for k in ER_KEYS},
            f"last{last}_mean": {k: float(np.mean([h[k] for h in tail])) for k in ER_KEYS} if tail else {},
            "per_target": {item_ids[int(t)]: v for t, v in test.get("ER_per_target", {}).items()},
            "history": self.history,
            "malicious_uploads": self.uploads,
            "malicious_rejected": self.rejected,
            "seconds": self.seconds,
            "seconds_per_round": self.seconds / max(1, rounds),
        }
        per = [h.get("ER@10_per_target") for h in tail]        # several targets: each one's ER@10 at each evaluation
        if tail and all(per):
            out[f"per_target_last{last}_mean"] = {item_ids[int(t)]: {"ER@10": float(np.mean([p[t] for p in per]))}
                                                  for t in per[-1]}
        return out


def campaign(cfg, counts: np.ndarray, item_ids: list[str], n_users: int) -> Campaign | None:
    """Targets and malicious clients of a federated or PTF run (None when no targets are tracked)."""
    if cfg.training not in ("federated", "ptf") or cfg.targets < 1:
        return None
    targets = pick_targets(counts, item_ids, cfg.target_pick, cfg.targets, cfg.seed)
    bad = malicious_ids(n_users, cfg.attack_ratio) if cfg.attack != "none" else np.zeros(0, dtype=np.int64)
    return Campaign(cfg.attack, targets, bad)


def split_er(res: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An evaluation with targets -> (HR/NDCG part, ER part)."""
    er = {k: res[k] for k in (*ER_KEYS, "ER_per_target") if k in res}
    return {k: v for k, v in res.items() if k not in er}, er


__all__ = ["ATTACKS", "AttackView", "AttackConfig", "Campaign", "campaign", "pick_targets", "target_list", "malicious_ids",
           "malicious_updates", "split_er"]
