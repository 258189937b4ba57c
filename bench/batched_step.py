"""Is vmap's dispatch what keeps the FedAvg client step from its limit? (issue #17: what was tried)

The same one-step SGD client update of a chunk (SASRec, next-item loss with the logQ correction), computed
two ways on the same chunks of a 256-client round: the engine's `torch.func.vmap` over `local_train`, and
one plain batched autograd pass in which every encoder parameter is a per-client copy (a leading client
dimension, `expand` + `requires_grad_`), so that autograd's backward writes each client's gradient with
batched matmuls and no vmap is involved. Prints the median seconds of each over the rounds after the
first, their ratio, and the largest difference of the two updates with dropout off (they must agree).

  python bench/batched_step.py [--data amazon-cell-phones] [--rounds 6] [--out FILE.json]

Not an engine: the batched pass here covers SASRec and FedAvg's loss only, as a measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from fortress.client import _train, eligible_clients, objective, round_chunks
from fortress.config import Config, override
from fortress.data import load_dataset, resolve
from fortress.models import dense_keys, from_config


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w[:, None, :] + b[:, None, :]


def encode(p: dict, table: torch.Tensor, seqs: torch.Tensor, dropout: float, blocks: int) -> torch.Tensor:
    """models.sasrec.encode (training, one head) with per-client parameters p[k] (n, ...) and tables (n, S, d)."""
    n, L = seqs.shape
    max_len, d = p["pos_emb"].shape[1:]
    real = seqs > 0
    x = torch.gather(table, 1, seqs[..., None].expand(n, L, d)) + p["pos_emb"][:, max_len - L:]
    x = F.dropout(x, dropout, True) * real[..., None]
    allowed = (torch.ones(L, L, dtype=torch.bool).tril() & real[:, None, :]) | torch.eye(L, dtype=torch.bool)
    for b in range(blocks):
        h = layer_norm(x, p[f"b{b}.ln1.w"], p[f"b{b}.ln1.b"])
        q, k, v = torch.baddbmm(p[f"b{b}.qkv.b"][:, None, :], h, p[f"b{b}.qkv.w"]).split(d, -1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~allowed, float("-inf")).softmax(-1)
        y = torch.baddbmm(p[f"b{b}.out.b"][:, None, :], F.dropout(att, dropout, True) @ v, p[f"b{b}.out.w"])
        x = x + F.dropout(y, dropout, True)
        h = layer_norm(x, p[f"b{b}.ln2.w"], p[f"b{b}.ln2.b"])
        h = F.relu(torch.baddbmm(p[f"b{b}.ff1.b"][:, None, :], h, p[f"b{b}.ff1.w"]))
        x = x + F.dropout(torch.baddbmm(p[f"b{b}.ff2.b"][:, None, :], h, p[f"b{b}.ff2.w"]), dropout, True)
    return layer_norm(x, p["lnf.w"], p["lnf.b"])


def batched_step(dense: dict, item_emb: torch.Tensor, chunk, n_items: int, lr: float, dropout: float, blocks: int):
    """(dense changes {k: (n, ...)}, sub-table changes (n, S, d), losses (n,)) of one SGD step per client."""
    n, S = chunk.items.shape
    table = item_emb.index_select(0, chunk.items.reshape(-1)).view(n, S, -1).requires_grad_()
    p = {k: v.unsqueeze(0).expand(n, *v.shape).requires_grad_() for k, v in dense.items()}
    x, y, col = chunk.x, chunk.y, chunk.items > 0
    logits = encode(p, table, x, dropout, blocks) @ table.transpose(1, 2)                  # (n, L, S)
    own = torch.zeros(n, S, dtype=torch.bool).scatter(1, torch.cat([x, y], 1), True) & col
    neg = col & ~own                                                                        # logQ correction
    ratio = (n_items - own.sum(1)).clamp(min=1).double() / neg.sum(1).clamp(min=1)
    logits = logits + torch.where(neg, ratio.log()[:, None], torch.zeros((), dtype=torch.float64)).to(logits.dtype)[:, None]
    cand = col.clone()
    cand[:, 0] = False
    logp = logits.masked_fill(~cand[:, None, :], float("-inf")).log_softmax(-1)
    nll = torch.where(y > 0, -logp.gather(-1, y[..., None]).squeeze(-1), torch.zeros((), dtype=logp.dtype))
    loss = nll.sum(1) / (y > 0).sum(1).clamp(min=1)                                        # (n,)
    *g_dense, g_table = torch.autograd.grad(loss.sum(), [*p.values(), table])
    return {k: -lr * g for k, g in zip(p, g_dense)}, -lr * g_table, loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = override(Config(), {"threads": 1})
    ds = load_dataset(resolve(args.data))
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0))
    dense = {k: params[k] for k in dense_keys(params)}
    fn, eligible = objective(cfg, ds.n_items), eligible_clients(ds)
    sec: dict[str, list[float]] = {"vmap": [], "batched": []}
    for r in range(args.rounds):
        chunks = round_chunks(ds, cfg, np.random.default_rng([cfg.seed, r]).choice(eligible, 256, replace=False), r)
        for name in ("vmap", "batched") if r % 2 else ("batched", "vmap"):
            t0 = time.perf_counter()
            for c in chunks:
                if name == "vmap":
                    _train(model, fn, 1, cfg.lr, "sgd", params, c, "vmap")
                else:
                    batched_step(dense, params["item_emb"], c, ds.n_items, cfg.lr, cfg.dropout, cfg.blocks)
            if r:
                sec[name].append(time.perf_counter() - t0)
    off = override(cfg, {"dropout": 0.0})
    c = chunks[len(chunks) // 2]
    a = _train(from_config(off), objective(off, ds.n_items), 1, cfg.lr, "sgd", params, c, "vmap")
    b = batched_step(dense, params["item_emb"], c, ds.n_items, cfg.lr, 0.0, cfg.blocks)
    diff = max(max((a[0][k] - b[0][k]).abs().max().item() for k in dense), (a[1] - b[1]).abs().max().item())
    med = {k: float(np.median(v)) for k, v in sec.items()}
    print(f"{args.data}, 256 clients, one thread: vmap {med['vmap']:.3f} s, batched autograd {med['batched']:.3f} s "
          f"a round's client step (median of {args.rounds - 1}); vmap / batched = {med['vmap'] / med['batched']:.2f}; "
          f"largest difference of the updates (dropout off) {diff:.1e}")
    assert diff < 1e-4, "the two updates differ"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"data": args.data, "seconds": sec, "median": med, "ratio": med["vmap"] / med["batched"],
                       "max_update_difference": diff, "command": "python bench/batched_step.py " +
                       " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None)}, f, indent=1)


if __name__ == "__main__":
    main()
