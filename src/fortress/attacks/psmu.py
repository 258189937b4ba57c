"""PSMU: poisoning with synthetic users (Yuan et al., "Manipulating Federated Recommender Systems:
Poisoning with Synthetic Users and Its Countermeasures", SIGIR 2023).

Each malicious client is a synthetic user built without any private data. Every round it
1. makes up a plausible sequence: it samples `attack_pool` candidate histories of
   `attack_len - 1` items from the broadcast model itself (first item uniform over the catalogue,
   then each next item drawn from the model's next-item distribution, no repeats, never a
   target), and keeps the *hardest* one, the history after which the model gives the targets the
   lowest probability; a target follows it;
2. finds the target's alternative items: the `attack_alternatives` items the broadcast model
   ranks highest after that history, i.e. the items holding the top-K slots the target has to
   win (the target and the history's own items excluded);
3. trains locally from the broadcast model (`local_epochs` SGD steps at the protocol learning
   rate) on three terms, each averaged over the positions of the sequence:
   - the ordinary next-item loss over its sub-table (logQ-corrected as honest clients do when
     `neg_correction` is on), so the update looks like a user's;
   - promotion: minus the target's log-probability as the next item after every prefix, under
     the full softmax over the catalogue (the attacker holds the broadcast table);
   - demotion: BPR of the target over each alternative, -log sigmoid(h . e_t - h . e_j), which
     pushes the alternatives down and the target up in the same step;
4. uploads what a benign client uploads: every row of its sub-table (own items, target,
   alternatives, sampled negatives) and the encoder, times `attack_scale` (default 1).

Choices the paper leaves open for a sequential model, and why (the measurements behind them are
in docs/results/attack-design.md):
- plausible histories sampled from the model, the hardest of `attack_pool` kept: they beat
  uniformly random histories (the paper's random interactions). Sampled histories look like real
  users to the model, so what the attack teaches transfers to real users; keeping the hardest one
  (A-hum's idea, applied to discrete plausible histories) spreads the promotion over the users the
  target does not reach yet, instead of piling it onto users who already see it;
- the user representation is the encoder's output after each prefix of the fake sequence (the
  prefixes never contain the target), so one synthetic user gives `attack_len - 1` contexts;
- alternatives are fixed per round from the broadcast model (not recomputed during local steps);
- the three terms have weight 1: BPR alone reaches the synthetic users but not the real ones
  (it stops pushing once the target beats the few alternatives), and a top-10 hinge promotes
  less than the full softmax;
- no boosting by default (`attack_scale` 1): the unscaled upload is already larger than a benign
  one, and boosting either did not help or made the global model diverge (benign updates then
  exceed `max_update_norm`). `attack_scale` is there to study norm-based defences;
- the local steps run with the model's dropout, like an honest client's.
Without steps 1-4 this is the `random` baseline (a data-poisoning fake user).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fortress.attacks.ahum import target_logprob
from fortress.attacks.base import (AttackView, append_targets, draw, fake_chunks, next_item_logits,
                                   random_items, scaled, train_fake)
from fortress.models import Model, Params
from fortress.objectives import next_item_loss, sampled_softmax_bias
from fortress.updates import Updates


def psmu_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              col_mask: torch.Tensor, n_targets: int, n_alt: int, catalogue: torch.Tensor,
              targets: torch.Tensor, n_items: int = 0) -> torch.Tensor:
    """Honest next-item loss (logQ-corrected given n_items, as `client.rec_loss`) + full-softmax
    promotion of the targets (slots 1..T) + BPR of the targets over the alternatives."""
    h = model.encode({**dense, "item_emb": table}, x[None], training=True)[0]      # (L, d)
    logits = h @ table.T                                                            # (L, S)
    bias = sampled_softmax_bias(x, y, col_mask, n_items).to(logits.dtype) if n_items else 0.0
    rec = next_item_loss(logits + bias, y, col_mask)
    real = (x > 0).to(logits.dtype)                                                 # (L,)
    promote = -target_logprob(h, catalogue, targets, table[1:1 + n_targets]).mean(1)   # (L,)
    s_t = logits[:, 1:1 + n_targets]                                                # (L, T)
    s_a = logits[:, 1 + n_targets:1 + n_targets + n_alt]                            # (L, K)
    demote = F.softplus(s_a[:, None, :] - s_t[:, :, None]).mean((1, 2))             # (L,)
    return rec + ((promote + demote) * real).sum() / real.sum().clamp(min=1)


def sample_histories(view: AttackView, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """(n, length) histories sampled from the broadcast model: no repeats, no targets."""
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    seq = torch.as_tensor(random_items(rng, n, 1, view.n_items, view.targets))     # (n, 1)
    for _ in range(length - 1):
        logits = next_item_logits(view, seq.numpy())                                # (n, N+1)
        logits[:, view.targets] = float("-inf")
        logits.scatter_(1, seq, float("-inf"))
        seq = torch.cat([seq, draw(logits, gen)], 1)
    return seq.numpy()


def hardest(view: AttackView, pool: np.ndarray, m: int) -> np.ndarray:
    """Of each client's candidates (m * P, L) the one after which the targets are least likely: (m, L)."""
    logp = next_item_logits(view, pool).log_softmax(-1)[:, view.targets].mean(1)   # (m P,)
    pick = logp.reshape(m, -1).argmin(1).numpy()                                    # (m,)
    return pool.reshape(m, -1, pool.shape[1])[np.arange(m), pick]


def alternatives(view: AttackView, contexts: np.ndarray, k: int) -> np.ndarray:
    """(m, k) the items the broadcast model ranks highest after each context, targets and own items excluded."""
    logits = next_item_logits(view, contexts)                                       # (m, N+1)
    logits[:, view.targets] = float("-inf")
    logits.scatter_(1, torch.as_tensor(contexts), float("-inf"))
    return logits.topk(k, dim=1).indices.numpy()


def attack(view: AttackView) -> Updates:
    """Hard plausible synthetic users promote the targets and push their alternatives down."""
    rng = view.rng()
    cfg, T = view.cfg, len(view.targets)
    length = min(cfg.fake_len - 1, view.n_items - T)
    k = max(1, min(cfg.alternatives, view.n_items - T - length))
    pool = sample_histories(view, rng, view.m * cfg.pool, length)                  # (m P, L-1)
    contexts = hardest(view, pool, view.m)                                          # (m, L-1)
    seqs = append_targets(contexts, view.targets)
    prefix = np.concatenate([np.tile(view.targets.numpy(), (view.m, 1)), alternatives(view, contexts, k)], 1)
    loss = partial(psmu_loss, n_targets=T, n_alt=k, catalogue=view.params["item_emb"], targets=view.targets,
                   n_items=view.n_items if cfg.neg_correction else 0)
    u = train_fake(view, fake_chunks(view, seqs, rng, prefix), loss)
    return scaled(u, cfg.scale)
