"""Robust aggregators on hand-computed cases; the FORTRESS monitor, reliability weights and regulariser."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fortress.client import build_chunks, objective, train_round
from fortress import bounds, config
from fortress.config import Config
from fortress.data import synthetic
from fortress.errors import InputError
from fortress.models import from_config
from fortress.server import defences, robust
from fortress.server.aggregate import fedavg
from fortress.server.fortress import (FortressConfig, FortressServer, l_sep, l_var, neighbours, probe_top, reg_grad,
                                      regularise, var_operator)
from fortress.updates import Updates
from conftest import same_saved_model

D = torch.float64


def updates(dense, rows, weight=None) -> Updates:
    """Updates from dense (n, P) and rows [(client, item, delta list)]."""
    dense = torch.tensor(dense, dtype=D)
    n = len(dense)
    rc = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    ri = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    rd = torch.tensor([r[2] for r in rows], dtype=D).reshape(len(rows), len(rows[0][2]) if rows else 1)
    w = torch.ones(n, dtype=D) if weight is None else torch.tensor(weight, dtype=D)
    return Updates(torch.arange(n), w, dense, rc, ri, rd, torch.zeros(n, dtype=D))


def rows_of(agg) -> dict[int, list[float]]:
    return {int(i): [round(float(v), 6) for v in d] for i, d in zip(agg.rows_item, agg.rows_delta)}


# three clients; item 1 from clients 0 and 2, item 2 from client 1 only
TOY = dict(dense=[[1, 10], [2, -5], [100, 0]],
           rows=[(0, 1, [1, 1]), (1, 2, [7, 7]), (2, 1, [3, 5])])


def test_row_groups_group_rows_by_item_and_count():
    groups = robust.row_groups(torch.tensor([3, 1, 3, 2, 3]))
    got = {len(idx[0]): (items.tolist(), idx.tolist()) for items, idx in groups}
    assert got == {1: ([1, 2], [[1], [3]]), 3: ([3], [[0, 2, 4]])}


def test_median_dense_over_all_rows_over_their_uploaders():
    agg, weight = robust.median(updates(**TOY))
    assert agg.dense.tolist() == [2.0, 0.0]
    assert rows_of(agg) == {1: [2.0, 3.0], 2: [7.0, 7.0]}     # two uploaders: mean of the two middle values
    # share of each client's coordinates used: client 0 = 0 dense + 2 x 0.5 row coords of 4;
    # client 1 = dense[0] + its whole row = 3 of 4; client 2 = dense[1] + 2 x 0.5 = 2 of 4
    assert weight.tolist() == [0.25, 0.75, 0.5]


def test_trimmed_mean_cuts_each_end_per_coordinate():
    u = updates([[1, 0.1], [2, 0.2], [3, 0.3], [100, -100]], [(0, 5, [1]), (1, 5, [2]), (2, 5, [3]), (3, 5, [-50])])
    # 4 values and frac 0.25: one value is cut at each end of every coordinate
    agg, weight = robust.trimmed_mean(u, 0.25)
    assert agg.dense.tolist() == pytest.approx([2.5, 0.15])
    assert rows_of(agg) == {5: [1.5]}
    # kept: dense[0] of clients 1, 2; dense[1] of clients 0, 1; the row of clients 0, 1
    assert weight.tolist() == pytest.approx([2 / 3, 1.0, 1 / 3, 0.0])
    assert robust.trimmed_mean(u, 0.1)[0].dense.tolist() == pytest.approx([26.5, -24.85])   # floor(0.4) = 0: the mean


def test_krum_and_multi_krum():
    u = updates([[0.0], [0.1], [0.3], [10.0]], [], weight=[1, 1, 2, 1])
    # byz_frac 0.1: f = 0, each client's score sums its 2 nearest squared distances:
    # 0 -> .01 + .09, 0.1 -> .01 + .04 (lowest), 0.3 -> .04 + .09, 10 -> far
    agg, weight = robust.krum(u, 0.1)
    assert agg.dense.tolist() == [0.1] and weight.tolist() == [0, 1, 0, 0]
    # byz_frac 0.25: f = 1, score = the nearest squared distance, keep c - f = 3 lowest, FedAvg-weighted
    agg, weight = robust.multi_krum(u, 0.25)
    assert agg.dense.tolist() == pytest.approx([(0 + 0.1 + 2 * 0.3) / 4])
    assert weight.tolist() == [1, 1, 1, 0]


def test_krum_per_row_picks_among_the_rows_uploaders():
    u = updates([[0.0]] * 5, [(0, 1, [0.0]), (1, 1, [0.1]), (2, 1, [0.3]), (3, 1, [9.0]), (4, 2, [4.0])])
    agg, _ = robust.krum(u, 0.1)
    assert rows_of(agg) == {1: [0.1], 2: [4.0]}          # the same scores as above; a lone uploader is kept


def test_norm_bound_clips_whole_client_updates():
    u = updates([[3, 4], [0, 1]], [(0, 1, [0, 0])])
    agg, weight = robust.norm_bound(u, 2.0)
    assert agg.dense.tolist() == pytest.approx([0.6, 1.3])       # (0.4 * [3, 4] + [0, 1]) / 2
    assert weight.tolist() == pytest.approx([0.4, 1.0])
    agg, weight = robust.norm_bound(u, 0.0)                     # bound = median norm = 3
    assert weight.tolist() == pytest.approx([0.6, 1.0])


def test_rules_match_fedavg_when_every_client_agrees():
    u = updates([[1.0, 2.0]] * 5, [(i, 3, [0.5, -0.5]) for i in range(5)])
    for name in ("median", "trimmed_mean", "krum", "multi_krum", "norm_bound", "none"):
        agg = defences.make(Config(defence=name), 4).aggregate(u, {}).aggregate
        assert agg.dense.tolist() == pytest.approx([1.0, 2.0]) and rows_of(agg) == {3: [0.5, -0.5]}, name


def test_unknown_defence_is_a_one_line_error():
    with pytest.raises(InputError, match="defence='krumm' is not allowed; choose one of: none, fortress"):
        config.override(Config(), {"defence": "krumm"})
    with pytest.raises(InputError, match="needs training='federated'"):
        config.override(Config(), {"defence": "median", "training": "central"})


# --- FORTRESS ----------------------------------------------------------------------------------------

def test_l_sep_value_and_gradient():
    p = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.5, 0.0], [3.0, 0.0]], requires_grad=True)
    loss = l_sep(p, s, margin=1.0)                  # pairs: max(0, 1 - 0.5) = 0.5 and 0; mean 0.25
    assert float(loss.detach()) == pytest.approx(0.25)
    (g,) = torch.autograd.grad(loss, s)
    # d/ds0 of 0.5 * (1 - |s0 - p|) = -0.5 * unit(s0 - p) = [-0.5, 0]: descent moves s0 away from p
    assert g.flatten().tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.0])


def test_l_var_value_and_gradient():
    e = torch.tensor([[0.0], [1.0], [5.0]], requires_grad=True)
    nbr = neighbours(e.detach(), 1)
    assert nbr.flatten().tolist() == [1, 0, 1]
    loss = l_var(e, nbr)                            # ((0-1)^2 + (1-0)^2 + (5-1)^2) / 3 = 6
    assert float(loss.detach()) == pytest.approx(6.0)
    (g,) = torch.autograd.grad(loss, e)
    # L = [(e0-e1)^2 + (e1-e0)^2 + (e2-e1)^2] / 3
    assert g.flatten().tolist() == pytest.approx([-4 / 3, -4 / 3, 8 / 3])


def test_reg_grad_is_autograd_of_l_sep_and_l_var():
    """The closed-form gradient the server steps with equals autograd of the reference losses, on unit rows
    with pairs inside and outside the margin and a popular row that is several rows' neighbour."""
    g = torch.Generator().manual_seed(0)
    fc = FortressConfig.from_config(Config())
    for n_pop, n_sus in ((12, 7), (5, 1), (3, 0)):
        z = F.normalize(torch.randn(n_pop + n_sus, 6, generator=g, dtype=D), dim=1)
        nbr = neighbours(z[:n_pop], min(fc.knn, n_pop - 1))
        zz = z.clone().requires_grad_(True)
        loss = fc.alpha * l_sep(zz[:n_pop], zz[n_pop:], fc.margin) + fc.beta * l_var(zz[:n_pop], nbr)
        (want,) = torch.autograd.grad(loss, zz)
        value, got = reg_grad(z, n_pop, var_operator(n_pop, nbr, D), fc)
        assert value == pytest.approx(float(loss.detach()), rel=1e-12)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert len(set(nbr.flatten().tolist())) < nbr.numel()                   # shared neighbours were covered


def test_regularise_turns_suspicious_items_away_and_keeps_lengths():
    table = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [2.7, 1.8], [-5, -5]], dtype=D)
    fc = FortressConfig(popular_frac=0.5, row_clip=1, dense_clip=2, push_frac=0.05, p_flag=1e-3, floor_frac=0.5,
                        alpha=1, beta=0.0, margin=1.4, knn=1, server_steps=20, server_lr=0.5, probe_users=0,
                        exposure_cap=10.0, max_len=50)
    before = table.clone()
    popular, suspicious = torch.tensor([1, 2, 3]), torch.tensor([4])
    chord = lambda t: (F.normalize(t[popular], dim=1) - F.normalize(t[4], dim=0)).norm(dim=1)   # noqa: E731
    info = regularise(table, popular, suspicious, fc)
    assert chord(table).mean() > chord(before).mean() + 0.3 and info["reg_loss_after"] < info["reg_loss_before"]
    assert torch.allclose(table.norm(dim=1), before.norm(dim=1))                 # lengths kept
    assert torch.equal(table[5], before[5]) and torch.equal(table[0], before[0])   # other rows untouched


def test_effective_weight_and_contributions():
    u = updates([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], [(0, 1, [3.0, 4.0]), (1, 1, [0.0, 2.0]), (2, 2, [1.0, 0.0])],
                weight=[1.0, 10.0, 1e6])
    w = bounds.effective_weight(u, max_len=50)
    assert w.tolist() == [2.0, 10.0, 51.0]                         # clamped to [2, max_len + 1]
    assert bounds.row_contrib_norms(u, w).tolist() == [10.0, 20.0, 51.0]
    assert bounds.dense_contrib_norms(u, w).tolist() == [10.0, 10.0, 51.0]
    # median of each client's largest row (10, 20, 51) = 20; median encoder contribution 10
    assert bounds.clip_scales(u, 50, row_clip=1.0, dense_clip=2.0) == (20.0, 20.0)


def test_weight_ceiling_with_whole_history_follows_the_uploaded_rows():
    """Whole-history clients may claim more than max_len + 1 interactions, but no more than their own items
    (rows beyond the n_neg negatives) show; without whole history the ceiling is max_len + 1 as before."""
    row = [1.0, 0.0]
    # n_neg 2, max_len 3: client 0 uploads 3 rows (1 own item), client 1 9 rows (7 own), client 2 8 rows (6 own)
    rows = [(0, i, row) for i in (1, 2, 3)] + [(1, i, row) for i in range(1, 10)] + [(2, i, row) for i in range(1, 9)]
    u = updates([[1.0, 0.0]] * 3, rows, weight=[100.0, 7.0, 1e6])
    assert bounds.weight_ceiling(u, max_len=3) == 4.0
    assert bounds.effective_weight(u, 3).tolist() == [4.0, 4.0, 4.0]
    assert bounds.weight_ceiling(u, 3, whole_history=True, n_neg=2).tolist() == [4.0, 7.0, 6.0]
    assert bounds.effective_weight(u, 3, whole_history=True, n_neg=2).tolist() == [4.0, 7.0, 6.0]   # liars clamped
    honest = updates([[1.0, 0.0]] * 3, rows, weight=[2.0, 7.0, 5.0])
    assert bounds.effective_weight(honest, 3, whole_history=True, n_neg=2).tolist() == [2.0, 7.0, 5.0]


def test_poisson_surprise_and_allowance_hand_computed():
    rate = torch.tensor([0.05, 0.05, 0.05, 2.0], dtype=D)
    mass = torch.tensor([1.0, 2.0, 3.0, 3.0], dtype=D)
    # P(X >= 2 | 0.05) = 1 - e^-0.05 (1 + 0.05) = 0.00121; P(X >= 3 | 0.05) = 2.0e-5; P(X >= 3 | 2) = 0.323
    assert bounds.surprising(mass, rate, p_flag=1e-3).tolist() == [False, False, True, False]
    assert bounds.surprising(mass, rate, p_flag=2e-3).tolist() == [False, True, True, False]
    # the allowance is the mass where the tail reaches p_flag: just above 2 at (0.05, 1e-3), below 2 at 2e-3
    a = bounds.allowance(rate[:1], 1e-3, cap=10)
    assert 2.0 < float(a) < 2.2 and torch.special.gammainc(a, rate[:1]).item() == pytest.approx(1e-3, rel=1e-6)
    assert 1.0 <= float(bounds.allowance(rate[:1], 2e-3, cap=10)) < 2.0
    # rate 2: P(X >= 8) = 0.0011, P(X >= 9) = 0.00024
    assert 8.0 < float(bounds.allowance(torch.tensor([2.0], dtype=D), 1e-3, cap=20)) < 9.0
    assert float(bounds.allowance(torch.tensor([2.0], dtype=D), 1e-3, cap=5)) == 5.0     # capped


def test_flagged_allowance_is_the_two_bisections_at_once():
    g = torch.Generator().manual_seed(0)
    rate = torch.rand(50, generator=g, dtype=D) * 3 + 1e-3
    recent = torch.rand(50, generator=g, dtype=D) * 20
    for cap in (0.5, 7.0, 60.0):
        want = torch.minimum(bounds.allowance(rate, 1e-3, cap), bounds.window_allowance(rate, recent, 1e-3, 20, cap))
        assert torch.equal(bounds.flagged_allowance(rate, recent, 1e-3, 20, cap), want)


def cold_round(n_benign: int, seed: int = 0) -> tuple[list, list, list]:
    """Benign clients of weight 5: each pushes one own item (2..9) with a contribution (weight x delta) of
    1 and uploads item 1 (the cold target) and items 10..49 as sampled negatives with 0.001."""
    unit = [0.5, 0.5, 0.5, 0.5]                                      # a unit vector
    dense, rows, weight = [], [], []
    for c in range(n_benign):
        dense.append([0.2 + 0.01 * ((c + seed) % 5), 0.0, 0.0])
        rows.append((c, 2 + c % 8, [v / 5 for v in unit]))
        rows += [(c, item, [v * 1e-3 / 5 for v in unit]) for item in [1] + list(range(10, 50))]
        weight.append(5.0)
    return dense, rows, weight


def server(**keys) -> FortressServer:
    """A warm monitor on 600 items: every rate 1, the target (item 1) cold."""
    srv = FortressServer(FortressConfig.from_config(Config(server_steps=0, **keys)), 600)
    srv.rounds = 200
    srv.rate = torch.full((601,), 1.0, dtype=D)
    srv.rate[1] = 0.0
    srv.recent = bounds.WINDOW * srv.rate                           # the recent mass of steady rates
    return srv


def target_update(out) -> float:
    rows = dict(zip(out.aggregate.rows_item.tolist(), out.aggregate.rows_delta.norm(dim=1).tolist()))
    return rows.get(1, 0.0)


def test_many_small_share_rows_do_not_hide_a_crowd_on_a_cold_item():
    dense, rows, weight = cold_round(40)
    # 5 attackers: the target at 100x a benign push, diluted by 500 small rows each (0.2 of a push
    # together; an L1-share rule would see 0.998 of each attacker's row mass elsewhere)
    for a in range(5):
        dense.append([0.1, 0.1, 0.1])
        rows.append((40 + a, 1, [5.0, 5.0, 5.0, 5.0]))
        rows += [(40 + a, 100 + item, [4e-4, 0.0, 0.0, 0.0]) for item in range(500)]
        weight.append(10.0)
    srv = server()
    floor = 0.5 * float(srv.rate[1:].sum()) / 600                   # a warm monitor's floor: from its rates
    out = srv.aggregate(updates(dense, rows, weight), {})
    assert out.log["c_row"] == pytest.approx(1.0)                   # the benign clients' push sets the clip
    assert 1 in out.flagged.tolist()                                # five fans of a cold item in one round
    a = float(bounds.allowance(torch.tensor([floor], dtype=D), 1e-3, 5.0)[0])
    assert 2 < a < 5
    # the target's row: its push mass is 5 clipped pushes (contribution 1 each) and 40 benign negatives
    # (0.001 each); all of its contributions are scaled by a / 5.04, over the uploaders' weights (40 x 5
    # benign, 5 attackers x 10): the average moves a pushes' worth
    assert target_update(out) == pytest.approx(a / 250, rel=1e-6)
    assert (out.weights[40:] < 0.05).all() and (out.weights[:40] > 0.999).all()  # benign clients keep ~all


def test_an_inflated_weight_buys_nothing():
    dense, rows, weight = cold_round(40)
    dense.append([0.1, 0.0, 0.0])                                   # encoder contribution 10 x 0.1 = 1, as a benign one
    rows.append((40, 1, [0.05, 0.05, 0.05, 0.05]))                   # contribution 10 x 0.1 = 1, like a benign push
    weight.append(10.0)
    honest = server().aggregate(updates(dense, rows, weight), {})
    assert float(honest.weights[-1]) == 1.0
    for lie in (1e3, 1e9):                                          # the same delta, a larger reported weight
        liar = server().aggregate(updates(dense, rows, weight[:-1] + [lie]), {})
        assert target_update(liar) < target_update(honest)
        assert float(liar.weights[-1]) < 0.1                        # the log shows it lost its claimed weight
    fed = fedavg(updates(dense, rows, weight[:-1] + [1e9]))         # FedAvg hands the liar the row
    assert float(fed.rows_delta[fed.rows_item == 1].norm()) > 10 * target_update(honest)


def test_clients_pushing_the_encoder_one_way_weigh_about_one_client():
    # ... in their whole upload: a coherent client's rows are scaled as its encoder is (with the encoder
    # alone scaled, a crowd of honest fake users kept its target rows in full, and its own encoder push,
    # which on amazon-cell-phones works against its target, was taken away: docs/results/adaptive.md)
    g = torch.Generator().manual_seed(0)
    P, n, k = 400, 60, 8
    benign = torch.randn(n, P, generator=g, dtype=D)                # honest encoder deltas: unrelated directions
    common = torch.randn(P, generator=g, dtype=D)
    common = common / common.norm() * benign.norm(dim=1).median()
    dense = torch.cat([benign, common.expand(k, P)])                # k clients, one direction, a benign norm each
    rows = [(c, 2 + c, [0.1, 0.1, 0.1, 0.1]) for c in range(n + k)]          # one own item each
    u = updates(dense.tolist(), rows, [5.0] * (n + k))
    out = server().aggregate(u, {})
    assert out.log["coherent_scaled"] == k
    assert (out.weights[:n] == 1).all()                             # honest clients keep their encoder
    # the k clients' factor is 1 / their coherence excess, (k - 1)(1 - b): together about one client
    b = out.log["coherent_cos"]
    assert 0 < b < 0.3
    assert torch.allclose(out.weights[n:], torch.full((k,), 1 / ((k - 1) * (1 - b)), dtype=D), rtol=0.05)
    rows_out = dict(zip(out.aggregate.rows_item.tolist(), out.aggregate.rows_delta[:, 0].tolist()))
    for c in range(n + k):                                          # each item row has one uploader, unclipped
        assert rows_out[2 + c] == pytest.approx(0.1 * float(out.weights[c]), rel=1e-9)
    # the aggregate along the common direction, in units of one client's push (weights 5, n + k clients);
    # the honest noise along it has a standard deviation of about sqrt(n / P) = 0.39 of that
    along = float(out.aggregate.dense @ common / common.norm() ** 2) * (n + k)
    assert 0.2 < along < 2.5
    plain = float(fedavg(u).dense @ common / common.norm() ** 2) * (n + k)
    assert plain > k - 2.5                                          # FedAvg: k clients' worth


def test_an_honest_round_loses_nothing_to_the_coherence_rule(benign_rounds):
    # rounds of a fresh model, where honest encoder deltas agree most: a few clients may share a
    # direction with many others, but the encoder average keeps nearly all of the honest weight
    ds, _, rounds = benign_rounds
    srv = FortressServer(FortressConfig.from_config(Config(server_steps=0)), ds.n_items)
    for u in rounds:
        factor, b = srv.coherence(u.dense)
        assert float(factor.mean()) > 0.97 and int((factor < 1).sum()) <= 0.1 * u.n, (factor, b)


def budget(srv: FortressServer, item: int) -> float:
    """The push mass `item` may carry unflagged this round: the smaller of the round's and the window's allowance."""
    rate = srv.rate[item:item + 1].clamp(min=1e-6)
    return min(float(bounds.allowance(rate, srv.fc.p_flag, 50)[0]),
               float(bounds.window_allowance(rate, srv.recent[item:item + 1], srv.fc.p_flag, bounds.WINDOW, 50)[0]))


def test_a_slow_ramp_earns_a_rate_no_faster_than_its_allowance():
    srv = server(floor_frac=1e-9)                                   # no floor: the target's own rate decides
    rates, flagged = [], []
    for r in range(30):
        b = budget(srv, 1)
        allowed = int(b - 40e-3)                                    # the 40 benign negatives count too
        dense, rows, weight = cold_round(40, seed=r)
        for a in range(allowed + (2 if r == 29 else 0)):            # fill the budget; two more in the last round
            dense.append([0.2, 0.0, 0.0])
            rows.append((40 + a, 1, [0.1, 0.1, 0.1, 0.1]))
            weight.append(5.0)
        before = float(srv.rate[1])
        out = srv.aggregate(updates(dense, rows, weight), {})
        flagged.append(1 in out.flagged.tolist())
        rates.append(float(srv.rate[1]))
        assert rates[-1] <= before + b / bounds.HORIZON + 1e-12
    assert flagged == [False] * 29 + [True]                         # filling the budget stays unseen, more does not
    assert rates[-1] < 0.25                                         # 30 rounds earn the target a quarter of a pusher a round


def test_a_crowd_that_comes_back_every_round_gets_its_windows_worth():
    # the round's allowance alone would let a cold item take about two pushes every round, for ever;
    # over a window the same Poisson rule lets the decayed sum of kept pushes reach its allowance once
    srv = server(floor_frac=0.05)
    floor = 0.05 * float(srv.rate[1:].sum()) / 600
    per_round = float(bounds.allowance(torch.tensor([floor], dtype=D), 1e-3, 10)[0])
    whole = float(bounds.allowance(torch.tensor([bounds.WINDOW * floor], dtype=D), 1e-3, 50)[0])
    assert 2 < per_round < 3 and whole < 3 * per_round
    kept, flagged = 0.0, 0
    for r in range(40):
        dense, rows, weight = cold_round(40, seed=r)
        for a in range(2):                                          # two full pushes a round: under the round's rule
            dense.append([0.2, 0.0, 0.0])
            rows.append((40 + a, 1, [0.1, 0.1, 0.1, 0.1]))
            weight.append(5.0)
        before = float(srv.recent[1])
        out = srv.aggregate(updates(dense, rows, weight), {})
        flagged += 1 in out.flagged.tolist()
        kept += float(srv.recent[1]) - bounds.decay(bounds.WINDOW) * before
        assert float(srv.recent[1]) <= 1.05 * whole                 # (the rate, and with it the window, grows a little)
    assert flagged >= 35
    # 80 pushes offered; at most the window's allowance once plus its steady share (1 / WINDOW of it) a round
    assert kept <= whole * (1 + 40 / bounds.WINDOW) + 1e-9 and kept < 0.35 * 80


def test_a_flagged_round_teaches_the_rate_little():
    srv, ramp = server(), []
    for r in range(20):                                             # 20 fans of a cold item, every round
        dense, rows, weight = cold_round(40, seed=r)
        for a in range(20):
            dense.append([0.2, 0.0, 0.0])
            rows.append((40 + a, 1, [0.1, 0.1, 0.1, 0.1]))
            weight.append(5.0)
        out = srv.aggregate(updates(dense, rows, weight), {})
        assert 1 in out.flagged.tolist()
        ramp.append(float(srv.rate[1]))
    # each flagged round moves the rate by FLAGGED_SPEED / HORIZON of the way to the allowance
    assert ramp[-1] < 20 * bounds.FLAGGED_SPEED * 5 / bounds.HORIZON


def test_a_cold_monitor_learns_no_more_than_the_allowance_in_its_first_round():
    srv = FortressServer(FortressConfig.from_config(Config(server_steps=0)), 600)
    dense, rows, weight = cold_round(40)
    for a in range(20):                                             # a coordinated first round
        dense.append([0.2, 0.0, 0.0])
        rows.append((40 + a, 1, [0.1, 0.1, 0.1, 0.1]))
        weight.append(5.0)
    out = srv.aggregate(updates(dense, rows, weight), {})
    floor = 0.5 * (60 + 40 * 41e-3) / 600                           # 60 pushes and 40 x 41 negatives over 600 items
    assert 1 in out.flagged.tolist()
    assert float(srv.rate[1]) == pytest.approx(float(bounds.allowance(torch.tensor([floor], dtype=D), 1e-3, 20)[0]))
    assert float(srv.rate[1]) < 20 / 3


@pytest.fixture(scope="module")
def benign_rounds():
    """Honest uploads of 8 rounds on synthetic data, and the data."""
    ds = synthetic(600, 200, seed=0)
    cfg = Config(dim=16, max_len=20, n_neg=32, dtype="float64")
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), D)
    rng = np.random.default_rng(0)
    eligible = np.flatnonzero(ds.train_len >= 2)
    out = []
    torch.manual_seed(0)                  # dropout draws from torch's RNG: the same uploads whatever ran before
    for r in range(8):
        users = rng.choice(eligible, 64, replace=False)
        chunks = build_chunks(ds, users, cfg.n_neg, cfg.max_len, 64, key=(0, r))
        out.append(train_round(model, objective(cfg, ds.n_items), 1, 1.0, "sgd", params, chunks))
    return ds, params, out


def test_benign_rounds_are_nearly_plain_fedavg(benign_rounds):
    ds, params, rounds = benign_rounds
    srv = FortressServer(FortressConfig.from_config(Config(max_len=20)), ds.n_items)
    for u in rounds[:4]:                                            # the monitor learns the items' rates
        srv.aggregate(u, params)
    for u in rounds[4:]:
        out = srv.aggregate(u, params)
        short = u.weight <= 5
        assert len(out.flagged) <= 2 and float(out.weights[short].mean()) >= 0.95, (out.log, out.weights[short])

def test_fortress_resume_is_exact(tmp_path):
    from fortress import checkpoint
    from fortress.simulate import run
    ds = synthetic(300, 60, seed=0)
    cfg = Config(rounds=6, checkpoint_every=2, defence="fortress", dim=16, max_len=20, n_neg=16,
                 clients_per_round=24, eval_every=0, threads=1, attack="ahum", attack_ratio=0.1)
    full = run(cfg, ds, tmp_path / "full", progress=False)
    assert sum(h["defence"]["n_flagged"] for h in full["history"]) > 0         # the state matters
    run(dataclasses.replace(cfg, rounds=4), ds, tmp_path / "cut", progress=False)
    state = torch.load(tmp_path / "cut" / checkpoint.NAME, weights_only=False)["server"]["defence"]
    assert state["rounds"] == 4
    resumed = run(cfg, ds, tmp_path / "cut", progress=False, resume=True)
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    assert [h["defence"] for h in resumed["history"]] == [h["defence"] for h in full["history"]]


def test_init_from_continues_the_saved_monitor(tmp_path, capsys):
    from fortress.simulate import run
    ds = synthetic(300, 60, seed=0)
    cfg = Config(rounds=3, defence="fortress", dim=16, max_len=20, n_neg=16, clients_per_round=24, eval_every=0,
                 threads=1)
    run(cfg, ds, tmp_path / "a", progress=False)
    saved = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["defence"]
    assert saved["name"] == "fortress" and saved["state"]["rounds"] == 3 and saved["state"]["rate"].sum() > 0
    run(dataclasses.replace(cfg, rounds=2, init_from=str(tmp_path / "a")), ds, tmp_path / "b", progress=False)
    assert "continuing the fortress state" in capsys.readouterr().err
    assert torch.load(tmp_path / "b" / "model.pt", weights_only=False)["defence"]["state"]["rounds"] == 5
    # another defence, or none, starts without it
    run(dataclasses.replace(cfg, rounds=1, init_from=str(tmp_path / "a"), defence="median"), ds, tmp_path / "c",
        progress=False)
    assert torch.load(tmp_path / "c" / "model.pt", weights_only=False)["defence"] == {"name": "median", "state": {}}


# --- end to end: the defence against real attacks ----------------------------------------------------

@pytest.fixture(scope="module")
def defended(tmp_path_factory):
    """A clean model (40 rounds under FORTRESS, so that its popularity monitor is warm and saved with it),
    then 20 rounds of A-hum and PSMU (3% malicious clients) with no defence and with FORTRESS, and 20
    clean rounds of each; ER@10 every 2 rounds."""
    from fortress.simulate import run
    data = synthetic(3000, 600, seed=0)
    base = dict(objective="next_item", dim=16, max_len=10, clients_per_round=64, n_neg=32, threads=1)
    out = tmp_path_factory.mktemp("defended")
    run(Config(rounds=40, eval_every=0, defence="fortress", **base), data, out / "clean", progress=False)
    res = {}
    for attack, defence in [("none", "none"), ("none", "fortress"), ("ahum", "none"), ("ahum", "fortress"),
                            ("psmu", "none"), ("psmu", "fortress")]:
        cfg = Config(attack=attack, defence=defence, init_from=str(out / "clean"), rounds=20, eval_every=2,
                     attack_ratio=0.03, **base)
        res[attack, defence] = run(cfg, data, out / f"{attack}-{defence}", progress=False)
    return out, res


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["ahum", "psmu"])
def test_fortress_cuts_the_attacks_exposure(defended, attack):
    _, res = defended
    er = lambda a, d: res[a, d]["attack"]["last5_mean"]["ER@10"]          # noqa: E731
    assert er(attack, "none") >= 0.3 and er(attack, "fortress") <= 0.2 * er(attack, "none"), \
        (er(attack, "none"), er(attack, "fortress"))
    log = [h["defence"] for h in res[attack, "fortress"]["history"]]
    with_bad = [d for d in log if d["weight_malicious"] is not None]
    mal = np.mean([d["weight_malicious"] for d in with_bad])
    short = np.mean([d["weight_short"] for d in log if d["weight_short"] is not None])
    # malicious clients lose their clipped target rows (and more when flagged); short benign clients keep theirs
    assert mal < short - 0.1 and short >= 0.95, (mal, short)
    assert any(d["targets_flagged"][0] for d in log)


@pytest.mark.slow
def test_fortress_keeps_clean_accuracy(defended):
    _, res = defended
    hr = lambda d: res["none", d]["test"]["HR@10"]                         # noqa: E731
    assert hr("fortress") >= 0.95 * hr("none"), (hr("fortress"), hr("none"))
    log = [h["defence"] for h in res["none", "fortress"]["history"]]
    assert np.mean([d["weight_short"] for d in log]) >= 0.95 and all(d["weight_malicious"] is None for d in log)


@pytest.mark.slow
def test_embeddings_figure_shows_where_the_target_went(defended, capsys):
    from fortress.cli import main
    out, _ = defended
    png = out / "emb.png"
    assert main(["plot", "embeddings", str(out / "ahum-none"), str(out / "ahum-fortress"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    length = [float(line.split("target length ")[1].split()[0]) for line in lines[:2]]
    # A-hum turns the target toward the popular items with or without FORTRESS (its clipped pushes
    # still point there), but only undefended does it grow long enough to outscore them
    assert length[1] < 0.5 * length[0], length
    assert main(["plot", "embeddings", str(out / "clean"), "--targets", "nosuch"]) == 2    # one-line error
    assert "--targets: item id(s) nosuch are not in the data" in capsys.readouterr().err


def test_the_sketch_keeps_cosines():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5000, generator=g, dtype=D)
    x[20:] = x[:20] + 0.7 * torch.randn(20, 5000, generator=g, dtype=D)          # pairs with cosine ~0.82
    exact = torch.nn.functional.normalize(x, dim=1)
    sk = torch.nn.functional.normalize(bounds.sketch(x, 512, torch.Generator().manual_seed(1)), dim=1)
    err = (sk @ sk.T - exact @ exact.T).abs()
    assert float(err.max()) < 0.2 and float(err.mean()) < 0.05                  # ~1/sqrt(512) = 0.044
    again = bounds.sketch(x, 512, torch.Generator().manual_seed(1))
    assert torch.equal(again, bounds.sketch(x, 512, torch.Generator().manual_seed(1)))   # deterministic per draw
    assert bounds.sketch(x[:, :300], 512, torch.Generator().manual_seed(1)).shape == (40, 512)   # P < width


# --- the exposure cap -------------------------------------------------------------------------------

def test_shrink_to_cap_is_the_largest_scale_within_the_cap():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=g, dtype=D).abs() + 0.1                     # (n, V) positive scores
    t_out = torch.rand(200, generator=g, dtype=D) + 0.1                          # bars above 0
    t_in = t_out - 0.05
    in_top = a > t_out[:, None]
    cap = torch.tensor([5.0, 50.0, 500.0], dtype=D)
    s = bounds.shrink_to_cap(a, t_in, t_out, in_top, cap)
    bar = torch.where(in_top, t_in[:, None], t_out[:, None])
    reached = lambda f: ((f[None, :] * a) > bar).sum(0)                          # noqa: E731
    assert (reached(s) <= cap).all()
    assert (reached((s * 1.01).clamp(max=1)) > cap)[:2].all()                    # any more crosses the cap
    assert s[2] == 1.0                                                            # a cap above every user: untouched


def test_exposure_caps_follow_rates_and_ignore_a_few_outliers():
    rate = torch.tensor([0.0] + [1.0] * 50 + [4.0] * 50 + [0.01], dtype=D)
    count = torch.cat([torch.zeros(1, dtype=D), torch.full((50,), 5.0, dtype=D), torch.full((50,), 20.0, dtype=D),
                       torch.tensor([200.0], dtype=D)])                           # the last item: cold but everywhere
    cap = bounds.exposure_caps(count, rate, 256, 10.0)
    assert torch.allclose(cap[1:101], torch.cat([torch.full((50,), 50.0), torch.full((50,), 200.0)]).double())
    assert float(cap[101]) == pytest.approx(0.5) and count[101] > cap[101]


def test_the_reach_cap_bounds_an_item_that_bought_the_largest_rate():
    # 20 honest items reach 10..29 probe users in proportion to their rates; the last item has 100x the
    # largest honest rate (a crowd's pushes) and reaches every probe user: the rate-proportional cap allows it,
    # the reach cap holds it to reach_cap x the 10th largest reach
    rate = torch.cat([torch.zeros(1, dtype=D), torch.arange(10, 30, dtype=D) / 10, torch.tensor([300.0], dtype=D)])
    count = torch.cat([torch.zeros(1, dtype=D), torch.arange(10, 30, dtype=D), torch.tensor([128.0], dtype=D)])
    free = bounds.exposure_caps(count, rate, 128, 10.0)
    assert free[-1] > 128
    cap = bounds.exposure_caps(count, rate, 128, 10.0, reach=2.0)
    tenth = float(count[1:].topk(bounds.REACH_RANK).values[-1])
    assert tenth == 21 and float(cap[-1]) == 2.0 * tenth and count[-1] > cap[-1]
    assert bool((count[1:-1] <= cap[1:-1]).all())                                 # no honest item over its cap
    assert torch.equal(cap[1:-1], free[1:-1].clamp(max=42.0))


def probe_counts(srv: FortressServer, params, state) -> torch.Tensor:
    """Each item's probe users with it in their top PROBE_K, for probes drawn from generator state `state`."""
    srv.probe_gen.set_state(state)
    seqs = bounds.probe_sequences(srv.floored_rate(), srv.fc.probe_users, srv.model.max_len, srv.probe_gen)
    return probe_top(srv.model, params, seqs, bounds.PROBE_K)[3]


def test_the_exposure_cap_shrinks_a_cold_item_everyone_sees_and_leaves_an_honest_model_alone(benign_rounds):
    ds, params, rounds = benign_rounds
    cfg = Config(max_len=20, dim=16, n_neg=16)
    srv = defences.make(dataclasses.replace(cfg, defence="fortress", server_steps=0), ds.n_items)
    for u in rounds:                                                # a warm monitor
        srv.aggregate(u, params)
    srv.rounds = max(srv.rounds, bounds.WARMUP)
    p = {k: v.clone() for k, v in params.items()}
    honest = p["item_emb"].clone()
    log = srv.cap_exposure(p)
    assert log["exposure_capped"] <= 0.01 * ds.n_items                # a fresh model: next to nothing capped
    cold = int(torch.argsort(srv.rate[1:])[0]) + 1
    state = srv.probe_gen.get_state()
    # the cold item pointed at where the probe users' representations lie, and made long: everyone's top item
    seqs = bounds.probe_sequences(srv.rate.clamp(min=1e-3), 256, 20, torch.Generator().manual_seed(1))
    p["item_emb"][cold] = 50 * F.normalize(srv.model.last(p, seqs).mean(0), dim=0)
    before = probe_counts(srv, p, state)
    assert before[cold] > 0.9 * srv.fc.probe_users
    srv.probe_gen.set_state(state)
    log = srv.cap_exposure(p)
    assert cold in log["capped"]
    after = probe_counts(srv, p, state)
    cap = bounds.exposure_caps(before, srv.floored_rate(), srv.fc.probe_users, srv.fc.exposure_cap)
    assert after[cold] <= cap[cold] + 1 and cap[cold] < 0.7 * before[cold]         # 200 items, top 20: a wide cap
    unchanged = torch.ones(ds.n_items + 1, dtype=torch.bool)
    unchanged[cold] = False
    assert (p["item_emb"][unchanged] == honest[unchanged]).float().mean() > 0.98     # only the capped rows move
    off = defences.make(dataclasses.replace(cfg, defence="fortress", probe_users=0), ds.n_items)
    off.rounds = bounds.WARMUP
    assert "exposure_capped" not in off.after_apply(p, off.aggregate(rounds[0], p))     # probe_users=0: no cap


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_blocked_rules_equal_the_whole_round_at_once(rule, monkeypatch):
    """Item rows and (coordinate-wise rules) encoder coordinates in small blocks: the same aggregate and weights."""
    g = torch.Generator().manual_seed(0)
    n, P, d = 9, 23, 4
    rows_client = torch.arange(n).repeat_interleave(3)                               # 3 rows each
    rows_item = torch.randint(1, 6, (3 * n,), generator=g)
    rows_item = rows_item + 6 * torch.arange(3).repeat(n)                           # distinct per client
    u = Updates(torch.arange(n), torch.rand(n, generator=g) + 0.5, torch.randn(n, P, generator=g, dtype=torch.float64),
                rows_client, rows_item, torch.randn(3 * n, d, generator=g, dtype=torch.float64),
                torch.zeros(n, dtype=torch.float64))
    u.weight = u.weight.double()
    fn = {"median": robust.median, "trimmed_mean": lambda x: robust.trimmed_mean(x, 0.2),
          "krum": lambda x: robust.krum(x, 0.2)}[rule]
    whole, w_whole = fn(u)
    monkeypatch.setattr(robust, "BLOCK", 5)
    part, w_part = fn(u)
    assert torch.equal(whole.rows_item, part.rows_item)
    assert torch.allclose(whole.dense, part.dense) and torch.allclose(whole.rows_delta, part.rows_delta)
    assert torch.allclose(w_whole, w_part)


def test_selection_quantile_is_torch_quantile_to_the_bit():
    """bounds.quantile (a selection and a pass) gives torch.quantile's value exactly, ties and both dtypes included."""
    g = torch.Generator().manual_seed(0)
    for t in range(60):
        n = int(torch.randint(3, 90, (1,), generator=g))
        x = torch.randn(n * n, generator=g, dtype=torch.float64 if t % 2 else torch.float32)
        if t % 3 == 0:
            x = (x * 2).round()                                  # many ties
        for q in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
            assert torch.equal(bounds.quantile(x, q), x.quantile(q)), (n, x.dtype, q)


def test_top_items_by_selection_is_the_stable_sort():
    """top_items (a selection, then ties to the smaller id) picks what a stable sort of the scores picks,
    ties, -inf (items kept out of P) and k beyond the catalogue included."""
    from fortress.server.fortress import top_items
    g = torch.Generator().manual_seed(0)
    for t in range(300):
        n, k = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(0, 70, (1,), generator=g))
        s = torch.randint(0, 5, (n,), generator=g).double() if t % 5 else torch.rand(n, generator=g, dtype=torch.float64)
        if t % 3 == 0:
            s[torch.rand(n, generator=g) < 0.3] = float("-inf")
        want = (torch.argsort(-s[1:], stable=True)[:min(k, n - 1)] + 1).sort().values
        assert torch.equal(top_items(s, k), want), (s, k)


def test_grouped_topk_is_topk():
    """The probe pass's two-step top k gives torch.topk's values and indices (distinct scores; -inf own items)."""
    from fortress.server.fortress import grouped_topk
    g = torch.Generator().manual_seed(0)
    for b, n, k, group in [(5, 10430, 21, 64), (3, 1000, 21, 64), (4, 1300, 21, 64), (2, 200, 11, 16), (2, 50, 21, 64)]:
        s = torch.randn(b, n, generator=g)
        s[:, 0] = float("-inf")
        s.scatter_(1, torch.randint(1, n, (b, 10), generator=g), float("-inf"))
        v, i = grouped_topk(s, k, group)
        want = s.topk(k, dim=1)
        assert torch.equal(v, want.values) and torch.equal(i, want.indices), (b, n, k, group)


def test_sketch_norms_in_one_pass():
    """The sketch's pass also gives the rows' norms, the same as a separate norm, and the same sketch."""
    x = torch.randn(21, 5000, generator=torch.Generator().manual_seed(0))
    sk, norms = bounds.sketch(x, 512, torch.Generator().manual_seed(1), norms=True)
    assert torch.equal(norms, x.norm(dim=1))
    assert torch.equal(sk, bounds.sketch(x, 512, torch.Generator().manual_seed(1)))


def test_probe_top_in_blocks_is_the_whole_pass(monkeypatch):
    """Scoring probe users in blocks (to keep each block's scores in cache) changes nothing."""
    import fortress.server.fortress as fortress_server
    cfg = Config(dim=16, max_len=10)
    model = from_config(cfg)
    params = model.init(300, torch.Generator().manual_seed(1))
    seqs = bounds.probe_sequences(torch.ones(301, dtype=torch.float64), 150, cfg.max_len, torch.Generator().manual_seed(2))
    blocked = probe_top(model, params, seqs, 20)
    monkeypatch.setattr(fortress_server, "PROBE_BLOCK", 10_000)
    whole = probe_top(model, params, seqs, 20)
    for a, b in zip(blocked, whole):
        assert torch.equal(a, b)


# --- the FORTRESS server without holding a round's uploads ------------------------------------------

@pytest.mark.parametrize("n,block", [(40, 40 * 7), (97, 1000), (5, 3)])
def test_blocked_coherence_is_the_whole_matrix_rule(n, block):
    """Row blocks of x @ x.T with the quantile found by a histogram pass and the sort of its bins: the same
    bar and excesses as `bounds.coherence` on the whole matrix (ties and a coherent group included)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 32, generator=g)
    x[: n // 4] = x[0] + 0.1 * torch.randn(n // 4, 32, generator=g)         # a coherent group
    x[-2] = x[-1]                                                              # an exact tie
    x = F.normalize(x, dim=1)
    whole, b = bounds.coherence(x @ x.T, bounds.COHERENT_Q)
    blocked, bb = bounds.coherence_blocked(x, bounds.COHERENT_Q, block=block)
    assert abs(b - bb) < 1e-6
    assert torch.allclose(whole, blocked, atol=1e-5)
    one, b1 = bounds.coherence_blocked(x, bounds.COHERENT_Q, block=n * n)      # one block: the rule itself
    assert b1 == b and torch.equal(one, whole)


@pytest.mark.parametrize("defence", ["fortress", "none", "norm_bound"])
def test_a_round_read_as_it_trains_has_the_same_outcome(tmp_path, defence):
    """hold_clients below the round's clients: FedAvg reads the uploads once as they are trained, norm bounding
    twice, the FORTRESS server three times (training the chunks again, dropout and faulty clients included), and neither holds
    them; the run is the one that holds them (same flags, clips, monitor and model up to float sums), under
    attack, past the monitor's warm-up, with the coherence rule's blocked pass."""
    from fortress.simulate import run
    ds = synthetic(400, 80, seed=1)
    base = dict(rounds=13, defence=defence, dim=16, max_len=20, n_neg=16, clients_per_round=48, chunk_size=8,
                eval_every=0, threads=1, attack="ahum", attack_ratio=0.1, dropout=0.1, corrupt_rate=0.05,
                dtype="float64")
    held = run(Config(**base), ds, tmp_path / "held", progress=False)
    old = bounds.COS_BLOCK
    bounds.COS_BLOCK = 48 * 5                      # the blocked coherence pass, several blocks
    try:
        passes = run(Config(**base, hold_clients=16), ds, tmp_path / "passes", progress=False)
    finally:
        bounds.COS_BLOCK = old
    assert held["rejected"] and held["rejected"] == passes["rejected"]
    for a, b in zip(held["history"], passes["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
        if defence != "fortress":
            assert a.get("defence", {}).get("weight_benign") == pytest.approx(b.get("defence", {}).get("weight_benign"))
            continue
        da, db = a["defence"], b["defence"]
        assert da["flagged"] == db["flagged"] and da["pushes"] == db["pushes"], (a["round"], da, db)
        for k in ("c_row", "c_dense", "push_mass", "coherent_cos", "weight_benign", "weight_malicious"):
            assert da[k] == pytest.approx(db[k], rel=1e-9, abs=1e-12), k
    assert held["bytes"] == passes["bytes"]          # each round's traffic counted once
    sa = torch.load(tmp_path / "held" / "model.pt", weights_only=False)
    sb = torch.load(tmp_path / "passes" / "model.pt", weights_only=False)
    for k, v in sa["params"].items():
        assert torch.allclose(v, sb["params"][k], atol=1e-10, rtol=0), k
    if defence == "fortress":
        assert sum(h["defence"]["n_flagged"] for h in held["history"]) > 0
        assert torch.allclose(sa["defence"]["state"]["rate"], sb["defence"]["state"]["rate"], atol=1e-10)


def test_krum_distances_over_coordinate_blocks_are_the_whole_ones(monkeypatch):
    """Above DIST_BLOCK values Krum sums squared distances over blocks of coordinates (no float64 copy of a
    large round's encoder uploads): the same distances, and the same choice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 30, 500, generator=g)
    x[0, :3] += 5.0                                                   # three outliers
    whole = robust.sq_distances(x)
    monkeypatch.setattr(robust, "DIST_BLOCK", 30 * 37)
    blocked = robust.sq_distances(x)
    assert torch.allclose(whole, blocked, rtol=1e-10, atol=1e-8)
    i64 = torch.zeros(0, dtype=torch.int64)
    u = Updates(torch.arange(30), torch.ones(30), x[0], i64, i64, torch.zeros(0, 4), torch.zeros(30))
    chosen = robust.krum(u, 0.1)[1]
    monkeypatch.undo()
    assert torch.equal(chosen, robust.krum(u, 0.1)[1]) and chosen[:3].sum() == 0


def test_hold_clients_is_validated():
    with pytest.raises(InputError, match=r"hold_clients=-1 is out of range; it must be >= 0"):
        config.override(Config(), {"hold_clients": "-1"})
    with pytest.raises(InputError, match=r"hold_clients='many': expected an integer"):
        config.override(Config(), {"hold_clients": "many"})
