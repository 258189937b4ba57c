"""Defence grid of the adaptive-attack pages: HR@10, NDCG@10, ER@5, ER@10 of each server defence under each
attack, mean +- std over seeds, with the columns docs/results/adaptive.md needs (the data-poisoning floor and
the verdict against it, the update weight kept per kind of client, the rounds with the target flagged) and
attack:defence pairs left out (--skip). It runs experiments/adaptive_grid.sh; every other grid is a spec
file run by `fortress experiment` (the plain defence table of docs/results/defences.md: experiments/defences.toml).

    python bench/defences.py --init runs/cell/fedavg-sasrec [--data amazon-cell-phones] [--seeds 0,1,2]
                             [--attacks ahum,psmu] [--ratios 0.01,0.05]
                             [--defences none,median,trimmed_mean,krum,norm_bound,fortress] [--full]
                             [--rounds 100] [--eval-every 20] [--jobs 2] [--runs runs/defences]
                             [--out docs/bench/defences.json]
    python bench/defences.py --report --out JSON [--into docs/results/adaptive.md:NAME]

Protocol: every cell continues a clean FedAvg model
(`--init`, or per seed a `--pretrain`-round FedAvg run) for `--rounds` rounds:
`fortress run --data D --out RUNS/{attack}-r{ratio}-{defence}-s{seed} --set init_from=INIT
 --set rounds=R --set attack={attack} --set attack_ratio={ratio} --set defence={defence} --set seed={seed} ...`.
The seed fixes the targets (the same for every attack and defence), the malicious ids and the
sampling. A clean block (attack none) gives each defence's accuracy without attack, to compare
with `none` (the acceptance bound is 2% relative). `--full` adds the full method (objective=fortress,
defence=fortress). Every run is a `fortress run` subprocess with one torch thread, `--jobs` at a
time; a run whose results.json exists is not run again (resumable).
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

from fortress.experiments.report import mean_std as report_mean_std
from fortress.experiments.runner import defence_digest

FULL = "fortress+mode"    # the full method: FORTRESS clients (objective=fortress) and the FORTRESS server


def fortress(data: str, out: Path, sets: dict) -> list[str]:
    cmd = [sys.executable, "-m", "fortress.cli", "run", "--data", data, "--out", str(out), "--quiet"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def shown(cmd: list[str]) -> str:
    """The command as a user types it (`fortress` entry point)."""
    return " ".join(["fortress", *cmd[3:]]).replace(" --quiet", "")


def run_once(cmd: list[str], out: Path, log: Path) -> dict:
    """Run a cell unless its results.json exists (resumable); its results."""
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
    """mean ± sample standard deviation over seeds, as in every report; one seed: its value alone."""
    return report_mean_std(xs, len(xs))


def nan_if_none(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def avg(xs: list[float]) -> float:
    """Mean over the seeds that have a value (nan when none has)."""
    xs = [x for x in xs if not np.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def cell_sets(attack: str, ratio: float, defence: str) -> dict:
    objective = "fortress" if defence == FULL else "next_item"
    sets = {"objective": objective, "attack": attack, "defence": "fortress" if defence == FULL else defence}
    if attack != "none":
        sets["attack_ratio"] = ratio
    return sets


def fortress_log(row: dict) -> str:
    """Share of attacked rounds with a target flagged (FORTRESS rows)."""
    flagged = avg(row.get("rounds_target_flagged", []))
    return "" if row["attack"] == "none" or np.isnan(flagged) else f"{100 * flagged:.0f}%"


def weights(row: dict) -> str:
    """Mean share of their update kept by benign, short benign (<= 5 interactions) and malicious clients."""
    if row["defence"] == "none":
        return ""
    vals = [avg(row.get(k, [])) for k in ("weight_benign", "weight_short", "weight_malicious")]
    return " / ".join("–" if np.isnan(v) else f"{v:.3f}" for v in vals)


def floors(rows: list[dict]) -> dict[float, float]:
    """Per ratio: the data-poisoning floor, the larger mean ER@10 (last evals) of `random` and `popular`
    with no defence (fake users training honestly on sequences that hold the target)."""
    out: dict[float, float] = {}
    for r in rows:
        if r["attack"] in ("random", "popular") and r["defence"] == "none":
            out[r["attack_ratio"]] = max(out.get(r["attack_ratio"], 0.0), float(np.mean(r["ER@10_last5"])))
    return out


def verdict(r: dict, floor: dict[float, float]) -> str:
    """'yes' when the cell's mean ER@10 (last evals) is within the data-poisoning floor + 0.02."""
    if r["attack"] == "none" or r["attack_ratio"] not in floor:
        return ""
    return "yes" if np.mean(r["ER@10_last5"]) <= floor[r["attack_ratio"]] + 0.02 else "**no**"


def markdown(rows: list[dict], clean: dict[str, list[float]]) -> str:
    floor = floors(rows)
    lines = ["| attack | ratio | defence | HR@10 | NDCG@10 | ER@5 | ER@10 | ER@10, mean of last evals | "
             "<= floor + 0.02 | weight kept: benign / short benign / malicious | rounds target flagged |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["attack"] == "none" else f"{r['attack_ratio']:g}"
        extra = ""
        if r["attack"] == "none" and r["defence"] != "none" and "none" in clean:
            extra = f" ({100 * (np.mean(r['HR@10']) / np.mean(clean['none']) - 1):+.1f}% vs none)"
        lines.append(f"| {r['attack']} | {ratio} | {r['defence']} | {mean_std(r['HR@10'])}{extra} | "
                     f"{mean_std(r['NDCG@10'])} | {mean_std(r['ER@5'])} | {mean_std(r['ER@10'])} | "
                     f"{mean_std(r['ER@10_last5'])} | {verdict(r, floor)} | {weights(r)} | {fortress_log(r)} |")
    return "\n".join(lines)


def replace_table(doc: Path, name: str, table: str) -> None:
    """Replace the markdown table right after the line `<!-- TABLE name -->` in `doc` (the results
    pages keep their generated tables between such markers, so `--report --into` regenerates them)."""
    lines = doc.read_text().split("\n")
    marker = f"<!-- TABLE {name} -->"
    if marker not in lines:
        sys.exit(f"error: {doc}: no line {marker!r}")
    start = lines.index(marker) + 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    doc.write_text("\n".join(lines[:start] + table.rstrip("\n").split("\n") + lines[end:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--init", default="", help="clean FedAvg run every cell starts from (default: pretrain per seed)")
    ap.add_argument("--pretrain", type=int, default=1500, help="without --init: clean FedAvg rounds per seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--attacks", default="ahum,psmu")
    ap.add_argument("--ratios", default="0.01,0.05")
    ap.add_argument("--defences", default="none,median,trimmed_mean,krum,norm_bound,fortress")
    ap.add_argument("--full", action="store_true", help="also the full method (objective=fortress, defence=fortress)")
    ap.add_argument("--no-clean", action="store_true", help="skip the attack-free block")
    ap.add_argument("--skip", default="", help="attack:defence pairs not to run, e.g. adaptive:none (= ahum)")
    ap.add_argument("--rounds", type=int, default=100, help="rounds from the clean model")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config for every run")
    ap.add_argument("--runs", default="runs/defences")
    ap.add_argument("--out", default="docs/bench/defences.json")
    ap.add_argument("--report", action="store_true", help="only print the table of an existing --out JSON")
    ap.add_argument("--into", metavar="FILE.md:NAME",
                    help="with --report: also replace the table after `<!-- TABLE NAME -->` in FILE.md")
    args = ap.parse_args()
    if args.report:
        blob = json.loads(Path(args.out).read_text())
        table = markdown(blob["rows"], blob["clean_hr"])
        print(table)
        if args.into:
            doc, name = args.into.rsplit(":", 1)
            replace_table(Path(doc), name, table)
            print(f"rewrote the table {name!r} in {doc}")
        return
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / "log.txt"
    seeds = [int(s) for s in args.seeds.split(",")]
    defs = args.defences.split(",") + ([FULL] if args.full else [])
    common = {"threads": 1, **dict(s.split("=", 1) for s in args.set)}
    blocks = ([] if args.no_clean else [("none", 0.0)]) + [
        (a, float(r)) for a in args.attacks.split(",") for r in args.ratios.split(",")]

    init = {}
    for seed in seeds:
        if args.init:
            init[seed] = args.init
            continue
        pre = runs / f"pretrain-s{seed}"
        run_once(fortress(args.data, pre, {"rounds": args.pretrain, "eval_every": 0,
                                           "seed": seed, **common}), pre, log)
        init[seed] = str(pre)
    skip = {tuple(p.split(":")) for p in args.skip.split(",") if p}
    jobs = []
    for attack, ratio in blocks:
        for d in [d for d in defs if (attack, d) not in skip]:
            for seed in seeds:
                tag = f"{attack}-r{ratio:g}-{d}-s{seed}" if attack != "none" else f"clean-{d}-s{seed}"
                sets = {**cell_sets(attack, ratio, d), "init_from": init[seed], "rounds": args.rounds,
                        "eval_every": args.eval_every, "seed": seed, **common}
                jobs.append(((attack, ratio, d), fortress(args.data, runs / tag, sets), runs / tag))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: run_once(j[1], j[2], log), jobs))

    cells: dict[tuple, list[dict]] = {}
    commands: dict[tuple, str] = {}
    for (key, cmd, _), res in zip(jobs, results):
        cells.setdefault(key, []).append(res)
        seed = res["config"]["seed"]
        commands[key] = shown(cmd).replace(f"seed={seed}", "seed=SEED").replace(f"-s{seed}", "-sSEED")
    rows = []
    for (attack, ratio, d), res in cells.items():
        att = [r["attack"] for r in res]
        digests = [defence_digest(r["history"]) or {} for r in res]      # {} without a defence: every value nan
        kept = {k: [nan_if_none(d.get(k)) for d in digests] for k in ("weight_benign", "weight_short", "weight_malicious")}
        flagged = [nan_if_none(d.get("rounds_target_flagged")) / d.get("rounds", 1) for d in digests]
        rows.append({
            "attack": attack, "attack_ratio": ratio, "defence": d, "seeds": [r["config"]["seed"] for r in res],
            "HR@10": [r["test"]["HR@10"] for r in res], "NDCG@10": [r["test"]["NDCG@10"] for r in res],
            **{k: [a[k] for a in att] for k in ("ER@5", "ER@10", "ER@20")},
            "ER@10_last5": [a["last5_mean"]["ER@10"] for a in att],
            **kept, "rounds_target_flagged": flagged,
            "seconds_per_round": [r["timing"]["seconds_per_round"] for r in res],
            "command": commands[(attack, ratio, d)],
        })
    clean = {r["defence"]: r["HR@10"] for r in rows if r["attack"] == "none"}
    print(f"\n{'attack':<6} {'ratio':>6} {'defence':<14} {'HR@10':>17} {'NDCG@10':>17} {'ER@5':>17} {'ER@10':>17} "
          f"{'w mal':>6} {'flagged':>7} {'s/rnd':>6}")
    for r in rows:
        print(f"{r['attack']:<6} {r['attack_ratio']:>6g} {r['defence']:<14} {mean_std(r['HR@10']):>17} "
              f"{mean_std(r['NDCG@10']):>17} {mean_std(r['ER@5']):>17} {mean_std(r['ER@10']):>17} "
              f"{avg(r.get('weight_malicious', [])):>6.2f} {avg(r['rounds_target_flagged']):>7.2f} "
              f"{np.mean(r['seconds_per_round']):>6.2f}")
    print("\ncommands (SEED in " + args.seeds + "):")
    for r in rows:
        print(f"  {r['attack']} {r['attack_ratio']:g} {r['defence']}: {r['command']}")
    print("\n" + markdown(rows, clean))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "command": " ".join(sys.argv), "data": args.data,
            "init": args.init, "rounds": args.rounds, "eval_every": args.eval_every}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "clean_hr": clean}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
