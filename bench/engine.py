"""Engine benchmark: vectorised vs loop rounds, evaluation time, memory, and a scale sweep.

    python bench/engine.py [--data amazon-cell-phones] [--rounds 5] [--out docs/bench/engine.json]

Each measurement runs in its own subprocess so that its peak RSS is its own. Rows:
- `vmap` / `loop`: seconds per 256-client FedAvg round on the real dataset (same clients, same
  sub-tables), the speed-up is their ratio measured in this one run;
- `fortress`: seconds per 256-client round with the FORTRESS client objective (all three views and
  the temporal term) and with plain FedAvg, vectorised, measured in one process with the two
  alternating round by round (same clients), so that load on a shared machine hits both alike;
  wall and CPU seconds, and their ratio (target: at most 3x);
- `defences`: each server rule's aggregation (`aggregate` + `after_apply`) of the same 256 uploads,
  and what it adds to the full FedAvg round measured in the same process, i.e. (its time - the
  FedAvg aggregation's) / the round (target for FORTRESS: <= 20%);
- `eval`: full-ranking validation of every user;
- `scale`: a synthetic federation of 1,000,000 users x 100,000 items, rounds of 256 / 1,024 /
  4,096 clients (chunks of `chunk_size` clients bound the training memory).
Targets: vmap >= 10x loop; a 256-client round <= 1 s and full evaluation <= 3 s on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fortress import bounds
from fortress.client import eligible_clients, objective, round_chunks, train_round
from fortress.config import Config, override
from fortress.data import load_dataset, resolve, synthetic
from fortress.metrics import evaluate
from fortress.models import dense_keys, from_config
from fortress.server.aggregate import GlobalOptimizer, fedavg
from fortress.simulate import model_scorer, peak_rss_mb, torch_threads


def time_rounds(ds, cfg: Config, clients: int, rounds: int, warmup: int = 1) -> dict:
    """Mean seconds of a full round (sample, build sub-tables, local training, aggregate, apply)."""
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
    eligible = eligible_clients(ds)
    gopt, keys = GlobalOptimizer(cfg.global_opt, cfg.global_lr), dense_keys(params)
    times, cpu = [], []
    for r in range(warmup + rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        rng = np.random.default_rng([cfg.seed, r])
        users = rng.choice(eligible, size=clients, replace=False)
        chunks = round_chunks(ds, cfg, users, r)
        updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params,
                              chunks, cfg.engine)
        gopt.apply(params, keys, params["item_emb"], fedavg(updates))
        if r >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"seconds_per_round": float(np.mean(times)), "std": float(np.std(times)),
            "cpu_seconds_per_round": float(np.mean(cpu)), "rounds": rounds}


def time_pair(ds, cfgs: list[Config], clients: int, rounds: int, warmup: int = 1) -> dict:
    """Rounds of each config in turn (same clients per round); mean wall and CPU seconds of each."""
    state = []
    for cfg in cfgs:
        model = from_config(cfg)
        params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
        state.append((cfg, model, params, GlobalOptimizer(cfg.global_opt, cfg.global_lr), dense_keys(params)))
    eligible = eligible_clients(ds)
    wall, cpu = np.zeros((rounds, len(cfgs))), np.zeros((rounds, len(cfgs)))
    for r in range(warmup + rounds):
        for j, (cfg, model, params, gopt, keys) in enumerate(state):
            t0, c0 = time.perf_counter(), time.process_time()
            rng = np.random.default_rng([cfg.seed, r])
            users = rng.choice(eligible, size=clients, replace=False)
            updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt,
                                  params, round_chunks(ds, cfg, users, r), cfg.engine)
            gopt.apply(params, keys, params["item_emb"], fedavg(updates))
            if r >= warmup:
                wall[r - warmup, j], cpu[r - warmup, j] = time.perf_counter() - t0, time.process_time() - c0
    return {"modes": [c.objective for c in cfgs], "seconds_per_round": wall.mean(0).tolist(),
            "cpu_seconds_per_round": cpu.mean(0).tolist(), "rounds": rounds}


def time_defences(ds, cfg: Config, clients: int, rounds: int, names: list[str]) -> dict:
    """Per round: a full FedAvg round (timed), then each defence's aggregation of the same uploads
    (`aggregate` + `after_apply` on a copy of the model), so that their cost is a ratio in one run."""
    from fortress.server import defences
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
    eligible = eligible_clients(ds)
    gopt, keys = GlobalOptimizer(cfg.global_opt, cfg.global_lr), dense_keys(params)
    rules = {n: defences.make(override(cfg, {"defence": n}), ds.n_items) for n in names}
    for rule in rules.values():         # a warm FORTRESS monitor, so every step runs (the exposure cap waits WARMUP rounds)
        if hasattr(rule, "rounds"):
            rule.rounds = bounds.WARMUP
    fed, agg = [], {n: [] for n in names}
    for r in range(1 + rounds):
        t0 = time.perf_counter()
        users = np.random.default_rng([cfg.seed, r]).choice(eligible, size=clients, replace=False)
        updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params,
                              round_chunks(ds, cfg, users, r), cfg.engine)
        copy = {k: v.clone() for k, v in params.items()}
        gopt.apply(params, keys, params["item_emb"], fedavg(updates))
        if r:
            fed.append(time.perf_counter() - t0)
        for n, rule in rules.items():
            t0 = time.perf_counter()
            rule.after_apply(copy, rule.aggregate(updates, copy))
            if r:
                agg[n].append(time.perf_counter() - t0)
    round_s = float(np.mean(fed))
    sec = {n: float(np.mean(v)) for n, v in agg.items()}
    base = sec.get("none", 0.0)             # FedAvg's own aggregation, which the round already holds
    return {"seconds_per_round": round_s, "rounds": rounds, "defence_seconds": sec,
            "defence_over_round": {n: (v - base) / round_s for n, v in sec.items()}}


def measure(spec: dict) -> dict:
    """One row, run inside a fresh subprocess."""
    cfg = override(Config(), spec["config"])
    torch.set_num_threads(spec.get("threads") or torch_threads(cfg.threads))
    t0 = time.perf_counter()
    if spec["data"] == "synthetic":
        ds = synthetic(spec["users"], spec["items"], seed=0)
    else:
        ds = load_dataset(resolve(spec["data"]))
    load_s = time.perf_counter() - t0
    row = {"kind": spec["kind"], "data": ds.name, "users": ds.n_users, "items": ds.n_items,
           "clients": spec.get("clients"), "mode": cfg.objective, "engine": cfg.engine, "chunk_size": cfg.chunk_size,
           "load_seconds": load_s}
    if spec["kind"] == "eval":
        model = from_config(cfg)
        params = model.init(ds.n_items, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        res = evaluate(ds, model_scorer(model, params, ds), "valid", cfg.eval_batch)
        row.update(seconds=time.perf_counter() - t0, users_evaluated=res["users"])
    elif spec["kind"] == "defences":
        row.update(time_defences(ds, cfg, spec["clients"], spec["rounds"], spec["defences"]))
    elif spec["kind"] == "fortress":
        fed = override(cfg, {"objective": "next_item"})
        row.update(time_pair(ds, [fed, override(cfg, {"objective": "fortress"})], spec["clients"], spec["rounds"]))
    else:
        row.update(time_rounds(ds, cfg, spec["clients"], spec["rounds"]))
    row["peak_rss_mb"] = peak_rss_mb()
    row["threads"] = torch.get_num_threads()
    return row


def run_row(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per vmap row (after 1 warm-up)")
    ap.add_argument("--loop-rounds", type=int, default=2, help="timed rounds for the (slow) loop engine")
    ap.add_argument("--scale", default="256,1024,4096", help="clients per round for the scale rows ('' = skip)")
    ap.add_argument("--rows", default="engines,eval,fortress,defences,scale",
                    help="which groups of rows to run (comma list of engines, eval, fortress, defences, scale)")
    ap.add_argument("--defences", default="none,fortress,median,trimmed_mean,krum,multi_krum,norm_bound",
                    help="the server rules timed by the defences row")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default="docs/bench/engine.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    base = dict(s.split("=", 1) for s in args.set)
    groups = set(args.rows.split(","))
    rows, summary = [], {}
    if "engines" in groups:
        for engine, rounds in (("vmap", args.rounds), ("loop", args.loop_rounds)):
            rows.append(run_row({"kind": "round", "data": args.data, "clients": 256, "rounds": rounds,
                                 "config": {**base, "engine": engine}}))
            print(f"  {rows[-1]['kind']} {engine}: {rows[-1]['seconds_per_round']:.3f} s", file=sys.stderr)
    if "eval" in groups:
        rows.append(run_row({"kind": "eval", "data": args.data, "config": base}))
    if "fortress" in groups:
        rows.append(run_row({"kind": "fortress", "data": args.data, "clients": 256, "rounds": args.rounds,
                             "config": {**base, "engine": "vmap"}}))
        print(f"  fedavg | fortress vmap: {rows[-1]['seconds_per_round']} s", file=sys.stderr)
    if "defences" in groups:
        rows.append(run_row({"kind": "defences", "data": args.data, "clients": 256, "rounds": args.rounds,
                             "defences": args.defences.split(","), "config": {**base, "engine": "vmap"}}))
    if "scale" in groups:
        for clients in [int(c) for c in args.scale.split(",") if c]:
            rows.append(run_row({"kind": "scale", "data": "synthetic", "users": 1_000_000, "items": 100_000,
                                 "clients": clients, "rounds": args.rounds, "config": base}))
            print(f"  scale {clients}: {rows[-1]['seconds_per_round']:.3f} s", file=sys.stderr)

    print(f"\n{'row':<28} {'s/round or s':>12} {'peak RSS MB':>12}")
    for r in rows:
        if r["kind"] == "fortress":
            for mode, sec, cpu in zip(r["modes"], r["seconds_per_round"], r["cpu_seconds_per_round"]):
                print(f"{mode + ' (paired) 256 clients':<28} {sec:>12.3f} {r['peak_rss_mb']:>12.0f}  cpu {cpu:.3f} s")
            continue
        if r["kind"] == "defences":
            print(f"{'fedavg round 256 clients':<28} {r['seconds_per_round']:>12.3f} {r['peak_rss_mb']:>12.0f}")
            for name, sec in r["defence_seconds"].items():
                print(f"{'  ' + name + ' aggregation':<28} {sec:>12.3f} {'':>12}  "
                      f"adds {100 * r['defence_over_round'][name]:.0f}% to the round")
            continue
        label = (f"{r['engine']} 256 clients" if r["kind"] == "round" else
                 f"eval {r['users_evaluated']} users" if r["kind"] == "eval" else
                 f"scale 1M users {r['clients']} clients")
        sec = r.get("seconds_per_round", r.get("seconds"))
        print(f"{label:<28} {sec:>12.3f} {r['peak_rss_mb']:>12.0f}")
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    if "round" in by_kind:
        vmap, loop = (r["seconds_per_round"] for r in by_kind["round"])
        summary["speedup_vmap_over_loop"] = loop / vmap
        print(f"vmap speed-up over loop: {loop / vmap:.1f}x (target >= 10x); "
              f"256-client round {vmap:.3f} s (target <= 1 s)")
    if "eval" in by_kind:
        print(f"evaluation {by_kind['eval'][0]['seconds']:.2f} s (target <= 3 s)")
    if "fortress" in by_kind:
        pair = by_kind["fortress"][0]
        summary["fortress_over_fedavg"] = pair["seconds_per_round"][1] / pair["seconds_per_round"][0]
        summary["fortress_over_fedavg_cpu"] = pair["cpu_seconds_per_round"][1] / pair["cpu_seconds_per_round"][0]
        print(f"fortress round / fedavg round: {summary['fortress_over_fedavg']:.2f}x wall, "
              f"{summary['fortress_over_fedavg_cpu']:.2f}x CPU (target <= 3x)")
    if "defences" in by_kind:
        summary["defence_over_round"] = by_kind["defences"][0]["defence_over_round"]
        print(f"fortress aggregation adds {100 * summary['defence_over_round'].get('fortress', float('nan')):.0f}% "
              "to a FedAvg round (target <= 20%)")
    scale = by_kind.get("scale", [])
    if len(scale) > 1:
        per_client = [r["seconds_per_round"] / r["clients"] * 1000 for r in scale]
        print("scale, ms per client: " + ", ".join(f"{r['clients']}: {m:.2f}" for r, m in zip(scale, per_client)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "command": " ".join(sys.argv),
            "load_average_at_end": os.getloadavg()}
    Path(args.out).write_text(json.dumps({"meta": meta, **summary, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
