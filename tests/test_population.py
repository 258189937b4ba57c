"""What a server may know: a node's population (ids, counts, catalogue) and their combination."""
from __future__ import annotations

import numpy as np
import pytest

from fortress.client import eligible_clients
from fortress.data import from_sequences, synthetic
from fortress.errors import InputError
from fortress.population import combine, fingerprint, hosted, partition


def test_the_parts_of_a_dataset_add_up_to_its_population():
    ds = synthetic(50, 20, seed=1)
    whole = hosted(ds, counts=True)
    parts = combine([hosted(ds, partition(ds, p, 3), counts=True) for p in range(3)])
    assert np.array_equal(parts.eligible, whole.eligible) and np.array_equal(whole.eligible, eligible_clients(ds))
    assert np.array_equal(parts.item_counts, ds.item_counts()) and np.array_equal(whole.item_counts, ds.item_counts())
    for key in ("users", "interactions", "n_valid", "n_test", "n_items", "n_users", "item_ids"):
        assert getattr(parts, key) == getattr(whole, key), key
    assert whole.interactions == ds.stats()["interactions"] and parts.nodes == 3
    assert whole.fingerprint == fingerprint(ds) != parts.fingerprint
    assert hosted(ds).item_counts is None
    with pytest.raises(InputError, match="partition-id=3 must be in 0..2"):
        partition(ds, 3, 3)


def test_hosts_must_share_the_catalogue_and_not_share_users():
    ds = synthetic(30, 10, seed=0)
    other = from_sequences("other", [np.array([1, 2, 3])], ["a"], ["", "x1", "x2", "x3"])
    with pytest.raises(InputError, match="disagree on the catalogue"):
        combine([hosted(ds), hosted(other)])
    with pytest.raises(InputError, match="two hosts claim the same user"):
        combine([hosted(ds, partition(ds, 0, 2)), hosted(ds, partition(ds, 0, 2))])
    with pytest.raises(InputError, match="no host"):
        combine([])
