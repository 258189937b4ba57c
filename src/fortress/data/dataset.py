"""The in-memory dataset every stage shares: remapped ids, chronological leave-one-out split."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Dataset:
    """Per-user time-ordered sequences after remap and split.

    Items are 1..n_items (0 is padding). User u's training sequence is
    train_items[train_ptr[u]:train_ptr[u+1]] in time order; valid[u] / test[u] hold the held-out
    item or 0 when the user has none (fewer than 3 interactions: train only).
    """

    name: str
    n_items: int
    user_ids: list[str]                 # original id of internal user u
    item_ids: list[str]                 # original id of internal item i; item_ids[0] = "" (padding)
    train_ptr: np.ndarray               # (n_users + 1,) int64 offsets into train_items
    train_items: np.ndarray             # (n_train,) int64, concatenated chronological train parts
    valid: np.ndarray                   # (n_users,) int64, 0 = no valid item
    test: np.ndarray                    # (n_users,) int64, 0 = no test item
    chronological: bool = True          # False when the source order is not time order
    item_names: dict[str, str] = field(default_factory=dict)   # original id -> readable name (e.g. ASIN)
    user_names: dict[str, str] = field(default_factory=dict)
    data_format: str = ""               # what it was read as: seq, table, mind, split, recbole, synthetic
                                        # ("" = in memory)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def train_len(self) -> np.ndarray:
        """(n_users,) number of train interactions per user."""
        return np.diff(self.train_ptr)

    def train_seq(self, u: int) -> np.ndarray:
        return self.train_items[self.train_ptr[u]:self.train_ptr[u + 1]]

    def history(self, u: int, split: str) -> np.ndarray:
        """Everything before the held-out item of `split` ('valid' or 'test')."""
        seq = self.train_seq(u)
        if split == "test" and self.valid[u]:
            seq = np.append(seq, self.valid[u])
        return seq

    def full_seq(self, u: int) -> np.ndarray:
        seq = self.history(u, "test")
        return np.append(seq, self.test[u]) if self.test[u] else seq

    def item_counts(self) -> np.ndarray:
        """(n_items + 1,) train-interaction count per item (index 0 = padding, always 0)."""
        return np.bincount(self.train_items, minlength=self.n_items + 1)

    def stats(self) -> dict:
        lengths = self.train_len + (self.valid > 0) + (self.test > 0)
        n_inter = int(lengths.sum())
        pct = np.percentile(lengths, [0, 25, 50, 75, 90, 99, 100]) if len(lengths) else np.zeros(7)
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "density": n_inter / max(1, self.n_users * self.n_items),
            "users_with_test": int((self.test > 0).sum()),
            "length_percentiles": dict(zip(["min", "p25", "p50", "p75", "p90", "p99", "max"],
                                           [float(x) for x in pct])),
            "chronological": self.chronological,
            "unseen_targets": self.unseen_targets(),
        }

    def unseen_targets(self) -> dict[str, float]:
        """The share of the valid and of the test items (users that have one) that no user has in train: a model
        ranks them from embeddings no training touched (MIND's test clicks are fresh news)."""
        seen = self.item_counts() > 0
        return {split: float(np.mean(~seen[held[held > 0]])) if (held > 0).any() else 0.0
                for split, held in (("valid", self.valid), ("test", self.test))}


def from_sequences(name: str, seqs: list[np.ndarray], user_ids: list[str], item_ids: list[str],
                   chronological: bool = True) -> Dataset:
    """Leave-one-out split of remapped time-ordered sequences (items 1..n, 0 = padding).

    The last item is test, the one before it valid, the rest train. Users with fewer than three
    interactions keep everything in train and are not evaluated.
    """
    n_users = len(seqs)
    valid = np.zeros(n_users, dtype=np.int64)
    test = np.zeros(n_users, dtype=np.int64)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=n_users)
    train_len = np.where(lengths >= 3, lengths - 2, lengths)
    ptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(train_len, out=ptr[1:])
    train = np.empty(int(ptr[-1]), dtype=np.int64)
    for u, s in enumerate(seqs):
        n = train_len[u]
        train[ptr[u]:ptr[u] + n] = s[:n]
        if lengths[u] >= 3:
            valid[u], test[u] = s[-2], s[-1]
    return Dataset(name, len(item_ids) - 1, list(user_ids), list(item_ids), ptr, train, valid, test,
                   chronological)
