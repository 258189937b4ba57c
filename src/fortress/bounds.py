"""The FORTRESS server's public rules as pure functions of a round's uploads.

The server (`fortress.server.fortress`) applies them to the real uploads; an adaptive attacker
(`fortress.attacks.adaptive`), who has read this code, applies the same functions to uploads it
simulates on the broadcast model to estimate where the thresholds lie. Nothing here holds state.

A client's *contribution* to an item row (or to the encoder) is what FedAvg adds to the
numerator of that average: its effective weight times its delta, v = w_eff x delta. The effective
weight is the reported weight clamped to what a client can have trained on, [W_MIN, ceiling]
(`weight_ceiling`): a client needs two items, and trains on its last max_len + 1 items, or, with
whole-history training, on its whole sequence; then the server checks the claim against the
upload itself: a client uploads a row for each of its own items plus the n_neg negatives it
samples, so its rows beyond n_neg bound its distinct items, and the ceiling is the larger of that
and max_len + 1. Bounding v, not delta, makes a reported weight worthless to a liar: a larger
weight only enlarges the denominator. (Rows beyond n_neg can be padded with rows of zero delta:
a liar that uploads k extra rows may claim k interactions, which again buys only a larger
denominator, up to the catalogue size instead of max_len + 1.)
"""
from __future__ import annotations

import torch

from fortress.updates import Updates

W_MIN = 2.0               # a client trains on at least two items (one input, one next item)
HORIZON = 100             # rounds an item's popularity rate averages over (a warm monitor's step is 1 / HORIZON)
WARMUP = 10               # a new monitor's first rounds learn every item's rate at the full step
FLAGGED_SPEED = 0.1       # afterwards a round in which an item is flagged teaches its rate this share of a step
WINDOW = 10               # rounds of recent push mass a crowd is also judged over (a decayed sum, decay 1 - 1 / WINDOW)


def weight_ceiling(u: Updates, max_len: int, whole_history: bool = False, n_neg: int = 0) -> torch.Tensor | float:
    """The most train interactions a client can claim: max_len + 1 (its last window), or, when clients train
    on their whole history, (n,) float64 the larger of that and its uploaded rows beyond the n_neg negatives
    it samples (its own items: a lower bound on its history's length, exact without repeated items)."""
    if not whole_history:
        return float(max_len + 1)
    rows = torch.zeros(u.n, dtype=torch.float64, device=u.rows_client.device).index_add_(
        0, u.rows_client, torch.ones(len(u.rows_client), dtype=torch.float64, device=u.rows_client.device))
    return (rows - n_neg).clamp(min=max_len + 1)


def effective_weight(u: Updates, max_len: int, whole_history: bool = False, n_neg: int = 0) -> torch.Tensor:
    """(n,) float64 reported weights clamped to [W_MIN, weight_ceiling]."""
    ceiling = weight_ceiling(u, max_len, whole_history, n_neg)
    if isinstance(ceiling, float):
        return u.weight.double().clamp(min=W_MIN, max=ceiling)
    return torch.minimum(u.weight.double().clamp(min=W_MIN), ceiling.to(u.weight.device))


def row_contrib_norms(u: Updates, w_eff: torch.Tensor) -> torch.Tensor:
    """(M,) ||w_eff x delta|| of every uploaded item row."""
    return w_eff[u.rows_client] * u.rows_delta.norm(dim=1).double()


def dense_contrib_norms(u: Updates, w_eff: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) ||w_eff x delta|| of every client's encoder update (norms: the (n,) ||delta||, if already taken)."""
    return w_eff * (u.dense.norm(dim=1) if norms is None else norms).double()


def client_max(values: torch.Tensor, rows_client: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the largest of each client's row values (0 for a client without rows)."""
    out = torch.zeros(n, dtype=values.dtype)
    return out.scatter_reduce_(0, rows_client, values, reduce="amax", include_self=True)


def clip_scales(u: Updates, max_len: int, row_clip: float, dense_clip: float,
                row_norms: torch.Tensor | None = None, dense_norms: torch.Tensor | None = None,
                whole_history: bool = False, n_neg: int = 0) -> tuple[float, float]:
    """(C_row, C_dense): row_clip x the median over clients of their largest row contribution, and
    dense_clip x the median encoder contribution. Medians: a minority cannot move them.
    row_norms (M,) / dense_norms (n,): the contribution norms when already computed; max_len,
    whole_history and n_neg as in `effective_weight`."""
    if not u.n:
        return 0.0, 0.0
    w = effective_weight(u, max_len, whole_history, n_neg)
    rn = row_contrib_norms(u, w) if row_norms is None else row_norms
    dn = dense_contrib_norms(u, w) if dense_norms is None else dense_norms
    return clips(client_max(rn, u.rows_client, u.n), dn, row_clip, dense_clip)


def clips(top: torch.Tensor, dense_norms: torch.Tensor, row_clip: float, dense_clip: float) -> tuple[float, float]:
    """(C_row, C_dense) from each client's largest row contribution top (n,) and encoder contribution (n,)."""
    return row_clip * float(top.quantile(0.5)), dense_clip * float(dense_norms.quantile(0.5))


def push_equivalents(row_norms: torch.Tensor, c_row: float) -> torch.Tensor:
    """(M,) each row's clipped contribution in units of C_row: min(1, ||w_eff x delta|| / C_row)."""
    return (row_norms / max(c_row, 1e-300)).clamp(max=1.0)


def pushes(equiv: torch.Tensor, push_frac: float) -> torch.Tensor:
    """(M,) bool: rows of at least push_frac push-equivalents, i.e. that push their item (a client's own
    next item gives about one; a sampled negative about a hundredth)."""
    return equiv >= push_frac


def rate_floor(mass: float, n_items: int, floor_frac: float) -> float:
    """The smallest popularity rate an item is judged by: floor_frac x `mass` (a round's push mass, or the
    sum of the items' rates) per item."""
    return floor_frac * mass / max(1, n_items)


def surprising(mass: torch.Tensor, rate: torch.Tensor, p_flag: float) -> torch.Tensor:
    """(N,) bool: push mass >= 2 and P(X >= mass) < p_flag for X ~ Poisson(rate), the tail taken as the
    regularised incomplete gamma function so that it is defined for fractional mass (a count of pushers
    when every push is whole). mass (N,) float, rate (N,) float64 > 0."""
    m = mass.double()
    out = m >= 2
    idx = out.nonzero().flatten()                                  # the tail only where it can flag
    out[idx] = torch.special.gammainc(m[idx], rate[idx]) < p_flag   # P(X >= m) for X ~ Poisson(rate)
    return out


def allowance(rate: torch.Tensor, p_flag: float, cap: float | torch.Tensor) -> torch.Tensor:
    """(N,) float64: the largest push mass in [1, cap] that `surprising` does not flag at `rate`
    (cap: one for all items, or (N,) one per item)."""
    lo = torch.ones_like(rate)
    hi = (cap.double().clamp(min=1.0) if torch.is_tensor(cap) else torch.full_like(rate, float(max(cap, 1.0))))
    ok_hi = torch.special.gammainc(hi, rate) >= p_flag
    for _ in range(40):                                              # bisection: tail(m) falls with m
        mid = (lo + hi) / 2
        ok = torch.special.gammainc(mid, rate) >= p_flag
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(ok_hi, hi, lo).clamp(min=1.0)


def decay(window: int) -> float:
    """The per-round decay of the recent push mass: its mean is window x the rate at a steady rate."""
    return 1.0 - 1.0 / window


def window_allowance(rate: torch.Tensor, recent: torch.Tensor, p_flag: float, window: int, cap: float) -> torch.Tensor:
    """(N,) float64: the largest push mass this round that keeps decay x recent + mass unflagged by
    `surprising` at window x rate, at least 0 (a crowd that has used up its window gets nothing more).
    rate (N,) > 0, recent (N,) the decayed sum of the push mass kept in past rounds."""
    held = decay(window) * recent
    total = allowance(window * rate, p_flag, cap + float(held.max()) if len(held) else cap)
    return (total.clamp(min=2.0) - held).clamp(min=0.0)     # a total below 2 is never flagged


def flagged_allowance(rate: torch.Tensor, recent: torch.Tensor, p_flag: float, window: int, cap: float) -> torch.Tensor:
    """(N,) float64: min(`allowance`, `window_allowance`), the two bisections run as one over 2N items
    (the same values: every step is elementwise)."""
    n = len(rate)
    held = decay(window) * recent
    caps = torch.full((2 * n,), float(cap), dtype=torch.float64)
    if n:
        caps[n:] = cap + float(held.max())                 # window_allowance's cap
    both = allowance(torch.cat([rate, window * rate]), p_flag, caps)
    return torch.minimum(both[:n], (both[n:].clamp(min=2.0) - held).clamp(min=0.0))


# --- coordinated encoder pushes ---------------------------------------------------------------
# Honest clients' encoder updates are close to orthogonal to each other (each follows its own short
# history; their pairwise cosines sit near 0), so a round's encoder average is mostly noise that
# cancels, and a few clients that all push one direction move it far more than their number says.
# A client whose encoder contribution points the way of many others' beyond what honest pairs show
# is counted, with them, as about one client.
SKETCH = 1024          # width of the random sketch the pairwise cosines are taken on
SKETCH_BLOCK = 8       # rows of x per step of the sketch's pass (a block of encoder deltas, ~2 MB, stays in cache)
COHERENT_Q = 0.95      # a pair is coherent when its cosine is above this quantile of the round's pairs (robust
                       # while the attackers hold fewer than ~20% of the clients, i.e. 5% of the pairs)


def sketch_signs(P: int, width: int, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    """The random signs of a sketch of P coordinates to `width` columns: s1 ((P // width + 1,)) and s2 ((width,))."""
    k = P // width
    s1 = torch.randint(0, 2, (k + 1,), generator=gen).to(dtype) * 2 - 1
    s2 = torch.randint(0, 2, (width,), generator=gen).to(dtype) * 2 - 1
    return s1, s2


def sketch(x: torch.Tensor, width: int, gen: torch.Generator | None = None, norms: bool = False,
           signs: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(n, P) -> (n, width): coordinate j goes to column j mod width with a random sign s1[j // width] x
    s2[j mod width], both drawn anew from `gen` (or given: `signs`, from `sketch_signs`, so that parts of
    a round's rows are sketched alike). Any two coordinates that share a column get independent
    signs, so inner products are kept in expectation, up to ~1/sqrt(width) of the norms; the rank-one
    sign pattern makes it one pass over x (a batched matrix-vector product). With norms=True also the
    (n,) row norms of x, taken in the same pass (SKETCH_BLOCK rows at a time, each block read from memory
    once): returns (sketch, norms). Each row's sketch depends on that row alone."""
    n, P = x.shape
    k = P // width
    s1, s2 = sketch_signs(P, width, gen, x.dtype) if signs is None else signs
    y = x.new_zeros(n, width)
    row_norms = x.new_empty(n) if norms else None
    for i in range(0, n, SKETCH_BLOCK):
        block = x[i:i + SKETCH_BLOCK]
        if norms:
            row_norms[i:i + SKETCH_BLOCK] = block.norm(dim=1)
        if k:
            y[i:i + SKETCH_BLOCK] = torch.matmul(s1[:k], block[:, :k * width].view(len(block), k, width))
    tail = x[:, k * width:]                                                          # (n, P - k width)
    y[:, :tail.shape[1]] += s1[k] * tail
    return (y * s2, row_norms) if norms else y * s2


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """`x.quantile(q)` of a 1-D tensor (linear interpolation, the same value to the bit) by one
    selection and a pass instead of a sort: O(n) for the 65k pairwise cosines of a round."""
    rank = torch.tensor(q, dtype=x.dtype) * (x.numel() - 1)        # as torch.quantile computes it
    lo, hi = int(rank), int(torch.ceil(rank))
    below = x.kthvalue(lo + 1).values
    if hi == lo or int((x <= below).sum()) >= lo + 2:               # the next value ties it
        above = below
    else:                                                           # else the smallest value above it
        above = x[x > below].min()
    return below.lerp(above, rank - lo)


def coherence(cos: torch.Tensor, q: float) -> tuple[torch.Tensor, float]:
    """Each client's coherence excess x_c = sum over other clients of max(0, cos - b), b the q-quantile of
    the round's pairwise cosines (a minority of pairs cannot move it). cos (n, n) -> ((n,), b)."""
    n = cos.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    b = float(quantile(cos[off], q)) if n > 2 else 1.0
    return ((cos - b).clamp(min=0) * off).sum(1), b


COS_BLOCK = 1 << 22     # pairwise cosines computed at once by `coherence_blocked` (16 MB in float32)
COS_BINS = 1 << 20      # bins of its histogram pass


def coherence_blocked(x: torch.Tensor, q: float, block: int | None = None) -> tuple[torch.Tensor, float]:
    """`coherence(x @ x.T, q)` of unit rows x (n, k) without the (n, n) matrix when it holds more than `block`
    values (COS_BLOCK unless given): three passes over row blocks of x @ x.T. A histogram of the off-diagonal
    cosines (COS_BINS bins over [-1, 1], a monotone map, so the bins keep their order) finds the bins holding
    the quantile's two order statistics; a second pass gathers the cosines of those bins, whose sort gives
    them exactly; a third sums each row's excess. Memory: a block of cosines and its temporaries, the
    histogram and the gathered bins. With one block it is `coherence` itself; with several, the blocked
    products may differ from the whole one in the last bits (tested against it)."""
    n = x.shape[0]
    rows = max(1, (COS_BLOCK if block is None else block) // max(n, 1))
    if rows >= n:
        return coherence(x @ x.T, q)
    rank = torch.tensor(q, dtype=x.dtype) * (n * (n - 1) - 1)       # as `quantile` (torch.quantile) computes it
    lo, hi = int(rank), int(torch.ceil(rank))

    def blocks():
        for s in range(0, n, rows):
            c = x[s:s + rows] @ x.T                                    # (b, n)
            i = torch.arange(len(c))
            yield s, c, (i, s + i)                                     # the block's diagonal

    def binned(c: torch.Tensor) -> torch.Tensor:                       # (b, n) int32 bins
        return torch.add(c, 1).mul_(COS_BINS / 2).clamp_(0, COS_BINS - 1).to(torch.int32)

    hist = torch.zeros(COS_BINS + 1, dtype=torch.int64)
    for s, c, diag in blocks():
        b = binned(c)
        b[diag] = COS_BINS                                             # the diagonal falls out of the count
        hist += torch.bincount(b.flatten(), minlength=COS_BINS + 1)
    ends = hist[:COS_BINS].cumsum(0)                                   # values in bins <= k
    b_lo, b_hi = int(torch.searchsorted(ends, lo, right=True)), int(torch.searchsorted(ends, hi, right=True))
    before = int(ends[b_lo - 1]) if b_lo else 0
    kept = []
    for s, c, diag in blocks():
        b = binned(c)
        b[diag] = -1
        kept.append(c[(b >= b_lo) & (b <= b_hi)])
    order = torch.cat(kept).sort().values
    bar = float(order[lo - before].lerp(order[hi - before], rank - lo))
    excess = torch.empty(n, dtype=x.dtype)
    for s, c, diag in blocks():
        e = c.sub_(bar).clamp_(min=0)
        e[diag] = 0
        excess[s:s + len(c)] = e.sum(1)
    return excess, bar


def coherence_factor(excess: torch.Tensor) -> torch.Tensor:
    """(n,) factor on each encoder contribution: 1 up to one duplicate's worth of excess, then 1 / excess
    (k identical clients then weigh about one client together)."""
    return 1.0 / excess.clamp(min=1.0)


# --- exposure on probe users ------------------------------------------------------------------
# What a promotion is for is exposure: the target in many users' top K. The rules above bound the
# uploads; this one bounds the outcome. After each update the server scores probe users (random
# sequences of items drawn by their popularity rates: no user data) and counts each item's share of
# top-K slots. Honest items earn exposure roughly in proportion to how often clients push them (an
# item's rate); an item exposed far beyond what its rate buys has its scores shrunk back to its cap.
PROBE_K = 20          # top-K the exposure is counted in (the largest K reported: caps K = 5 and 10 as well)
PROBE_LEN = 10        # probe sequences have 1..PROBE_LEN items
PROBE_MIN_USERS = 3   # an item counts towards the median exposure per rate once this many probe users see it
REACH_RANK = 10       # reach_cap is a multiple of the probe users this item (most seen first) reaches


def probe_sequences(rate: torch.Tensor, n: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """(n, L) left-padded sequences of 1..min(PROBE_LEN, max_len) items drawn in proportion to `rate`
    (N + 1,) (index 0, padding, never drawn)."""
    L = min(PROBE_LEN, max_len)
    p = rate.double().clamp(min=0).clone()
    p[0] = 0.0
    items = torch.multinomial(p / p.sum(), n * L, replacement=True, generator=gen).view(n, L)
    lens = torch.randint(1, L + 1, (n,), generator=gen)
    keep = torch.arange(L)[None, :] >= (L - lens)[:, None]                            # right-aligned
    return items * keep


def exposure_caps(count: torch.Tensor, rate: torch.Tensor, n: int, kappa: float, reach: float = 0.0) -> torch.Tensor:
    """(N + 1,) the most probe users each item may reach: kappa x the median, over items seen by at least
    PROBE_MIN_USERS probe users, of (users reached / rate), times the item's rate; with reach > 0 also at most
    reach x the users reached by the REACH_RANK-th most seen item. count (N + 1,) users whose top K holds the
    item; rate (N + 1,) > 0 (the monitor's rates, floored). A few attacked items cannot move a median over the
    ~100 exposed ones, nor the REACH_RANK-th largest reach. The second bound is for the item that buys its rate:
    a crowd of fake users that upload pushes of the target and no encoder change makes the target the most
    pushed item, and a rate-proportional cap then allows it every probe user (docs/results/adaptive.md)."""
    seen = count >= PROBE_MIN_USERS
    if not bool(seen.any()):
        return torch.full_like(rate, float(n))
    per_rate = float((count[seen].double() / rate[seen]).median())
    cap = kappa * per_rate * rate
    if reach > 0 and len(count) > REACH_RANK:
        ref = float(count[1:].topk(REACH_RANK).values[-1])
        cap = cap.clamp(max=max(reach * ref, PROBE_MIN_USERS))
    return cap


def shrink_to_cap(a: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor, in_top: torch.Tensor,
                  cap: torch.Tensor, steps: int = 40) -> torch.Tensor:
    """(V,) the largest s in [0, 1] such that scaling item v's scores by s leaves it in at most cap[v] probe
    users' top K. a (n, V) the items' scores; in_top (n, V) whether the item is in the user's top K;
    t_in / t_out (n,) the user's (K+1)-th / K-th largest score (the bar an item in / out of the top K must
    stay above). Bisection: the count falls as s falls for users with a > 0 (the ones that matter); s = 0
    where even a zero score stays above more than cap[v] bars (bars below 0)."""
    bar = torch.where(in_top, t_in[:, None], t_out[:, None])                           # (n, V)

    def reached(s: torch.Tensor) -> torch.Tensor:
        return ((s[None, :] * a) > bar).sum(0)

    lo, hi = torch.zeros(a.shape[1], dtype=a.dtype), torch.ones(a.shape[1], dtype=a.dtype)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = reached(mid) <= cap
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(reached(torch.ones_like(lo)) <= cap, torch.ones_like(lo), lo)
