"""Full-ranking metrics against hand-computed cases: history masking, ties, ER eligibility."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fortress.data import from_sequences
from fortress.metrics import evaluate


def toy():
    # items 1..5; u0: train [1, 2], valid 3, test 4; u1: train [5, 1], valid 2, test 3; u2: train only
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 1, 2, 3]), np.array([2, 5])]
    return from_sequences("toy", seqs, ["a", "b", "c"], ["", "i1", "i2", "i3", "i4", "i5"])


def fixed(table):
    """A scorer returning the row of `table` for each user, whatever the split."""
    t = torch.tensor(table, dtype=torch.float32)
    return lambda users, split: t[torch.as_tensor(users)]


SCORES = [[0, .9, .8, .7, .1, .5],    # u0: history items score highest; they must be masked
          [0, .1, .2, .3, .9, .4],    # u1: item 4 beats its held-out items
          [0, 0, 0, 0, 0, 0]]


def test_test_split_masks_history_and_ranks_fully():
    res = evaluate(toy(), fixed(SCORES), "test", ks=(1, 2))
    # u0: candidates {4: .1, 5: .5} -> target 4 at rank 1 (0-based)
    # u1: history {5, 1, 2}; candidates {3: .3, 4: .9} -> target 3 at rank 1
    assert res["users"] == 2
    assert res["HR@1"] == 0.0
    assert res["HR@2"] == 1.0
    assert res["NDCG@2"] == pytest.approx(1 / math.log2(3))


def test_valid_split_history_is_train_only():
    res = evaluate(toy(), fixed(SCORES), "valid", ks=(1, 2, 3))
    # u0: history {1, 2}; candidates 3 (.7), 4 (.1), 5 (.5) -> target 3 at rank 0
    # u1: history {5, 1}; candidates 2 (.2), 3 (.3), 4 (.9) -> target 2 at rank 2
    assert res["HR@1"] == 0.5
    assert res["HR@3"] == 1.0
    assert res["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 2)


def test_ties_count_at_their_expected_rank():
    zeros = [[0] * 6] * 3
    res = evaluate(toy(), fixed(zeros), "test", ks=(1, 2))
    # u0 test: 2 candidates all tied -> P(hit@1) = 1/2, u1 test: candidates {3, 4} -> 1/2
    assert res["HR@1"] == pytest.approx(0.5)
    assert res["HR@2"] == pytest.approx(1.0)
    assert res["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_held_out_item_is_never_masked_even_if_repeated():
    ds = from_sequences("rep", [np.array([1, 2, 3, 1])], ["a"], ["", "i1", "i2", "i3"])
    res = evaluate(ds, fixed([[0, .9, .1, .2]]), "test", ks=(1,))
    assert res["HR@1"] == 1.0      # item 1 is both history and target: it stays a candidate


def test_er_eligibility_and_hits():
    res = evaluate(toy(), fixed(SCORES), "test", targets=[5, 4], ks=(1, 2))
    # target 5: u1 has 5 in train -> only u0 eligible; u0 test candidates {4: .1, 5: .5} -> rank 0
    per = res["ER_per_target"]
    assert per["5"]["ER@1"] == 1.0
    # target 4: u0 has it as test item -> only u1 eligible; u1 candidates {3: .3, 4: .9} -> rank 0
    assert per["4"]["ER@1"] == 1.0
    assert res["ER@1"] == 1.0
    res = evaluate(toy(), fixed([[0, .9, .8, .7, .6, .1], [0, .1, .2, .3, .05, .4], [0] * 6]),
                   "test", targets=[4], ks=(1, 2))
    assert res["ER@1"] == 0.0 and res["ER@2"] == 1.0     # u1: 3 (.3) above 4 (.05)


def test_batching_does_not_change_results():
    ds = toy()
    a = evaluate(ds, fixed(SCORES), "test", batch=1, targets=[5])
    b = evaluate(ds, fixed(SCORES), "test", batch=100, targets=[5])
    assert a == b


def test_progress_reports_each_batch_of_users():
    done = []
    res = evaluate(toy(), fixed(SCORES), "test", batch=1, progress=done.append)
    assert done == [1, 1] and res["users"] == 2


def test_sums_of_user_parts_give_the_metrics_of_all_users():
    """Federated evaluation: each part (a SuperNode's users) returns sums; their total is the whole evaluation."""
    from fortress.data import synthetic
    from fortress.metrics import from_sums, rank_sums, zero_sums
    ds = synthetic(120, 40, seed=3)
    table = torch.rand(ds.n_users, ds.n_items + 1, generator=torch.Generator().manual_seed(0))
    table[:, 7] = table[:, 9] = 0.5                       # ties too
    scorer = fixed(table.tolist())
    targets = [3, 17]
    for split, tg in (("valid", None), ("test", targets)):
        whole = evaluate(ds, scorer, split, batch=32, targets=tg)
        parts = [rank_sums(ds, scorer, split, 7, tg, users=np.arange(ds.n_users)[np.arange(ds.n_users) % 3 == p])
                 for p in range(3)]
        total = sum(parts, zero_sums(len(tg or [])))
        assert total.users == whole["users"] == sum(p.users for p in parts) > 0
        got = from_sums(total, tg)
        assert got.keys() == whole.keys()
        for k, v in whole.items():
            if k == "ER_per_target":
                assert v.keys() == got[k].keys()
                assert all(got[k][t][m] == pytest.approx(v[t][m], abs=1e-12) for t in v for m in v[t])
            else:
                assert got[k] == pytest.approx(v, abs=1e-12)
    assert whole["ER@10"] > 0 and got["HR@10"] > 0
    with pytest.raises(ValueError, match="cannot add"):
        zero_sums(1) + zero_sums(2)
    with pytest.raises(ValueError, match="2 targets"):
        from_sums(zero_sums(1), [1, 2])


def test_greater_equal_from_signs_matches_comparisons():
    from fortress.metrics import _greater_equal
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 30), generator=g).float()                 # many ties
    scores[:, :3] = float("-inf")                                               # masked items
    target = scores[torch.arange(40), 10].clone()
    want = ((scores > target[:, None]).sum(1), (scores == target[:, None]).sum(1))
    got = _greater_equal(scores.clone(), target)
    assert torch.equal(got[0], want[0].int()) and torch.equal(got[1], want[1].int())
    scores[5, 7] = float("nan")
    assert _greater_equal(scores.clone(), target) is None                       # rank_sums then compares
