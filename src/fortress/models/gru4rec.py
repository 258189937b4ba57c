"""GRU4Rec (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks",
ICLR 2016), functional, in the embedding + GRU + dense form of RecBole's GRU4Rec.

One GRU layer written out step by step (torch.nn.GRU has no vmap rule). Left padding is carried
through unchanged (the hidden state only moves on real items), so trimming padding never changes
an output, as in sasrec.py. `params["item_emb"]` is the catalogue or a client's sub-table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def init(n_items: int, dim: int, max_len: int, blocks: int = 1, heads: int = 1,
         generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh parameters; `max_len`, `blocks` and `heads` are accepted for a common signature."""
    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * std

    p: Params = {"item_emb": normal(n_items + 1, dim)}
    p["item_emb"][0] = 0.0
    std = dim ** -0.5                       # torch.nn.GRU's scale keeps the recurrence stable
    p["gru.w_ih"], p["gru.b_ih"] = normal(dim, 3 * dim, std=std), torch.zeros(3 * dim, dtype=dtype)
    p["gru.w_hh"], p["gru.b_hh"] = normal(dim, 3 * dim, std=std), torch.zeros(3 * dim, dtype=dtype)
    p["dense.w"], p["dense.b"] = normal(dim, dim, std=std), torch.zeros(dim, dtype=dtype)
    return p


def encode(p: Params, seqs: torch.Tensor, heads: int = 1, dropout: float = 0.0,
           training: bool = False) -> torch.Tensor:
    """Hidden state at every position: seqs (B, L) left-padded ids -> (B, L, d)."""
    B, L = seqs.shape
    d = p["item_emb"].shape[1]
    real = (seqs > 0)[..., None].to(p["item_emb"].dtype)                        # (B, L, 1)
    x = F.dropout(p["item_emb"][seqs], dropout, training)                        # (B, L, d)
    gi = x @ p["gru.w_ih"] + p["gru.b_ih"]                                        # (B, L, 3d)
    h = torch.zeros(B, d, dtype=x.dtype, device=x.device)                       # (B, d)
    out = []
    for t in range(L):
        gh = h @ p["gru.w_hh"] + p["gru.b_hh"]                                    # (B, 3d)
        ir, iz, inn = gi[:, t].split(d, dim=-1)
        hr, hz, hn = gh.split(d, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h_new = (1 - z) * torch.tanh(inn + r * hn) + z * h
        h = real[:, t] * h_new + (1 - real[:, t]) * h                           # padding keeps h
        out.append(h)
    h = torch.stack(out, dim=1)                                                 # (B, L, d)
    return F.dropout(h, dropout, training) @ p["dense.w"] + p["dense.b"]         # (B, L, d)
