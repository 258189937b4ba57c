"""Attacks: threat model, target picking, sampling, upload format, and that A-hum / PSMU work."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import fortress.attacks as attacks
from fortress.attacks import AttackView, malicious_ids, malicious_updates, pick_targets
from fortress.client import eligible_clients
from fortress.config import Config, override
from fortress.data import from_sequences, synthetic
from fortress.errors import InputError
from fortress.models import Model, dense_keys, from_config
from fortress.server.aggregate import GlobalOptimizer
from fortress.rounds import sample_clients, split_sampled
from fortress.simulate import Run, federated_round, initial_params, run, summary
from fortress.updates import check
from conftest import same_saved_model

TINY = dict(dim=16, max_len=10, n_neg=16, clients_per_round=32, attack_len=6, attack_users=3, attack_steps=3,
            attack_alternatives=5, eval_every=0)


@pytest.fixture(scope="module")
def ds():
    return synthetic(400, 60, seed=1)


def tiny_run(ds, **kw) -> Run:
    cfg = Config(objective="next_item", **{**TINY, **kw})
    model = from_config(cfg)
    return Run(cfg, ds, model, initial_params(cfg, model, ds),
               campaign=attacks.campaign(cfg, ds.item_counts(), ds.item_ids, ds.n_users))


# --- targets --------------------------------------------------------------------------------------

def test_target_picking_is_deterministic_unpopular_and_shared_by_all_attacks(ds):
    counts = ds.item_counts()
    a = pick_targets(counts, ds.item_ids, "unpopular", 3, seed=5)
    assert a == pick_targets(counts, ds.item_ids, "unpopular", 3, seed=5)
    assert len(set(a)) == 3 and all(1 <= t <= ds.n_items for t in a)
    # from the 10% least popular items
    assert max(counts[a]) <= np.sort(counts[1:])[int(np.ceil(0.1 * ds.n_items)) - 1]
    others = {tuple(pick_targets(counts, ds.item_ids, "unpopular", 3, seed=s)) for s in range(6)}
    assert len(others) > 1                                          # the seed matters
    r = pick_targets(counts, ds.item_ids, "random", 2, seed=5)
    assert r == pick_targets(counts, ds.item_ids, "random", 2, seed=5)
    picked = {name: attacks.campaign(Config(attack=name, seed=5, targets=2), counts, ds.item_ids, ds.n_users).targets
              for name in ("none", *attacks.ATTACKS)}
    assert len({tuple(t) for t in picked.values()}) == 1            # identical across methods


def test_explicit_targets_use_the_data_ids(ds):
    assert pick_targets(ds.item_counts(), ds.item_ids, "i7,i12", 2, 0) == [7, 12]
    with pytest.raises(InputError, match="i999"):
        pick_targets(ds.item_counts(), ds.item_ids, "i7,i999", 2, 0)
    with pytest.raises(InputError, match="set targets=2"):
        override(Config(), {"target_pick": "i7,i12"})
    with pytest.raises(InputError, match="needs training='federated'"):
        override(Config(), {"training": "central", "attack": "psmu"})
    with pytest.raises(InputError, match="choose one of"):
        override(Config(), {"attack": "sybil"})


# --- threat model ---------------------------------------------------------------------------------

# pure functions of a round's uploads that a server applies and an attacker who read the code may apply to its
# own simulated uploads (as fortress.bounds for FORTRESS); no server object or state
PUBLIC_RULES = {("fortress.server.hics", "hics")}


def test_attack_modules_do_not_import_data_or_server_state():
    root = Path(attacks.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and all((node.module, a.name) in PUBLIC_RULES for a in node.names):
                continue
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("fortress.data", "fortress.simulate", "fortress.server",
                                            "fortress.metrics")), (path.name, name)


def _leaves(obj):
    """Every value reachable from an AttackView through dataclass fields, dicts and tuples."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_an_attack_cannot_reach_benign_data_or_change_the_global_model(ds, monkeypatch):
    seen: list[tuple[AttackView, object]] = []
    real = attacks.ATTACKS["psmu"]

    def spy(view: AttackView):
        out = real(view)
        seen.append((view, out))
        view.params["item_emb"] += 100.0           # vandalise its copy: the server must not notice
        return out
    monkeypatch.setitem(attacks.ATTACKS, "psmu", spy)

    # a second federation: same users, items and model, different benign sequences
    rng = np.random.default_rng(9)
    other = from_sequences("other", [rng.integers(1, ds.n_items + 1, len(ds.train_seq(u)) + 2)
                                     for u in range(ds.n_users)], ds.user_ids, ds.item_ids)
    for data in (ds, other):
        r = tiny_run(data, attack="psmu", attack_ratio=0.2, target_pick="i5")
        start = r.params["item_emb"].clone()
        entry = federated_round(r, 0, GlobalOptimizer("sgd", 1.0), eligible_clients(data))
        assert entry["malicious"] > 0
        assert (r.params["item_emb"] - start).abs().max() < 50, "the attack's edit of its copy reached the server"
    view = seen[0][0]
    assert {f.name for f in dataclasses.fields(view)} == {"model", "params", "n_items", "targets", "clients",
                                                         "cfg", "seed", "round"}
    allowed = (torch.Tensor, Model, int, float, str, bool)
    assert all(isinstance(x, allowed) for x in _leaves(view)), {type(x) for x in _leaves(view)}
    assert all(int(c) >= ds.n_users for c in view.clients)          # only its own (malicious) ids
    # with different benign data the malicious uploads are identical: they depend on the model only
    a, b = seen[0][1], seen[1][1]
    assert torch.equal(a.clients, b.clients) and torch.equal(a.dense, b.dense)
    assert torch.equal(a.rows_item, b.rows_item) and torch.equal(a.rows_delta, b.rows_delta)


# --- sampling and uploads -------------------------------------------------------------------------

def test_malicious_clients_are_sampled_like_benign_ones():
    eligible = np.arange(1000)
    bad = malicious_ids(1000, 0.05)
    assert len(bad) == 50 and bad.min() == 1000
    assert len(malicious_ids(1000, 0.0001)) == 1 and len(malicious_ids(1000, 0.0)) == 0
    cfg = Config(clients_per_round=100)
    got = [split_sampled(sample_clients(cfg, eligible, r, bad), bad) for r in range(300)]
    share = np.mean([len(m) for _, m in got]) / 100
    assert abs(share - 50 / 1050) < 0.01
    assert all(len(u) + len(m) == 100 and len(np.intersect1d(u, m)) == 0 for u, m in got)
    # without an attack the draw is exactly the attack-free one
    u, m = split_sampled(sample_clients(cfg, eligible, 3, np.zeros(0, dtype=np.int64)), None)
    assert np.array_equal(u, np.random.default_rng([0, 3]).choice(eligible, 100, replace=False)) and len(m) == 0


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_uploads_have_the_benign_format(ds, name, backbone):
    r = tiny_run(ds, attack=name, backbone=backbone, targets=2, blocks=1)
    clients = np.array([ds.n_users + 2, ds.n_users, ds.n_users + 5])
    u = malicious_updates(name, r.cfg, r.model, r.params, ds.n_items, r.campaign.targets, clients, (0, 0, 1))
    dense_size = sum(r.params[k].numel() for k in dense_keys(r.params))
    clean, rejected = check(u, ds.n_items, dense_size, r.cfg.dim)
    assert not rejected and clean.n == 3 and sorted(u.clients.tolist()) == sorted(clients.tolist())
    if name == "weight":                                            # the one attack that lies about its weight
        assert torch.all(u.weight == 100 * r.cfg.max_len)
    else:
        assert torch.all(u.weight == r.cfg.attack_len)              # reports its fake length, no inflation
    assert set(r.campaign.targets) <= set(u.rows_item.tolist())
    if name in ("ahum", "boost"):                                   # target rows and the encoder only
        assert set(u.rows_item.tolist()) == set(r.campaign.targets)
    assert (u.dense.abs().sum() == 0) == (name == "rows") and torch.isfinite(u.rows_delta).all()   # rows: no encoder
    again = malicious_updates(name, r.cfg, r.model, r.params, ds.n_items, r.campaign.targets, clients, (0, 0, 1))
    assert torch.equal(u.rows_delta, again.rows_delta)               # deterministic for a seed


# --- strength -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def er_runs(tmp_path_factory):
    """The README protocol in small: a clean FedAvg model, then 20 more rounds with no attack,
    A-hum or PSMU (2% malicious clients; same targets, same seed), ER@10 every 2 rounds."""
    data = synthetic(800, 80, seed=0)
    base = dict(objective="next_item", dim=16, max_len=10, clients_per_round=48, n_neg=24, threads=1)
    out = tmp_path_factory.mktemp("er")
    run(Config(rounds=40, eval_every=0, **base), data, out / "clean", progress=False)
    return {a: run(Config(attack=a, init_from=str(out / "clean"), rounds=20, eval_every=2, attack_ratio=0.02, **base),
                   data, out / a, progress=False) for a in ("none", "ahum", "psmu")}


def test_results_report_er_history_and_attack_cost(er_runs):
    res = er_runs["psmu"]
    att = res["attack"]
    assert {"targets", "ER@5", "ER@10", "ER@20", "history", "last5_mean", "seconds", "malicious_uploads"} <= set(att)
    assert len(att["history"]) == 10 and att["history"][-1]["round"] == 20
    assert {"ER@5", "ER@10", "ER@20", "HR@10"} <= set(att["history"][0])
    assert att["malicious_clients"] == 16 and att["malicious_uploads"] > 0 and att["seconds"] > 0
    assert "ER@10" not in res["test"] and "HR@10" in res["test"]
    assert er_runs["none"]["attack"]["targets"] == att["targets"]
    assert er_runs["none"]["attack"]["malicious_uploads"] == 0


@pytest.mark.parametrize("name", ["ahum", "psmu"])
def test_attack_raises_er_far_above_no_attack(er_runs, name):
    clean = er_runs["none"]["attack"]["last5_mean"]["ER@10"]
    hit = er_runs[name]["attack"]["last5_mean"]["ER@10"]
    assert hit >= max(10 * clean, 0.3), (name, hit, clean)


def test_cli_runs_an_attack_and_reports_it(tmp_path, capsys):
    from fortress.cli import main
    code = main(["run", "--data", "synthetic", "--out", str(tmp_path), "--quiet", "--set", "synthetic_users=300",
                 "--set", "synthetic_items=50", "--set", "dim=16", "--set", "max_len=10", "--set", "rounds=3",
                 "--set", "clients_per_round=32", "--set", "attack=boost", "--set", "attack_ratio=0.05",
                 "--set", "target_pick=random", "--set", "threads=1"])
    out = capsys.readouterr().out
    assert code == 0 and "attack boost (15 malicious clients" in out and "ER@10" in out


def test_resume_under_attack_continues_exactly(tmp_path, monkeypatch):
    from fortress import checkpoint, simulate
    data = synthetic(300, 60, seed=0)
    cfg = Config(objective="next_item", rounds=6, checkpoint_every=2, eval_every=2, attack="psmu", attack_ratio=0.05,
                 threads=1, **{k: v for k, v in TINY.items() if k != "eval_every"})
    full = run(cfg, data, tmp_path / "full", progress=False)

    def crash(bar, entry):                      # dies after round 4 (and its checkpoint), like a kill
        if entry["round"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(simulate, "_progress", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, data, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    state = torch.load(tmp_path / "cut" / checkpoint.NAME, weights_only=False)["attack"]
    assert state["targets"] == full["attack"]["target_index"] and len(state["malicious"]) == 15
    resumed = run(cfg, data, tmp_path / "cut", progress=False, resume=True)
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    drop = ("seconds", "seconds_per_round")
    assert {k: v for k, v in resumed["attack"].items() if k not in drop} == \
        {k: v for k, v in full["attack"].items() if k not in drop}
    assert resumed["attack"]["malicious_uploads"] > 0


# --- adaptive attacks: a one-round probe each -----------------------------------------------------

@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A FedAvg model trained 30 rounds on synthetic data, its round-30 benign uploads, and a FORTRESS
    monitor warmed on those 30 clean rounds."""
    from fortress.rounds import client_step
    from fortress.server.fortress import FortressConfig, FortressServer
    data = synthetic(2000, 300, seed=0)
    cfg = Config(objective="next_item", dim=16, max_len=10, n_neg=32, clients_per_round=64, attack_len=6, attack_users=3,
                 attack_steps=3, eval_every=0, threads=1, rounds=30, defence="fortress", server_steps=0)
    out = tmp_path_factory.mktemp("probe")
    run(cfg, data, out / "clean", progress=False)
    model = from_config(cfg)
    params = torch.load(out / "clean" / "model.pt", weights_only=False)["params"]
    state = torch.load(out / "clean" / "model.pt", weights_only=False)["defence"]["state"]
    benign = client_step(cfg, model, data, params, np.arange(64), 30).updates
    targets = attacks.pick_targets(data.item_counts(), data.item_ids, "unpopular", 1, 0)

    def server():
        srv = FortressServer(FortressConfig.from_config(cfg), data.n_items)
        srv.load_state_dict(state)
        return srv
    return data, cfg, model, params, benign, targets, server


def attack_round(probe, name: str, m: int, round_: int = 0, **keys):
    from fortress.updates import concat
    data, cfg, model, params, benign, targets, server = probe
    cfg = dataclasses.replace(cfg, **keys)
    bad = np.arange(data.n_users, data.n_users + m)
    u = malicious_updates(name, cfg, model, params, data.n_items, targets, bad, (0, round_, 1))
    return u, concat([benign, u]), targets


def test_stealth_sits_under_every_fortress_threshold(probe):
    u, both, targets = attack_round(probe, "stealth", 6)
    out = probe[-1]().aggregate(both, probe[3])
    assert targets[0] not in out.flagged.tolist()                 # never flagged
    assert float(out.weights[-6:].mean()) > 0.9                   # keeps nearly all its weight: under both clips
    full = (u.rows_item == targets[0]) & (u.weight[u.rows_client] * u.rows_delta.norm(dim=1) > 0.5 * out.log["c_row"])
    assert 1 <= int(full.sum()) < 6                               # only as many full pushers as a cold item may have
    assert len(u.rows_item) > 6 * 64                              # spread over many rows


def test_stealth_spreads_its_encoder_under_the_coherence_rule(probe):
    from fortress import bounds
    u, both, targets = attack_round(probe, "stealth", 6)
    x = torch.nn.functional.normalize(u.dense.double(), dim=1)
    cos = (x @ x.T)[~torch.eye(6, dtype=torch.bool)]
    benign = torch.nn.functional.normalize(probe[4].dense.double(), dim=1)
    _, b = bounds.coherence(benign @ benign.T, bounds.COHERENT_Q)
    assert float(cos.min()) > 0.05 and float(cos.max()) < b + 1 / 5 + 0.05   # one common share, alpha^2 ~ b + 1/(m-1)
    out = probe[-1]().aggregate(both, probe[3])
    srv = probe[-1]()
    factor, _ = srv.coherence(both.dense)
    assert float(factor[-6:].min()) > 0.8, factor   # the attackers keep (nearly) all of their encoder


def test_ramp_stays_unflagged_round_after_round_within_its_window(probe):
    # the ramp replays the server's public rule on its own past pushes: on a server that sees them
    # round after round it stays unflagged, and its pushes add up to the window's allowance, not to a
    # round's allowance every round (what a rule without a window would let through)
    from fortress import bounds
    srv, flagged, mass = probe[-1](), 0, []
    for r in range(12):
        u, both, targets = attack_round(probe, "ramp", 6, round_=r)
        out = srv.aggregate(both, probe[3])
        flagged += targets[0] in out.flagged.tolist()
        size = u.weight[u.rows_client].double() * u.rows_delta.double().norm(dim=1)
        mass.append(float((size[u.rows_item == targets[0]] / out.log["c_row"]).clamp(max=1).sum()))
    assert flagged <= 1
    floor = out.log["rate_floor"]
    per_round = float(bounds.allowance(torch.tensor([floor], dtype=torch.float64), probe[1].p_flag, 6)[0])
    assert mass[0] > 1 and sum(mass) < 0.5 * 12 * per_round, (mass, per_round)


def test_weight_attack_is_a_hum_with_an_inflated_weight(probe):
    u, _, targets = attack_round(probe, "weight", 3)
    a, _, _ = attack_round(probe, "ahum", 3)
    assert torch.all(u.weight == 100 * probe[1].max_len) and torch.all(a.weight == probe[1].attack_len)
    assert torch.equal(u.dense, a.dense) and torch.equal(u.rows_delta, a.rows_delta)


def test_rows_attack_is_popular_without_its_encoder_delta(probe):
    u, _, _ = attack_round(probe, "rows", 3)
    p, _, _ = attack_round(probe, "popular", 3)
    assert torch.all(u.dense == 0) and bool(p.dense.abs().sum() > 0)
    assert torch.equal(u.rows_item, p.rows_item) and torch.equal(u.rows_delta, p.rows_delta)
    assert torch.equal(u.weight, p.weight)


def test_adaptive_shapes_itself_to_the_named_defence(probe):
    from fortress.server import robust
    u, _, _ = attack_round(probe, "adaptive", 3, defence="norm_bound", norm_bound=2.0)
    sq = (u.dense ** 2).sum(1).index_add(0, u.rows_client, (u.rows_delta ** 2).sum(1))
    assert torch.all(sq.sqrt() <= 2.0 + 1e-5) and torch.all(u.dense == 0)   # the whole budget on the target rows
    u, both, _ = attack_round(probe, "adaptive", 3, defence="multi_krum", byz_frac=0.1)
    _, weights = robust.multi_krum(both, 0.1)
    assert float(weights[-3:].mean()) > 0                         # min-max keeps it among the selected
    benign = probe[4].dense
    u, _, _ = attack_round(probe, "adaptive", 3, defence="median")
    inside = (u.dense >= benign.min(0).values) & (u.dense <= benign.max(0).values)
    assert float(inside.float().mean()) > 0.9                     # inside the benign range per coordinate


def test_adaptive_against_hics_passes_its_clips_whole(probe):
    # the rule's own thresholds, estimated on simulated honest users, put the target rows just under the item
    # clip and the whole upload under the user clip: HiCS keeps nearly all of it, far more than of A-hum's
    from fortress.server.hics import hics
    cfg = probe[1]
    keys = dict(defence="hics")
    u, both, targets = attack_round(probe, "adaptive", 6, **keys)
    _, a_both, _ = attack_round(probe, "ahum", 6, **keys)
    out, share, log = hics(both, cfg.hics_item_clip, cfg.hics_keep, cfg.hics_user_clip)
    _, a_share, _ = hics(a_both, cfg.hics_item_clip, cfg.hics_keep, cfg.hics_user_clip)
    assert float(share[-6:].min()) > 0.95, share[-6:]            # neither clipped nor sparsified away

    def target_mass(x, n_bad):
        bad = x.rows_client >= x.n - n_bad
        return float(x.rows_delta[bad & (x.rows_item == targets[0])].norm(dim=1).sum())
    assert target_mass(out, 6) > 0.8 * 6 * 0.9 * log["c_item"]   # each target row near SAFETY x the real clip
    assert int((u.rows_item == targets[0]).sum()) == 6 and len(u.rows_item) > 6 * 32
    assert float(share[-6:].mean()) > float(a_share[-6:].mean()) + 0.2   # A-hum's is clipped (0.65 here)


def test_evade_promotes_after_plausible_histories_and_demotes_after_probe_like_ones(probe):
    # evade's encoder step (before shaping) raises the target's log-probability after histories
    # sampled from the model and lowers it after the cap's probe-like sequences; shaped, it stays
    # under the FORTRESS thresholds like ramp
    from fortress import bounds
    from fortress.attacks import adaptive, ahum
    from fortress.attacks.base import AttackConfig, AttackView
    from fortress.attacks.psmu import sample_histories
    from fortress.updates import unflatten
    data, cfg, model, params, benign, targets, server = probe
    view = AttackView(model, {k: v.clone() for k, v in params.items()}, data.n_items, torch.as_tensor(targets),
                      torch.arange(4), AttackConfig.from_config(cfg), (0, 5, 1), 5)
    step = adaptive.evade_direction(view)
    keys = [k for k in sorted(params) if k != "item_emb"]
    moved = {**params, **{k: params[k] + 20 * v for k, v in unflatten(step.dense[0], params, keys).items()}}
    real = torch.as_tensor(sample_histories(view, np.random.default_rng(9), 64, 6))
    probe_seqs = bounds.probe_sequences(torch.ones(data.n_items + 1, dtype=torch.float64), 64, cfg.max_len,
                                        torch.Generator().manual_seed(9))
    t = torch.as_tensor(targets)

    def lp(p, seqs):
        return float(ahum.target_logprob(model.last(p, seqs), p["item_emb"], t, p["item_emb"][t]).mean())

    assert lp(moved, real) - lp(params, real) > lp(moved, probe_seqs) - lp(params, probe_seqs)
    u, both, _ = attack_round(probe, "evade", 6)
    out = server().aggregate(both, params)
    assert targets[0] not in out.flagged.tolist() and float(out.weights[-6:].mean()) > 0.9


def test_draw_samples_the_softmax_and_never_an_impossible_item(monkeypatch):
    """PSMU's sampler (inverse CDF, attacks.base.draw): the softmax's distribution, as torch.multinomial gave it,
    items at -inf never drawn, and a uniform that rounds up to the total lands on the last possible item."""
    from fortress.attacks.base import draw
    logits = torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf"), 2.0, -30.0, float("-inf")]])
    p = logits.softmax(-1)[0].double()
    x = draw(logits.expand(200000, -1), torch.Generator().manual_seed(0))
    assert x.shape == (200000, 1) and x.dtype == torch.int64
    freq = torch.bincount(x[:, 0], minlength=7).double() / 200000
    assert freq[[0, 3, 6]].sum() == 0                                           # impossible items
    assert torch.allclose(freq, p, atol=4 * (p * (1 - p) / 200000).sqrt().max().item())
    monkeypatch.setattr(torch, "rand", lambda n, k, **kw: torch.ones(n, k, dtype=torch.float64))
    assert draw(logits, torch.Generator()).tolist() == [[5]]                   # the last item with p > 0


def test_several_targets_keep_each_targets_er_history_and_its_last_mean():
    camp = attacks.Campaign("psmu", [3, 7], np.arange(4))
    item_ids = [f"i{j}" for j in range(10)]

    def test(r):
        per = {"3": 0.1 * r, "7": 0.5}
        return {"ER@5": 0.0, "ER@10": sum(per.values()) / 2, "ER@20": 0.0, "HR@10": 0.2,
                "ER_per_target": {t: {"ER@5": 0.0, "ER@10": v, "ER@20": 0.0} for t, v in per.items()}}
    for r in range(1, 8):
        camp.record(r, test(r))
    assert camp.history[0]["ER@10_per_target"] == {"3": pytest.approx(0.1), "7": 0.5}
    out = camp.report(Config(attack="psmu", attack_ratio=0.01), item_ids, test(7), rounds=7, last=5)
    assert out["per_target_last5_mean"]["i3"]["ER@10"] == pytest.approx(0.5)      # rounds 3-7: 0.3 ... 0.7
    assert out["per_target_last5_mean"]["i7"]["ER@10"] == pytest.approx(0.5)
    assert out["last5_mean"]["ER@10"] == pytest.approx(0.5)
    one = attacks.Campaign("psmu", [3], np.arange(4))
    one.record(1, test(1))
    assert "ER@10_per_target" not in one.history[0]
    assert "per_target_last5_mean" not in one.report(Config(attack="psmu"), item_ids, test(1), rounds=1)


def test_a_run_with_several_targets_reports_each_targets_er_over_the_evaluations(ds, tmp_path):
    res = run(Config(objective="next_item", **{**TINY, "eval_every": 1}, rounds=6, attack="psmu", attack_ratio=0.05,
                     targets=2), ds, tmp_path / "r", progress=False)
    att = res["attack"]
    assert len(att["history"]) == 6
    for h in att["history"]:
        per = h["ER@10_per_target"]
        assert len(per) == 2 and h["ER@10"] == pytest.approx(sum(per.values()) / 2)
    last = att["per_target_last5_mean"]
    assert set(last) == set(att["per_target"]) == set(att["targets"])
    assert np.mean([v["ER@10"] for v in last.values()]) == pytest.approx(att["last5_mean"]["ER@10"])
    assert "ER@10 of each target (final / mean of the last evaluations)" in summary(res)
