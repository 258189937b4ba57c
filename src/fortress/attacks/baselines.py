"""Baseline attacks: fake users with random or popular-looking sequences, and explicit boosting.

- `random`: each malicious client is a fake user whose sequence is `attack_len - 1` items drawn
  uniformly from the catalogue followed by a target, trained with the ordinary local objective
  and uploaded unscaled (a data-poisoning fake user; the "naive PSMU" without its loss or boost).
- `popular`: the same with items that look popular from the broadcast model. The attacker cannot
  count interactions, so it probes the model: 64 random sequences are scored and the items with
  the largest mean predicted probability form a pool of 10 x `attack_len` "popular" items; a
  fake sequence draws `attack_len - 1` of them, then a target (bandwagon-style fake profiles,
  e.g. Lam & Riedl, "Shilling recommender systems for fun and profit", WWW 2004).
- `rows`: the `popular` fake users, who upload only their item rows and leave the encoder delta out (a
  zero encoder delta). The cheapest model poisoning there is: nothing is boosted, every row is what honest
  training gave. On amazon-cell-phones from scratch it is far stronger than the honest upload: the encoder
  part of a popular-looking fake user teaches the model its popular items, which then crowd the target out
  of the users' top K (docs/results/adaptive.md, "From scratch").
- `boost`: explicit boosting (Bhagoji et al., "Analyzing Federated Learning through an Adversarial
  Lens", ICML 2019): gradient ascent on the targets' score after every prefix of a random fake
  sequence (`local_epochs` SGD steps at the protocol learning rate), uploading only the target
  rows and the encoder, the target rows boosted. Bhagoji et al. boost by the inverse of the
  attacker's share of the aggregate; a target row is averaged over the clients that upload it,
  about clients_per_round x n_neg / n_items benign ones (they sampled it as a negative), so the
  factor is 1 + clients_per_round x n_neg / n_items, computed from protocol parameters every
  client knows. Choices: the score is the target's log-probability over the client's sub-table,
  not the raw logit, because ascent on the raw logit never saturates and, at the protocol's
  learning rate, diverges the global model; the encoder delta is not boosted (its share is 1 / clients_per_round, and a 256x
  boost of the shared encoder breaks the model at once, which is no longer a promotion attack).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import torch

from fortress.attacks.base import (AttackConfig, AttackView, append_targets, fake_chunks, honest_loss, keep_rows,
                                   next_item_logits, random_items, train_fake)
from fortress.models import Model, Params
from fortress.updates import Updates

PROBES = 64          # random sequences the popular attack scores to find popular-looking items
POOL_PER_ITEM = 10   # popular pool size = POOL_PER_ITEM x attack_len


def random_attack(view: AttackView) -> Updates:
    """Fake users: random items then a target, ordinary local training, unscaled upload."""
    rng = view.rng()
    seqs = append_targets(random_items(rng, view.m, view.cfg.fake_len - 1, view.n_items, view.targets),
                          view.targets)
    return train_fake(view, fake_chunks(view, seqs, rng), honest_loss(view))


def popular_items(view: AttackView, rng: np.random.Generator) -> np.ndarray:
    """Items with the largest mean predicted probability over random probe sequences."""
    probes = random_items(rng, PROBES, view.cfg.fake_len, view.n_items, view.targets)
    mean_p = next_item_logits(view, probes).softmax(-1).mean(0)                     # (N+1,)
    mean_p[0] = -1.0
    mean_p[view.targets] = -1.0
    k = min(POOL_PER_ITEM * view.cfg.fake_len, view.n_items - len(view.targets))
    return mean_p.topk(k).indices.numpy()


def popular_attack(view: AttackView) -> Updates:
    """Fake users: popular-looking items then a target, ordinary local training, unscaled upload."""
    rng = view.rng()
    pool = popular_items(view, rng)
    seqs = append_targets(random_items(rng, view.m, view.cfg.fake_len - 1, view.n_items, view.targets, pool),
                          view.targets)
    return train_fake(view, fake_chunks(view, seqs, rng), honest_loss(view))


def rows_attack(view: AttackView) -> Updates:
    """`popular_attack`'s fake users, their encoder delta left out of the upload (rows only)."""
    u = popular_attack(view)
    return replace(u, dense=torch.zeros_like(u.dense))


def boost_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               col_mask: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Minus the mean log-probability of the targets (sub-table slots 1..T) after every prefix."""
    h = model.encode({**dense, "item_emb": table}, x[None])[0]                     # (L, d)
    mask = col_mask.clone()
    mask[0] = False
    logp = (h @ table.T).masked_fill(~mask, float("-inf")).log_softmax(-1)         # (L, S)
    real = (x > 0).to(logp.dtype)                                                   # (L,)
    return -(logp[:, 1:1 + n_targets].mean(1) * real).sum() / real.sum().clamp(min=1)


def boost_factor(cfg: AttackConfig, n_items: int) -> float:
    """1 / the expected share of one upload in a target row's average: 1 + clients x n_neg / n_items."""
    return 1.0 + cfg.clients_per_round * min(cfg.n_neg, n_items) / n_items


def boost_attack(view: AttackView) -> Updates:
    """Gradient ascent on the targets' log-probability from random fake sequences; target rows boosted."""
    rng = view.rng()
    seqs = list(random_items(rng, view.m, view.cfg.fake_len, view.n_items, view.targets))
    prefix = np.tile(view.targets.numpy(), (view.m, 1))                            # (m, T)
    u = train_fake(view, fake_chunks(view, seqs, rng, prefix), partial(boost_loss, n_targets=len(view.targets)))
    u = keep_rows(u, view.targets)
    return replace(u, rows_delta=u.rows_delta * boost_factor(view.cfg, view.n_items))
