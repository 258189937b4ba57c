"""Flower apps: config boundary, same results as the simulator, faults on the Flower server,
`flwr run` simulation, and a secure 3-node deployment as separate processes."""
from __future__ import annotations

import json
import os
import tomllib

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower apps need: pip install -e '.[flower]'")  # noqa: F841
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fortress import checkpoint  # noqa: E402
from fortress.config import Config, keys  # noqa: E402
from fortress.data import synthetic  # noqa: E402
from fortress.errors import InputError  # noqa: E402
from fortress.flower import client_app  # noqa: E402
from fortress.flower.common import FLOWER_KEYS, FlowerOptions, from_run_config  # noqa: E402
from fortress.flower.server_app import discover, serve  # noqa: E402
from fortress.simulate import run  # noqa: E402

from conftest import ROOT  # noqa: E402

for k, v in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
             "FLWR_DISABLE_UPDATE_CHECK": "1"}.items():
    os.environ[k] = v

SMALL = dict(dim=16, max_len=20, n_neg=16, clients_per_round=24, eval_every=0, threads=1,
             synthetic_users=300, synthetic_items=60)
EXACT = dict(SMALL, dropout=0.0, dtype="float64")       # clients train identically in any grouping


def kebab(values: dict) -> dict:
    return {k.replace("_", "-"): v for k, v in values.items()}


@pytest.fixture(scope="module")
def ds():
    return synthetic(300, 60, seed=0)


def params(folder):
    return torch.load(folder / "model.pt", weights_only=False)["params"]


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- the config boundary -------------------------------------------------------------------------

def test_pyproject_run_config_lists_every_key_and_converts_once():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) == {k.replace("_", "-") for k in keys()} | set(FLOWER_KEYS), \
        "every Config key must be in [tool.flwr.app.config] (kebab-case), or Flower cannot override it"
    cfg, opts = from_run_config(table)
    assert cfg.clients_per_round == table["clients-per-round"] and cfg.n_neg == table["n-neg"]
    assert opts == FlowerOptions()
    with pytest.raises(InputError, match="unknown key 'colour'"):
        from_run_config({**table, "colour": "red"})
    with pytest.raises(InputError, match="dim=0 is out of range"):
        from_run_config({**table, "dim": 0})
    with pytest.raises(InputError, match="the Flower apps run federated training only"):
        from_run_config({**table, "training": "central"})


# ---- the apps in this process: a Grid that hands messages to the real ClientApp ---------------------

class LocalGrid:
    """Delivers each message to `client_app.app` with that node's Context; `faults` maps
    node index -> 'error' | 'silent' | 'float16' | 'stray' | 'offline' (gone after the query)
    to misbehave in train rounds. The server's run config names data that does not exist
    (`data=/nonexistent`): only the nodes, told `data=synthetic` in their node config, have data.
    `attackers` more nodes run with role=attacker; `sent` keeps every message, `replies` every reply."""

    def __init__(self, run_config: dict, n_nodes: int, faults: dict[int, str] | None = None,
                 crash_after: int | None = None, attackers: int = 0):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.ids = [1000 + 7 * i for i in range(n_nodes + attackers)]
        run_config = {**run_config, "data": "/nonexistent"}
        self.contexts = {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=run_config,
                                      node_config={"partition-id": i, "num-partitions": n_nodes, "data": "synthetic"}
                                      if i < n_nodes else {"role": "attacker"})
                         for i, nid in enumerate(self.ids)}
        self.sent, self.replies = [], []
        self.faults = {self.ids[i]: f for i, f in (faults or {}).items()}
        self.crash_after, self.trains = crash_after, 0

    def get_node_ids(self):
        return [n for n in self.ids if self.faults.get(n) != "offline" or self.trains == 0]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        self.sent += list(messages)
        for m in messages:
            nid = m.metadata.dst_node_id
            fault = self.faults.get(nid) if m.metadata.message_type == "train" else None
            if m.metadata.message_type == "train":
                self.trains += 1
                if self.crash_after is not None and self.trains > self.crash_after:
                    raise KeyboardInterrupt("the server dies")
            if fault == "silent":
                continue
            if fault == "error":
                replies.append(Message(Error(code=0, reason="ClientApp raised"), reply_to=m))
                continue
            rep = client_app.app(m, self.contexts[nid])
            if fault in ("float16", "stray"):
                arrays = {k: a.numpy() for k, a in rep.content["updates"].items()}
                if fault == "float16":
                    arrays["dense"] = arrays["dense"].astype(np.float16)
                else:
                    arrays["clients"] = arrays["clients"] + 1
                rep = Message(RecordDict({"updates": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                                          "metrics": rep.content["metrics"]}), reply_to=m)
            replies.append(rep)
        self.replies += replies
        return replies


def flower_run(cfg: Config, out, grid: LocalGrid, resume: bool = False):
    """The ServerApp's own `discover` + `serve`, given no data."""
    opts = FlowerOptions(resume=resume, round_timeout=5.0)
    return serve(cfg, discover(grid, opts, cfg), grid, out, opts)


def test_one_node_is_bit_identical_to_the_simulator(ds, tmp_path):
    cfg = Config(rounds=3, **SMALL)                       # float32, dropout 0.2: the same masks too
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    got = flower_run(cfg, tmp_path / "fl", LocalGrid(kebab(SMALL), 1))
    assert max_diff(params(tmp_path / "sim"), params(tmp_path / "fl")) == 0.0
    assert "strata" not in got["test"]                   # a server without the data: no strata (the simulator has them)
    assert got["test"] == {k: v for k, v in ref["test"].items() if k != "strata"}


def test_an_attack_runs_under_flower_like_in_the_simulator(ds, tmp_path):
    """Malicious clients run on an attacker node of their own, which gets the broadcast model, its own
    malicious ids and the targets, nothing else; the server runs no attack code."""
    sets = dict(EXACT, attack="psmu", attack_ratio=0.05, attack_len=6, eval_every=1)
    cfg = Config(rounds=2, **sets)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    grid = LocalGrid(kebab(sets), 3, attackers=1)
    got = flower_run(cfg, tmp_path / "fl", grid)
    assert max_diff(params(tmp_path / "sim"), params(tmp_path / "fl")) < 1e-12
    assert got["attack"]["malicious_uploads"] == ref["attack"]["malicious_uploads"] > 0
    assert abs(got["attack"]["ER@10"] - ref["attack"]["ER@10"]) < 1e-9
    attacker = grid.ids[3]
    to_attacker = [m for m in grid.sent if m.metadata.dst_node_id == attacker and m.metadata.message_type == "train"]
    assert len(to_attacker) == sum(h["malicious"] > 0 for h in got["history"]) > 0
    for m in to_attacker:
        assert set(m.content.keys()) == {"params", "task", "users", "targets"}
        assert all(int(i) >= ds.n_users for i in m.content["users"]["users"].numpy())      # its own ids only
    assert not [m for m in grid.sent if m.metadata.dst_node_id == attacker and m.metadata.message_type == "evaluate"]
    with pytest.raises(InputError, match="no SuperNode with role=attacker"):
        flower_run(cfg, tmp_path / "none", LocalGrid(kebab(sets), 3))


def test_the_server_defence_runs_in_the_flower_server_like_in_the_simulator(ds, tmp_path):
    """The defence is part of server_step: under Flower it sees the same uploads, flags the same items."""
    sets = dict(EXACT, attack="ahum", attack_ratio=0.05, defence="fortress", popular_frac=0.1)
    cfg = Config(rounds=3, **sets)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    got = flower_run(cfg, tmp_path / "fl", LocalGrid(kebab(sets), 3, attackers=1))
    assert max_diff(params(tmp_path / "sim"), params(tmp_path / "fl")) < 1e-12
    keys = ("n_flagged", "flagged", "down_weighted", "rows_clipped", "targets_flagged", "coherent_scaled")
    assert [{k: h["defence"][k] for k in keys} for h in got["history"]] == \
        [{k: h["defence"][k] for k in keys} for h in ref["history"]]
    # a mean over clients: equal up to the order of the sum (the last bits differ on some CPUs)
    for a, b in zip(got["history"], ref["history"]):
        a, b = a["defence"]["weight_malicious"], b["defence"]["weight_malicious"]
        assert a == b if a is None or b is None else a == pytest.approx(b, rel=1e-12)


def test_three_nodes_match_the_simulator_with_evaluation_on_the_nodes(ds, tmp_path):
    """The server has no data: validation, target exposure and the final metrics are sums from the nodes,
    equal to the in-process evaluation; what the nodes send back is ids, counts and sums, never an item
    of a user's history or a held-out item."""
    sets = dict(EXACT, eval_every=1, targets=2)
    cfg = Config(rounds=3, **sets)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    grid = LocalGrid(kebab(sets), 3)
    got = flower_run(cfg, tmp_path / "fl", grid)
    assert max_diff(params(tmp_path / "sim"), params(tmp_path / "fl")) < 1e-12
    close = lambda a, b: a.keys() == b.keys() and all(
        close(a[k], b[k]) if isinstance(a[k], dict) else a[k] == pytest.approx(b[k], abs=1e-9) for k in a)
    overall = lambda res: {k: v for k, v in res.items() if k != "strata"}     # noqa: E731 - no strata without the data
    assert close(got["valid"], overall(ref["valid"])) and close(got["test"], overall(ref["test"]))
    assert got["valid"]["users"] == ref["valid"]["users"] > 0
    for a, b in zip(got["history"][:-1], ref["history"][:-1]):
        assert close(a["valid"], b["valid"]) and close(a["ER"], b["ER"])
    assert got["attack"]["targets"] == ref["attack"]["targets"]
    fe = got["federated_eval"]
    assert fe["evaluations"] == 2 * 2 + 2 and fe["bytes_up_per_eval"] > 0 and fe["bytes_down_per_eval"] > 0
    assert all(e["answered"] == 3 for e in fe["log"])
    assert got["dataset"]["users"] == ds.n_users and got["dataset"]["nodes"] == 3 and "most_popular" not in got
    for rep in grid.replies:                  # what left the nodes: uploads, counts, ids, sums
        assert set(rep.content.keys()) <= {"node", "hosted", "updates", "metrics", "sums"}
    from fortress.recommend import recommend
    with pytest.raises(InputError, match="holds no user data"):          # model.pt has the catalogue, no user
        recommend(tmp_path / "fl", "u0")


def test_fortress_objective_runs_through_the_same_apps(ds, tmp_path):
    """Nothing in the Flower glue is objective-specific: the ClientApp's client_step builds the FORTRESS
    objective and its per-user draws, and the loss terms travel back in the reply."""
    exact = dict(EXACT, objective="fortress")
    assert from_run_config(kebab(exact))[0].objective == "fortress"
    cfg = Config(rounds=2, **exact)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    got = flower_run(cfg, tmp_path / "fl", LocalGrid(kebab(exact), 3))
    assert max_diff(params(tmp_path / "sim"), params(tmp_path / "fl")) < 1e-12
    for a, b in zip(ref["history"], got["history"]):
        assert set(a["terms"]) == set(b["terms"]) == {"rec", "seq", "user", "item", "temp"}
        assert all(abs(a["terms"][k] - b["terms"][k]) < 1e-9 for k in a["terms"])


def test_flower_server_survives_failing_silent_and_malformed_nodes(ds, tmp_path, caplog):
    cfg = Config(rounds=2, min_answered=0.01, **SMALL)
    grid = LocalGrid(kebab(SMALL), 6, faults={0: "error", 1: "silent", 2: "float16", 3: "stray", 5: "offline"})
    res = flower_run(cfg, tmp_path, grid)
    bad_nodes = {grid.ids[2]: "dense has dtype float16", grid.ids[3]: "not sent"}
    assert res["rejected"]
    for r in res["rejected"]:
        node = next(n for n in bad_nodes if f"node {n}:" in r["reason"])
        assert bad_nodes[node] in r["reason"] and r["client"] % 6 in (2, 3)
    for h in res["history"]:
        assert h["clients"] > 0 and h["dropped"] > 0 and "skipped" not in h
        assert h["clients"] + h["rejected"] + h["dropped"] == h["sampled"]
        assert h["dropped"] == sum(d["round"] == h["round"] for d in res["dropped"])   # each drop recorded by id
    assert {d["client"] % 6 for d in res["dropped"]} == {0, 1, 5}
    assert {d["reason"].split(": ")[1] for d in res["dropped"]} == {"offline", "no reply within 5 s",
                                                                      "failed (ClientApp raised)"}
    text = caplog.text
    assert f"node {grid.ids[0]} failed" in text and f"node {grid.ids[1]} sent no reply" in text
    assert f"node {grid.ids[5]} is offline" in text
    assert f"rejected client {res['rejected'][0]['client']}" in text


def test_flower_server_resumes_exactly_after_dying(ds, tmp_path):
    cfg = Config(rounds=5, checkpoint_every=1, **SMALL)
    flower_run(cfg, tmp_path / "full", LocalGrid(kebab(SMALL), 2))
    with pytest.raises(KeyboardInterrupt):                # dies in round 4 (2 nodes, 2 messages a round)
        flower_run(cfg, tmp_path / "cut", LocalGrid(kebab(SMALL), 2, crash_after=7))
    assert torch.load(tmp_path / "cut" / checkpoint.NAME, weights_only=False)["round"] == 3
    flower_run(cfg, tmp_path / "cut", LocalGrid(kebab(SMALL), 2), resume=True)
    assert max_diff(params(tmp_path / "full"), params(tmp_path / "cut")) == 0.0


# ---- real Flower processes --------------------------------------------------------------------------

@pytest.mark.slow
def test_flwr_run_simulation_matches_fortress_run(ds, tmp_path):
    from fortress.flower.deploy import deploy_demo
    cfg = Config(rounds=2, **EXACT)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    out = deploy_demo(tmp_path / "flwr", nodes=3, simulation=True, cpus=2, timeout=300,
                      run_config=kebab({**EXACT, "rounds": 2}))
    got = json.loads((out / "results.json").read_text())
    assert max_diff(params(tmp_path / "sim"), params(out)) < 1e-9
    assert all(abs(got["test"][k] - ref["test"][k]) < 1e-9 for k in ref["test"] if k not in ("users", "strata"))
    assert "3 SuperNodes hosting 300 users" in (tmp_path / "flwr" / "flwr-run.log").read_text()


@pytest.mark.slow
def test_secure_deployment_with_three_supernodes(ds, tmp_path):
    import ssl
    import socket
    from fortress.flower.deploy import Deployment, make_node_keys
    cfg = Config(rounds=2, **EXACT)
    ref = run(cfg, ds, tmp_path / "sim", progress=False)
    with Deployment(tmp_path / "dep", nodes=3) as dep:
        # TLS: the SuperLink presents a certificate signed by our CA for 127.0.0.1
        ctx = ssl.create_default_context(cafile=str(dep.certs["ca"]))
        with socket.create_connection(("127.0.0.1", dep.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # authentication: a node whose key was never registered is refused
        (priv, _), = make_node_keys(tmp_path / "intruder", 1)
        dep.start_supernode("intruder", 0, priv)
        out = dep.run(kebab({**EXACT, "rounds": 2}), timeout=400)
        procs = [p for _, p in dep.procs.procs]
    assert all(p.poll() is not None for p in procs)               # everything stopped
    log = (tmp_path / "dep" / "flwr-run.log").read_text()
    assert "3 SuperNodes hosting 300 users" in log and "round 2: 24 clients sampled on 3 nodes" in log
    intruder = (tmp_path / "dep" / "intruder.log").read_text()
    assert "Failed to activate SuperNode" in intruder and "SuperNode ID" not in intruder
    assert max_diff(params(tmp_path / "sim"), params(out)) < 1e-9
    got = json.loads((out / "results.json").read_text())
    assert all(abs(got["test"][k] - ref["test"][k]) < 1e-9 for k in ref["test"] if k not in ("users", "strata"))


@pytest.mark.slow
def test_a_node_killed_mid_run_rejoins_and_the_model_equals_a_replay_of_its_drops(ds, tmp_path):
    """A SuperLink and 3 SuperNodes as processes (TLS, node authentication, loopback). SuperNode 1 is
    killed (SIGKILL) after round 2 and started again with its key; the run finishes, its clients of
    the rounds it missed are recorded as dropped, it serves rounds again, and the model equals
    an in-process run that drops exactly the recorded clients."""
    import time
    from fortress.flower.deploy import Deployment
    from fortress.simulate import local_clients
    rounds = 12
    with Deployment(tmp_path / "dep", nodes=3) as dep:
        proc = dep.submit({**kebab({**EXACT, "rounds": rounds}), "round-timeout": 30.0})
        deadline = time.monotonic() + 300
        while "round 2:" not in (dep.log.read_text(errors="replace") if dep.log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, dep.log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        dep.kill_node(1)
        dep.rejoin_node(1)
        out = dep.wait(proc, timeout=900)
        procs = [p for _, p in dep.procs.procs]
    assert all(p.poll() is not None for p in procs)
    got = json.loads((out / "results.json").read_text())
    # node 1's clients are dropped in the rounds it missed; a slow node may also miss a round before the
    # kill (each message starts a fresh ClientApp process): whatever was dropped, the replay below must match
    assert any(d["client"] % 3 == 1 and d["round"] > 2 for d in got["dropped"])
    hist = got["history"]
    assert all(h["dropped"] == sum(d["round"] == h["round"] for d in got["dropped"]) for h in hist)
    # node 1 is back once a round after its first drop keeps all of its clients (a dead node drops every
    # round's); any node, node 1 included, may still miss a later round when the machine is slow
    gone = {d["round"] for d in got["dropped"] if d["client"] % 3 == 1 and d["round"] > 2}
    assert any(h["round"] > min(gone) and h["round"] not in gone and h["clients"] > 0 for h in hist), \
        "node 1 did not serve a round again after it was killed"
    assert got["test"]["users"] == ds.n_users                                  # and was evaluated again
    drops: dict[int, list[int]] = {}
    for d in got["dropped"]:
        drops.setdefault(d["round"], []).append(d["client"])

    def replay(run_, r, users):
        return local_clients(run_, r, users[~np.isin(users, drops.get(r + 1, []))])
    ref = run(Config(rounds=rounds, **EXACT), ds, tmp_path / "replay", progress=False, clients=replay)
    assert [h["dropped"] for h in ref["history"]] == [h["dropped"] for h in hist]
    assert max_diff(params(tmp_path / "replay"), params(out)) < 1e-9
    assert all(abs(got["test"][k] - ref["test"][k]) < 1e-9 for k in ref["test"] if k not in ("users", "strata"))


@pytest.mark.slow
def test_a_deployment_under_attack_runs_the_malicious_clients_on_an_attacker_supernode(ds, tmp_path):
    """3 user SuperNodes + 1 attacker SuperNode (role=attacker, no data) as processes, TLS and node
    authentication: the same experiment as the in-process attack, through the real transport."""
    from fortress.flower.deploy import Deployment
    sets = dict(EXACT, attack="psmu", attack_ratio=0.05, attack_len=6, rounds=2)
    ref = run(Config(**sets), ds, tmp_path / "sim", progress=False)
    with Deployment(tmp_path / "dep", nodes=3, attackers=1) as dep:
        out = dep.run(kebab(sets), timeout=600)
    log = (tmp_path / "dep" / "flwr-run.log").read_text()
    assert "3 SuperNodes hosting 300 users and 1 attacker nodes; no data on the server" in log
    assert "malicious clients sampled on 1 nodes" in log
    assert (tmp_path / "dep" / "attacker0.log").exists()
    got = json.loads((out / "results.json").read_text())
    assert got["attack"]["malicious_uploads"] == ref["attack"]["malicious_uploads"] > 0
    assert max_diff(params(tmp_path / "sim"), params(out)) < 1e-9
    assert abs(got["attack"]["ER@10"] - ref["attack"]["ER@10"]) < 1e-9


def test_nodes_send_item_counts_only_for_unpopular_targets(ds):
    """The population a node sends holds ids and counts; the item train counts (the one aggregate of
    histories) only when the run picks `unpopular` targets; they add up to the data's counts."""
    for sets, sent in ((dict(SMALL), True), (dict(SMALL, target_pick="random"), False), (dict(SMALL, targets=0), False)):
        cfg = Config(**sets)
        grid = LocalGrid(kebab(sets), 3)
        fed = discover(grid, FlowerOptions(), cfg)
        assert all(("item-counts" in rep.content["hosted"]) == sent for rep in grid.replies)
        assert fed.pop.users == ds.n_users and fed.pop.n_items == ds.n_items and fed.pop.nodes == 3
        assert np.array_equal(fed.pop.eligible, np.sort(np.concatenate(list(fed.hosts.values()))))
        if sent:
            assert np.array_equal(fed.pop.item_counts, ds.item_counts())
        else:
            assert fed.pop.item_counts is None
