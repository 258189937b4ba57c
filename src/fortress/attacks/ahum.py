"""A-hum: attack with hard user mining (Rong et al., "Poisoning Deep Learning Based Recommender
Model in Federated Learning Scenarios", IJCAI 2022).

The attacker has no user data, so it approximates benign users from noise (the paper's A-ra),
then mines *hard* users, those the current model is least inclined to recommend the target to,
and computes the update that raises the target for them. Each malicious client, every round:
1. draws `attack_users` users from Gaussian noise;
2. mines them: `attack_steps` gradient steps on the users that minimise the target's score under
   the broadcast model (the paper and its code: 30 steps, then a fresh draw next round);
3. computes, from the broadcast model, `local_epochs` SGD steps at the protocol learning rate on
   the model's own loss with the targets as the positive next items for the hard users, with
   respect to the target rows and the encoder;
4. uploads only the target rows and the encoder part (times `attack_scale`, default 1).

Adapting a user-embedding model (the paper's NCF) to a sequence encoder, our choices:
- a "user" is what the encoder consumes: a soft sequence of `attack_len` input vectors drawn from
  N(mu, diag(s^2)), mu and s the per-dimension mean and standard deviation of the broadcast item
  table (noise on the scale and in the region of real item embeddings); the encoder turns it into
  a representation h, and the upload carries the gradient through the whole encoder (the paper's
  "interaction function" part);
- the score minimised when mining, and maximised when promoting, is the target's log-probability
  under the model's full softmax over the catalogue (our models rank by softmax, so a low
  log-probability is what makes a user hard); promotion therefore also lowers, through the
  encoder, the items that compete with the target, but only target rows are uploaded;
- mining steps are normalised per user: each input moves 0.01 s per step along its gradient
  (the raw gradient's scale depends on the model's logit scale). The paper's 30 steps at lr 0.001
  on N(0, 0.01^2) embeddings also move a user by only a few percent of its scale: mining nudges
  the approximated users towards hard ones, it does not relocate them; larger steps carry the
  mined users out of the region of real users and the attack stops working;
- the encoder runs without dropout (the attacker controls its own computation);
- no boosting by default (`attack_scale` 1): at the protocol's client learning rate the unscaled
  upload already moves the target row by several times its norm, while its encoder delta stays
  below a benign client's; boosting made the global model diverge.
The measurements behind these choices are in docs/results/attack-design.md.
"""
from __future__ import annotations

from functools import partial

import torch
from torch.func import vmap

from fortress.attacks.base import AttackView
from fortress.client import local_train
from fortress.models import Model, Params, dense_keys
from fortress.updates import Updates, flatten

MINE_STEP = 0.01     # per-step move of a soft input, in item-table standard deviations


def represent(model: Model, dense: Params, x: torch.Tensor) -> torch.Tensor:
    """Representation after soft input sequences: x (B, L, d) vectors -> h (B, d)."""
    B, L, d = x.shape
    table = torch.cat([torch.zeros(1, d, dtype=x.dtype), x.reshape(B * L, d)])    # (1 + B L, d)
    ids = torch.arange(1, B * L + 1).reshape(B, L)                                  # (B, L)
    return model.encode({**dense, "item_emb": table}, ids)[:, -1]                  # (B, d)


def target_logprob(h: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor,
                   target_rows: torch.Tensor) -> torch.Tensor:
    """log p(target | h) under the full softmax, with the target rows given separately: (B, T)."""
    logits = h @ catalogue.T                                                        # (B, N+1)
    lt = h @ target_rows.T                                                          # (B, T)
    logits = logits.scatter(1, targets.expand(h.shape[0], -1), lt)
    logits[:, 0] = float("-inf")                                                    # padding; in place: one copy less
    return lt - logits.logsumexp(1, keepdim=True)


def mine(view: AttackView, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Hard user mining: move soft users (B, L, d) to minimise the targets' log-probability."""
    dense = {k: view.params[k] for k in dense_keys(view.params)}
    catalogue = view.params["item_emb"]
    rows = catalogue[view.targets]
    for _ in range(view.cfg.steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            lp = target_logprob(represent(view.model, dense, x), catalogue, view.targets, rows)
            (g,) = torch.autograd.grad(lp.sum(), x)                                 # (B, L, d)
        rms = g.pow(2).mean((1, 2), keepdim=True).sqrt().clamp(min=1e-12)
        x = x - MINE_STEP * scale * g / rms
    return x.detach()


def ahum_loss(model: Model, dense: Params, table: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              col_mask: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-item loss with the targets (table (T, d)) as the positives for hard users x (s, L, d)."""
    return -target_logprob(represent(model, dense, x), catalogue, targets, table).mean()


def attack(view: AttackView) -> Updates:
    """Mine hard users from noise and upload the update that raises the targets for them."""
    cfg, m, T = view.cfg, view.m, len(view.targets)
    E = view.params["item_emb"]                                                     # (N+1, d)
    d = E.shape[1]
    mu, sd = E[1:].mean(0), E[1:].std(0)                                            # (d,), (d,)
    gen = torch.Generator().manual_seed(int(view.rng().integers(2 ** 62)))
    x = mu + sd * torch.randn(m * cfg.users, cfg.fake_len, d, generator=gen, dtype=E.dtype)
    x = mine(view, x, sd).reshape(m, cfg.users, cfg.fake_len, d)                   # (m, s, L, d)
    keys = dense_keys(view.params)
    dense = {k: view.params[k] for k in keys}
    loss_fn = partial(ahum_loss, catalogue=E, targets=view.targets)
    fn = partial(local_train, view.model, loss_fn, cfg.local_epochs, cfg.lr, cfg.client_opt)
    rows = E[view.targets].expand(m, T, d)                                          # (m, T, d)
    dummy = torch.zeros(m, 1, dtype=torch.int64)
    with torch.enable_grad():
        d_dense, d_rows, loss, _ = vmap(fn, in_dims=(None, 0, 0, 0, 0))(dense, rows, x, dummy, dummy)
    return Updates(view.clients, torch.full((m,), float(cfg.fake_len), dtype=E.dtype),
                   cfg.scale * flatten(d_dense, keys, batched=True),
                   torch.arange(m).repeat_interleave(T), view.targets.repeat(m),
                   cfg.scale * d_rows.reshape(m * T, d), loss)
