"""Evaluate a saved run again, overall and by strata (`fortress eval`), without training it again.

The run's folder gives the model (model.pt, read as `fortress recommend` reads it) and names its
data; the data is loaded as the run loaded it (its data_format and kcore) and must be the run's
own: the same catalogue and, when the model holds them, the same users, sequences and train counts.
"""
from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from fortress import config as config_mod
from fortress.data import Dataset, load_data
from fortress.errors import InputError, printable
from fortress.experiments.runner import STRATA
from fortress.metrics import KS, evaluate
from fortress.models import from_config
from fortress.recommend import load_run
from fortress.simulate import model_scorer, pop_scorer, torch_threads, write_json

OUT_NAME = STRATA              # so that `fortress report` finds it in an experiment's cell
METRICS = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in KS)


def _mismatch(ds: Dataset, blob: dict) -> str | None:
    """How the loaded data differs from the data the run saved with its model, or None."""
    if blob["item_ids"] != ds.item_ids:
        return f"its catalogue has {ds.n_items} items, the run's {len(blob['item_ids']) - 1}"
    if not blob["user_ids"]:  # a Flower server's model: the users' data stayed on the nodes
        return None
    if blob["user_ids"] != ds.user_ids:
        return f"it has {ds.n_users} users, the run {len(blob['user_ids'])} (or other ids)"
    seqs = [ds.full_seq(u) for u in range(ds.n_users)]
    ptr = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=ptr[1:])
    items = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    if not (np.array_equal(ptr, blob["seq_ptr"].numpy()) and np.array_equal(items, blob["seq_items"].numpy())):
        return "the users' sequences differ"
    if not np.array_equal(ds.item_counts(), blob["pop_counts"].numpy()):
        return "the train split differs (other item train counts)"
    return None


def run_data(blob: dict, cfg: config_mod.Config, run_dir: str | Path, data: str | None = None) -> tuple[Dataset, str]:
    """The run's dataset and the spec it was loaded from: `data`, else the dataset name the run saved (a
    RecBole benchmark is named FOLDER/NAME: its folder is tried too), checked against the saved model."""
    name = str(blob["dataset"])
    specs = [data] if data else [s for s in dict.fromkeys([name, str(PurePath(name).parent)]) if s != "."]
    ds, used, why = None, None, None
    for spec in specs:
        try:
            ds, used = load_data(spec, cfg), spec
            break
        except InputError as err:
            why = str(err)
    if ds is None:
        hint = "" if data else " (pass --data with its file or folder)"
        raise InputError(f"{run_dir}: cannot load the run's data: {why}{hint}")
    wrong = _mismatch(ds, blob)
    if wrong:
        who = f"--data {used}" if data else f"{used} (found for the run's dataset name)"
        raise InputError(f"{who}: not the data of the run in {run_dir} ({wrong}; data_format="
                         f"{cfg.data_format}, kcore={cfg.kcore} as the run loaded it)")
    return ds, used


def evaluate_run(run_dir: str | Path, splits: tuple[str, ...] = ("test",), data: str | None = None,
                 threads: int = 0) -> dict[str, Any]:
    """Overall and stratified full-ranking metrics of a saved run at `splits`, as JSON; with the largest difference
    from the run's own results.json where it has them."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise InputError(f"{run_dir}: no such folder; expected the --out folder of a finished `fortress run`")
    blob = load_run(folder)            # no model.pt, or an unreadable one: its own one-line error
    cfg = config_mod.from_dict({**blob["config"], "device": "cpu"})     # saved weights are on the CPU
    ds, used = run_data(blob, cfg, run_dir, data)
    torch.set_num_threads(torch_threads(threads))
    pop = blob["params"] is None
    scorer = pop_scorer(ds) if pop else model_scorer(from_config(cfg), blob["params"], ds)
    model = "pop" if pop else f"{cfg.training}/{cfg.objective}/{cfg.backbone}"
    out: dict[str, Any] = {"run": str(run_dir), "model": model, "dataset": ds.name, "data": used}
    try:
        saved = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        saved = {}
    for split in splits:
        res = evaluate(ds, scorer, split, cfg.eval_batch, by_strata=True)
        out[split] = res
        if isinstance(saved.get(split), dict) and all(k in saved[split] for k in METRICS):
            out.setdefault("differs_from_results_json", {})[split] = max(abs(res[k] - saved[split][k]) for k in METRICS)
    return out


def write(result: dict[str, Any], path: str | Path) -> Path:
    """Write `result` as JSON to `path` (a folder: its strata.json), atomically."""
    path = Path(path)
    if path.is_dir():
        path = path / OUT_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)
    except OSError as err:
        raise InputError(f"{path}: cannot write ({err.strerror or type(err).__name__})") from None
    return path


def stratum_label(name: str, stratum: str, info: dict, split: str) -> str:
    """What a stratum means, with its cut points: 'history 6-20 train items', 'test item cold (<= 8 train)'."""
    if name == "history":
        return f"history {stratum} train items"
    lo, hi = info["cold_max"], info["popular_min"]
    span = {"cold": f"<= {lo}", "mid": f"{lo + 1}-{hi - 1}", "popular": f">= {hi}"}.get(stratum, "")
    return f"{split} item {stratum} ({span} in train)"


def table(result: dict[str, Any], split: str, ks: tuple[int, ...] = (10,)) -> list[str]:
    """Overall and per-stratum HR@K / NDCG@K, with the users of each stratum and their share."""
    res = result[split]
    cols = [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks]
    rows = [("overall", res)]
    for name, info in res.get("strata", {}).items():
        rows += [(stratum_label(name, s, info, split), g) for s, g in info["groups"].items()]
    width = max(len(r) for r, _ in rows)
    total = max(1, res["users"])
    lines = [f"{split}: {res['users']:,} users; {result['model']} model in {printable(result['run'])} "
             f"on {printable(result['dataset'])}",
             f"{'':<{width}}  {'users':>7}  {'share':>6}  " + "  ".join(f"{c:>8}" for c in cols)]
    for label, g in rows:
        lines.append(f"{label:<{width}}  {g['users']:>7}  {g['users'] / total:>6.1%}  "
                     + "  ".join(f"{g[c]:>8.4f}" for c in cols))
    pop = res.get("strata", {}).get("popularity")
    if pop:
        lines.append(f"cold / popular: the least / most popular items that together hold {pop['head_share']:.0%} "
                     "of train interactions")
    return lines
