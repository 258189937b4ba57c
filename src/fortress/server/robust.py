"""Robust aggregation baselines: coordinate-wise median, trimmed mean, Krum / Multi-Krum, norm bounding.

Every rule sees the round's uploads the way FedAvg does: the dense encoder over all clients, and
each item row over only the clients that uploaded that row (a row nobody touched stays as it is).
A rule is a pure function on one group of contributions, x (R, c, D) with FedAvg weights w (R, c)
-> aggregate (R, D) and `used` (R, c), the share of each contribution's coordinates that the
aggregate used; `rowwise` applies it to the encoder (one group of n clients) and to the item rows
(rows grouped by their number of contributors c, so each group is one dense tensor). Each
returns the Aggregate and per-client weights (n,) in [0, 1]: the share of a client's uploaded
coordinates that reached the model (FedAvg: 1 for everyone), which the round log reports.

Median and trimmed mean are unweighted, as in their papers; Multi-Krum averages the selected
contributions with their FedAvg weights. A row with few contributors gives a robust statistic
little to work with: with c <= 1 / trim_frac a trimmed mean trims nothing, and a cold item that
only its sampled negatives and a few attackers touch can have attackers as its majority.

- Median, trimmed mean: Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates", ICML 2018.
- Krum, Multi-Krum: Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017.
- Norm bounding: Sun et al., "Can You Really Backdoor Federated Learning?", 2019.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from fortress.server.aggregate import Aggregate, FedAvgSum, fedavg
from fortress.updates import Updates, norms

Rule = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def row_groups(rows_item: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uploaded rows grouped by item: per contributor count c, (items (R,), indices into the rows (R, c))."""
    if not len(rows_item):
        return []
    order = torch.argsort(rows_item, stable=True)                                      # (M,)
    items, counts = torch.unique_consecutive(rows_item[order], return_counts=True)     # (U,), (U,)
    starts = torch.cumsum(counts, 0) - counts
    groups = []
    for c in counts.unique().tolist():
        sel = counts == c
        idx = starts[sel][:, None] + torch.arange(c, device=rows_item.device)          # (R, c)
        groups.append((items[sel], order[idx]))
    return groups


# values a rule sees at once (a block of item rows, or of encoder coordinates for a coordinate-wise rule):
# bounds its temporaries (a sort holds the values and their int64 indices), not the uploads themselves
BLOCK = 1 << 22


def rowwise(u: Updates, rule: Rule, coordinatewise: bool = False) -> tuple[Aggregate, torch.Tensor]:
    """Apply `rule` to the encoder over all clients and to each item row over its uploaders.

    Item rows go to the rule a block at a time (rows are independent under every rule); with
    `coordinatewise` (median, trimmed mean) so do blocks of encoder coordinates. Either way the
    round's uploads are all held: these rules compare every client with every other.
    """
    P, d = u.dense.shape[1], u.rows_delta.shape[1]
    dev = u.dense.device
    step = P if not coordinatewise else max(1, BLOCK // max(1, u.n))
    blocks, used = [], torch.zeros(1, u.n, dtype=torch.float64, device=dev)
    for a in range(0, P, step):
        agg, used_b = rule(u.dense[None, :, a:a + step], u.weight[None])              # (1, D), (1, n)
        blocks.append(agg)
        used += used_b.double() * (agg.shape[1] / P)
    dense = torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]                     # (1, P)
    got = used[0] * P                                                                  # (n,) coordinates used
    total = torch.full((u.n,), float(P), dtype=torch.float64, device=dev)
    total.index_add_(0, u.rows_client, torch.full((len(u.rows_client),), float(d), dtype=torch.float64, device=dev))
    items, deltas = [], []
    for group_items, idx in row_groups(u.rows_item):
        rows = max(1, BLOCK // (idx.shape[1] * d))
        for a in range(0, len(idx), rows):
            owner = u.rows_client[idx[a:a + rows]]                                     # (R, c)
            agg, used_r = rule(u.rows_delta[idx[a:a + rows]], u.weight[owner])         # (R, d), (R, c)
            items.append(group_items[a:a + rows])
            deltas.append(agg)
            got.index_add_(0, owner.flatten(), used_r.flatten().double() * d)
    rows_item = torch.cat(items) if items else torch.zeros(0, dtype=torch.int64, device=dev)
    rows_delta = torch.cat(deltas) if deltas else u.rows_delta[:0]
    return Aggregate(dense[0], rows_item, rows_delta), (got / total).to(u.weight.dtype)


def _used_from(idx: torch.Tensor, share: float, c: int) -> torch.Tensor:
    """(R, k, D) contributor index of each used value -> (R, c) share of each contributor's D coordinates used."""
    R, _, D = idx.shape
    counts = torch.zeros(R, c, dtype=torch.float64, device=idx.device).scatter_add_(
        1, idx.reshape(R, -1), torch.full((R, idx[0].numel()), share, dtype=torch.float64, device=idx.device))
    return counts / D


def median_rule(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate-wise median over contributors (the mean of the two middle values when c is even)."""
    c = x.shape[1]
    vals, idx = x.sort(dim=1)                                                          # (R, c, D)
    lo, hi = (c - 1) // 2, c // 2
    agg = 0.5 * (vals[:, lo] + vals[:, hi])                                            # (R, D)
    mid = idx[:, [lo]] if lo == hi else idx[:, [lo, hi]]                               # (R, 1 or 2, D)
    return agg, _used_from(mid, 1.0 if lo == hi else 0.5, c).to(x.dtype)


def trimmed_mean_rule(frac: float) -> Rule:
    """Per coordinate, drop the floor(frac c) largest and smallest values and average the rest."""
    def rule(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        k = int(math.floor(frac * c))
        vals, idx = x.sort(dim=1)                                                      # (R, c, D)
        agg = vals[:, k:c - k].mean(1)                                                 # (R, D)
        return agg, _used_from(idx[:, k:c - k], 1.0, c).to(x.dtype)
    return rule


# values of the contributions copied to float64 at once for Krum's distances: above it, the squared distances
# are summed over blocks of coordinates (the encoder of a large round: no float64 copy of every upload)
DIST_BLOCK = 1 << 25


def sq_distances(x: torch.Tensor) -> torch.Tensor:
    """(R, c, D) -> (R, c, c) float64 squared Euclidean distances between the c contributions of each group,
    as sums over blocks of coordinates when x holds more than DIST_BLOCK values (the same up to float sums)."""
    R, c, D = x.shape
    if R * c * D <= DIST_BLOCK:
        return torch.cdist(x.double(), x.double()).pow(2)
    step = max(1, DIST_BLOCK // (R * c))
    d2 = torch.zeros(R, c, c, dtype=torch.float64, device=x.device)
    for s in range(0, D, step):
        xb = x[:, :, s:s + step].double()
        d2 += torch.cdist(xb, xb).pow(2)
    return d2


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of each contributor: sum of squared distances to its c - f - 2 nearest others (R, c)."""
    c = x.shape[1]
    if c == 1:
        return torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device)
    d2 = sq_distances(x)                                                               # (R, c, c) float64
    d2 = d2 + torch.diag(torch.full((c,), float("inf"), dtype=d2.dtype, device=d2.device))   # not oneself
    k = min(c - 1, max(1, c - f - 2))
    return d2.topk(k, dim=2, largest=False).values.sum(2).to(x.dtype)


def krum_rule(frac: float, multi: bool) -> Rule:
    """Krum: the contribution with the lowest score; Multi-Krum: the weighted mean of the c - f lowest."""
    def rule(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        f = int(math.floor(frac * c))
        m = max(1, c - f) if multi else 1
        chosen = krum_scores(x, f).topk(m, dim=1, largest=False).indices               # (R, m)
        used = torch.zeros_like(w).scatter_(1, chosen, 1.0)                            # (R, c)
        ww = w * used
        agg = (ww[:, :, None] * x).sum(1) / ww.sum(1, keepdim=True).clamp(min=1e-12)   # (R, D)
        if not multi:                        # Krum picks one contribution whatever its weight
            agg = x.gather(1, chosen[:, :, None].expand(-1, 1, x.shape[2]))[:, 0]
        return agg, used
    return rule


def median(u: Updates) -> tuple[Aggregate, torch.Tensor]:
    return rowwise(u, median_rule, coordinatewise=True)


def trimmed_mean(u: Updates, frac: float) -> tuple[Aggregate, torch.Tensor]:
    return rowwise(u, trimmed_mean_rule(frac), coordinatewise=True)


def krum(u: Updates, frac: float) -> tuple[Aggregate, torch.Tensor]:
    return rowwise(u, krum_rule(frac, multi=False))


def multi_krum(u: Updates, frac: float) -> tuple[Aggregate, torch.Tensor]:
    return rowwise(u, krum_rule(frac, multi=True))


def norm_bound(u: Updates, bound: float) -> tuple[Aggregate, torch.Tensor]:
    """Scale each client's whole update (encoder and rows) to L2 norm <= bound, then FedAvg.

    bound 0 = the round's median client norm (an adaptive bound: the scale of updates differs
    across datasets, models and training stages, so no absolute default fits all).
    """
    scale = norm_bound_scale(norms(u), bound).to(u.dense.dtype)                        # (n,)
    clipped = Updates(u.clients, u.weight, u.dense * scale[:, None], u.rows_client, u.rows_item,
                      u.rows_delta * scale[u.rows_client, None], u.loss)
    return fedavg(clipped), scale


def norm_bound_scale(size: torch.Tensor, bound: float) -> torch.Tensor:
    """(n,) float64 each client's clip factor, from its update's L2 norm (n,) (`norm_bound`)."""
    tau = float(size.quantile(0.5)) if bound <= 0 else bound
    return (tau / size.clamp(min=1e-12)).clamp(max=1.0)


def norm_bound_parts(parts: Iterable[Updates], size: torch.Tensor, bound: float, n_items: int) -> tuple[Aggregate, torch.Tensor]:
    """`norm_bound` on a round read part by part (at least one), given every client's norm (n,) from an earlier
    read: each part clipped and added to running FedAvg sums (the same result up to the order of float sums);
    the scales are float64."""
    scale = norm_bound_scale(size, bound)
    total, at = None, 0
    for u in parts:
        if total is None:
            total = FedAvgSum(u.dense.shape[1], u.rows_delta.shape[1], n_items, u.dense.dtype, u.dense.device)
        s = scale[at:at + u.n].to(u.dense.dtype)
        at += u.n
        total.add(u, dense_scale=s, row_scale=s[u.rows_client])
    return total.result(), scale
