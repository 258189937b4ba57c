"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), functional.

Parameters are a flat dict of tensors so that torch.func.vmap can train many clients at once.
`params["item_emb"]` is either the whole catalogue (n_items + 1, d) or a client's gathered
sub-table (S, d); `seqs` index into whichever table is passed. Row 0 is padding.

Differences from the reference implementation, and why:
- pre-LN blocks (x + attn(LN(x)), x + ffn(LN(x)), final LN), which train more stably;
- padded keys are masked in attention and positions are right-aligned (the last item always
  has position max_len - 1), so trimming left padding never changes an output. The vectorised
  engine relies on this to pad each chunk of clients only to its own longest sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]


def init(n_items: int, dim: int, max_len: int, blocks: int = 2, heads: int = 1,
         generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh parameters: N(0, 0.02) weights (nanoGPT), zero biases, unit layer norms."""
    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype) * 0.02

    p: Params = {"item_emb": normal(n_items + 1, dim), "pos_emb": normal(max_len, dim)}
    p["item_emb"][0] = 0.0
    for b in range(blocks):
        p[f"b{b}.ln1.w"], p[f"b{b}.ln1.b"] = torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype)
        p[f"b{b}.qkv.w"], p[f"b{b}.qkv.b"] = normal(dim, 3 * dim), torch.zeros(3 * dim, dtype=dtype)
        p[f"b{b}.out.w"], p[f"b{b}.out.b"] = normal(dim, dim), torch.zeros(dim, dtype=dtype)
        p[f"b{b}.ln2.w"], p[f"b{b}.ln2.b"] = torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype)
        p[f"b{b}.ff1.w"], p[f"b{b}.ff1.b"] = normal(dim, dim), torch.zeros(dim, dtype=dtype)
        p[f"b{b}.ff2.w"], p[f"b{b}.ff2.b"] = normal(dim, dim), torch.zeros(dim, dtype=dtype)
    p["lnf.w"], p["lnf.b"] = torch.ones(dim, dtype=dtype), torch.zeros(dim, dtype=dtype)
    return p


def _attention(p: Params, b: int, x: torch.Tensor, allowed: torch.Tensor, heads: int,
               dropout: float, training: bool, last: bool = False) -> torch.Tensor:
    """Self-attention output at every position (B, L, d), or with `last` at the last one only (B, 1, d)."""
    B, L, d = x.shape
    w, bias = p[f"b{b}.qkv.w"], p[f"b{b}.qkv.b"]
    if last:                         # keys and values of every position, the query of the last
        k, v = (x @ w[:, d:] + bias[d:]).split(d, dim=-1)                       # 2 x (B, L, d)
        q = x[:, -1:] @ w[:, :d] + bias[:d]                                     # (B, 1, d)
    else:
        q, k, v = (x @ w + bias).split(d, dim=-1)                               # 3 x (B, L, d)
    Q = q.shape[1]
    q = q.reshape(B, Q, heads, d // heads).transpose(1, 2)                      # (B, H, Q, dh)
    k, v = (t.reshape(B, L, heads, d // heads).transpose(1, 2) for t in (k, v))  # (B, H, L, dh)
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)                      # (B, H, Q, L)
    att = att.masked_fill(~allowed[:, None, L - Q:], float("-inf")).softmax(-1)
    att = F.dropout(att, dropout, training)
    y = (att @ v).transpose(1, 2).reshape(B, Q, d)                              # (B, Q, d)
    return y @ p[f"b{b}.out.w"] + p[f"b{b}.out.b"]


def encode(p: Params, seqs: torch.Tensor, heads: int = 1, dropout: float = 0.0,
           training: bool = False, last: bool = False) -> torch.Tensor:
    """Hidden state at every position: seqs (B, L) left-padded ids -> (B, L, d); with `last`, (B, 1, d)
    at the last position only (the final block then attends from, and transforms, that one position)."""
    B, L = seqs.shape
    max_len, d = p["pos_emb"].shape
    if L > max_len:
        raise ValueError(f"sequence length {L} exceeds max_len {max_len}")
    blocks = sum(1 for k in p if k.endswith(".qkv.w"))
    real = seqs > 0                                                            # (B, L)
    x = p["item_emb"][seqs] + p["pos_emb"][max_len - L:]                      # (B, L, d)
    x = F.dropout(x, dropout, training) * real[..., None]
    causal = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
    # a real query sees earlier real keys; every query sees itself, so no row is all -inf
    allowed = (causal & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=seqs.device)  # (B, L, L)
    for b in range(blocks):
        h = F.layer_norm(x, (d,), p[f"b{b}.ln1.w"], p[f"b{b}.ln1.b"])
        one = last and b == blocks - 1
        att = _attention(p, b, h, allowed, heads, dropout, training, one)
        x = (x[:, -1:] if one else x) + F.dropout(att, dropout, training)           # (B, L or 1, d)
        h = F.layer_norm(x, (d,), p[f"b{b}.ln2.w"], p[f"b{b}.ln2.b"])
        h = F.relu(h @ p[f"b{b}.ff1.w"] + p[f"b{b}.ff1.b"]) @ p[f"b{b}.ff2.w"] + p[f"b{b}.ff2.b"]
        x = x + F.dropout(h, dropout, training)
    return F.layer_norm(x, (d,), p["lnf.w"], p["lnf.b"])                      # (B, L, d)
