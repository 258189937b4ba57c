"""Client engine: sub-tables, vmap == per-client loop, determinism, update checks."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fortress import client
from fortress.client import (build_chunks, eligible_clients, length_buckets, objective, round_chunks,
                             train_round)
from fortress.config import Config
from fortress.data import synthetic
from fortress.models import from_config
from fortress.server.aggregate import fedavg
from fortress.updates import check

from conftest import client_round


@pytest.fixture(scope="module")
def ds():
    return synthetic(300, 80, seed=3)


@pytest.mark.parametrize("backbone,opt", [("sasrec", "adam"), ("sasrec", "sgd"), ("gru4rec", "adam")])
def test_vmap_matches_loop_after_a_round(ds, backbone, opt):
    cfg = Config(backbone=backbone, client_opt=opt, lr=0.05 if opt == "sgd" else 0.01, dim=16,
                 max_len=10, n_neg=12, local_epochs=2, dropout=0.0, heads=2)
    p_vmap, u_vmap = client_round(ds, cfg, "vmap", chunk_size=16)
    p_loop, _ = client_round(ds, cfg, "loop", chunk_size=16)
    start = from_config(cfg).init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    for k in p_vmap:
        assert torch.allclose(p_vmap[k], p_loop[k], atol=1e-6, rtol=0), k
    assert not torch.allclose(p_vmap["item_emb"], start["item_emb"])       # training did something
    assert u_vmap.n == 40 and torch.isfinite(u_vmap.loss).all()


def test_chunking_does_not_change_the_round(ds):
    cfg = Config(dim=16, max_len=10, n_neg=12, dropout=0.0)
    a, _ = client_round(ds, cfg, "vmap", chunk_size=7)
    b, _ = client_round(ds, cfg, "vmap", chunk_size=40)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-9), k


def test_length_buckets_hand_case():
    lengths = np.array([1, 1, 2, 2, 2, 3, 9, 10])
    # padding within 2 positions a chunk, at most 4 clients: [1 1 2 2] (pad 2), [2 3] (pad 1), [9 10] (pad 1)
    assert [(s.start, s.stop) for s in length_buckets(lengths, 4, overhead=2)] == [(0, 4), (4, 6), (6, 8)]
    assert [(s.start, s.stop) for s in length_buckets(lengths, 4, overhead=10 ** 9)] == [(0, 4), (4, 8)]
    assert [(s.start, s.stop) for s in length_buckets(lengths, 8, overhead=0)] == [(0, 2), (2, 5), (5, 6), (6, 7), (7, 8)]
    assert length_buckets(np.array([], dtype=int), 4) == []
    # a budget of 10 padded positions: [1 1 2 2 2] (10), then [3] (with 9 it would pad to 18), [9], [10]
    assert [(s.start, s.stop) for s in length_buckets(lengths, 8, overhead=10 ** 9, budget=10)] == \
        [(0, 5), (5, 6), (6, 7), (7, 8)]
    assert [(s.start, s.stop) for s in length_buckets(np.array([12, 12]), 8, budget=10)] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("mode", ["fedavg", "fortress"])
def test_length_bucketing_gives_the_same_updates(ds, mode, monkeypatch):
    """Chunks by length (each padded to its own longest) or fixed chunks of 16: the same uploads."""
    cfg = Config(objective={"fedavg": "next_item", "fortress": "fortress"}[mode], dim=16, max_len=10, n_neg=12, dropout=0.0, chunk_size=16, dtype="float64")
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    users = np.random.default_rng(1).choice(eligible_clients(ds), 40, replace=False)

    def uploads():
        return train_round(model, objective(cfg, ds.n_items), 1, cfg.lr, "sgd", params,
                           round_chunks(ds, cfg, users, 0))
    monkeypatch.setattr(client, "CHUNK_OVERHEAD", 0)          # a chunk per distinct length (most padding saved)
    a = uploads()
    monkeypatch.setattr(client, "CHUNK_OVERHEAD", 10 ** 9)    # fixed chunks of 16 clients by length order
    b = uploads()
    assert torch.equal(a.clients, b.clients) and torch.equal(a.rows_item, b.rows_item)
    for k in ("dense", "rows_delta", "loss"):
        assert torch.allclose(getattr(a, k), getattr(b, k), atol=1e-9, rtol=0), k


def test_sub_tables_hold_own_items_and_distinct_negatives(ds):
    rng = np.random.default_rng(0)
    users = eligible_clients(ds)[:20]
    for chunk in build_chunks(ds, users, n_neg=15, max_len=10, chunk_size=8, rng=rng):
        assert torch.all(chunk.items[:, 0] == 0)
        for i, u in enumerate(chunk.users.tolist()):
            seq = ds.train_seq(u)[-11:]
            real = chunk.items[i][chunk.items[i] > 0]
            assert len(real) == len(set(real.tolist())) == len(set(seq.tolist())) + 15
            # inputs and targets decode back to the sequence through the sub-table
            x, y = chunk.x[i], chunk.y[i]
            assert chunk.items[i][x[x > 0]].tolist() == seq[:-1].tolist()
            assert chunk.items[i][y[y > 0]].tolist() == seq[1:].tolist()
            assert chunk.weight[i] == len(ds.train_seq(u))


def test_round_is_deterministic(ds):
    cfg = Config(dim=16, max_len=10, n_neg=12, dropout=0.2)
    torch.manual_seed(5)
    a, _ = client_round(ds, cfg, "vmap", 16)
    torch.manual_seed(5)
    b, _ = client_round(ds, cfg, "vmap", 16)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_check_rejects_nan_and_out_of_range_items(ds):
    cfg = Config(dim=16, max_len=10, n_neg=12, dropout=0.0)
    _, u = client_round(ds, cfg, "vmap", 16)
    dense_size = u.dense.shape[1]
    bad = dataclasses.replace(u, dense=u.dense.clone(), rows_item=u.rows_item.clone())
    bad.dense[3, 0] = float("nan")
    bad.rows_item[bad.rows_client == 5] = ds.n_items + 7
    clean, rejected = check(bad, ds.n_items, dense_size, 16)
    assert [c for c, _ in rejected] == [int(u.clients[3]), int(u.clients[5])]
    assert "NaN" in rejected[0][1] and "item id" in rejected[1][1]
    assert clean.n == u.n - 2 and torch.isfinite(clean.dense).all()
    assert clean.rows_client.max() < clean.n
    with pytest.raises(ValueError):
        check(u, ds.n_items, dense_size + 1, 16)


def test_logq_bias_hand_case():
    from fortress.objectives import sampled_softmax_bias
    # slots: 0 pad, 1-2 own (in x/y), 3-5 negatives, 6 empty; catalogue of 20 items
    x, y = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1])
    col = torch.tensor([False, True, True, True, True, True, False])
    bias = sampled_softmax_bias(x, y, col, n_items=20)
    expect = torch.log(torch.tensor((20 - 2) / 3, dtype=torch.float64))
    assert torch.allclose(bias, torch.tensor([0, 0, 0, 1, 1, 1, 0], dtype=torch.float64) * expect)


# ---- whole-history training: windows of max_len ----

def test_train_windows_hand_case():
    seq = np.arange(1, 13)                                          # 12 items: 11 targets
    wins = client.train_windows(seq, max_len=5)
    assert [w.tolist() for w in wins] == [[1, 2], [2, 3, 4, 5, 6, 7], [7, 8, 9, 10, 11, 12]]
    targets = np.concatenate([w[1:] for w in wins])
    assert targets.tolist() == seq[1:].tolist()                     # every item but the first, once
    assert [w.tolist() for w in client.train_windows(seq[:11], 5)] == [[1, 2, 3, 4, 5, 6], [6, 7, 8, 9, 10, 11]]
    assert [w.tolist() for w in client.train_windows(seq, 5, whole_history=False)] == [[7, 8, 9, 10, 11, 12]]
    for n in (2, 5, 6):                                             # <= max_len + 1 items: one window either way
        assert [w.tolist() for w in client.train_windows(seq[:n], 5)] == [seq[:n].tolist()]


@pytest.fixture(scope="module")
def long_ds():
    """Histories of up to ~60 items: several windows each at max_len 6."""
    return synthetic(200, 60, seed=4, mean_len=20)


def test_whole_history_chunks_hold_every_window(long_ds):
    ds = long_ds
    users = eligible_clients(ds)[:40]
    chunks = build_chunks(ds, users, n_neg=10, max_len=6, chunk_size=8, rng=np.random.default_rng(0),
                          whole_history=True)
    assert sorted(u for c in chunks for u in c.users.tolist()) == sorted(users.tolist())
    assert any(c.x.shape[1] > 2 for c in chunks)
    for chunk in chunks:        # padded positions within those of 8 one-window clients, unless a client is alone
        assert chunk.x.numel() <= 8 * 6 or chunk.n == 1
        assert chunk.x.dim() == 3 and chunk.x.shape == chunk.y.shape and chunk.x.shape[2] <= 6
        for i, u in enumerate(chunk.users.tolist()):
            seq = ds.train_seq(u)
            wins = client.train_windows(seq, 6)
            real = chunk.items[i][chunk.items[i] > 0]
            assert len(real) == len(set(seq.tolist())) + 10         # own items of the whole history + negatives
            W = chunk.x.shape[1]
            assert not (chunk.x[i, :W - len(wins)] > 0).any()      # all-0 windows in front
            for j, w in enumerate(wins, start=W - len(wins)):
                x, y = chunk.x[i, j], chunk.y[i, j]
                assert chunk.items[i][x[x > 0]].tolist() == w[:-1].tolist()
                assert chunk.items[i][y[y > 0]].tolist() == w[1:].tolist()
            assert chunk.weight[i] == len(seq)                      # FedAvg weight: all its interactions


def test_whole_history_changes_nothing_for_short_histories(ds):
    """Users with <= max_len + 1 train items: the same inputs (one window) and the same uploads, bit for bit."""
    cfg = Config(dim=16, max_len=30, n_neg=12, dropout=0.0, dtype="float64")
    assert ds.train_len.max() <= cfg.max_len + 1
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    users = np.random.default_rng(1).choice(eligible_clients(ds), 40, replace=False)
    old, new = (round_chunks(ds, dataclasses.replace(cfg, whole_history=w), users, 0) for w in (False, True))
    assert [c.x.shape[1] for c in new] == [1] * len(new)
    for a, b in zip(old, new):
        assert torch.equal(a.users, b.users) and torch.equal(a.items, b.items)
        assert torch.equal(a.x, b.x[:, 0]) and torch.equal(a.y, b.y[:, 0])
    ua, ub = (train_round(model, objective(cfg, ds.n_items), 1, cfg.lr, "sgd", params, c) for c in (old, new))
    for k in ("weight", "dense", "rows_item", "rows_delta", "loss"):
        assert torch.equal(getattr(ua, k), getattr(ub, k)), k


@pytest.mark.parametrize("backbone,objective_", [("sasrec", "next_item"), ("gru4rec", "next_item"),
                                                 ("sasrec", "fortress"), ("gru4rec", "fortress")])
def test_whole_history_vmap_matches_loop(long_ds, backbone, objective_, monkeypatch):
    """Several windows per client, float64: the vectorised engine (padded windows, chunks by work) equals the
    per-client loop on each client's own unpadded windows, for FedAvg's loss and for the FORTRESS objective."""
    ds = long_ds
    cfg = Config(backbone=backbone, objective=objective_, dim=8, max_len=6, n_neg=10, local_epochs=2, lr=0.05,
                 dropout=0.0, heads=2, blocks=1, dtype="float64", lambda_cl=1.0, lambda_temp=1.0, chunk_size=8)
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    users = np.random.default_rng(1).choice(eligible_clients(ds), 24, replace=False)
    assert (ds.train_len[users] > 3 * cfg.max_len + 1).any()            # some clients hold 4+ windows

    def uploads(engine, overhead=client.CHUNK_OVERHEAD):
        monkeypatch.setattr(client, "CHUNK_OVERHEAD", overhead)
        return train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, "sgd", params,
                           round_chunks(ds, cfg, users, 0), engine)
    v, lp, one = uploads("vmap"), uploads("loop"), uploads("vmap", 10 ** 9)   # one: fixed chunks of 8, more padding
    for other, tol in ((lp, 1e-9), (one, 1e-9)):
        order = [other.clients.tolist().index(c) for c in v.clients.tolist()]
        assert torch.allclose(v.dense, other.dense[order], atol=tol, rtol=0)
        assert torch.allclose(v.loss, other.loss[order], atol=tol, rtol=0)
        for k in v.terms:
            assert torch.allclose(v.terms[k], other.terms[k][order], atol=tol, rtol=0), k
    assert torch.equal(v.rows_item, lp.rows_item) and torch.allclose(v.rows_delta, lp.rows_delta, atol=1e-9, rtol=0)
    assert torch.isfinite(v.dense).all() and v.dense.abs().sum() > 0
    if objective_ == "fortress":
        assert set(v.terms) == {"rec", "seq", "user", "item", "temp"}
