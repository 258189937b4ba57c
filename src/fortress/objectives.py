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
