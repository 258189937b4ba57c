"""Which way an attack's target rows point, against honest pushes, on a saved FORTRESS model, outside a run.

    python bench/push_directions.py RUN_DIR --data DATA [--rounds 3] [--probes 2000]

For the model in RUN_DIR/model.pt (with a FORTRESS monitor state; RUN_DIR/results.json names the target):
the mean representation of `--probes` probe users (drawn from the monitor's floored rates, as the exposure
cap draws them) and, for `--rounds` rounds simulated from the model (`saved.attacked_round`: clients_per_round - k
honest users, numpy seed 0, trained as FedAvg clients; k = attack_ratio x clients_per_round of the run's
attackers):
- the cosine of every honest push (a row of at least push_frac push-equivalents) with that mean, as quantiles,
  and of the attackers' target rows;
- in units of the round's row clip, each client's largest raise along the mean (its norm-clipped row
  contribution's component along it): the honest clients' quantiles and the attackers'.
Used for docs/results/adaptive.md ("The floor under the same server, and a directional bound ...").
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import saved
from fortress import bounds
from fortress.server import defences
from fortress.updates import concat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=2000)
    a = ap.parse_args()
    sv = saved.load(a.run, a.data, objective="next_item")
    cfg, ds, model, p0, target = sv.cfg, sv.ds, sv.model, sv.params, sv.target
    srv = defences.make(cfg, ds.n_items)
    srv.load_state_dict(sv.state)
    with torch.no_grad():
        h = model.last(p0, bounds.probe_sequences(srv.floored_rate(), a.probes, cfg.max_len,
                                                  torch.Generator().manual_seed(0)))
    mean = h.mean(0).double()
    print(f"{a.run}: target {target}; |mean probe representation| / mean |representation| "
          f"{float(mean.norm() / h.norm(dim=1).mean()):.3f}")
    mean = mean / mean.norm()
    q = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    rng = np.random.default_rng(0)
    for r in range(a.rounds):
        u, bad = saved.attacked_round(sv, rng, r)
        k = bad.n
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
