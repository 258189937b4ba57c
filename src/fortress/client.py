"""One client's local training as a pure function, and a round of clients: vectorised or looped.

A client holds one private time-ordered sequence. Each round it downloads the dense encoder and
the item rows it needs — its own items plus `n_neg` negatives sampled uniformly from the rest of
the catalogue — trains `local_epochs` full-sequence steps with a fresh optimiser, and uploads the
change of exactly those parameters. The next-item loss is a softmax over that sub-table.

What a client trains on (`train_windows`): with `whole_history` its whole sequence, cut into
windows of max_len inputs (each step is one batch of all its windows, so a client stays one
upload); without, its last max_len + 1 items only. A chunk's inputs are then (n, W, L) windows
instead of (n, L) sequences, and a loss takes a client's x, y as (L,) or (W, L).

The vectorised engine stacks clients into chunks (sorted by length so each chunk is padded only
to its own longest sequence) and runs `torch.func.vmap` over `local_train`; the loop engine calls
the very same `local_train` on each client's unpadded tensors and is the reference it must match.

A loss function has the signature `loss_fn(model, dense, table, x, y, col_mask[, draws])` and
returns the loss or `(loss, terms)`, terms a dict of scalar parts to log. `draws` are per-client
random numbers precomputed outside the vmapped step (one slice per local epoch), so that both
engines see the same ones; dropout alone draws from torch's RNG inside vmap.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from fortress.data.dataset import Dataset
from fortress.models import Model, Params, dense_keys
from fortress.objectives import (fedcl_loss, fortress_draws, fortress_loss, next_item_loss, sampled_softmax_bias,
                                 union_draws, union_loss)
from fortress.updates import Updates


@dataclass
class Chunk:
    """Clients trained together. Slot 0 of every sub-table is padding; unused slots hold item 0."""

    users: torch.Tensor    # (n,) int64
    weight: torch.Tensor   # (n,) number of train interactions the client holds
    items: torch.Tensor    # (n, S) global item id of each sub-table slot
    x: torch.Tensor        # (n, L) inputs as sub-table slots, left-padded with 0; (n, W, L) with windows,
                           # oldest first, a client with fewer windows padded by all-0 windows in front
    y: torch.Tensor        # (n, L) or (n, W, L) next-item targets as sub-table slots, 0 = none
    draws: dict[str, torch.Tensor] | None = None   # per-client (n, epochs, ...) draws for the loss
    hard: torch.Tensor | None = None   # (n, 2) FedCL: first slot of the client's hard negatives, first slot after its
                                       # uniform negatives (objectives.fedcl_loss); None without hard negatives

    @property
    def n(self) -> int:
        return len(self.users)

    def to(self, device: torch.device) -> "Chunk":
        """The chunk's tensors on `device`."""
        if self.items.device == device:
            return self
        return Chunk(*(t.to(device) for t in (self.users, self.weight, self.items, self.x, self.y)),
                     None if self.draws is None else {k: d.to(device) for k, d in self.draws.items()},
                     None if self.hard is None else self.hard.to(device))


def eligible_clients(ds: Dataset) -> np.ndarray:
    """Users with at least one (input, next item) pair to train on."""
    return np.flatnonzero(ds.train_len >= 2)


def train_windows(seq: np.ndarray, max_len: int, whole_history: bool = True) -> list[np.ndarray]:
    """What a user trains on: windows of at most max_len + 1 items (max_len inputs, each followed by its
    target), oldest first.

    Without `whole_history`, the last max_len + 1 items alone. With it, windows cut from the right end
    so that no target repeats: the last window is the last max_len + 1 items, the one before it ends on
    that window's first item (its first input, now a target), and so on; every item but the very first
    is a target exactly once, and only the oldest window can be shorter (>= 2 items). Non-overlapping
    windows keep the work linear in the history (every prefix as its own example, as RecBole's
    augmentation does, costs max_len times more) at the price of a short context for the first
    targets of each window. A sequence of at most max_len + 1 items is one window either way.
    """
    if not whole_history or len(seq) <= max_len + 1:
        return [seq[-(max_len + 1):]]
    ends = range(len(seq), 1, -max_len)                     # each window's end (exclusive), newest first
    return [seq[max(0, e - max_len - 1):e] for e in reversed(ends)]


def sample_negatives(own: np.ndarray, n_items: int, n_neg: int, rng: np.random.Generator) -> np.ndarray:
    """n_neg distinct items drawn uniformly from 1..n_items without the client's own items."""
    free = n_items - len(own)
    if n_neg >= free:
        rest = np.setdiff1d(np.arange(1, n_items + 1), own)
        return rng.permutation(rest)
    out = np.empty(0, dtype=np.int64)
    while len(out) < n_neg:
        cand = rng.integers(1, n_items + 1, size=2 * n_neg + len(own))
        cand = np.concatenate([out, cand[~np.isin(cand, own)]])
        _, first = np.unique(cand, return_index=True)
        out = cand[np.sort(first)]
    return out[:n_neg]


def build_chunks(ds: Dataset, users: np.ndarray, n_neg: int, max_len: int, chunk_size: int,
                 rng: np.random.Generator | None = None, *, key: tuple[int, ...] | None = None,
                 whole_history: bool = False) -> list[Chunk]:
    """Gather each client's last max_len + 1 train items (with `whole_history`, all its train items in
    windows of max_len: `train_windows`) and its sub-table, grouped by length.

    Negatives come from `rng` in user order, or, given `key` (e.g. (seed, round)), from each
    client's own stream `default_rng([*key, user])`: then a client draws the same negatives
    wherever it is trained (in-process, or on whichever Flower SuperNode hosts it).
    """
    return list(iter_chunks(ds, users, n_neg, max_len, chunk_size, rng, key=key, whole_history=whole_history))


def iter_chunks(ds: Dataset, users: np.ndarray, n_neg: int, max_len: int, chunk_size: int,
                rng: np.random.Generator | None = None, *, key: tuple[int, ...] | None = None,
                whole_history: bool = False, hard: list[np.ndarray] | None = None) -> Iterator[Chunk]:
    """`build_chunks` one chunk at a time (with `key`, each chunk's sub-tables are built only when it is reached);
    `hard`: each user's FedCL hard negatives, added to its sub-table (see `iter_chunks_from_sequences`)."""
    if whole_history:
        seqs = [ds.train_seq(int(u)) for u in users]
    else:
        seqs = [ds.train_seq(int(u))[-(max_len + 1):] for u in users]
    weights = [len(ds.train_seq(int(u))) for u in users]
    return iter_chunks_from_sequences(users, seqs, weights, ds.n_items, n_neg, chunk_size, rng, key=key,
                                      windows=max_len if whole_history else None, hard=hard)


def chunks_from_sequences(users: np.ndarray, seqs: list[np.ndarray], weights: list[float], n_items: int,
                          n_neg: int, chunk_size: int, rng: np.random.Generator | None = None,
                          prefix: np.ndarray | None = None, *, key: tuple[int, ...] | None = None,
                          windows: int | None = None) -> list[Chunk]:
    """Chunks of clients from their sequences; a sub-table holds own items and n_neg negatives.
    Used for benign clients (train sequences) and malicious ones (fake sequences). Negatives
    come from `rng` or from each client's stream (see `build_chunks`). `prefix`
    (n, P) puts the same number of chosen items first, at slots 1..P of every client's sub-table
    (an attack's targets and the items it pushes down), so a loss can address them by slot; the
    client's other items follow in sorted order, then the negatives. Chunks are grouped by length.
    With `windows` (= max_len) each sequence is cut by `train_windows` and a chunk's x, y are
    (n, W, L); without, each sequence is one (its inputs and targets (n, L)).
    """
    return list(iter_chunks_from_sequences(users, seqs, weights, n_items, n_neg, chunk_size, rng, prefix, key=key,
                                           windows=windows))


def iter_chunks_from_sequences(users: np.ndarray, seqs: list[np.ndarray], weights: list[float], n_items: int,
                               n_neg: int, chunk_size: int, rng: np.random.Generator | None = None,
                               prefix: np.ndarray | None = None, *,
                               key: tuple[int, ...] | None = None, windows: int | None = None,
                               hard: list[np.ndarray] | None = None) -> Iterator[Chunk]:
    """`chunks_from_sequences` one chunk at a time; with `key` a chunk's sub-tables are built when it is
    reached, so the memory of the chunks not yet trained does not grow with the clients of a round.

    `hard` (FedCL): each client's hard negatives from the server. Its uniform negatives are drawn as
    without them; the hard ones that are its own items are dropped, those it drew uniformly anyway move
    to the end of its uniform negatives, the rest follow them, and `Chunk.hard` marks the two boundaries.
    """
    def sub(i: int) -> tuple[np.ndarray, np.ndarray]:
        own = np.unique(seqs[i])                                            # sorted
        if prefix is not None:
            own = np.concatenate([prefix[i], np.setdiff1d(own, prefix[i])])
        own_rng = rng if key is None else np.random.default_rng([*key, int(users[i])])
        neg = sample_negatives(own, n_items, n_neg, own_rng)
        if hard is None:
            return own, neg, len(neg), len(neg)
        h = np.asarray(hard[i], dtype=np.int64)
        h = h[~np.isin(h, own)]
        both = np.isin(neg, h)
        # own | uniform only | uniform and hard | hard only: slots from 1 + len(own) + a are hard, before
        # 1 + len(own) + b own or uniform
        return (own, np.concatenate([neg[~both], neg[both], h[~np.isin(h, neg)]]), int((~both).sum()), len(neg))

    # one shared rng draws in user order, whatever the chunks; each client's own stream, when it is reached
    subs = [sub(i) for i in range(len(users))] if key is None else None
    # sorted by length: a longer sequence has as many windows or more, each as long or longer
    order = np.argsort([len(s) for s in seqs], kind="stable")
    n_win = [1 if windows is None else len(range(len(s), 1, -windows)) for s in seqs]     # train_windows' count
    L_in = [len(s) - 1 if windows is None else min(len(s) - 1, windows) for s in seqs]    # its longest inputs
    # bucketed by padded work (windows x length), so that a long history pads no short one; with windows a
    # chunk also holds at most the padded positions of chunk_size one-window clients (memory as without them)
    budget = None if windows is None else chunk_size * windows
    for part in length_buckets(np.array([n_win[i] * L_in[i] for i in order]), chunk_size, budget=budget):
        idx = order[part]
        mine = {i: subs[i] if subs is not None else sub(i) for i in idx.tolist()}
        L, W = max(L_in[i] for i in idx), max(n_win[i] for i in idx)
        S = 1 + max(len(own) + len(neg) for own, neg, _, _ in mine.values())
        items = np.zeros((len(idx), S), dtype=np.int64)
        x = np.zeros((len(idx), W, L), dtype=np.int64)
        y = np.zeros((len(idx), W, L), dtype=np.int64)
        bounds = np.zeros((len(idx), 2), dtype=np.int64)
        for row, i in enumerate(idx):
            own, neg, a, b = mine[i]
            items[row, 1:1 + len(own) + len(neg)] = np.concatenate([own, neg])
            bounds[row] = 1 + len(own) + a, 1 + len(own) + b
            sort = np.argsort(own, kind="stable")
            local = 1 + sort[np.searchsorted(own, seqs[i], sorter=sort)]     # slot of each item
            wins = [local] if windows is None else train_windows(local, windows)
            for j, win in enumerate(wins, start=W - len(wins)):
                n = len(win) - 1
                x[row, j, L - n:], y[row, j, L - n:] = win[:-1], win[1:]
        if windows is None:                       # one sequence per client: (n, L)
            x, y = x[:, 0].copy(), y[:, 0].copy()
        yield Chunk(torch.as_tensor(users[idx], dtype=torch.int64),
                    torch.as_tensor([weights[i] for i in idx], dtype=torch.float64),
                    torch.from_numpy(items), torch.from_numpy(x), torch.from_numpy(y),
                    hard=None if hard is None else torch.from_numpy(bounds))


# a chunk's fixed cost (one vmapped step's Python and dispatch overhead) in padded input positions, measured
# on one core with the default SASRec (docs/results/engine.md): below it, padding is cheaper than another chunk
CHUNK_OVERHEAD = 384


def length_buckets(lengths: np.ndarray, chunk_size: int, overhead: int | None = None,
                   budget: int | None = None) -> list[slice]:
    """Consecutive groups of clients sorted by input length (ascending), each padded to its longest.

    A group holds at most chunk_size clients and grows while the padding it would carry, positions
    beyond each client's own length, stays within `overhead`: no client pays for max_len unless
    a chunk's own cost outweighs its padding. With `budget`, a group also stops before its padded
    positions (clients x longest) pass it; a client longer than the budget is a group alone.
    """
    overhead = CHUNK_OVERHEAD if overhead is None else overhead
    out, start, total = [], 0, 0
    for i, L in enumerate(lengths.tolist()):
        n = i - start
        if n and (n == chunk_size or (n + 1) * L - (total + L) > overhead
                  or (budget is not None and (n + 1) * L > budget)):
            out.append(slice(start, i))
            start, total = i, 0
        total += L
    if len(lengths):
        out.append(slice(start, len(lengths)))
    return out


def rec_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             col_mask: torch.Tensor, n_items: int = 0) -> torch.Tensor:
    """Next-item loss of one client: x, y (L,) or (W, L) windows of sub-table slots, table (S, d); the mean
    over all its targets.

    With n_items (the catalogue size) the sampled negatives get the logQ correction of
    `sampled_softmax_bias`; with 0 the loss is a plain softmax over the sub-table.
    """
    xs = x.reshape(-1, x.shape[-1])                                             # (W, L)
    h = model.encode({**dense, "item_emb": table}, xs, training=True)           # (W, L, d)
    logits = (h @ table.T).reshape(*y.shape, -1)                                # (..., L, S)
    if n_items:
        logits = logits + sampled_softmax_bias(x, y, col_mask, n_items).to(logits.dtype)
    return next_item_loss(logits, y, col_mask)


# the `objective` key: the loss an honest client minimises, and the per-client draws it needs (if any)
OBJECTIVES: dict[str, Callable] = {"next_item": rec_loss, "fortress": fortress_loss, "union": union_loss,
                                   "fedcl": fedcl_loss}
DRAWS: dict[str, Callable] = {"fortress": fortress_draws, "union": union_draws}


def objective(cfg, n_items: int, r: int = 0) -> Callable:
    """The loss an honest client minimises in round r (from 0) under `cfg` (a Config), for a catalogue of n_items.

    next_item: the next-item loss; fortress: the FORTRESS objective; union: UNION's client objective
    (objectives.union_loss); fedcl: FedCL's (objectives.fedcl_loss). Each one's next-item term is the
    same (logQ-corrected when `neg_correction`) sampled softmax. With `lambda_schedule=decay`, FORTRESS's
    lambda_cl and lambda_temp are scaled by 1 - r / rounds (full weight in round 0, nearly none in the last).
    """
    n = n_items if cfg.neg_correction else 0
    if cfg.objective == "next_item":
        return partial(rec_loss, n_items=n)
    if cfg.objective == "fortress" and cfg.lambda_schedule == "decay":
        s = max(0.0, 1.0 - r / max(cfg.rounds, 1))
        cfg = replace(cfg, lambda_cl=cfg.lambda_cl * s, lambda_temp=cfg.lambda_temp * s)
    return partial(OBJECTIVES[cfg.objective], cfg=cfg, n_items=n)


def round_chunks(ds: Dataset, cfg, users: np.ndarray, r: int, hard: dict[int, np.ndarray] | None = None
                 ) -> list[Chunk]:
    """Round r's chunks of `users`, with the per-client draws the objective needs (fortress, union), and
    for fedcl each user's hard negatives `hard` (user -> item ids, from `rounds.fedcl_exchange`) in its
    sub-table.

    Negatives and draws come from each client's own (seed, round, user) streams, so a client sees
    the same sub-table and the same views wherever it is trained and however it is chunked.
    """
    return list(iter_round_chunks(ds, cfg, users, r, hard))


def iter_round_chunks(ds: Dataset, cfg, users: np.ndarray, r: int, hard: dict[int, np.ndarray] | None = None
                      ) -> Iterator[Chunk]:
    """`round_chunks` one chunk at a time, each built when it is reached."""
    draws = DRAWS.get(cfg.objective)
    lists = None if hard is None else [hard[int(u)] for u in users]
    for c in iter_chunks(ds, users, cfg.n_neg, cfg.max_len, cfg.chunk_size, key=(cfg.seed, r),
                         whole_history=cfg.whole_history, hard=lists):
        if cfg.objective == "fedcl":
            yield replace(c, draws={"hard": fedcl_slots(c, cfg.local_epochs)})
        else:
            yield c if draws is None else replace(c, draws=draws(cfg, r, c.users.numpy()))


def fedcl_slots(c: Chunk, epochs: int) -> torch.Tensor:
    """`objectives.fedcl_loss`'s draws["hard"] of a chunk's clients, every epoch: (n, epochs, 2); without hard
    negatives (S, S), i.e. none."""
    bounds = c.hard if c.hard is not None else torch.full((c.n, 2), c.items.shape[1], dtype=torch.int64)
    return bounds[:, None, :].expand(c.n, epochs, 2).contiguous()


@torch.no_grad()
def user_representations(model: Model, params: Params, ds: Dataset, users: np.ndarray, group: int = 256
                         ) -> torch.Tensor:
    """(n, d) each user's state after its last max_len train items under `params` (no dropout): the user
    embedding a FedCL client infers locally before training, `group` users encoded at a time."""
    dev = params["item_emb"].device
    out = []
    for a in range(0, len(users), group):
        seqs = [ds.train_seq(int(u))[-model.max_len:] for u in users[a:a + group]]
        x = np.zeros((len(seqs), max(len(q) for q in seqs)), dtype=np.int64)
        for i, q in enumerate(seqs):
            x[i, x.shape[1] - len(q):] = q
        out.append(model.last(params, torch.from_numpy(x).to(dev)))              # (g, d)
    return torch.cat(out)


def _with_terms(loss_fn: Callable, model: Model, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = loss_fn(model, *args)
    return out if isinstance(out, tuple) else (out, {})


def local_train(model: Model, loss_fn: Callable, epochs: int, lr: float, opt: str,
                dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                col_mask: torch.Tensor, draws: dict[str, torch.Tensor] | None = None
                ) -> tuple[Params, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`epochs` full-sequence steps of SGD or Adam (fresh state) on one client's data (all its windows).

    Returns the change of the dense parameters, the change of the sub-table (S, d), the loss of
    the last step and its logged terms. Pure: the broadcast tensors are never modified.
    """
    step = grad_and_value(partial(_with_terms, loss_fn, model), argnums=(0, 1), has_aux=True)
    if opt == "sgd":        # the change itself is summed: one step's is exactly -lr g, with no (p - lr g) - p
        change = None
        for t in range(1, epochs + 1):
            extra = () if draws is None else ({k: d[t - 1] for k, d in draws.items()},)
            at = (dense, table) if change is None else ({k: dense[k] + change[0][k] for k in dense}, table + change[1])
            (g_dense, g_table), (loss, terms) = step(at[0], at[1], x, y, col_mask, *extra)
            if change is None:
                change = ({k: -lr * g for k, g in g_dense.items()}, -lr * g_table)
            else:
                change = ({k: change[0][k] - lr * g_dense[k] for k in dense}, change[1] - lr * g_table)
        return change[0], change[1], loss, terms
    params = (dict(dense), table)
    m = v = None
    for t in range(1, epochs + 1):
        extra = () if draws is None else ({k: d[t - 1] for k, d in draws.items()},)
        (g_dense, g_table), (loss, terms) = step(params[0], params[1], x, y, col_mask, *extra)
        grads = (g_dense, g_table)
        # Adam (b1 0.9, b2 0.999), written out so that it vectorises with the rest
        if m is None:
            m = ({k: torch.zeros_like(g) for k, g in g_dense.items()}, torch.zeros_like(g_table))
            v = ({k: torch.zeros_like(g) for k, g in g_dense.items()}, torch.zeros_like(g_table))
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t

        def adam(p, g, m_, v_):
            m_ = 0.9 * m_ + 0.1 * g
            v_ = 0.999 * v_ + 0.001 * g * g
            return p - lr * (m_ / c1) / ((v_ / c2).sqrt() + 1e-8), m_, v_

        new_dense, m_d, v_d = {}, {}, {}
        for k in dense:
            new_dense[k], m_d[k], v_d[k] = adam(params[0][k], grads[0][k], m[0][k], v[0][k])
        new_table, m_t, v_t = adam(params[1], grads[1], m[1], v[1])
        params, m, v = (new_dense, new_table), (m_d, m_t), (v_d, v_t)
    return {k: params[0][k] - dense[k] for k in dense}, params[1] - table, loss, terms


def _train(model: Model, loss_fn: Callable, epochs: int, lr: float, opt: str, params: Params, chunk: Chunk,
           engine: str) -> tuple[Params, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Dense changes {k: (n, ...)}, sub-table changes (n, S, d), losses (n,) and terms of one chunk's clients."""
    keys = dense_keys(params)
    dense = {k: params[k] for k in keys}
    chunk = chunk.to(params["item_emb"].device)
    n, S = chunk.items.shape
    table = params["item_emb"].index_select(0, chunk.items.reshape(-1)).view(n, S, -1)   # (n, S, d)
    col_mask = chunk.items > 0                                                  # (n, S)
    fn = partial(local_train, model, loss_fn, epochs, lr, opt)
    if engine == "vmap":
        return vmap(fn, in_dims=(None, 0, 0, 0, 0, None if chunk.draws is None else 0), randomness="different")(
            dense, table, chunk.x, chunk.y, col_mask, chunk.draws)
    # reference: one client at a time on its own unpadded tensors (without the all-0 windows in front)
    outs = []
    for i in range(chunk.n):
        S = int(col_mask[i].sum()) + 1
        real = chunk.x[i] > 0                                                   # (L,) or (W, L)
        L = int(real.sum(-1).max())
        x, y = chunk.x[i][..., -L:], chunk.y[i][..., -L:]
        if x.dim() == 2:
            W = int(real.any(-1).sum())
            x, y = x[-W:], y[-W:]
        draws = None if chunk.draws is None else {k: d[i] for k, d in chunk.draws.items()}
        outs.append(fn(dense, table[i, :S], x, y, col_mask[i, :S], draws))
    d_table = torch.zeros_like(table)
    for i, (_, dt, _, _) in enumerate(outs):
        d_table[i, :dt.shape[0]] = dt
    d_dense = {k: torch.stack([o[0][k] for o in outs]) for k in keys}
    loss = torch.stack([o[2] for o in outs])
    terms = {k: torch.stack([o[3][k] for o in outs]) for k in outs[0][3]}
    return d_dense, d_table, loss, terms


def train_round(model: Model, loss_fn: Callable, epochs: int, lr: float, opt: str,
                params: Params, chunks: list[Chunk], engine: str = "vmap") -> Updates:
    """Local training of the chunks' clients from the broadcast `params`; their uploads, in chunk order.

    Each chunk's results are written straight into the round's preallocated upload tensors (the
    rows of a client's real sub-table slots, slot order), so no upload is copied twice.
    """
    keys = dense_keys(params)
    dtype, d, dev = params["item_emb"].dtype, params["item_emb"].shape[1], params["item_emb"].device
    P = sum(params[k].numel() for k in keys)
    chunks = [c.to(dev) for c in chunks]
    real = [c.items > 0 for c in chunks]                                        # (n, S) each
    n, M = sum(c.n for c in chunks), sum(int(r.sum()) for r in real)
    dense, rows = torch.empty(n, P, dtype=dtype, device=dev), torch.empty(M, d, dtype=dtype, device=dev)
    rows_client = torch.empty(M, dtype=torch.int64, device=dev)
    rows_item = torch.empty(M, dtype=torch.int64, device=dev)
    losses, parts, a, b = [], [], 0, 0
    for c, r in zip(chunks, real):
        d_dense, d_table, loss, terms = _train(model, loss_fn, epochs, lr, opt, params, c, engine)
        torch.cat([d_dense[k].reshape(c.n, -1) for k in keys], dim=1, out=dense[a:a + c.n])
        flat = r.reshape(-1).nonzero().squeeze(1)                               # (m,) real slots, row-major
        m = len(flat)
        torch.index_select(d_table.reshape(-1, d), 0, flat, out=rows[b:b + m])
        torch.index_select(c.items.reshape(-1), 0, flat, out=rows_item[b:b + m])
        rows_client[b:b + m] = flat // c.items.shape[1] + a
        losses.append(loss)
        parts.append(terms)
        a, b = a + c.n, b + m
    names = sorted({k for t in parts for k in t})
    terms = {k: torch.cat([t[k] if k in t else torch.full((c.n,), float("nan"), dtype=dtype, device=dev)
                           for t, c in zip(parts, chunks)]) for k in names}
    return Updates(torch.cat([c.users for c in chunks]), torch.cat([c.weight for c in chunks]).to(dtype), dense,
                   rows_client, rows_item, rows, torch.cat(losses), terms)


def round_bytes(chunks: list[Chunk], dense_size: int, dim: int, float_bytes: int) -> int:
    """Bytes one direction of a round moves: each client's item rows (+ their int32 ids) and encoder."""
    rows = sum(int((c.items > 0).sum()) for c in chunks)
    clients = sum(c.n for c in chunks)
    return rows * (dim * float_bytes + 4) + clients * dense_size * float_bytes
