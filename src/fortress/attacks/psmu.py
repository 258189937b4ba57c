"""PSMU: poisoning with synthetic users (Yuan et al., "Manipulating Federated Recommender Systems:
Poisoning with Synthetic Users and Its Countermeasures", SIGIR 2023).

Each malicious client is a synthetic user built without any private data. Every round it
1. makes up a sequence: `attack_len - 1` items drawn uniformly from the catalogue (the paper
   samples synthetic users' interactions at random) followed by a target;
2. finds the target's alternative items: the `attack_alternatives` items the current global model
   ranks highest after that sequence, i.e. the items holding the top-K slots the target has to
   win (the target and the sequence's own items excluded);
3. trains locally from the broadcast model (`local_epochs` SGD steps at the protocol learning
   rate) on three terms, each averaged over the positions of the sequence:
   - the ordinary next-item loss over its sub-table, so the update looks like a user's;
   - promotion: minus the target's log-probability as the next item after every prefix, under
     the full softmax over the catalogue (the attacker holds the broadcast table);
   - demotion: BPR of the target over each alternative, -log sigmoid(h . e_t - h . e_j), which
     pushes the alternatives down and the target up in the same step;
4. uploads what a benign client uploads: every row of its sub-table (own items, target,
   alternatives, sampled negatives) and the encoder, times `attack_scale` (default 1).

Choices the paper leaves open for a sequential model, and ours:
- the user representation is the encoder's output after each prefix of the fake sequence (the
  prefixes never contain the target), so one synthetic user gives `attack_len - 1` contexts;
- alternatives are fixed per round from the broadcast model (not recomputed during local steps);
- the three terms have weight 1. Measured on amazon-cell-phones (1% malicious, 60 rounds from a
  clean 1,000-round model), promotion under the full softmax is what makes the attack transfer:
  with BPR alone the target reaches the top-10 of 97-100% of synthetic users but of only 27-40%
  of real users, because BPR stops pushing once the target beats the few alternatives;
- no boosting by default: at the protocol's client learning rate (1.0) an unscaled PSMU upload
  already has the size of a benign one (encoder delta norm about 12 against a benign median of 8
  and maximum of 15), and `attack_scale` = 3 made the global model diverge at 5% malicious.
Without steps 2-4 this is the `random` baseline (a data-poisoning fake user).
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from fortress.attacks.ahum import target_logprob
from fortress.attacks.base import (AttackView, append_targets, fake_chunks, next_item_logits, random_items,
                                   scaled, train_fake)
from fortress.models import Model, Params
from fortress.objectives import next_item_loss
from fortress.updates import Updates


def psmu_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              col_mask: torch.Tensor, n_targets: int, n_alt: int, catalogue: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
    """Next-item loss + full-softmax promotion of the targets (slots 1..T) + BPR over the alternatives."""
    h = model.encode({**dense, "item_emb": table}, x[None], training=True)[0]      # (L, d)
    logits = h @ table.T                                                            # (L, S)
    rec = next_item_loss(logits, y, col_mask)
    real = (x > 0).to(logits.dtype)                                                 # (L,)
    promote = -target_logprob(h, catalogue, targets, table[1:1 + n_targets]).mean(1)   # (L,)
    s_t = logits[:, 1:1 + n_targets]                                                # (L, T)
    s_a = logits[:, 1 + n_targets:1 + n_targets + n_alt]                            # (L, K)
    demote = F.softplus(s_a[:, None, :] - s_t[:, :, None]).mean((1, 2))             # (L,)
    return rec + ((promote + demote) * real).sum() / real.sum().clamp(min=1)


def alternatives(view: AttackView, contexts: np.ndarray, k: int) -> np.ndarray:
    """(m, k) the items the broadcast model ranks highest after each context, targets and own items excluded."""
    logits = next_item_logits(view, contexts)                                       # (m, N+1)
    logits[:, view.targets] = float("-inf")
    logits.scatter_(1, torch.as_tensor(contexts), float("-inf"))
    return logits.topk(k, dim=1).indices.numpy()


def attack(view: AttackView) -> Updates:
    """Synthetic users promote the targets and push their alternatives down."""
    rng = view.rng()
    T = len(view.targets)
    k = max(1, min(view.cfg.alternatives, view.n_items - T - view.cfg.fake_len))
    contexts = random_items(rng, view.m, view.cfg.fake_len - 1, view.n_items, view.targets)   # (m, L-1)
    seqs = append_targets(contexts, view.targets)
    prefix = np.concatenate([np.tile(view.targets.numpy(), (view.m, 1)), alternatives(view, contexts, k)], 1)
    loss = partial(psmu_loss, n_targets=T, n_alt=k, catalogue=view.params["item_emb"], targets=view.targets)
    u = train_fake(view, fake_chunks(view, seqs, rng, prefix), loss)
    return scaled(u, view.cfg.scale)
