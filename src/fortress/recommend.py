"""Use a saved run: top-K unseen items for a user, with original item ids."""
from __future__ import annotations

from pathlib import Path

import torch

from fortress import config as config_mod
from fortress.errors import InputError
from fortress.models import from_config


def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise InputError(f"{path}: no saved model (is {run_dir} the --out folder of `fortress run`?)")
    try:
        return torch.load(path, weights_only=False)
    except Exception as err:   # a truncated or foreign file: say which, not a pickle traceback
        raise InputError(f"{path}: cannot read saved model ({type(err).__name__}: {err})") from None


def recommend(run_dir: str | Path, user: str, k: int = 10) -> list[str]:
    """Lines 'rank  item  [name]  score' for the user's top-k items not in their known sequence."""
    if k < 1:
        raise InputError(f"-k {k}: must be >= 1")
    blob = load_run(run_dir)
    cfg = config_mod.from_dict(blob["config"])
    user_ids = blob["user_ids"]
    index = {u: i for i, u in enumerate(user_ids)}
    index.update({name: index[uid] for uid, name in blob["user_names"].items() if uid in index})
    if user not in index:
        raise InputError(f"--user {user!r}: not a user of dataset {blob['dataset']} "
                         f"({len(user_ids)} users, e.g. {', '.join(user_ids[:3])})")
    u = index[user]
    seq = blob["seq_items"][blob["seq_ptr"][u]:blob["seq_ptr"][u + 1]]
    if blob["params"] is None:                                   # pop baseline
        scores = blob["pop_counts"].to(torch.float64)
    else:
        model = from_config(cfg)
        with torch.no_grad():
            h = model.last(blob["params"], seq[-cfg.max_len:][None])                # (1, d)
            scores = model.score(blob["params"], h)[0].to(torch.float64)           # (N+1,)
    scores[0] = float("-inf")
    scores[seq] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    top = torch.topk(scores, k)
    item_ids, names = blob["item_ids"], blob["item_names"]
    lines = [f"top-{k} for user {user_ids[u]} ({len(seq)} known items), model {cfg.mode}/{cfg.backbone}:"]
    for r, (s, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        name = names.get(item_ids[i])
        lines.append(f"{r:>3}  {item_ids[i]}" + (f"  {name}" if name else "") + f"  {s:.4f}")
    return lines
