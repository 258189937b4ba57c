"""The exposure cap (FORTRESS step 6) applied to a saved model, outside a run.

    python bench/exposure_probe.py RUN_DIR --data DATA [--passes 3] [--probes 512]

Prints, for the model in RUN_DIR/model.pt (which must hold a FORTRESS monitor state):
- the share of `--probes` probe users (drawn as the server draws them) with each target in their top
  10 (the run's attack targets), next to the real validation ER@10;
- the ratio of each exposed item's probe reach to its rate, relative to the median (how far honest
  items sit from the cap of `exposure_cap` x the median);
- validation HR@10 / NDCG@10 / ER@10 before and after `--passes` rounds of the server's cap (fresh
  probes each pass, nothing else changed), and what each pass capped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--probes", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    blob = torch.load(Path(args.run) / "model.pt", weights_only=False)
    cfg = config_mod.from_dict({**blob["config"], "defence": "fortress"})
    ds = load_data(args.data, cfg)
    model = from_config(cfg)
    params = {k: v.float().clone() for k, v in blob["params"].items()}
    srv = defences.make(cfg, ds.n_items)
    srv.load_state_dict((blob.get("defence") or {}).get("state") or {})
    results = json.loads((Path(args.run) / "results.json").read_text())
    targets = results.get("attack", {}).get("target_index") or []

    rate = srv.floored_rate()
    seqs = bounds.probe_sequences(rate, args.probes, cfg.max_len, torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        _, _, top, count = probe_top(model, params, seqs, bounds.PROBE_K)
    top10 = top[:, :10]
    seen = count >= bounds.PROBE_MIN_USERS
    ratio = (count[seen] / rate[seen]) / (count[seen] / rate[seen]).median()
    q = torch.quantile(ratio, torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)).tolist()
    print(f"probe reach / rate, relative to the median, over {int(seen.sum())} exposed items: "
          f"q90 {q[1]:.1f}, q99 {q[2]:.1f}, max {q[3]:.1f} (cap: {cfg.exposure_cap:g})")
    for t in targets:
        print(f"target {t}: probe users with it in their top 10 {float((top10 == t).any(1).float().mean()):.3f}")

    def metrics() -> dict:
        m = evaluate(ds, model_scorer(model, params, ds), "valid", cfg.eval_batch, targets or None)
        return {k: round(v, 4) for k, v in m.items() if k in ("HR@10", "NDCG@10", "ER@10")}

    print("validation before:", metrics())
    srv.rounds = max(srv.rounds, bounds.WARMUP)
    for i in range(args.passes):
        t0 = time.perf_counter()
        with torch.no_grad():
            log = srv.cap_exposure(params)
        print(f"pass {i}: {1000 * (time.perf_counter() - t0):.0f} ms, capped {log.get('exposure_capped', 0)}:",
              list(zip(log.get("capped", [])[:8], [round(x, 3) for x in log.get("capped_reach", [])[:8]])))
    print("validation after: ", metrics())


if __name__ == "__main__":
    main()
