"""Atomic server checkpoints: model, round, optimiser/defence state, logs and RNG states.

Written to a temporary file in the same folder, flushed to disk, then renamed over the old one
(`os.replace` is atomic on POSIX), so a `kill -9` at any instant leaves either the previous or
the new checkpoint, never a torn one. Rounds draw their randomness from (seed, round), so
restoring this state and replaying the remaining rounds gives exactly the uninterrupted model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fortress.config import Config, to_dict, upgrade
from fortress.errors import InputError

NAME = "checkpoint.pt"
VERSION = 1
# keys that may change between the interrupted run and its resumption: they do not touch the model
MAY_DIFFER = ("rounds", "checkpoint_every", "eval_every", "eval_batch", "threads")


def save(folder: Path, state: dict[str, Any]) -> Path:
    """Write `state` (plus RNG states) atomically to folder/checkpoint.pt."""
    folder = Path(folder)
    path = folder / NAME
    tmp = folder / f".{NAME}.{os.getpid()}.tmp"
    blob = {"version": VERSION, **state,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
    with open(tmp, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)                                  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load(folder: Path, cfg: Config, data: str) -> dict[str, Any] | None:
    """The checkpoint in `folder`, checked against this config and the data's fingerprint
    (`population.fingerprint`); None if there is none."""
    folder = Path(folder)
    for stale in folder.glob(f".{NAME}.*.tmp"):           # a write that a kill interrupted
        stale.unlink()
    path = folder / NAME
    if not path.exists():
        return None
    try:
        blob = torch.load(path, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if blob.get("version") != VERSION:
        raise InputError(f"{path}: checkpoint version {blob.get('version')!r}, this fortress reads {VERSION}")
    saved, now = upgrade(blob["config"]), to_dict(cfg)
    diff = [k for k in now if k not in MAY_DIFFER and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise InputError(f"{path}: cannot resume, {k}={saved.get(k)!r} there but {k}={now[k]!r} now "
                         f"(only {', '.join(MAY_DIFFER)} may change)")
    if blob["data"] != data:
        raise InputError(f"{path}: cannot resume, the checkpoint was made on other data")
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    return blob
