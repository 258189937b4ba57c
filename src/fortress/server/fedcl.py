"""FedCL's server half: cluster the round's perturbed user representations and retrieve hard negatives.

Wu et al., "FedCL: Federated Contrastive Learning for Privacy-Preserving Recommendation", arXiv
2204.09850 (2022). No public reference code was found, and only the paper's abstract could be read: the
steps below are the abstract's, their details our choices. A FedCL round has an exchange before local
training (`rounds.fedcl_exchange`):

1. Each sampled client infers its user embedding with the broadcast model, perturbs it with local
   differential privacy (clip, then add Laplace noise: `objectives.fedcl_perturb`) and uploads it.
2. The server clusters the round's perturbed embeddings (individually too noisy to use) and, for each
   cluster centroid, retrieves from the item pool the items the model scores highest for it: the
   cluster's hard negatives (`mine`, here).
3. Each client receives its cluster's hard negatives and trains with them mixed into its negatives
   (`objectives.fedcl_loss`), then uploads as in FedAvg.

How the paper's idea maps onto a sequential recommender, what it leaves open, and our choices:
- the user embedding ("inferred from local user data through the local model"): our models have no user
  table, so it is the sequence encoder's output at the last position of the client's last max_len train
  items (the state that scores its next item), with the broadcast model before local training, no dropout;
- LDP: the abstract says only "local differential privacy"; we use the clip-then-Laplace mechanism of
  the same group's FedGNN code (github.com/wuch15/FedPerGNN): the representation clipped to L2 norm
  `fedcl_clip` (delta), plus i.i.d. Laplace(0, `fedcl_noise`) (lambda) per coordinate, drawn from the
  client's own stream. For the record: a vector in the L2 ball of radius delta has L1 sensitivity at
  most 2 delta sqrt(d), so this is (2 delta sqrt(d) / lambda)-LDP per round (no accounting over rounds);
- clustering: the abstract names no algorithm; we run Lloyd's k-means (Euclidean) with `fedcl_clusters`
  clusters (at most the number of clients) over the round's embeddings only (no memory across rounds),
  initialised at distinct clients drawn by the server's (seed, round) generator, until assignments stop
  changing or 50 iterations; an empty cluster keeps its centroid;
- retrieval: the `fedcl_hard` items with the highest score (the model's dot product) for the centroid,
  with the current global item table; not excluding anything (the server knows no client's items);
  the client drops those among its own items (they would be false negatives) and keeps the rest;
- one cluster's list goes to each of its clients (item ids; their rows are downloaded with the
  sub-table). Malicious clients take no part in the exchange (the attacks do not model poisoned
  embeddings);
- the loss: the abstract mixes the hard negatives with observed and in-batch negatives in one loss; we
  keep FedAvg's next-item loss and add a weighted hard-negative term (`objectives.fedcl_loss` says why);
- the defaults (clip 1, noise 0.1, 8 clusters, 32 hard negatives, weight 1) are ours: the paper's
  values could not be read. The round exchanges once, at its start; a client with several local
  epochs keeps its list.

What this costs per round beyond FedAvg: up, d floats per client (its perturbed embedding); down,
`fedcl_hard` int32 ids per client and the rows of the hard negatives it keeps (they join its sub-table,
so their rows also go back up as deltas); one extra message exchange before training; the server runs
k-means on n x d and scores fedcl_clusters centroids against the catalogue.
"""
from __future__ import annotations

import numpy as np
import torch

from fortress.models import Model, Params

FEDCL_SERVER_STREAM = 0xFEDC1       # the server's k-means generator: (seed, round, this)
KMEANS_ITERS = 50


def kmeans(z: torch.Tensor, k: int, gen: np.random.Generator, iters: int = KMEANS_ITERS
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of z (n, d): centroids (k', d) and each point's cluster (n,), k' = min(k, n).

    Starts from k' distinct points drawn by `gen`; stops when no assignment changes. An empty
    cluster keeps its centroid. Ties go to the lower cluster index.
    """
    n = z.shape[0]
    k = min(k, n)
    centroids = z[torch.from_numpy(gen.choice(n, size=k, replace=False)).to(z.device)].clone()   # (k, d)
    assign = torch.full((n,), -1, dtype=torch.int64, device=z.device)
    for _ in range(iters):
        new = torch.cdist(z, centroids, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)   # (n,)
        if torch.equal(new, assign):
            break
        assign = new
        count = torch.bincount(assign, minlength=k).to(z.dtype)                  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, z)              # (k, d)
        centroids = torch.where(count[:, None] > 0, sums / count.clamp(min=1)[:, None], centroids)
    return centroids, assign


def hard_negatives(model: Model, params: Params, centroids: torch.Tensor, m: int) -> torch.Tensor:
    """The m items (ids 1..N) the model scores highest for each centroid (k, d): (k, m), best first."""
    scores = model.score(params, centroids.to(params["item_emb"].dtype))        # (k, N + 1)
    scores[:, 0] = float("-inf")                                                  # padding is no item
    return scores.topk(min(m, scores.shape[1] - 1), dim=1).indices               # (k, m)


def mine(model: Model, params: Params, z: torch.Tensor, k: int, m: int, seed: int, r: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's hard negatives (n, m) from the round's perturbed representations z (n, d), and
    its cluster (n,): k-means on z, then the top-m items of its cluster's centroid."""
    gen = np.random.default_rng([seed, r, FEDCL_SERVER_STREAM])
    centroids, assign = kmeans(z, k, gen)
    return hard_negatives(model, params, centroids, m)[assign], assign
