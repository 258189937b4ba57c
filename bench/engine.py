"""Engine benchmark against the hardware limit: each row's time, its FLOPs and bytes, the limit, the ratio.

    python bench/engine.py [--data amazon-cell-phones] [--threads 1] [--rounds 8] [--baseline DIR]
                           [--rows ...] [--out docs/bench/engine.json]
    python bench/engine.py --profile [--data ...] [--out-dir docs/bench]   # per-op profiles of two rounds

Every row runs in its own subprocess (so that its peak RSS is its own) at `--threads` torch threads,
and first measures the machine there: the sgemm rate (a 1024^3 float32 matmul) and the copy
bandwidth (a 256 MB tensor copied; bytes read + written). A row's limit is the larger of its FLOPs
at the sgemm rate and its bytes at the copy bandwidth (a roofline); ratio = time / limit.
- FLOPs of a round are the matmul FLOPs of the per-client reference computation (no padding),
  counted by `torch.utils.flop_counter` on one client for each sequence length L at two sub-table
  sizes (a client's FLOPs are linear in its sub-table size S) and summed over the round's clients;
  bytes are the uploads the round must write (encoder deltas and item rows).
- `fedavg` / `fortress`: rounds of 256 clients (client step + FedAvg aggregation + apply, as
  before), the two objectives alternating round by round on the same clients, so load on a shared
  machine hits both alike; min and median over the rounds after one warm-up.
- `loop`: the per-client reference engine on the same FedAvg rounds.
- `defences`: each server rule's aggregation (`aggregate` + `after_apply`) of the same 256 uploads;
  its limit is reading the uploads once at the copy bandwidth. In the same loop, the FedAvg round (client
  step + FedAvg + apply) and each rule's added share of it, per round (median).
- `defround`: whole rounds as `fortress run` makes them without a defence and with `defence=fortress`,
  alternating on the same state; FORTRESS's added share of the round (median of the paired rounds).
  Both rows start from a fresh model, and with `--defence-init RUN` also from a saved defended run's model
  and monitor (the steady state of a long training; a fresh monitor flags almost every item), or with
  `--defence-init rounds:N` after N defended rounds from scratch (early in a training; the default is
  rounds:30); a comma-separated list gives each.
- `eval`: full-ranking validation of every user; FLOPs counted over the whole evaluation.
- `central`: the first `--central-batches` steps of a central epoch (full softmax over the
  catalogue), and the federated/central throughput in trained interactions per second.
- `cli`: `simulate.run` as `fortress run` does it (sampling, chunks, upload checks, aggregation,
  apply; `timing` of results.json): the median steady round, the first round, the final evaluation.
- `scale`: a synthetic federation of 1,000,000 users x 100,000 items at `--scale` clients a round, the
  first round as `fortress run` makes it (streamed FedAvg); peak RSS of the whole process and its
  RSS before the round (the dataset). `rulescale`: the same with `--rule-scale-rules` (robust rules
  that hold every upload) at `--rule-scale` clients.
`--baseline DIR` runs the fedavg/fortress, loop, eval and cli rows a second time on the code in
DIR/src (e.g. `git worktree add /tmp/base main`), in the same bench run, for before/after ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
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
from fortress.simulate import model_scorer, peak_rss_mb


OBJECTIVE = {"fedavg": "next_item", "fortress": "fortress"}     # row names -> the clients' objective

# ---- the machine ----

def sgemm_rate(n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a float32 n x n x n matmul at the current thread count (best of reps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def copy_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s read + written by copying a `mb` MB float32 tensor (best of reps)."""
    src = torch.randn(mb * 2 ** 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def machine() -> dict:
    return {"sgemm_flops": sgemm_rate(), "copy_bytes_per_s": copy_bandwidth()}


def limit(flops: float, nbytes: float, m: dict) -> float:
    """Roofline: the larger of the FLOPs at the sgemm rate and the bytes at the copy bandwidth."""
    return max(flops / m["sgemm_flops"], nbytes / m["copy_bytes_per_s"])


# ---- FLOPs and bytes of the reference computation ----

class FlopModel:
    """Matmul FLOPs of one client's local training as a function of (L inputs, S sub-table slots).

    Counted with torch's FlopCounterMode on a fake client per L at two sizes S; FLOPs are linear in S.
    """

    def __init__(self, cfg: Config, n_items: int):
        from fortress.client import local_train
        self.cfg, self.n_items, self.local_train = cfg, n_items, local_train
        self.model = from_config(cfg)
        # room for the largest fake sub-table (max_len + 4 + 64 slots) even on a tiny catalogue
        self.params = self.model.init(max(n_items, cfg.max_len + 68), torch.Generator().manual_seed(0))
        self.fn = objective(cfg, n_items)
        self.cache: dict[int, tuple[float, float]] = {}

    def _count(self, L: int, S: int) -> float:
        from torch.utils.flop_counter import FlopCounterMode
        dense = {k: self.params[k] for k in dense_keys(self.params)}
        table = self.params["item_emb"][:S]
        x = torch.arange(1, L + 1) % (S - 1) + 1
        y = torch.arange(2, L + 2) % (S - 1) + 1
        col = torch.ones(S, dtype=torch.bool)
        col[0] = False
        draws = None
        if self.cfg.objective == "fortress":
            from fortress.objectives import fortress_draws
            draws = {k: v[0] for k, v in fortress_draws(self.cfg, 0, np.array([0])).items()}
        with FlopCounterMode(display=False) as fc:
            self.local_train(self.model, self.fn, self.cfg.local_epochs, self.cfg.lr, self.cfg.client_opt,
                             dense, table, x, y, col, draws)
        return float(fc.get_total_flops())

    def __call__(self, L: int, S: int) -> float:
        if L not in self.cache:
            s0 = L + 4
            f0, f1 = self._count(L, s0), self._count(L, s0 + 64)
            self.cache[L] = (f0 - s0 * (f1 - f0) / 64, (f1 - f0) / 64)
        a, b = self.cache[L]
        return a + b * S


def round_work(chunks, flop_model: FlopModel, dense_size: int, dim: int) -> dict:
    """FLOPs of the round's clients (unpadded), the bytes of their uploads, and their trained interactions."""
    flops, rows, tokens, n = 0.0, 0, 0, 0
    for c in chunks:
        L = (c.x > 0).sum(-1).reshape(c.n, -1).tolist()      # each client's inputs per window (whole_history)
        S = ((c.items > 0).sum(1) + 1).tolist()
        flops += sum(flop_model(l, s) for ls, s in zip(L, S) for l in ls if l)   # windows as if apart (an upper bound)
        rows += sum(S) - len(S)
        tokens += sum(map(sum, L))
        n += c.n
    return {"flops": flops, "bytes": 4 * (n * dense_size + rows * dim), "interactions": tokens}


# ---- rows ----

def stats(v: list[float]) -> dict:
    return {"min": float(np.min(v)), "median": float(np.median(v)), "all": [float(x) for x in v]}


def time_rounds(ds, cfgs: list[Config], clients: int, rounds: int, with_work: bool) -> list[dict]:
    """Rounds of each config in turn (same clients per round): client step + FedAvg + apply, timed."""
    state = []
    for cfg in cfgs:
        model = from_config(cfg)
        params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
        fm = FlopModel(cfg, ds.n_items) if with_work else None
        state.append((cfg, model, params, GlobalOptimizer(cfg.global_opt, cfg.global_lr), dense_keys(params), fm))
    eligible = eligible_clients(ds)
    out = [{"seconds": [], "flops": [], "bytes": [], "interactions": []} for _ in cfgs]
    for r in range(1 + rounds):
        users = np.random.default_rng([cfgs[0].seed, r]).choice(eligible, size=clients, replace=False)
        for j, (cfg, model, params, gopt, keys, fm) in enumerate(state):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            chunks = round_chunks(ds, cfg, users, r)
            updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt,
                                  params, chunks, cfg.engine)
            gopt.apply(params, keys, params["item_emb"], fedavg(updates))
            sec = time.perf_counter() - t0
            if r:
                out[j]["seconds"].append(sec)
                if fm is not None:
                    for k, v in round_work(chunks, fm, updates.dense.shape[1], cfg.dim).items():
                        out[j][k].append(v)
    return out


def start_label(init: str) -> str:
    if init == "fresh":
        return "fresh model, every item new"
    if init.startswith("rounds:"):
        return f"after {init.split(':', 1)[1]} defended rounds from scratch"
    return "from " + Path(init).name


def start_from(ds, cfg: Config, model, init: str | None, rules: dict):
    """Parameters to time on: a fresh model (FORTRESS monitors set warm, so every step runs; their rates
    start at zero: a stress state no run reaches, in which every item is new), `rounds:N` (N rounds of a
    defended run from scratch as `fortress run` makes them, each stateful rule's monitor learning from
    its own run: early in a training, the monitor warm after its first WARMUP rounds), or a saved defended
    run's model and monitor state (`--defence-init RUN`: the steady state of a long training)."""
    if not init:
        for rule in rules.values():
            if hasattr(rule, "rounds"):
                rule.rounds = bounds.WARMUP
        return model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
    if init.startswith("rounds:"):
        eligible, first = eligible_clients(ds), None
        for rule in [rule for rule in rules.values() if hasattr(rule, "rounds")] or [None]:   # each monitor its own run
            params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
            gopt = GlobalOptimizer(cfg.global_opt, cfg.global_lr)
            for r in range(int(init.split(":", 1)[1])):
                cli_round(cfg, model, ds, params, gopt, eligible, r, rule)
            first = params if first is None else first
        return first
    blob = torch.load(Path(init) / "model.pt", weights_only=False)
    for rule in rules.values():
        if hasattr(rule, "load_state_dict") and (blob.get("defence") or {}).get("name") == rule.name:
            rule.load_state_dict(blob["defence"]["state"])
    return {k: v.clone() for k, v in blob["params"].items()}


def time_defences(ds, cfg: Config, clients: int, rounds: int, names: list[str], init: str | None = None) -> dict:
    """Each defence's aggregation (`aggregate` + `after_apply` on a copy of the model) of the same uploads,
    and in the same loop the FedAvg round they are added to (client step + FedAvg + apply): each rule's
    added share of a round is (its time - FedAvg's) / the round's time, per round."""
    from fortress.server import defences
    model = from_config(cfg)
    rules = {n: defences.make(override(cfg, {"defence": n}), ds.n_items) for n in names}
    params = start_from(ds, cfg, model, init, rules)
    eligible = eligible_clients(ds)
    gopt, keys = GlobalOptimizer(cfg.global_opt, cfg.global_lr), dense_keys(params)
    agg, nbytes, round_s = {n: [] for n in names}, [], []
    for r in range(1 + rounds):
        users = np.random.default_rng([cfg.seed, r]).choice(eligible, size=clients, replace=False)
        copy = {k: v.clone() for k, v in params.items()}      # the rules' copy of the broadcast model (untimed)
        t0 = time.perf_counter()
        updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params,
                              round_chunks(ds, cfg, users, r), cfg.engine)
        gopt.apply(params, keys, params["item_emb"], fedavg(updates))
        if r:
            round_s.append(time.perf_counter() - t0)
        for n, rule in rules.items():
            t0 = time.perf_counter()
            rule.after_apply(copy, rule.aggregate(updates, copy))
            if r:
                agg[n].append(time.perf_counter() - t0)
        if r:
            nbytes.append(updates.dense.numel() * 4 + updates.rows_delta.numel() * 4 + len(updates.rows_item) * 16)
    out = {"defences": {n: stats(v) for n, v in agg.items()}, "bytes": float(np.mean(nbytes)),
           "fedavg_round": stats(round_s), "init": init or "fresh"}
    if "none" in agg:
        out["added_share"] = {n: float(np.median((np.array(v) - np.array(agg["none"])) / np.array(round_s)))
                              for n, v in agg.items() if n != "none"}
    return out


def time_defence_rounds(ds, cfg: Config, rounds: int, init: str | None = None) -> dict:
    """Whole rounds as `fortress run` makes them (as `time_cli_rounds`), without a defence and with
    `defence=fortress`, on the same state each round (the defended model goes on), the two in alternating
    order so that load on a shared machine hits both alike; the added share per round, median."""
    from fortress.server import defences
    model = from_config(cfg)
    fortress = defences.make(override(cfg, {"defence": "fortress"}), ds.n_items)
    params = start_from(ds, cfg, model, init, {"fortress": fortress})
    eligible = eligible_clients(ds)
    gopts = {n: GlobalOptimizer(cfg.global_opt, cfg.global_lr) for n in ("none", "fortress")}
    sec: dict[str, list[float]] = {"none": [], "fortress": []}
    for r in range(1 + rounds):
        undefended = {k: v.clone() for k, v in params.items()}        # the FedAvg round's copy of this state
        for name in (("none", "fortress") if r % 2 else ("fortress", "none")):
            p, rule = (params, fortress) if name == "fortress" else (undefended, None)
            seconds, _ = cli_round(cfg, model, ds, p, gopts[name], eligible, r, rule)
            if r:
                sec[name].append(seconds)
    added = (np.array(sec["fortress"]) - np.array(sec["none"])) / np.array(sec["none"])
    return {"seconds": {n: stats(v) for n, v in sec.items()}, "added_share": float(np.median(added)),
            "init": init or "fresh"}


def eval_flops(ds, model, params) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        evaluate(ds, model_scorer(model, params, ds), "valid", 2048)
    return float(fc.get_total_flops())


def time_central(ds, cfg: Config, batches: int) -> dict:
    """The first `batches` steps of a central epoch (as `train_central`): seconds, FLOPs, interactions."""
    from fortress.simulate import central_step, pad_left, training_pairs
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
    users, seqs = training_pairs(ds, cfg.max_len, cfg.whole_history)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.central_lr)
    order = np.random.default_rng(cfg.seed).permutation(len(users))
    fm = FlopModel(override(cfg, {"objective": "next_item", "dropout": cfg.dropout}), ds.n_items)
    times, flops, tokens = [], 0.0, 0
    for b in range(batches + 1):
        picked = [seqs[i] for i in order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
        batch = pad_left(picked)
        t0 = time.perf_counter()
        central_step(model, params, opt, batch)
        if b:
            times.append(time.perf_counter() - t0)
            for s in picked:        # encoder of L inputs + scoring against the whole catalogue
                flops += fm(len(s) - 1, ds.n_items + 1)
                tokens += len(s) - 1
    steps = -(-len(users) // cfg.batch_size)
    return {"seconds": float(np.sum(times)), "batches": batches, "flops": flops, "interactions": tokens,
            "epoch_seconds_estimate": float(np.mean(times)) * steps}


def time_cli(ds, cfg: Config, rounds: int) -> dict:
    """`simulate.run` as the CLI runs it; per-round seconds from its history, final evaluation from `timing`."""
    from fortress.simulate import run
    cfg = override(cfg, {"rounds": rounds, "eval_every": 0, "targets": 0})
    with tempfile.TemporaryDirectory() as tmp:
        res = run(cfg, ds, tmp, progress=False)
    sec = [h["seconds"] for h in res["history"]]
    return {"first_round": sec[0], "rounds_after_first": stats(sec[1:]),
            "final_eval_seconds": res["timing"]["final_eval_seconds"]}


def setup_process() -> bool:
    """What `fortress run` does to the process besides threads (the code under test may predate it)."""
    try:
        from fortress.simulate import keep_freed_memory
    except ImportError:
        return False
    return keep_freed_memory()


def cli_round(cfg: Config, model, ds, params, gopt, eligible, r: int, defence=None):
    """One round as `fortress run` makes it in-process (sample, client step, streamed above `hold_clients` as
    in simulate.local_clients, checks, FedAvg or the defence, apply): (seconds, the server's result)."""
    from fortress.rounds import client_step, sample_clients, server_step
    from fortress.server.defences import reads_in_passes
    t0 = time.perf_counter()
    users = sample_clients(cfg, eligible, r)
    got = client_step(cfg, model, ds, params, users, r, stream=reads_in_passes(cfg))
    res = server_step(cfg, params, gopt, got, len(users), ds.n_items, r, defence)
    assert res.log["clients"] == len(users), res.log
    return time.perf_counter() - t0, res


def time_cli_rounds(ds, cfg: Config, rounds: int) -> dict:
    """Rounds as `fortress run` makes them in-process (`cli_round`); seconds per round after one warm-up, and
    the RSS before the first round."""
    from fortress.server import defences
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(cfg.seed))
    gopt, eligible = GlobalOptimizer(cfg.global_opt, cfg.global_lr), eligible_clients(ds)
    defence = None if cfg.defence == "none" else defences.make(cfg, ds.n_items)
    rss0, sec = peak_rss_mb(), []
    for r in range(max(1, 1 + rounds) if rounds else 1):
        seconds, _ = cli_round(cfg, model, ds, params, gopt, eligible, r, defence)
        if r or not rounds:                  # rounds 0: the first round is the one timed
            sec.append(seconds)
    return {"seconds": stats(sec), "rss_before_rounds_mb": rss0, "defence": cfg.defence}


def measure(spec: dict) -> dict:
    """One row, run inside a fresh subprocess."""
    cfg = override(Config(), {**spec["config"], "threads": spec["threads"]})
    torch.set_num_threads(spec["threads"])
    tuned = setup_process()
    m = machine()
    if spec["kind"] == "machine":
        return {"kind": "machine", "threads": torch.get_num_threads(), "machine": m}
    t0 = time.perf_counter()
    ds = (synthetic(spec["users"], spec["items"], seed=0) if spec["data"] == "synthetic"
          else load_dataset(resolve(spec["data"])))
    row = {"kind": spec["kind"], "code": spec.get("code", "this"), "data": ds.name, "users": ds.n_users,
           "items": ds.n_items, "clients": spec.get("clients"), "threads": torch.get_num_threads(),
           "load_seconds": time.perf_counter() - t0, "machine": m, "allocator_kept": tuned}
    kind = spec["kind"]
    if kind == "pair":
        names = spec["modes"]
        res = time_rounds(ds, [override(cfg, {"objective": OBJECTIVE[n]}) for n in names], spec["clients"], spec["rounds"],
                          spec.get("work", True))
        row["modes"] = {n: {"seconds": stats(r["seconds"]),
                            **{k: float(np.mean(r[k])) for k in ("flops", "bytes", "interactions") if r[k]}}
                        for n, r in zip(names, res)}
    elif kind == "eval":
        model = from_config(cfg)
        params = model.init(ds.n_items, torch.Generator().manual_seed(0))
        sec = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            res = evaluate(ds, model_scorer(model, params, ds), "valid", cfg.eval_batch)
            sec.append(time.perf_counter() - t0)
        row.update(seconds=stats(sec), users_evaluated=res["users"], flops=eval_flops(ds, model, params),
                   hr10=res["HR@10"])
    elif kind == "defences":
        row.update(time_defences(ds, cfg, spec["clients"], spec["rounds"], spec["defences"], spec.get("init")))
    elif kind == "defence_round":
        row.update(time_defence_rounds(ds, cfg, spec["rounds"], spec.get("init")))
    elif kind == "central":
        row.update(time_central(ds, override(cfg, {"training": "central"}), spec["batches"]))
    elif kind == "cli":
        row.update(time_cli(ds, cfg, spec["rounds"]))
    elif kind == "scale":
        row.update(time_cli_rounds(ds, override(cfg, {"clients_per_round": spec["clients"]}), spec["rounds"]))
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def run_row(spec: dict, src: str | None = None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = str(Path(src) / "src")
        spec = {**spec, "code": "baseline"}
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the table ----

def table(rows: list[dict]) -> tuple[list[str], dict]:
    """Lines of the printed table and a summary of the ratios."""
    lines = [f"{'row':<40} {'code':<8} {'s (min / median)':>18} {'GFLOP':>8} {'MB':>7} {'limit s':>8} "
             f"{'ratio':>6} {'RSS MB':>7}"]
    summary: dict = {}

    def line(name, r, sec, flops, nbytes):
        lim = max(limit(flops, nbytes, r["machine"]), 1e-12)
        lines.append(f"{name:<40} {r['code']:<8} {sec['min']:>8.3f} / {sec['median']:>7.3f} {flops / 1e9:>8.2f} "
                     f"{nbytes / 1e6:>7.1f} {lim:>8.4f} {sec['min'] / lim:>6.1f} {r['peak_rss_mb']:>7.0f}")
        return lim

    for r in rows:
        k, tag = r["kind"], r["code"]
        if k == "pair":
            for mode, v in r["modes"].items():
                eng = "loop" if r.get("engine") == "loop" else "vmap"
                name = f"{mode} round, {r['clients']} clients ({eng})"
                lim = line(name, r, v["seconds"], v.get("flops", 0.0), v.get("bytes", 0.0))
                summary[f"{tag}:{mode}:{eng}"] = {"seconds": v["seconds"]["min"], "limit": lim,
                                                  "ratio": v["seconds"]["min"] / lim,
                                                  "interactions_per_s": v.get("interactions", 0) / v["seconds"]["min"]}
        elif k == "defences":
            start = start_label(r["init"])
            fr = r["fedavg_round"]
            lines.append(f"{'fedavg round (' + start + ')':<40} {tag:<8} {fr['min']:>8.3f} / {fr['median']:>7.3f}")
            for name, v in r["defences"].items():
                line(f"  {name} aggregation", r, v, 0.0, r["bytes"])
            for name, share in r.get("added_share", {}).items():
                lines.append(f"  {name} adds {100 * share:.1f}% to the FedAvg round ({start}; median over rounds)")
                summary[f"{tag}:{name}:added:{r['init']}"] = share
        elif k == "defence_round":
            start = start_label(r["init"])
            for name, v in r["seconds"].items():
                lines.append(f"{'cli round, defence=' + name:<40} {tag:<8} {v['min']:>8.3f} / {v['median']:>7.3f}")
            lines.append(f"  fortress adds {100 * r['added_share']:.1f}% to the whole round ({start}; paired, median)")
            summary[f"{tag}:fortress:round_added:{r['init']}"] = r["added_share"]
        elif k == "eval":
            lim = line(f"eval, {r['users_evaluated']} users x {r['items']} items", r, r["seconds"], r["flops"], 0.0)
            summary[f"{tag}:eval"] = {"seconds": r["seconds"]["min"], "limit": lim}
        elif k == "central":
            sec = {"min": r["seconds"], "median": r["seconds"]}
            line(f"central, {r['batches']} batches (epoch ~{r['epoch_seconds_estimate']:.0f} s)", r, sec,
                 r["flops"], 0.0)
            summary[f"{tag}:central"] = {"interactions_per_s": r["interactions"] / r["seconds"]}
        elif k == "cli":
            lines.append(f"{'cli: steady round (fortress run)':<40} {tag:<8} {r['rounds_after_first']['min']:>8.3f} / "
                         f"{r['rounds_after_first']['median']:>7.3f}   first round {r['first_round']:.2f} s, "
                         f"final eval (valid + test + most popular) {r['final_eval_seconds']:.2f} s")
            summary[f"{tag}:cli"] = {"round": r["rounds_after_first"]["median"], "first": r["first_round"],
                                     "final_eval": r["final_eval_seconds"]}
        elif k == "scale":
            rule = "" if r.get("defence", "none") == "none" else f" {r['defence']}"
            lines.append(f"{'scale 1M x 100k, ' + str(r['clients']) + ' clients' + rule:<40} {tag:<8} "
                         f"{r['seconds']['min']:>8.3f} / {r['seconds']['median']:>7.3f} {'':>34} {r['peak_rss_mb']:>7.0f}"
                         f"  (RSS before the first round {r['rss_before_rounds_mb']:.0f} MB)")
    return lines, summary


def profile(args) -> None:
    """Per-op CPU profile (torch.profiler, self time) of one FedAvg and one FORTRESS round."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    torch.set_num_threads(args.threads)
    setup_process()
    ds = load_dataset(resolve(args.data))
    for mode in ("fedavg", "fortress"):
        cfg = override(Config(), {"mode": mode, "threads": args.threads})
        model = from_config(cfg)
        params = model.init(ds.n_items, torch.Generator().manual_seed(0))
        gopt, keys = GlobalOptimizer("sgd", 1.0), dense_keys(params)
        users = np.random.default_rng([0, 1]).choice(eligible_clients(ds), size=256, replace=False)

        def one():
            chunks = round_chunks(ds, cfg, users, 1)
            up = train_round(model, objective(cfg, ds.n_items), 1, cfg.lr, "sgd", params, chunks, cfg.engine)
            gopt.apply(params, keys, params["item_emb"], fedavg(up))
        one()                                                            # warm-up
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            one()
        text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40)
        path = Path(args.out_dir) / f"engine-profile-{mode}.txt"
        path.write_text(f"# command: python {' '.join(sys.argv)}\n# torch {torch.__version__}, {args.threads} "
                        f"thread(s), {args.data}, 256 clients, round 1 (after a warm-up round)\n{text}\n")
        print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per row (after 1 warm-up)")
    ap.add_argument("--loop-rounds", type=int, default=1, help="timed rounds of the (slow) loop engine")
    ap.add_argument("--eval-repeats", type=int, default=3)
    ap.add_argument("--central-batches", type=int, default=30)
    ap.add_argument("--cli-rounds", type=int, default=8)
    ap.add_argument("--scale", default="256,1024,4096", help="clients per round of the scale rows ('' = none)")
    ap.add_argument("--rule-scale", default="256,1024,4096",
                    help="clients per round of the robust rules' memory rows on the same synthetic federation")
    ap.add_argument("--rule-scale-rules", default="median,krum")
    ap.add_argument("--rows", default="pair,loop,defences,defround,eval,central,cli,scale")
    ap.add_argument("--defences", default="none,fortress,median,trimmed_mean,krum,multi_krum,norm_bound")
    ap.add_argument("--defence-init", metavar="RUN[,...]", default="rounds:30",
                    help="the defences and defround rows also start from each of these: a defended run's model and "
                         "monitor, or rounds:N (N defended rounds from scratch first)")
    ap.add_argument("--baseline", help="a checkout whose src/ the pair, loop, eval and cli rows also run on")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--out", default="docs/bench/engine.json")
    ap.add_argument("--profile", action="store_true", help="write per-op profiles instead of the table")
    ap.add_argument("--out-dir", default="docs/bench")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    if args.profile:
        profile(args)
        return
    base = dict(s.split("=", 1) for s in args.set)
    groups = args.rows.split(",")
    from fortress.server.defences import DEFENCES      # a bad name fails here, not after the rows before it ran
    for flag, names in (("--defences", args.defences), ("--rule-scale-rules", args.rule_scale_rules)):
        bad = [n for n in names.split(",") if n and n not in DEFENCES]
        if bad:
            sys.exit(f"engine.py: {flag} {','.join(bad)}: not a defence; choose from {', '.join(DEFENCES)}")
    known = ("pair", "loop", "defences", "defround", "eval", "central", "cli", "scale", "rulescale")
    if any(g not in known for g in groups):
        sys.exit(f"engine.py: --rows {args.rows}: rows are {', '.join(known)}")
    inits = [None] + (args.defence_init.split(",") if args.defence_init else [])
    common = {"data": args.data, "threads": args.threads, "config": base}
    codes = [None] + ([args.baseline] if args.baseline else [])
    rows = []
    rates = {t: run_row({**common, "kind": "machine", "threads": t})["machine"] for t in sorted({1, os.cpu_count()})}
    for g in groups:
        specs = {
            "pair": [{"kind": "pair", "modes": ["fedavg", "fortress"], "clients": 256, "rounds": args.rounds}],
            "loop": [{"kind": "pair", "modes": ["fedavg"], "clients": 256, "rounds": args.loop_rounds,
                      "config": {**base, "engine": "loop"}}],
            "defences": [{"kind": "defences", "clients": 256, "rounds": args.rounds,
                          "defences": args.defences.split(","), "init": init} for init in inits],
            "defround": [{"kind": "defence_round", "clients": 256, "rounds": args.cli_rounds, "init": init}
                         for init in inits],
            "eval": [{"kind": "eval", "repeats": args.eval_repeats}],
            "central": [{"kind": "central", "batches": args.central_batches}],
            "cli": [{"kind": "cli", "rounds": args.cli_rounds}],
            "scale": [{"kind": "scale", "data": "synthetic", "users": 1_000_000, "items": 100_000, "clients": c,
                       "rounds": 1} for c in (int(c) for c in args.scale.split(",") if c)],
            "rulescale": [{"kind": "scale", "data": "synthetic", "users": 1_000_000, "items": 100_000, "clients": c,
                           "rounds": 0, "config": {**base, "defence": rule}}
                          for rule in args.rule_scale_rules.split(",") for c in (int(c) for c in args.rule_scale.split(",") if c)],
        }[g]
        for spec in specs:
            for src in (codes if g in ("pair", "loop", "eval", "cli") else [None]):
                row = run_row({**common, **spec}, src)
                if g == "loop":
                    row["engine"] = "loop"
                rows.append(row)
                print(f"  done {g} ({row['code']})", file=sys.stderr)
    lines, summary = table(rows)
    if "this:fedavg:vmap" in summary and "this:fortress:vmap" in summary:
        summary["fortress_over_fedavg"] = summary["this:fortress:vmap"]["seconds"] / summary["this:fedavg:vmap"]["seconds"]
        lines.append(f"FORTRESS round / FedAvg round: {summary['fortress_over_fedavg']:.2f}x (target <= 2x)")
    if "this:fedavg:vmap" in summary and "this:central" in summary:
        summary["federated_over_central_throughput"] = (summary["this:fedavg:vmap"]["interactions_per_s"]
                                                        / summary["this:central"]["interactions_per_s"])
        lines.append(f"federated / central throughput (interactions/s): "
                     f"{summary['federated_over_central_throughput']:.2f} (target >= 0.5)")
    for tag in ("this", "baseline"):
        if f"{tag}:fedavg:vmap" in summary and f"{tag}:fedavg:loop" in summary:
            summary[f"{tag}:vmap_over_loop"] = summary[f"{tag}:fedavg:loop"]["seconds"] / summary[f"{tag}:fedavg:vmap"]["seconds"]
            lines.append(f"{tag}: vectorised engine {summary[f'{tag}:vmap_over_loop']:.1f}x the per-client loop")
    lines.insert(0, "machine: " + ", ".join(f"{t} thread(s) sgemm {m['sgemm_flops'] / 1e9:.0f} GFLOP/s, copy "
                                            f"{m['copy_bytes_per_s'] / 1e9:.1f} GB/s" for t, m in rates.items())
                 + f"; rows run at {args.threads} thread(s), each measures its own rate (limit = roofline)")
    print("\n".join(lines))
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "device": "cpu",
            "command": "python " + " ".join(sys.argv), "load_average_at_end": os.getloadavg(),
            "rates": {str(t): m for t, m in rates.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "table": lines, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
