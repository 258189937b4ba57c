"""The reach cap (`reach_cap`, `bounds.exposure_caps`) applied once to a saved defended model, outside a run.

    python bench/reach_offline.py RUN_DIR [RUN_DIR ...] [--rho 1 1.5 2] [--draws 5] [--probes 128]

For each model (RUN_DIR/model.pt with a FORTRESS monitor state, and RUN_DIR/results.json naming the attack's
target): the target's monitor rate and rank, its probe reach among 2,000 probe users against the next item's,
and, for each rho, what one exposure-cap pass with reach_cap = rho does (the mean over `--draws` probe draws of
`--probes` users): items capped, and ER@10 of the target and HR@10, both over every user scored on their full
history but the last item (the last item is the HR label; ER counts users whose sequence lacks the target).
Used for docs/results/adaptive.md, "A bound on reach".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fortress import bounds
from fortress import config as config_mod
from fortress.models import from_config
from fortress.server.fortress import probe_top


def real_eval(model, p, blob, target: int, L: int) -> tuple[float, float]:
    """(HR@10 of each user's last item, ER@10 of the target over users without it) on full histories."""
    ptr, items = blob["seq_ptr"].numpy(), blob["seq_items"].numpy()
    n = len(ptr) - 1
    X = torch.zeros(n, L, dtype=torch.long)
    y = torch.zeros(n, dtype=torch.long)
    elig = torch.ones(n, dtype=torch.bool)
    for u in range(n):
        s = items[ptr[u]:ptr[u + 1]]
        h = s[:-1][-L:]
        X[u, L - len(h):] = torch.as_tensor(h)
        y[u], elig[u] = int(s[-1]), target not in s
    hit = exp = 0
    with torch.no_grad():
        H = model.last(p, X)
        for i in range(0, n, 2048):
            s = model.score(p, H[i:i + 2048])
            s[:, 0] = -1e9
            s.scatter_(1, X[i:i + 2048], -1e9)
            top = s.topk(10, dim=1).indices
            hit += int((top == y[i:i + 2048, None]).any(1).sum())
            exp += int(((top == target).any(1) & elig[i:i + 2048]).sum())
    return hit / n, exp / max(int(elig.sum()), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--rho", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--probes", type=int, default=128)
    a = ap.parse_args()
    K = bounds.PROBE_K
    for run in a.runs:
        blob = torch.load(Path(run) / "model.pt", weights_only=False)
        target = json.loads((Path(run) / "results.json").read_text())["attack"]["target_index"][0]
        cfg = config_mod.from_dict(config_mod.upgrade(blob["config"]))
        model, p0 = from_config(cfg), blob["params"]
        rate = blob["defence"]["state"]["rate"]
        N = len(rate) - 1
        fr = rate.clamp(min=max(bounds.rate_floor(float(rate[1:].sum()), N, cfg.floor_frac), 1e-6))
        with torch.no_grad():
            count = probe_top(model, p0, bounds.probe_sequences(fr, 2000, cfg.max_len, torch.Generator().manual_seed(1)), K)[3]
        second = float(count[1:].masked_fill(torch.arange(1, N + 1) == target, -1).max())
        hr0, er0 = real_eval(model, p0, blob, target, cfg.max_len)
        print(f"{run}: target {target} rate {float(rate[target]):.3f} (rank {int((rate > rate[target]).sum())}, mean rate "
              f"{float(rate[1:].mean()):.4f}); probe reach {int(count[target])} of 2000 (largest other {second:.0f}); "
              f"HR@10 {hr0:.4f} ER@10 {er0:.3f}")
        for rho in a.rho:
            res = []
            for d in range(a.draws):
                p = {k: v.clone() for k, v in p0.items()}
                seqs = bounds.probe_sequences(fr, a.probes, cfg.max_len, torch.Generator().manual_seed(d))
                with torch.no_grad():
                    h, vals, top, cnt = probe_top(model, p, seqs, K)
                    cap = bounds.exposure_caps(cnt, fr, a.probes, cfg.exposure_cap, rho)
                    over = (cnt > cap).nonzero().flatten()
                    over = over[over > 0]
                    if len(over):
                        in_top = (top[:, :K, None] == over[None, None, :]).any(1)
                        f = bounds.shrink_to_cap((h @ p["item_emb"][over].T).double(), vals[:, K].double(),
                                                 vals[:, K - 1].double(), in_top, cap[over].floor())
                        p["item_emb"][over] *= f[:, None].to(p["item_emb"].dtype)
                res.append((len(over), *real_eval(model, p, blob, target, cfg.max_len)))
            r = np.array(res)
            print(f"  reach_cap {rho}: items capped {r[:, 0].mean():.1f}, HR@10 {r[:, 1].mean():.4f}, ER@10 "
                  f"{r[:, 2].mean():.3f} (draws {r[:, 2].min():.3f}-{r[:, 2].max():.3f})")


if __name__ == "__main__":
    main()
