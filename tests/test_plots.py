"""`fortress plot trajectories` and the FORTRESS keys on the command line."""
from __future__ import annotations

import json

import pytest
import torch

from fortress.cli import main
from fortress.plots import embedding_figure, prefix_states, pyplot, step_length, trajectory_figure
from fortress.recommend import load_run

SMALL = ["--data", "synthetic", "--set", "synthetic_users=300", "--set", "synthetic_items=50", "--set", "dim=16",
         "--set", "max_len=12", "--set", "rounds=2", "--set", "clients_per_round=16", "--set", "n_neg=16",
         "--set", "threads=1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "--out", str(root / "temporal"), *SMALL, "--set", "objective=fortress"]) == 0
    assert main(["run", "--out", str(root / "no_temporal"), *SMALL, "--set", "objective=fortress",
                 "--set", "temporal=false", "--set", "item_view=false"]) == 0
    assert main(["run", "--out", str(root / "pop"), *SMALL, "--set", "training=pop"]) == 0
    return root


def test_fortress_run_logs_only_the_terms_switched_on(runs):
    on = json.loads((runs / "temporal" / "results.json").read_text())
    off = json.loads((runs / "no_temporal" / "results.json").read_text())
    assert set(on["history"][-1]["terms"]) == {"rec", "seq", "user", "item", "temp"}
    assert set(off["history"][-1]["terms"]) == {"rec", "seq", "user"}
    assert off["config"]["temporal"] is False and on["config"]["lambda_temp"] == 0.01


def test_trajectories_png(runs, capsys):
    out = runs / "traj.png"
    code = main(["plot", "trajectories", str(runs / "temporal"), str(runs / "no_temporal"), "--out", str(out),
                 "--users", "4"])
    assert code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out
    blob = load_run(runs / "temporal")
    states = prefix_states(blob, [0, 1])
    for u, s in zip([0, 1], states):
        n = int(blob["seq_ptr"][u + 1] - blob["seq_ptr"][u])
        assert s.shape == (n, 16) and torch.allclose(s.norm(dim=-1), torch.ones(n, dtype=s.dtype))
    assert 0 < step_length(states) <= 2


def test_plot_and_key_errors_are_one_line(runs, capsys, tmp_path):
    assert main(["plot", "trajectories", str(runs / "pop")]) == 2
    assert "no user representations" in capsys.readouterr().err
    assert main(["plot", "trajectories", str(tmp_path / "nothing")]) == 2
    assert "no saved model" in capsys.readouterr().err
    for setting, expect in [("mask_ratio=1.5", "mask_ratio=1.5 is out of range"),
                            ("tau=0", "tau=0.0 is out of range"),
                            ("temporal=maybe", "temporal='maybe': expected true or false"),
                            ("temp_window=99", "temp_window=99 must be <= max_len=50")]:
        assert main(["run", "--data", "synthetic", "--out", str(tmp_path / "o"), "--set", "objective=fortress",
                     "--set", setting]) == 2
        assert expect in capsys.readouterr().err


def assert_readable(fig) -> None:
    """What every figure needs: a title, labelled axes and a legend on every panel."""
    assert fig._suptitle is not None and fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_title(), "panel without a title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axis in {ax.get_title()!r}"
        assert ax.get_legend() is not None, f"no legend in {ax.get_title()!r}"
        assert "run-" not in ax.get_title(), "a cell hash as a title"
        if ax.get_xticklabels() and any(t.get_text().startswith("(") for t in ax.get_xticklabels()):
            assert ax.get_xlabel()                              # categorical axes are named too


def test_trajectory_figure_is_readable_and_shows_the_steps(runs):
    plt = pyplot()
    fig, steps = trajectory_figure(plt, [runs / "temporal", runs / "no_temporal"], 4, 5, 0)
    assert_readable(fig)
    *paths, bars = fig.axes
    assert len(paths) == 2 and "temporal term on (λ2=0.01)" in paths[0].get_title()
    assert "temporal term off" in paths[1].get_title() and "seed 0" in paths[1].get_title()
    assert len(paths[0].get_legend().get_texts()) == 4                   # one entry per user
    heights = [b.get_height() for b in bars.patches]
    assert heights == pytest.approx(list(steps.values()))               # the bar panel shows each run's step
    assert bars.get_ylim()[0] == 0 and [t.get_text() for t in bars.get_xticklabels()] == ["(a)", "(b)"]
    plt.close(fig)


def test_embedding_figure_is_readable(runs):
    plt = pyplot()
    fig, stats = embedding_figure(plt, [runs / "temporal", runs / "no_temporal"], 0.1, ["i3"], 20, 0)
    assert_readable(fig)
    assert all(ax.get_ylim()[0] >= 0 for ax in fig.axes[2:])             # histograms: densities
    plt.close(fig)
