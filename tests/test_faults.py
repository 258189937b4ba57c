"""Bad uploads are rejected by client id, drop-outs are survived, the round goes on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fortress import faults
from fortress.config import Config
from fortress.data import synthetic
from fortress.errors import InputError
from fortress.simulate import run
from fortress.updates import Updates, check, norms
from fortress.wire import BadUpload, from_arrays, to_arrays

SMALL = dict(dim=16, max_len=20, n_neg=16, clients_per_round=24, eval_every=0, threads=1)


@pytest.fixture(scope="module")
def ds():
    return synthetic(300, 60, seed=0)


def toy(n: int = 4, P: int = 3, d: int = 2) -> Updates:
    """n clients with ids 10.., two item rows each (items 1 and 2 + client index)."""
    rows_client = torch.arange(n).repeat_interleave(2)
    rows_item = torch.stack([torch.ones(n, dtype=torch.int64), 2 + torch.arange(n)], 1).flatten()
    return Updates(10 + torch.arange(n), torch.ones(n), torch.full((n, P), 0.1), rows_client, rows_item,
                   torch.full((2 * n, d), 0.1), torch.zeros(n))


def test_check_rejects_each_kind_of_bad_upload_by_client_id():
    u = toy(6)
    u.dense[0, 1] = float("nan")                       # client 10
    u.rows_delta[3, 0] = float("inf")                  # a row of client 11
    u.rows_item[4] = 99                                # client 12: unknown item
    u.dense[3] *= 1e6                                  # client 13: absurd norm
    u.rows_item[9] = u.rows_item[8]                    # client 14: the same row twice
    u.weight[5] = -1.0                                 # client 15
    clean, rejected = check(u, n_items=20, dense_size=3, dim=2, max_norm=100.0)
    reasons = dict(rejected)
    assert sorted(reasons) == [10, 11, 12, 13, 14, 15]
    assert "NaN/Inf" in reasons[10] and "NaN/Inf" in reasons[11]
    assert "outside 1..20" in reasons[12] and "exceeds max_update_norm=100" in reasons[13]
    assert "twice" in reasons[14] and "weight" in reasons[15]
    assert clean.n == 0
    ok, none = check(toy(3), n_items=20, dense_size=3, dim=2, max_norm=100.0)
    assert none == [] and ok.n == 3
    assert torch.allclose(norms(toy(1)), torch.tensor([(7 * 0.01) ** 0.5], dtype=torch.float64), atol=1e-6)   # 3 + 2 * 2 entries of 0.1


def test_check_keeps_the_good_clients_and_reindexes_their_rows():
    u = toy(3)
    u.rows_delta[2, 1] = float("nan")                  # client 11
    clean, rejected = check(u, 20, 3, 2)
    assert rejected == [(11, "NaN/Inf in item-row update")]
    assert clean.clients.tolist() == [10, 12] and clean.rows_client.tolist() == [0, 0, 1, 1]
    assert clean.rows_item.tolist() == [1, 2, 1, 4]


def test_wire_rejects_wrong_dtype_shape_and_names():
    good = to_arrays(toy(3))
    assert from_arrays(good, 3, 2, torch.float32).n == 3
    cases = {
        "dtype": {**good, "dense": good["dense"].astype(np.float16)},
        "ids dtype": {**good, "rows_item": good["rows_item"].astype(np.float32)},
        "shape": {**good, "dense": good["dense"][:, :2]},
        "rows": {**good, "rows_delta": good["rows_delta"][:-1]},
        "missing": {k: v for k, v in good.items() if k != "loss"},
        "extra": {**good, "surprise": np.zeros(1)},
        "rows_client": {**good, "rows_client": good["rows_client"] + 5},
        "duplicate client": {**good, "clients": np.array([10, 10, 11])},
        "unknown term": {**good, "term-colour": np.zeros(3, dtype=np.float32)},
        "term dtype": {**good, "term-rec": np.zeros(3, dtype=np.float64)},
        "term shape": {**good, "term-rec": np.zeros(2, dtype=np.float32)},
    }
    for name, arrays in cases.items():
        with pytest.raises(BadUpload):
            from_arrays(arrays, 3, 2, torch.float32)
        assert name
    # the logged loss terms (objective=fortress) travel too
    u = toy(3)
    u.terms = {"rec": torch.tensor([1.0, 2.0, 3.0]), "temp": torch.tensor([0.1, 0.2, 0.3])}
    back = from_arrays(to_arrays(u), 3, 2, torch.float32)
    assert back.terms.keys() == u.terms.keys() and all(torch.equal(back.terms[k], u.terms[k]) for k in u.terms)


def test_fault_draws_do_not_depend_on_who_else_is_in_the_batch():
    cfg = Config(drop_rate=0.5, seed=3)
    users = np.arange(100)
    kept = faults.answering(cfg, 7, users)
    assert 20 < len(kept) < 80
    assert np.array_equal(faults.answering(cfg, 7, users[::2]), kept[kept % 2 == 0])


def test_a_run_survives_garbage_and_drop_outs(ds, tmp_path, caplog):
    cfg = Config(rounds=4, drop_rate=0.3, corrupt_rate=0.3, min_answered=0.1, **SMALL)
    res = run(cfg, ds, tmp_path, progress=False)
    assert res["rejected"], "corrupt_rate=0.3 over 4 rounds must produce rejections"
    assert {"round", "client", "reason"} <= set(res["rejected"][0])
    logged = " ".join(r.getMessage() for r in caplog.records)
    first = res["rejected"][0]
    assert f"rejected client {first['client']}" in logged
    for h in res["history"]:
        assert h["sampled"] == 24 and h["dropped"] > 0
        assert h["clients"] + h["rejected"] + h["dropped"] == 24 and "skipped" not in h
    params = torch.load(tmp_path / "model.pt", weights_only=False)["params"]
    assert all(torch.isfinite(p).all() for p in params.values())
    assert 0 < res["test"]["HR@10"] <= 1


def test_too_few_answers_skip_the_round(ds, tmp_path):
    base = Config(rounds=0, **SMALL)
    start = run(base, ds, tmp_path / "a", progress=False)
    cfg = Config(rounds=2, drop_rate=0.9, min_answered=0.5, **SMALL)
    res = run(cfg, ds, tmp_path / "b", progress=False)
    assert all("skipped" in h for h in res["history"])
    assert res["test"] == start["test"]                 # the model never moved


def test_fault_rates_are_validated():
    from fortress.config import override
    with pytest.raises(InputError, match=r"drop_rate=1.5 is out of range"):
        override(Config(), {"drop_rate": "1.5"})
