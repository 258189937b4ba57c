"""Fault injection: clients that never answer and clients that upload garbage.

Each decision is drawn from the client's own stream (seed, round, stream, user), so a client
fails in the same rounds wherever it is trained: in-process or on any Flower SuperNode. The
server must survive both (`updates.check`, `min_answered`); these switches are how tests and
users exercise that.
"""
from __future__ import annotations

import numpy as np

from fortress.config import Config
from fortress.updates import Updates

DROP, CORRUPT, KIND = 1, 2, 3
# what a corrupted client sends (cycled by its draw)
KINDS = ("nan", "inf", "unknown item", "huge norm", "duplicate row")


def draws(cfg: Config, r: int, users: np.ndarray, stream: int) -> np.ndarray:
    """(n,) uniform [0, 1) per user for this round and stream."""
    return np.array([np.random.default_rng([cfg.seed, r, stream, int(u)]).random() for u in users])


def answering(cfg: Config, r: int, users: np.ndarray) -> np.ndarray:
    """The sampled users that do answer this round (all of them unless drop_rate > 0)."""
    if cfg.drop_rate <= 0 or not len(users):
        return users
    return users[draws(cfg, r, users, DROP) >= cfg.drop_rate]


def corrupt(u: Updates, cfg: Config, r: int, n_items: int) -> Updates:
    """Damage the uploads of a `corrupt_rate` share of clients, each in one of KINDS."""
    if cfg.corrupt_rate <= 0 or not u.n:
        return u
    users = u.clients.cpu().numpy()
    bad = np.flatnonzero(draws(cfg, r, users, CORRUPT) < cfg.corrupt_rate)
    if not len(bad):
        return u
    kind = (draws(cfg, r, users[bad], KIND) * len(KINDS)).astype(int)
    dense, rows_item, rows_delta = u.dense.clone(), u.rows_item.clone(), u.rows_delta.clone()
    rows_client = u.rows_client
    for i, k in zip(bad.tolist(), kind.tolist()):
        mine = (rows_client == i).nonzero().flatten()                                 # (m_i,)
        if KINDS[k] == "nan":
            dense[i, 0] = float("nan")
        elif KINDS[k] == "inf" and len(mine):
            rows_delta[mine[0], 0] = float("inf")
        elif KINDS[k] == "unknown item" and len(mine):
            rows_item[mine[0]] = n_items + 1
        elif KINDS[k] == "huge norm":
            dense[i] *= 1e9
            dense[i, 0] += 1e9
        elif KINDS[k] == "duplicate row" and len(mine) > 1:
            rows_item[mine[1]] = rows_item[mine[0]]
        else:                                                                         # no rows: fall back
            dense[i, 0] = float("nan")
    return Updates(u.clients, u.weight, dense, rows_client, rows_item, rows_delta, u.loss, u.terms)
