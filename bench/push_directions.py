"""Which way an attack's target rows point, against honest pushes, on a saved FORTRESS model, outside a run.

    python bench/push_directions.py RUN_DIR --data DATA [--rounds 3] [--probes 2000]

For the model in RUN_DIR/model.pt (with a FORTRESS monitor state; RUN_DIR/results.json names the target):
the mean representation of `--probes` probe users (drawn from the monitor's floored rates, as the exposure
cap draws them) and, for `--rounds` rounds simulated from the model (clients_per_round - k honest users, numpy
seed 0, trained with `client.train_round` and the FedAvg objective; k = attack_ratio x clients_per_round of the
run's attackers):
- the cosine of every honest push (a row of at least push_frac push-equivalents) with that mean, as quantiles,
  and of the attackers' target rows;
- in units of the round's row clip, each client's largest raise along the mean (its norm-clipped row
  contribution's component along it): the honest clients' quantiles and the attackers'.
Used for docs/results/adaptive.md ("The floor under the same server, and a directional bound ...").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fortress import attacks, bounds
from fortress import config as config_mod
from fortress.client import build_chunks, eligible_clients, objective, train_round
from fortress.data import load_data
from fortress.models import from_config
from fortress.server import defences
from fortress.updates import concat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=2000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)                                   # the clients' dropout
    blob = torch.load(Path(a.run) / "model.pt", weights_only=False)
    target = json.loads((Path(a.run) / "results.json").read_text())["attack"]["target_index"][0]
    cfg = config_mod.from_dict({**config_mod.upgrade(blob["config"]), "defence": "fortress", "objective": "next_item"})
    ds = load_data(a.data, cfg)
    model, p0 = from_config(cfg), {k: v.float() for k, v in blob["params"].items()}
    srv = defences.make(cfg, ds.n_items)
    srv.load_state_dict((blob.get("defence") or {}).get("state") or {})
    with torch.no_grad():
        h = model.last(p0, bounds.probe_sequences(srv.floored_rate(), a.probes, cfg.max_len,
                                                  torch.Generator().manual_seed(0)))
    mean = h.mean(0).double()
    print(f"{a.run}: target {target}; |mean probe representation| / mean |representation| "
          f"{float(mean.norm() / h.norm(dim=1).mean()):.3f}")
    mean = mean / mean.norm()
    q = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    rng = np.random.default_rng(0)
    k = max(1, round(cfg.attack_ratio * cfg.clients_per_round))
    for r in range(a.rounds):
        users = rng.choice(eligible_clients(ds), cfg.clients_per_round - k, replace=False)
        chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, cfg.chunk_size, rng)
        u = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, p0, chunks,
                        cfg.engine)
        bad = attacks.malicious_updates(cfg.attack, cfg, model, p0, ds.n_items, [target],
                                        np.arange(ds.n_users, ds.n_users + k), (cfg.seed, 10_000 + r, 1))
        both = concat([u, bad])
        w = bounds.effective_weight(both, cfg.max_len)
        norms = bounds.row_contrib_norms(both, w)
        c_row, _ = bounds.clip_scales(both, cfg.max_len, cfg.row_clip, cfg.dense_clip)
        e = bounds.push_equivalents(norms, c_row)
        cos = F.cosine_similarity(both.rows_delta.double(), mean[None], dim=1)
        honest = torch.arange(len(e)) < u.rows_item.numel()
        theirs = ~honest & (both.rows_item == target)
        push = honest & bounds.pushes(e, cfg.push_frac)
        top = bounds.client_max(e * cos, both.rows_client, both.n)               # largest raise, in units of C_row
        print(f"  round {r + 1}: {int(push.sum())} honest pushes, cosine with the mean: quantiles 50/90/99 "
              f"{np.round(cos[push].quantile(q).numpy(), 2)}, largest {float(cos[push].max()):.2f}; {k} "
              f"{cfg.attack} attackers' target rows {np.round(cos[theirs].numpy(), 2)}")
        print(f"    largest raise along the mean per client (units of the row clip): honest quantiles 50/90/99 "
              f"{np.round(top[:u.n].quantile(q).numpy(), 2)}; attackers {np.round(top[u.n:].numpy(), 2)}")


if __name__ == "__main__":
    main()
