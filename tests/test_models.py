"""Backbones: shapes, parameter counts, SASRec causality, padding invariance."""
from __future__ import annotations

import pytest
import torch

from fortress.models import Model, dense_keys


def build(backbone, dim=16, max_len=8, blocks=2, heads=2):
    m = Model(backbone, dim, max_len, blocks, heads, 0.0)
    return m, m.init(20, torch.Generator().manual_seed(0), torch.float64)


def test_sasrec_parameter_count():
    m, p = build("sasrec", dim=16, max_len=8, blocks=2)
    per_block = 4 * 16 + (16 * 48 + 48) + (16 * 16 + 16) + 2 * (16 * 16 + 16)
    assert sum(t.numel() for t in p.values()) == 21 * 16 + 8 * 16 + 2 * per_block + 2 * 16
    assert "item_emb" not in dense_keys(p)
    assert torch.all(p["item_emb"][0] == 0)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_shapes(backbone):
    m, p = build(backbone)
    h = m.encode(p, torch.tensor([[0, 3, 4], [5, 6, 7]]))
    assert h.shape == (2, 3, 16)
    assert m.score(p, h).shape == (2, 3, 21)
    assert m.score(p, h, torch.tensor([1, 2])).shape == (2, 3, 2)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_causal_later_items_do_not_change_earlier_outputs(backbone):
    m, p = build(backbone)
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = a.clone()
    b[0, 4:] = torch.tensor([9, 11])
    ha, hb = m.encode(p, a), m.encode(p, b)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-12)
    assert not torch.allclose(ha[:, 4:], hb[:, 4:])


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_left_padding_does_not_change_outputs(backbone):
    m, p = build(backbone)
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5]])
    assert torch.allclose(m.encode(p, short), m.encode(p, padded)[:, 3:], atol=1e-12)


def test_sasrec_rejects_sequences_longer_than_max_len():
    m, p = build("sasrec", max_len=4)
    with pytest.raises(ValueError):
        m.encode(p, torch.ones(1, 5, dtype=torch.long))


def test_sasrec_last_position_only_equals_the_full_pass():
    import torch
    from fortress.models import sasrec
    p = sasrec.init(30, 16, 8, blocks=2, heads=2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seqs = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0, 0, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    full = sasrec.encode(p, seqs, heads=2)[:, -1]
    assert torch.allclose(sasrec.encode(p, seqs, heads=2, last=True)[:, -1], full, atol=1e-12)
