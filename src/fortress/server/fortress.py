"""The FORTRESS server: popularity monitor, suspicious items, reliability weights, L_sep + L_var.

Everything here uses only what a server legitimately sees: which item rows each client uploaded
and how large each row delta is, the clients' reported FedAvg weights and update norms, and its
own global model. Every threshold is relative to the round's own statistics or to the item's own
history, so the defaults carry over between datasets, models and stages of training.

Each round (`FortressServer.aggregate`, then `regularise` after the update is applied):
1. Monitor. o_i = sum over uploaders c of ||delta_ci||, the row mass of item i this round (a
   client's own items get large deltas, its sampled negatives tiny ones, so o_i follows how many
   clients really hold item i). The history h_i is a running mean of the *trusted* row mass (rows
   of clients whose reliability (4.) is 1 that are not focused (2.)), an exponential one with
   horizon HORIZON rounds once that many rounds have passed. The history of an item flagged in
   the last HORIZON rounds is frozen (a lull in an attack teaches the monitor nothing), so an
   attacker cannot give its target a history, while a popular item, whose uploaders are ordinary
   clients each holding it among several items, builds one.
2. Focus. A client with w interactions trains on min(w, max_len + 1) of them and spreads its push
   over its own items: the largest share of a benign client's row mass that one item takes is
   about 0.8 / min(w, max_len + 1) (median), 99% of clients stay below 1.6 / that and 0.2-0.6%
   exceed 2 / that (512 clients each of amazon-cell-phones with a 300-round FedAvg model,
   amazon-baby and mind-small with fresh models). The allowance is
   min(1, focus_slack / min(w, max_len + 1)); a row holding more than that share of its client's
   row mass is *focused*. A-hum uploads nothing but its target rows (share 1 at weight
   attack_len); PSMU's target row holds 20-35% of its row mass at weight 10.
3. Popular set P: the k = ceil(popular_frac N) (at least knn + 1) items with the largest history,
   leaving out items flagged in the last HORIZON rounds (before any history: the k items with
   the most push from rows no larger than an even split 1 / min(w, max_len + 1) of their
   client's). Reference mass ref = the median of o over the k heaviest items of this round (the
   scale of a popular item's push this round, whatever the history says). Suspicious set S:
   items outside P with o_i > surge x max(ref, h_i) (more push than `surge` times a typical
   popular item gets this round, and than `surge` times its own past), or that at least
   MIN_FOCUSED clients push with focused rows in this round.
4. Reliability rho_c = rho_norm x rho_focus, in [0, 1]:
   - rho_norm = min(1, tau / ||u_c||)^2 with tau = median + norm_z x 1.4826 MAD of the round's
     update norms: only unusually *large* updates lose weight;
   - rho_focus = 0 if the client's share of row mass on S exceeds its allowance, else 1.
   Why this spares sparse benign clients: nothing here punishes a small norm, few rows, a low
   weight or disagreement with the round's consensus, which is what a short, sparse sequence
   looks like; and a benign client's push on one of its own items stays within the allowance
   (step 2), so it keeps full weight even when one of its few items is flagged (tested). A
   client that reports a large weight but pushes one item hard loses its weight. Claiming a
   small weight to earn a large allowance costs the attacker its FedAvg influence.
5. Aggregate: FedAvg with the weights w_c rho_c, without the focused rows, and without any
   update of the rows in S this round. (Down-weighting alone cannot protect a cold item: FedAvg
   averages a row over its uploaders only, so a few attackers among a cold item's uploaders,
   whose other uploaders are sampled negatives with tiny deltas, still set its update.)
6. Embedding regularisation (after the update, only in rounds with S non-empty): `server_steps`
   gradient steps of size `server_lr` on alpha L_sep + beta L_var over the rows of P and S:
   L_sep = mean over p in P, s in S of max(0, margin - ||e_p - e_s||) keeps suspicious items out
   of the popular region; L_var = mean over p in P of ||e_p - mean of e over N(p)||^2, N(p) the
   knn nearest popular items (fixed at the first step), keeps popular clusters tight. Both act
   on unit vectors (the e's are directions; each step is renormalised and every row keeps its
   length), so `margin` is a chord distance: sqrt(2) = orthogonal. Why directions: our models
   score by dot product, and the attacks do not bring a target near the popular items in
   Euclidean distance, they lengthen it (A-hum: to 2.2x the popular median norm) and turn it
   toward them (mean chord distance to P 1.14-1.22 under attack, 1.44 for ordinary items, on
   amazon-cell-phones). Euclidean L_sep pushed a flagged target further out, i.e. longer: under
   PSMU (5%, 20 rounds) its ER@10 was 0.051 with it and 0.0 without; on directions it is 0.0.
   The mean over |P| |S| pairs moves each popular row by at most alpha / |P| per step and each
   suspicious row by up to alpha / |S|. A round where nothing is flagged, no row is focused and
   no update is unusually large is exactly FedAvg.

The monitor starts empty in every run (also with `init_from`): in the first rounds its history is
young, and an attack that is present from the first round is judged by the round's own
statistics (steps 2-3) until the history has formed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fortress.server.aggregate import Aggregate, fedavg
from fortress.updates import Updates, norms

HORIZON = 50          # rounds the popularity history averages over once it is that old
MAX_LISTED = 20       # flagged item ids (heaviest first) written to the round log
MIN_FOCUSED = 2       # clients pushing one item beyond their allowance that make it suspicious


@dataclass(frozen=True)
class FortressConfig:
    popular_frac: float
    surge: float
    norm_z: float
    focus_slack: float
    alpha: float
    beta: float
    margin: float
    knn: int
    server_steps: int
    server_lr: float
    max_len: int          # the protocol's max_len: a client trains on at most max_len + 1 items

    @classmethod
    def from_config(cls, cfg) -> "FortressConfig":
        return cls(cfg.popular_frac, cfg.surge, cfg.norm_z, cfg.focus_slack, cfg.alpha, cfg.beta, cfg.margin,
                   cfg.knn, cfg.server_steps, cfg.server_lr, cfg.max_len)


def row_mass(u: Updates, n_items: int, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(n_items + 1,) float64: sum of ||delta|| of each item's uploaded rows (only rows in mask (M,))."""
    size = u.rows_delta.double().norm(dim=1)                                            # (M,)
    if row_mask is not None:
        size = size * row_mask.double()
    return torch.zeros(n_items + 1, dtype=torch.float64).index_add_(0, u.rows_item, size)


def top_items(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k items (ids >= 1) with the largest score, ties to the smaller id; sorted ids."""
    k = min(k, len(score) - 1)
    order = torch.argsort(-score[1:], stable=True)[:k] + 1
    return order.sort().values


def even_share(u: Updates, max_len: int) -> torch.Tensor:
    """(n,) 1 / min(w_c, max_len + 1): a client's push split evenly over the items it trains on.

    A client trains on its last max_len + 1 items, so a longer history does not spread its push further.
    """
    return 1.0 / u.weight.double().clamp(min=1e-12, max=max_len + 1)


def allowance(u: Updates, focus_slack: float, max_len: int) -> torch.Tensor:
    """(n,) share of its row mass a client may put on one item: min(1, focus_slack x even share)."""
    return (focus_slack * even_share(u, max_len)).clamp(max=1.0)


def row_shares(u: Updates) -> torch.Tensor:
    """(M,) each row's share of its client's total row mass (sum of ||delta|| over its rows)."""
    rn = u.rows_delta.double().norm(dim=1)                                              # (M,)
    total = torch.zeros(u.n, dtype=torch.float64).index_add_(0, u.rows_client, rn)
    return rn / total[u.rows_client].clamp(min=1e-30)


def detect(mass: torch.Tensor, history: torch.Tensor, popular: torch.Tensor, reference: torch.Tensor,
           surge: float, focused: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Suspicious items outside `popular`: mass > surge x max(ref, own history), ref = the median mass
    of `reference`; or focused pushes (count of focused rows (N+1,)) from MIN_FOCUSED clients or more.

    mass, history (N+1,); popular, reference: item ids. Returns (sorted ids, ref).
    """
    ref = float(mass[reference].quantile(0.5)) if len(reference) else 0.0
    bar = surge * torch.clamp(history, min=ref)                                         # (N+1,)
    hit = mass > bar
    if focused is not None:
        hit |= focused >= MIN_FOCUSED
    hit[0] = False
    hit[popular] = False
    return hit.nonzero().flatten(), ref


def reliability(u: Updates, suspicious_rows: torch.Tensor, allow: torch.Tensor,
                norm_z: float) -> tuple[torch.Tensor, dict[str, float]]:
    """(n,) client weights in [0, 1] (rule in the module docstring); suspicious_rows (M,) bool, allow (n,)."""
    size = norms(u)                                                                     # (n,) float64
    med = size.quantile(0.5)
    tau = med + norm_z * 1.4826 * (size - med).abs().quantile(0.5)
    rho_norm = (tau / size.clamp(min=1e-12)).clamp(max=1.0) ** 2
    share = torch.zeros(u.n, dtype=torch.float64).index_add_(0, u.rows_client, row_shares(u) * suspicious_rows)
    over = share > allow
    rho = (rho_norm * ~over).to(u.weight.dtype)
    return rho, {"norm_tau": float(tau), "norm_down": int((rho_norm < 1).sum()),
                 "focus_down": int(over.sum())}


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


def regularise(table: torch.Tensor, popular: torch.Tensor, suspicious: torch.Tensor,
               fc: FortressConfig) -> dict[str, float]:
    """In place: `server_steps` gradient steps on alpha L_sep + beta L_var over the directions of
    the rows of P and S (unit vectors, renormalised after each step); every row keeps its length."""
    rows = torch.cat([popular, suspicious])
    n_pop = len(popular)
    length = table[rows].norm(dim=1, keepdim=True).clamp(min=1e-12)                     # (P + S, 1)
    z = (table[rows] / length).detach()                                                 # (P + S, d) unit
    k = min(fc.knn, n_pop - 1)
    nbr = neighbours(z[:n_pop], k) if k > 0 else torch.zeros(n_pop, 0, dtype=torch.int64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return fc.alpha * l_sep(z[:n_pop], z[n_pop:], fc.margin) + fc.beta * l_var(z[:n_pop], nbr)

    first = float(loss(z))
    for _ in range(fc.server_steps):
        z = z.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss(z), z)
        z = F.normalize(z - fc.server_lr * g, dim=1).detach()
    table[rows] = (z * length).to(table.dtype)
    return {"reg_loss_before": first, "reg_loss_after": float(loss(z))}


class FortressServer:
    """The FORTRESS defence for one run: monitor state across rounds plus the per-round rule."""

    name = "fortress"

    def __init__(self, fc: FortressConfig, n_items: int):
        self.fc, self.n_items = fc, n_items
        self.history = torch.zeros(n_items + 1, dtype=torch.float64)             # trusted row mass, running mean
        self.last_flagged = torch.full((n_items + 1,), -HORIZON - 1, dtype=torch.int64)
        self.rounds = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None       # (P, S) of the round in progress

    def n_popular(self) -> int:
        """|P|: popular_frac of the catalogue, at least knn + 1 so that L_var has neighbours."""
        return min(self.n_items, max(self.fc.knn + 1, math.ceil(self.fc.popular_frac * self.n_items)))

    def popular(self, exclude: torch.Tensor) -> torch.Tensor:
        """P: the items with the largest history, except the `exclude` (N+1,) bool ones."""
        return top_items(self.history.masked_fill(exclude, float("-inf")), self.n_popular())

    def aggregate(self, u: Updates, params: dict[str, torch.Tensor]) -> tuple[Aggregate, torch.Tensor, dict[str, Any]]:
        fc = self.fc
        k = self.n_popular()
        mass = row_mass(u, self.n_items)                                                # (N+1,)
        allow = allowance(u, fc.focus_slack, fc.max_len)                                # (n,)
        share = row_shares(u)                                                           # (M,)
        focused = share > allow[u.rows_client]
        n_focused = torch.zeros(self.n_items + 1, dtype=torch.int64).index_add_(0, u.rows_item, focused.long())
        watched = self.rounds - self.last_flagged <= HORIZON                            # flagged recently
        if self.rounds:
            popular = self.popular(watched)
        else:                                  # no history yet: the items most pushed by evenly spread clients
            ordinary = share <= even_share(u, fc.max_len)[u.rows_client]
            popular = top_items(row_mass(u, self.n_items, ordinary), k)
        reference = top_items(mass, k)         # the round's own heaviest items set the scale
        suspicious, ref = detect(mass, self.history, popular, reference, fc.surge, n_focused)
        flagged = torch.zeros(self.n_items + 1, dtype=torch.bool)
        flagged[suspicious] = True
        rho, why = reliability(u, flagged[u.rows_item], allow, fc.norm_z)
        agg = fedavg(u.drop_rows(focused), rho)
        keep = ~flagged[agg.rows_item]
        agg = Aggregate(agg.dense, agg.rows_item[keep], agg.rows_delta[keep])
        # the history learns from the rows of fully trusted clients that are not focused, and not
        # at all for items flagged in the last HORIZON rounds (a lull in an attack teaches nothing)
        self.last_flagged[suspicious] = self.rounds
        frozen = watched | flagged
        trusted = row_mass(u, self.n_items, (rho >= 1)[u.rows_client] & ~focused)
        rate = max(1.0 / (self.rounds + 1), 1.0 / HORIZON)
        self.history = torch.where(frozen, self.history, (1 - rate) * self.history + rate * trusted)
        self.rounds += 1
        self._last = (self.popular(frozen), suspicious)
        listed = suspicious[torch.argsort(-mass[suspicious], stable=True)[:MAX_LISTED]]
        info = {"popular": int(len(popular)), "suspicious": int(len(suspicious)), "flagged": listed.tolist(),
                "suspicious_items": set(suspicious.tolist()), "watched": int(frozen.sum()), "ref_mass": ref,
                "down_weighted": int((rho < 1).sum()), "focused_rows": int(focused.sum()), **why}
        return agg, rho, info

    def after_apply(self, params: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Regularise the item table after the round's update (only when something was flagged)."""
        if self._last is None:
            return {}
        popular, suspicious = self._last
        self._last = None
        if not len(suspicious) or not self.fc.server_steps or not len(popular):
            return {}
        with torch.no_grad():
            return regularise(params["item_emb"], popular, suspicious, self.fc)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.clone(), "last_flagged": self.last_flagged.clone(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"].clone()
        self.last_flagged = state["last_flagged"].clone()
        self.rounds = int(state["rounds"])
