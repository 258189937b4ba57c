"""Full-ranking evaluation: HR@K and NDCG@K over the whole catalogue, ER@K for target items.

No sampled negatives. Items in the user's history (everything before the held-out item) are
masked out, and so is padding; the held-out item itself is never masked, even where it also
occurs earlier in the history (repeat consumption, as in MIND). Ties are broken uniformly at
random *in expectation*: a target whose score ties with e - 1 other items at g items behind
better ones is equally likely to sit at each rank g..g+e-1, and HR/NDCG are the exact expected
values over those ranks. So a constant scorer gets the chance level, not a perfect score.

Strata (`strata`, `Strata`): the same pass can also sum HR/NDCG per group of users, by the user's
train-history length (the number of their train interactions: <= 5, 6-20, > 20) and by the
popularity of the held-out item (its train interaction count): `popular` are the most popular
items that together hold 20% of all train interactions, `cold` the least popular that together
hold 20% (items never seen in train included), `mid` the rest. The rule is on the catalogue's
interaction mass, not on the evaluated users, so the strata mean the same on any data and split;
the counts that cut them are reported with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from fortress.data.dataset import Dataset

KS = (5, 10, 20)
Scorer = Callable[[np.ndarray, str], torch.Tensor]   # (users, split) -> (B, n_items + 1) new scores, overwritten here


def _discount_cumsum(n: int) -> torch.Tensor:
    """D[k] = sum_{r<k} 1/log2(r+2), the NDCG gain of ranks 0..k-1; D[0] = 0."""
    ranks = torch.arange(n, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), (1.0 / torch.log2(ranks + 2)).cumsum(0)])


def rank_hits(greater: torch.Tensor, equal: torch.Tensor, k: int,
              disc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected hit and NDCG at k for targets with `greater` better and `equal` tied items (incl. self)."""
    g, e = greater.double(), equal.double()
    hit = (k - g).clamp(0, None).minimum(e) / e
    hi = (g + e).clamp(max=k).long()
    lo = g.clamp(max=k).long()
    return hit, (disc[hi] - disc[lo]) / e


# users whose scores are counted at once: a (128, N+1) block stays in cache (and below glibc's mmap threshold)
SCORE_BLOCK = 128


def _masked(scores: torch.Tensor, hist: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` (B, N+1) with history and padding set to -inf in place, the target never; target scores (B,)."""
    rows = torch.arange(len(t), device=scores.device)
    target_score = scores[rows, t].clone()
    scores.scatter_(1, hist, float("-inf"))
    scores[:, 0] = float("-inf")
    scores[rows, t] = target_score                                                 # never mask the target
    return scores, target_score


def _greater_equal(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per row, the items scoring above and equal to its finite target (B,) each; overwrites `scores` (B, N).

    sign(s - t) is +1, 0 or -1 (s - t == 0 exactly when s == t, for finite t): its sum is
    greater - less and the sum of its absolute value greater + less; in-place passes over the
    scores instead of two comparisons that each build a (B, N) mask and sum it. None when a NaN
    score (whose sign torch makes 0), a +inf one or an infinite target is present (the raw
    differences then do not sum to a number), where only comparing counts right.
    """
    N = scores.shape[1]
    acc = torch.float64 if N >= 2 ** 24 else scores.dtype                         # sums stay exact integers
    raw = scores.sub_(target[:, None])                                             # (B, N)
    if not (torch.isfinite(target).all() and not raw.sum(1).isnan().any()):
        return None
    sign = raw.sign_()
    diff = sign.sum(1, dtype=acc)
    other = sign.abs_().sum(1, dtype=acc)
    return ((diff + other) / 2).to(torch.int32), (N - other).to(torch.int32)


def history_matrix(ds: Dataset, users: np.ndarray, split: str) -> torch.Tensor:
    """(B, H) histories before the `split` item, right-padded with 0."""
    hists = [ds.history(int(u), split) for u in users]
    H = max(1, max(len(h) for h in hists))
    out = np.zeros((len(users), H), dtype=np.int64)
    for i, h in enumerate(hists):
        out[i, :len(h)] = h
    return torch.from_numpy(out)


HISTORY_CUTS = (5, 20)     # train interactions of the user: <= 5, 6-20, > 20
HEAD_SHARE = 0.2           # popular / cold: the most / least popular items holding this share of train interactions


@dataclass(frozen=True)
class Strata:
    """Groups of users an evaluation also reports apart, at one split.

    `groups` names the G groups, (stratification, stratum), e.g. ("history", "<=5"); `labels`
    (n_users, S) gives each user's group (an index into `groups`) in each of the S
    stratifications; `cuts` says, per stratification, what it is by and the cut points used.
    """

    groups: tuple[tuple[str, str], ...]
    labels: np.ndarray              # (n_users, S) int64
    cuts: dict[str, dict]


def popularity_cuts(counts: np.ndarray, share: float = HEAD_SHARE) -> tuple[int, int]:
    """(cold_max, popular_min) train counts: items with count >= popular_min are the fewest most popular
    that together hold at least `share` of the train interactions, items with count <= cold_max the
    fewest least popular that do. Items of one count never fall on both sides of a cut."""
    c = np.asarray(counts[1:], dtype=np.int64)                                    # padding is no item
    values, inverse = np.unique(c, return_inverse=True)                           # ascending
    mass = np.bincount(inverse, weights=c, minlength=len(values))                 # interactions per count value
    need = share * float(c.sum())
    at_most = np.cumsum(mass)                                                      # held by items with count <= v
    at_least = at_most[-1] - at_most + mass                                        # held by items with count >= v
    return int(values[np.argmax(at_most >= need)]), int(values[at_least >= need].max())


def popularity_class(counts: np.ndarray, cold_max: int, popular_min: int) -> np.ndarray:
    """(N+1,) each item's popularity by its train count (`popularity_cuts`): 0 cold, 1 mid, 2 popular (the padding
    row, count 0, reads cold)."""
    return np.where(counts >= popular_min, 2, np.where(counts <= cold_max, 0, 1))


def strata(ds: Dataset, split: str) -> Strata:
    """History-length and target-popularity strata of the users at `split` (module docstring)."""
    truth = ds.valid if split == "valid" else ds.test
    lo, hi = HISTORY_CUTS
    length = ds.train_len                                                          # (n_users,)
    history = (length > lo).astype(np.int64) + (length > hi)                       # 0, 1, 2
    counts = ds.item_counts()
    cold_max, popular_min = popularity_cuts(counts)
    popularity = popularity_class(counts, cold_max, popular_min)[truth]              # (n_users,) cold where no target
    groups = (("history", f"<={lo}"), ("history", f"{lo + 1}-{hi}"), ("history", f">{hi}"),
              ("popularity", "cold"), ("popularity", "mid"), ("popularity", "popular"))
    cuts = {"history": {"by": "the user's train interactions", "cuts": list(HISTORY_CUTS)},
            "popularity": {"by": f"the {split} item's train interactions", "head_share": HEAD_SHARE,
                           "cold_max": cold_max, "popular_min": popular_min}}
    return Strata(groups, np.stack([history, 3 + popularity], axis=1), cuts)


@dataclass
class Sums:
    """What an evaluation adds up over users, so parts of the users (a SuperNode's) can be scored apart.

    `hr` / `ndcg` (K,) are summed over the evaluated users; with targets, `er_hits` (T, K) sums each
    target's hits over its eligible users and `er_users` (T,) counts them; with strata,
    `group_users` (G,) counts the evaluated users of each group and `group_hr` / `group_ndcg` (G, K)
    sum theirs. No user-level value.
    """

    users: int
    hr: np.ndarray                  # (K,) float64
    ndcg: np.ndarray                # (K,) float64
    er_hits: np.ndarray             # (T, K) float64
    er_users: np.ndarray            # (T,) float64
    group_users: np.ndarray | None = None   # (G,) float64; None: no strata (G = 0)
    group_hr: np.ndarray | None = None      # (G, K) float64
    group_ndcg: np.ndarray | None = None    # (G, K) float64

    def __post_init__(self):
        if self.group_users is None:
            self.group_users = np.zeros(0)
            self.group_hr = np.zeros((0, len(self.hr)))
            self.group_ndcg = np.zeros((0, len(self.hr)))

    def __add__(self, other: "Sums") -> "Sums":
        if (self.hr.shape != other.hr.shape or self.er_hits.shape != other.er_hits.shape
                or self.group_hr.shape != other.group_hr.shape):
            raise ValueError(f"cannot add evaluation sums of shapes {self.er_hits.shape} and {other.er_hits.shape} "
                             f"(strata {self.group_hr.shape} and {other.group_hr.shape})")
        return Sums(self.users + other.users, self.hr + other.hr, self.ndcg + other.ndcg,
                    self.er_hits + other.er_hits, self.er_users + other.er_users, self.group_users + other.group_users,
                    self.group_hr + other.group_hr, self.group_ndcg + other.group_ndcg)


def zero_sums(n_targets: int = 0, ks: tuple[int, ...] = KS) -> Sums:
    return Sums(0, np.zeros(len(ks)), np.zeros(len(ks)), np.zeros((n_targets, len(ks))), np.zeros(n_targets))


def evaluated(ds: Dataset, split: str, users: np.ndarray | None = None) -> np.ndarray:
    """The users with a `split` item (of `users`, or all), the ones an evaluation scores."""
    truth = ds.valid if split == "valid" else ds.test
    everyone = np.flatnonzero(truth > 0)
    return everyone if users is None else everyone[np.isin(everyone, users)]


def rank_sums(ds: Dataset, scorer: Scorer, split: str, batch: int = 2048,
              targets: list[int] | None = None, ks: tuple[int, ...] = KS,
              progress: Callable[[int], object] | None = None, users: np.ndarray | None = None,
              groups: Strata | None = None) -> Sums:
    """Full-ranking sums at `split` over the evaluated users (of `users`, or all); see `from_sums`.

    `progress` is called with the number of users of each batch once it is scored (a bar's `update`);
    with `groups` (`strata(ds, split)`) each group's sums are added up in the same pass.
    """
    truth = ds.valid if split == "valid" else ds.test
    users = evaluated(ds, split, users)
    # similar lengths in a batch keep the model's padding (and time) small; sums ignore order
    hist_len = ds.train_len[users] + (split == "test") * (ds.valid[users] > 0)
    users = users[np.argsort(hist_len, kind="stable")]
    disc = _discount_cumsum(ds.n_items + 2)
    tgt = torch.as_tensor(targets or [], dtype=torch.int64)
    hr = torch.zeros(len(ks), dtype=torch.float64)
    ndcg = torch.zeros(len(ks), dtype=torch.float64)
    er_hits = torch.zeros(len(tgt), len(ks), dtype=torch.float64)
    er_count = torch.zeros(len(tgt), dtype=torch.float64)
    n_groups = len(groups.groups) if groups is not None else 0
    g_users = torch.zeros(n_groups, dtype=torch.float64)
    g_hr = torch.zeros(n_groups, len(ks), dtype=torch.float64)
    g_ndcg = torch.zeros(n_groups, len(ks), dtype=torch.float64)

    def er_sums(scores: torch.Tensor, ub: np.ndarray, hist: torch.Tensor) -> None:
        dev = scores.device
        rows = torch.arange(len(ub), device=dev)
        seen = torch.zeros(len(ub), ds.n_items + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, hist, True)
        seen[rows, torch.as_tensor(ds.valid[ub], device=dev)] = True
        seen[rows, torch.as_tensor(ds.test[ub], device=dev)] = True
        for j, item in enumerate(tgt.tolist()):
            elig = ~seen[:, item]                                                  # (B,)
            s_t = scores[:, item]
            g = (scores > s_t[:, None]).sum(1, dtype=torch.int32)
            e = (scores == s_t[:, None]).sum(1, dtype=torch.int32)
            g, e, elig = g.cpu(), e.cpu(), elig.cpu()
            er_count[j] += elig.sum()
            for c, k in enumerate(ks):
                hit, _ = rank_hits(g, e, k, disc)
                er_hits[j, c] += hit[elig].sum()

    for start in range(0, len(users), batch):
        ub = users[start:start + batch]
        # a scorer with `represent` encodes the batch at once and is scored a block of users at a time
        h = scorer.represent(ub, split) if hasattr(scorer, "represent") else None     # (B, d)
        whole = scorer(ub, split) if h is None else None                           # (B, N+1), ours to overwrite
        for a in range(0, len(ub), SCORE_BLOCK):
            blk = ub[a:a + SCORE_BLOCK]

            def fresh() -> torch.Tensor:
                return scorer.score(h[a:a + SCORE_BLOCK]) if h is not None else scorer(blk, split)
            scores = fresh() if h is not None else whole[a:a + SCORE_BLOCK]
            t = torch.as_tensor(truth[blk], dtype=torch.int64, device=scores.device)  # (b,)
            hist = history_matrix(ds, blk, split).to(scores.device)                # (b, H)
            scores, target_score = _masked(scores, hist, t)
            if len(tgt):
                er_sums(scores, blk, hist)
            counted = _greater_equal(scores, target_score)
            if counted is None:                   # a NaN or an infinite target: score again and compare
                scores, target_score = _masked(fresh(), hist, t)
                counted = ((scores > target_score[:, None]).sum(1, dtype=torch.int32),
                           (scores == target_score[:, None]).sum(1, dtype=torch.int32))
            greater, equal = (x.cpu() for x in counted)
            label = torch.from_numpy(groups.labels[blk]) if groups is not None else None    # (b, S)
            for c, k in enumerate(ks):
                hit, gain = rank_hits(greater, equal, k, disc)
                hr[c] += hit.sum()
                ndcg[c] += gain.sum()
                for col in range(label.shape[1] if label is not None else 0):       # the same hits, by group
                    g_hr[:, c].index_add_(0, label[:, col], hit)
                    g_ndcg[:, c].index_add_(0, label[:, col], gain)
            for col in range(label.shape[1] if label is not None else 0):
                g_users.index_add_(0, label[:, col], torch.ones(len(blk), dtype=torch.float64))
        if progress is not None:
            progress(len(ub))
    return Sums(int(len(users)), hr.numpy(), ndcg.numpy(), er_hits.numpy(), er_count.numpy(),
                *((g_users.numpy(), g_hr.numpy(), g_ndcg.numpy()) if groups is not None else ()))


def from_sums(s: Sums, targets: list[int] | None = None, ks: tuple[int, ...] = KS,
              groups: Strata | None = None) -> dict[str, Any]:
    """HR@K / NDCG@K means over the evaluated users; with `targets`, ER@K (mean over targets, and per target);
    with `groups` (those the sums were added up by), `strata`: each group's means and users, and the cuts.

    ER@K of a target item t: the share of eligible users (t in none of their train, valid or test
    items) with t in their top-K at this split.
    """
    targets = list(targets or [])
    if s.hr.shape != (len(ks),) or s.er_hits.shape != (len(targets), len(ks)):
        raise ValueError(f"evaluation sums of shape {s.er_hits.shape} for {len(targets)} targets and K={ks}")
    if groups is not None and s.group_hr.shape != (len(groups.groups), len(ks)):
        raise ValueError(f"evaluation sums of {len(s.group_users)} groups for {len(groups.groups)} strata")
    n = max(1, s.users)
    out: dict = {f"HR@{k}": float(s.hr[c]) / n for c, k in enumerate(ks)}
    out.update({f"NDCG@{k}": float(s.ndcg[c]) / n for c, k in enumerate(ks)})
    out["users"] = int(s.users)
    if targets:
        per = s.er_hits / np.maximum(s.er_users, 1)[:, None]                         # (T, K)
        for c, k in enumerate(ks):
            out[f"ER@{k}"] = float(per[:, c].mean())
        out["ER_per_target"] = {str(i): {f"ER@{k}": float(per[j, c]) for c, k in enumerate(ks)}
                                for j, i in enumerate(targets)}
    if groups is not None:
        out["strata"] = {name: {**cut, "groups": {}} for name, cut in groups.cuts.items()}
        for g, (name, stratum) in enumerate(groups.groups):
            n = max(1.0, float(s.group_users[g]))
            out["strata"][name]["groups"][stratum] = {
                "users": int(s.group_users[g]), **{f"HR@{k}": float(s.group_hr[g, c]) / n for c, k in enumerate(ks)},
                **{f"NDCG@{k}": float(s.group_ndcg[g, c]) / n for c, k in enumerate(ks)}}
    return out


def evaluate(ds: Dataset, scorer: Scorer, split: str, batch: int = 2048,
             targets: list[int] | None = None, ks: tuple[int, ...] = KS,
             progress: Callable[[int], object] | None = None, by_strata: bool = False) -> dict[str, Any]:
    """HR@K / NDCG@K over users with a `split` item; with `targets`, ER@K over eligible users; with `by_strata`,
    the same per stratum (`from_sums`)."""
    groups = strata(ds, split) if by_strata else None
    return from_sums(rank_sums(ds, scorer, split, batch, targets, ks, progress, groups=groups), targets, ks, groups)
