"""Which uploaded item rows HiCS's sparsifier keeps, by item popularity, and where cold items sit in a saved model.

    python bench/hics_rows.py RUN_DIR [RUN_DIR ...] [--data DATA] [--rounds 3] [--out FILE.json]

For each saved run (RUN_DIR/model.pt; its data is found as `fortress eval` finds it, or given with --data):
- over `--rounds` rounds simulated from the saved model (clients_per_round honest users drawn with numpy seed r,
  trained with the run's client objective), the share of each kind of uploaded item row that `server.hics.hics`
  keeps at the run's thresholds (hics_item_clip, hics_keep, hics_user_clip; a FedAvg run has the defaults): the
  client's own items (its last max_len + 1 train items) and its sampled negatives, each by the item's popularity
  (cold / mid / popular: `metrics.popularity_cuts` of the train counts, as the report's strata), with their mean
  uploaded row norm;
- on the test users: each class's mean item-embedding norm, its share of the users' top-10 slots, and the test
  HR@10 of the users whose test item is of that class; and the run's mean training loss over its last 100 rounds
  (RUN_DIR/results.json).
Used for the README's note on HiCS-SASRec's mind-small cells (its models that rank no cold item).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fortress import config as config_mod
from fortress.client import build_chunks, eligible_clients, objective, train_round
from fortress.evaluate_run import run_data
from fortress.metrics import _masked, history_matrix, popularity_class, popularity_cuts
from fortress.models import from_config
from fortress.recommend import load_run
from fortress.server.hics import hics
from fortress.simulate import model_scorer

CLASSES = ("cold", "mid", "popular")


def item_classes(counts: np.ndarray) -> np.ndarray:
    """(N+1,) 0 cold, 1 mid, 2 popular by train count; -1 for the padding row."""
    cls = popularity_class(counts, *popularity_cuts(counts))
    cls[0] = -1
    return cls


def kept_rows(model, params, cfg, ds, cls: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """Per (own | negative) x class: rows uploaded, share kept by HiCS, mean uploaded row norm, over the rounds."""
    tally = {f"{kind} {c}": [0, 0, 0.0] for kind in ("own", "negative") for c in CLASSES}
    eligible = eligible_clients(ds)
    for r in range(rounds):
        rng = np.random.default_rng(r)
        users = rng.choice(eligible, min(cfg.clients_per_round, len(eligible)), replace=False)
        chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, cfg.chunk_size, rng)
        u = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params, chunks,
                        cfg.engine)
        out, _, _ = hics(u, cfg.hics_item_clip, cfg.hics_keep, cfg.hics_user_clip)
        kept = (torch.linalg.vector_norm(out.rows_delta, dim=1) > 0).numpy()                 # (M,)
        norm = torch.linalg.vector_norm(u.rows_delta.double(), dim=1).numpy()                 # (M,)
        items, client = u.rows_item.numpy(), u.rows_client.numpy()
        own_sets = [set(ds.train_seq(int(c))[-(cfg.max_len + 1):].tolist()) for c in u.clients]
        own = np.array([int(i) in own_sets[c] for i, c in zip(items, client)], dtype=bool)   # (M,)
        for kind, mask in (("own", own), ("negative", ~own)):
            for k, c in enumerate(CLASSES):
                m = mask & (cls[items] == k)
                t = tally[f"{kind} {c}"]
                t[0] += int(m.sum())
                t[1] += int((m & kept).sum())
                t[2] += float(norm[m].sum())
    return {k: {"rows": n, "kept": kept / max(n, 1), "norm": s / max(n, 1)} for k, (n, kept, s) in tally.items()}


@torch.no_grad()
def placement(model, params, ds, cls: np.ndarray) -> dict[str, dict[str, float]]:
    """Per class: mean item-embedding norm, share of the test users' top-10 slots, test HR@10 by the target's class."""
    users = np.flatnonzero(ds.test)
    sc = model_scorer(model, params, ds)
    scores = torch.cat([sc(users[a:a + 512], "test") for a in range(0, len(users), 512)])    # (B, N+1)
    target = torch.as_tensor(ds.test[users])                                                 # (B,)
    scores, _ = _masked(scores, history_matrix(ds, users, "test"), target)   # history masked, the target never
    top = scores.topk(10, dim=1).indices                                                     # (B, 10)
    cls_t = torch.as_tensor(cls)
    hit = (top == target[:, None]).any(1)                                                    # (B,)
    target_cls = cls_t[target]
    norms = torch.linalg.vector_norm(params["item_emb"].float(), dim=1)
    return {c: {"items": int((cls_t == k).sum()), "emb_norm": float(norms[cls_t == k].mean()),
                "top10_share": float((cls_t[top] == k).float().mean()),
                "test_users": int((target_cls == k).sum()),
                "test_HR@10": float(hit[target_cls == k].double().mean()) if (target_cls == k).any() else 0.0}
            for k, c in enumerate(CLASSES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--data", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {}
    for run in args.runs:
        torch.manual_seed(0)                                   # the simulated clients' dropout
        blob = load_run(run)
        cfg = config_mod.from_dict({**blob["config"], "device": "cpu"})
        ds, _ = run_data(blob, cfg, run, args.data)
        model, params = from_config(cfg), {k: v.float() for k, v in blob["params"].items()}
        cls = item_classes(ds.item_counts())
        rows = kept_rows(model, params, cfg, ds, cls, args.rounds)
        place = placement(model, params, ds, cls)
        history = json.loads((Path(run) / "results.json").read_text()).get("history") or []
        loss = float(np.mean([h["loss"] for h in history[-100:]])) if history else float("nan")
        result[run] = {"defence": cfg.defence, "seed": cfg.seed, "loss_last_100": loss, "rows": rows, "placement": place}
        print(f"{run} ({cfg.defence}, hics_keep {cfg.hics_keep:g}, seed {cfg.seed}): training loss {loss:.3f} over its "
              f"last 100 rounds; HiCS keeps, over {args.rounds} rounds simulated from the model")
        for k, v in rows.items():
            print(f"  {k:16s} rows {v['rows']:7d}  kept {v['kept']:.3f}  mean row norm {v['norm']:.4f}")
        for c, v in place.items():
            print(f"  {c:8s} items {v['items']:6d}  |item emb| {v['emb_norm']:.2f}  share of top-10 slots "
                  f"{v['top10_share']:.3f}  test users {v['test_users']:5d}  test HR@10 {v['test_HR@10']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
