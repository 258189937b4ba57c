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
