"""FORTRESS objective: InfoNCE by hand, augmentation invariants, each term's gradients, vmap == loop."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from fortress.client import eligible_clients, objective, rec_loss, round_chunks, train_round
from fortress.config import Config, validate
from fortress.errors import InputError
from fortress.data import synthetic
from fortress.models import dense_keys, from_config
from fortress.objectives import (augment, crop, fortress_draws, fortress_loss, info_nce, mask, reorder,
                                 temporal_loss, windows)
from fortress.server.aggregate import GlobalOptimizer, fedavg
from fortress.simulate import run
from conftest import interrupt_and_resume, same_saved_model

OFF = dict(seq_view=False, user_view=False, item_view=False, temporal=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and much faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_info_nce_hand_computed():
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    n = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    tau = 0.5
    # anchor 0: cos with p = 1, with negatives 0, -1 (the third is masked out)
    l0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    # anchor 1: cos with p = 1/sqrt2, with negatives 1, 0
    c = 1 / math.sqrt(2) / tau
    l1 = -math.log(math.exp(c) / (math.exp(c) + math.exp(2) + math.exp(0)))
    got = info_nce(a, p, n, torch.tensor([True, True, False]), tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, abs=1e-12)
    # no negatives at all: the positive is the only candidate, the loss is exactly 0
    assert info_nce(a, p, n, torch.zeros(3, dtype=torch.bool), tau).item() == 0.0


def left_pad(items, L):
    return torch.tensor([0] * (L - len(items)) + list(items))


@pytest.mark.parametrize("n,L", [(1, 4), (3, 5), (7, 7), (12, 20)])
def test_augmentations_keep_length_padding_and_items(n, L):
    gen = np.random.default_rng(n)
    items = gen.choice(np.arange(1, 50), n, replace=False)
    x = left_pad(items, L)
    R = 25
    for _ in range(30):
        u = torch.from_numpy(gen.random(2 + R))
        keys = u[2 + R - L:]
        c, m, r = crop(x, 0.6, u[1]), mask(x, 0.3, keys, 99), reorder(x, 0.6, u[1], keys)
        for out in (c, m, r, augment(x, u, 0.6, 0.3, 0.6, 99)):
            assert out.shape == x.shape
            real = out > 0
            assert torch.all(real[1:] >= real[:-1])                     # padding only on the left
            assert real.sum() >= 1
        # crop: a contiguous run of the sequence's items, of round(0.6 n) >= 1 items
        kept = c[c > 0].tolist()
        assert len(kept) == max(1, math.floor(0.6 * n + 0.5))
        assert any(kept == items[i:i + len(kept)].tolist() for i in range(n - len(kept) + 1))
        # mask: same real positions, round(0.3 n) of them hold the mask id, the rest unchanged
        assert torch.equal(m > 0, x > 0) and int((m == 99).sum()) == math.floor(0.3 * n + 0.5)
        assert torch.equal(m[m != 99], x[m != 99])
        # reorder: a permutation of the items that moves only a contiguous span of them
        assert torch.equal(r > 0, x > 0) and sorted(r[r > 0].tolist()) == sorted(items.tolist())
        moved = (r != x).nonzero().flatten()
        if len(moved):
            assert moved.max() - moved.min() + 1 <= math.floor(0.6 * n + 0.5)
        # more left padding changes nothing but the padding: views do not depend on chunk padding
        xp = left_pad(items, L + 3)
        for op in (lambda s: crop(s, 0.6, u[1]), lambda s: mask(s, 0.3, u[2 + R - s.shape[0]:], 99),
                   lambda s: reorder(s, 0.6, u[1], u[2 + R - s.shape[0]:]),
                   lambda s: augment(s, u, 0.6, 0.3, 0.6, 99)):
            assert torch.equal(op(xp)[3:], op(x)) and torch.all(op(xp)[:3] == 0)


def test_augment_draws_each_op_and_vectorises():
    x = torch.stack([left_pad([4, 5, 6, 7, 8], 8), left_pad([9, 3], 8)])
    u = torch.rand(2, 2 + 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = vmap(augment, in_dims=(0, 0, None, None, None, None))(x, u, 0.6, 0.3, 0.6, 99)
    for i in range(2):
        assert torch.equal(batched[i], augment(x[i], u[i], 0.6, 0.3, 0.6, 99))
    u0 = u[0].clone()
    for op, fn in enumerate([lambda: crop(x[0], 0.6, u0[1]), lambda: mask(x[0], 0.3, u0[-8:], 99),
                             lambda: reorder(x[0], 0.6, u0[1], u0[-8:])]):
        u0[0] = (op + 0.5) / 3
        assert torch.equal(augment(x[0], u0, 0.6, 0.3, 0.6, 99), fn())


def test_windows_and_temporal_loss():
    x = left_pad([5, 6, 7], 5)
    win, real = windows(x, width=2, stride=1)
    assert win.tolist() == [[6, 7], [5, 6], [0, 5], [0, 0], [0, 0]]
    assert real.tolist() == [True, True, True, False, False]
    win, real = windows(left_pad([5, 6, 7], 3), width=2, stride=1)
    assert win.tolist() == [[6, 7], [5, 6], [0, 5]] and real.all()
    win, _ = windows(left_pad([1, 2, 3, 4, 5], 5), width=3, stride=2)
    assert win.tolist() == [[3, 4, 5], [1, 2, 3], [0, 0, 1]]
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 5.0], [9.0, 9.0]])
    # pairs (0,1): 25, (1,2): 1; (2,3) is not real
    assert temporal_loss(f, torch.tensor([True, True, True, False])).item() == pytest.approx(13.0)
    assert temporal_loss(f[:1], torch.tensor([True])).item() == 0.0


@pytest.fixture(scope="module")
def client():
    """One client's tensors: a 6-item sequence in a sub-table of its 6 items + 5 negatives."""
    cfg = Config(objective="fortress", dim=8, max_len=8, heads=2, dropout=0.0, dtype="float64",
                 lambda_cl=1.0, lambda_temp=1.0, temp_window=2)
    x = left_pad([1, 2, 3, 4, 5], 7)
    y = left_pad([2, 3, 4, 5, 6], 7)
    col_mask = torch.tensor([False] + [True] * 11)
    draws = {"aug": torch.rand(2, 2 + cfg.max_len, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
             "noise": torch.randn(2, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))}
    return cfg, x, y, col_mask, draws


def grads(cfg, x, y, col_mask, draws, backbone="sasrec"):
    cfg = dataclasses.replace(cfg, backbone=backbone)
    model = from_config(cfg)
    p = model.init(11, torch.Generator().manual_seed(0), torch.float64)
    dense = {k: p[k] for k in dense_keys(p)}
    table = p["item_emb"] * 20                                    # trained-size rows, non-trivial cosines

    def loss(d, t):
        return fortress_loss(model, d, t, x, y, col_mask, draws, cfg)[0]
    g_dense, g_table = grad(loss, argnums=(0, 1))(dense, table)
    r_dense, r_table = grad(lambda d, t: rec_loss(model, d, t, x, y, col_mask), argnums=(0, 1))(dense, table)
    return g_dense, g_table, r_dense, r_table


def diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a) if isinstance(a, dict) else (a - b).abs().max().item()


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_each_term_moves_the_right_gradients_and_vanishes_when_off(client, backbone):
    cfg, x, y, col_mask, draws = client
    # everything off, or both weights 0: exactly the next-item gradient
    for off in (dataclasses.replace(cfg, **OFF), dataclasses.replace(cfg, lambda_cl=0.0, lambda_temp=0.0)):
        gd, gt, rd, rt = grads(off, x, y, col_mask, draws, backbone)
        assert diff(gd, rd) < 1e-12 and diff(gt, rt) < 1e-12
    own, negatives = slice(1, 7), slice(7, 12)                    # sub-table rows of the sequence / negatives
    for term in ("seq_view", "user_view", "item_view", "temporal"):
        one = dataclasses.replace(cfg, **{**OFF, term: True})
        gd, gt, rd, rt = grads(one, x, y, col_mask, draws, backbone)
        changed_dense = diff(gd, rd) > 1e-8
        changed_own = diff(gt[own], rt[own]) > 1e-8
        changed_neg = diff(gt[negatives], rt[negatives]) > 1e-8
        if term == "item_view":
            # perturbation direction is a constant: only the item table moves, negatives included
            assert not changed_dense and changed_own and changed_neg, term
        else:
            # encoder views: the encoder and the rows it reads move, rows only scored do not
            assert changed_dense and changed_own and not changed_neg, term
        _, terms = fortress_loss(from_config(one), *_params(one), x, y, col_mask, draws, one)
        assert set(terms) == {"rec", {"seq_view": "seq", "user_view": "user", "item_view": "item",
                                      "temporal": "temp"}[term]}


def test_switching_one_term_off_removes_exactly_its_share(client):
    cfg, x, y, col_mask, draws = client
    cfg = dataclasses.replace(cfg, lambda_cl=0.3, lambda_temp=0.7)
    model = from_config(cfg)
    full, terms = fortress_loss(model, *_params(cfg), x, y, col_mask, draws, cfg)
    assert set(terms) == {"rec", "seq", "user", "item", "temp"}
    assert all(terms[k].item() > 0 for k in terms)
    for switch, name, weight in (("seq_view", "seq", 0.3), ("user_view", "user", 0.3),
                                 ("item_view", "item", 0.3), ("temporal", "temp", 0.7)):
        off = dataclasses.replace(cfg, **{switch: False})
        loss, t = fortress_loss(model, *_params(off), x, y, col_mask, draws, off)
        assert name not in t and set(t) == set(terms) - {name}
        assert (full - loss).item() == pytest.approx(weight * terms[name].item(), rel=1e-9, abs=1e-12), switch
        assert all(t[k].item() == pytest.approx(terms[k].item(), rel=1e-12) for k in t)


def test_decay_schedule_scales_both_weights_linearly_over_the_rounds(client):
    cfg, x, y, col_mask, draws = client
    cfg = dataclasses.replace(cfg, lambda_cl=0.3, lambda_temp=0.7, rounds=10)
    model, args = from_config(cfg), (*_params(cfg), x, y, col_mask, draws)
    full, terms = fortress_loss(model, *args, cfg)
    rec = terms["rec"].item()
    extra = full.item() - rec
    decay = dataclasses.replace(cfg, lambda_schedule="decay")
    for r, share in ((0, 1.0), (5, 0.5), (9, 0.1)):
        got = objective(decay, 0, r)(model, *args)[0].item()
        assert got == pytest.approx(rec + share * extra, rel=1e-12), r
        assert objective(cfg, 0, r)(model, *args)[0].item() == pytest.approx(full.item(), rel=1e-12)  # constant
    with pytest.raises(InputError, match="lambda_schedule"):
        validate(Config(lambda_schedule="cosine"))


def _params(cfg):
    p = from_config(cfg).init(11, torch.Generator().manual_seed(0), torch.float64)
    return {k: p[k] for k in dense_keys(p)}, p["item_emb"]


def test_short_client_has_no_prefix_negatives_but_sampled_ones(client):
    cfg, _, _, col_mask, draws = client
    x, y = left_pad([1], 3), left_pad([2], 3)                     # a single training pair
    old = dataclasses.replace(cfg, view_negatives="prefixes")
    _, terms = fortress_loss(from_config(old), *_params(old), x, y, col_mask, draws, old)
    assert terms["seq"].item() == 0.0 and terms["user"].item() == 0.0 and terms["temp"].item() == 0.0
    assert terms["item"].item() > 0
    # the sampled rows of its sub-table are negatives however short the history
    _, terms = fortress_loss(from_config(cfg), *_params(cfg), x, y, col_mask, draws, cfg)
    assert terms["seq"].item() > 0 and terms["user"].item() > 0 and terms["temp"].item() == 0.0


class Lookup:
    """An encoder whose state after position t is item x_t's row: the served state is the last item's."""

    def encode(self, p, seqs, training=False):
        return p["item_emb"][seqs]                                 # (B, L, d)


@pytest.mark.parametrize("view", ["user_view", "seq_view"])
def test_views_do_not_push_the_served_state_from_its_own_past(view):
    """A step on the user or sequence view leaves the served state's cosine to the client's own
    earlier states unchanged; with prefix negatives (the old objective) it pushes it below 0."""
    x, y = left_pad([1, 2, 3], 3), left_pad([2, 3, 4], 3)         # own items 1..4, served state = row 3
    table = torch.cat([torch.zeros(1, 8), torch.eye(8)[1:8]]).double()      # (8, 8) orthogonal rows
    col_mask = torch.tensor([False] + [True] * 7)                 # negatives: rows 5, 6, 7
    # mask view (u[0] in [1/3, 2/3)) hiding the oldest item: both views end on item 3; no noise
    draws = {"aug": torch.tensor([[0.5, 0.5, 0.1, 0.5, 0.9]] * 2, dtype=torch.float64),
             "noise": torch.zeros(2, 8, dtype=torch.float64)}

    def served_cosines(view_negatives):
        cfg = Config(objective="fortress", dim=8, max_len=3, dtype="float64", lambda_cl=1.0, tau=0.5,
                     **{**OFF, view: True}, view_negatives=view_negatives)
        # the view's own gradient: the full loss's minus L_rec's (the logged terms are detached)
        g = (grad(lambda t: fortress_loss(Lookup(), {}, t, x, y, col_mask, draws, cfg)[0])(table)
             - grad(lambda t: rec_loss(Lookup(), {}, t, x, y, col_mask))(table))
        new = table - 0.5 * g
        cos = torch.nn.functional.cosine_similarity(new[3:4], new[1:3])                  # vs rows 1, 2
        return cos, bool((g[5:8] != 0).any())

    cos, moved = served_cosines("items")
    assert torch.allclose(cos, torch.zeros(2, dtype=torch.float64), atol=1e-12)
    assert not moved                                              # the sampled rows are constants
    cos, _ = served_cosines("prefixes")
    assert (cos < -1e-3).all()


def one_round(ds, cfg, engine, chunk_size):
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    users = np.random.default_rng(1).choice(eligible_clients(ds), 12, replace=False)
    chunks = round_chunks(ds, dataclasses.replace(cfg, chunk_size=chunk_size), users, r=0)
    updates = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, params,
                          chunks, engine)
    GlobalOptimizer(cfg.global_opt, cfg.global_lr).apply(params, dense_keys(params), params["item_emb"],
                                                         fedavg(updates))
    return params, updates


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_fortress_vmap_matches_loop_and_chunking(backbone):
    ds = synthetic(300, 80, seed=3)
    cfg = Config(objective="fortress", backbone=backbone, dim=16, max_len=10, n_neg=12, local_epochs=2, lr=0.05,
                 dropout=0.0, heads=2, dtype="float64", lambda_cl=1.0, lambda_temp=1.0)
    p_vmap, u_vmap = one_round(ds, cfg, "vmap", 8)
    p_loop, u_loop = one_round(ds, cfg, "loop", 8)
    p_chunk, _ = one_round(ds, cfg, "vmap", 5)
    start = from_config(cfg).init(ds.n_items, torch.Generator().manual_seed(0), torch.float64)
    for k in p_vmap:
        assert torch.allclose(p_vmap[k], p_loop[k], atol=1e-6, rtol=0), k
        assert torch.allclose(p_vmap[k], p_chunk[k], atol=1e-9, rtol=0), k
    assert not torch.allclose(p_vmap["item_emb"], start["item_emb"])
    assert set(u_vmap.terms) == {"rec", "seq", "user", "item", "temp"}
    for k in u_vmap.terms:
        assert torch.allclose(u_vmap.terms[k], u_loop.terms[k], atol=1e-9), k
        assert torch.isfinite(u_vmap.terms[k]).all() and (u_vmap.terms[k] >= 0).all()
    # the next-item term is the plain FedAvg loss of the same clients at the broadcast model
    fed = dataclasses.replace(cfg, objective="next_item", local_epochs=1)
    _, u_fed = one_round(ds, fed, "vmap", 8)
    _, u_one = one_round(ds, dataclasses.replace(cfg, local_epochs=1), "vmap", 8)
    assert torch.allclose(u_one.terms["rec"], u_fed.loss, atol=1e-9)


def test_union_vmap_matches_loop_and_chunking():
    """UNION's client objective (objectives.union_loss) in both engines and any chunking: the same uploads."""
    ds = synthetic(200, 60, seed=3)
    cfg = Config(objective="union", dim=8, max_len=8, n_neg=12, local_epochs=2, lr=0.05, dropout=0.0,
                 dtype="float64", union_negatives=5)
    p_vmap, u_vmap = one_round(ds, cfg, "vmap", 8)
    p_loop, u_loop = one_round(ds, cfg, "loop", 8)
    p_chunk, _ = one_round(ds, cfg, "vmap", 5)
    for k in p_vmap:
        assert torch.allclose(p_vmap[k], p_loop[k], atol=1e-9, rtol=0), k
        assert torch.allclose(p_vmap[k], p_chunk[k], atol=1e-9, rtol=0), k
    assert set(u_vmap.terms) == {"rec", "union"} and (u_vmap.terms["union"] > 0).all()
    assert torch.allclose(u_vmap.terms["union"], u_loop.terms["union"], atol=1e-9)
    # the term moves only rows of the sub-table (the upload is FedAvg's), and it does move them
    _, u_fed = one_round(ds, dataclasses.replace(cfg, objective="next_item"), "vmap", 8)
    assert torch.equal(u_fed.rows_item, u_vmap.rows_item) and not torch.allclose(u_fed.rows_delta, u_vmap.rows_delta)


@pytest.mark.parametrize("view_negatives", ["items", "prefixes"])
def test_fortress_views_read_the_last_window(client, view_negatives):
    """With several windows (whole_history), L_rec is the mean over every window's targets and the sequence,
    user and temporal views are those of the last window alone; an item only in an earlier window is
    the client's own, never one of the views' negatives."""
    cfg, _, _, col_mask, draws = client
    cfg = dataclasses.replace(cfg, item_view=False, view_negatives=view_negatives)
    model = from_config(cfg)
    dense, table = _params(cfg)
    # windows of the history 9 8 1 2 3 4 5 6 at max_len 5: [9 8 1], [1 2 3 4 5 6]; slots 8, 9 only in the first
    x = torch.stack([left_pad([9, 8], 5), left_pad([1, 2, 3, 4, 5], 5)])
    y = torch.stack([left_pad([8, 1], 5), left_pad([2, 3, 4, 5, 6], 5)])
    loss, terms = fortress_loss(model, dense, table, x, y, col_mask, draws, cfg)
    alone = col_mask.clone()
    alone[[8, 9]] = False                   # the last window alone, with slots 8 and 9 kept out of the negatives
    _, last = fortress_loss(model, dense, table, x[1], y[1], alone, draws, cfg)
    for k in ("seq", "user", "temp"):
        assert terms[k].item() == pytest.approx(last[k].item(), rel=1e-12, abs=1e-15), k
    each = [rec_loss(model, dense, table, x[i], y[i], col_mask) for i in range(2)]
    assert terms["rec"].item() == pytest.approx(((2 * each[0] + 5 * each[1]) / 7).item(), rel=1e-12)
    assert terms["rec"].item() == pytest.approx(rec_loss(model, dense, table, x, y, col_mask).item(), rel=1e-12)
    # one window given as (1, L) is the one-sequence objective
    one, t1 = fortress_loss(model, dense, table, x[1:], y[1:], col_mask, draws, cfg)
    ref, t0 = fortress_loss(model, dense, table, x[1], y[1], col_mask, draws, cfg)
    assert one.item() == ref.item() and all(t1[k].item() == t0[k].item() for k in t0)


def test_rec_term_is_fedavgs_logq_corrected_loss(client):
    cfg, x, y, col_mask, draws = client
    model = from_config(cfg)
    dense, table = _params(cfg)
    for n_items in (0, 50):
        _, terms = fortress_loss(model, dense, table, x, y, col_mask, draws, cfg, n_items=n_items)
        assert terms["rec"].item() == pytest.approx(rec_loss(model, dense, table, x, y, col_mask, n_items).item(),
                                                    rel=1e-12)
    plain = fortress_loss(model, dense, table, x, y, col_mask, draws, cfg)[1]["rec"]
    assert abs(plain.item() - terms["rec"].item()) > 1e-3                    # the correction does act
    assert objective(cfg, 50).keywords == {"cfg": cfg, "n_items": 50}
    assert objective(dataclasses.replace(cfg, neg_correction=False), 50).keywords["n_items"] == 0


def test_draws_are_per_user_streams():
    cfg = Config(objective="fortress", dim=8, max_len=6, local_epochs=2)
    a = fortress_draws(cfg, 3, np.array([5, 9, 2]))
    b = fortress_draws(cfg, 3, np.array([2, 5]))
    assert a["aug"].shape == (3, 2, 2, 8) and a["noise"].shape == (3, 2, 2, 8)
    for k in a:                                       # a client's draws do not depend on who else is there
        assert torch.equal(a[k][0], b[k][1]) and torch.equal(a[k][2], b[k][0])
    assert not torch.equal(a["aug"], fortress_draws(cfg, 4, np.array([5, 9, 2]))["aug"])   # nor repeat by round
    assert not torch.equal(a["aug"][:, 0], a["aug"][:, 1])                                 # nor by epoch


def test_fortress_resume_continues_exactly(tmp_path):
    ds = synthetic(300, 60, seed=0)
    cfg = Config(objective="fortress", rounds=4, checkpoint_every=2, dim=16, max_len=20, n_neg=16, clients_per_round=24,
                 eval_every=0, threads=1)                                  # dropout 0.2: torch's RNG matters too
    full = run(cfg, ds, tmp_path / "full", progress=False)
    resumed = interrupt_and_resume(cfg, ds, tmp_path / "cut", 2)
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    assert [h["terms"] for h in resumed["history"]] == [h["terms"] for h in full["history"]]


def test_init_from_a_fedavg_run(tmp_path):
    ds = synthetic(300, 60, seed=0)
    base = dict(dim=16, max_len=20, n_neg=16, clients_per_round=24, eval_every=0, threads=1)
    run(Config(objective="next_item", rounds=2, **base), ds, tmp_path / "fed", progress=False)
    start = torch.load(tmp_path / "fed" / "model.pt", weights_only=False)["params"]
    res = run(Config(objective="fortress", rounds=0, init_from=str(tmp_path / "fed"), **base), ds, tmp_path / "f0",
              progress=False)
    same = torch.load(tmp_path / "f0" / "model.pt", weights_only=False)["params"]
    assert all(torch.equal(start[k], same[k]) for k in start) and res["history"] == []
    res = run(Config(objective="fortress", rounds=1, init_from=str(tmp_path / "fed"), **base), ds, tmp_path / "f1",
              progress=False)
    assert set(res["history"][0]["terms"]) == {"rec", "seq", "user", "item", "temp"}


@pytest.mark.slow
def test_short_fortress_run_learns_and_logs_terms(tmp_path):
    ds = synthetic(1500, 150, seed=0)
    # one snapshot (round 60) of a trajectory that swings by up to 0.28 HR@10 between validations 5 rounds
    # apart; its threshold was set on the last-window code path, kept here: with whole_history (27 of the
    # 1,500 users hold more than one window) round 60 falls in a trough, 0.26 after 0.54 at round 55
    # (docs/results/whole-history.md)
    base = dict(dim=32, max_len=20, eval_every=0, rounds=60, clients_per_round=64, n_neg=64, threads=1,
                whole_history=False)
    pop = run(Config(training="pop", **base), ds, tmp_path / "pop", progress=False)
    res = run(Config(objective="fortress", **base), ds, tmp_path / "fortress", progress=False)
    assert res["test"]["HR@10"] > 1.5 * pop["test"]["HR@10"], (res["test"], pop["test"])
    terms = [h["terms"] for h in res["history"]]
    assert all(set(t) == {"rec", "seq", "user", "item", "temp"} for t in terms)
    assert all(np.isfinite(list(t.values())).all() for t in terms)
    assert terms[-1]["rec"] < terms[0]["rec"]
    gru = run(Config(objective="fortress", backbone="gru4rec", **{**base, "rounds": 2}, seq_view=False),
              ds, tmp_path / "gru", progress=False)
    assert set(gru["history"][-1]["terms"]) == {"rec", "user", "item", "temp"}
