"""Bad inputs through `fortress.cli.main`: one `error:` line naming the file/key/value, exit 2, nothing lost."""
from __future__ import annotations

import shutil

import pytest

from fortress.cli import main

TINY = ["--quiet", "--set", "synthetic_users=50", "--set", "synthetic_items=20", "--set", "rounds=1",
        "--set", "clients_per_round=8", "--set", "eval_every=0", "--set", "threads=1"]
RUN = object()          # a setup value: copy the finished run's results.json and model.pt here


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished fedavg run, shared by the cases that need a saved model."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "--data", "synthetic", "--out", str(out), *TINY]) == 0
    return out


def run(*args: str) -> list[str]:
    return ["run", "--data", "synthetic", "--out", "{tmp}/o", *TINY, *args]


SPEC = '[grid]\nseeds = [0]\n[datasets.synthetic]\n[methods.A]\nobjective = "next_item"\n'

# (case id, files to write under tmp, argv with {tmp} and {run}, expected substring, folder that must not change)
CASES = [
    # --config files
    ("config-binary", {"bin.toml": b"\x00\xff\xfe"}, run("--config", "{tmp}/bin.toml"),
     "bin.toml: not a TOML config file", None),
    ("config-folder", {}, run("--config", "{tmp}"), "is a folder; expected a TOML config file", None),
    ("config-missing", {}, run("--config", "{tmp}/missing.toml"), "missing.toml: config file not found", None),
    ("config-nan", {"c.toml": "lr = nan\n"}, run("--config", "{tmp}/c.toml"), "c.toml: lr=nan is not a finite number",
     None),
    ("config-range-names-file", {"runs.toml": "lr = -1\n"}, run("--config", "{tmp}/runs.toml"),
     "runs.toml: lr=-1.0 is out of range; it must be > 0", None),
    ("config-type", {"t.toml": 'rounds = "x"\n'}, run("--config", "{tmp}/t.toml"), "t.toml: rounds='x': expected an integer",
     None),
    ("config-section", {"s.toml": "[a]\nx = 1\n"}, run("--config", "{tmp}/s.toml"), "found section [a]", None),
    ("config-control-bytes", {"e.toml": '"\\u001b[2J" = 1\n'}, run("--config", "{tmp}/e.toml"),
     "unknown key '\\x1b[2J'", None),
    # --set
    ("set-lr-nan", {}, run("--set", "lr=nan"), "--set: lr=nan is not a finite number", None),
    ("set-attack-ratio-nan", {}, run("--set", "attack_ratio=nan"), "attack_ratio=nan is not a finite number", None),
    ("set-lr-inf", {}, run("--set", "lr=inf"), "lr=inf is not a finite number", None),
    ("set-no-equals", {}, run("--set", "lr"), "--set 'lr': expected key=value", None),
    ("set-typo", {}, run("--set", "lrr=1"), "unknown key 'lrr' (did you mean 'lr'?)", None),
    ("set-union-whole-history", {}, run("--set", "objective=union", "--set", "whole_history=true"),
     "objective='union' reads one window per client", None),
    ("set-cl4srec-federated", {}, run("--set", "objective=cl4srec"),
     "objective='cl4srec' contrasts the users of a batch with each other", None),
    ("set-heads", {}, run("--set", "heads=3"), "--set: dim=64 must be divisible by heads=3", None),
    ("set-huge-int", {}, run("--set", "seed=" + "9" * 30), "is out of range; it must be <= 2147483647", None),
    # the command line itself
    ("unknown-command", {}, ["frob"], "invalid choice: 'frob'", None),
    ("unknown-option", {}, run("--bogus"), "unrecognized arguments: --bogus", None),
    ("missing-out", {}, ["run", "--data", "synthetic"], "required: --out", None),
    ("resume-and-overwrite", {}, run("--resume", "--overwrite"), "--overwrite: not allowed with argument --resume", None),
    ("k-not-int", {}, ["recommend", "{run}", "--user", "u1", "-k", "z"], "argument -k: invalid int value: 'z'", None),
    # the output folder
    ("out-finished", {"o": RUN}, run(), "o: already holds a finished run (results.json); pass --overwrite", "o"),
    ("out-unfinished", {"o/checkpoint.pt": b"x"}, run(), "o: holds an unfinished run (checkpoint.pt); pass --resume",
     "o"),
    ("out-is-file", {"o": "not a folder"}, run(), "o: is a file", None),
    ("resume-nothing", {"o/notes.txt": "mine"}, run("--resume"), "--resume: no checkpoint.pt in", "o"),
    ("resume-finished", {"o": RUN}, run("--resume"), "is finished (results.json) and has no checkpoint.pt", "o"),
    ("resume-pop", {}, run("--resume", "--set", "training=pop"), "training=pop writes no checkpoints", None),
    ("resume-garbage-checkpoint", {"o/checkpoint.pt": b"garbage"}, run("--resume"),
     "checkpoint.pt: not a readable checkpoint", "o"),
    ("overwrite-bad-value-keeps-run", {"o": RUN}, run("--overwrite", "--set", "lr=nan"), "lr=nan", "o"),
    ("overwrite-bad-init-keeps-run", {"o": RUN, "junk.pt": b"junk"}, run("--overwrite", "--set", "init_from={tmp}/junk.pt"),
     "init_from: ", "o"),
    # data
    ("data-empty", {"empty.txt": ""}, ["run", "--data", "{tmp}/empty.txt", "--out", "{tmp}/o", *TINY],
     "empty.txt: file is empty", None),
    ("data-stray-token", {"seq.txt": "1 2 3 4\n2 3 4 5\n3 x 5 6\n"},
     ["run", "--data", "{tmp}/seq.txt", "--out", "{tmp}/o", *TINY], "seq.txt:3: item id 'x' is not an integer", None),
    ("data-control-bytes", {"c.txt": "1 2 3\n2 \x1b[31mred 4\n"},
     ["run", "--data", "{tmp}/c.txt", "--out", "{tmp}/o", *TINY], "c.txt:2: item id '\\x1b[31mred'", None),
    ("data-too-small", {"small.txt": "1 2\n2 3\n"}, ["run", "--data", "{tmp}/small.txt", "--out", "{tmp}/o", *TINY],
     "small.txt is too small", None),
    ("data-missing", {}, ["run", "--data", "no-such-data", "--out", "{tmp}/o", *TINY], "data 'no-such-data' not found",
     None),
    ("stats-empty", {"empty.txt": ""}, ["data", "stats", "{tmp}/empty.txt"], "empty.txt: file is empty", None),
    ("stats-kcore", {}, ["data", "stats", "synthetic", "--kcore", "-1"], "--kcore: -1 is out of range", None),
    # saved models
    ("init-from-missing", {}, run("--set", "init_from={tmp}/nothing"), "init_from: ", None),
    ("recommend-k0", {}, ["recommend", "{run}", "--user", "u1", "-k", "0"], "-k 0: must be >= 1", None),
    ("recommend-user", {}, ["recommend", "{run}", "--user", "nobody"], "--user 'nobody': not a user", None),
    ("recommend-no-run", {}, ["recommend", "{tmp}/none", "--user", "u1"], "none: no saved model (no such folder", None),
    ("recommend-garbage", {"g/model.pt": b"garbage"}, ["recommend", "{tmp}/g", "--user", "u1"],
     "model.pt: cannot read saved model", None),
    ("eval-no-run", {}, ["eval", "{tmp}/none"], "none: no such folder; expected the --out folder", None),
    ("eval-no-model", {"empty/results.json": "{}"}, ["eval", "{tmp}/empty"], "empty: no saved model (no model.pt", "empty"),
    ("eval-garbage", {"g/model.pt": b"garbage"}, ["eval", "{tmp}/g"], "model.pt: cannot read saved model", "g"),
    ("eval-data-missing", {"r": RUN}, ["eval", "{tmp}/r", "--data", "{tmp}/nothing"],
     "r: cannot load the run's data: data '", "r"),
    ("eval-other-data", {"r": RUN, "s.txt": "1 1 2 3\n2 2 3 1\n"}, ["eval", "{tmp}/r", "--data", "{tmp}/s.txt"],
     "s.txt: not the data of the run in", "r"),
    ("eval-split", {}, ["eval", "{run}", "--split", "train"], "argument --split: invalid choice: 'train'", None),
    # experiment specs
    ("spec-wrong-key", {"s.toml": SPEC + "lrr = 1\n"}, ["experiment", "{tmp}/s.toml", "--out", "{tmp}/e", "--dry-run"],
     "s.toml [methods.A]: unknown key 'lrr'", None),
    ("spec-nan", {"s.toml": SPEC + "lr = nan\n"}, ["experiment", "{tmp}/s.toml", "--out", "{tmp}/e", "--dry-run"],
     "[methods.A]: lr=nan is not a finite number", None),
    ("spec-folder", {}, ["experiment", "{tmp}", "--out", "{tmp}/e"], "is a folder; expected a TOML spec file", None),
    ("experiment-out-file", {"s.toml": SPEC, "e": "a file"}, ["experiment", "{tmp}/s.toml", "--out", "{tmp}/e"],
     "e: is a file", None),
    # plots and the Flower demo: checked before anything starts
    ("plot-popular-frac", {}, ["plot", "embeddings", "{run}", "--popular-frac", "2"],
     "--popular-frac: 2 is out of range", None),
    ("plot-users", {}, ["plot", "trajectories", "{run}", "--users", "0"], "--users: 0 is out of range", None),
    ("plot-out-format", {}, ["plot", "trajectories", "{run}", "--users", "1", "--out", "{tmp}/f.xyz"],
     "f.xyz: Format 'xyz' is not supported", None),
    ("deploy-nodes", {}, ["deploy-demo", "--nodes", "0"], "--nodes: 0 is out of range", None),
]


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


@pytest.mark.parametrize("files, argv, expected, keep", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, capsys, finished, files, argv, expected, keep):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is RUN:
            path.mkdir(exist_ok=True)
            for f in ("results.json", "model.pt"):
                shutil.copy(finished / f, path / f)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    before = snapshot(tmp_path / keep) if keep else None
    code = main([a.format(tmp=tmp_path, run=finished) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in err and "\x1b" not in err
    if keep:
        assert snapshot(tmp_path / keep) == before


def test_cases_are_many_and_distinct():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
