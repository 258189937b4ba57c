"""bench/engine.py's FLOP model: the limit every engine row is judged against."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
engine = pytest.importorskip("engine")

from fortress.config import Config, override  # noqa: E402


def test_flop_model_counts_a_tiny_catalogue_and_is_linear_in_the_sub_table():
    """30 items: the fake sub-tables (up to max_len + 68 slots) still fit the model's table, and the line
    fitted per L is exact (FLOPs are linear in the sub-table size)."""
    fm = {obj: engine.FlopModel(override(Config(), {"objective": obj}), 30) for obj in ("next_item", "fortress")}
    for L in (1, 7, 50):
        for obj in fm:          # the line fitted at two sizes predicts a third one's count
            assert fm[obj](L, 40) == pytest.approx(fm[obj]._count(L, 40), rel=1e-6) and fm[obj](L, 40) > 0
        assert fm["fortress"](L, 10) > 2 * fm["next_item"](L, 10)     # two views, the window pass, the item view
