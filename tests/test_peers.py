"""The peer methods: UNION's client term and Gap-statistics filter, the PSMU paper's HiCS rule, FedCL."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fortress import config
from fortress.config import Config
from fortress.errors import InputError
from fortress.models import from_config
from fortress.client import eligible_clients, objective, rec_loss, round_chunks, train_round, user_representations
from fortress.models import dense_keys
from fortress.objectives import fedcl_loss, fedcl_noise, fedcl_perturb, union_draws, union_loss
from fortress.rounds import fedcl_exchange
from fortress.server import defences
from fortress.server.aggregate import GlobalOptimizer, fedavg
from fortress.server.fedcl import hard_negatives, kmeans
from fortress.server.hics import hics, rank_in_client
from fortress.server.union import gap_filter, two_means_1d, uniformity
from fortress.updates import Updates
from conftest import interrupt_and_resume, same_saved_model

D = torch.float64


def round_of(n: int, rows_client, rows_item, rows_delta, dense=None, weight=None) -> Updates:
    rows_delta = torch.as_tensor(rows_delta, dtype=D)
    return Updates(torch.arange(n), torch.ones(n, dtype=D) if weight is None else torch.as_tensor(weight, dtype=D),
                   torch.zeros(n, 3, dtype=D) if dense is None else torch.as_tensor(dense, dtype=D),
                   torch.as_tensor(rows_client), torch.as_tensor(rows_item), rows_delta, torch.zeros(n, dtype=D))


# --- UNION server ---------------------------------------------------------------------------------------

def test_two_means_1d_is_the_best_split():
    w1, w2, split = two_means_1d(torch.tensor([[0.0, 1.0, 0.1, 0.9, 0.95]], dtype=D))
    assert float(w1) == pytest.approx(((torch.tensor([0, 1, .1, .9, .95]) - 0.59) ** 2).sum().item())
    # {0, 0.1} and {0.9, 0.95, 1}: 0.005 + 0.005
    assert float(w2) == pytest.approx(0.005 + 0.005) and int(split) == 2


def test_gap_statistics_drop_an_outlier_cluster_and_keep_the_honest_ones():
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.01 * torch.randn(50, generator=g, dtype=D)
    metric = torch.cat([honest, torch.full((5,), 0.5, dtype=D) + 0.001 * torch.randn(5, generator=g, dtype=D)])
    drop, log = gap_filter(metric, 50, max_small=0, gen=torch.Generator().manual_seed(1))
    assert log["two_clusters"] and drop[50:].all() and not drop[:50].any()


def test_one_cluster_keeps_everyone_and_degenerate_rounds_drop_nobody():
    even = torch.linspace(1.0, 1.1, 60, dtype=D)                                      # one cluster
    drop, log = gap_filter(even, 50, max_small=0, gen=torch.Generator().manual_seed(0))
    assert not log["two_clusters"] and not drop.any()
    # the size rule alone: a small enough side is dropped even without two clusters
    drop, log = gap_filter(even, 50, max_small=30, gen=torch.Generator().manual_seed(0))
    assert not log["two_clusters"] and 0 < int(drop.sum()) <= 30
    for metric in (torch.ones(8, dtype=D), torch.tensor([1.0, 2.0], dtype=D), torch.tensor([1.0, float("nan"), 2.0], dtype=D),
                   torch.zeros(0, dtype=D)):
        drop, log = gap_filter(metric, 50, max_small=5, gen=torch.Generator().manual_seed(0))
        assert not drop.any() and log["dropped"] == 0


def test_uniformity_equals_the_whole_distance_matrix_per_client():
    g = torch.Generator().manual_seed(0)
    n, N, d = 6, 40, 5
    table = torch.randn(N + 1, d, generator=g, dtype=D)
    rc = torch.arange(n).repeat_interleave(12)
    ri = torch.cat([torch.randperm(N, generator=g)[:12] + 1 for _ in range(n)])
    u = round_of(n, rc, ri, 0.7 * torch.randn(n * 12, d, generator=g, dtype=D))
    items = torch.randperm(N, generator=g)[:25] + 1
    want = []
    for i in range(n):
        e = table.clone()
        mine = rc == i
        e[ri[mine]] += 0.5 * u.rows_delta[mine]
        z = F.normalize(e[items], dim=-1)
        want.append(torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").sum() / (25 * 24))
    assert torch.allclose(uniformity(table, items, u, 0.5), torch.stack(want), atol=1e-9, rtol=0)


def clustering_round(n_honest=20, n_bad=3, N=30, d=8, seed=0):
    """Honest clients nudge 6 random items each; attackers pull 20 items onto one point (ClusterAttack-like)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N + 1, d, generator=g, dtype=D)
    rc, ri, rd = [], [], []
    for c in range(n_honest):
        items = torch.randperm(N, generator=g)[:6] + 1
        rc += [c] * 6
        ri += items.tolist()
        rd.append(0.05 * torch.randn(6, d, generator=g, dtype=D))
    centre = torch.randn(d, generator=g, dtype=D)
    for c in range(n_honest, n_honest + n_bad):
        items = torch.arange(1, 21)
        rc += [c] * 20
        ri += items.tolist()
        rd.append(centre - table[items])
    n = n_honest + n_bad
    dense = torch.randn(n, 3, generator=g, dtype=D)
    return table, round_of(n, torch.tensor(rc), torch.tensor(ri), torch.cat(rd), dense)


def test_union_drops_the_clients_that_cluster_the_items_and_averages_the_rest():
    table, u = clustering_round()
    cfg = Config(defence="union", union_items=30, byz_frac=0.0)
    out = defences.make(cfg, 30).aggregate(u, {"item_emb": table})
    assert out.weights.tolist() == [1.0] * 20 + [0.0] * 3 and out.log["dropped"] == 3
    want = fedavg(u.select(torch.arange(23) < 20))
    assert torch.allclose(out.aggregate.dense, want.dense)
    assert torch.equal(out.aggregate.rows_item, want.rows_item)      # rows only the attackers touched are left alone
    assert torch.allclose(out.aggregate.rows_delta, want.rows_delta)
    assert torch.isfinite(out.aggregate.dense).all() and torch.isfinite(out.aggregate.rows_delta).all()


def test_union_is_deterministic_and_its_state_resumes():
    table, u = clustering_round(seed=3)
    cfg = Config(defence="union", union_items=12, seed=5)
    a, b = defences.make(cfg, 30), defences.make(cfg, 30)
    first = [a.aggregate(u, {"item_emb": table}) for _ in range(2)]
    b.aggregate(u, {"item_emb": table})
    c = defences.make(cfg, 30)
    c.load_state_dict(b.state_dict())
    again = c.aggregate(u, {"item_emb": table})
    assert again.log == first[1].log and torch.equal(again.aggregate.dense, first[1].aggregate.dense)


# --- HiCS ----------------------------------------------------------------------------------------------

def test_rank_in_client():
    assert rank_in_client(torch.tensor([1, 0, 1, 0, 1]), torch.tensor([2.0, 5.0, 3.0, 1.0, 1.0])).tolist() == \
        [1, 0, 0, 1, 2]


def test_hics_clips_rows_then_sparsifies_then_clips_users():
    # client 0: rows of norm 3 (item 1), 4 (item 2), 1 (item 3); client 1: 8 (item 1), 0.5 (item 4); client 2: 2 (item 2)
    rows = [(0, 1, [3.0, 0]), (0, 2, [0, 4.0]), (0, 3, [1.0, 0]), (1, 1, [8.0, 0]), (1, 4, [0, 0.5]), (2, 2, [0, 2.0])]
    u = round_of(3, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], dense=[[0.0] * 3] * 3)
    out, share, log = hics(u, item_clip=1.0, keep=0.5, user_clip=10.0)
    # largest row per client 4, 8, 2: C_item = 4; client 0 keeps ceil(1.5) = 2 rows, client 1 1, client 2 1
    assert log["c_item"] == 4.0 and log["rows_clipped"] == 1 and log["rows_zeroed"] == 2
    assert out.rows_delta.tolist() == [[3.0, 0], [0, 4.0], [0, 0], [4.0, 0], [0, 0], [0, 2.0]]
    # zeroed rows still count in their item's average: item 4 moves by 0, item 3 by 0
    agg = fedavg(out)
    assert {int(i): d.tolist() for i, d in zip(agg.rows_item, agg.rows_delta)}[1] == [3.5, 0]
    # user level: norms 5, 4, 2 -> median 4, clip 1.0 x 4 scales client 0 by 4/5
    out, share, log = hics(u, item_clip=1.0, keep=0.5, user_clip=1.0)
    assert log["c_user"] == 4.0 and log["users_clipped"] == 1
    assert torch.allclose(out.rows_delta[:2], torch.tensor([[2.4, 0], [0, 3.2]], dtype=D))
    raw = torch.tensor([26 ** 0.5, (64 + 0.25) ** 0.5, 2.0], dtype=D)
    assert torch.allclose(share, torch.tensor([4.0, 4.0, 2.0], dtype=D) / raw)


def test_hics_keeps_the_largest_uploaded_rows_not_the_first_clipped_ones():
    # client 0's rows 2, 5, 9 all exceed C_item = median(9, 1, 1) = 1, so after the clip they tie; it keeps ceil(0.34 x 3)
    # = 2 rows: the two largest uploaded (9 and 5), whatever their order in the upload
    rows = [(0, 1, [2.0, 0]), (0, 2, [0, 5.0]), (0, 3, [9.0, 0]), (1, 1, [1.0, 0]), (2, 2, [0, 1.0])]
    u = round_of(3, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], dense=[[0.0] * 3] * 3)
    out, _, log = hics(u, item_clip=1.0, keep=0.34, user_clip=10.0)
    assert log["c_item"] == 1.0 and log["rows_zeroed"] == 1
    assert out.rows_delta[:3].tolist() == [[0, 0], [0, 1.0], [1.0, 0]]


def test_hics_of_an_agreeing_round_is_fedavg_and_stays_finite():
    rows = [(c, i, [1.0, -1.0]) for c in range(4) for i in (1, 2)]
    u = round_of(4, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], dense=[[1.0, 2.0, 3.0]] * 4)
    out = defences.make(Config(defence="hics", hics_keep=1.0), 2).aggregate(u, {})
    want = fedavg(u)
    assert torch.allclose(out.aggregate.dense, want.dense) and torch.allclose(out.aggregate.rows_delta, want.rows_delta)
    assert out.weights.tolist() == [1.0] * 4
    empty = round_of(2, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2),
                     dense=[[0.0] * 3] * 2)
    out = defences.make(Config(defence="hics"), 2).aggregate(empty, {})
    assert torch.isfinite(out.aggregate.dense).all() and torch.isfinite(out.weights).all()


# --- UNION client term ------------------------------------------------------------------------------------

def test_union_term_by_hand():
    """Anchor, positive and negatives at known slots: the cross-entropy of cosines written out."""
    cfg = Config(objective="union", dim=4, max_len=3, union_negatives=2, union_tau=0.5, dropout=0.0, dtype="float64")
    model = from_config(cfg)
    params = model.init(10, torch.Generator().manual_seed(0), D)
    dense = {k: v for k, v in params.items() if k != "item_emb"}
    table = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=D)   # slots 1-3 own, 4-6 negatives
    table[0] = 0
    x, y, col = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), torch.arange(7) > 0          # slot 0 is padding
    # anchors (right-aligned) = [0, 1, 2, 3]; positive draw 0.0 -> the first other own slot; negatives: 0.0 and 0.9
    draws = {"upos": torch.zeros(4, dtype=D), "uneg": torch.tensor([[0.0, 0.9]] * 4, dtype=D)}
    _, terms = union_loss(model, dense, table, x, y, col, draws, cfg)
    z = F.normalize(table, dim=-1)
    want = []
    for a, p in ((1, 2), (2, 1), (3, 1)):
        s = torch.stack([z[a] @ z[c] for c in (p, 4, 6)]) / 0.5
        want.append(-s.log_softmax(0)[0])
    assert terms["union"].item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-12)


def test_union_draws_are_each_users_own():
    cfg = Config(objective="union", max_len=6, local_epochs=2)
    a, b = union_draws(cfg, 3, np.array([5, 9, 2])), union_draws(cfg, 3, np.array([2, 5]))
    assert torch.equal(a["upos"][0], b["upos"][1]) and torch.equal(a["uneg"][2], b["uneg"][0])
    assert a["uneg"].shape == (3, 2, 7, 15)
    assert not torch.equal(a["upos"], union_draws(cfg, 4, np.array([5, 9, 2]))["upos"])


# --- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,expect", [
    ({"objective": "unoin"}, "objective='unoin' is not allowed; choose one of: next_item, fortress, union"),
    ({"defence": "hic"}, "union, hics"),
    ({"hics_keep": 1.5}, "hics_keep=1.5 is out of range; it must be in [0, 1]"),
    ({"hics_item_clip": 0}, "hics_item_clip=0.0 is out of range; it must be > 0"),
    ({"union_tau": "x"}, "union_tau='x': expected a number"),
    ({"union_items": 1}, "union_items=1 is out of range; it must be >= 2"),
    ({"objective": "fedcl", "fedcl_clip": 0}, "fedcl_clip=0.0 is out of range; it must be > 0"),
    ({"fedcl_noise": -0.1}, "fedcl_noise=-0.1 is out of range; it must be >= 0"),
    ({"fedcl_hard": 0}, "fedcl_hard=0 is out of range; it must be >= 1"),
    ({"fedcl_clusters": "many"}, "fedcl_clusters='many': expected an integer"),
    ({"objective": "fedcl", "training": "central"}, "objective='fedcl' needs training='federated'"),
])
def test_peer_keys_are_validated(values, expect):
    with pytest.raises(InputError) as err:
        config.override(Config(), values)
    assert expect in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", [{"objective": "union", "defence": "union"}, {"defence": "hics"},
                                    {"objective": "fedcl", "fedcl_hard": 4}])
def test_peer_runs_are_deterministic_and_resume_exactly(tmp_path, method):
    """Under attack, the same seed gives the same model; cut at round 2 and resumed, bit for bit."""
    from fortress.data import synthetic
    from fortress.simulate import run
    ds = synthetic(200, 50, seed=0)
    cfg = Config(rounds=3, checkpoint_every=2, dim=8, max_len=10, n_neg=12, clients_per_round=16, eval_every=0,
                 threads=1, attack="ahum", attack_ratio=0.05, attack_steps=3, union_items=20, **method)
    full = run(cfg, ds, tmp_path / "full", progress=False)
    resumed = interrupt_and_resume(cfg, ds, tmp_path / "cut", 2)
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    assert [h["defence"] for h in resumed["history"]] == [h["defence"] for h in full["history"]]


def reference_gap_statistics(metric: np.ndarray, refs: np.ndarray, attackers_per_round: int):
    """A transcription of the reference code's `GapStatistics` and its use in `agg.UNION.agg`
    (github.com/yflyl613/FedRec), with Lloyd's k-means from the extremes in place of kmeans++ and the
    reference sets given instead of drawn from its cache: (two clusters?, dropped clients)."""
    def kmeans(x, k):
        c = np.array([x.mean()]) if k == 1 else np.array([x.min(), x.max()])
        for _ in range(100):
            lab = np.abs(x[:, None] - c[None]).argmin(1)
            c = np.array([x[lab == j].mean() for j in range(k)])
        return lab, ((x - c[lab]) ** 2).sum()
    z = (metric - metric.min()) / (metric.max() - metric.min())
    gap, s = [], []
    for k in (1, 2):
        lab, v = kmeans(z, k)
        if k == 2:
            labels = lab
        vkb = np.log([kmeans(r, k)[1] for r in refs])
        gap.append(vkb.mean() - np.log(v))
        s.append(vkb.std() * np.sqrt((1 + len(refs)) / len(refs)))
    more = gap[0] < gap[1] - s[1]
    idx = {0: np.flatnonzero(labels == 0), 1: np.flatnonzero(labels == 1)}
    abnormal = 0 if len(idx[0]) < len(idx[1]) else 1
    dropped = idx[abnormal] if more or len(idx[abnormal]) <= attackers_per_round else np.array([], dtype=int)
    return bool(more), sorted(dropped.tolist())


@pytest.mark.parametrize("case", ["outliers", "one_cluster", "small_side"])
def test_gap_filter_reproduces_the_reference_code_on_small_rounds(case):
    g = np.random.default_rng(0)
    metric = {"outliers": np.r_[1 + 0.01 * g.standard_normal(40), 0.6 + 0.01 * g.standard_normal(4)],
              "one_cluster": 1 + 0.01 * g.standard_normal(44),
              "small_side": np.r_[1 + 0.01 * g.standard_normal(43), 1.08]}[case]   # dropped by the size rule alone
    f = 2
    gen = torch.Generator().manual_seed(7)
    refs = torch.rand(50, len(metric), generator=torch.Generator().manual_seed(7), dtype=D).numpy()
    drop, log = gap_filter(torch.tensor(metric), 50, f, gen)
    more, dropped = reference_gap_statistics(metric, refs, f)
    assert log["two_clusters"] == more and np.flatnonzero(drop.numpy()).tolist() == dropped
    assert dropped == {"outliers": [40, 41, 42, 43], "one_cluster": [], "small_side": [43]}[case]


# --- FedCL ------------------------------------------------------------------------------------------------

def test_fedcl_perturb_clips_to_delta_then_adds_the_noise():
    h = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=D)            # norms 5 and 0.5
    noise = torch.tensor([[0.1, -0.2], [1.0, 2.0]], dtype=D)
    z = fedcl_perturb(h, 1.0, noise)
    assert torch.allclose(z, torch.tensor([[0.6 + 0.1, 0.8 - 0.2], [0.3 + 1.0, 0.4 + 2.0]], dtype=D), atol=1e-15)


def test_fedcl_noise_is_laplace_at_its_scale_and_each_users_own():
    cfg = Config(objective="fedcl", dim=6, fedcl_noise=0.1)
    a = fedcl_noise(cfg, 3, np.array([5, 9, 2]))
    b = fedcl_noise(cfg, 3, np.array([2, 5]))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and a.shape == (3, 6)
    assert torch.allclose(fedcl_noise(dataclasses.replace(cfg, fedcl_noise=0.3), 3, np.array([5, 9, 2])), 3 * a)
    assert not fedcl_noise(dataclasses.replace(cfg, fedcl_noise=0.0), 3, np.array([5])).any()
    assert not torch.equal(a, fedcl_noise(cfg, 4, np.array([5, 9, 2])))
    many = fedcl_noise(dataclasses.replace(cfg, dim=20000), 0, np.array([1]))[0]
    assert float(many.abs().mean()) == pytest.approx(0.1, rel=0.05)    # E|Laplace(0, b)| = b


def test_kmeans_finds_separated_groups_and_retrieval_is_the_top_scores():
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.tensor([5.0, 0.0], dtype=D) + 0.1 * torch.randn(6, 2, generator=g, dtype=D),
                   torch.tensor([0.0, 5.0], dtype=D) + 0.1 * torch.randn(4, 2, generator=g, dtype=D)])
    centroids, assign = kmeans(z, 2, np.random.default_rng(0))
    assert len(set(assign[:6].tolist())) == 1 and len(set(assign[6:].tolist())) == 1 and assign[0] != assign[6]
    assert torch.allclose(centroids[assign[0]], z[:6].mean(0)) and torch.allclose(centroids[assign[6]], z[6:].mean(0))
    assert kmeans(z[:3], 8, np.random.default_rng(0))[0].shape == (3, 2)          # k is at most the points
    model = from_config(Config(dim=2))
    table = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-1.0, 3.0]], dtype=D)   # row 0: padding
    hard = hard_negatives(model, {"item_emb": table}, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D), 2)
    assert hard.tolist() == [[3, 1], [4, 2]]                                       # never the padding row


def fedcl_setup(**kw):
    from fortress.data import synthetic
    ds = synthetic(300, 80, seed=3)
    kw = {"max_len": 8, **kw}
    cfg = Config(objective="fedcl", dim=8, n_neg=12, local_epochs=2, lr=0.05, dropout=0.0, dtype="float64",
                 fedcl_clusters=3, fedcl_hard=6, fedcl_noise=0.05, **kw)
    model = from_config(cfg)
    params = model.init(ds.n_items, torch.Generator().manual_seed(0), D)
    users = np.random.default_rng(1).choice(eligible_clients(ds), 12, replace=False)
    return ds, cfg, model, params, users


def test_fedcl_hard_negatives_are_the_top_items_of_the_centroid_of_each_clients_cluster():
    """What the server sends a client is computed from its cluster's perturbed uploads (other clients' too),
    and the uploads are each user's representation clipped, plus fedcl_noise-scaled Laplace noise."""
    ds, cfg, model, params, users = fedcl_setup()
    ex = fedcl_exchange(cfg, model, ds, params, users, 0)
    h = user_representations(model, params, ds, users)
    assert torch.allclose(ex.uploaded, fedcl_perturb(h, cfg.fedcl_clip, fedcl_noise(cfg, 0, users)))
    for c in ex.cluster.unique():
        members = ex.cluster == c
        centroid = ex.uploaded[members].mean(0)
        assert members.sum() < len(users)                                  # the clusters split the round
        want = (params["item_emb"][1:] @ centroid).topk(cfg.fedcl_hard).indices + 1
        assert (ex.items[members] == want).all()
    # the noise key changes what is uploaded; without noise the upload is the clipped representation
    louder = fedcl_exchange(dataclasses.replace(cfg, fedcl_noise=1.0), model, ds, params, users, 0)
    assert not torch.allclose(louder.uploaded, ex.uploaded)
    quiet = fedcl_exchange(dataclasses.replace(cfg, fedcl_noise=0.0), model, ds, params, users, 0)
    norm = h.norm(dim=1, keepdim=True)
    assert torch.allclose(quiet.uploaded, h * cfg.fedcl_clip / norm.clamp(min=cfg.fedcl_clip))
    assert ex.up_bytes == 12 * cfg.dim * 8 and ex.down_bytes == 12 * cfg.fedcl_hard * 4


def test_fedcl_sub_table_drops_own_items_and_marks_the_hard_slots():
    ds, cfg, model, params, users = fedcl_setup()
    u = int(users[0])
    own = np.unique(ds.train_seq(u)[-(cfg.max_len + 1):])
    plain = round_chunks(ds, dataclasses.replace(cfg, chunk_size=1), users[:1], 0)[0]
    uniform = plain.items[0, 1 + len(own):].numpy()
    sent = np.array([own[0], uniform[2], 77 if 77 not in uniform and 77 not in own else 78, uniform[5]])
    c = round_chunks(ds, dataclasses.replace(cfg, chunk_size=1), users[:1], 0, {u: sent})[0]
    items, (a, b) = c.items[0].tolist(), c.hard[0].tolist()
    assert items[1:1 + len(own)] == own.tolist()                            # own items first, unchanged
    assert sorted(items[1 + len(own):b]) == sorted(uniform.tolist())        # the same uniform draw as FedAvg
    assert sorted(items[a:b]) == sorted([uniform[2], uniform[5]])           # drawn uniformly and hard: both
    assert items[b:] == [sent[2]] and own[0] not in items[a:]               # own items are never negatives
    assert c.draws["hard"].shape == (1, cfg.local_epochs, 2)


def test_fedcl_loss_by_hand():
    """L_rec over own + uniform slots (logQ as FedAvg), L_fedcl over own + hard slots (no correction)."""
    cfg = Config(objective="fedcl", dim=4, max_len=3, dropout=0.0, dtype="float64", fedcl_lambda=0.7)
    model = from_config(cfg)
    params = model.init(10, torch.Generator().manual_seed(0), D)
    dense = {k: v for k, v in params.items() if k != "item_emb"}
    table = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=D)
    table[0] = 0
    x, y, col = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), torch.arange(8) > 0
    # slots 1-3 own, 4-5 uniform only, 6 uniform and hard, 7 hard only
    loss, terms = fedcl_loss(model, dense, table, x, y, col, {"hard": torch.tensor([6, 7])}, cfg, n_items=10)
    h = model.encode(params | {"item_emb": table}, x[None])[0]               # (L, d)
    logits = h @ table.T
    ratio = math.log((10 - 3) / 3)                                          # 7 other items, 3 uniform negatives
    rec_bias = torch.tensor([0, 0, 0, 0, ratio, ratio, ratio, float("-inf")], dtype=D)
    cl_bias = torch.tensor([0, 0, 0, 0, float("-inf"), float("-inf"), 0, 0], dtype=D)
    want = {}
    for name, bias in (("rec", rec_bias), ("fedcl", cl_bias)):
        lp = (logits + bias)[:, 1:].log_softmax(-1)                         # column 0 is padding
        want[name] = -(lp[1, 2 - 1] + lp[2, 3 - 1]) / 2
    assert terms["rec"].item() == pytest.approx(want["rec"].item(), rel=1e-12)
    assert terms["fedcl"].item() == pytest.approx(want["fedcl"].item(), rel=1e-12)
    assert loss.item() == pytest.approx((want["rec"] + 0.7 * want["fedcl"]).item(), rel=1e-12)


def test_fedcl_at_weight_zero_is_next_item():
    """Loss and gradients are FedAvg's on the same sub-table (the hard rows get none), and a run does no
    exchange and is FedAvg's to the bit."""
    from torch.func import grad
    ds, cfg, model, params, users = fedcl_setup(fedcl_lambda=0.0)
    ex = fedcl_exchange(cfg, model, ds, params, users, 0)
    c = round_chunks(ds, dataclasses.replace(cfg, chunk_size=1), users[:1], 0, ex.lists())[0]
    dense = {k: v for k, v in params.items() if k != "item_emb"}
    table = params["item_emb"][c.items[0]]
    S, b = table.shape[0], int(c.hard[0, 1])
    draws = {"hard": c.hard[0]}
    assert b < S                                                            # it has hard-only slots

    def ours(t):
        return fedcl_loss(model, dense, t, c.x[0], c.y[0], c.items[0] > 0, draws, cfg, ds.n_items)[0]

    def fedavg_(t):
        return rec_loss(model, dense, t[:b], c.x[0], c.y[0], c.items[0, :b] > 0, ds.n_items)
    assert ours(table).item() == fedavg_(table).item()
    g, g_fed = grad(ours)(table), grad(fedavg_)(table)
    assert torch.equal(g[:b], g_fed[:b]) and not g[b:].any()


@pytest.mark.parametrize("whole_history", [False, True])
def test_fedcl_vmap_matches_loop_and_chunking(whole_history):
    ds, cfg, model, params, users = fedcl_setup(whole_history=whole_history, max_len=4 if whole_history else 8)
    ex = fedcl_exchange(cfg, model, ds, params, users, 0)

    def one_round(engine, chunk_size):
        p = {k: v.clone() for k, v in params.items()}
        chunks = round_chunks(ds, dataclasses.replace(cfg, chunk_size=chunk_size), users, 0, ex.lists())
        u = train_round(model, objective(cfg, ds.n_items), cfg.local_epochs, cfg.lr, cfg.client_opt, p, chunks, engine)
        GlobalOptimizer("sgd", 1.0).apply(p, dense_keys(p), p["item_emb"], fedavg(u))
        return p, u
    p_vmap, u_vmap = one_round("vmap", 8)
    p_loop, u_loop = one_round("loop", 8)
    p_chunk, _ = one_round("vmap", 5)
    for k in p_vmap:
        assert torch.allclose(p_vmap[k], p_loop[k], atol=1e-9, rtol=0), k
        assert torch.allclose(p_vmap[k], p_chunk[k], atol=1e-9, rtol=0), k
    assert set(u_vmap.terms) == {"rec", "fedcl"} and (u_vmap.terms["fedcl"] > 0).all()
    assert torch.allclose(u_vmap.terms["fedcl"], u_loop.terms["fedcl"], atol=1e-9)
    if whole_history:
        assert max(c.x.shape[1] for c in round_chunks(ds, cfg, users, 0, ex.lists())) > 1    # several windows
        return
    # the upload is FedAvg's rows plus the hard negatives' rows, which the term moves
    fed = dataclasses.replace(cfg, objective="next_item")
    chunks = round_chunks(ds, fed, users, 0)
    u_fed = train_round(model, objective(fed, ds.n_items), 2, cfg.lr, cfg.client_opt, params, chunks, "vmap")
    ours = set(zip(u_vmap.clients[u_vmap.rows_client].tolist(), u_vmap.rows_item.tolist()))
    theirs = set(zip(u_fed.clients[u_fed.rows_client].tolist(), u_fed.rows_item.tolist()))
    extra = ours - theirs
    assert theirs < ours and all(i in ex.lists()[c] for c, i in extra)
    moved = [u_vmap.rows_delta[(u_vmap.clients[u_vmap.rows_client] == c) & (u_vmap.rows_item == i)].abs().sum()
             for c, i in extra]
    assert all(m > 0 for m in moved)


def test_fedcl_runs_count_its_bytes_and_weight_zero_runs_fedavg(tmp_path):
    from fortress.data import synthetic
    from fortress.simulate import run
    ds = synthetic(200, 50, seed=0)
    base = dict(rounds=2, dim=8, max_len=10, n_neg=12, clients_per_round=16, eval_every=0, threads=1)
    fed = run(Config(**base), ds, tmp_path / "fed", progress=False)
    ours = run(Config(objective="fedcl", fedcl_hard=5, **base), ds, tmp_path / "fedcl", progress=False)
    # beyond the sub-table rows: up d float32 per client, down fedcl_hard int32 ids per client
    b = ours["bytes"]
    assert b["up_per_round"] - b["down_per_round"] == 16 * (8 * 4 - 5 * 4)
    assert b["down_per_round"] > fed["bytes"]["down_per_round"]              # the hard negatives' rows
    assert set(ours["history"][0]["terms"]) == {"rec", "fedcl"}
    zero = run(Config(objective="fedcl", fedcl_lambda=0.0, **base), ds, tmp_path / "zero", progress=False)
    assert same_saved_model(tmp_path / "fed", tmp_path / "zero") and zero["bytes"] == fed["bytes"]


def test_fedcl_learns_on_synthetic_data(tmp_path):
    """A short FedCL run from scratch learns: far above the most-popular ranking (FedAvg's own test of it)."""
    from fortress.data import synthetic
    from fortress.simulate import run
    ds = synthetic(1500, 150, seed=0)
    res = run(Config(objective="fedcl", rounds=100, dim=32, max_len=20, clients_per_round=64, n_neg=64, eval_every=0,
                     threads=1), ds, tmp_path, progress=False)
    assert res["test"]["HR@10"] > 2 * res["most_popular"]["test"]["HR@10"], res["test"]


def test_fedcl_is_refused_by_the_flower_apps_in_one_line():
    from fortress.flower.common import from_run_config
    with pytest.raises(InputError) as err:
        from_run_config({"objective": "fedcl"})
    assert "objective='fedcl'" in str(err.value) and "\n" not in str(err.value)
    assert from_run_config({"objective": "fedcl", "fedcl-lambda": 0.0})[0].objective == "fedcl"   # = FedAvg: runs
