"""Attack grid: HR@10 and ER@K of each attack at each malicious ratio, mean +- std over seeds.

    python bench/attacks.py [--data amazon-cell-phones] [--seeds 0,1,2] [--ratios 0.001,0.01,0.05]
                            [--attacks none,random,popular,boost,ahum,psmu] [--pretrain 1500 | --pretrained RUN]
                            [--rounds 100] [--eval-every 20] [--jobs 1] [--runs runs/attacks]
                            [--out docs/bench/attacks.json]

Protocol (cheap and realistic: attackers join a federation that is already running):
1. per seed, one clean FedAvg model is trained for `--pretrain` rounds:
   `fortress run --data D --out RUNS/pretrain-s{seed} --set rounds=P --set seed={seed} ...`;
   or `--pretrained RUN` (a `fortress run` output folder with model.pt on the same data) is the
   clean model of every seed, and nothing is pretrained (the seed then varies the targets, the
   malicious ids and the sampling, not the clean model);
2. every cell continues from that model for `--rounds` rounds, with the attack (or none):
   `fortress run --data D --out RUNS/{attack}-r{ratio}-s{seed} --set init_from=RUNS/pretrain-s{seed}
    --set rounds=R --set attack={attack} --set attack_ratio={ratio} --set seed={seed} ...`.
   The seed fixes the targets (the same for every attack), the malicious ids and the sampling.
`none` does not depend on the ratio and runs once per seed. Every run is a `fortress run`
subprocess with one torch thread, `--jobs` at a time; a run whose results.json exists is not run
again (resumable).
The table reports final test HR@10, ER@5, ER@10 and the mean ER@10 over the last 5 evaluations
(ER swings from round to round), each as mean +- std over seeds, with the command of each row.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fortress.report import std


def fortress(data: str, out: Path, sets: dict) -> list[str]:
    cmd = [sys.executable, "-m", "fortress.cli", "run", "--data", data, "--out", str(out), "--quiet"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def shown(cmd: list[str]) -> str:
    """The command as a user types it (`fortress` entry point, the seed as a placeholder)."""
    return " ".join(["fortress", *cmd[3:]]).replace(" --quiet", "")


def run_once(cmd: list[str], out: Path, log: Path) -> dict:
    res = out / "results.json"
    if not res.exists():
        t0 = time.time()
        with log.open("a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); see {log}")
        print(f"  {out.name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(res.read_text())


def mean_std(xs: list[float]) -> str:
    """mean ± sample standard deviation over seeds (`fortress.report.std`, ddof 1); one seed: its value alone."""
    return f"{np.mean(xs):.4f} ± {std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def markdown(rows: list[dict]) -> str:
    """The table as README markdown (a run that diverged shows as NaN: the global model broke)."""
    lines = ["| attack | ratio | malicious | HR@10 | ER@5 | ER@10 | ER@10, mean of last 5 evals | uploads rejected |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["attack"] == "none" else f"{r['attack_ratio']:g}"
        lines.append(f"| {r['attack']} | {ratio} | {r['malicious_clients']} | {mean_std(r['HR@10'])} | "
                     f"{mean_std(r['ER@5'])} | {mean_std(r['ER@10'])} | {mean_std(r['ER@10_last5'])} | "
                     f"{sum(r['malicious_rejected'])} of {sum(r['malicious_uploads'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="0.001,0.01,0.05")
    ap.add_argument("--attacks", default="none,random,popular,boost,ahum,psmu")
    ap.add_argument("--pretrain", type=int, default=1500, help="clean FedAvg rounds before the attack")
    ap.add_argument("--pretrained", help="a clean `fortress run` folder (model.pt) to attack instead of pretraining")
    ap.add_argument("--rounds", type=int, default=100, help="rounds with attackers, from the clean model")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config for every run")
    ap.add_argument("--runs", default="runs/attacks")
    ap.add_argument("--out", default="docs/bench/attacks.json")
    ap.add_argument("--report", action="store_true", help="only print the tables of an existing --out JSON")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.out).read_text())["rows"]))
        return
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "log.txt"
    seeds = [int(s) for s in args.seeds.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.attacks.split(",")
    extra = dict(s.split("=", 1) for s in args.set)
    common = {"threads": 1, **extra}

    commands: dict[tuple[str, float], str] = {}
    jobs = []                                   # ((attack, ratio), command, out) of every cell
    for seed in seeds:
        if args.pretrained:
            pre = Path(args.pretrained).resolve()
            if not (pre / "model.pt").exists():
                raise SystemExit(f"--pretrained {args.pretrained}: no model.pt there")
            commands[("pretrain", 0.0)] = f"(none: --pretrained {pre})"
        else:
            pre = runs / f"pretrain-s{seed}"
            cmd = fortress(args.data, pre, {"mode": "fedavg", "rounds": args.pretrain, "eval_every": 0, "seed": seed,
                                            **common})
            run_once(cmd, pre, log)
            commands[("pretrain", 0.0)] = shown(cmd).replace(f"seed={seed}", "seed=SEED").replace(f"-s{seed}", "-sSEED")
        for name in names:
            for ratio in ([0.0] if name == "none" else ratios):
                out = runs / f"{name}-r{ratio:g}-s{seed}"
                sets = {"mode": "fedavg", "init_from": pre, "rounds": args.rounds, "eval_every": args.eval_every,
                        "seed": seed, "attack": name, **({"attack_ratio": ratio} if name != "none" else {}),
                        **common}
                cmd = fortress(args.data, out, sets)
                jobs.append(((name, ratio), cmd, out))
                commands[(name, ratio)] = shown(cmd).replace(f"seed={seed}", "seed=SEED").replace(f"-s{seed}", "-sSEED")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results_ = list(pool.map(lambda j: run_once(j[1], j[2], log), jobs))
    cells: dict[tuple[str, float], list[dict]] = {}
    for (key, _, _), res in zip(jobs, results_):
        cells.setdefault(key, []).append(res)

    rows = []
    for (name, ratio), results in cells.items():
        att = [r["attack"] for r in results]
        rows.append({
            "attack": name, "attack_ratio": ratio, "seeds": [r["config"]["seed"] for r in results],
            "malicious_clients": att[0]["malicious_clients"],
            "HR@10": [r["test"]["HR@10"] for r in results], "NDCG@10": [r["test"]["NDCG@10"] for r in results],
            **{k: [a[k] for a in att] for k in ("ER@5", "ER@10", "ER@20")},
            "ER@10_last5": [a["last5_mean"]["ER@10"] for a in att],
            "ER@5_last5": [a["last5_mean"]["ER@5"] for a in att],
            "targets": [a["targets"] for a in att],
            "attack_seconds_per_round": [a["seconds_per_round"] for a in att],
            "malicious_uploads": [a["malicious_uploads"] for a in att],
            "malicious_rejected": [a.get("malicious_rejected", 0) for a in att],
            "seconds_per_round": [r["timing"]["seconds_per_round"] for r in results],
            "command": commands[(name, ratio)],
        })
    print(f"\n{'attack':<8} {'ratio':>6} {'mal.':>5} {'HR@10':>17} {'ER@5':>17} {'ER@10':>17} "
          f"{'ER@10 last 5':>17} {'atk s/rnd':>9}")
    for r in rows:
        print(f"{r['attack']:<8} {r['attack_ratio']:>6g} {r['malicious_clients']:>5} {mean_std(r['HR@10']):>17} "
              f"{mean_std(r['ER@5']):>17} {mean_std(r['ER@10']):>17} {mean_std(r['ER@10_last5']):>17} "
              f"{np.mean(r['attack_seconds_per_round']):>9.3f}")
    print("\ncommands (SEED in " + args.seeds + "):")
    print(f"  pretrain: {commands[('pretrain', 0.0)]}")
    for r in rows:
        print(f"  {r['attack']} {r['attack_ratio']:g}: {r['command']}")
    print("\n" + markdown(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "command": " ".join(sys.argv), "data": args.data,
            "pretrain_rounds": None if args.pretrained else args.pretrain, "pretrained": args.pretrained, "attack_rounds": args.rounds, "eval_every": args.eval_every, "jobs": args.jobs,
            "pretrain_command": commands[("pretrain", 0.0)]}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
