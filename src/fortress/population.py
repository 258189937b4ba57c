"""What a federated server may know of its clients: ids, counts and the catalogue, never a sequence.

A `Population` is all the round loop needs besides the uploads: the catalogue (size and item
ids), the pseudonymous ids of the users that can train, how many users can be evaluated, and
a fingerprint so a checkpoint is never resumed on other data. In-process it is read off the
`Dataset`; under Flower each SuperNode sends the one of the users it hosts (`hosted`) and the
server adds them up (`combine`), so the ServerApp is given no data. Item train counts (for
picking `unpopular` targets) are the one aggregate of histories, and only sent when asked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fortress.client import eligible_clients
from fortress.data.dataset import Dataset
from fortress.errors import InputError


@dataclass(frozen=True)
class Population:
    name: str
    n_items: int
    n_users: int                      # size of the id space: client ids are below it, malicious ids follow
    item_ids: list[str]               # the catalogue's original ids; [0] = "" (padding)
    eligible: np.ndarray              # (E,) ids of users that can train (>= 2 train interactions), sorted
    users: int                        # users hosted (eligible or not)
    interactions: int                 # train + valid + test interactions of those users
    n_valid: int                      # users with a valid item (evaluated at validation)
    n_test: int                       # users with a test item
    fingerprint: str                  # of the data, see `fingerprint`
    item_counts: np.ndarray | None = None   # (n_items + 1,) train counts; None when not asked for
    nodes: int = 1                    # how many hosts it was combined from

    def stats(self) -> dict:
        """The `dataset` entry of results.json when the server holds no data."""
        return {"name": self.name, "users": self.users, "items": self.n_items, "interactions": self.interactions,
                "eligible": int(len(self.eligible)), "users_with_valid": self.n_valid,
                "users_with_test": self.n_test, "nodes": self.nodes}


def fingerprint(ds: Dataset, users: np.ndarray | None = None) -> str:
    """A short hash of the training data (of `users` only, when given), so a checkpoint is never resumed on other data."""
    h = hashlib.sha256()
    if users is None:
        arrays = (ds.train_ptr, ds.train_items, ds.valid, ds.test)
    else:
        seqs = [ds.train_seq(int(u)) for u in users]
        arrays = (users, np.array([len(s) for s in seqs]), np.concatenate([np.zeros(0, np.int64), *seqs]),
                  ds.valid[users], ds.test[users])
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    h.update(str(ds.n_items).encode())
    return h.hexdigest()[:16]


def partition(ds: Dataset, part: int, n_parts: int) -> np.ndarray:
    """The users a host keeps: user u lives on part u mod n_parts."""
    if not 0 <= part < n_parts:
        raise InputError(f"partition-id={part} must be in 0..{n_parts - 1} (num-partitions={n_parts})")
    users = np.arange(ds.n_users, dtype=np.int64)
    return users[users % n_parts == part]


def hosted(ds: Dataset, users: np.ndarray | None = None, counts: bool = False) -> Population:
    """The population of `users` of `ds` (all when None); with `counts`, their item train counts."""
    every = users is None
    users = np.arange(ds.n_users, dtype=np.int64) if every else np.asarray(users, dtype=np.int64)
    eligible = eligible_clients(ds)
    lengths = ds.train_len[users] + (ds.valid[users] > 0) + (ds.test[users] > 0)
    item_counts = None
    if counts:
        seqs = [ds.train_seq(int(u)) for u in users]
        item_counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *seqs]), minlength=ds.n_items + 1)
    return Population(ds.name, ds.n_items, ds.n_users, list(ds.item_ids), eligible[np.isin(eligible, users)],
                      int(len(users)), int(lengths.sum()), int((ds.valid[users] > 0).sum()),
                      int((ds.test[users] > 0).sum()), fingerprint(ds, None if every else users), item_counts)


def combine(parts: list[Population]) -> Population:
    """One population of several hosts'; they must share one catalogue and host no user twice."""
    if not parts:
        raise InputError("no host said which users it holds")
    first = parts[0]
    for p in parts[1:]:
        if p.n_items != first.n_items or p.item_ids != first.item_ids:
            raise InputError(f"hosts disagree on the catalogue: {first.n_items} items ({first.name}) and "
                             f"{p.n_items} items ({p.name}); every node must load the same data")
    if len(parts) == 1:
        return first
    eligible = np.concatenate([p.eligible for p in parts])
    if len(np.unique(eligible)) != len(eligible):
        raise InputError("two hosts claim the same user; give each node its own partition-id")
    counts = None
    if all(p.item_counts is not None for p in parts):
        counts = np.sum([p.item_counts for p in parts], axis=0)
    fp = hashlib.sha256("".join(sorted(p.fingerprint for p in parts)).encode()).hexdigest()[:16]
    return Population(first.name, first.n_items, max(p.n_users for p in parts), first.item_ids, np.sort(eligible),
                      sum(p.users for p in parts), sum(p.interactions for p in parts),
                      sum(p.n_valid for p in parts), sum(p.n_test for p in parts), fp, counts,
                      sum(p.nodes for p in parts))
