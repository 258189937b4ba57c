"""Pure losses shared by every training mode."""
from __future__ import annotations

import torch


def next_item_loss(logits: torch.Tensor, targets: torch.Tensor,
                   col_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax cross-entropy of the next item over the columns of `logits`.

    logits (..., L, S), targets (..., L) column ids with 0 = no target (padding), col_mask (S,)
    marks the columns that are real candidates (column 0, padding, never is).
    """
    if col_mask is None:
        col_mask = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    col_mask = col_mask.clone()
    col_mask[0] = False
    logp = logits.masked_fill(~col_mask, float("-inf")).log_softmax(-1)          # (..., L, S)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)                        # (..., L)
    real = targets > 0
    nll = torch.where(real, nll, torch.zeros_like(nll))                           # no 0 * inf
    return nll.sum() / real.sum().clamp(min=1)


def sampled_softmax_bias(x: torch.Tensor, y: torch.Tensor, col_mask: torch.Tensor,
                         n_items: int) -> torch.Tensor:
    """logQ correction (S,) for a client's sub-table of own items plus uniform negatives.

    The full softmax sums over the client's own items and the n_items - n_own others; the
    sub-table holds n_neg of those others drawn uniformly, so each stands for
    (n_items - n_own) / n_neg of them and gets that log-ratio added to its logit (Bengio &
    Senecal 2008; Jean et al., ACL 2015). Without it, a 512-of-10k sub-table makes the local loss
    far too easy and federated accuracy plateaus early.
    """
    S = col_mask.shape[-1]
    own = torch.zeros(S, dtype=torch.bool, device=x.device).scatter(0, torch.cat([x, y]), True)
    own = own & col_mask                                                          # (S,) own items
    neg = col_mask & ~own                                                         # (S,) negatives
    n_own, n_neg = own.sum(), neg.sum()
    ratio = (n_items - n_own).clamp(min=1).to(torch.float64) / n_neg.clamp(min=1)
    bias = torch.where(neg, ratio.log(), torch.zeros((), dtype=torch.float64))
    return bias
