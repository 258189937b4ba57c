"""FedAvg over sparse item rows and the dense encoder, and how the server applies the result.

Each item row is averaged over the clients that uploaded it (weighted by their number of
interactions); rows nobody touched stay as they are. The dense encoder is averaged over all
clients. `GlobalOptimizer` then applies the aggregate: `sgd` with lr 1 is plain FedAvg; `adam`
is FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) with lazy moments for
item rows (a row's moments only move in rounds where someone updated it, as torch's SparseAdam).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fortress.updates import Updates, unflatten


@dataclass
class Aggregate:
    """A round's result: dense delta (P,) and the delta of each touched item row."""

    dense: torch.Tensor        # (P,)
    rows_item: torch.Tensor    # (R,) unique item ids
    rows_delta: torch.Tensor   # (R, d)

    def to(self, device: torch.device | str) -> "Aggregate":
        """The same aggregate on `device` (itself when already there)."""
        if self.dense.device == torch.device(device):
            return self
        return Aggregate(self.dense.to(device), self.rows_item.to(device), self.rows_delta.to(device))


@dataclass
class Outcome:
    """What a defence made of one round: the aggregate, each client's retained weight, its log, and
    what `after_apply` acts on (FORTRESS: the popular and flagged items)."""

    aggregate: Aggregate
    weights: torch.Tensor                   # (n,) share of each client's FedAvg contribution that was kept
    log: dict[str, Any] = field(default_factory=dict)
    flagged: torch.Tensor | None = None     # (S,) item ids flagged this round
    popular: torch.Tensor | None = None     # (P,) item ids of the popular set


class NoState:
    """The defence interface's state and after-update steps for a rule that has neither."""

    def after_apply(self, params: dict[str, torch.Tensor], outcome: Outcome) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# uploaded rows weighted and summed per block: the weighted copy of a block stays in cache, and a
# round's M x d rows are never copied whole
ROW_BLOCK = 8192


class FedAvgSum:
    """Running sums of a FedAvg aggregate, fed one part of a round's uploads at a time (`add`).

    Memory is the dense numerator (P,) and, per catalogue item, a row numerator (d,) and a
    denominator: bounded by the model, whatever the number of clients. `fedavg` is one `add`.
    """

    def __init__(self, dense_size: int, dim: int, n_items: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.dense = torch.zeros(dense_size, dtype=dtype, device=device)                # (P,)
        self.total = torch.zeros((), dtype=dtype, device=device)
        self.num = torch.zeros(n_items + 1, dim, dtype=dtype, device=device)            # (N+1, d)
        self.den = torch.zeros(n_items + 1, dtype=dtype, device=device)                 # (N+1,)

    def add(self, u: Updates, client_weight: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
            dense_scale: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> "FedAvgSum":
        """Add a part's clients (the arguments as in `fedavg`)."""
        u = u.to(self.dense.device)
        w = u.weight if client_weight is None else u.weight * client_weight            # (n,)
        self.total += w.sum()
        coef = w if dense_scale is None else w * dense_scale                           # (n,)
        self.dense += coef @ u.dense                                                   # (P,)
        rw = w[u.rows_client] if row_weight is None else u.weight[u.rows_client] * row_weight  # (M,)
        rc = rw if row_scale is None else rw * row_scale                               # (M,)
        for s in range(0, len(rc), ROW_BLOCK):
            e = s + ROW_BLOCK
            self.num.index_add_(0, u.rows_item[s:e], rc[s:e, None] * u.rows_delta[s:e])
        self.den.index_add_(0, u.rows_item, rw)
        return self

    def result(self) -> Aggregate:
        items = (self.den > 0).nonzero().squeeze(1)                                    # (R,) sorted
        return Aggregate(self.dense / self.total.clamp(min=1e-12), items,
                         self.num[items] / self.den[items, None])


def fedavg(u: Updates, client_weight: torch.Tensor | None = None, row_weight: torch.Tensor | None = None,
           dense_scale: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> Aggregate:
    """Weighted mean of dense deltas; per-item weighted mean of row deltas over their uploaders.

    client_weight (n,) optionally multiplies the interaction weights (a defence's reliability);
    row_weight (M,), when given, multiplies each uploaded row's interaction weight in its item's
    average instead of its client's client_weight. dense_scale (n,) and row_scale (M,) multiply
    the deltas themselves (the numerators only), e.g. a defence's clipping.
    """
    n_items = int(u.rows_item.max()) if len(u.rows_item) else 0
    return FedAvgSum(u.dense.shape[1], u.rows_delta.shape[1], n_items, u.rows_delta.dtype, u.dense.device).add(
        u, client_weight, row_weight, dense_scale, row_scale).result()


class GlobalOptimizer:
    """Applies an Aggregate to the global parameters (in place); state is checkpointable."""

    def __init__(self, kind: str, lr: float, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-6):
        self.kind, self.lr, self.betas, self.eps = kind, lr, betas, eps
        self.state: dict[str, torch.Tensor] = {}

    def apply(self, dense: dict[str, torch.Tensor], keys: list[str], table: torch.Tensor,
              agg: Aggregate) -> None:
        delta = unflatten(agg.dense, dense, keys)
        if self.kind == "sgd":
            for k in keys:
                dense[k] += self.lr * delta[k]
            table.index_add_(0, agg.rows_item, self.lr * agg.rows_delta)
            return
        b1, b2 = self.betas
        st = self.state
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float64)
            st["row_step"] = torch.zeros(table.shape[0], dtype=torch.float64, device=table.device)
            for k in keys:
                st[f"m.{k}"], st[f"v.{k}"] = torch.zeros_like(dense[k]), torch.zeros_like(dense[k])
            st["m.item_emb"], st["v.item_emb"] = torch.zeros_like(table), torch.zeros_like(table)
        st["step"] += 1
        t = float(st["step"])
        for k in keys:
            m, v = st[f"m.{k}"], st[f"v.{k}"]
            m.mul_(b1).add_(delta[k], alpha=1 - b1)
            v.mul_(b2).addcmul_(delta[k], delta[k], value=1 - b2)
            dense[k] += self.lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.eps)
        rows, g = agg.rows_item, agg.rows_delta
        st["row_step"][rows] += 1
        rt = st["row_step"][rows].to(g.dtype)[:, None]                                 # (R, 1)
        m = st["m.item_emb"][rows] * b1 + (1 - b1) * g
        v = st["v.item_emb"][rows] * b2 + (1 - b2) * g * g
        st["m.item_emb"][rows], st["v.item_emb"][rows] = m, v
        table[rows] += self.lr * (m / (1 - b1 ** rt)) / ((v / (1 - b2 ** rt)).sqrt() + self.eps)
