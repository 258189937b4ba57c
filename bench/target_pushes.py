"""Where an attack target's popularity rate comes from, on a saved FORTRESS model, outside a run.

    python bench/target_pushes.py RUN_DIR --data DATA [--rounds 4] [--rates 3 2 1 0.5]

For the model in RUN_DIR/model.pt (with a FORTRESS monitor state; RUN_DIR/results.json names the target):
- the target's monitor rate and its rank among the items' rates;
- `--rounds` rounds from that model, each of clients_per_round - k honest users (drawn with numpy seed 0,
  trained as the run's clients train: `client.train_round`, the run's objective) and k = attack_ratio x
  clients_per_round of the run's attackers: the attackers' push-equivalents on the target row and their
  coherence factors (`FortressServer.coherence`, which scales their contributions but not the push mass), and
  each honest client's push-equivalent on the target row (`bounds.push_equivalents` at the round's C_row, what the server adds to the item's push mass) and the
  cosine of its delta with the target row: a negative cosine is a client pushing the target down (it is
  among its sampled negatives and ranked high), which the push mass counts like a fan's push,
  and how much of the target rows' contributions the row clip keeps;
- the server's exposure cap (`FortressServer.cap_exposure`, one pass, probe generator seed 0) with the
  target's rate set to each of `--rates`, and the test split's HR@10 / ER@10 after it: the rate below
  which the cap binds.
Used for docs/results/adaptive.md ("What the target's rate is made of").
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
from fortress.metrics import evaluate
from fortress.models import from_config
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
    torch.set_num_threads(1)
    torch.manual_seed(0)                                   # the clients' dropout
    blob = torch.load(Path(a.run) / "model.pt", weights_only=False)
    target = json.loads((Path(a.run) / "results.json").read_text())["attack"]["target_index"][0]
    cfg = config_mod.from_dict({**config_mod.upgrade(blob["config"]), "defence": "fortress"})
    ds = load_data(a.data, cfg)
    model, p0 = from_config(cfg), {k: v.float() for k, v in blob["params"].items()}
    state = (blob.get("defence") or {}).get("state") or {}
    rate = state["rate"]
    print(f"{a.run}: target {target} rate {float(rate[target]):.3f} (rank {int((rate > rate[target]).sum()) + 1} of "
          f"{ds.n_items}; mean rate {float(rate[1:].mean()):.3f})")

    rng = np.random.default_rng(0)
    srv = defences.make(cfg, ds.n_items)
    k = max(1, round(cfg.attack_ratio * cfg.clients_per_round))
    for r in range(a.rounds):
        users = rng.choice(eligible_clients(ds), cfg.clients_per_round - k, replace=False)
        chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, cfg.chunk_size, rng)
        u = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, p0, chunks,
                        cfg.engine)
        bad = attacks.malicious_updates(cfg.attack, cfg, model, p0, ds.n_items, [target],
                                        np.arange(ds.n_users, ds.n_users + k), (cfg.seed, 10_000 + r, 1))
        both = concat([u, bad])
        c_row, _ = bounds.clip_scales(both, cfg.max_len, cfg.row_clip, cfg.dense_clip)
        eb = bounds.push_equivalents(bounds.row_contrib_norms(both, bounds.effective_weight(both, cfg.max_len)),
                                     c_row)[u.rows_item.numel():]
        coh, _ = srv.coherence(both.dense)
        print(f"  round {r + 1} with {k} {cfg.attack} attackers: their target-row push-equivalents "
              f"{np.round(eb[bad.rows_item == target].numpy(), 2)}, their coherence factors "
              f"{np.round(coh[u.n:].numpy(), 3)} (honest: {int((coh[:u.n] < 1).sum())} of {u.n} divided, median "
              f"factor of those {float(coh[:u.n][coh[:u.n] < 1].median()) if (coh[:u.n] < 1).any() else 1:.3f})")
        c_row, _ = bounds.clip_scales(u, cfg.max_len, cfg.row_clip, cfg.dense_clip)
        raw = bounds.row_contrib_norms(u, bounds.effective_weight(u, cfg.max_len)) / c_row       # in units of C_row
        e = raw.clamp(max=1.0)                                                                   # push_equivalents
        mass = torch.zeros(ds.n_items + 1, dtype=torch.float64).index_add_(0, u.rows_item, e)
        on = u.rows_item == target
        cos = F.cosine_similarity(u.rows_delta[on], p0["item_emb"][target][None], dim=1).double()
        down = float(e[on][cos < 0].sum())
        fans = sum(target in ds.train_items[ds.train_ptr[c]:ds.train_ptr[c + 1]] for c in u.clients[u.rows_client[on]].tolist())
        print(f"  honest round {r + 1}: {int(on.sum())} clients upload the target row; its push mass "
              f"{float(mass[target]):.2f} (rank {int((mass > mass[target]).sum()) + 1}; mean item "
              f"{float(mass[1:].mean()):.2f}), {down:.2f} of it from rows pushing it down (cosine with the "
              f"target row < 0; {fans} of the clients have the target in their history); the largest push-equivalents {np.round(e[on].sort().values[-4:].numpy(), 2)} "
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
