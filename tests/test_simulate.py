"""End-to-end runs: federated training must learn on synthetic data; a real dataset runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fortress.config import Config, override
from fortress.objectives import nt_xent
from fortress.data import load_dataset, resolve, synthetic
from fortress.simulate import EarlyStopping, auto_threads, run, summary, torch_threads


@pytest.fixture(scope="module")
def small():
    return synthetic(1500, 150, seed=0)


def test_auto_threads_leaves_busy_cores_to_their_processes():
    assert auto_threads(2, 0.1, ceiling=2) == 2         # idle 2-core machine: both cores
    assert auto_threads(2, 0.6, ceiling=2) == 1         # one core busy
    assert auto_threads(2, 2.7, ceiling=2) == 1         # more work than cores: still one thread
    assert auto_threads(16, 3.2, ceiling=8) == 8        # never more than torch's own default
    assert auto_threads(16, 11.6, ceiling=8) == 4
    assert torch_threads(3) == 3 and torch_threads(0) >= 1


def test_fedavg_learns_far_above_pop(small, tmp_path):
    base = dict(dim=32, max_len=20, eval_every=0)
    pop = run(Config(training="pop", **base), small, tmp_path / "pop", progress=False)
    fed = run(Config(objective="next_item", rounds=100, clients_per_round=64, n_neg=64, **base), small,
              tmp_path / "fed", progress=False)
    assert fed["test"]["HR@10"] > 2 * pop["test"]["HR@10"], (fed["test"], pop["test"])
    assert fed["test"]["NDCG@10"] > 2 * pop["test"]["NDCG@10"]
    assert fed["most_popular"]["test"] == pop["test"] and "most_popular" not in pop     # the row to compare with
    assert "test, most popular" in summary(fed) and "most popular" not in summary(pop)


def test_central_learns_far_above_pop(small, tmp_path):
    base = dict(dim=32, max_len=20, eval_every=0)
    pop = run(Config(training="pop", **base), small, tmp_path / "pop", progress=False)
    cen = run(Config(training="central", epochs=6, central_lr=0.01, **base), small, tmp_path / "cen", progress=False)
    assert cen["test"]["HR@10"] > 2 * pop["test"]["HR@10"], (cen["test"], pop["test"])


def test_early_stopping_keeps_the_best_and_counts_patience():
    stopping = EarlyStopping(patience=3)
    params = {"w": torch.zeros(2)}
    stops = []
    for epoch, ndcg in enumerate([0.1, 0.3, 0.2, 0.3, 0.29], 1):
        params["w"].fill_(epoch)
        stops.append(stopping.stop(epoch, {"NDCG@10": ndcg}, params))
    assert stops == [False, False, False, False, True]      # 0.3 again is no improvement
    report = stopping.restore(params, 5, 20)
    assert params["w"].tolist() == [2.0, 2.0]               # epoch 2's parameters, in the caller's dict
    assert report == {"metric": "valid NDCG@10", "patience": 3, "best_epoch": 2, "best_valid_NDCG@10": 0.3,
                      "epochs_run": 5, "max_epochs": 20, "stopped_early": True}


def test_central_early_stopping_stops_and_restores_the_best_epoch(small, tmp_path):
    cfg = Config(training="central", dim=32, max_len=20, epochs=40, patience=2, central_lr=0.01, eval_every=0, threads=1)
    res = run(cfg, small, tmp_path, progress=False)
    e = res["early_stopping"]
    ndcg = [h["valid"]["NDCG@10"] for h in res["history"]]
    assert len(ndcg) == e["epochs_run"] < 40 and e["stopped_early"]
    assert e["best_epoch"] == 1 + int(np.argmax(ndcg)) == e["epochs_run"] - 2
    assert e["best_valid_NDCG@10"] == max(ndcg) > ndcg[-1]
    assert res["valid"]["NDCG@10"] == max(ndcg)             # the final model is the best epoch's, not the last
    assert "early stopping: best valid NDCG@10" in summary(res)
    off = run(Config(training="central", dim=32, max_len=20, epochs=2, patience=0, eval_every=0, threads=1), small,
              tmp_path / "off", progress=False)
    assert "early_stopping" not in off and all("valid" not in h for h in off["history"])


def test_cl4srec_is_the_in_batch_softmax_and_trains_deterministically(small, tmp_path):
    """nt_xent against its definition (each view's positive its pair, the other 2B - 2 views its negatives),
    and central training with objective=cl4srec: deterministic for a seed, above most-popular."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    z, want = torch.cat([a, b]), 0.0
    for i in range(10):
        others = [j for j in range(10) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.7 for j in others])
        want -= float(logits[others.index((i + 5) % 10)] - logits.logsumexp(0)) / 10
    assert abs(float(nt_xent(a, b, 0.7)) - want) < 1e-12
    cfg = Config(training="central", objective="cl4srec", dim=32, max_len=20, epochs=3, patience=0, central_lr=0.01,
                 eval_every=0, threads=1)
    one, two = (run(cfg, small, tmp_path / k, progress=False) for k in ("a", "b"))
    assert one["test"] == two["test"] and [h["loss"] for h in one["history"]] == [h["loss"] for h in two["history"]]
    plain = run(override(cfg, {"objective": "next_item"}), small, tmp_path / "plain", progress=False)
    assert one["history"][0]["loss"] > plain["history"][0]["loss"]            # the contrastive term is in the loss
    assert one["test"]["HR@10"] > one["most_popular"]["test"]["HR@10"], (one["test"], one["most_popular"])


def test_runs_are_deterministic_for_a_seed(small, tmp_path):
    cfg = Config(objective="next_item", rounds=3, clients_per_round=32, dim=16, max_len=20, n_neg=32, eval_every=0,
                 threads=1)      # threads=0 follows the load, and the thread count moves the last bits
    a = run(cfg, small, tmp_path / "a", progress=False)
    b = run(cfg, small, tmp_path / "b", progress=False)
    assert a["test"] == b["test"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


@pytest.mark.slow
def test_short_run_on_real_data(shared_data, tmp_path):
    ds = load_dataset(resolve("amazon-cell-phones"))
    cfg = Config(objective="next_item", rounds=3, clients_per_round=128, eval_every=0)
    res = run(cfg, ds, tmp_path, progress=False)
    assert res["test"]["users"] == 27879
    assert all(0 <= res["test"][k] <= 1 for k in ("HR@10", "NDCG@10"))
    assert np.isfinite([h["loss"] for h in res["history"]]).all()
    assert res["bytes"]["up_per_round"] > 128 * 512 * 64 * 4      # each client sends >= its negatives' rows


def test_init_from_continues_a_saved_run(small, tmp_path):
    cfg = Config(objective="next_item", rounds=2, clients_per_round=32, dim=16, max_len=20, n_neg=32, eval_every=0,
                 threads=1)
    first = run(cfg, small, tmp_path / "a", progress=False)
    zero = run(Config(**{**cfg.__dict__, "rounds": 0, "init_from": str(tmp_path / "a")}), small,
               tmp_path / "b", progress=False)
    assert zero["test"] == first["test"]            # 0 further rounds: the same model
    from fortress.errors import InputError
    with pytest.raises(InputError, match="does not fit"):
        run(Config(**{**cfg.__dict__, "dim": 8, "init_from": str(tmp_path / "a")}), small, tmp_path / "c",
            progress=False)


@pytest.mark.parametrize("mode", ["fedavg", "fortress"])
def test_a_streamed_round_applies_the_same_fedavg(small, mode):
    """Chunks trained as the server reads them (one chunk of uploads held at a time) or all at once:
    the same checks (faulty clients included) and the same model after the round."""
    import torch

    from fortress.client import eligible_clients
    from fortress.models import from_config
    from fortress.rounds import client_step, server_step
    from fortress.server.aggregate import GlobalOptimizer
    cfg = Config(objective={"fedavg": "next_item", "fortress": "fortress"}[mode], dim=16, max_len=12, n_neg=16, chunk_size=8, dtype="float64", corrupt_rate=0.1,
                 dropout=0.1)
    model = from_config(cfg)
    start = model.init(small.n_items, torch.Generator().manual_seed(0), torch.float64)
    users = np.random.default_rng(0).choice(eligible_clients(small), 60, replace=False)
    out = []
    for stream in (False, True):
        params = {k: v.clone() for k, v in start.items()}
        got = client_step(cfg, model, small, params, users, 3, stream=stream)
        res = server_step(cfg, params, GlobalOptimizer("sgd", 1.0), got, len(users), small.n_items, 3)
        out.append((params, res, got.bytes))
    (a, ra, ba), (b, rb, bb) = out
    assert ra.rejected == rb.rejected and len(ra.rejected) > 0 and ba == bb > 0
    assert ra.log["clients"] == rb.log["clients"] == len(users) - len(ra.rejected)
    assert abs(ra.log["loss"] - rb.log["loss"]) < 1e-9
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-12, rtol=0), k
    assert not torch.equal(a["item_emb"], start["item_emb"])
