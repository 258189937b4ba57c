"""Cost per round of the same federated work three ways: in-process, Flower simulation, deployment.

Not a test. The same config (seed, data, clients per round, model) runs
  1. in-process:      fortress run (vectorised clients, one process)
  2. flwr simulation: a simulation SuperLink, `flwr run`, Ray with N virtual SuperNodes
  3. deployment:      a SuperLink + N SuperNode processes on loopback, TLS + SuperNode auth
and the table gives seconds per round (server's view: broadcast -> all replies -> aggregate),
the wall time of the whole command, and whether the final models agree; a second table, what the
final evaluation (valid + test, full ranking) cost: in-process over the data, under Flower on the
nodes (the server has no data), with the bytes each way and the largest metric difference.

    .venv/bin/python bench/flower.py --data amazon-cell-phones --rounds 5 --clients 128 --nodes 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fortress.flower.deploy import ENV, deploy_demo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--out", default="bench/results/flower")
    args = ap.parse_args()
    os.environ.update(ENV)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = {"rounds": args.rounds, "clients_per_round": args.clients, "eval_every": 0, "threads": 1,
              "dropout": 0.0, "dtype": "float64"}
    rows = []

    t0 = time.perf_counter()
    sets = [a for k, v in common.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "fortress.cli", "run", "--data", args.data, "--out", str(out / "inprocess"),
                    "--quiet", "--overwrite", *sets], check=True, stdout=subprocess.DEVNULL)
    rows.append(("in-process (fortress run)", out / "inprocess", time.perf_counter() - t0))

    kebab = {k.replace("_", "-"): v for k, v in common.items()}
    for name, sim in (("flwr run, simulation (Ray)", True), ("deployment, TLS + auth", False)):
        t0 = time.perf_counter()
        folder = out / ("simulation" if sim else "deployment")
        res = deploy_demo(folder, args.nodes, {**kebab, "data": args.data}, simulation=sim, cpus=2)
        rows.append((f"{name}, {args.nodes} nodes", res, time.perf_counter() - t0))

    ref = torch.load(rows[0][1] / "model.pt", weights_only=False)["params"]
    ref_res = json.loads((rows[0][1] / "results.json").read_text())
    table, record, evals = [], [], []
    for name, folder, wall in rows:
        res = json.loads((folder / "results.json").read_text())
        p = torch.load(folder / "model.pt", weights_only=False)["params"]
        diff = max(float((p[k] - ref[k]).abs().max()) for k in ref)
        sec = [h["seconds"] for h in res["history"]]
        record.append({"name": name, "seconds_per_round": sec, "wall_seconds": wall, "max_param_diff": diff,
                       "test": res["test"]})
        table.append(f"| {name:<36} | {sum(sec) / len(sec):>8.2f} | {min(sec):>6.2f} | {wall:>7.1f} | "
                     f"{res['test']['HR@10']:.4f} | {diff:.1e} |")
        fe = res.get("federated_eval")
        mdiff = max(abs(res[split][k] - ref_res[split][k]) for split in ("valid", "test") for k in ref_res[split]
                    if k != "users")
        if fe is None:
            evals.append(f"| {name:<36} | {res['timing']['final_eval_seconds']:>7.2f} | – | – | {mdiff:.1e} |")
        else:
            secs = sum(e["seconds"] for e in fe["log"])
            down, up = sum(e["bytes_down"] for e in fe["log"]), sum(e["bytes_up"] for e in fe["log"])
            evals.append(f"| {name:<36} | {secs:>7.2f} | {down / 1e6:.2f} MB | {up} B | {mdiff:.1e} |")
        record[-1]["federated_eval"] = fe
        record[-1]["final_eval_seconds"] = res["timing"]["final_eval_seconds"]
    head = (f"| {'how (' + args.data + ', ' + str(args.clients) + ' clients/round)':<36} | s/round | min s | wall s "
            f"| HR@10  | max |Δ param| |\n|{'-' * 38}|---------:|-------:|--------:|--------|----------|")
    load = os.getloadavg()
    print(head)
    print("\n".join(table))
    print()
    print(f"| final evaluation (valid + test) | seconds | bytes to nodes | bytes from nodes | max |Δ metric| |\n"
          f"|{'-' * 38}|--------:|------:|------:|------:|")
    print("\n".join(evals))
    print(f"load average during the run (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    (out / "flower.json").write_text(json.dumps({"args": vars(args), "config": common, "rows": record,
                                                 "loadavg": load}, indent=1))


if __name__ == "__main__":
    main()
