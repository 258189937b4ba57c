"""PTF-FSR (training=ptf): clients share predictions only, vmap == per-client loop, the perturbation by hand,
the server learns, determinism, attacks, config errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fortress import config, ptf
from fortress.config import Config
from fortress.data import synthetic
from fortress.errors import InputError
from fortress.models import from_config
from fortress.simulate import run
from conftest import saved_params, same_saved_model

D = torch.float64
TINY = dict(training="ptf", dim=8, max_len=10, n_neg=12, clients_per_round=32, eval_every=0, threads=1,
            local_epochs=2, targets=0)


@pytest.fixture(scope="module")
def ds():
    return synthetic(300, 60, seed=1)


def store_with_knowledge(ds, cfg, users, r=0):
    """A store whose clients hold made-up knowledge (every other one), as after an earlier round."""
    store = ptf.Clients(ptf.client_model(cfg), ds.n_items)
    rng = np.random.default_rng(5)
    for c in users[::2].tolist():
        n = int(rng.integers(1, cfg.max_len + 1))
        items = rng.integers(1, ds.n_items + 1, size=(n, 1 + cfg.ptf_kd_negatives))
        store.knowledge[c] = ptf.Knowledge(rng.integers(1, ds.n_items + 1, size=n), items,
                                           torch.as_tensor(rng.normal(size=items.shape), dtype=D))
    return store


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_vmap_matches_the_per_client_loop(ds, backbone):
    """A round of clients batched with vmap (padded, chunked) equals each client stepped alone, unpadded."""
    cfg = Config(**TINY, ptf_client_backbone=backbone, dropout=0.0, dtype="float64", chunk_size=7, ptf_kd_negatives=2)
    users = np.random.default_rng(0).choice(np.flatnonzero(ds.train_len >= 2), 30, replace=False)
    seqs = [ds.train_seq(int(u))[-(cfg.max_len + 1):] for u in users]
    out = {}
    for engine in ("vmap", "loop"):
        store = store_with_knowledge(ds, cfg, users)
        out[engine] = (store, *ptf.clients_round(store, dataclasses.replace(cfg, engine=engine), users, seqs, 3, D))
    (sv, up_v, loss_v), (sl, up_l, loss_l) = out["vmap"], out["loop"]
    assert all(np.array_equal(a, b) for a, b in zip(up_v, up_l))
    assert np.allclose(loss_v["own"], loss_l["own"], atol=1e-9)
    assert np.allclose(loss_v["kd"], loss_l["kd"], atol=1e-9, equal_nan=True)
    assert np.isfinite(loss_v["kd"][::2]).all() and np.isnan(loss_v["kd"][1::2]).all()   # knowledge held by half
    for c in users.tolist():
        a, b = sv.states[c], sl.states[c]
        assert np.array_equal(a.items, b.items)
        assert torch.allclose(a.table, b.table, atol=1e-9, rtol=0)
        assert all(torch.allclose(a.dense[k], b.dense[k], atol=1e-9, rtol=0) for k in a.dense)
    fresh = ptf.client_model(cfg).init(1, torch.Generator().manual_seed(0), D)
    assert any(not torch.allclose(sv.states[c].table[1:2], fresh["item_emb"][1:2]) for c in users.tolist())


def test_uploads_are_item_ids_only_and_the_true_last_item_ends_them(ds):
    """What leaves a client is its sequence's length in item ids: perturbed inputs, then its true last item.
    With ptf_replace=0 it is the sequence itself; with 1 every input but the first is replaced by an item
    the client knows."""
    users = np.flatnonzero(ds.train_len >= 4)[:20]
    seqs = [ds.train_seq(int(u))[-11:] for u in users]
    for replace in (0.0, 1.0):
        cfg = Config(**TINY, ptf_replace=replace)
        store = ptf.Clients(ptf.client_model(cfg), ds.n_items)
        uploads, _ = ptf.clients_round(store, cfg, users, seqs, 0)
        for c, s, up in zip(users.tolist(), seqs, uploads):
            assert up.dtype == np.int64 and len(up) == len(s) and up[-1] == s[-1] and up[0] == s[0]
            assert np.isin(up, store.states[c].items).all()
            if replace == 0.0:
                assert np.array_equal(up, s)
        if replace == 1.0:
            assert sum(not np.array_equal(up, s) for up, s in zip(uploads, seqs)) > len(seqs) // 2
        assert ptf.upload_bytes(uploads) == 4 * sum(len(s) for s in seqs)


def test_perturb_by_hand():
    """epsilon 0: each replacement is the inverse-CDF draw from the known items, uniform; the candidate kept
    is the one after which the true last item scores highest."""
    cfg = Config(dim=4, max_len=4, dropout=0.0, dtype="float64")
    model = ptf.client_model(dataclasses.replace(cfg, ptf_client_backbone="sasrec", ptf_client_dim=4))
    p = model.init(5, torch.Generator().manual_seed(0), D)
    table = p.pop("item_emb")                                   # slots 0..5; slot 5 is padding of a batch
    col = torch.tensor([False, True, True, True, True, False])
    x, y = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 3, 4])
    u_swap = torch.tensor([0.0, 0.0, 0.9, 0.1], dtype=D)        # input 1 is the first real one: never replaced
    # 4 known slots: (0, .25] -> 1, (.25, .5] -> 2, (.5, .75] -> 3, (.75, 1] -> 4; column j is input j's draw
    u_pick = torch.tensor([[0.1, 0.1, 0.1, 1.0], [0.6, 0.6, 0.6, 0.8], [1.0, 1.0, 0.6, 0.3]], dtype=D)
    up = ptf.perturb(model, 0.0, 0.5, p, table, x, y, col, u_swap, u_pick)
    cands = torch.tensor([[0, 1, 2, 4], [0, 1, 2, 4], [0, 1, 2, 2]])   # input 2 kept (0.9 > 0.5), input 3 replaced
    h = model.encode({**p, "item_emb": table}, cands)[:, -1]
    assert torch.equal(up, cands[int((h @ table[4]).argmax())])


def reference_candidates(pred: np.ndarray, seq: np.ndarray, known: np.ndarray, ratio: float, eps: float,
                         u_swap: np.ndarray, u_pick: np.ndarray, at) -> np.ndarray:
    """A transcription of the candidate loop of `FedRecClient.transfer_to_server` (github.com/hi-weiyuan/PTF-FSR,
    client.py) with its draws given: `random.random()` per input -> u_swap, `np.random.choice(known, p=...)`
    -> numpy's inverse CDF (first index whose normalised cdf exceeds the uniform) of u_pick (C, n). pred (n, S)
    the local scores along the original inputs; `at(i)` the row input i's replacement is drawn from (the code: i)."""
    sequences = [[seq[0]] for _ in range(len(u_pick))]
    for i in range(1, len(seq)):
        if u_swap[i] < ratio:
            z = pred[at(i), known] * eps
            prob = np.exp(z - z.max())
            cdf = (prob / prob.sum()).cumsum()
            cdf /= cdf[-1]
            rep = [known[cdf.searchsorted(u, side="right")] for u in u_pick[:, i]]
            sequences = [s + [rep[c]] for c, s in enumerate(sequences)]
        else:
            sequences = [s + [seq[i]] for s in sequences]
    return np.array(sequences)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perturbation_is_the_reference_codes_with_the_draw_one_position_earlier(seed):
    """Our upload is the reference code's when each replacement is drawn from the prediction made just before
    the item (the code draws it from the prediction at the item's own position, i.e. for the next one)."""
    cfg = Config(dropout=0.0, dtype="float64", max_len=8)
    model = ptf.client_model(cfg)
    g = torch.Generator().manual_seed(seed)
    p = model.init(12, g, D)
    table = p.pop("item_emb") + 0.5 * torch.randn(13, 8, generator=g, dtype=D)      # scores far from uniform
    table[0] = 0
    x, y = torch.tensor([3, 7, 1, 12, 5, 9, 2, 4]), torch.tensor([7, 1, 12, 5, 9, 2, 4, 6])
    col = torch.arange(13) > 0
    rng = np.random.default_rng(seed)
    u_swap, u_pick = rng.random(8), 1.0 - rng.random((10, 8))
    ours = ptf.perturb(model, 2.0, 0.5, p, table, x, y, col, torch.as_tensor(u_swap), torch.as_tensor(u_pick))
    pred = (model.encode({**p, "item_emb": table}, x[None])[0] @ table.T).numpy()   # (8, 13)
    known = np.arange(1, 13)
    for at, same in ((lambda i: i - 1, True), (lambda i: i, False)):
        cands = torch.as_tensor(reference_candidates(pred, x.numpy(), known, 0.5, 2.0, u_swap, u_pick, at))
        h = model.encode({**p, "item_emb": table}, cands)[:, -1]
        kept = cands[int((h @ table[int(y[-1])]).argmax())]                         # the code's top-1 candidate
        assert torch.equal(ours, kept) == same


def test_knowledge_answers_with_the_most_similar_other_upload(ds):
    model = from_config(Config(**TINY))                         # the server's model
    params = model.init(ds.n_items, torch.Generator().manual_seed(0))
    batch = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 3, 4, 6], [7, 8, 9, 10, 11], [0, 0, 0, 12, 13]])
    ids = np.array([4, 9, 17, 30])
    know = ptf.knowledge(model, params, batch, ids, 2, ds.n_items, seed=0, r=0)
    h = torch.nn.functional.normalize(model.encode(params, batch[:, :-1])[:, -1], dim=-1)
    sim = h @ h.T
    sim.fill_diagonal_(float("-inf"))
    for i, c in enumerate(ids.tolist()):
        j = int(sim[i].argmax())
        kn = know[c]
        real = batch[j, :-1] > 0
        assert np.array_equal(kn.x, batch[j, :-1][real].numpy())
        assert np.array_equal(kn.items[:, 0], batch[j, 1:][real].numpy()) and kn.items.shape == (int(real.sum()), 3)
        assert kn.nbytes() == 4 * (len(kn.x) + 1 + 2 * len(kn.x)) + 4 * 3 * len(kn.x)
    assert ptf.knowledge(model, params, batch[:1], ids[:1], 2, ds.n_items, 0, 0) == {}


def test_only_predictions_cross_the_wire(ds, tmp_path, monkeypatch):
    """Clients get knowledge (ids and scores) and upload ids; the server's parameters never reach them, and a
    round moves a few kilobytes where FedAvg moves the model."""
    seen = []
    real_round = ptf.clients_round

    def spy(store, cfg, ids, seqs, r, dtype=torch.float32):
        for kn in (store.knowledge.get(int(c)) for c in ids):
            if kn is not None:
                seen.append(kn)
        uploads, losses = real_round(store, cfg, ids, seqs, r, dtype)
        assert all(u.dtype == np.int64 and ((u >= 1) & (u <= ds.n_items)).all() for u in uploads)
        return uploads, losses
    monkeypatch.setattr(ptf, "clients_round", spy)
    res = run(Config(**TINY, rounds=3), ds, tmp_path, progress=False)
    assert seen and all(isinstance(kn.x, np.ndarray) and kn.scores.shape == kn.items.shape for kn in seen)
    params = saved_params(tmp_path)
    assert params["item_emb"].shape[1] == 8 and "pos_emb" in params             # the server's SASRec
    n_params = sum(v.numel() for v in params.values())
    b = res["bytes"]
    assert 0 < b["up_per_round"] < 4 * 32 * 11 + 1 and 0 < b["down_per_round"] < 4 * n_params
    assert [h["clients"] for h in res["history"]] == [32] * 3


def test_the_server_learns_from_the_clients_predictions(ds, tmp_path):
    cfg = Config(**{**TINY, "eval_every": 10, "clients_per_round": 64, "dim": 16}, rounds=30, central_lr=0.01)
    res = run(cfg, ds, tmp_path, progress=False)
    loss = [h["loss"] for h in res["history"]]
    hr = [h["valid"]["HR@10"] for h in res["history"] if "valid" in h]
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.1
    assert hr[-1] > hr[0] and res["test"]["HR@10"] > res["most_popular"]["test"]["HR@10"] + 0.03


@pytest.mark.parametrize("attack", ["none", "random", "popular"])
def test_runs_are_deterministic_for_a_seed(ds, tmp_path, attack):
    cfg = Config(**{**TINY, "targets": 1}, rounds=4, attack=attack, attack_ratio=0.1)
    a = run(cfg, ds, tmp_path / "a", progress=False)
    b = run(cfg, ds, tmp_path / "b", progress=False)
    assert same_saved_model(tmp_path / "a", tmp_path / "b")
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    if attack != "none":
        assert a["attack"]["malicious_uploads"] > 0 and a["attack"]["ER@10"] == b["attack"]["ER@10"]
    run(dataclasses.replace(cfg, seed=1), ds, tmp_path / "c", progress=False)
    assert not same_saved_model(tmp_path / "a", tmp_path / "c")


def test_fake_users_end_with_a_target_and_popular_draws_from_what_they_were_told(ds):
    cfg = Config(**{**TINY, "targets": 1}, attack="popular", attack_len=4)
    store = ptf.Clients(ptf.client_model(cfg), ds.n_items)
    bad = np.array([300, 301, 302])
    seqs = ptf.fake_sequences(cfg, store, bad, bad, [7], 0)                 # nothing seen yet: random items
    assert all(len(s) == 4 and s[-1] == 7 and 7 not in s[:-1] for s in seqs)
    store.knowledge[301] = ptf.Knowledge(np.array([5, 5, 9]), np.array([[5, 40], [9, 41], [11, 42]]),
                                         torch.zeros(3, 2))
    assert ptf.popular_pool(store, bad, 2).tolist() == [5, 9]              # counts 3, 2, 1: the two most frequent
    pool = ptf.popular_pool(store, bad, 40).tolist()
    assert pool == [5, 9, 11] and 40 not in pool                             # random knowledge negatives are not counted
    seqs = ptf.fake_sequences(cfg, store, bad, bad, [7], 1)
    assert all(set(s[:-1].tolist()) <= {5, 9, 11} and s[-1] == 7 for s in seqs)


@pytest.mark.parametrize("values,expect", [
    ({"attack": "ahum"}, "attack='ahum' uploads model updates, but under training='ptf' clients upload item sequences"),
    ({"attack": "boost"}, "the attacks that apply there: random, popular"),
    ({"defence": "median"}, "defence='median' needs training='federated' (got training='ptf')"),
    ({"objective": "fortress"}, "objective='fortress' needs training='federated' (got training='ptf')"),
    ({"whole_history": True}, "whole_history=True does not apply to training='ptf'"),
    ({"checkpoint_every": 5}, "checkpoint_every=5 does not apply to training='ptf'"),
    ({"drop_rate": 0.1}, "drop_rate=0.1 does not apply to training='ptf'"),
    ({"ptf_replace": 1.5}, "ptf_replace=1.5 is out of range; it must be in [0, 1]"),
    ({"ptf_client_backbone": "lstm"}, "ptf_client_backbone='lstm' is not allowed; choose one of: sasrec, gru4rec"),
    ({"ptf_candidates": 0}, "ptf_candidates=0 is out of range; it must be >= 1"),
    ({"ptf_client_lr": 0}, "ptf_client_lr=0.0 is out of range; it must be > 0"),
    ({"ptf_kd_negatives": "x"}, "ptf_kd_negatives='x': expected an integer"),
])
def test_bad_ptf_settings_are_one_line_errors(values, expect):
    with pytest.raises(InputError) as err:
        config.override(Config(training="ptf"), values)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_ptf_from_the_command_line(tmp_path, capsys):
    from fortress.cli import main
    args = ["run", "--data", "synthetic", "--out", str(tmp_path / "o"), "--quiet", "--set", "training=ptf",
            "--set", "synthetic_users=60", "--set", "synthetic_items=30", "--set", "rounds=2", "--set", "threads=1",
            "--set", "clients_per_round=8", "--set", "eval_every=0"]
    assert main(args) == 0
    assert main([*args[:-2], "--set", "attack=psmu", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attack='psmu' uploads model updates" in err[0]
