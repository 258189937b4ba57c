"""Use a saved run: top-K unseen items for a user, with original item ids."""
from __future__ import annotations

from pathlib import Path

import torch

from fortress import config as config_mod
from fortress.errors import InputError, printable
from fortress.models import from_config


def load_run(run_dir: str | Path) -> dict:
    """The saved model of a run: its --out folder, or the model.pt file itself."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise InputError(f"{run_dir}: no saved model (no model.pt in this folder; expected the --out folder "
                             "of a finished `fortress run`)")
    elif not path.exists():
        raise InputError(f"{run_dir}: no saved model (no such folder; expected the --out folder of a finished "
                         "`fortress run`)")
    try:
        blob = torch.load(path, weights_only=False)
    except Exception as err:   # a truncated or foreign file: say which, not a pickle traceback
        raise InputError(f"{path}: cannot read saved model ({type(err).__name__}: {err})") from None
    return {**blob, "config": config_mod.upgrade(blob["config"])} if isinstance(blob, dict) and "config" in blob else blob


def _item(item_ids: list[str], names: dict[str, str], i: int) -> str:
    """An item's original id, with its readable name when the id map has one."""
    name = names.get(item_ids[i])
    return printable(f"{item_ids[i]} ({name})" if name else item_ids[i])


def recommend(run_dir: str | Path, user: str, k: int = 10, tail: int = 5) -> list[str]:
    """A header (the user and the last `tail` items of their history), then 'rank  item  score' lines
    for the user's top-k items not in their known sequence."""
    if k < 1:
        raise InputError(f"-k {k}: must be >= 1")
    blob = load_run(run_dir)
    cfg = config_mod.from_dict(blob["config"])
    user_ids = blob["user_ids"]
    index = {u: i for i, u in enumerate(user_ids)}
    index.update({name: index[uid] for uid, name in blob["user_names"].items() if uid in index})
    if not user_ids:
        raise InputError(f"{run_dir}: this model was saved by a server that holds no user data (a Flower deployment); "
                         "the users' histories live on their SuperNodes")
    if user not in index:
        raise InputError(f"--user {user!r}: not a user of dataset {blob['dataset']} "
                         f"({len(user_ids)} users, e.g. {', '.join(user_ids[:3])})")
    u = index[user]
    seq = blob["seq_items"][blob["seq_ptr"][u]:blob["seq_ptr"][u + 1]]
    pop = blob["params"] is None                                 # the popularity baseline: train counts
    model_name = "pop" if pop else f"{cfg.training}/{cfg.objective}/{cfg.backbone}"
    if pop:
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
    who = user_ids[u] + (f" ({blob['user_names'][user_ids[u]]})" if user_ids[u] in blob["user_names"] else "")
    last = [_item(item_ids, names, i) for i in seq[-tail:].tolist()]
    lines = [f"user {printable(who)}: {len(seq)} known items; the last {len(last)}, oldest first: {', '.join(last)}",
             f"top-{k} unseen items by the {model_name} model in {run_dir}:"]
    rows = [(_item(item_ids, names, i), s) for s, i in zip(top.values.tolist(), top.indices.tolist())]
    width = max([4] + [len(item) for item, _ in rows])
    lines.append(f"{'rank':>4}  {'item':<{width}}  {'count' if pop else 'score'}")
    lines += [f"{r:>4}  {item:<{width}}  {s:.0f}" if pop else f"{r:>4}  {item:<{width}}  {s:.4f}"
              for r, (item, s) in enumerate(rows, 1)]
    return lines
