"""The threat model as an API, and the pieces the attacks share.

An attack is a pure function `attack(view: AttackView) -> Updates`. `AttackView` is everything it
gets: a copy of the broadcast model (any client downloads it), the item-id range 1..n_items, the
target ids, the ids of its own malicious clients sampled into this round, its own settings and a
seed. It gets no Dataset, no other client's update and no server state, and nothing in
`fortress.attacks` imports `fortress.data`, so an attack cannot reach benign data by construction.

Malicious clients upload exactly what benign ones do (`Updates`: item-row deltas plus the dense
encoder delta, and a FedAvg weight), so the server cannot tell them apart by format. A malicious
client reports as its weight the length of its fake sequence (`attack_len`), like a benign client
reporting its number of interactions; it never inflates the weight. An update can be boosted
(`attack_scale` for A-hum and PSMU, a fixed protocol-derived factor for `boost`), which a
norm-based defence can see.

Item rows: a benign client downloads only its sub-table (own items + sampled negatives). An
attacker may claim any items as its own, so over rounds it can read any row; we give it the whole
broadcast table at once, which is the strongest version of what it could collect.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import numpy as np
import torch

from fortress.client import Chunk, chunks_from_sequences, rec_loss, train_round
from fortress.models import Model, Params
from fortress.updates import Updates


@dataclass(frozen=True)
class AttackConfig:
    """The settings an attack may read (a subset of Config; the client protocol it must follow)."""

    scale: float          # factor on the uploads of A-hum and PSMU
    fake_len: int         # length of a fake sequence (and the weight a malicious client reports)
    users: int            # A-hum: hard users per malicious client
    steps: int            # A-hum: mining steps
    alternatives: int     # PSMU: competing items per fake user
    pool: int             # PSMU: candidate histories sampled per fake user (the hardest is kept)
    lr: float             # the client learning rate of the protocol
    local_epochs: int
    client_opt: str
    n_neg: int            # negatives a client samples into its sub-table (as benign clients do)
    clients_per_round: int
    chunk_size: int
    engine: str
    neg_correction: bool  # whether honest clients logQ-correct their sampled negatives
    max_len: int          # the protocol's max_len
    whole_history: bool   # whether clients train on their whole history (the server's weight ceiling follows)
    defence: str          # the server's rule and its keys (public: adaptive attacks read them)
    norm_bound: float
    row_clip: float
    dense_clip: float
    push_frac: float
    p_flag: float
    floor_frac: float
    hics_item_clip: float
    hics_keep: float
    hics_user_clip: float

    @classmethod
    def from_config(cls, cfg) -> "AttackConfig":
        return cls(cfg.attack_scale, cfg.attack_len, cfg.attack_users, cfg.attack_steps,
                   cfg.attack_alternatives, cfg.attack_pool, cfg.lr, cfg.local_epochs, cfg.client_opt, cfg.n_neg,
                   cfg.clients_per_round, cfg.chunk_size, cfg.engine, cfg.neg_correction, cfg.max_len, cfg.whole_history, cfg.defence,
                   cfg.norm_bound, cfg.row_clip, cfg.dense_clip, cfg.push_frac, cfg.p_flag, cfg.floor_frac,
                   cfg.hics_item_clip, cfg.hics_keep, cfg.hics_user_clip)


@dataclass(frozen=True)
class AttackView:
    """All an attack sees in a round."""

    model: Model            # architecture hyper-parameters (public: every client runs the model)
    params: Params          # a copy of the broadcast global model
    n_items: int            # item ids are 1..n_items
    targets: torch.Tensor   # (T,) item ids to promote
    clients: torch.Tensor   # (m,) this round's malicious client ids
    cfg: AttackConfig
    seed: tuple[int, ...]   # the attack's own randomness for this round
    round: int = 0          # rounds since the run (and the attack) started

    @property
    def m(self) -> int:
        return len(self.clients)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


Attack = Callable[[AttackView], Updates]


def random_items(rng: np.random.Generator, n: int, length: int, n_items: int,
                 exclude: torch.Tensor | np.ndarray, pool: np.ndarray | None = None) -> np.ndarray:
    """(n, length) items drawn uniformly without repetition per row from `pool` (default all) minus `exclude`."""
    pool = np.arange(1, n_items + 1) if pool is None else pool
    pool = np.setdiff1d(pool, np.asarray(exclude))
    return np.stack([rng.choice(pool, size=length, replace=length > len(pool)) for _ in range(n)])


def draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One item per row from softmax(logits) (B, N+1) -> (B, 1), by inverse CDF: one uniform per row against the
    row's cumulative probabilities (summed in float64, so that no small probability is lost in the running sum).
    The same distribution as torch.multinomial(p, 1), which draws an exponential for every entry and took most of
    a PSMU round (bench/psmu_step.py). Entries at -inf (probability 0) are never drawn."""
    c = logits.softmax(-1).double().cumsum(-1)                                      # (B, N+1)
    u = torch.rand(c.shape[0], 1, generator=gen, dtype=torch.float64) * c[:, -1:]   # [0, total)
    idx = torch.searchsorted(c, u, right=True)                                      # the first c > u: p > 0 there
    over = idx[:, 0] >= c.shape[1]                                                  # u rounded up to the total
    if over.any():
        last = c[over] < c[over, -1:]                                               # before the last rise
        idx[over, 0] = last.sum(-1)
    return idx


def append_targets(seqs: np.ndarray, targets: torch.Tensor) -> list[np.ndarray]:
    """Each fake sequence followed by one target (client i carries target i mod T)."""
    t = targets.numpy()
    return [np.append(s, t[i % len(t)]) for i, s in enumerate(seqs)]


def fake_chunks(view: AttackView, seqs: list[np.ndarray], rng: np.random.Generator,
                prefix: np.ndarray | None = None) -> list[Chunk]:
    """Sub-tables and inputs for the malicious clients' fake sequences, exactly as a benign client builds them."""
    weights = [float(view.cfg.fake_len)] * view.m
    return chunks_from_sequences(view.clients.numpy(), seqs, weights, view.n_items, view.cfg.n_neg,
                                 view.cfg.chunk_size, rng, prefix)


def train_fake(view: AttackView, chunks: list[Chunk], loss_fn: Callable) -> Updates:
    """Local training of the malicious clients with the benign engine (vmap over clients), any loss."""
    c = view.cfg
    return train_round(view.model, loss_fn, c.local_epochs, c.lr, c.client_opt, view.params, chunks, c.engine)


def honest_loss(view: AttackView) -> Callable:
    """The next-item loss an honest FedAvg client minimises (logQ-corrected or not).

    Under objective=fortress the fake users still train on this loss alone: an attacker chooses its
    own local computation, and the upload format is the same.
    """
    return partial(rec_loss, n_items=view.n_items if view.cfg.neg_correction else 0)


def keep_rows(u: Updates, items: torch.Tensor) -> Updates:
    """The same uploads with only the item rows of `items` (the others are not sent)."""
    keep = torch.isin(u.rows_item, items)
    return replace(u, rows_client=u.rows_client[keep], rows_item=u.rows_item[keep],
                   rows_delta=u.rows_delta[keep])


def scaled(u: Updates, factor: float) -> Updates:
    """Explicit boosting: every uploaded delta multiplied by `factor`."""
    return replace(u, dense=u.dense * factor, rows_delta=u.rows_delta * factor)


@torch.no_grad()
def next_item_logits(view: AttackView, seqs: np.ndarray) -> torch.Tensor:
    """The broadcast model's scores of every item after each sequence: (B, L) -> (B, n_items + 1)."""
    x = torch.as_tensor(seqs, dtype=torch.int64)
    logits = view.model.score(view.params, view.model.last(view.params, x))         # (B, N+1)
    logits[:, 0] = float("-inf")
    return logits
