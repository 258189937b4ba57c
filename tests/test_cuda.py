"""The CUDA path (`device=cuda`): a round, a run and every method on the GPU against the CPU.

Skipped where torch sees no GPU (CI has none); `make test-cuda` runs them on a machine with one
(docs/results/engine.md#device says when they last ran and what they found).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fortress.config import Config
from fortress.data import synthetic
from fortress.simulate import run

from conftest import client_round

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")]


@pytest.fixture(scope="module")
def ds():
    return synthetic(400, 90, seed=3)


@pytest.mark.parametrize("backbone,engine", [("sasrec", "vmap"), ("sasrec", "loop"), ("gru4rec", "vmap")])
def test_a_round_on_cuda_is_the_cpu_round(ds, backbone, engine):
    """float64, no dropout: the same clients, negatives and steps give the same model to rounding."""
    cfg = Config(backbone=backbone, client_opt="adam", lr=0.01, dim=16, max_len=10, n_neg=12, local_epochs=2,
                 dropout=0.0, heads=2)
    cpu, _ = client_round(ds, cfg, "vmap", 16)
    gpu, _ = client_round(ds, cfg, engine, 16, device="cuda")
    gpu = {k: v.cpu() for k, v in gpu.items()}
    for k in cpu:
        assert torch.allclose(cpu[k], gpu[k], atol=1e-8, rtol=0), (k, (cpu[k] - gpu[k]).abs().max().item())


SHORT = dict(rounds=4, clients_per_round=48, dim=16, max_len=12, n_neg=24, eval_every=2, threads=1, probe_users=32)
# every training mode, client objective, server rule and attack family once (a short run each)
METHODS = {
    "fedavg": dict(objective="next_item"),
    "fortress-ahum": dict(objective="fortress", defence="fortress", attack="ahum", attack_ratio=0.05),
    "fortress-psmu-gru": dict(objective="fortress", defence="fortress", attack="psmu", attack_ratio=0.05,
                              backbone="gru4rec"),
    "fortress-reach-adaptive": dict(objective="fortress", defence="fortress", reach_cap=1.5, attack="adaptive",
                                    attack_ratio=0.05),
    "median-random": dict(defence="median", attack="random", attack_ratio=0.05),
    "trimmed-popular": dict(defence="trimmed_mean", attack="popular", attack_ratio=0.05),
    "krum-boost": dict(defence="krum", attack="boost", attack_ratio=0.05),
    "multikrum-stealth": dict(defence="multi_krum", attack="stealth", attack_ratio=0.05),
    "normbound-ramp": dict(defence="norm_bound", attack="ramp", attack_ratio=0.05),
    "fedavg-weight": dict(attack="weight", attack_ratio=0.05),
    "fedavg-evade-rows": dict(attack="evade", attack_ratio=0.05),
    "union": dict(objective="union", defence="union", attack="rows", attack_ratio=0.05),
    "hics": dict(defence="hics", attack="psmu", attack_ratio=0.05),
    "fedcl": dict(objective="fedcl", attack="ahum", attack_ratio=0.05),
    "ptf": dict(training="ptf", local_epochs=1),
    "central": dict(training="central", epochs=1),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_on_cuda(ds, tmp_path, name):
    cfg = Config(device="cuda", **{**SHORT, **METHODS[name]})
    res = run(cfg, ds, tmp_path, progress=False)
    for split in ("valid", "test"):
        assert all(0 <= res[split][k] <= 1 for k in ("HR@10", "NDCG@10")), res[split]
    assert np.isfinite([h["loss"] for h in res.get("history", []) if "loss" in h]).all()
    if cfg.attack != "none":
        assert 0 <= res["attack"]["ER@10"] <= 1


def test_a_fedavg_run_on_cuda_is_the_cpu_run(ds, tmp_path):
    """float64, no dropout: the whole run (sampling, rounds, full-ranking evaluation) agrees with the CPU's."""
    cfg = Config(objective="next_item", dtype="float64", dropout=0.0, **SHORT)
    cpu = run(cfg, ds, tmp_path / "cpu", progress=False)
    gpu = run(dataclasses.replace(cfg, device="cuda"), ds, tmp_path / "gpu", progress=False)
    for k in ("HR@10", "NDCG@10", "HR@20"):
        assert abs(cpu["test"][k] - gpu["test"][k]) < 1e-9, (k, cpu["test"], gpu["test"])
    assert np.allclose([h["loss"] for h in cpu["history"]], [h["loss"] for h in gpu["history"]], atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["fedavg", "fortress-ahum"])
def test_cuda_runs_are_deterministic_for_a_seed(ds, tmp_path, name):
    cfg = Config(device="cuda", **{**SHORT, **METHODS[name]})
    a = run(cfg, ds, tmp_path / "a", progress=False)
    b = run(cfg, ds, tmp_path / "b", progress=False)
    assert a["test"] == b["test"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
