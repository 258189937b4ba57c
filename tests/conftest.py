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
