"""How much the FORTRESS objective's extra terms move a client's update, against L_rec's (issue #19: why no gain).

For a round's sample of clients, each client's gradient (encoder and its item sub-table, at the broadcast
model) is split into three parts: g_rec of L_rec, g_cl of λ1·(L_seq + L_user + L_item) and g_temp of
λ2·L_temp, each the difference of two exact gradients of `objectives.fortress_loss` with terms switched
off (dropout off, so the differences are exact). Printed per model: the median over clients of ‖g_cl‖ / ‖g_rec‖,
‖g_temp‖ / ‖g_rec‖ and of the cosines cos(g_cl, g_rec), cos(g_temp, g_rec) (the JSON adds the 90th percentile
of the ratios, the mean cosine and the share of positive cosines). Models: random init, and the saved runs
named (their configs' weights λ1, λ2, τ unless --set overrides them).

  python bench/objective_terms.py --data amazon-cell-phones \
      --runs runs/objective-scratch/cells/run-a5d7c634c7 runs/objective-scratch/cells/run-4a31a0d97a \
      --out docs/bench/objective-terms.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.func import grad

from fortress import config as config_mod
from fortress.client import round_chunks
from fortress.data import load_dataset, resolve
from fortress.models import dense_keys, from_config
from fortress.objectives import fortress_loss
from fortress.recommend import load_run

OFF = dict(seq_view=False, user_view=False, item_view=False, temporal=False)


def client_grads(model, params, chunk, i, cfg) -> dict[str, torch.Tensor]:
    """g_rec, g_cl, g_temp of client i of `chunk` (flattened: encoder, then its sub-table)."""
    dense = {k: params[k] for k in dense_keys(params)}
    items = chunk.items[i]
    table, col_mask = params["item_emb"][items], items > 0
    x, y = chunk.x[i], chunk.y[i]
    draws = {k: v[i, 0] for k, v in chunk.draws.items()}                         # epoch 0's draws

    def g(c) -> torch.Tensor:
        gd, gt = grad(lambda d, t: fortress_loss(model, d, t, x, y, col_mask, draws, c)[0], argnums=(0, 1))(dense, table)
        return torch.cat([gd[k].reshape(-1) for k in sorted(gd)] + [gt.reshape(-1)])
    rec = g(dataclasses.replace(cfg, **OFF))
    cl = g(dataclasses.replace(cfg, temporal=False)) - rec
    temp = g(dataclasses.replace(cfg, **{**OFF, "temporal": True})) - rec
    if i == 0:                  # the terms add up: the three parts give the whole objective's gradient
        full = g(cfg)
        assert (rec + cl + temp - full).abs().max() <= 1e-9 * full.abs().max(), "the gradient split is not exact"
    return {"rec": rec, "cl": cl, "temp": temp}


def measure(name: str, cfg, params, ds, clients: int, seed: int) -> dict:
    model = from_config(cfg)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(ds.n_users, size=min(clients, ds.n_users), replace=False))
    ratio = {"cl": [], "temp": []}
    cos = {"cl": [], "temp": []}
    for chunk in round_chunks(ds, cfg, users, 0):
        for i in range(chunk.n):
            gs = client_grads(model, params, chunk, i, cfg)
            nr = gs["rec"].norm().item()
            for t in ("cl", "temp"):
                nt = gs[t].norm().item()
                ratio[t].append(nt / max(nr, 1e-30))
                cos[t].append(float(gs[t] @ gs["rec"]) / max(nt * nr, 1e-30))
    out = {"model": name, "clients": len(ratio["cl"]), "lambda_cl": cfg.lambda_cl, "lambda_temp": cfg.lambda_temp,
           "tau": cfg.tau}
    for t in ("cl", "temp"):
        r, c = np.array(ratio[t]), np.array(cos[t])
        out[t] = {"norm_ratio_median": float(np.median(r)), "norm_ratio_p90": float(np.quantile(r, 0.9)),
                  "cos_median": float(np.median(c)), "cos_mean": float(c.mean()),
                  "share_positive_cos": float((c > 0).mean())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--runs", nargs="*", default=[], help="saved runs (folders with model.pt) to measure at")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="key=value on top of each model's config")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sets = ["objective=fortress", "dropout=0.0", "dtype=float64", *args.set]      # exact gradients, no dropout
    base = config_mod.load(None, sets)
    ds = load_dataset(resolve(args.data))
    rows = []
    init = from_config(base).init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    rows.append(measure("random init", base, init, ds, args.clients, 0))
    for run_dir in args.runs:
        blob = load_run(run_dir)
        cfg = config_mod.override(config_mod.from_dict({**blob["config"], "device": "cpu"}),
                                  config_mod.parse_sets(sets))
        params = {k: v.double() for k, v in blob["params"].items()}
        rows.append(measure(f"{run_dir} ({blob['config'].get('objective')}, round {blob['config'].get('rounds')})",
                            cfg, params, ds, args.clients, 0))
    print(f"{'model':<70} {'|g_cl|/|g_rec|':>15} {'cos(cl,rec)':>12} {'|g_temp|/|g_rec|':>17} {'cos(temp,rec)':>14}")
    for r in rows:
        print(f"{r['model'][:70]:<70} {r['cl']['norm_ratio_median']:>15.4f} {r['cl']['cos_median']:>12.3f} "
              f"{r['temp']['norm_ratio_median']:>17.4f} {r['temp']['cos_median']:>14.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
