"""The PSMU paper's countermeasure (`defence=hics`): hierarchical gradient clipping with sparsified
updating.

Yuan et al., "Manipulating Federated Recommender Systems: Poisoning with Synthetic Users and Its
Countermeasures", SIGIR 2023. The paper names the countermeasure "hierarchical gradient clipping
with sparsified updating" and argues that a poisoning client wins a cold item's row by uploading a
few large item gradients. No public reference code was found, and the paper's text (beyond its
abstract) could not be read while this was written, so the three steps below are our reading of the
name, and every threshold is our choice:

1. Item level: each uploaded item row is clipped to L2 norm <= C_item = `hics_item_clip` x the
   round's median, over clients, of each client's largest row norm (the push an ordinary client
   gives its own next item).
2. Sparsified updating: of each client's rows, only the ceil(`hics_keep` x its row count) largest
   (by their uploaded norm, not the clipped one, which ties every row above C_item; at least 1) are
   kept; the other rows are zeroed, not removed, so the client still counts in those rows' FedAvg
   denominators (removing them would leave a cold item's average to its few large pushers, the
   attackers among them).
3. User level: the client's whole update (encoder + its rows after steps 1-2) is clipped to L2 norm
   <= C_user = `hics_user_clip` x the round's median of those norms.
Then FedAvg (interaction-weighted). The thresholds are relative to the round's medians because
update scales differ across datasets, models and training stages (as `norm_bound` 0).
A client's weight in the log is the share of its update's L2 norm that reached the model.
Nothing extra is uploaded or sent: the rule reads the usual uploads (bytes per round as FedAvg).

A consequence of step 2, measured (README, peers; `bench/hics_rows.py`): a client's own items are its largest rows
and its sampled negatives' rows scale with the item's score, so the kept ones are its own items and the negatives of
popular items, almost never those of cold items (on mind-small 1% of cold negatives kept, 65% of popular ones). On
mind-small this stalls training in 2 of 3 seeds (no cold item in anyone's top 10); `hics_keep=1` (clipping only)
trains there like FedAvg.
"""
from __future__ import annotations

from typing import Any

import torch

from fortress.server.aggregate import NoState, Outcome, fedavg
from fortress.updates import Updates


def rank_in_client(rows_client: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(M,) 0-based rank of each row among its client's rows by descending score."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(rows_client[order], stable=True)]                      # by client, then score
    counts = torch.bincount(rows_client, minlength=int(rows_client.max()) + 1 if len(rows_client) else 0)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - start[rows_client[order]]
    return rank


def hics(u: Updates, item_clip: float, keep: float, user_clip: float) -> tuple[Updates, torch.Tensor, dict[str, Any]]:
    """The round's uploads after item clipping, sparsification and user clipping; the share of each
    client's update norm kept (n,); a log."""
    n, M = u.n, len(u.rows_item)
    row_norm = torch.linalg.vector_norm(u.rows_delta.double(), dim=1)                  # (M,)
    top = torch.zeros(n, dtype=torch.float64, device=u.dense.device)
    top.scatter_reduce_(0, u.rows_client, row_norm, "amax", include_self=True)         # (n,) largest row norm
    c_item = item_clip * float(top.median()) if n else 0.0
    row_scale = (c_item / row_norm.clamp(min=1e-30)).clamp(max=1.0) if c_item > 0 else torch.ones_like(row_norm)
    per_client = torch.bincount(u.rows_client, minlength=n)                            # (n,)
    k = torch.ceil(keep * per_client.double()).clamp(min=1)                            # (n,)
    kept = rank_in_client(u.rows_client, row_norm) < k[u.rows_client] if M else torch.zeros(0, dtype=torch.bool)
    row_scale = row_scale * kept                                                       # (M,) zeroed rows: 0
    dense_norm = torch.linalg.vector_norm(u.dense.double(), dim=1)                     # (n,)
    sq = dense_norm ** 2
    sq.index_add_(0, u.rows_client, (row_norm * row_scale) ** 2)
    size = sq.sqrt()                                                                   # (n,) after steps 1-2
    c_user = user_clip * float(size.median()) if n else 0.0
    user_scale = (c_user / size.clamp(min=1e-30)).clamp(max=1.0) if c_user > 0 else torch.ones_like(size)
    dt = u.dense.dtype
    out = Updates(u.clients, u.weight, u.dense * user_scale.to(dt)[:, None], u.rows_client, u.rows_item,
                  u.rows_delta * (row_scale * user_scale[u.rows_client]).to(dt)[:, None], u.loss, u.terms)
    raw = torch.sqrt(dense_norm ** 2 + torch.zeros_like(dense_norm).index_add_(0, u.rows_client, row_norm ** 2))
    share = torch.where(raw > 0, size * user_scale / raw.clamp(min=1e-30), torch.ones_like(raw))
    log = {"c_item": c_item, "c_user": c_user, "rows_clipped": int((row_norm > c_item).sum()) if c_item > 0 else 0,
           "rows_zeroed": int((~kept).sum()) if M else 0, "users_clipped": int((size > c_user).sum()) if c_user > 0 else 0}
    return out, share.clamp(0.0, 1.0).to(u.weight.dtype), log


class HicsServer(NoState):
    """`defence=hics`: hierarchical clipping (item rows, then users) with sparsified rows, then FedAvg."""

    name = "hics"
    on_host = True        # its state and generators live on the CPU (`rounds.home`)

    def __init__(self, item_clip: float, keep: float, user_clip: float):
        self.item_clip, self.keep, self.user_clip = item_clip, keep, user_clip

    @classmethod
    def from_config(cls, cfg, n_items: int) -> "HicsServer":
        return cls(cfg.hics_item_clip, cfg.hics_keep, cfg.hics_user_clip)

    def aggregate(self, u: Updates, params: dict[str, torch.Tensor]) -> Outcome:
        out, share, log = hics(u, self.item_clip, self.keep, self.user_clip)
        return Outcome(fedavg(out), share, log)

