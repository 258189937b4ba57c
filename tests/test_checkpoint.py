"""Atomic checkpoints; `--resume` after kill -9 ends with exactly the uninterrupted model."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fortress import checkpoint
from fortress.config import Config
from fortress.data import synthetic
from fortress.errors import InputError
from fortress.population import fingerprint
from fortress.simulate import run
from conftest import interrupt_and_resume, same_saved_model

SMALL = dict(dim=16, max_len=20, n_neg=16, clients_per_round=24, eval_every=0, threads=1,
             synthetic_users=300, synthetic_items=60)


@pytest.fixture(scope="module")
def ds():
    return synthetic(300, 60, seed=0)


@pytest.mark.parametrize("global_opt", ["sgd", "adam"])
def test_resume_continues_exactly(ds, tmp_path, global_opt):
    cfg = Config(rounds=6, checkpoint_every=2, global_opt=global_opt, global_lr=0.05 if global_opt == "adam" else 1.0,
                 drop_rate=0.2, **SMALL)
    full = run(cfg, ds, tmp_path / "full", progress=False)
    resumed = interrupt_and_resume(cfg, ds, tmp_path / "cut", 4)     # the same settings, stopped after round 4
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    assert resumed["test"] == full["test"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_federated_early_stopping_restores_the_best_round_and_resumes_exactly(ds, tmp_path):
    """fed_patience: validation every eval_every rounds (and at the last), stop after fed_patience without a
    better valid NDCG@10, the best round's model restored; a resumed run stops and restores alike."""
    cfg = Config(**{**SMALL, "eval_every": 1}, rounds=30, fed_patience=2, checkpoint_every=1)
    full = run(cfg, ds, tmp_path / "full", progress=False)
    e = full["early_stopping"]
    ndcg = {i + 1: h["valid"]["NDCG@10"] for i, h in enumerate(full["history"]) if "valid" in h}
    assert e["stopped_early"] and e["rounds_run"] == len(full["history"]) < 30
    assert e["best_round"] == max(ndcg, key=ndcg.get) == e["rounds_run"] - 2
    assert full["valid"]["NDCG@10"] == e["best_valid_NDCG@10"] == max(ndcg.values())   # the final model: the best round's
    resumed = interrupt_and_resume(cfg, ds, tmp_path / "cut", e["rounds_run"] - 1)   # one round before it would stop
    assert resumed["test"] == full["test"] and resumed["early_stopping"] == e
    assert same_saved_model(tmp_path / "full", tmp_path / "cut")
    off = run(dataclasses.replace(cfg, fed_patience=0, rounds=3), ds, tmp_path / "off", progress=False)
    assert "early_stopping" not in off and "valid" not in off["history"][-1]


def test_resume_refuses_other_settings_or_data(ds, tmp_path):
    cfg = Config(rounds=2, checkpoint_every=1, **SMALL)
    run(cfg, ds, tmp_path, progress=False)
    with pytest.raises(InputError, match="cannot resume, lr=1.0 there but lr=0.5 now"):
        run(dataclasses.replace(cfg, lr=0.5), ds, tmp_path, progress=False, resume=True)
    with pytest.raises(InputError, match="other data"):
        run(cfg, synthetic(300, 60, seed=1), tmp_path, progress=False, resume=True)


def test_a_write_that_dies_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch, ds):
    cfg = Config(rounds=1, checkpoint_every=1, **SMALL)
    run(cfg, ds, tmp_path, progress=False)
    before = (tmp_path / checkpoint.NAME).read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk died")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, {"round": 99})
    monkeypatch.undo()
    assert (tmp_path / checkpoint.NAME).read_bytes() == before
    assert list(tmp_path.glob(".checkpoint.pt.*.tmp"))            # the torn temporary file
    assert checkpoint.load(tmp_path, cfg, fingerprint(ds))["round"] == 1
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))        # cleaned up on load


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_model(ds, tmp_path):
    rounds = 120
    sets = [f"{k}={v}" for k, v in {**SMALL, "rounds": rounds, "checkpoint_every": 3}.items()]
    argv = [sys.executable, "-m", "fortress.cli", "run", "--data", "synthetic", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    cut = tmp_path / "cut"
    proc = subprocess.Popen(argv + ["--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline, done = cut / checkpoint.NAME, time.monotonic() + 120, 0
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            done = torch.load(ckpt, weights_only=False)["round"]
            if done >= 6:
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "model.pt").exists()
    again = subprocess.run(argv + ["--out", str(cut), "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-1000:]
    assert "resuming from" in again.stderr
    assert torch.load(ckpt, weights_only=False)["round"] == rounds
    full = run(Config(rounds=rounds, **SMALL), ds, tmp_path / "full", progress=False)
    assert same_saved_model(cut, tmp_path / "full")
    import json
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["test"] == full["test"] and len(resumed["history"]) == rounds
