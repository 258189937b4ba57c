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


@pytest.mark.slow
def test_saved_run_scripts_read_the_saved_monitor_and_simulate_the_attacked_rounds(tmp_path):
    """bench/target_pushes.py on a short defended A-hum run: the rate it reports is the monitor's saved rate of the
    run's target, and it prints one attacked and one honest line per round and one line per cap rate; then
    bench/push_directions.py on the same run."""
    import json
    import subprocess

    import torch
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    sets = ["rounds=6", "clients_per_round=16", "defence=fortress", "attack=ahum", "attack_ratio=0.05",
            "synthetic_users=200", "synthetic_items=80", "eval_every=3", "threads=1"]
    subprocess.run([sys.executable, "-m", "fortress.cli", "run", "--data", "synthetic", "--out", str(run), "--quiet",
                    *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True)
    out = subprocess.run([sys.executable, str(root / "bench" / "target_pushes.py"), str(run), "--data", "synthetic",
                          "--rounds", "2", "--rates", "1", "0.5"], check=True, capture_output=True, text=True).stdout
    target = json.loads((run / "results.json").read_text())["attack"]["target_index"][0]
    rate = float(torch.load(run / "model.pt", weights_only=False)["defence"]["state"]["rate"][target])
    lines = out.splitlines()
    assert lines[0].startswith(f"{run}: target {target} rate {rate:.3f} (rank ")
    assert sum("ahum attackers: their target-row push-equivalents" in ln for ln in lines) == 2
    assert sum(ln.lstrip().startswith("honest round") for ln in lines) == 2
    assert [ln.split(":")[0].strip() for ln in lines if "exposure cap" in ln] == [
        "exposure cap with the target at its own rate", "exposure cap with the target at rate 1",
        "exposure cap with the target at rate 0.5"]
    # bench/push_directions.py on the same run: the same simulated rounds (bench/saved.py), two lines each
    out = subprocess.run([sys.executable, str(root / "bench" / "push_directions.py"), str(run), "--data", "synthetic",
                          "--rounds", "2", "--probes", "50"], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"{run}: target {target}; |mean probe representation|")
    assert sum("ahum attackers' target rows" in ln for ln in lines) == 2
    assert sum("largest raise along the mean per client" in ln for ln in lines) == 2


def test_hics_rows_counts_every_uploaded_row_and_its_hits_add_up_to_the_runs_test_hr(tmp_path):
    """bench/hics_rows.py on a short HiCS run: each simulated client uploads its own items and exactly n_neg
    negatives (so the negative rows are rounds x clients x n_neg), every kept share lies in [0, 1], and the test hits
    of the three popularity classes add up to the run's own test HR@10."""
    import json
    import subprocess
    root = Path(__file__).resolve().parents[1]
    run, out = tmp_path / "run", tmp_path / "rows.json"
    sets = ["rounds=2", "clients_per_round=16", "defence=hics", "n_neg=20", "synthetic_users=200",
            "synthetic_items=80", "eval_every=2", "threads=1"]
    subprocess.run([sys.executable, "-m", "fortress.cli", "run", "--data", "synthetic", "--out", str(run), "--quiet",
                    *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True)
    subprocess.run([sys.executable, str(root / "bench" / "hics_rows.py"), str(run), "--data", "synthetic",
                    "--rounds", "2", "--out", str(out)], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())[str(run)]
    rows = res["rows"]
    assert sum(v["rows"] for k, v in rows.items() if k.startswith("negative")) == 2 * 16 * 20
    assert sum(v["rows"] for k, v in rows.items() if k.startswith("own")) > 2 * 16
    assert all(0.0 <= v["kept"] <= 1.0 for v in rows.values())
    assert 0.0 < sum(v["rows"] * v["kept"] for v in rows.values()) < sum(v["rows"] for v in rows.values())
    place = res["placement"]
    hits = sum(v["test_users"] * v["test_HR@10"] for v in place.values())
    saved = json.loads((run / "results.json").read_text())["test"]
    assert hits / saved["users"] == pytest.approx(saved["HR@10"], abs=1e-9)
    assert sum(v["top10_share"] for v in place.values()) == pytest.approx(1.0)
