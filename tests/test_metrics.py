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


def strata_toy():
    """Users of each history stratum and test items of each popularity stratum (counted in the test below)."""
    seqs = [np.array([1, 1, 2, 3, 6]),                                        # u0: train 3 items, test 6
            np.array([1, 1, 1, 2, 2, 3, 4, 5, 4, 1]),                         # u1: train 8, test 1
            np.array([1] * 10 + [2] * 6 + [3] * 3 + [4] * 2 + [5] + [2, 5]),  # u2: train 22, test 5
            np.array([1, 2, 3, 4, 5, 2])]                                     # u3: train 4, test 2
    return from_sequences("strata", seqs, ["a", "b", "c", "d"], [""] + [f"i{i}" for i in range(1, 7)])


STRATA_SCORES = [[0, .9, .8, .7, .1, .2, .5],     # u0: candidates 4, 5, 6 -> target 6 first
                 [0, .3, .9, .9, .9, .9, .5],     # u1: candidates 1 (target, repeated), 6 -> second
                 [0, .9, .9, .9, .9, .6, .5],     # u2: candidates 5 (target), 6 -> first
                 [0, .9, .3, .9, .9, .9, .5]]     # u3: candidates 2 (target), 6 -> second


def test_popularity_cuts_hold_a_fifth_of_train_interactions_at_each_end():
    from fortress.metrics import popularity_cuts
    ds = strata_toy()
    # train counts: item 1: 16, 2: 10, 3: 5, 4: 4, 5: 2, 6: 0 (37 in all; a fifth is 7.4)
    assert ds.item_counts().tolist() == [0, 16, 10, 5, 4, 2, 0]
    # least popular: 6, 5, 4 hold 6 < 7.4, with 3 they hold 11 -> cold <= 5; item 1 alone holds 16 -> popular >= 16
    assert popularity_cuts(ds.item_counts()) == (5, 16)
    # items of one count stay together: ten items of count 1 and one of 10 -> cold takes all ten ones
    assert popularity_cuts(np.array([0] + [1] * 10 + [10])) == (1, 10)


def test_strata_count_hits_per_history_length_and_target_popularity():
    res = evaluate(strata_toy(), fixed(STRATA_SCORES), "test", ks=(1, 2), by_strata=True)
    # hits at 1: u0 yes, u1 no, u2 yes, u3 no; at 2 all hit, u1 and u3 at rank 1 (gain 1/log2(3))
    assert res["users"] == 4 and res["HR@1"] == 0.5 and res["HR@2"] == 1.0
    st = res["strata"]
    hist, pop = st["history"]["groups"], st["popularity"]["groups"]
    assert st["history"]["cuts"] == [5, 20]
    assert (st["popularity"]["cold_max"], st["popularity"]["popular_min"]) == (5, 16)
    # history: <=5 = u0 (3 items), u3 (4); 6-20 = u1 (8); >20 = u2 (22)
    assert {k: g["users"] for k, g in hist.items()} == {"<=5": 2, "6-20": 1, ">20": 1}
    assert (hist["<=5"]["HR@1"], hist["6-20"]["HR@1"], hist[">20"]["HR@1"]) == (0.5, 0.0, 1.0)
    assert hist["<=5"]["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    # test items: u0 6 (0 in train) and u2 5 (2): cold; u3 2 (10): mid; u1 1 (16): popular
    assert {k: g["users"] for k, g in pop.items()} == {"cold": 2, "mid": 1, "popular": 1}
    assert (pop["cold"]["HR@1"], pop["mid"]["HR@1"], pop["popular"]["HR@1"]) == (1.0, 0.0, 0.0)
    assert pop["popular"]["NDCG@2"] == pytest.approx(1 / math.log2(3))


def test_strata_leave_the_overall_metrics_bit_identical():
    from fortress.data import synthetic
    ds = synthetic(300, 60, seed=3)
    table = torch.rand(ds.n_users, ds.n_items + 1, generator=torch.Generator().manual_seed(0))
    scorer = fixed(table.tolist())
    for split in ("valid", "test"):
        plain = evaluate(ds, scorer, split, batch=50, targets=[3])
        with_strata = evaluate(ds, scorer, split, batch=50, targets=[3], by_strata=True)
        st = with_strata.pop("strata")
        assert with_strata == plain
        for name in ("history", "popularity"):            # every evaluated user is in one stratum of each
            groups = st[name]["groups"].values()
            assert sum(g["users"] for g in groups) == plain["users"]
            assert sum(g["users"] * g["HR@10"] for g in groups) == pytest.approx(plain["users"] * plain["HR@10"])


def test_strata_sums_of_user_parts_add_up():
    from fortress.data import synthetic
    from fortress.metrics import from_sums, rank_sums, strata, zero_sums
    ds = synthetic(120, 40, seed=3)
    scorer = fixed(torch.rand(ds.n_users, ds.n_items + 1, generator=torch.Generator().manual_seed(1)).tolist())
    groups = strata(ds, "test")
    whole = evaluate(ds, scorer, "test", batch=32, by_strata=True)
    parts = [rank_sums(ds, scorer, "test", 7, users=np.flatnonzero(np.arange(ds.n_users) % 3 == p), groups=groups)
             for p in range(3)]
    got = from_sums(parts[0] + parts[1] + parts[2], groups=groups)
    for name, st in whole["strata"].items():
        for k, g in st["groups"].items():
            assert got["strata"][name]["groups"][k] == pytest.approx(g, abs=1e-12)
    with pytest.raises(ValueError, match="cannot add"):
        parts[0] + zero_sums()                            # sums with strata and without do not mix
