"""Data: load files or generate synthetic sequences into a remapped, leave-one-out split Dataset."""
from __future__ import annotations

from fortress.data.dataset import Dataset, from_sequences
from fortress.data.load import detect_format, load_dataset, resolve, shared_dir
from fortress.data.synthetic import synthetic

__all__ = ["Dataset", "from_sequences", "load_dataset", "detect_format", "resolve", "shared_dir",
           "synthetic", "load_data", "describe"]


def load_data(spec: str, cfg) -> Dataset:
    """The dataset `spec` names, read as a config says: `synthetic` from its generator keys (synthetic_users,
    synthetic_items, synthetic_len, synthetic_taste, seed), anything else (file, folder, name in $FORTRESS_DATA)
    with its data_format and kcore. The one loader of the CLI and the Flower apps."""
    if spec == "synthetic":
        return synthetic(cfg.synthetic_users, cfg.synthetic_items, cfg.seed, cfg.synthetic_len, cfg.synthetic_taste)
    return load_dataset(resolve(spec), cfg.data_format, cfg.kcore)


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def describe(ds: Dataset, detected: bool = False) -> str:
    """A short multi-line summary of a dataset, for `fortress data stats` (`detected`: its format was guessed)."""
    s = ds.stats()
    pct = s["length_percentiles"]
    evaluated = s["users_with_test"]
    how = " (detected; --format sets another)" if detected else ""
    return "\n".join([
        f"dataset        {s['name']}",
        f"format         {ds.data_format or 'in memory'}{how}",
        f"users          {s['users']:,}",
        f"items          {s['items']:,}",
        f"interactions   {s['interactions']:,}",
        f"density        {100 * s['density']:.4f}%",
        f"evaluated      {evaluated:,} users with a test item "
        f"({100 * evaluated / max(1, s['users']):.1f}%)",
        "seq length     " + " / ".join(f"{k} {_num(v)}" for k, v in pct.items()),
        f"chronological  {'yes' if s['chronological'] else 'no (source order is not time order)'}",
        "unseen items   " + " / ".join(f"{k} {100 * v:.1f}%" for k, v in s["unseen_targets"].items())
        + " of the held-out items are in no train sequence",
    ])
