"""Adaptive attacks: malicious clients that know the server's rules and thresholds.

What they know: the defence's code (`fortress.bounds` holds the FORTRESS server's public rules;
the robust rules are textbook) and every config key (public defaults or a published config), the
protocol's public parameters (clients per round, negatives, max_len, learning rate), the broadcast
model, the round number and their own clients. What they do not see: benign data, other
clients' uploads, the server's state (the monitor's rates). What they may do: coordinate, upload
anything in the benign format, report any weight, spread over rounds.

Calibration (every round, from the broadcast model alone): `SIM` honest users with plausible
histories sampled from the model (as PSMU does) of lengths 2..attack_len train with the protocol's
local training; the server's public rules applied to these simulated uploads estimate where this
round's thresholds lie (FORTRESS's row and encoder clip, the push threshold, the rate floor;
the robust rules' per-coordinate spread, distances and median norm).

Payload: A-hum's update (`ahum.attack`: the target rows and the encoder delta that raise the
targets for mined hard users) is the direction; each attack shapes its size:
- `stealth`: every upload just under each FORTRESS rule: row and encoder contributions at SAFETY x
  the estimated clips; the target's rows carry, in full pushes, only the push mass a cold item (at
  the rate floor) may take unflagged this round: the round's allowance, and over the window what
  the attack's own past pushes (replayed by the server's public rule) leave of it, less the mass
  honest clients give the target anyway; the other clients upload no target row (every row counts
  towards the push mass). Each client also uploads SPREAD random rows with tiny deltas (defeats any
  per-client share rule) and reports the weight of its fake sequence (coordinated splitting of one
  push over many clients). Against the coherence rule, each encoder delta keeps only the share
  alpha along the attackers' common direction that the rule lets through (pairwise cosines
  alpha^2 = SAFETY x (the estimated coherent-pair cosine + 1 / (m - 1))) and spends the rest of its
  norm on a direction of its own.
- `ramp` (history building): as `stealth`, but the budget follows the rate its own pushes have
  earned so far (the server's public update rule, replayed from the attack's first round), so the
  target's rate climbs as fast as the rule allows.
- `evade` (against the exposure cap, FORTRESS step 6): `ramp` with another direction. The cap
  counts the target's reach over probe users the server draws from item rates (incoherent
  mixtures of items); real users hold coherent sequences. So instead of A-hum's, the direction is
  the gradient step that raises the targets' log-probability after EVADE_USERS plausible
  histories sampled from the model (as PSMU samples them) and lowers it, EVADE_MU as much, after as
  many probe-like sequences (1..bounds.PROBE_LEN items drawn by the model's mean next-item
  distribution over those histories, its stand-in for the rates it cannot see): promotion where
  the attacker hopes real users are, not where the server looks.
- `weight`: A-hum's upload reporting a weight of WEIGHT_FACTOR x max_len: every weighted mean
  (FedAvg's item rows and encoder, Multi-Krum's average, norm bounding) then follows the
  attackers' deltas (a server that trusts reported weights).
- `adaptive`: the knowledge turned against whichever `defence` the config names: `fortress` ->
  `ramp`; `none` -> A-hum; `norm_bound` -> the whole norm budget on the target rows (no encoder
  part), at the bound (the config's, or the simulated median norm); `median` / `trimmed_mean` ->
  the encoder delta at the simulated mean + Z x std along A-hum's sign per coordinate (inside the
  benign spread, Fang et al., "Local Model Poisoning Attacks to Byzantine-Robust Federated
  Learning", USENIX Security 2020), target rows as A-hum; `krum` / `multi_krum` -> min-max
  (Shejwalkar & Houmansadr, "Manipulating the Byzantine", NDSS 2021): every attacker uploads the
  simulated benign mean plus gamma x A-hum's unit direction, gamma the largest keeping it within
  the largest pairwise distance of the simulated benign uploads; `hics` (the PSMU paper's countermeasure) -> each
  target row at SAFETY x the item clip the rule computes on the simulated uploads (never clipped, and the client's
  largest row, so the sparsifier keeps it; SPREAD tiny random rows keep ceil(hics_keep x rows) above the target
  count), the encoder delta with what is left of SAFETY x the user clip; `union` -> A-hum's upload, which
  UNION's uniformity statistic does not see (docs/results/peers.md: it kept every A-hum client; a client that
  changes a row or two of the catalogue sits with the clients that changed few sampled rows).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from fortress import bounds
from fortress.attacks import ahum
from fortress.attacks.base import AttackView, honest_loss
from fortress.attacks.psmu import sample_histories
from fortress.client import chunks_from_sequences, train_round
from fortress.models import dense_keys
from fortress.server.hics import hics
from fortress.updates import Updates

SIM = 64              # honest users simulated per round for calibration
SAFETY = 0.9          # fraction of an estimated clip an upload aims at
SPREAD = 64           # extra random rows (tiny deltas) a stealthy client uploads
SPREAD_SIZE = 1e-3    # their size, relative to the row clip
WEIGHT_FACTOR = 100   # the weight attack reports WEIGHT_FACTOR x max_len
Z = 1.0               # Fang et al.: benign standard deviations along the attack's sign
EVADE_USERS = 64      # evade: plausible histories it promotes the targets after, and probe-like ones it demotes after
EVADE_MU = 1.0        # evade: weight of the demotion after probe-like sequences


def simulate_benign(view: AttackView) -> Updates:
    """The uploads of SIM honest users simulated on the broadcast model (plausible histories)."""
    rng = np.random.default_rng([*view.seed, 0x51])
    c = view.cfg
    top = max(2, min(c.fake_len, view.n_items - len(view.targets)))
    lengths = rng.integers(2, top + 1, size=SIM)
    hist = sample_histories(view, rng, SIM, top)                                   # (SIM, top)
    seqs = [h[:n] for h, n in zip(hist, lengths)]
    chunks = chunks_from_sequences(np.arange(SIM), seqs, [float(n) for n in lengths], view.n_items, c.n_neg,
                                   c.chunk_size, rng)
    return train_round(view.model, honest_loss(view), c.local_epochs, c.lr, c.client_opt, view.params, chunks,
                       c.engine)


def payload(view: AttackView) -> Updates:
    """A-hum's upload for this round's clients (unscaled), reporting the fake sequence's length."""
    return ahum.attack(replace(view, cfg=replace(view.cfg, scale=1.0)))


def shape(u: Updates, row_target: torch.Tensor, dense_target: torch.Tensor) -> Updates:
    """Each client's rows rescaled to contribution norm row_target (n,) and encoder to dense_target (n,)."""
    w = u.weight.double()
    rn = w[u.rows_client] * u.rows_delta.double().norm(dim=1)                      # (M,)
    dn = w * u.dense.double().norm(dim=1)                                           # (n,)
    rs = (row_target[u.rows_client] / rn.clamp(min=1e-30)).to(u.rows_delta.dtype)
    ds = (dense_target / dn.clamp(min=1e-30)).to(u.dense.dtype)
    return replace(u, rows_delta=u.rows_delta * rs[:, None], dense=u.dense * ds[:, None])


def with_spread(view: AttackView, u: Updates, size: float) -> Updates:
    """Each client also uploads SPREAD random non-target rows of contribution norm `size`."""
    rng = np.random.default_rng([*view.seed, 0x5B])
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    pool = np.setdiff1d(np.arange(1, view.n_items + 1), view.targets.numpy())
    k = min(SPREAD, len(pool))
    items = torch.as_tensor(np.stack([rng.choice(pool, size=k, replace=False) for _ in range(view.m)]))  # (m, k)
    d = u.rows_delta.shape[1]
    delta = torch.randn(view.m * k, d, generator=gen, dtype=u.rows_delta.dtype)
    w = u.weight.repeat_interleave(k)[:, None]
    delta = delta / delta.norm(dim=1, keepdim=True) * size / w                      # contribution norm = size
    return replace(u, rows_client=torch.cat([u.rows_client, torch.arange(view.m).repeat_interleave(k)]),
                   rows_item=torch.cat([u.rows_item, items.reshape(-1)]), rows_delta=torch.cat([u.rows_delta, delta]))


def coherent_share(sim: Updates, m: int) -> float:
    """The share alpha of each attacker's encoder contribution that may point the common way: with
    pairwise cosines alpha^2 the coherence excess of each of m attackers is about
    (m - 1)(alpha^2 - b), b the coherent-pair cosine, estimated on the simulated uploads; the
    rule lets an excess of 1 through, so alpha^2 = SAFETY (b + 1 / (m - 1))."""
    if m < 2:
        return 1.0
    x = torch.nn.functional.normalize(sim.dense.double(), dim=1)
    _, b = bounds.coherence(x @ x.T, bounds.COHERENT_Q)
    return min(1.0, SAFETY * (max(b, 0.0) + 1.0 / (m - 1))) ** 0.5


def spread_encoder(view: AttackView, u: Updates, alpha: float) -> Updates:
    """Each client's encoder delta: alpha along the clients' common direction, the rest of its norm
    along a direction of its own (random), so that pairwise cosines are about alpha^2."""
    if alpha >= 1.0:
        return u
    gen = torch.Generator().manual_seed(int(np.random.default_rng([*view.seed, 0x5C]).integers(2 ** 62)))
    norm = u.dense.norm(dim=1, keepdim=True)                                        # (m, 1)
    common = torch.nn.functional.normalize(u.dense.sum(0), dim=0)                  # (P,)
    own = torch.randn(u.dense.shape, generator=gen, dtype=u.dense.dtype)           # (m, P)
    own = own - (own @ common)[:, None] * common
    own = torch.nn.functional.normalize(own, dim=1)
    return replace(u, dense=norm * (alpha * common + (1 - alpha ** 2) ** 0.5 * own))


def fortress_scales(view: AttackView, sim: Updates) -> tuple[float, float, float]:
    """(C_row, C_dense, rate floor) the FORTRESS rules would set on a round like the simulated one."""
    c = view.cfg
    w = bounds.effective_weight(sim, c.max_len, c.whole_history, c.n_neg)
    c_row, c_dense = bounds.clip_scales(sim, c.max_len, c.row_clip, c.dense_clip, whole_history=c.whole_history,
                                        n_neg=c.n_neg)
    equiv = bounds.push_equivalents(bounds.row_contrib_norms(sim, w), c_row)
    per_client = float(equiv.sum()) / max(1, sim.n)
    floor = bounds.rate_floor(per_client * c.clients_per_round, view.n_items, c.floor_frac)
    return c_row, c_dense, max(floor, 1e-6)


def push_budget(rate: float, recent: float, benign: float, p_flag: float, m: int) -> float:
    """The target's push mass this round may carry unflagged, at SAFETY: the smaller of the round's
    allowance at `rate` and what the window leaves after the decayed `recent` mass, less the `benign`
    mass the target gets from honest clients anyway (their negatives, its few real fans)."""
    r = torch.tensor([rate], dtype=torch.float64)
    cap = float(max(m, 1)) + benign
    allowed = float(bounds.flagged_allowance(r, torch.tensor([recent], dtype=torch.float64), p_flag,
                                             bounds.WINDOW, cap)[0])          # the server's own rule
    return min(float(m), SAFETY * max(0.0, allowed - benign))


def replay(view: AttackView, floor: float, earn: bool) -> tuple[float, float]:
    """(rate, recent mass) of the target this round by the server's public update rule (a warm
    monitor), replayed over the attack's past rounds: before the attack the target is assumed at the
    steady state of the rate floor (benign mass `floor` a round, recent WINDOW x floor); each round
    adds that and the round's budget. `earn` False keeps the rate at the floor."""
    rate, recent, step = floor, bounds.WINDOW * floor, 1.0 / bounds.HORIZON
    for _ in range(view.round):
        mass = push_budget(rate, recent, floor, view.cfg.p_flag, view.m) + floor
        recent = bounds.decay(bounds.WINDOW) * recent + mass
        if earn:
            rate = max(floor, (1 - step) * rate + step * mass)
    return rate, recent


def push_sizes(budget: float, m: int) -> torch.Tensor:
    """(m,) target row contributions in units of C_row: SAFETY each until `budget` is placed, then none
    (every row's contribution counts towards its item's push mass)."""
    return (budget - SAFETY * torch.arange(m, dtype=torch.float64)).clamp(min=0.0, max=SAFETY)


def evade_direction(view: AttackView) -> Updates:
    """Every client's upload: one SGD step at the protocol learning rate on
    -log p(targets | plausible histories) + EVADE_MU log p(targets | probe-like sequences), with respect
    to the encoder and the target rows (the same for every client; `spread_encoder` makes them differ)."""
    rng = np.random.default_rng([*view.seed, 0xE7])
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    L = min(bounds.PROBE_LEN, view.cfg.max_len)
    real = torch.as_tensor(sample_histories(view, rng, EVADE_USERS, max(2, min(view.cfg.fake_len, L))))
    with torch.no_grad():
        logits = view.model.score(view.params, view.model.last(view.params, real))
        logits[:, 0] = float("-inf")
        pop = logits.softmax(-1).mean(0)                                            # (N+1,)
    pop[view.targets] = 0.0
    probe = bounds.probe_sequences(pop.double(), EVADE_USERS, view.cfg.max_len, gen)
    keys = dense_keys(view.params)
    p = {k: view.params[k].detach().clone().requires_grad_(True) for k in keys}
    rows = view.params["item_emb"][view.targets].detach().clone().requires_grad_(True)  # (T, d)
    E = view.params["item_emb"]

    def logp(seqs: torch.Tensor) -> torch.Tensor:
        h = view.model.last({**p, "item_emb": E}, seqs)
        return ahum.target_logprob(h, E, view.targets, rows).mean()

    with torch.enable_grad():
        loss = -logp(real) + EVADE_MU * logp(probe)
        grads = torch.autograd.grad(loss, [p[k] for k in keys] + [rows])
    lr, m, T = view.cfg.lr, view.m, len(view.targets)
    dense = -lr * torch.cat([g.reshape(-1) for g in grads[:-1]])                    # (P,)
    d_rows = -lr * grads[-1]                                                         # (T, d)
    return Updates(view.clients, torch.full((m,), float(view.cfg.fake_len), dtype=E.dtype),
                   dense.expand(m, -1).clone(), torch.arange(m).repeat_interleave(T), view.targets.repeat(m),
                   d_rows.repeat(m, 1), torch.zeros(m, dtype=E.dtype))


def under_fortress(view: AttackView, earn: bool, direction=None) -> Updates:
    """A-hum (or `direction(view)`) shaped under the FORTRESS rules; `earn` False = assume a cold target."""
    c = view.cfg
    sim = simulate_benign(view)
    c_row, c_dense, floor = fortress_scales(view, sim)
    rate, recent = replay(view, floor, earn)
    row = push_sizes(push_budget(rate, recent, floor, c.p_flag, view.m), view.m) * c_row
    u = spread_encoder(view, (direction or payload)(view), coherent_share(sim, view.m))
    u = shape(u, row, torch.full((view.m,), SAFETY * c_dense, dtype=torch.float64))
    return with_spread(view, u, SPREAD_SIZE * c_row)


def stealth_attack(view: AttackView) -> Updates:
    """A-hum shaped just under every FORTRESS threshold, its target rows within a cold item's budget."""
    return under_fortress(view, earn=False)


def ramp_attack(view: AttackView) -> Updates:
    """Stealth whose budget follows the rate its own past pushes have earned."""
    return under_fortress(view, earn=True)


def evade_attack(view: AttackView) -> Updates:
    """`ramp` whose direction promotes the targets after plausible histories and demotes them after
    probe-like sequences (the exposure cap's probes)."""
    return under_fortress(view, earn=True, direction=evade_direction)


def weight_attack(view: AttackView) -> Updates:
    """A-hum's upload reporting an inflated weight: a weighted mean then follows the attacker's delta."""
    u = payload(view)
    return replace(u, weight=torch.full_like(u.weight, float(WEIGHT_FACTOR * view.cfg.max_len)))


def against_norm_bound(view: AttackView) -> Updates:
    """The whole norm budget on the target rows, at SAFETY x the bound (the config's or the median norm)."""
    u = payload(view)
    bound = view.cfg.norm_bound
    if bound <= 0:
        sim = simulate_benign(view)
        sq = (sim.dense.double() ** 2).sum(1).index_add(0, sim.rows_client, (sim.rows_delta.double() ** 2).sum(1))
        bound = float(sq.sqrt().median())
    rows = u.rows_delta.double()
    total = torch.zeros(u.n, dtype=torch.float64).index_add_(0, u.rows_client, (rows ** 2).sum(1)).sqrt()
    scale = SAFETY * bound / total.clamp(min=1e-30)                                 # (n,)
    return replace(u, dense=torch.zeros_like(u.dense),
                   rows_delta=(rows * scale[u.rows_client][:, None]).to(u.rows_delta.dtype))


def against_coordinatewise(view: AttackView) -> Updates:
    """Fang et al.: the encoder at the simulated mean + Z std along A-hum's sign; target rows as A-hum."""
    u = payload(view)
    sim = simulate_benign(view)
    mu, sd = sim.dense.mean(0), sim.dense.std(0)                                    # (P,)
    return replace(u, dense=(mu + Z * sd * torch.sign(u.dense)).to(u.dense.dtype))


def against_krum(view: AttackView) -> Updates:
    """Min-max (Shejwalkar & Houmansadr): the benign mean + gamma x A-hum's unit direction, all alike."""
    u = payload(view)
    sim = simulate_benign(view)
    mu = sim.dense.mean(0)                                                          # (P,)
    p = u.dense.mean(0)
    p = p / p.norm().clamp(min=1e-30)
    limit = torch.cdist(sim.dense, sim.dense).max()
    lo, hi = 0.0, float(limit) * 2
    for _ in range(30):                         # bisection: largest gamma within the benign diameter
        g = (lo + hi) / 2
        if torch.cdist((mu + g * p)[None], sim.dense).max() <= limit:
            lo = g
        else:
            hi = g
    return replace(u, dense=(mu + lo * p).expand_as(u.dense).clone())


def against_hics(view: AttackView) -> Updates:
    """Every target row at SAFETY x the item clip, the encoder with the rest of SAFETY x the user clip (both the
    rule's own thresholds on the simulated benign uploads), plus SPREAD tiny rows for the sparsifier."""
    c = view.cfg
    u = payload(view)
    _, _, log = hics(simulate_benign(view), c.hics_item_clip, c.hics_keep, c.hics_user_clip)
    c_item, c_user = SAFETY * log["c_item"], SAFETY * log["c_user"]
    per_client = torch.bincount(u.rows_client, minlength=u.n).double()                 # (n,) target rows
    size = torch.minimum(torch.full_like(per_client, c_item), c_user / per_client.clamp(min=1).sqrt())   # (n,)
    left = (c_user ** 2 - per_client * size ** 2).clamp(min=0).sqrt()                  # (n,) encoder budget
    w = u.weight.double()                       # HiCS clips raw norms; `shape` sets contributions (w x norm)
    u = shape(u, size * w, left * w)
    return with_spread(view, u, SPREAD_SIZE * c_item * float(w.mean()))


def adaptive_attack(view: AttackView) -> Updates:
    """The attack that knows the config's `defence` and shapes its upload against it."""
    rule = view.cfg.defence
    if rule == "fortress":
        return ramp_attack(view)
    if rule == "norm_bound":
        return against_norm_bound(view)
    if rule in ("median", "trimmed_mean"):
        return against_coordinatewise(view)
    if rule in ("krum", "multi_krum"):
        return against_krum(view)
    if rule == "hics":
        return against_hics(view)
    return payload(view)


__all__ = ["stealth_attack", "ramp_attack", "evade_attack", "weight_attack", "adaptive_attack", "simulate_benign"]
