"""Synthetic sequences with learnable structure, for demos, tests and scale runs (no download needed).

Design (all draws from numpy `default_rng(seed)`, so a seed gives identical arrays):
- popularity: p_i proportional to 1 / rank^0.9 (Zipf-like) over a seeded random permutation of
  items 1..n_items, so popular items are not simply the small ids;
- transitions: every item has 3 "successor" items drawn uniformly from the catalogue, fixed for
  the dataset; this is the sequential signal a next-item model can learn (and popularity alone
  cannot);
- length: 5 + Geometric(p) - 1 with p = 1 / (mean_len - 4), capped at max(60, 4 mean_len); the
  default mean_len 9 gives p = 0.2 and cap 60 (minimum 5, so every user has a valid and a test
  item); a larger mean_len gives long histories;
- sequence: first item ~ popularity; each next item is, with probability 0.7, a uniformly chosen
  successor of the current item, else ~ popularity. Repeats are allowed.
- taste (off by default): items fall into 20 genres of equal size (a seeded random partition); a
  user's home genre is its first item's; with probability `taste` a step that does not follow a
  successor draws uniformly from the home genre instead of by popularity. This gives a lasting
  user interest, as in real long histories (MovieLens genres), which Markov transitions alone
  lack: a user's states along its sequence then share a direction that predicts its next items.
Generation loops over the (at most cap) time steps, each vectorised over the users still active,
so 1,000,000 users x 100,000 items takes seconds and memory linear in the interactions.
User ids are "u0".."u{n-1}", item ids "i1".."i{n}"; the split is `from_sequences`' leave-one-out.
"""
from __future__ import annotations

import numpy as np

from fortress.data.dataset import Dataset
from fortress.errors import InputError

ZIPF_EXPONENT = 0.9
N_SUCCESSORS = 3
P_FOLLOW = 0.7
MIN_LEN = 5
MAX_LEN = 60
MEAN_LEN = 9
N_GENRES = 20


def synthetic(n_users: int, n_items: int, seed: int = 0, mean_len: int = MEAN_LEN,
              taste: float = 0.0) -> Dataset:
    """Deterministic synthetic dataset of popularity-plus-transition sequences, split leave-one-out."""
    if n_users < 1 or n_items < 1:
        raise InputError(f"synthetic data needs at least 1 user and 1 item, got {n_users} users "
                         f"and {n_items} items")
    if mean_len <= MIN_LEN:
        raise InputError(f"synthetic_len={mean_len} is out of range; the mean length must be > {MIN_LEN}")
    if not 0.0 <= taste <= 1.0:
        raise InputError(f"synthetic_taste={taste!r} is out of range; it must be in [0, 1]")
    p_stop = 1.0 / (mean_len - MIN_LEN + 1)
    cap = max(MAX_LEN, 4 * mean_len)
    rng = np.random.default_rng(seed)
    by_rank = rng.permutation(n_items).astype(np.int64) + 1             # (n_items,) item at rank r
    cdf = np.cumsum(1.0 / np.arange(1, n_items + 1) ** ZIPF_EXPONENT)
    cdf /= cdf[-1]

    def popular(k: int) -> np.ndarray:
        rank = np.searchsorted(cdf, rng.random(k), side="right")        # inverse-CDF sampling
        return by_rank[np.minimum(rank, n_items - 1)]                   # (k,)

    successors = np.zeros((n_items + 1, N_SUCCESSORS), dtype=np.int64)  # row 0 = padding, unused
    # uniform successors: the sequential signal is not just popularity again, so a model that
    # learns transitions beats the most-popular baseline by a wide margin
    successors[1:] = rng.integers(1, n_items + 1, (n_items, N_SUCCESSORS))
    lengths = np.minimum(MIN_LEN - 1 + rng.geometric(p_stop, n_users), cap)    # (n_users,)
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])

    flat = np.empty(int(ptr[-1]), dtype=np.int64)      # all sequences, concatenated
    active = np.arange(n_users)
    cur = popular(n_users)
    flat[ptr[:-1]] = cur
    if taste > 0:      # drawn only then, so taste 0 gives the same data as before the knob
        genre_items = rng.permutation(n_items).astype(np.int64) + 1     # genre g: genre_items[g::G]
        genre_of = np.zeros(n_items + 1, dtype=np.int64)
        genre_of[genre_items] = np.arange(n_items) % N_GENRES
        genre_size = np.bincount(genre_of[1:], minlength=N_GENRES)    # (G,)
        home = genre_of[cur]                                            # (n_users,)
    for t in range(1, cap):
        still = lengths[active] > t
        active, cur = active[still], cur[still]
        if not len(active):
            break
        follow = rng.random(len(active)) < P_FOLLOW
        nxt = np.empty_like(cur)
        pick = rng.integers(0, N_SUCCESSORS, int(follow.sum()))
        nxt[follow] = successors[cur[follow], pick]
        nxt[~follow] = popular(int((~follow).sum()))
        if taste > 0:
            g = home[active]                                              # (active,)
            mine = ~follow & (rng.random(len(active)) < taste)
            j = np.floor(rng.random(int(mine.sum())) * genre_size[g[mine]]).astype(np.int64)
            nxt[mine] = genre_items[g[mine] + N_GENRES * j]
        flat[ptr[active] + t] = nxt
        cur = nxt

    # leave-one-out as in from_sequences, on the CSR arrays directly (a loop over 1M users is slow);
    # every length is >= MIN_LEN >= 3, so every user has a valid and a test item
    last = ptr[1:] - 1
    train = np.ones(len(flat), dtype=bool)
    train[last] = False
    train[last - 1] = False
    train_ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths - 2, out=train_ptr[1:])
    return Dataset("synthetic", n_items, [f"u{u}" for u in range(n_users)],
                   [""] + [f"i{i}" for i in range(1, n_items + 1)], train_ptr, flat[train],
                   flat[last - 1], flat[last], chronological=True, data_format="synthetic")
