"""Full-ranking evaluation: HR@K and NDCG@K over the whole catalogue, ER@K for target items.

No sampled negatives. Items in the user's history (everything before the held-out item) are
masked out, and so is padding; the held-out item itself is never masked, even where it also
occurs earlier in the history (repeat consumption, as in MIND). Ties are broken uniformly at
random *in expectation*: a target whose score ties with e - 1 other items at g items behind
better ones is equally likely to sit at each rank g..g+e-1, and HR/NDCG are the exact expected
values over those ranks. So a constant scorer gets the chance level, not a perfect score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


@dataclass
class Sums:
    """What an evaluation adds up over users, so parts of the users (a SuperNode's) can be scored apart.

    `hr` / `ndcg` (K,) are summed over the evaluated users; with targets, `er_hits` (T, K) sums each
    target's hits over its eligible users and `er_users` (T,) counts them. No user-level value.
    """

    users: int
    hr: np.ndarray                  # (K,) float64
    ndcg: np.ndarray                # (K,) float64
    er_hits: np.ndarray             # (T, K) float64
    er_users: np.ndarray            # (T,) float64

    def __add__(self, other: "Sums") -> "Sums":
        if self.hr.shape != other.hr.shape or self.er_hits.shape != other.er_hits.shape:
            raise ValueError(f"cannot add evaluation sums of shapes {self.er_hits.shape} and {other.er_hits.shape}")
        return Sums(self.users + other.users, self.hr + other.hr, self.ndcg + other.ndcg,
                    self.er_hits + other.er_hits, self.er_users + other.er_users)


def zero_sums(n_targets: int = 0, ks: tuple[int, ...] = KS) -> Sums:
    return Sums(0, np.zeros(len(ks)), np.zeros(len(ks)), np.zeros((n_targets, len(ks))), np.zeros(n_targets))


def evaluated(ds: Dataset, split: str, users: np.ndarray | None = None) -> np.ndarray:
    """The users with a `split` item (of `users`, or all), the ones an evaluation scores."""
    truth = ds.valid if split == "valid" else ds.test
    everyone = np.flatnonzero(truth > 0)
    return everyone if users is None else everyone[np.isin(everyone, users)]


def rank_sums(ds: Dataset, scorer: Scorer, split: str, batch: int = 2048,
              targets: list[int] | None = None, ks: tuple[int, ...] = KS,
              progress: Callable[[int], object] | None = None, users: np.ndarray | None = None) -> Sums:
    """Full-ranking sums at `split` over the evaluated users (of `users`, or all); see `from_sums`.

    `progress` is called with the number of users of each batch once it is scored (a bar's `update`).
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
            for c, k in enumerate(ks):
                hit, gain = rank_hits(greater, equal, k, disc)
                hr[c] += hit.sum()
                ndcg[c] += gain.sum()
        if progress is not None:
            progress(len(ub))
    return Sums(int(len(users)), hr.numpy(), ndcg.numpy(), er_hits.numpy(), er_count.numpy())


def from_sums(s: Sums, targets: list[int] | None = None, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """HR@K / NDCG@K means over the evaluated users; with `targets`, ER@K (mean over targets, and per target).

    ER@K of a target item t: the share of eligible users (t in none of their train, valid or test
    items) with t in their top-K at this split.
    """
    targets = list(targets or [])
    if s.hr.shape != (len(ks),) or s.er_hits.shape != (len(targets), len(ks)):
        raise ValueError(f"evaluation sums of shape {s.er_hits.shape} for {len(targets)} targets and K={ks}")
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
    return out


def evaluate(ds: Dataset, scorer: Scorer, split: str, batch: int = 2048,
             targets: list[int] | None = None, ks: tuple[int, ...] = KS,
             progress: Callable[[int], object] | None = None) -> dict[str, float]:
    """HR@K / NDCG@K over users with a `split` item; with `targets`, ER@K over eligible users (`from_sums`)."""
    return from_sums(rank_sums(ds, scorer, split, batch, targets, ks, progress), targets, ks)
