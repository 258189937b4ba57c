"""What a main-table round costs on a GPU against the CPU (one thread, as the main table's cells run), paired in one run.

    python bench/device.py [--data amazon-cell-phones] [--rounds 10] [--threads 1] [--out docs/bench/device.json]

For each row (the main table's methods, clean and under A-hum at 1%), `fortress run`'s own loop (`simulate.run`)
trains `--rounds` rounds with the main table's settings, once with `device=cpu` and once with `device=cuda`, and
evaluates once at the end (full ranking of every user); the rows alternate the two devices, after a one-round
run on each that warms them up. Reported: seconds a
round (train_seconds / rounds, so the first round's start-up is in it), the final evaluation's seconds, and a
1,500-round cell with 15 evaluations projected from them (ratio = CPU / GPU). The FORTRESS defence, the attacks and
the upload checks run on the CPU by design (docs/results/engine.md#device), so their share is not sped up.
Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

from fortress.config import Config, override
from fortress.data import load_dataset, resolve
from fortress.simulate import run

ROWS = {
    "FedAvg-SASRec": dict(objective="next_item", backbone="sasrec"),
    "FedAvg-GRU4Rec": dict(objective="next_item", backbone="gru4rec"),
    "FORTRESS-SASRec": dict(objective="fortress", backbone="sasrec", defence="fortress"),
    "FORTRESS-GRU4Rec": dict(objective="fortress", backbone="gru4rec", defence="fortress"),
}
ATTACKS = {"no attack": dict(attack="none"), "A-hum 1%": dict(attack="ahum", attack_ratio=0.01)}


def one(cfg: Config, ds) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = run(cfg, ds, out, progress=False)
        wall = time.perf_counter() - t0
    t = res["timing"]
    return {"seconds_per_round": t["seconds_per_round"], "final_eval_seconds": t["final_eval_seconds"],
            "wall_seconds": wall, "test_HR@10": res["test"]["HR@10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/device.py: torch sees no CUDA device")
    ds = load_dataset(resolve(args.data))
    warm = override(Config(), {"threads": str(args.threads), "rounds": "1", "eval_every": "0"})
    for dev in ("cpu", "cuda"):            # imports, kernels and allocators warmed before the first timed row
        one(override(warm, {"device": dev}), ds)
    rows = []
    for name in args.rows.split(","):
        for attack, asets in ATTACKS.items():
            base = override(Config(), {"threads": str(args.threads), "rounds": str(args.rounds), "eval_every": "0",
                                       **{k: str(v) for k, v in {**ROWS[name], **asets}.items()}})
            got = {dev: one(override(base, {"device": dev}), ds) for dev in ("cpu", "cuda")}
            cell = {dev: 1500 * g["seconds_per_round"] + 16 * g["final_eval_seconds"] for dev, g in got.items()}
            rows.append({"method": name, "attack": attack, **{f"{dev}": g for dev, g in got.items()},
                         "cell_minutes": {dev: c / 60 for dev, c in cell.items()},
                         "ratio_round": got["cpu"]["seconds_per_round"] / got["cuda"]["seconds_per_round"],
                         "ratio_cell": cell["cpu"] / cell["cuda"]})
            r = rows[-1]
            print(f"{name:17s} {attack:10s} round cpu {got['cpu']['seconds_per_round']:.3f}s cuda "
                  f"{got['cuda']['seconds_per_round']:.3f}s ({r['ratio_round']:.1f}x)  eval cpu "
                  f"{got['cpu']['final_eval_seconds']:.2f}s cuda {got['cuda']['final_eval_seconds']:.2f}s  cell "
                  f"{r['cell_minutes']['cpu']:.1f} -> {r['cell_minutes']['cuda']:.1f} min ({r['ratio_cell']:.1f}x)",
                  flush=True)
    info = {"data": args.data, "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0), "cpu": platform.processor() or platform.machine(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
