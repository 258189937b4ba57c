"""The FORTRESS server: bounded contributions, a popularity monitor of push mass, L_sep + L_var.

Threat model: the attacker has read this file and `fortress.bounds`, knows the config, sees the
broadcast model, controls a few percent of the clients (coordinated: any upload, any reported
weight) and can spread its push over rounds. What no server can tell apart, one client at a time,
is a fake user who trains honestly on a sequence holding the target (data poisoning). So the rule
aims at: a model-poisoning client buys no more influence than such an honest fake user, and a
sudden crowd of new fans of an item is seen and slowed down.

Each round (`FortressServer.aggregate`, then `after_apply` with its `Outcome`):
1. Bounded contributions (`fortress.bounds`). A client's contribution to an item row or to the
   encoder is w_eff x delta, w_eff the reported weight clamped to [2, ceiling], the ceiling what the
   client can have trained on (`bounds.weight_ceiling`: max_len + 1, or with whole-history
   training the larger of that and its uploaded rows beyond n_neg). Each row
   contribution is clipped to C_row = row_clip x the round's median over clients of their largest
   row contribution (the push an ordinary client gives its own next item), the encoder
   contribution to C_dense = dense_clip x the round's median. The averages divide by the sum of
   w_eff as FedAvg does, so a reported weight only buys a larger denominator. Medians: a minority
   cannot move them, and there is no per-client share or norm rank to game (an L1 share can be
   diluted with many small rows; a clip per row cannot).
   Coherence: honest encoder deltas point in nearly unrelated directions, so a round's encoder
   average is mostly noise that cancels, and clients that all push one way move it far more than
   their number. Each client's coherence excess is the sum, over the other clients, of how far the
   cosine of their encoder deltas exceeds the round's 95th-percentile pair cosine (taken on a
   random sketch, fresh each round); a client with an excess above 1 has its contribution divided by
   it, so that k clients pushing one direction weigh about one client (`fortress.bounds`): its encoder
   contribution and its rows alike (scaling the encoder alone changes what a crowd's upload does, not
   only how much: on amazon-cell-phones, fake users who train honestly on popular-looking sequences
   lost the encoder push that works against their own target and kept their target rows, and got more
   exposure than under FedAvg; docs/results/adaptive.md, "From scratch").
2. Push mass. A row's clipped contribution in units of C_row is its push-equivalent e in [0, 1]
   (a client's own next item gives about 1, a sampled negative a few thousandths). The item's push
   mass m_i = the sum of the e of all its rows this round: each client adds at most 1, splitting one
   push over many clients adds up the same, and many rows just under a threshold add up too (rows of
   e >= push_frac are the client's pushes, which tie its encoder to the item in step 4).
3. Monitor. Each item has a popularity rate r_i, the running mean of its push mass (horizon
   HORIZON rounds; a new monitor averages its first rounds plainly), and a recent mass R_i, the sum of
   its kept push mass decayed by 1 - 1/WINDOW a round. Item i is flagged when, for
   X ~ Poisson(max(r_i, floor)), floor = floor_frac x the mean rate over items (the round's mean push
   mass while the monitor is new): m_i >= 2 and P(X >= m_i) < p_flag (more fans in one round than its
   own past makes plausible), or, over the window, the decayed recent mass plus m_i is as surprising
   for WINDOW x X (a crowd that comes back round after round, each round under the first test). No
   item is immune: a popular item is judged by its own (large) rate.
4. Down-weighting. A flagged item keeps only its allowance a_i (the largest mass that neither test
   flags): all of its row contributions are scaled by a_i / m_i, so its average moves a_i pushes'
   worth, and each client that pushes it has its encoder contribution scaled by the smallest of
   those factors. Other rows of the client are untouched. The rate learns min(m_i, a_i), and after
   the monitor's first WARMUP rounds a round in which the item is flagged teaches it only
   FLAGGED_SPEED of a step: a target earns a rate no faster than an item that is never flagged, and
   its pushes over any WINDOW rounds add up to what that rate makes plausible, not to a round's
   allowance every round.
5. Embedding regularisation (after the update, rounds with flagged items): `server_steps`
   gradient steps on alpha L_sep + beta L_var over the directions of P (the popular_frac items of
   largest rate, without items flagged in the last HORIZON rounds) and S (this round's flagged
   items), every row keeping its length; see `regularise`.
6. Exposure cap (after the update, every round once the monitor is warm): the rules above bound
   the uploads, round by round; over hundreds of rounds the shares they let through (a cold item's
   ~0.4 pushes a round, the coordinated encoder push coherence allows) still add up. What a
   promotion is for is exposure, so the server also bounds the outcome: it scores `probe_users`
   synthetic users (sequences of 1..PROBE_LEN items drawn by the monitor's floored rates: no user
   data, a fresh draw from its own generator each round) and counts each item's probe users with the
   item in their top PROBE_K. An item may reach `exposure_cap` x (the median over exposed items of
   probe users reached per unit of rate) x its own rate; an item above that has its row scaled down
   (one factor in [0, 1], by bisection) until it reaches no more than its cap. Honest items earn
   exposure about in proportion to their rate (on the converged models of amazon-cell-phones and
   amazon-baby-chrono 99% of the exposed items reach at most 7.6x and 6.4x the median ratio), so the cap
   leaves nearly all of them alone; a cold target in everyone's list is pulled back whatever channel
   put it there.
   With reach_cap > 0 (opt-in) an item may also reach at most reach_cap x the probe users of the
   `bounds.REACH_RANK`-th most-reaching item: a crowd that uploads its target rows and no encoder change
   buys the catalogue's largest push rate, and the rate-proportional cap gives it every probe user.
Why sparse benign clients keep their weight: nothing here punishes a small norm, few rows, a low
weight or disagreement with the consensus; a short client's contributions sit below the medians,
and it loses weight only for a row of an item that is flagged in that round, or, in its whole upload,
when its encoder delta is coherent with many others' (rare on a trained model; more common early from scratch).
A round without clipping, flags, coherence-divided clients or capped items is exactly FedAvg with weights
clamped to [2, ceiling].
A round of more than `hold_clients` clients is not held: `aggregate_stream` reads its uploads three times,
part by part (the clients' statistics and sketches; the items' push mass; the clipped, scaled sums), with the
coherence rule's pairwise cosines in row blocks (`bounds.coherence_blocked`); the same rule, in bounded memory.
The monitor's state (rates, recent masses, flag times, rounds, generators) is saved in checkpoints and in model.pt, so a run
with `init_from` continues a defended model's monitor; a cold monitor learns its first rounds
as normal (see the README's threat-model section).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from fortress import bounds, memory
from fortress.errors import InputError
from fortress.models import Model
from fortress.server.aggregate import Aggregate, FedAvgSum, Outcome
from fortress.updates import Updates, concat, skeleton

HORIZON = bounds.HORIZON
WINDOW = bounds.WINDOW
WARMUP = bounds.WARMUP
FLAGGED_SPEED = bounds.FLAGGED_SPEED
MAX_LISTED = 20       # flagged item ids (most pushed first) written to the round log
PROBE_SEED = 7919     # the probe users' generator is seeded apart from the sketch's
TOPK_GROUP = 64       # columns per group in grouped_topk
PROBE_BLOCK = 64      # probe users scored together (a block's 64 x N scores fit in cache for its top k)


@dataclass(frozen=True)
class FortressConfig:
    popular_frac: float
    row_clip: float
    dense_clip: float
    push_frac: float
    p_flag: float
    floor_frac: float
    alpha: float
    beta: float
    margin: float
    knn: int
    server_steps: int
    server_lr: float
    probe_users: int
    exposure_cap: float
    max_len: int          # the protocol's max_len: a client trains on at most max_len + 1 items, or
    whole_history: bool = False   # with whole-history training on all of them (bounds.weight_ceiling)
    n_neg: int = 0                # the negatives each client samples (rows of its upload that are not its own)
    reach_cap: float = 0.0        # an item reaches at most this many times the REACH_RANK-th item's probe users (0 = off)

    @classmethod
    def from_config(cls, cfg) -> "FortressConfig":
        return cls(cfg.popular_frac, cfg.row_clip, cfg.dense_clip, cfg.push_frac, cfg.p_flag, cfg.floor_frac,
                   cfg.alpha, cfg.beta, cfg.margin, cfg.knn, cfg.server_steps, cfg.server_lr, cfg.probe_users,
                   cfg.exposure_cap, cfg.max_len, cfg.whole_history, cfg.n_neg, cfg.reach_cap)


def top_items(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k items (ids >= 1) with the largest score, ties to the smaller id; sorted ids."""
    s = score[1:]
    k = min(k, len(s))
    if k < 1:
        return torch.zeros(0, dtype=torch.int64)
    t = s.topk(k).values[-1]                                   # the k-th largest score: all above it are in,
    above = (s > t).nonzero().flatten()                        # then the smallest ids of those that tie it
    ties = (s == t).nonzero().flatten()[:k - len(above)]
    return torch.cat([above, ties]).sort().values + 1


def retained(u: Updates, w_eff: torch.Tensor, row_norm: torch.Tensor, row_kept: torch.Tensor,
             dense_norm: torch.Tensor, dense_kept: torch.Tensor) -> torch.Tensor:
    """(n,) ||kept contributions|| / ||FedAvg contributions (reported weight x delta)|| of each client."""
    scale = (u.weight.double() / w_eff)                                                 # reported / effective
    both = torch.stack([(dense_norm * scale) ** 2, (dense_norm * dense_kept) ** 2], 1)   # (n, 2) raw, kept
    both.index_add_(0, u.rows_client, torch.stack([(row_norm * scale[u.rows_client]) ** 2,
                                                   (row_norm * row_kept) ** 2], 1))     # one pass over the rows
    raw, kept = both[:, 0], both[:, 1]
    return torch.where(raw > 0, (kept / raw.clamp(min=1e-300)).sqrt(), torch.ones_like(raw)).clamp(max=1.0)


def l_sep(pop: torch.Tensor, sus: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over p, s of max(0, margin - ||e_p - e_s||): pop (P, d), sus (S, d) -> scalar."""
    if not len(pop) or not len(sus):
        return pop.sum() * 0.0
    dist = (pop[:, None, :] - sus[None, :, :]).pow(2).sum(2).clamp(min=1e-12).sqrt()   # (P, S)
    return torch.relu(margin - dist).mean()


def neighbours(pop: torch.Tensor, k: int) -> torch.Tensor:
    """(P, k) indices of each popular item's k nearest other popular items."""
    d = torch.cdist(pop, pop)                                                           # (P, P)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).indices


def l_var(pop: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """mean over p of ||e_p - mean of e over its neighbours nbr (P, k)||^2 -> scalar."""
    if not len(pop) or nbr.shape[1] == 0:
        return pop.sum() * 0.0
    centre = pop[nbr].mean(1)                                                           # (P, d)
    return (pop - centre).pow(2).sum(1).mean()


def var_operator(n_pop: int, nbr: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, P) M with M z = each popular row minus the mean of its neighbours nbr (P, k): L_var = |M z|^2 / P."""
    m = torch.eye(n_pop, dtype=dtype)
    if nbr.shape[1]:
        m.index_put_((torch.arange(n_pop).repeat_interleave(nbr.shape[1]), nbr.reshape(-1)),
                     torch.full((nbr.numel(),), -1.0 / nbr.shape[1], dtype=dtype), accumulate=True)
    return m


def reg_grad(z: torch.Tensor, n_pop: int, m: torch.Tensor | None, fc: FortressConfig,
             grad: bool = True) -> tuple[float, torch.Tensor | None]:
    """alpha L_sep + beta L_var at z = [P rows; S rows] (P + S, d), and its gradient in closed form
    (what autograd of `l_sep` / `l_var` gives, without their (P, S, d) differences: a pair's distance
    comes from one (P, S) product, so the cost is one GEMM, not passes over P S d floats).
    d|p - s| / dp = (p - s) / |p - s| for a pair inside the margin, so with c = alpha / (P S |p - s|)
    over those pairs, the L_sep gradient is -(p sum_s c - c s) for p and -(s sum_p c - c^T p) for s;
    with m = `var_operator` (None: no neighbours), L_var's is 2 beta / P M^T M p."""
    pop, sus = z[:n_pop], z[n_pop:]
    P, S = len(pop), len(sus)
    g, value = (torch.zeros_like(z) if grad else None), 0.0
    if P and S:
        d2 = pop.pow(2).sum(1)[:, None] + sus.pow(2).sum(1)[None, :] - 2 * pop @ sus.T            # (P, S)
        dist = d2.clamp(min=1e-12).sqrt()
        inside = dist < fc.margin
        value += fc.alpha * float(torch.where(inside, fc.margin - dist, 0.0).mean())
        if grad:
            c = torch.where(inside & (d2 > 1e-12), fc.alpha / (P * S) / dist, 0.0)                 # (P, S)
            g[:n_pop] -= pop * c.sum(1, keepdim=True) - c @ sus
            g[n_pop:] -= sus * c.sum(0)[:, None] - c.T @ pop
    if P and m is not None:
        r = m @ pop                                                                                 # (P, d)
        value += fc.beta * float(r.pow(2).sum(1).mean())
        if grad:
            g[:n_pop] += (2 * fc.beta / P) * (m.T @ r)
    return value, g


def regularise(table: torch.Tensor, popular: torch.Tensor, suspicious: torch.Tensor,
               fc: FortressConfig) -> dict[str, float]:
    """In place: `server_steps` gradient steps on alpha L_sep + beta L_var over the directions of
    the rows of P and S (unit vectors, renormalised after each step); every row keeps its length."""
    rows = torch.cat([popular, suspicious])
    n_pop = len(popular)
    length = table[rows].norm(dim=1, keepdim=True).clamp(min=1e-12)                     # (P + S, 1)
    z = table[rows] / length                                                            # (P + S, d) unit
    k = min(fc.knn, n_pop - 1)
    m = var_operator(n_pop, neighbours(z[:n_pop], k), z.dtype) if k > 0 else None
    first, g = reg_grad(z, n_pop, m, fc)
    for step in range(fc.server_steps):
        z = F.normalize(z - fc.server_lr * g, dim=1)
        last, g = reg_grad(z, n_pop, m, fc, grad=step < fc.server_steps - 1)
    table[rows] = (z * length).to(table.dtype)
    return {"reg_loss_before": first, "reg_loss_after": last if fc.server_steps else first}


def grouped_topk(s: torch.Tensor, k: int, group: int = TOPK_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """`s.topk(k, dim=1)` of scores s (b, n) in two steps: the k groups of `group` columns with the largest
    maxima (the top k can only lie in them, and in the last, partial group), then the top k of those
    columns. Same values; the same indices unless two columns tie at the k-th value."""
    b, n = s.shape
    ng = n // group
    if ng <= k:
        return s.topk(k, dim=1)
    main = s[:, :ng * group].view(b, ng, group)
    gi = main.amax(2).topk(k, dim=1).indices                                             # (b, k) groups
    cand = torch.cat([main.gather(1, gi[:, :, None].expand(-1, -1, group)).reshape(b, -1), s[:, ng * group:]], 1)
    v, j = cand.topk(k, dim=1)
    col = torch.cat([(gi[:, :, None] * group + torch.arange(group)).reshape(b, -1),
                     torch.arange(ng * group, n).expand(b, -1)], 1)
    return v, col.gather(1, j)


def probe_top(model: Model, params: dict[str, torch.Tensor], seqs: torch.Tensor, k: int):
    """Probe users' top k + 1 over the catalogue, their own items and padding left out:
    (h (n, d), scores (n, k + 1), items (n, k + 1), count (N + 1,) float64 users with each item in their top k)."""
    h = model.last(params, seqs)                                                         # (n, d)
    vals, top = [], []
    for i in range(0, len(h), PROBE_BLOCK):        # blocks of users: each block's scores stay in cache for its top k
        s = model.score(params, h[i:i + PROBE_BLOCK])                                    # (b, N+1)
        s[:, 0] = float("-inf")
        s.scatter_(1, seqs[i:i + PROBE_BLOCK], float("-inf"))                            # a user's own items
        v, t = grouped_topk(s, k + 1)                                                    # (b, k+1)
        vals.append(v)
        top.append(t)
    vals, top = torch.cat(vals), torch.cat(top)
    count = torch.zeros(params["item_emb"].shape[0], dtype=torch.float64).index_add_(
        0, top[:, :k].flatten(), torch.ones(top[:, :k].numel(), dtype=torch.float64))
    return h, vals, top, count


def coherence_factors(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(n,) coherence factors of unit sketch rows x (n, SKETCH) and the round's coherent-pair cosine: the pairwise
    cosines held whole up to `bounds.COS_BLOCK` of them, in row blocks above (`bounds.coherence_blocked`)."""
    excess, b = bounds.coherence_blocked(x, bounds.COHERENT_Q)
    return bounds.coherence_factor(excess.double()), b


@dataclass
class FirstPass:
    """What `FortressServer.first_pass` keeps of a round's clients (n of them), in the order read."""

    updates: Updates | None     # the clients without their uploads (`updates.skeleton`); None when none came
    w: torch.Tensor             # (n,) float64 effective weights
    top: torch.Tensor           # (n,) float64 each client's largest row contribution
    dense_norm: torch.Tensor    # (n,) float64 its encoder contribution's norm
    sketch: torch.Tensor | None # (n, SKETCH) its encoder delta's sketch


class FortressServer:
    """The FORTRESS defence for one run: the monitor's state across rounds plus the per-round rule."""

    name = "fortress"
    on_host = True        # its state and generators live on the CPU (`rounds.home`)

    def __init__(self, fc: FortressConfig, n_items: int, seed: int = 0, model: Model | None = None):
        self.fc, self.n_items, self.model = fc, n_items, model
        self.probe_gen = torch.Generator().manual_seed(seed + PROBE_SEED)
        self.rate = torch.zeros(n_items + 1, dtype=torch.float64)                 # push mass per round, running mean
        self.recent = torch.zeros(n_items + 1, dtype=torch.float64)              # push mass kept lately, decayed sum
        self.last_flagged = torch.full((n_items + 1,), -HORIZON - 1, dtype=torch.int64)
        self.rounds = 0
        self.gen = torch.Generator().manual_seed(seed)

    def n_popular(self) -> int:
        """|P|: popular_frac of the catalogue, at least knn + 1 so that L_var has neighbours."""
        return min(self.n_items, max(self.fc.knn + 1, math.ceil(self.fc.popular_frac * self.n_items)))

    def aggregate(self, u: Updates, params: dict[str, torch.Tensor]) -> Outcome:
        """The round's rule on its uploads u, held together (`aggregate_stream` reads them in passes)."""
        fc, N = self.fc, self.n_items
        w = bounds.effective_weight(u, fc.max_len, fc.whole_history, fc.n_neg)         # (n,)
        row_norm = bounds.row_contrib_norms(u, w)                                       # (M,)
        sk, norms = self.sketch(u.dense)                                                # (n, SKETCH), (n,)
        dense_norm = bounds.dense_contrib_norms(u, w, norms)                            # (n,)
        c_row, c_dense = bounds.clip_scales(u, fc.max_len, fc.row_clip, fc.dense_clip, row_norm, dense_norm,
                                            fc.whole_history, fc.n_neg)
        equiv = bounds.push_equivalents(row_norm, c_row)                                # (M,) in [0, 1]
        mass = torch.zeros(N + 1, dtype=torch.float64).index_add_(0, u.rows_item, equiv)     # every row counts
        item_scale, allow, flagged, floor = self.judge(mass)
        coh, coh_b = self.coherence(u.dense, sk)
        total = FedAvgSum(u.dense.shape[1], u.rows_delta.shape[1], N, u.dense.dtype, u.dense.device)
        share, counts = self.contribute(total, u, w, row_norm, equiv, dense_norm, coh, c_row, c_dense, item_scale)
        return self.learn(total.result(), share.to(u.weight.dtype), mass, allow, flagged,
                          {**counts, "c_row": c_row, "c_dense": c_dense, "rate_floor": floor, "coherent_cos": coh_b})

    def first_pass(self, parts: Iterable[Updates]) -> "FirstPass":
        """Pass one of `aggregate_stream` over a round's checked uploads, part by part: what the rule needs of
        each client (its effective weight, largest row contribution, encoder contribution and sketch) and what
        the round's log needs (ids, reported weights, losses); no upload is kept."""
        fc, keep, signs = self.fc, [], None
        w, top, dense_norm, sks = [], [], [], []
        for u in parts:
            if signs is None:
                signs = bounds.sketch_signs(u.dense.shape[1], bounds.SKETCH, self.gen, u.dense.dtype)
            wu = bounds.effective_weight(u, fc.max_len, fc.whole_history, fc.n_neg)
            sk, norms = bounds.sketch(u.dense, bounds.SKETCH, norms=True, signs=signs)
            w.append(wu)
            top.append(bounds.client_max(bounds.row_contrib_norms(u, wu), u.rows_client, u.n))
            dense_norm.append(bounds.dense_contrib_norms(u, wu, norms))
            sks.append(sk)
            keep.append(skeleton(u))
        if not keep:
            return FirstPass(None, *(torch.zeros(0, dtype=torch.float64),) * 3, None)
        return FirstPass(concat(keep), torch.cat(w), torch.cat(top), torch.cat(dense_norm), torch.cat(sks))

    def aggregate_stream(self, first: "FirstPass", read: Callable[[], Iterable[Updates]],
                         params: dict[str, torch.Tensor]) -> Outcome:
        """`aggregate` without holding the round's uploads: after `first_pass`, `read()` gives the same checked
        parts again, twice: once for the items' push mass (which needs C_row, i.e. every client's largest row
        first), once to add each part, clipped and scaled, into running FedAvg sums. The coherence rule runs
        on the kept sketches (`bounds.coherence_blocked`). Memory: per client a few scalars and its sketch
        (4 KB), per item the monitor's vectors, one part of uploads at a time. The same outcome as `aggregate`
        up to the order of float sums (tested)."""
        fc, N, n = self.fc, self.n_items, len(first.w)
        c_row, c_dense = bounds.clips(first.top, first.dense_norm, fc.row_clip, fc.dense_clip)
        mass = torch.zeros(N + 1, dtype=torch.float64)
        for u, w in self._with_weights(read(), first.w):
            mass.index_add_(0, u.rows_item, bounds.push_equivalents(bounds.row_contrib_norms(u, w), c_row))
        item_scale, allow, flagged, floor = self.judge(mass)
        if n < 3:
            coh, coh_b = torch.ones(n, dtype=torch.float64), 1.0
        else:
            x = first.sketch                                   # normalised in place (F.normalize's values)
            x /= x.norm(dim=1, keepdim=True).clamp(min=1e-12)
            memory.release_above(0)                            # the passes' freed temporaries go back first
            coh, coh_b = coherence_factors(x)
            memory.release_above(0)
        total, shares, counts, at = None, [], {}, 0
        for u, w in self._with_weights(read(), first.w):
            if total is None:
                total = FedAvgSum(u.dense.shape[1], u.rows_delta.shape[1], N, u.dense.dtype, u.dense.device)
            i = slice(at, at + u.n)
            at += u.n
            row_norm = bounds.row_contrib_norms(u, w)
            share, c = self.contribute(total, u, w, row_norm, bounds.push_equivalents(row_norm, c_row),
                                       first.dense_norm[i], coh[i], c_row, c_dense, item_scale)
            shares.append(share)
            counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        share = torch.cat(shares) if shares else torch.zeros(0, dtype=torch.float64)
        return self.learn(total.result(), share.to(first.updates.weight.dtype), mass, allow, flagged,
                          {**counts, "c_row": c_row, "c_dense": c_dense, "rate_floor": floor, "coherent_cos": coh_b})

    @staticmethod
    def _with_weights(parts: Iterable[Updates], w: torch.Tensor) -> Iterator[tuple[Updates, torch.Tensor]]:
        """Each part with its clients' effective weights (from the first pass), checked to be the same clients."""
        at = 0
        for u in parts:
            if at + u.n > len(w):
                raise RuntimeError("a second read of the round's uploads gave more clients than the first")
            yield u, w[at:at + u.n]
            at += u.n

    def judge(self, mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """The monitor's verdict on a round's push mass (N + 1,): each item's row scale (1 unless flagged:
        allowance / mass), its allowance (its mass unless flagged), the flagged items and the rate floor
        they were judged with."""
        fc, N = self.fc, self.n_items
        # the floor follows the rates (they move by at most a step a round) once the monitor is warm,
        # so that a spray of small pushes over the whole catalogue in one round does not lift it
        total = float(self.rate[1:].sum()) if self.rounds >= WARMUP else float(mass.sum())
        floor = max(bounds.rate_floor(total, N, fc.floor_frac), 1e-6)
        rate = self.rate.clamp(min=floor)                                               # (N+1,)
        held = bounds.decay(WINDOW) * self.recent                                        # (N+1,)
        flag = bounds.surprising(mass, rate, fc.p_flag) | bounds.surprising(held + mass, WINDOW * rate, fc.p_flag)
        flag[0] = False
        flagged = flag.nonzero().flatten()
        allow = mass.clone()
        if len(flagged):
            cap = float(mass.max())
            allow[flagged] = bounds.flagged_allowance(rate[flagged], self.recent[flagged], fc.p_flag, WINDOW, cap)
        return allow / mass.clamp(min=1e-12), allow, flagged, floor                     # scale (N+1,): 1 unless flagged

    def contribute(self, total: FedAvgSum, u: Updates, w: torch.Tensor, row_norm: torch.Tensor, equiv: torch.Tensor,
                   dense_norm: torch.Tensor, coh: torch.Tensor, c_row: float, c_dense: float,
                   item_scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, int]]:
        """Add clients u (all of a round's or a part), clipped and scaled, to the running sums `total`: their
        effective weights w, row contribution norms and push-equivalents, encoder contribution norms, coherence
        factors, the round's clips and the items' scales. Returns each client's retained share and the log's
        counts."""
        row_clip = (c_row / row_norm.clamp(min=1e-300)).clamp(max=1.0)                  # (M,)
        dense_clip = (c_dense / dense_norm.clamp(min=1e-300)).clamp(max=1.0)            # (n,)
        push = bounds.pushes(equiv, self.fc.push_frac)                                  # (M,) bool
        row_scale = item_scale[u.rows_item]                                             # (M,)
        # a client's encoder follows its pushes (a sampled negative of a flagged item does not cost it)
        rho = torch.ones(u.n, dtype=torch.float64).scatter_reduce_(
            0, u.rows_client, torch.where(push, row_scale, torch.ones_like(row_scale)), "amin")
        dt = u.dense.dtype
        weighted = Updates(u.clients, w.to(dt), u.dense, u.rows_client, u.rows_item, u.rows_delta, u.loss)
        # a flagged item's rows (all of them, pushes or not) move its average allowance / mass as far; a
        # coherent client counts as the same fraction of a client in its rows as in its encoder
        row_kept = row_clip * row_scale * coh[u.rows_client]                           # (M,)
        total.add(weighted, rho.to(dt), torch.ones_like(row_scale).to(dt), (dense_clip * coh).to(dt),
                  row_kept.to(dt))
        share = retained(u, w, row_norm, row_kept, dense_norm, dense_clip * rho * coh)
        return share, {"pushes": int(push.sum()), "rows_clipped": int((row_clip < 1).sum()),
                       "dense_clipped": int((dense_clip < 1).sum()), "down_weighted": int((rho < 1).sum()),
                       "coherent_scaled": int((coh < 1).sum())}

    def learn(self, agg: Aggregate, share: torch.Tensor, mass: torch.Tensor, allow: torch.Tensor,
              flagged: torch.Tensor, stats: dict[str, Any]) -> Outcome:
        """The monitor learns the round (rates, recent masses, flag times); the round's Outcome and log."""
        N = self.n_items
        # the rate learns at most the allowance, and a flagged round teaches it FLAGGED_SPEED as much
        # (after the monitor's first WARMUP rounds, in which everything is new); items flagged lately
        # stay out of P
        step = torch.full((N + 1,), max(1.0 / HORIZON, 1.0 / (self.rounds + 1)), dtype=torch.float64)
        if self.rounds >= WARMUP:
            step[flagged] *= FLAGGED_SPEED
        kept = torch.minimum(mass, allow)
        self.rate = (1 - step) * self.rate + step * kept
        self.recent = bounds.decay(WINDOW) * self.recent + kept
        self.last_flagged[flagged] = self.rounds
        watched = self.rounds - self.last_flagged <= HORIZON
        self.rounds += 1
        popular = top_items(self.rate.masked_fill(watched, float("-inf")), self.n_popular())
        listed = flagged[torch.argsort(-mass[flagged], stable=True)[:MAX_LISTED]]
        log = {"flagged": listed.tolist(), "n_flagged": int(len(flagged)), "pushes": stats["pushes"],
               "push_mass": float(mass.sum()), "c_row": stats["c_row"], "c_dense": stats["c_dense"],
               "rows_clipped": stats["rows_clipped"], "dense_clipped": stats["dense_clipped"],
               "down_weighted": stats["down_weighted"], "rate_floor": stats["rate_floor"],
               "coherent_cos": stats["coherent_cos"], "coherent_scaled": stats["coherent_scaled"]}
        return Outcome(agg, share, log, flagged, popular)

    def sketch(self, dense: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The encoder deltas dense (n, P) in one pass: their sketch for the coherence rule (None under 3
        clients) and their norms. The sketch is drawn from the server's own generator, fresh each round,
        so an upload cannot be shaped against it."""
        if dense.shape[0] < 3:
            return None, dense.norm(dim=1)
        return bounds.sketch(dense, bounds.SKETCH, self.gen, norms=True)

    def coherence(self, dense: torch.Tensor, sk: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(n,) coherence factors of the encoder deltas dense (n, P) (`bounds.coherence_factor`; clipping and
        weights do not change a direction) and the round's coherent-pair cosine, on their sketch sk (drawn
        here when not given; every factor is 1 under 3 clients)."""
        if dense.shape[0] < 3:
            return torch.ones(dense.shape[0], dtype=torch.float64), 1.0
        x = F.normalize(self.sketch(dense)[0] if sk is None else sk, dim=1)              # (n, SKETCH)
        return coherence_factors(x)

    def after_apply(self, params: dict[str, torch.Tensor], outcome: Outcome) -> dict[str, Any]:
        """After the round's update: regularise the item table (when something was flagged), then cap exposure."""
        popular, flagged = outcome.popular, outcome.flagged     # P already leaves out this round's flagged items
        log: dict[str, Any] = {}
        with torch.no_grad():
            if flagged is not None and len(flagged) and self.fc.server_steps and popular is not None and len(popular):
                log |= regularise(params["item_emb"], popular, flagged, self.fc)
            if self.model is not None and self.fc.probe_users:
                log |= self.cap_exposure(params)
        return log

    def cap_exposure(self, params: dict[str, torch.Tensor]) -> dict[str, Any]:
        """In place: shrink the rows of items whose share of probe users' top PROBE_K exceeds their cap
        (`bounds.exposure_caps`), so that each reaches at most its cap. The probe users are sequences drawn
        from the monitor's (floored) rates by the server's own generator, fresh each round."""
        fc, K = self.fc, min(bounds.PROBE_K, self.n_items - 1)
        if self.rounds < WARMUP or K < 1:
            return {}
        rate = self.floored_rate()
        seqs = bounds.probe_sequences(rate, fc.probe_users, self.model.max_len, self.probe_gen)    # (n, L)
        table = params["item_emb"]
        h, vals, top, count = probe_top(self.model, params, seqs, K)
        cap = bounds.exposure_caps(count, rate, fc.probe_users, fc.exposure_cap, fc.reach_cap)
        over = (count > cap).nonzero().flatten()
        over = over[over > 0]
        if not len(over):
            return {"exposure_capped": 0}
        a = h @ table[over].T                                                            # (n, V)
        in_top = (top[:, :K, None] == over[None, None, :]).any(1)                        # (n, V)
        factor = bounds.shrink_to_cap(a.double(), vals[:, K].double(), vals[:, K - 1].double(), in_top,
                                      cap[over].floor())
        table[over] *= factor[:, None].to(table.dtype)
        worst = torch.argsort(-(count[over] / cap[over]), stable=True)[:MAX_LISTED]
        return {"exposure_capped": int(len(over)), "capped": over[worst].tolist(),
                "capped_reach": (count[over[worst]] / fc.probe_users).tolist()}

    def floored_rate(self) -> torch.Tensor:
        """(N + 1,) the items' rates, at least the warm monitor's floor (`bounds.rate_floor` of their sum) and 1e-6."""
        total = float(self.rate[1:].sum())
        return self.rate.clamp(min=max(bounds.rate_floor(total, self.n_items, self.fc.floor_frac), 1e-6))

    def state_dict(self) -> dict[str, Any]:
        return {"rate": self.rate.clone(), "recent": self.recent.clone(), "last_flagged": self.last_flagged.clone(),
                "rounds": self.rounds,
                "sketch_rng": self.gen.get_state(), "probe_rng": self.probe_gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (of a checkpoint or of a saved model); an empty state is a cold monitor."""
        if not state:
            return
        if "rate" not in state or len(state["rate"]) != self.n_items + 1:
            raise InputError("the saved FORTRESS monitor state does not fit this data (item count or format differs); "
                             "start without it")
        self.rate = state["rate"].clone().double()
        self.last_flagged = state["last_flagged"].clone()
        # a state saved before the window rule: the recent mass of a steady rate
        self.recent = state["recent"].clone().double() if "recent" in state else WINDOW * self.rate
        self.rounds = int(state["rounds"])
        if "sketch_rng" in state:
            self.gen.set_state(state["sketch_rng"])
        if "probe_rng" in state:
            self.probe_gen.set_state(state["probe_rng"])
