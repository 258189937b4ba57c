"""Backbones as functional modules: init(...) -> params; encode(params, seqs) -> h; score(params, h)."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from fortress.errors import InputError
from fortress.models import gru4rec, sasrec

Params = dict[str, torch.Tensor]
BACKBONES: dict[str, ModuleType] = {"sasrec": sasrec, "gru4rec": gru4rec}


def score(p: Params, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of h (..., d) against the table in p (or its rows `items`): (..., S)."""
    table = p["item_emb"] if items is None else p["item_emb"][items]
    return h @ table.T


@dataclass(frozen=True)
class Model:
    """A backbone bound to its hyper-parameters; the parameters themselves stay a plain dict."""

    backbone: str
    dim: int
    max_len: int
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.0

    @property
    def module(self) -> ModuleType:
        return BACKBONES[self.backbone]

    def init(self, n_items: int, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32) -> Params:
        return self.module.init(n_items, self.dim, self.max_len, self.blocks, self.heads, generator, dtype)

    def encode(self, p: Params, seqs: torch.Tensor, training: bool = False) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, L, d)."""
        return self.module.encode(p, seqs, self.heads, self.dropout, training)

    def last(self, p: Params, seqs: torch.Tensor) -> torch.Tensor:
        """Representation after the last item, used to score the next one: (B, L) -> (B, d)."""
        if self.backbone == "sasrec":         # its final block need only attend from the last position
            return self.module.encode(p, seqs, self.heads, self.dropout, False, last=True)[:, -1]
        return self.encode(p, seqs)[:, -1]

    score = staticmethod(score)


def from_config(cfg) -> Model:
    if cfg.backbone not in BACKBONES:
        raise InputError(f"backbone={cfg.backbone!r} is not allowed; choose one of: {', '.join(BACKBONES)}")
    return Model(cfg.backbone, cfg.dim, cfg.max_len, cfg.blocks, cfg.heads, cfg.dropout)


def dense_keys(p: Params) -> list[str]:
    """Names of the encoder parameters (everything but the item table), in a fixed order."""
    return sorted(k for k in p if k != "item_emb")
