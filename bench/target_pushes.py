"""Where an attack target's popularity rate comes from, on a saved FORTRESS model, outside a run.

    python bench/target_pushes.py RUN_DIR --data DATA [--rounds 4] [--rates 3 2 1 0.5]

For the model in RUN_DIR/model.pt (with a FORTRESS monitor state; RUN_DIR/results.json names the target):
- the target's monitor rate and its rank among the items' rates;
- `--rounds` rounds from that model (`saved.attacked_round`: clients_per_round - k honest users drawn with numpy
  seed 0, trained as FedAvg clients, and k = attack_ratio x clients_per_round of the run's attackers): the
  attackers' push-equivalents on the target row and their coherence factors (`FortressServer.coherence`, which
  scales their contributions but not the push mass); each honest client's push-equivalent on the target row
  (`bounds.push_equivalents` at the round's C_row, what the server adds to the item's push mass) and the cosine
  of its delta with the target row: a negative cosine is a client pushing the target down (it is among its
  sampled negatives and ranked high), which the push mass counts like a fan's push; and how much of the target
  rows' contributions the row clip keeps;
- the server's exposure cap (`FortressServer.cap_exposure`, one pass, probe generator seed 0) with the
  target's rate set to each of `--rates`, and the test split's HR@10 / ER@10 after it: the rate below
  which the cap binds.
Used for docs/results/adaptive.md ("What the target's rate is made of").
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import saved
from fortress import bounds
from fortress.metrics import evaluate
from fortress.server import defences
from fortress.simulate import model_scorer
from fortress.updates import concat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--rates", type=float, nargs="+", default=[3.0, 2.0, 1.0, 0.5])
    a = ap.parse_args()
    sv = saved.load(a.run, a.data, objective="next_item")
    cfg, ds, model, p0, state, target = sv.cfg, sv.ds, sv.model, sv.params, sv.state, sv.target
    rate = state["rate"]
    print(f"{a.run}: target {target} rate {float(rate[target]):.3f} (rank {int((rate > rate[target]).sum()) + 1} of "
          f"{ds.n_items}; mean rate {float(rate[1:].mean()):.3f})")

    rng = np.random.default_rng(0)
    srv = defences.make(cfg, ds.n_items)
    for r in range(a.rounds):
        u, bad = saved.attacked_round(sv, rng, r)
        k = bad.n
        both = concat([u, bad])
        norms = bounds.row_contrib_norms(both, bounds.effective_weight(both, cfg.max_len))
        c_row, _ = bounds.clip_scales(both, cfg.max_len, cfg.row_clip, cfg.dense_clip, row_norms=norms)
        M = u.rows_item.numel()                                  # the honest rows come first in `both`
        raw = norms[:M] / c_row                                  # honest rows, in units of the round's C_row
        e = bounds.push_equivalents(norms, c_row)                # what the server adds to each item's push mass
        eb, e = e[M:], e[:M]
        coh, _ = srv.coherence(both.dense)
        print(f"  round {r + 1} with {k} {cfg.attack} attackers: their target-row push-equivalents "
              f"{np.round(eb[bad.rows_item == target].numpy(), 2)}, their coherence factors "
              f"{np.round(coh[u.n:].numpy(), 3)} (honest: {int((coh[:u.n] < 1).sum())} of {u.n} divided, median "
              f"factor of those {float(coh[:u.n][coh[:u.n] < 1].median()) if (coh[:u.n] < 1).any() else 1:.3f})")
        mass = torch.zeros(ds.n_items + 1, dtype=torch.float64).index_add_(0, u.rows_item, e)
        on = u.rows_item == target
        cos = F.cosine_similarity(u.rows_delta[on], p0["item_emb"][target][None], dim=1).double()
        down = float(e[on][cos < 0].sum())
        fans = sum(target in ds.train_items[ds.train_ptr[c]:ds.train_ptr[c + 1]]
                   for c in u.clients[u.rows_client[on]].tolist())
        print(f"  honest round {r + 1}: {int(on.sum())} clients upload the target row; its push mass "
              f"{float(mass[target]):.2f} (rank {int((mass > mass[target]).sum()) + 1}; mean item "
              f"{float(mass[1:].mean()):.2f}), {down:.2f} of it from rows pushing it down (cosine with the "
              f"target row < 0; {fans} of the clients have the target in their history); the largest "
              f"push-equivalents {np.round(e[on].sort().values[-4:].numpy(), 2)} "
              f"with cosines {np.round(cos[e[on].argsort()][-4:].numpy(), 2)}; before the row clip the target rows "
              f"add up to {float(raw[on].sum()):.2f} clips (the clip keeps {float(e[on].sum() / raw[on].sum()):.2f})")

    for r in [None, *a.rates]:
        srv = defences.make(cfg, ds.n_items)
        srv.load_state_dict(state)
        srv.rounds = max(srv.rounds, bounds.WARMUP)
        if r is not None:
            srv.rate[target] = r
        srv.probe_gen.manual_seed(0)
        p = {k: v.clone() for k, v in p0.items()}
        with torch.no_grad():
            log = srv.cap_exposure(p)
        m = evaluate(ds, model_scorer(model, p, ds), "test", cfg.eval_batch, [target])
        what = "its own rate" if r is None else f"rate {r:g}"
        capped = target in log.get("capped", [])
        print(f"  exposure cap with the target at {what}: target capped {capped}, test HR@10 {m['HR@10']:.4f}, "
              f"ER@10 {m['ER@10']:.3f}")


if __name__ == "__main__":
    main()
