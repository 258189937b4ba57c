"""The reach cap (`reach_cap`, `bounds.exposure_caps`) applied once to a saved defended model, outside a run.

    python bench/reach_offline.py RUN_DIR [RUN_DIR ...] --data DATA [--rho 1 1.5 2] [--draws 5] [--probes 128]

For each model (RUN_DIR/model.pt with a FORTRESS monitor state, RUN_DIR/results.json naming the attack's
target): the target's monitor rate and rank, and its probe reach among 2,000 probe users against the largest
other item's; then, for each rho, one pass of the server's own exposure cap (`FortressServer.cap_exposure`,
built with reach_cap = rho and probe_users = `--probes`, its probe generator seeded with the draw) on a copy of
the model, and the test split's HR@10 and the target's ER@10 after it (`metrics.evaluate`, full ranking),
averaged over `--draws` probe draws. Used for docs/results/adaptive.md, "A bound on reach".
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fortress import bounds
from fortress import config as config_mod
from fortress.data import load_data
from fortress.metrics import evaluate
from fortress.models import from_config
from fortress.server import defences
from fortress.server.fortress import probe_top
from fortress.simulate import model_scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rho", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--probes", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for run in a.runs:
        blob = torch.load(Path(run) / "model.pt", weights_only=False)
        target = json.loads((Path(run) / "results.json").read_text())["attack"]["target_index"][0]
        cfg = config_mod.from_dict({**config_mod.upgrade(blob["config"]), "defence": "fortress"})
        ds = load_data(a.data, cfg)
        model, p0 = from_config(cfg), {k: v.float() for k, v in blob["params"].items()}
        state = (blob.get("defence") or {}).get("state") or {}

        def server(rho: float, probes: int):
            srv = defences.make(replace(cfg, reach_cap=rho, probe_users=probes), ds.n_items)
            srv.load_state_dict(state)
            srv.rounds = max(srv.rounds, bounds.WARMUP)
            return srv

        def metrics(p: dict) -> tuple[float, float]:
            m = evaluate(ds, model_scorer(model, p, ds), "test", cfg.eval_batch, [target])
            return m["HR@10"], m["ER@10"]

        rate = server(0.0, a.probes).floored_rate()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            count = probe_top(model, p0, bounds.probe_sequences(rate, 2000, cfg.max_len, gen), bounds.PROBE_K)[3]
        other = float(count[1:].masked_fill(torch.arange(1, len(count)) == target, -1).max())
        raw = state["rate"]
        hr0, er0 = metrics(p0)
        print(f"{run}: target {target} rate {float(raw[target]):.3f} (rank {int((raw > raw[target]).sum())}, mean rate "
              f"{float(raw[1:].mean()):.4f}); probe reach {int(count[target])} of 2000 (largest other {other:.0f}); "
              f"test HR@10 {hr0:.4f} ER@10 {er0:.3f}")
        for rho in a.rho:
            res = []
            for d in range(a.draws):
                srv = server(rho, a.probes)
                srv.probe_gen.manual_seed(d)
                p = {k: v.clone() for k, v in p0.items()}
                with torch.no_grad():
                    log = srv.cap_exposure(p)
                res.append((log.get("exposure_capped", 0), *metrics(p)))
            r = np.array(res)
            print(f"  reach_cap {rho:g}: items capped {r[:, 0].mean():.1f}, test HR@10 {r[:, 1].mean():.4f}, ER@10 "
                  f"{r[:, 2].mean():.3f} (draws {r[:, 2].min():.3f}-{r[:, 2].max():.3f})")


if __name__ == "__main__":
    main()
