"""Shared test setup: the shared data folder, also exported as FORTRESS_DATA for `shared_dir()`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED_DATA = Path(os.environ.get("FORTRESS_DATA") or ROOT.parent / "shared" / "data").resolve()
os.environ["FORTRESS_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; its absence fails the tests that need it (they are part of CI)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set FORTRESS_DATA to the folder")
    return SHARED_DATA


def saved_params(folder: Path) -> dict:
    import torch
    return torch.load(Path(folder) / "model.pt", weights_only=False)["params"]


def same_saved_model(a: Path, b: Path) -> bool:
    """The two runs' saved models are equal to the bit."""
    import torch
    pa, pb = saved_params(a), saved_params(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def interrupt_and_resume(cfg, ds, folder: Path, cut: int) -> dict:
    """The run of `cfg` stopped after round `cut` (a run of `cut` rounds, whose last checkpoint is that round's)
    in `folder`, then resumed there to cfg.rounds; returns the resumed run's results."""
    import dataclasses

    import torch

    from fortress import checkpoint
    from fortress.simulate import run
    run(dataclasses.replace(cfg, rounds=cut), ds, folder, progress=False)
    assert torch.load(Path(folder) / checkpoint.NAME, weights_only=False)["round"] == cut
    return run(cfg, ds, folder, progress=False, resume=True)


def client_round(ds, cfg, engine: str, chunk_size: int, device: str = "cpu"):
    """One FedAvg round of 40 fixed clients from a float64 model initialised with seed 0, on `device`: the model
    after it (on that device) and the uploads. The engine tests compare such rounds (vmap against the loop, chunk
    sizes, the GPU against the CPU)."""
    import numpy as np
    import torch

    from fortress.client import build_chunks, eligible_clients, objective, train_round
    from fortress.models import dense_keys, from_config
    from fortress.server.aggregate import GlobalOptimizer, fedavg
    model = from_config(cfg)
    params = {k: v.to(device) for k, v in
              model.init(ds.n_items, torch.Generator().manual_seed(0), torch.float64).items()}
    rng = np.random.default_rng(1)
    users = rng.choice(eligible_clients(ds), 40, replace=False)
    chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, chunk_size, rng)
    updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params,
                          chunks, engine)
    GlobalOptimizer(cfg.global_opt, cfg.global_lr).apply(params, dense_keys(params), params["item_emb"],
                                                         fedavg(updates))
    return params, updates
