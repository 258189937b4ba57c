"""What PSMU's attack step costs, and how much of it was torch.multinomial (attacks.base.draw replaced it).

PSMU samples `attack_pool` plausible histories per malicious client from the broadcast model, one item at a time
(`psmu.sample_histories`). It drew each item with torch.multinomial(p, 1), which draws an exponential for every
catalogue entry; `attacks.base.draw` draws one uniform per row against the cumulative probabilities (the same
distribution). This times the whole attack step of one round, both ways alternately on the same rounds (a model
at its initialisation; the step's cost does not depend on the weights), at the malicious clients a round holds at
`--ratio` (the simulator's share of `clients_per_round`), and checks that the two samplers give the same
distribution of items on a row of 200 (total variation over 200,000 draws).

  python bench/psmu_step.py [--data amazon-cell-phones] [--ratio 0.05] [--rounds 6] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fortress.attacks import base, psmu
from fortress.attacks.base import AttackConfig, AttackView
from fortress.config import Config, override
from fortress.data import load_dataset, resolve
from fortress.models import from_config


def multinomial(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The sampler PSMU used before `base.draw`."""
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="amazon-cell-phones")
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = override(Config(), {"threads": 1, "attack": "psmu", "attack_ratio": args.ratio})
    ds = load_dataset(resolve(args.data))
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0))
    m = max(1, round(args.ratio * cfg.clients_per_round))
    targets = torch.arange(1, 2)
    sec: dict[str, list[float]] = {"multinomial": [], "draw": []}
    for r in range(args.rounds):
        view = AttackView(model, params, ds.n_items, targets, torch.arange(m), AttackConfig.from_config(cfg), (0, r), r)
        for name in ("draw", "multinomial") if r % 2 else ("multinomial", "draw"):
            psmu.draw = multinomial if name == "multinomial" else base.draw
            t0 = time.perf_counter()
            psmu.attack(view)
            sec[name].append(time.perf_counter() - t0)
    psmu.draw = base.draw
    row = torch.randn(1, 201, generator=torch.Generator().manual_seed(1)) * 3     # 200 items and the padding id
    row[0, 0] = float("-inf")
    counts = {}
    for name, fn in (("multinomial", multinomial), ("draw", base.draw)):
        gen = torch.Generator().manual_seed(2)
        x = fn(row.expand(200000, -1), gen).squeeze(1)
        counts[name] = torch.bincount(x, minlength=201).double() / len(x)
    tv = float((counts["multinomial"] - counts["draw"]).abs().sum() / 2)
    noise = float((counts["multinomial"] - row.softmax(-1)[0].double()).abs().sum() / 2)
    med = {k: float(np.median(v)) for k, v in sec.items()}
    print(f"{args.data}, {m} malicious clients a round ({args.ratio:g} of {cfg.clients_per_round}), pool "
          f"{cfg.attack_pool}, one thread: PSMU's attack step {med['multinomial']:.3f} s with torch.multinomial, "
          f"{med['draw']:.3f} s with base.draw (median of {args.rounds}); ratio {med['multinomial'] / med['draw']:.2f}. "
          f"Item distribution on a row of 200 items, 200,000 draws: total variation {tv:.4f} between the two samplers "
          f"({noise:.4f} between multinomial and the exact softmax)")
    assert tv < 2 * noise + 0.02, "the two samplers differ"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"data": args.data, "ratio": args.ratio, "malicious_per_round": m, "seconds": sec, "median": med,
                       "speedup": med["multinomial"] / med["draw"], "total_variation": tv, "tv_multinomial_exact": noise,
                       "command": "python bench/psmu_step.py " +
                       " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None)}, f, indent=1)


if __name__ == "__main__":
    main()
