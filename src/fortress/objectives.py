"""Pure losses: next-item, InfoNCE, sequence augmentations, and the FORTRESS client objective.

FORTRESS trains each client on

    L = L_rec + lambda_cl * (L_seq + L_user + L_item) + lambda_temp * L_temp

computed on the device from its own sequence and the broadcast model; no representation, pair or
trace leaves it. L_rec is FedAvg's next-item loss over the client's sub-table, logQ-corrected for
the sampled negatives (`sampled_softmax_bias`, key `neg_correction`). All views use InfoNCE with cosine similarity and temperature tau (van den Oord
et al., "Representation Learning with Contrastive Predictive Coding", 2018; SimCLR, Chen et al.,
ICML 2020).

A client trains on its sequence's windows (`client.train_windows`: with `whole_history` its whole
history in windows of max_len inputs, without it the last max_len inputs alone). L_rec covers every
window; the views below are defined on "the sequence" x, which with several windows is the last
one: the most recent max_len inputs, the ones the served representation is computed from (so a
user's views, draws and temporal trajectory are those of its last window whatever the length of
its history, and a client with one window gets exactly the objective it had before). The item
view's gradient g is L_rec's, over all windows, and "own items" (the sub-table rows that are not
negatives) are the items of every window.

Negatives never leave the device. A client holds its own sequence and no
other user's states, so in-batch negatives (CL4SRec's other users) are out of reach. The sequence
and user views contrast a pair of views against negatives chosen by `view_negatives`:
- "items" (default): the rows of the client's sub-table that are not its own items, i.e. the
  n_neg items it sampled uniformly from the broadcast table. They are what L_rec already pushes
  the state away from, so the views add no push against the user's own interest.
- "prefixes": the client's own earlier prefix states h_0 .. h_{L-2}, which the next-item pass
  computes anyway (its local "batch"). This pushes the served state h_{L-1} away from the user's
  own recent past; on long histories with a lasting user interest it collapses accuracy from
  scratch (docs/results/client-objective-collapse.md). A client with a single training pair has
  no prefix negative, and its sequence and user terms are exactly 0.
Either way the negatives are held constant (no gradient flows into them, as with MoCo's queue, He
et al., CVPR 2020): with gradient, prefix negatives pushed apart the very prefix states that L_rec
trains, which cost accuracy (measured in docs/results/client-objective.md).

- Sequence view (CL4SRec, Xie et al., "Contrastive Learning for Sequential Recommendation",
  ICDE 2022): two augmentations of x, each drawn uniformly from crop (keep a contiguous fraction),
  mask (replace a fraction with a mask token) and reorder (shuffle a contiguous span); last states.
  The mask token reads an all-zero embedding row: nothing is learned for it, so nothing extra
  is uploaded.
- User view (noise views as in SimGCL, Yu et al., SIGIR 2022): h_u = h_{L-1} (the encoder state
  after the whole local sequence), views h_u + eps, eps ~ N(0, sigma^2 I).
- Item view (adversarial embedding perturbation as in APR, He et al., SIGIR 2018): for the items
  of the sequence, e_i' = e_i + item_eps * g_i / ||g_i|| with g = dL_rec/de_i (through the whole
  encoder, treated as a constant); InfoNCE between e_i' and e_i against the other rows of the
  client's sub-table (its own items and its sampled negatives).
- Temporal regulariser: sliding windows of width temp_window and stride temp_stride, aligned to
  the end of x; L_temp = mean over adjacent pairs of ||f(S_t) - f(S_{t-1})||^2, f = the window's
  last state, L2-normalised and without dropout. Normalised, because on raw states the term is
  lowered by shrinking every representation (the final layer-norm gain), which stalled learning
  on synthetic data; without dropout, because the trajectory it smooths is the one served.

Augmentations keep the padding invariant the vectorised engine relies on: outputs have the input's
length, padding stays on the left, real positions never hold the padding id, and every random draw
is indexed from the right end, so a client's views do not depend on how far its chunk is padded.
Random draws are precomputed per client from its own (seed, round, user) stream (`fortress_draws`)
and passed into the vmapped step, so the vectorised and the loop engine, any chunking, any Flower
SuperNode and a resumed run all see the same views.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import vjp

if TYPE_CHECKING:
    from fortress.config import Config
    from fortress.models import Model, Params

TERMS = ("rec", "seq", "user", "item", "temp", "union", "fedcl")   # every logged term of every objective


def next_item_loss(logits: torch.Tensor, targets: torch.Tensor,
                   col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax cross-entropy of the next item over the columns of `logits`.

    logits (..., L, S), targets (..., L) column ids with 0 = no target (padding), col_mask (S,)
    marks the columns that are real candidates (column 0, padding, never is).
    """
    if col_mask is None:
        col_mask = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    col_mask = col_mask.clone()
    col_mask[0] = False
    logp = logits.masked_fill(~col_mask, float("-inf")).log_softmax(-1)          # (..., L, S)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)                        # (..., L)
    real = targets > 0
    nll = torch.where(real, nll, torch.zeros_like(nll))                           # no 0 * inf
    return nll.sum() / real.sum().clamp(min=1)


def sampled_softmax_bias(x: torch.Tensor, y: torch.Tensor, col_mask: torch.Tensor,
                         n_items: int) -> torch.Tensor:
    """logQ correction (S,) for a client's sub-table of own items plus uniform negatives; x, y (L,) or (W, L).

    The full softmax sums over the client's own items and the n_items - n_own others; the
    sub-table holds n_neg of those others drawn uniformly, so each stands for
    (n_items - n_own) / n_neg of them and gets that log-ratio added to its logit (Bengio &
    Senecal 2008; Jean et al., ACL 2015). Without it, a 512-of-10k sub-table makes the local loss
    far too easy and federated accuracy plateaus early.
    """
    S = col_mask.shape[-1]
    seen = torch.cat([x.reshape(-1), y.reshape(-1)])                              # every window's items
    own = torch.zeros(S, dtype=torch.bool, device=x.device).scatter(0, seen, True)
    own = own & col_mask                                                          # (S,) own items
    neg = col_mask & ~own                                                         # (S,) negatives
    n_own, n_neg = own.sum(), neg.sum()
    ratio = (n_items - n_own).clamp(min=1).to(torch.float64) / n_neg.clamp(min=1)
    bias = torch.where(neg, ratio.log(), torch.zeros((), dtype=torch.float64))
    return bias


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             neg_mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE of anchors (B, d) vs their positives (B, d) against shared negatives (K, d).

    Cosine similarity over temperature tau; negatives where neg_mask (K,) is False are ignored.
    """
    a, p, n = (F.normalize(t, dim=-1, eps=1e-12) for t in (anchor, positive, negatives))
    pos = (a * p).sum(-1, keepdim=True) / tau                                     # (B, 1)
    neg = (a @ n.T / tau).masked_fill(~neg_mask, float("-inf"))                   # (B, K)
    return -torch.cat([pos, neg], -1).log_softmax(-1)[:, 0].mean()                # ()


# ---- augmentations of one left-padded sequence x (L,); u holds its random draws ----

def _count(ratio: float, n: torch.Tensor) -> torch.Tensor:
    return torch.floor(ratio * n + 0.5).long()                                   # round half up


def _age(x: torch.Tensor) -> torch.Tensor:
    """Steps back from the most recent position: (L,) with 0 at the end."""
    return torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)


def crop(x: torch.Tensor, ratio: float, u_start: torch.Tensor) -> torch.Tensor:
    """Keep a contiguous run of round(ratio * n) >= 1 real items, right-aligned: (L,) -> (L,)."""
    n = (x > 0).sum()
    keep = _count(ratio, n).clamp(min=1)
    off = torch.floor(u_start * (n - keep + 1)).long()                           # recent items dropped
    src = (torch.arange(x.shape[-1], device=x.device) - off).clamp(min=0)         # (L,)
    return torch.where(_age(x) < keep, x[src], torch.zeros_like(x))


def mask(x: torch.Tensor, ratio: float, keys: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Replace the round(ratio * n) real items with the smallest keys by mask_id: (L,) -> (L,)."""
    real = x > 0
    m = _count(ratio, real.sum())
    k = torch.where(real, keys, torch.full_like(keys, float("inf")))             # (L,)
    rank = (k[None, :] < k[:, None]).sum(-1)                                      # (L,)
    return torch.where(real & (rank < m), torch.full_like(x, mask_id), x)


def reorder(x: torch.Tensor, ratio: float, u_start: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Shuffle a contiguous span of round(ratio * n) real items (order by keys): (L,) -> (L,)."""
    L = x.shape[-1]
    n = (x > 0).sum()
    r = _count(ratio, n)
    off = torch.floor(u_start * (n - r + 1)).long()
    age = _age(x)
    span = (age >= off) & (age < off + r)                                         # (L,)
    first = L - off - r                                                           # span's first index
    pos = torch.arange(L, device=x.device, dtype=keys.dtype)
    # in-span keys fall in (first - 1, first + r): sorting moves only the span, in key order
    order = torch.where(span, first - 0.5 + keys * r, pos).argsort()              # (L,)
    return x[order]


def augment(x: torch.Tensor, u: torch.Tensor, crop_ratio: float, mask_ratio: float,
            reorder_ratio: float, mask_id: int) -> torch.Tensor:
    """One view: crop, mask or reorder, chosen by u[0]; u (2 + R,), R >= L, keys right-aligned."""
    keys = u[u.shape[-1] - x.shape[-1]:]                                         # (L,)
    op = u[0] * 3                                                                # which of the three
    return torch.where(op < 1, crop(x, crop_ratio, u[1]),
                       torch.where(op < 2, mask(x, mask_ratio, keys, mask_id),
                                   reorder(x, reorder_ratio, u[1], keys)))


def windows(x: torch.Tensor, width: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding windows ending at x's last position and every `stride` before it.

    Returns windows (K, width) left-padded, most recent first, and (K,) whether the window ends
    on a real item. K = (L - 1) // stride + 1 depends only on L, the real windows only on x's items.
    """
    L = x.shape[-1]
    ends = L - 1 - stride * torch.arange((L - 1) // stride + 1, device=x.device)     # (K,)
    idx = ends[:, None] - width + 1 + torch.arange(width, device=x.device)           # (K, w)
    win = torch.where(idx >= 0, x[idx.clamp(min=0)], torch.zeros_like(idx))
    return win, x[ends] > 0


def temporal_loss(f: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean ||f_t - f_{t-1}||^2 over adjacent windows that are both real: f (K, d), real (K,)."""
    d2 = (f[:-1] - f[1:]).pow(2).sum(-1)                                          # (K - 1,)
    pair = real[:-1] & real[1:]
    return torch.where(pair, d2, torch.zeros_like(d2)).sum() / pair.sum().clamp(min=1)


# ---- the client objective ----

# the fault-injection streams are (seed, round, 1..3, user): this one is apart from them
DRAW_STREAM = 4


def fortress_draws(cfg: "Config", r: int, users: np.ndarray) -> dict[str, torch.Tensor]:
    """Each user's random draws for round r, every local epoch: two augmentations, two noise vectors.

    Drawn from the user's own stream (seed, round, DRAW_STREAM, user), so they do not depend on
    which other clients share its round, chunk or Flower SuperNode, and a resumed run replays them.
    """
    E = cfg.local_epochs
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    aug = np.empty((len(users), E, 2, 2 + cfg.max_len))
    noise = np.empty((len(users), E, 2, cfg.dim))
    for i, u in enumerate(users):
        rng = np.random.default_rng([cfg.seed, r, DRAW_STREAM, int(u)])
        aug[i] = rng.random((E, 2, 2 + cfg.max_len))
        noise[i] = rng.standard_normal((E, 2, cfg.dim))
    return {"aug": torch.from_numpy(aug),                                         # (n, E, 2, 2 + R)
            "noise": torch.from_numpy(noise).to(dtype)}                           # (n, E, 2, d)


def fortress_loss(model: "Model", dense: "Params", table: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor, col_mask: torch.Tensor, draws: dict[str, torch.Tensor],
                  cfg: "Config", n_items: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FORTRESS loss of one client and its terms: x, y (L,) or (W, L) windows of sub-table slots, table (S, d).

    L_rec is FedAvg's next-item loss (`client.rec_loss`) over all the windows: with n_items, the
    sampled negatives get the logQ correction of `sampled_softmax_bias`. The other terms read the
    last window (see the module docstring).
    """
    bias = sampled_softmax_bias(x, y, col_mask, n_items) if n_items else None    # (S,)
    xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])              # (W, L)

    def rec(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = model.encode({**dense, "item_emb": t}, xs, training=True)         # (W, L, d)
        logits = h @ t.T                                                       # (W, L, S)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        return next_item_loss(logits, ys, col_mask), h[-1]                     # h of the last window (L, d)

    if cfg.item_view:       # one forward pass gives L_rec, h and (by vjp) dL_rec/dtable
        l_rec, pullback, h = vjp(rec, table, has_aux=True)
        g = pullback(torch.ones_like(l_rec))[0].detach()                          # (S, d)
    else:
        l_rec, h = rec(table)
    terms = {"rec": l_rec}
    x, y = xs[-1], ys[-1]                                                         # the views' window (L,)
    # the views' negatives are constants (see the module docstring for the choice)
    if cfg.view_negatives == "items":    # sampled rows: the sub-table without the client's own items (all windows')
        own = torch.zeros_like(col_mask).scatter(0, torch.cat([xs.reshape(-1), ys.reshape(-1)]), True)  # (S,)
        negatives, neg_real = table.detach(), col_mask & ~own                     # (S, d), (S,)
    else:                                # the client's own earlier prefix states (the last window's)
        negatives, neg_real = h[:-1].detach(), x[:-1] > 0                         # (L - 1, d), (L - 1,)
    # views and windows are built from x's positions and read a small table of x's rows (+ a zero
    # mask row): the same embeddings as the sub-table, at a fraction of its gather/scatter cost
    L, d = x.shape[0], table.shape[1]
    pos = torch.where(x > 0, torch.arange(1, L + 1, device=x.device), 0)            # (L,) rows of `local`
    zero = table.new_zeros(1, d)
    local = {**dense, "item_emb": torch.cat([zero, table[x], zero])}             # (L + 2, d)
    if cfg.seq_view:
        views = torch.stack([augment(pos, u, cfg.crop_ratio, cfg.mask_ratio, cfg.reorder_ratio, L + 1)
                             for u in draws["aug"]])                              # (2, L)
        z = model.encode(local, views, training=True)[:, -1]                      # (2, d)
        terms["seq"] = info_nce(z, z.flip(0), negatives, neg_real, cfg.tau)
    if cfg.user_view:
        hu = h[-1] + cfg.user_noise_std * draws["noise"]                          # (2, d)
        terms["user"] = info_nce(hu, hu.flip(0), negatives, neg_real, cfg.tau)
    if cfg.item_view:
        seq = torch.cat([x, y[-1:]])                                              # (L + 1,) own items
        e = table[seq]                                                            # (L + 1, d)
        e_adv = e + cfg.item_eps * F.normalize(g[seq], dim=-1, eps=1e-12)         # (L + 1, d)
        sim = F.normalize(e_adv, dim=-1) @ F.normalize(table, dim=-1, eps=1e-12).T / cfg.tau  # (L + 1, S)
        terms["item"] = next_item_loss(sim, seq, col_mask)
    if cfg.temporal:
        win, real = windows(pos, cfg.temp_window, cfg.temp_stride)                # (K, w), (K,)
        f = model.encode(local, win, training=False)[:, -1]                       # (K, d), no dropout
        terms["temp"] = temporal_loss(F.normalize(f, dim=-1, eps=1e-12), real)
    cl = sum(terms[k] for k in ("seq", "user", "item") if k in terms)
    loss = l_rec + cfg.lambda_cl * cl + cfg.lambda_temp * terms.get("temp", 0.0)
    return loss, {k: v.detach() for k, v in terms.items()}


# ---- CL4SRec: the centralised contrastive reference ----

def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """CL4SRec's contrastive loss of the two views' states a, b (B, d) of a batch: each view's positive
    is the other view of its sequence, its negatives the other 2B - 2 views (other users: what a
    federated client never holds); dot-product similarity over tau, as in RecBole's CL4SRec."""
    z = torch.cat([a, b])                                                         # (2B, d)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))                          # (2B, 2B) without self
    B = a.shape[0]
    pair = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)     # (2B,)
    return F.cross_entropy(sim, pair)


def cl4srec_loss(model: "Model", params: "Params", x: torch.Tensor, u: torch.Tensor, cfg: "Config") -> torch.Tensor:
    """CL4SRec's term (Xie et al., ICDE 2022) of a central batch x (B, L) of left-padded sequences: two
    augmentations of every sequence (crop / mask / reorder, `augment`; u (B, 2, 2 + L) their draws), the
    encoder's last state of each, `nt_xent`. The mask token reads an extra all-zero row."""
    n, d = params["item_emb"].shape
    view = {**params, "item_emb": torch.cat([params["item_emb"], params["item_emb"].new_zeros(1, d)])}

    def one(seq: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        return augment(seq, draws, cfg.crop_ratio, cfg.mask_ratio, cfg.reorder_ratio, n)
    views = [torch.vmap(one)(x, u[:, k]) for k in range(2)]                      # 2 x (B, L)
    z = [model.encode(view, v, training=True)[:, -1] for v in views]             # 2 x (B, d)
    return nt_xent(z[0], z[1], cfg.cl4srec_tau)


# ---- UNION's client term (a peer method) ----

# the fault-injection streams are (seed, round, 1..3, user), FORTRESS's views 4: UNION's draws are apart from them
UNION_STREAM = 5


def union_draws(cfg: "Config", r: int, users: np.ndarray) -> dict[str, torch.Tensor]:
    """Each user's uniform draws for UNION's term in round r, every local epoch: one positive and
    `union_negatives` negatives for each of the max_len + 1 anchor positions (right-aligned), from the
    user's own stream (seed, round, UNION_STREAM, user)."""
    E, A, K = cfg.local_epochs, cfg.max_len + 1, cfg.union_negatives
    pos = np.empty((len(users), E, A))
    neg = np.empty((len(users), E, A, K))
    for i, u in enumerate(users):
        rng = np.random.default_rng([cfg.seed, r, UNION_STREAM, int(u)])
        pos[i] = rng.random((E, A))
        neg[i] = rng.random((E, A, K))
    return {"upos": torch.from_numpy(pos), "uneg": torch.from_numpy(neg)}       # (n, E, A), (n, E, A, K)


def _kth_true(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Index of the (k+1)-th True of mask (..., S) for each k (..., m): the first position whose running
    count of Trues exceeds k (vmappable: no nonzero, no data-dependent shapes)."""
    count = mask.long().cumsum(-1)                                                # (..., S)
    return (count[..., None, :] <= k[..., :, None]).sum(-1)                       # (..., m)


def union_loss(model: "Model", dense: "Params", table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               col_mask: torch.Tensor, draws: dict[str, torch.Tensor], cfg: "Config",
               n_items: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """UNION client loss of one client and its terms: L_rec + union_lambda * L_union.

    Yu et al., "Untargeted Attack against Federated Recommendation Systems via Poisonous Item
    Embeddings and the Defense", AAAI 2023 (reference code: github.com/yflyl613/FedRec, `Client.update`).
    L_union is their contrastive item-embedding task, which pulls the item table toward a uniform
    distribution: for each interaction of the client (the anchor item a), a positive p drawn from the
    client's other items and K negatives drawn from items it has not interacted with; the loss is the
    cross-entropy of picking p among {p, n_1..n_K} by cos(e_a, e_c) / union_tau. Only item rows of the
    client's sub-table are touched, so the upload is FedAvg's (encoder + sub-table rows, same bytes).

    What the paper and its code leave open, and our choice:
    - where negatives come from: the reference draws K=15 from the whole catalogue; a client of ours
      holds only its sub-table, so they are drawn (with replacement) from its sampled negatives, the
      rows it downloads and uploads anyway;
    - the positive: the reference samples another interaction (possibly the same item again); we draw
      another *distinct* own item (a client with a single item has no pair and its term is 0);
    - normalisation and temperature: the public code reads `NORMALIZE` and `TEMP` that its argument
      parser never defines; we use cosine similarity (uniformity on the hypersphere) and
      union_tau = 0.5 (the temperature of our other InfoNCE terms);
    - weight union_lambda = 1 and K = 15 as in the reference's defaults; anchors are the items of the
      local window (the last max_len + 1), each position once; no dropout on the term.
    L_rec is FedAvg's next-item loss (`client.rec_loss`, logQ-corrected when n_items > 0).
    """
    bias = sampled_softmax_bias(x, y, col_mask, n_items) if n_items else None    # (S,)
    h = model.encode({**dense, "item_emb": table}, x[None], training=True)[0]    # (L, d)
    logits = h @ table.T                                                          # (L, S)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    l_rec = next_item_loss(logits, y, col_mask)
    S = table.shape[0]
    seq = torch.cat([x, y[-1:]])                                                  # (A,) anchor slots, 0 = padding
    A = seq.shape[0]
    pos_u, neg_u = draws["upos"][-A:], draws["uneg"][-A:]                         # (A,), (A, K)
    own = torch.zeros_like(col_mask).scatter(0, seq, True) & col_mask             # (S,)
    others = own[None, :] & (torch.arange(S, device=x.device)[None, :] != seq[:, None])   # (A, S)
    n_others = others.sum(-1)                                                     # (A,)
    negs = col_mask & ~own                                                        # (S,)
    n_negs = negs.sum()
    j = torch.floor(pos_u * n_others).long().clamp(max=(n_others - 1).clamp(min=0))
    pos = _kth_true(others, j[:, None])[:, 0].clamp(max=S - 1)                   # (A,)
    jn = torch.floor(neg_u * n_negs).long().clamp(max=(n_negs - 1).clamp(min=0))
    neg = _kth_true(negs, jn.reshape(-1)).reshape(jn.shape).clamp(max=S - 1)      # (A, K)
    z = F.normalize(table, dim=-1, eps=1e-12)                                     # (S, d)
    cand = torch.cat([pos[:, None], neg], 1)                                      # (A, 1 + K)
    sim = (z[seq][:, None, :] * z[cand]).sum(-1) / cfg.union_tau                  # (A, 1 + K)
    nll = -sim.log_softmax(-1)[:, 0]                                              # (A,)
    real = (seq > 0) & (n_others > 0) & (n_negs > 0)
    l_union = torch.where(real, nll, torch.zeros_like(nll)).sum() / real.sum().clamp(min=1)
    loss = l_rec + cfg.union_lambda * l_union
    return loss, {"rec": l_rec.detach(), "union": l_union.detach()}


# ---- FedCL's client half (a peer method; the exchange and its choices: server/fedcl.py) ----

# the fault-injection streams are (seed, round, 1..3, user), FORTRESS's views 4, UNION's 5: FedCL's noise is apart
FEDCL_STREAM = 6


def fedcl_noise(cfg: "Config", r: int, users: np.ndarray) -> torch.Tensor:
    """Each user's Laplace(0, fedcl_noise) noise (n, d) for its round-r upload, from its own stream
    (seed, round, FEDCL_STREAM, user): the same wherever it is computed, replayed on resume."""
    out = np.empty((len(users), cfg.dim))
    for i, u in enumerate(users):
        out[i] = np.random.default_rng([cfg.seed, r, FEDCL_STREAM, int(u)]).laplace(0.0, 1.0, cfg.dim)
    return cfg.fedcl_noise * torch.from_numpy(out)                                # (n, d) float64


def fedcl_perturb(h: torch.Tensor, clip: float, noise: torch.Tensor) -> torch.Tensor:
    """FedCL's local differential privacy: h (n, d) clipped to L2 norm `clip`, plus `noise` (n, d)."""
    norm = h.norm(dim=-1, keepdim=True)                                           # (n, 1)
    return h * (clip / norm.clamp(min=clip)) + noise.to(h.dtype)


def fedcl_loss(model: "Model", dense: "Params", table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               col_mask: torch.Tensor, draws: dict[str, torch.Tensor], cfg: "Config",
               n_items: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FedCL client loss of one client and its terms: L_rec + fedcl_lambda * L_fedcl; x, y (L,) or (W, L).

    The sub-table holds the client's own items (slots 1..), its uniform negatives, then the hard
    negatives the server sent that are neither its own items nor already among its uniform negatives;
    draws["hard"] = (a, b): slots >= a are hard negatives, slots < b its own items and uniform negatives
    (slots a..b-1 are both: uniform draws the server also named).
    - L_rec is FedAvg's next-item loss (`client.rec_loss`) over the own items and uniform negatives
      only (logQ-corrected when n_items > 0): the same value and gradients as FedAvg on the same draw.
    - L_fedcl is the paper's contrastive loss: softmax cross-entropy of each target against the hard
      negatives mixed with the in-batch negatives (the client's other own items, as the paper builds
      them from the positives), dot-product scores as the model ranks, no correction.
    The paper trains one loss whose negatives also include "observed" ones (shown, not clicked);
    implicit feedback has none, their stand-in is the uniform sample that L_rec already contrasts with,
    so FedCL's addition is a weighted term and fedcl_lambda = 0 is FedAvg.
    """
    S = table.shape[0]
    slot = torch.arange(S, device=x.device)
    hard_from, uniform_to = draws["hard"][0], draws["hard"][1]
    rec_cols = col_mask & (slot < uniform_to)                                     # (S,) own + uniform
    own = torch.zeros_like(col_mask).scatter(0, torch.cat([x.reshape(-1), y.reshape(-1)]), True) & col_mask
    cl_cols = own | (col_mask & (slot >= hard_from))                             # (S,) own + hard
    xs = x.reshape(-1, x.shape[-1])                                               # (W, L)
    h = model.encode({**dense, "item_emb": table}, xs, training=True)             # (W, L, d)
    logits = (h @ table.T).reshape(*y.shape, S)                                   # (..., L, S)
    bias = sampled_softmax_bias(x, y, rec_cols, n_items).to(logits.dtype) if n_items else 0.0
    l_rec = next_item_loss(logits + bias, y, rec_cols)
    l_cl = next_item_loss(logits, y, cl_cols)
    return l_rec + cfg.fedcl_lambda * l_cl, {"rec": l_rec.detach(), "fedcl": l_cl.detach()}
