"""Mean +- std (over seeds) of the FORTRESS grid: python experiments/fortress_table.py OUT_ROOT [--split test]."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROWS = ["fedavg-sasrec", "fortress-sasrec", "fedavg-gru4rec", "fortress-gru4rec", "fortress-sasrec-no-seq_view",
        "fortress-sasrec-no-user_view", "fortress-sasrec-no-item_view", "fortress-sasrec-no-temporal"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--split", default="test", choices=("valid", "test"))
    args = ap.parse_args()
    root = Path(args.root)
    names = ROWS + sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ROWS)
    print(f"| run | seeds | start | rounds | {args.split} HR@10 | {args.split} NDCG@10 | s/round |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        res = [json.loads(p.read_text()) for p in sorted((root / name).glob("s*/results.json"))]
        if not res:
            continue
        hr = np.array([r[args.split]["HR@10"] for r in res])
        nd = np.array([r[args.split]["NDCG@10"] for r in res])
        sec = np.mean([r["timing"]["seconds_per_round"] for r in res])
        std = (lambda a: a.std(ddof=1) if len(a) > 1 else float("nan"))
        start = res[0]["config"].get("init_from") or "scratch"
        print(f"| {name} | {len(res)} | {start} | {res[0]['config']['rounds']} | {hr.mean():.4f} ± {std(hr):.4f} | "
              f"{nd.mean():.4f} ± {std(nd):.4f} | {sec:.2f} |")


if __name__ == "__main__":
    main()
