"""The FORTRESS server's public rules as pure functions of a round's uploads.

The server (`fortress.server.fortress`) applies them to the real uploads; an adaptive attacker
(`fortress.attacks.adaptive`), who has read this code, applies the same functions to uploads it
simulates on the broadcast model to estimate where the thresholds lie. Nothing here holds state.

A client's *contribution* to an item row (or to the encoder) is what FedAvg adds to the
numerator of that average: its effective weight times its delta, v = w_eff x delta. The effective
weight is the reported weight clamped to what a client can have trained on, [W_MIN, max_len + 1]
(a client trains on its last max_len + 1 items and needs two of them). Bounding v, not delta,
makes a reported weight worthless to a liar: a larger weight only enlarges the denominator.
"""
from __future__ import annotations

import torch

from fortress.updates import Updates

W_MIN = 2.0               # a client trains on at least two items (one input, one next item)
HORIZON = 100             # rounds an item's popularity rate averages over (a warm monitor's step is 1 / HORIZON)


def effective_weight(u: Updates, max_len: int) -> torch.Tensor:
    """(n,) float64 reported weights clamped to [W_MIN, max_len + 1]."""
    return u.weight.double().clamp(min=W_MIN, max=max_len + 1)


def row_contrib_norms(u: Updates, w_eff: torch.Tensor) -> torch.Tensor:
    """(M,) ||w_eff x delta|| of every uploaded item row."""
    return w_eff[u.rows_client] * u.rows_delta.norm(dim=1).double()


def dense_contrib_norms(u: Updates, w_eff: torch.Tensor) -> torch.Tensor:
    """(n,) ||w_eff x delta|| of every client's encoder update."""
    return w_eff * u.dense.norm(dim=1).double()


def client_max(values: torch.Tensor, rows_client: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the largest of each client's row values (0 for a client without rows)."""
    out = torch.zeros(n, dtype=values.dtype)
    return out.scatter_reduce_(0, rows_client, values, reduce="amax", include_self=True)


def clip_scales(u: Updates, max_len: int, row_clip: float, dense_clip: float,
                row_norms: torch.Tensor | None = None, dense_norms: torch.Tensor | None = None) -> tuple[float, float]:
    """(C_row, C_dense): row_clip x the median over clients of their largest row contribution, and
    dense_clip x the median encoder contribution. Medians: a minority cannot move them.
    row_norms (M,) / dense_norms (n,): the contribution norms when already computed."""
    if not u.n:
        return 0.0, 0.0
    w = effective_weight(u, max_len)
    rn = row_contrib_norms(u, w) if row_norms is None else row_norms
    dn = dense_contrib_norms(u, w) if dense_norms is None else dense_norms
    top = client_max(rn, u.rows_client, u.n)                                            # (n,)
    return row_clip * float(top.quantile(0.5)), dense_clip * float(dn.quantile(0.5))


def pushes(row_norms: torch.Tensor, c_row: float, push_frac: float) -> torch.Tensor:
    """(M,) bool: rows whose (clipped) contribution is at least push_frac x C_row, i.e. that push
    their item like a client's own next item does (sampled negatives move far less)."""
    return row_norms.clamp(max=c_row) >= push_frac * c_row


def count_floor(n_pushes: int, n_items: int, floor_frac: float) -> float:
    """The smallest popularity rate an item is judged by: floor_frac x the round's mean pushes per item."""
    return floor_frac * n_pushes / max(1, n_items)


def surprising(count: torch.Tensor, rate: torch.Tensor, p_flag: float) -> torch.Tensor:
    """(N,) bool: count >= 2 and P(Poisson(rate) >= count) < p_flag (more distinct pushers than the
    item's own rate makes plausible). count (N,) int, rate (N,) float64 > 0."""
    c = count.double()
    tail = torch.special.gammainc(c.clamp(min=1.0), rate)          # P(X >= c) for X ~ Poisson(rate)
    return (count >= 2) & (tail < p_flag)


def allowance(rate: torch.Tensor, p_flag: float, cap: int) -> torch.Tensor:
    """(N,) int64: the largest count k <= cap that `surprising` does not flag at `rate` (at least 1)."""
    k = torch.arange(1, cap + 1, dtype=torch.float64)                                   # (K,)
    ok = torch.special.gammainc(k[None, :], rate[:, None]) >= p_flag                     # (N, K)
    ok[:, 0] = True                                                                      # one pusher is never flagged
    # counts up to the first one that is flagged
    first_bad = torch.where(~ok, k[None, :], torch.full_like(k[None, :], cap + 1.0)).amin(1)
    return (first_bad - 1).clamp(min=1).long()
