"""The CLI contract: run (every kind of training), results.json keys, one-line errors, data stats, recommend."""
from __future__ import annotations

import json

import pytest

from fortress.cli import main

METRICS = {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"}
SMALL = ["--set", "synthetic_users=400", "--set", "synthetic_items=60", "--set", "dim=16",
         "--set", "max_len=20", "--quiet"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    return lines[0]


def test_run_writes_results_and_model(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), *SMALL,
                           "--set", "objective=next_item", "--set", "rounds=4", "--set", "clients_per_round=32",
                           "--set", "eval_every=2")
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "history", "valid", "test", "timing", "bytes"} <= set(res)
    assert METRICS <= set(res["valid"]) and METRICS <= set(res["test"])
    assert len(res["history"]) == 4 and "valid" in res["history"][1]
    assert {"seconds_per_round", "eval_seconds", "peak_rss_mb"} <= set(res["timing"])
    assert res["bytes"]["up_per_round"] > 0 and res["bytes"]["down_per_round"] > 0
    assert res["config"]["rounds"] == 4
    assert (tmp_path / "model.pt").is_file()
    assert "HR@10" in out


def test_config_file_and_set_precedence(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('training = "pop"\nseed = 3\n')
    code, _, _ = run_cli(capsys, "run", "--data", "synthetic", "--out", str(tmp_path / "o"), "--config", str(cfg),
                         "--set", "seed=4", *SMALL)
    assert code == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["config"]["training"] == "pop" and res["config"]["seed"] == 4


@pytest.mark.parametrize("setting,expect", [
    ("colour=red", "unknown key 'colour'; known keys: training, objective, backbone"),
    ("training=magic", "training='magic' is not allowed; choose one of: pop, central, federated"),
    ("objective=magic", "objective='magic' is not allowed; choose one of: next_item, fortress"),
    ("mode=fortress", "--set: mode='fortress': `mode` is now two keys, training and objective; write "
                      "training=federated objective=fortress"),
    ("mode=pop", "write training=pop"),
    ("rounds=ten", "rounds='ten': expected an integer"),
    ("lr=-1", "--set: lr=-1.0 is out of range"),
    ("lr=nan", "--set: lr=nan is not a finite number"),
    ("novalue", "expected key=value"),
])
def test_bad_settings_are_one_line_errors(tmp_path, capsys, setting, expect):
    msg = one_line_error(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), "--set", setting)
    assert expect in msg


def test_bad_data_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "seqs.txt"
    bad.write_text("1 2 3\n2 4 x 5\n")
    msg = one_line_error(capsys, "run", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert "seqs.txt:2" in msg and "'x'" in msg
    msg = one_line_error(capsys, "data", "stats", str(tmp_path / "missing.csv"))
    assert "missing.csv" in msg


def test_data_stats_real_dataset(capsys, shared_data):
    code, out, _ = run_cli(capsys, "data", "stats", "amazon-cell-phones")
    assert code == 0
    assert "27,879" in out or "27879" in out
    assert "10,429" in out or "10429" in out


def test_recommend_top_k_unseen(tmp_path, capsys):
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), *SMALL,
                   "--set", "objective=next_item", "--set", "rounds=2", "--set", "clients_per_round=16")[0] == 0
    import torch
    blob = torch.load(tmp_path / "model.pt", weights_only=False)
    u = 7
    seen = {blob["item_ids"][i] for i in blob["seq_items"][blob["seq_ptr"][u]:blob["seq_ptr"][u + 1]].tolist()}
    code, out, _ = run_cli(capsys, "recommend", str(tmp_path), "--user", blob["user_ids"][u], "-k", "5")
    assert code == 0
    lines = out.strip().splitlines()
    # header: the user and the tail of their history, then the model, then the column names
    seq = blob["seq_items"][blob["seq_ptr"][u]:blob["seq_ptr"][u + 1]].tolist()
    last = ", ".join(blob["item_ids"][i] for i in seq[-5:])
    assert lines[0] == f"user {blob['user_ids'][u]}: {len(seq)} known items; the last 5, oldest first: {last}"
    assert "federated/next_item/sasrec" in lines[1] and lines[2].split() == ["rank", "item", "score"]
    rows = lines[3:]
    assert len(rows) == 5 and [r.split()[0] for r in rows] == ["1", "2", "3", "4", "5"]
    items = [r.split()[1] for r in rows]
    assert not set(items) & seen and len(set(items)) == 5
    assert "not a user" in one_line_error(capsys, "recommend", str(tmp_path), "--user", "nobody")
    assert "nope: no saved model (no such folder" in one_line_error(capsys, "recommend", str(tmp_path / "nope"), "--user", "u1")


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path, capsys):
    tiny = [*SMALL, "--set", "rounds=1", "--set", "clients_per_round=8", "--set", "eval_every=0"]
    out = tmp_path / "o"
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(out), *tiny, "--set", "checkpoint_every=1")[0] == 0
    before = (out / "results.json").read_bytes()
    assert "already holds a finished run" in one_line_error(capsys, "run", "--data", "synthetic", "--out", str(out),
                                                            *tiny, "--set", "checkpoint_every=1")
    assert (out / "results.json").read_bytes() == before
    # --overwrite replaces the run and removes its checkpoint, which a run without checkpoints would leave stale
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(out), *tiny, "--set", "seed=1",
                   "--overwrite")[0] == 0
    assert json.loads((out / "results.json").read_text())["config"]["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "results.json"]
    # no checkpoint to continue from: --resume says so, and that the run is finished
    msg = one_line_error(capsys, "run", "--data", "synthetic", "--out", str(out), *tiny, "--set", "seed=1", "--resume")
    assert "is finished (results.json)" in msg


def test_resume_extends_a_run_with_a_checkpoint(tmp_path, capsys):
    tiny = [*SMALL, "--set", "clients_per_round=8", "--set", "eval_every=0", "--set", "checkpoint_every=1"]
    out = tmp_path / "o"
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(out), *tiny, "--set", "rounds=1")[0] == 0
    code, _, err = run_cli(capsys, "run", "--data", "synthetic", "--out", str(out), *tiny, "--set", "rounds=2",
                           "--resume")
    assert code == 0 and "resuming from" in err
    assert len(json.loads((out / "results.json").read_text())["history"]) == 2
    assert "no checkpoint.pt in" in one_line_error(capsys, "run", "--data", "synthetic", "--out", str(tmp_path / "new"),
                                                   *tiny, "--resume")


def test_data_stats_names_the_detected_format(tmp_path, capsys):
    seq = tmp_path / "s.txt"
    seq.write_text("1 2 3 4\n2 3 4 5\n")
    code, out, _ = run_cli(capsys, "data", "stats", str(seq))
    assert code == 0 and "format         seq (detected" in out
    code, out, _ = run_cli(capsys, "data", "stats", str(seq), "--format", "seq")
    assert code == 0 and "format         seq\n" in out


def test_data_stats_recbole_inter_and_benchmark(tmp_path, capsys):
    from fortress.config import Config, override
    from fortress.data.load import FORMATS
    assert [override(Config(), {"data_format": f}).data_format for f in FORMATS] == list(FORMATS)   # all allowed
    inter = tmp_path / "t.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t5\t2\n1\t6\t1\n1\t7\t3\n")
    code, out, _ = run_cli(capsys, "data", "stats", str(inter))
    assert code == 0 and "format         recbole (detected" in out and "interactions   3" in out
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\r\n"
    for part, rows in (("train", "1\t5\t6\r\n"), ("valid", "1\t5 6\t7\r\n"), ("test", "1\t5 6 7\t8\r\n")):
        (tmp_path / f"b.{part}.inter").write_text(head + rows)
    code, out, _ = run_cli(capsys, "data", "stats", str(tmp_path / "b.test.inter"), "--format", "recbole")
    assert code == 0 and "format         recbole\n" in out and "interactions   4" in out


def test_saved_runs_with_the_old_mode_key_still_load(tmp_path, capsys):
    """results.json / model.pt / checkpoint.pt written before `mode` was split hold mode=...: read as the new keys."""
    import torch
    from fortress import config
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), *SMALL, "--set", "rounds=1",
                   "--set", "clients_per_round=16", "--set", "objective=fortress")[0] == 0
    blob = torch.load(tmp_path / "model.pt", weights_only=False)
    old = {k: v for k, v in blob["config"].items() if k not in ("training", "objective")}
    torch.save({**blob, "config": {"mode": "fortress", **old}}, tmp_path / "model.pt")
    code, out, err = run_cli(capsys, "recommend", str(tmp_path), "--user", blob["user_ids"][0], "-k", "3")
    assert code == 0 and "federated/fortress/sasrec" in out, err
    for mode, training, objective in (("fedavg", "federated", "next_item"), ("fortress", "federated", "fortress"),
                                      ("central", "central", "next_item"), ("pop", "pop", "next_item")):
        cfg = config.from_dict({"mode": mode, "seed": 3})
        assert (cfg.training, cfg.objective, cfg.seed) == (training, objective, 3)
    assert config.upgrade({"training": "pop"}) == {"training": "pop"}


def test_device_cuda_is_a_one_line_error_without_cuda(tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = one_line_error(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), "--set", "device=cuda")
    assert "device='cuda': CUDA is not available here" in msg


def test_device_auto_runs_on_the_cpu_here(tmp_path, capsys, monkeypatch):
    import torch

    from fortress.simulate import torch_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device("auto") == torch.device("cpu") and torch_device("cpu") == torch.device("cpu")
    code, _, _ = run_cli(capsys, "run", "--data", "synthetic", "--out", str(tmp_path), *SMALL,
                         "--set", "rounds=2", "--set", "clients_per_round=16", "--set", "device=auto",
                         "--set", "defence=median")
    assert code == 0
    assert json.loads((tmp_path / "results.json").read_text())["config"]["device"] == "auto"


def test_eval_writes_overall_and_strata_of_a_saved_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "run", "--data", "synthetic", "--out", str(run_dir), *SMALL, "--set", "rounds=3",
                   "--set", "clients_per_round=32", "--set", "eval_every=0", "--set", "threads=1")[0] == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert {"history", "popularity"} == set(res["test"]["strata"]) == set(res["valid"]["strata"])
    code, out, err = run_cli(capsys, "eval", str(run_dir), "--split", "both", "--threads", "1")
    assert code == 0, err
    got = json.loads((run_dir / "strata.json").read_text())
    assert got["test"] == res["test"] and got["valid"] == res["valid"]     # the same numbers as the run's own
    assert got["differs_from_results_json"] == {"valid": 0.0, "test": 0.0}
    hist = got["test"]["strata"]["history"]["groups"]
    assert sum(g["users"] for g in hist.values()) == got["test"]["users"] == 400
    pop = got["test"]["strata"]["popularity"]
    assert f"test item cold (<= {pop['cold_max']} in train)" in out and "history 6-20 train items" in out
    assert "overall test metrics equal those in the run's results.json" in out
    out_file = tmp_path / "elsewhere" / "s.json"              # --out: the run's folder is left alone
    before = sorted(p.name for p in run_dir.iterdir())
    assert run_cli(capsys, "eval", str(run_dir), "--out", str(out_file), "--threads", "1")[0] == 0
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert set(json.loads(out_file.read_text())) >= {"run", "model", "dataset", "test"}


def test_eval_finds_a_recbole_benchmark_by_its_folder(tmp_path, capsys, monkeypatch):
    """A benchmark run names its data FOLDER/NAME: eval looks for the folder in $FORTRESS_DATA."""
    shared = tmp_path / "shared"
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    rows = {"train": "1\t5\t6\n2\t7\t5\n3\t6\t8\n", "valid": "1\t5 6\t7\n2\t7 5\t6\n3\t6 8\t5\n",
            "test": "1\t5 6 7\t8\n2\t7 5 6\t8\n3\t6 8 5\t7\n"}
    (shared / "toybench").mkdir(parents=True)
    for part, text in rows.items():
        (shared / "toybench" / f"b.{part}.inter").write_text(head + text)
    monkeypatch.setenv("FORTRESS_DATA", str(shared))
    run_dir = tmp_path / "pop"
    code, _, err = run_cli(capsys, "run", "--data", "toybench", "--out", str(run_dir), "--set", "training=pop", "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", str(run_dir))
    assert code == 0, err
    assert json.loads((run_dir / "strata.json").read_text())["data"] == "toybench"
    msg = one_line_error(capsys, "eval", str(run_dir), "--data", "synthetic")
    assert "--data synthetic: not the data of the run in" in msg and "catalogue" in msg
