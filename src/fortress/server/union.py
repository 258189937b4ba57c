"""UNION's server rule (`defence=union`): filter the clients whose update makes the item table
abnormally (non-)uniform, found by Gap statistics.

Yu et al., "Untargeted Attack against Federated Recommendation Systems via Poisonous Item
Embeddings and the Defense", AAAI 2023; reference code github.com/yflyl613/FedRec (`agg.UNION`,
`GapStatistics`). UNION has two halves that our config selects independently: the client term
(`objective=union`, objectives.union_loss) and this rule. Each round:

1. Sample `union_items` items of the catalogue (the server's own generator, fresh each round).
2. For each client, the table it would give on its own: the sampled rows with its uploaded deltas
   applied (e + global_lr * delta for the rows it uploaded, the broadcast rows otherwise),
   L2-normalised; its *uniformity* is their mean pairwise L2 distance (ClusterAttack pulls items into
   tight clusters, which lowers it; UNION's client term raises it).
3. Gap statistics (Tibshirani et al., 2001) on the n uniformities, min-max scaled to [0, 1]: the
   within-cluster sum of squares W_k of k = 1 and k = 2 clusters against `union_refs` reference sets
   of n uniform points on [0, 1]; Gap(k) = mean log W*_k - log W_k, s_2 = std log W*_2 * sqrt(1 + 1/B).
   The round has two clusters when Gap(1) < Gap(2) - s_2.
4. The smaller of the two clusters is dropped when the round has two clusters, or when it holds at
   most f = floor(byz_frac * n) clients; the rest are aggregated by FedAvg (whole clients: encoder
   and rows). A client's weight in the log is 1 (kept) or 0 (dropped).

Nothing extra is uploaded or sent: the rule reads the usual uploads (bytes per round as FedAvg).
Its cost is one (s x s) distance matrix a round and, per client, the distances of the sampled rows it
changed (s = union_items).

What the paper and its code leave open, and our choices:
- the server optimiser: the reference replays its FedAdam step per client to get the updated
  embeddings; we apply the delta as FedAvg's SGD step (global_lr * delta) whatever `global_opt` is;
- normalisation: the reference reads a `NORMALIZE` flag its argument parser never defines; we
  normalise (uniformity on the hypersphere, as the client term);
- items are sampled without replacement (the reference: with), so no pair is an item with itself;
- the two clusters of 1-D data are found exactly (the best split of the sorted values) instead of
  k-means++ with a tolerance (on data near the decision boundary k-means can stop in a local optimum
  and split differently; tests/test_peers.py checks the decisions against a transcription of the
  reference's rule on small rounds); the reference distribution is drawn afresh each round from the
  server's generator (the reference draws 50 of 10,000 cached sets from an unseeded generator);
- the size rule: the reference drops the smaller cluster when it holds at most the *true* number of
  attackers in the round (0 in clean runs); a server does not know that, so we use the assumed share
  of Byzantine clients `byz_frac` (the same key as Krum's f). The rule is the same clean and attacked;
- ties in cluster size drop the cluster of lower uniformity; with fewer than 3 clients or equal
  uniformities nobody is dropped.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fortress.server.aggregate import Outcome, fedavg
from fortress.updates import Updates

UNION_SEED = 0x5E1   # the server's generator is seeded apart from the FORTRESS server's


def uniformity(table: torch.Tensor, items: torch.Tensor, u: Updates, lr: float) -> torch.Tensor:
    """(n,) mean pairwise L2 distance of the sampled rows `items` (s,), unit-normalised, after each
    client's own uploaded deltas (times lr) are applied to them (float64).

    A client changes only the few sampled rows it uploaded (its set C), so its sum over ordered pairs is
    the broadcast sum S0 plus, for each changed row j, twice the change of its distances to the sample,
    plus, over the pairs (j, k) of C (j = k included), D(e'_j, e'_k) - 2 D(e'_j, e_k) + D(e_j, e_k):
    exact, and (n x |C| x s) work instead of (n x s x s).
    """
    s, dev = len(items), table.device
    raw = table[items].double()                                                        # (s, d)
    base = F.normalize(raw, dim=-1)
    dist = torch.cdist(base, base)                                                     # (s, s)
    row_sum, total = dist.sum(1), dist.sum()                                           # (s,), ()
    pos = torch.full((table.shape[0],), -1, dtype=torch.int64, device=dev)
    pos[items] = torch.arange(s, device=dev)
    hit = pos[u.rows_item]                                                             # (M,) sample slot or -1
    keep = hit >= 0
    rc, slot = u.rows_client[keep], hit[keep]                                          # (m,)
    out = torch.full((u.n,), float(total), dtype=torch.float64, device=dev)
    if len(rc):
        order = torch.argsort(rc, stable=True)
        rc, slot, delta = rc[order], slot[order], u.rows_delta[keep][order].double()
        counts = torch.bincount(rc, minlength=u.n)                                     # (n,)
        col = torch.arange(len(rc), device=dev) - (torch.cumsum(counts, 0) - counts)[rc]
        m = int(counts.max())
        new = F.normalize(raw[slot] + lr * delta, dim=-1)                             # (m_all, d)
        out.index_add_(0, rc, 2 * (torch.cdist(new, base).sum(1) - row_sum[slot]))
        e_new = torch.zeros(u.n, m, base.shape[1], dtype=torch.float64, device=dev)    # (n, m, d) padded
        e_old = torch.zeros_like(e_new)
        e_new[rc, col], e_old[rc, col] = new, base[slot]
        real = torch.zeros(u.n, m, dtype=torch.float64, device=dev)
        real[rc, col] = 1.0
        pair = real[:, :, None] * real[:, None, :]                                     # (n, m, m)
        corr = torch.cdist(e_new, e_new) - 2 * torch.cdist(e_new, e_old) + torch.cdist(e_old, e_old)
        out += (pair * corr).sum((1, 2))
    return out / max(1, s * (s - 1))


def two_means_1d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact 1-D k-means of rows x (B, n): W_1 (B,), W_2 (B,) and the best split (B,) of the sorted
    values (the low cluster is the first `split` of them)."""
    v = x.sort(-1).values
    n = v.shape[-1]
    c1, c2 = v.cumsum(-1), (v * v).cumsum(-1)                                          # (B, n)
    w1 = c2[:, -1] - c1[:, -1] ** 2 / n
    k = torch.arange(1, n, device=x.device, dtype=x.dtype)                              # left sizes 1..n-1
    left = c2[:, :-1] - c1[:, :-1] ** 2 / k
    rs1, rs2 = c1[:, -1:] - c1[:, :-1], c2[:, -1:] - c2[:, :-1]
    right = rs2 - rs1 ** 2 / (n - k)
    w2, split = (left + right).clamp(min=0).min(-1)
    return w1.clamp(min=0), w2, split + 1


def gap_filter(metric: torch.Tensor, refs: int, max_small: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(n,) bool: the clients to drop, by Gap statistics on the 1-D `metric` (n,), and a log."""
    n = len(metric)
    drop = torch.zeros(n, dtype=torch.bool)
    x = metric.double().cpu()
    lo, hi = x.min() if n else 0.0, x.max() if n else 0.0
    if n < 3 or not torch.isfinite(x).all() or float(hi - lo) <= 1e-12 * max(1.0, abs(float(hi))):
        return drop, {"two_clusters": False, "small_cluster": 0, "dropped": 0}
    z = (x - lo) / (hi - lo)                                                           # (n,) in [0, 1]
    w1, w2, split = two_means_1d(z[None])
    ref = torch.rand(refs, n, generator=gen, dtype=torch.float64)                      # (B, n) uniform on [0, 1]
    r1, r2, _ = two_means_1d(ref)
    lr1, lr2 = r1.log(), r2.clamp(min=1e-300).log()
    gap1 = lr1.mean() - w1.log()[0]
    gap2 = lr2.mean() - w2.clamp(min=1e-300).log()[0]
    s2 = lr2.std(unbiased=False) * math.sqrt(1 + 1 / refs)
    two = bool(gap1 < gap2 - s2)
    order = z.argsort(stable=True)
    k = int(split[0])
    low, high = order[:k], order[k:]
    small = low if len(low) <= len(high) else high                                     # ties: the low cluster
    if two or len(small) <= max_small:
        drop[small] = True
    return drop, {"two_clusters": two, "gap1": float(gap1), "gap2": float(gap2), "s2": float(s2),
                  "small_cluster": int(len(small)), "dropped": int(drop.sum())}


class UnionServer:
    """`defence=union`: FedAvg over the clients that Gap statistics on their uniformity keep."""

    name = "union"
    on_host = True        # its state and generators live on the CPU (`rounds.home`)

    def __init__(self, n_items: int, items: int, refs: int, byz_frac: float, lr: float, seed: int = 0):
        self.n_items, self.items, self.refs, self.byz_frac, self.lr = n_items, items, refs, byz_frac, lr
        self.gen = torch.Generator().manual_seed(seed + UNION_SEED)

    @classmethod
    def from_config(cls, cfg, n_items: int) -> "UnionServer":
        return cls(n_items, cfg.union_items, cfg.union_refs, cfg.byz_frac, cfg.global_lr, cfg.seed)

    def aggregate(self, u: Updates, params: dict[str, torch.Tensor]) -> Outcome:
        table = params["item_emb"]
        s = min(self.items, self.n_items)
        items = torch.randperm(self.n_items, generator=self.gen)[:s].to(table.device) + 1   # (s,) ids 1..N
        metric = uniformity(table, items, u, self.lr)                                  # (n,)
        drop, log = gap_filter(metric, self.refs, int(math.floor(self.byz_frac * u.n)), self.gen)
        keep = (~drop).to(u.weight.dtype).to(u.weight.device)                          # (n,)
        log["uniformity_mean"] = float(metric.mean()) if u.n else float("nan")
        return Outcome(fedavg(u, client_weight=keep), keep, log)

    def after_apply(self, params: dict[str, torch.Tensor], outcome: Outcome) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self.gen.set_state(state["rng"])
