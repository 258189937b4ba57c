"""What the server does with a round's checked uploads: `DEFENCES` maps the `defence` key to it.

A defence turns the round's `Updates` into an `Outcome`: the `Aggregate` for the global optimiser,
per-client weights (n,) in [0, 1] (how much of each client's update reached the model; 1 = FedAvg)
and its log; it may keep state across rounds (`state_dict`, saved in checkpoints and in model.pt)
and touch the model after the update is applied (`after_apply(params, outcome)`).
`none` is FedAvg; the robust baselines are in `robust.py`, the FORTRESS server in `fortress.py`; the peer
methods' rules in `union.py` (UNION, AAAI 2023) and `hics.py` (the PSMU paper's countermeasure, SIGIR 2023).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from fortress import models
from fortress.errors import InputError
from fortress.server import robust
from fortress.server.aggregate import Aggregate, NoState, Outcome, fedavg
from fortress.server.fortress import FortressConfig, FortressServer
from fortress.server.hics import HicsServer
from fortress.server.union import UnionServer
from fortress.updates import Updates, concat, norms, skeleton

Pure = Callable[[Updates, Any], tuple[Aggregate, torch.Tensor]]


def _fedavg(u: Updates, cfg) -> tuple[Aggregate, torch.Tensor]:
    return fedavg(u), torch.ones(u.n, dtype=u.weight.dtype)


PURE: dict[str, Pure] = {
    "none": _fedavg,
    "median": lambda u, cfg: robust.median(u),
    "trimmed_mean": lambda u, cfg: robust.trimmed_mean(u, cfg.trim_frac),
    "krum": lambda u, cfg: robust.krum(u, cfg.byz_frac),
    "multi_krum": lambda u, cfg: robust.multi_krum(u, cfg.byz_frac),
    "norm_bound": lambda u, cfg: robust.norm_bound(u, cfg.norm_bound),
}


class Stateless(NoState):
    """A pure aggregation rule behind the defence interface (no state, nothing after the update)."""

    def __init__(self, name: str, rule: Pure, cfg):
        self.name, self.rule, self.cfg = name, rule, cfg

    def aggregate(self, u: Updates, params: dict[str, torch.Tensor]) -> Outcome:
        agg, weights = self.rule(u, self.cfg)
        return Outcome(agg, weights)


@dataclass
class Norms:
    """What `NormBound.first_pass` keeps of a round's clients: their skeleton and update norms (n,)."""

    updates: Updates | None
    norms: torch.Tensor


class NormBound(Stateless):
    """norm_bound, which can also read a round in two passes (`reads_in_passes`): every client's norm, then
    each part clipped into running FedAvg sums."""

    def __init__(self, cfg, n_items: int):
        super().__init__("norm_bound", PURE["norm_bound"], cfg)
        self.n_items = n_items

    def first_pass(self, parts: Iterable[Updates]) -> Norms:
        keep, size = [], []
        for u in parts:
            keep.append(skeleton(u))
            size.append(norms(u))
        return Norms(concat(keep) if keep else None, torch.cat(size) if size else torch.zeros(0, dtype=torch.float64))

    def aggregate_stream(self, first: Norms, read: Callable[[], Iterable[Updates]], params) -> Outcome:
        agg, scale = robust.norm_bound_parts(read(), first.norms, self.cfg.norm_bound, self.n_items)
        return Outcome(agg, scale.to(first.updates.weight.dtype))


def _stateless(name: str) -> Callable[[Any, int], Stateless]:
    return lambda cfg, n_items: Stateless(name, PURE[name], cfg)


DEFENCES: dict[str, Callable[[Any, int], Any]] = {
    "none": _stateless("none"),
    "fortress": lambda cfg, n_items: FortressServer(FortressConfig.from_config(cfg), n_items, cfg.seed,
                                                    models.from_config(cfg)),
    "median": _stateless("median"),
    "trimmed_mean": _stateless("trimmed_mean"),
    "krum": _stateless("krum"),
    "multi_krum": _stateless("multi_krum"),
    "norm_bound": NormBound,
    "union": UnionServer.from_config,
    "hics": HicsServer.from_config,
}


def reads_in_passes(cfg) -> bool:
    """Whether a run's in-process rounds come to the server as a `rounds.Stream` (chunks trained as the
    server reads them) rather than held whole: when more clients than `hold_clients` train a round, under
    FedAvg (one read into running sums), norm bounding (two: the clients' norms, then the clipped sums) and
    FORTRESS (three; `FortressServer.aggregate_stream`); every read after the first trains the round's chunks
    again, so memory is bounded for two or three times the clients' compute. Median, trimmed mean and Krum
    compare every upload with every other and hold a round whole."""
    return cfg.clients_per_round > cfg.hold_clients and cfg.defence in ("none", "norm_bound", "fortress")


def make(cfg, n_items: int):
    """The defence object of a run (cfg.defence), fresh state."""
    if cfg.defence not in DEFENCES:
        raise InputError(f"defence={cfg.defence!r} is not known; choose one of: {', '.join(DEFENCES)}")
    return DEFENCES[cfg.defence](cfg, n_items)
