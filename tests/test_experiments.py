"""`fortress experiment`: spec checks, shared cells, resume/skip, failures, atomic records, kill -9, smoke spec."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fortress.config import Config
from fortress.errors import InputError
from fortress.experiments import report, runner
from fortress.experiments import spec as specs
from fortress.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = """
[grid]
seeds = [0, 1]
er_last = 2

[set]
threads = 1
synthetic_users = 200
synthetic_items = 60
dim = 8
max_len = 12
n_neg = 16
clients_per_round = 16
rounds = 2
eval_every = 1

[datasets.synthetic]
[datasets.broken]
data = "BROKEN"

[pretrain]
inherit = ["backbone"]
rounds = 3

[methods.FedAvg]
objective = "next_item"
[methods.FedAvg-lr-half]
objective = "next_item"
lr = 0.5
"""


def spec_file(folder: Path, text: str = TINY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    broken = folder / "broken.txt"
    broken.write_text("u1 a b c\n")                 # non-integer item ids: a one-line error at load time
    path = folder / "spec.toml"
    path.write_text(text.replace("BROKEN", str(broken)))
    return path


def experiment(spec: Path, out: Path, *args: str, wait: bool = True):
    argv = [sys.executable, "-m", "fortress.cli", "experiment", str(spec), "--out", str(out), "--quiet", *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def tables(out: Path) -> str:
    """report.md up to the per-cell list (which holds wall times)."""
    return (out / "report.md").read_text().split("## Cells")[0]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The tiny spec run once, uninterrupted: 6 cells ok, the broken dataset's 6 failed."""
    folder = tmp_path_factory.mktemp("exp")
    spec = spec_file(folder)
    res = experiment(spec, folder / "out", "--jobs", "2")
    return spec, folder / "out", res


# ---------------------------------------------------------------- the spec

def one_line_error(capsys, spec: Path, out: Path) -> str:
    code = main(["experiment", str(spec), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (out / "cells").exists()                 # nothing ran
    return err


@pytest.mark.parametrize("change, expected", [
    (("[grid]", "[grids]"), "unknown section [grids]"),
    (("seeds = [0, 1]", "seeds = []"), "[grid] seeds = []: expected a non-empty list of ints"),
    (("seeds = [0, 1]", "seeds = [0, \"one\"]"), "[grid] seeds = [0, 'one']"),
    (("er_last = 2", "er_last = 0"), "[grid] er_last = 0"),
    (("rounds = 2", "rounds = \"many\""), "[set]: rounds='many': expected an integer"),
    (("lr = 0.5", "lr = -0.5"), "[methods.FedAvg-lr-half]: lr=-0.5 is out of range"),
    (("lr = 0.5", "lamda = 0.5"), "[methods.FedAvg-lr-half]: unknown key 'lamda'"),
    (("[datasets.synthetic]", "[datasets.no-such-data]"), "[datasets.no-such-data]: data 'no-such-data' not found"),
    (("inherit = [\"backbone\"]", "inherit = [\"backbone\", \"bakcbone\"]"), "[pretrain] inherit: unknown key 'bakcbone'"),
    (("[methods.FedAvg]\nobjective = \"next_item\"", "[methods.FedAvg]\nobjective = \"next_itemm\""),
     "[methods.FedAvg]: objective='next_itemm' is not allowed; choose one of: next_item, fortress"),
    (("[methods.FedAvg]\nobjective = \"next_item\"", "[methods.FedAvg]\ntraining = \"fedavg\""),
     "[methods.FedAvg]: training='fedavg' is not allowed; choose one of: pop, central, federated"),
    (("[methods.FedAvg]\nobjective = \"next_item\"", "[methods.FedAvg]\nmode = \"fortress\""),
     "[methods.FedAvg]: mode='fortress': `mode` is now two keys, training and objective; "
     "write training=federated objective=fortress"),
    (("[methods.FedAvg]\nobjective = \"next_item\"", "[methods.FedAvg]\ntraining = \"central\"\nobjective = \"fortress\""),
     "[methods.FedAvg]: objective='fortress' needs training='federated' (got training='central')"),
    (("er_last = 2", "er_last = 2\nattacks = [\"no-such-attack\"]"), "[grid] attacks"),
    (("[set]", "[ablation]\nmethod = \"FedAvg\"\nvariants = { nodrop = { dropuot = 0.0 } }\n[set]"),
     "[ablation] variants.'nodrop': unknown key 'dropuot'"),
    (("[set]", "[ablation]\nmethod = \"Nope\"\nvariants = { a = { dropout = 0.0 } }\n[set]"),
     "[ablation] method = 'Nope': not a method of this spec"),
    (("[set]", "[sensitivity]\nmethod = \"FedAvg\"\nsweeps = { lr = [1.0, -2.0] }\n[set]"),
     "[sensitivity] sweeps.lr: lr=-2.0 is out of range"),
    (("[set]", "[sensitivity]\nmethod = \"FedAvg\"\nsweeps = { lr = [1.0] }\ndatasets = [\"other\"]\n[set]"),
     "[sensitivity] datasets: 'other' is not a dataset of this spec"),
    (("[set]", "[[figures]]\nname = \"f\"\ncommand = [\"plot\", \"x\"]\n[set]"), "[[figures]] #1 runs: expected a list"),
    (("[set]", "[[figures]]\nname = \"f\"\ncommand = [\"plot\"]\nruns = [{ method = \"FedAvg\", sed = 1 }]\n[set]"),
     "[[figures]] #1 runs[0]: unknown field 'sed'"),
    (("[set]", "[[figures]]\nname = \"f\"\ncommand = [\"plot\", \"nope\"]\nruns = [{ method = \"FedAvg\" }]\n[set]"),
     "figure f: `fortress plot nope` is not a command"),
    (("lr = 0.5", "lr = 0.5\nattacks = [\"psmu\"]"),
     "[methods.FedAvg-lr-half] attacks: 'psmu' is not an attack of [grid] attacks (none)"),
    (("[set]", "[floor]\nmethod = \"Nope\"\n[set]"), "[floor] method = 'Nope': not a method of this spec"),
    (("[set]", "[floor]\nmethod = \"FedAvg\"\n[set]"),
     "[floor] attacks: 'random' is not an attack that method 'FedAvg' runs"),
    (("[set]", "[floor]\nmethod = \"FedAvg\"\nattacks = [\"none\"]\n[set]"), "[floor] attacks: 'none' is not an attack"),
    (("[set]", "[floor]\nmethod = \"FedAvg\"\nattacks = []\n[set]"), "[floor] attacks = []"),
    (("er_last = 2", "er_last = 2\nattacks = [\"none\", \"random\"]\n[floor]\nmethod = \"FedAvg\"\nattacks = [\"random\"]\nmargin = 2"),
     "[floor] margin = 2: expected a number in [0, 1)"),
    (("[set]", "[floor]\nmethod = \"FedAvg\"\nmarign = 0.1\n[set]"), "[floor]: unknown field 'marign'"),
    (("[set]", "[floor]\nmethod = { name = \"FedAvg\" }\n[set]"), "[floor] method = {'name': 'FedAvg'}: expected a method"),
    (("[set]", "[floor]\nmethod = [\"FedAvg\", 3]\n[set]"), "[floor] method = ['FedAvg', 3]: expected a non-empty list"),
    (("[grid]", "[grid"), "not valid TOML"),
    (("[grid]", "[grid]\n[grid.x]"), "[grid]: unknown field 'x'"),
])
def test_bad_spec_is_one_line_naming_file_field_value(tmp_path, capsys, change, expected):
    spec = spec_file(tmp_path, TINY.replace(*change, 1))
    err = one_line_error(capsys, spec, tmp_path / "out")
    assert str(spec) in err and expected in err, err


def test_missing_spec_and_bad_options(tmp_path, capsys):
    assert "nope.toml: spec file not found" in one_line_error(capsys, tmp_path / "nope.toml", tmp_path / "out")
    for option, expected in ((["--jobs", "0"], "--jobs 0: must be >= 1"),
                             (["--shard", "3/2"], "argument --shard: '3/2': expected i/n with 1 <= i <= n"),
                             (["--shard", "1"], "'1': expected i/n"),
                             (["--budget", "soon"], "argument --budget: 'soon': expected a duration such as 2h")):
        code = main(["experiment", str(spec_file(tmp_path)), "--out", str(tmp_path / "o"), *option])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_missing_plot_extra_is_one_line_before_any_cell_runs(tmp_path):
    """Without matplotlib a spec with figures stops at once (exit 2, what to install), not after its cells."""
    spec = spec_file(tmp_path, TINY.replace('[datasets.broken]\ndata = "BROKEN"\n', "") + """
[sensitivity]
method = "FedAvg"
seeds = [0]
[sensitivity.sweeps]
lr = [0.5, 1.0]
""")
    hide = "import sys; sys.modules['matplotlib'] = None; from fortress.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", hide, "experiment", str(spec), "--out", str(tmp_path / "out"),
                          "--quiet"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "pip install 'fortress[plot]'" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "cells").exists()
    # a spec without figures needs no matplotlib (--dry-run: nothing runs either way)
    plain = spec_file(tmp_path / "plain")
    res = subprocess.run([sys.executable, "-c", hide, "experiment", str(plain), "--out", str(tmp_path / "o2"),
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_a_method_runs_only_its_attacks(tmp_path):
    """`attacks` in a method table keeps the grid's other attacks off its rows (PTF-FSR takes no update attack);
    listing one its config refuses is the cell's one-line error."""
    grid = TINY.replace("er_last = 2", 'er_last = 2\nattacks = ["none", "random", "ahum"]')
    ptf = '[methods.PTF]\ntraining = "ptf"\nattacks = ["none", "random"]\n'
    p = specs.load(spec_file(tmp_path, grid + ptf), tmp_path / "out", check_data=False)
    rows = {(e.row, e.attack) for e in p.entries if e.section == "main" and e.dataset == "synthetic"}
    assert {a for r, a in rows if r == "PTF"} == {"none", "random"}
    assert {a for r, a in rows if r == "FedAvg"} == {"none", "random", "ahum"}
    with pytest.raises(InputError, match="attack='ahum' uploads model updates"):
        specs.load(spec_file(tmp_path, grid + ptf.replace('"random"]', '"ahum"]')), tmp_path / "out", check_data=False)


def test_a_pretrain_can_fix_its_seed_and_continue_in_a_second_stage(tmp_path):
    """`seed` in [pretrain] gives every seed of the grid one clean model; `then` continues it with more keys
    (the warm start of experiments/adaptive.toml: FedAvg, then clean rounds under the FORTRESS server)."""
    text = TINY.replace("rounds = 3", 'rounds = 3\nseed = 0\nthen = { rounds = 1, defence = "fortress" }')
    p = specs.load(spec_file(tmp_path, text), tmp_path / "out", check_data=False)
    pre = [c for c in p.cells.values() if c.kind == "pretrain"]
    assert len(pre) == 2 * 2                                    # per dataset: the first stage and its `then`
    first = [c for c in pre if not c.after]
    second = {c.id: c for c in pre if c.after}
    assert all("--set seed=0" in c.command() and "--set rounds=3" in c.command() for c in first)
    for c in second.values():
        assert p.cells[c.after[0]] in first and "--set defence=fortress" in c.command()
        assert "--set rounds=1" in c.command() and f"init_from=DIR/cells/{c.after[0]}" in c.command()
    runs = [c for c in p.cells.values() if c.kind == "run"]
    assert runs and all(c.after[0] in second and "defence" not in c.command() for c in runs)
    assert {c.command().split("--set seed=")[1].split()[0] for c in runs} == {"0", "1"}
    with pytest.raises(InputError, match=r"\[pretrain\] then: expected a table of config keys, got 3"):
        specs.load(spec_file(tmp_path, TINY.replace("rounds = 3", "rounds = 3\nthen = 3")), tmp_path / "o",
                   check_data=False)


def test_a_method_with_its_own_init_from_skips_the_pretrain(tmp_path):
    """PTF-FSR cannot continue a FedAvg model: `init_from = ""` in its method table runs it from scratch, while the
    spec's other methods continue [pretrain] (experiments/peers.toml)."""
    text = TINY + '[methods.scratch]\ntraining = "ptf"\ninit_from = ""\n'
    p = specs.load(spec_file(tmp_path, text), tmp_path / "out", check_data=False)
    runs = [c for c in p.cells.values() if c.kind == "run"]
    scratch = [c for c in runs if "training=ptf" in c.command()]
    assert len(scratch) == 2 * 2 and all(not c.after and "--set init_from= " in c.command() + " " for c in scratch)
    rest = [c for c in runs if c not in scratch]
    assert rest and all(c.after and p.cells[c.after[0]].kind == "pretrain" for c in rest)


def test_cells_are_shared_by_what_they_compute(tmp_path):
    text = TINY + """
[ablation]
method = "FedAvg"
variants = { "no dropout" = { dropout = 0.0 } }
[sensitivity]
method = "FedAvg"
sweeps = { lr = [0.5, 1.0] }
"""
    p = specs.load(spec_file(tmp_path, text), tmp_path / "a")
    main_cells = {(e.dataset, e.row, e.seed): e.cell for e in p.entries if e.section == "main"}
    # the ablation's full row and the sensitivity's default lr are the main grid's runs; lr=0.5 is FedAvg-lr-half
    for e in p.entries:
        if e.section == "ablation" and e.row == "FedAvg":
            assert e.cell == main_cells[e.dataset, "FedAvg", e.seed]
        if e.section == "sensitivity":
            other = "FedAvg" if e.value == "1.0" else "FedAvg-lr-half"
            assert e.cell == main_cells[e.dataset, other, e.seed]
    kinds = [c.kind for c in p.cells.values()]
    assert kinds == sorted(kinds, key=["pretrain", "run", "figure"].index)          # pretrains run first
    # one clean model per (dataset, backbone, seed), shared by both methods; runs start from it
    assert kinds.count("pretrain") == 2 * 2 and kinds.count("run") == 2 * 2 * 2 + 2 * 2
    for c in p.cells.values():
        if c.kind == "run":
            pre = p.cells[c.after[0]]
            assert pre.kind == "pretrain" and f"init_from=DIR/cells/{pre.id}" in c.command()
            assert "--set rounds=3" in pre.command() and "--set rounds=2" in c.command()
    # ids depend on what a cell computes, not on where the experiment lives
    q = specs.load(spec_file(tmp_path, text), tmp_path / "b")
    assert list(p.cells) == list(q.cells)


# ---------------------------------------------------------------- running

def test_failures_are_recorded_and_the_rest_goes_on(done):
    spec, out, res = done
    assert res.returncode == 1, res.stderr[-2000:]
    assert "6 cells ok, 6 failed" in res.stdout
    p = specs.load(spec, out)
    recs = {cid: runner.record(c) for cid, c in p.cells.items()}
    ok = [cid for cid, r in recs.items() if r["status"] == "ok"]
    assert len(ok) == 6 and all((p.cells[c].out / "results.json").exists() for c in ok)
    broken = [r for r in recs.values() if r["status"] == "failed"]
    pre = [r for r in broken if r["kind"] == "pretrain"]
    assert len(pre) == 2 and all(r["error"].startswith("exit 2: error: ") and "broken.txt" in r["error"]
                                 and "\n" not in r["error"] for r in pre)
    assert all(r["error"].startswith("not run: pre-") for r in broken if r["kind"] == "run")
    text = (out / "report.md").read_text()
    assert "## Failed cells" in text and "| synthetic |" not in text and "**" in tables(out)
    assert all(r["command"] in text.replace("\\|", "|") for r in recs.values())


def test_rerun_skips_finished_cells(done, tmp_path):
    spec, out, _ = done
    before = {c: (out / "cells" / c / "summary.json").stat().st_mtime_ns for c in os.listdir(out / "cells")}
    again = experiment(spec, out)
    assert again.returncode == 1 and "6 finished earlier, 6 to run" in again.stderr      # only the failed retry
    p = specs.load(spec, out)
    for cid, c in p.cells.items():
        if runner.record(c)["status"] == "ok":
            assert (c.folder / "summary.json").stat().st_mtime_ns == before[cid]


def test_a_cell_is_its_standalone_command(done, tmp_path):
    """The forked cell and the command the report prints for it give the same numbers."""
    spec, out, _ = done
    p = specs.load(spec, out)
    cell = next(c for c in p.cells.values() if c.kind == "run" and runner.finished(c))
    argv = [a.replace(str(cell.out), str(tmp_path / "alone")) for a in cell.argv]
    alone = subprocess.run([sys.executable, "-m", "fortress.cli", *argv, "--quiet"], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    a = json.loads((tmp_path / "alone" / "results.json").read_text())
    b = json.loads((cell.out / "results.json").read_text())
    assert a["test"] == b["test"] and a["valid"] == b["valid"]


def test_records_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    runner.write_json(path, {"status": "ok"})

    def died(fd):
        raise OSError("disk died")                      # after the write, before the rename
    monkeypatch.setattr(os, "fsync", died)
    with pytest.raises(OSError):
        runner.write_json(path, {"status": "failed"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "ok"}
    # a cell with a torn or missing record is not finished, whatever else its folder holds
    cell = specs.Cell("run-x", "run", [], tmp_path / "c", tmp_path / "c", tmp_path)
    cell.folder.mkdir()
    (cell.folder / "results.json").write_text("{}")
    (cell.folder / "summary.json").write_text('{"status": "o')
    assert runner.record(cell) is None and not runner.finished(cell)
    runner.write_json(cell.folder / "summary.json", {"status": "ok"})
    assert runner.finished(cell)


def test_shards_split_the_cells_deterministically(tmp_path):
    p = specs.load(spec_file(tmp_path), tmp_path / "a")
    one, two = runner.shard(p, 1, 2), runner.shard(p, 2, 2)
    assert set(one) | set(two) == set(p.cells) and runner.shard(p) == list(p.cells)
    for part in (one, two):                             # a shard holds what its cells start from, in run order
        assert all(a in part for cid in part for a in p.cells[cid].after)
        assert part == [cid for cid in p.cells if cid in part]
    assert runner.shard(specs.load(spec_file(tmp_path), tmp_path / "b"), 2, 2) == two


def test_shards_into_one_folder_give_the_unsharded_report(done, tmp_path):
    """`--shard 1/2` and `--shard 2/2`, running at the same time into one folder, give the report of one run."""
    spec, full, _ = done
    out = tmp_path / "out"
    shards = [experiment(spec, out, "--shard", f"{i}/2", wait=False) for i in (1, 2)]
    for proc in shards:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and f"shard {shards.index(proc) + 1}/2: 0 finished earlier" in err, err
    assert main(["report", str(out)]) == 0
    assert tables(out) == tables(full)
    ok = [c for c in specs.load(spec, out).cells.values() if runner.record(c)["status"] == "ok"]
    assert len(ok) == 6 and all(runner.finished(c) for c in ok)


def test_followers_record_the_model_they_started_from_and_the_report_names_a_mix(done, tmp_path, capsys):
    """Every run records its weights' fingerprint (`model`) and, with init_from, its starting model's (`start`):
    a pretrained cell's followers carry its `model`. Where they do not agree (the pretrain ran twice, on machines
    whose float sums differ), the report lists the cells by the model they started from."""
    spec, out, _ = done
    p = specs.load(spec, out)
    pre = [c for c in p.cells.values() if c.kind == "pretrain" and runner.finished(c)]
    assert pre
    for c in pre:
        model = runner.record(c)["model"]
        followers = [runner.record(f) for f in p.cells.values() if f.after == [c.id] and runner.finished(f)]
        assert followers and {f["start"] for f in followers} == {model} and len(model) == 16
        assert all(f["model"] != model for f in followers)          # they trained on from it
    assert "started from different models" not in (out / "report.md").read_text()
    dest = tmp_path / "pub"
    assert main(["report", str(out), "--publish", str(dest)]) == 0
    c = pre[0]
    moved = next(f.id for f in p.cells.values() if f.after == [c.id] and runner.finished(f))
    path = dest / "cells" / moved / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "start": "0123456789abcdef"}))
    capsys.readouterr()
    assert main(["report", str(dest)]) == 0
    text = (dest / "report.md").read_text()
    section = text.split("## Cells that started from different models\n")[1].split("\n## ")[0]
    line = next(x for x in section.splitlines() if x.startswith(f"- `{c.id}`"))
    assert f"from `0123456789abcdef`: 1 (`{moved}`)" in line
    assert f"from `{runner.record(c)['model']}` (the pretrained cell's)" in line


def test_report_is_rebuilt_from_the_summaries_alone(done, tmp_path, capsys):
    """`fortress report DIR --publish DEST` copies summaries, spec and figures (no models, no logs); the report
    rebuilt from DEST alone is the report of DIR, and a missing cell is listed as missing."""
    spec, out, _ = done
    dest = tmp_path / "docs" / "tiny"
    assert main(["report", str(out), "--publish", str(dest)]) == 0
    kept = {f.name for f in dest.rglob("*") if f.is_file()}
    assert kept == {"spec.toml", "summary.json", "report.md"}, kept
    assert (dest / "report.md").read_text() == (out / "report.md").read_text()
    cid = next(c.id for c in specs.load(spec, out).cells.values() if c.kind == "run" and runner.finished(c))
    (dest / "cells" / cid / "summary.json").unlink()
    capsys.readouterr()
    assert main(["report", str(dest)]) == 0
    assert "(1 of 12 cells missing)" in capsys.readouterr().out
    full = tmp_path / "docs" / "full"                       # a folder that holds every cell, published into
    assert main(["report", str(out), "--publish", str(full)]) == 0
    capsys.readouterr()
    assert main(["report", str(dest), "--publish", str(full)]) == 0
    said = capsys.readouterr().out.splitlines()             # each report written, with its own count
    assert said == [f"wrote {dest / 'report.md'} (1 of 12 cells missing)", f"wrote {full / 'report.md'}"]
    text = (dest / "report.md").read_text()
    assert f"## Missing cells\n\n1 of 12 cells have not run yet (or not here): `{cid}`." in text
    e = next(e for e in specs.load(spec, out).entries if e.cell == cid and e.section == "main")
    lost = [x for x in specs.load(spec, out).entries if x.section == "main" and (x.dataset, x.row, x.attack, x.ratio)
            == (e.dataset, e.row, e.attack, e.ratio)]
    # the estimate is the mean wall time of the finished cells of its dataset, method, attack and ratio (its other
    # seeds), to 2 significant digits
    like = [json.loads((dest / "cells" / x.cell / "summary.json").read_text())["seconds"] for x in lost if x.cell != cid]
    about = float(re.search(r"they take about ([0-9.e-]+) cell-hours\.", text).group(1))
    assert like and about == pytest.approx(np.mean(like) / 3600, rel=0.05)
    coverage = text.split("Seeds finished of each cell of the main table")[1].split(f"### {e.dataset}\n")[1]
    row = next(line for line in coverage.splitlines() if line.startswith(f"| {e.row} |"))
    assert f"{len(lost) - 1}/{len(lost)}" in [c.strip() for c in row.split("|")]   # the coverage table counts the loss
    assert "(n=1)" in text                                  # the seed that is left stands alone
    summary = json.loads((out / "cells" / cid / "summary.json").read_text())
    assert summary["versions"].keys() == {"fortress", "torch", "python", "commit"} and summary["config"]["seed"] in (0, 1)
    assert "--out DIR/cells/" in summary["command"] and str(out) not in json.dumps(summary)
    assert main(["report", str(tmp_path / "nothing")]) == 2 and "no such folder" in capsys.readouterr().err


def test_missing_cells_are_costed_by_the_finished_cells_most_like_them(tmp_path):
    """`cost`: a missing cell at the mean wall time of its own dataset/method/attack/ratio's finished cells, else of
    its method's on that dataset, else of its attack and ratio's, else its dataset's; with no finished cell, no
    estimate."""
    grid = TINY.replace("er_last = 2", 'er_last = 2\nattacks = ["none", "ahum"]\nattack_ratios = [0.01, 0.05]')
    grid = grid.replace('[datasets.broken]\ndata = "BROKEN"\n', "").replace('[pretrain]\ninherit = ["backbone"]\nrounds = 3\n', "")
    p = specs.load(spec_file(tmp_path, grid), tmp_path / "out", check_data=False)
    at = {(e.row, e.attack, e.ratio, e.seed): e.cell for e in p.entries}
    seconds = {("FedAvg", "none", None, 0): 100, ("FedAvg", "ahum", 0.01, 0): 600, ("FedAvg", "ahum", 0.01, 1): 800,
               ("FedAvg-lr-half", "ahum", 0.05, 0): 3600}
    recs = {cid: None for cid in p.cells} | {at[k]: {"status": "ok", "seconds": x} for k, x in seconds.items()}
    missing = [cid for cid, r in recs.items() if r is None]
    # FedAvg none s1: 100; FedAvg ahum 5% s0, s1: FedAvg's ahum cells, 700 each; FedAvg-lr-half ahum 5% s1: 3600;
    # FedAvg-lr-half none s0, s1 and ahum 1% s0, s1: that method's only finished cell, 3600 each
    expected = (100 + 2 * 700 + 3600 + 4 * 3600) / 3600
    about = float(re.search(r"they take about ([0-9.e-]+) cell-hours\.", report.cost(p, recs, missing))[1])
    assert about == pytest.approx(expected, rel=0.05)
    recs[at["FedAvg-lr-half", "ahum", 0.05, 0]] = None
    missing = [cid for cid, r in recs.items() if r is None]
    # FedAvg-lr-half has no finished cell: none at FedAvg's none (100), ahum 1% at FedAvg's (700), ahum 5% at the
    # dataset's mean (500)
    expected = (100 + 2 * 700 + 2 * 100 + 2 * 700 + 2 * 500) / 3600
    about = float(re.search(r"they take about ([0-9.e-]+) cell-hours\.", report.cost(p, recs, missing))[1])
    assert about == pytest.approx(expected, rel=0.05)
    assert report.cost(p, {cid: None for cid in p.cells}, list(p.cells)) == ""   # nothing has finished


def test_budget_stops_starting_cells(tmp_path):
    spec = spec_file(tmp_path, TINY.replace('[datasets.broken]\ndata = "BROKEN"\n', ""))
    out = tmp_path / "out"
    res = experiment(spec, out, "--budget", "0")
    assert res.returncode == 0 and "0 cells ok, 0 failed, 6 not started (--budget)" in res.stdout, res.stderr
    assert not list(out.glob("cells/*/summary.json")) and "## Missing cells\n\n6 of 6 cells" in tables(out)
    res = experiment(spec, out, "--budget", "0.3s")             # the first cell starts, no other after 0.3 s
    started = len(list(out.glob("cells/*/summary.json")))
    assert res.returncode == 0 and 1 <= started < 6 and f"{6 - started} not started" in res.stdout, res.stdout


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_loses_only_cells_in_progress(done, tmp_path):
    spec, full, _ = done
    out = tmp_path / "out"
    proc = experiment(spec, out, "--jobs", "1", wait=False)
    first, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and first is None:
        recs = [json.loads(f.read_text()) for f in out.glob("cells/*/summary.json")]
        first = next((r for r in recs if r["status"] == "ok"), None)
        time.sleep(0.05)
    kids, deadline = [], time.monotonic() + 10
    while not kids and proc.poll() is None and time.monotonic() < deadline:
        kids = children(proc.pid)                       # the cell in progress (between two cells: wait)
    assert proc.poll() is None and first is not None and kids, "the runner ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(k) for k in kids), "a cell outlived the killed runner"
    assert not (out / "report.md").exists()
    again = experiment(spec, out, "--jobs", "2")
    earlier = re.search(r"(\d+) finished earlier", again.stderr)
    assert again.returncode == 1 and earlier and int(earlier.group(1)) >= 1, again.stderr
    assert runner.record(specs.load(spec, out).cells[first["id"]])["seconds"] == first["seconds"]
    assert tables(out) == tables(full)                  # the same numbers as the uninterrupted run


# ---------------------------------------------------------------- the shipped specs

@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "experiments").glob("*.toml")))
def test_shipped_specs_are_valid(shared_data, tmp_path, name, monkeypatch):
    text = (ROOT / "experiments" / name).read_text()
    if 'device = "cuda"' in text:       # checked as where a GPU is (its device is asked for when it runs)
        import torch
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = specs.load(ROOT / "experiments" / name, tmp_path)
    if name.startswith("paper"):
        assert {e.section for e in p.entries} >= {"main", "ablation", "sensitivity"}


@pytest.mark.slow
def test_smoke_spec_reduced_runs_end_to_end(tmp_path):
    """experiments/smoke.toml (all of it checked), run cut to one seed, the methods the sections need, two
    attacks, one ablation variant and one sensitivity key with two values without attack, and the figures."""
    table = tomllib.loads((ROOT / "experiments" / "smoke.toml").read_text())
    specs.plan(table, Path("smoke.toml"), tmp_path)             # the whole spec is valid
    table["grid"]["seeds"] = [0]
    table["grid"]["attacks"] = table["grid"]["attacks"][:2]
    needed = {table[s]["method"] for s in ("ablation", "sensitivity") if s in table}
    needed |= {r["method"] for f in table.get("figures", []) for r in f["runs"]}
    first = next(iter(table["methods"]))
    table["methods"] = {k: v for k, v in table["methods"].items() if k == first or k in needed}
    if "ablation" in table:
        table["ablation"].update(variants=dict(list(table["ablation"]["variants"].items())[:1]), seeds=[0],
                                 attacks=["none"])
    if "sensitivity" in table:
        key, values = next(iter(table["sensitivity"]["sweeps"].items()))
        table["sensitivity"].update(sweeps={key: values[:2]}, seeds=[0], attack="none")
    script = ("import json, sys; from pathlib import Path; from fortress.cli import main; "
              "from fortress.experiments import report, runner, spec; "
              "p = spec.plan(json.load(sys.stdin), Path('smoke.toml'), Path(sys.argv[1])); "
              "c = runner.execute(p, main, jobs=2, progress=False); report.write(p); print(json.dumps(c))")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], input=json.dumps(table),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(res.stdout.splitlines()[-1])
    assert counts["failed"] == counts["waiting"] == 0 and counts["ok"] >= 4, (counts, res.stderr[-2000:])
    text = (tmp_path / "report.md").read_text()
    assert "## Main table" in text and "| FedAvg-SASRec | " in text and "## Ablation" in text
    assert all(f"![{f['name']}](figures/{f['name']}.png)" in text for f in table.get("figures", []))
    for png in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (tmp_path / png).stat().st_size > 1000


def test_slurm_job_script_runs_its_array_task_as_a_shard(tmp_path):
    spec = spec_file(tmp_path)
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3",
           "FORTRESS": f"{sys.executable} -m fortress.cli"}
    res = subprocess.run(["bash", str(ROOT / "experiments" / "slurm.sh"), str(spec), str(tmp_path / "out"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    cells = specs.load(spec, tmp_path / "out")
    listed = re.findall(r"^([a-z]{3}-[0-9a-f]{10}) ", res.stdout, flags=re.M)
    assert listed == runner.shard(cells, 2, 3) and "(shard 2/3 of 12 cells)" in res.stdout


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in (ROOT / "docs" / "results").glob("*/spec.toml")))
def test_committed_report_is_rebuilt_from_its_summaries(tmp_path, folder):
    """Every published grid under docs/results/ (a spec.toml beside cells/*/summary.json) rebuilds its report.md."""
    import shutil
    copy = tmp_path / folder
    shutil.copytree(ROOT / "docs" / "results" / folder, copy)
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (ROOT / "docs" / "results" / folder / "report.md").read_text()


def test_readme_verdict_tables_are_the_committed_main_table_reports():
    """The README's verdict tables are the committed main-table report's "At a glance" tables, verbatim, and its count
    of the cells that have run is the report's: a number in the README cannot drift from the summaries it comes from
    (refresh both with `fortress report --publish`)."""
    text = (ROOT / "docs" / "results" / "main-table" / "report.md").read_text()
    glance = text.split("### At a glance")[1].split("\n### ")[0] + "\n"
    tables = re.findall(r"^\| dataset, attackers \|.*?(?=\n\n)", glance, flags=re.M | re.S)
    assert len(tables) == 2                                 # SASRec and GRU4Rec rows, each against its own floor
    readme = "\n".join(line.strip() for line in (ROOT / "README.md").read_text().splitlines())   # list-item indent
    for t in tables:
        assert t in readme, f"README lacks the verdict table that starts {t.splitlines()[2][:60]!r}"
    counts = re.search(r"^(\d+) cells: (.*?)\. ", text, flags=re.M)
    total, ok = counts[1], re.search(r"(\d+) ok", counts[2])[1]
    assert f"What has run of it: {ok} of {total} cells." in readme
    verdicts = [c for t in tables for line in t.splitlines() for c in line.split("|") if "holds" in c or "fails" in c]
    close_mark = re.compile(rf"(holds|fails\*\*){re.escape(report.CLOSE_MARK)}")   # before any WEAK_MARK
    fails, close = [c for c in verdicts if "fails" in c], [c for c in verdicts if close_mark.search(c)]
    assert f"buys more than honest fake users in {len(fails)} of the {len(verdicts)} cells with a verdict" in readme
    assert (f"{sum(c in fails for c in close)} of those {len(fails)} and {sum(c not in fails for c in close)} of the "
            f"{len(verdicts) - len(fails)} that hold lie within the seeds' spread") in readme
    above = [c for c in verdicts if "holds" in c and report.SEED_MARK in c]
    assert f"{len(above)} of the {len(verdicts) - len(fails)} that hold carry {report.SEED_MARK}" in readme


@pytest.mark.parametrize("page", ["attacks", "defences", "client-objective"])
def test_results_page_tables_are_its_spec_report(page):
    """A results page whose grid is a spec quotes the tables of the spec's committed report verbatim (refresh both
    with `fortress report --publish`), so its numbers are the cells' summaries."""
    text = (ROOT / "docs" / "results" / page / "report.md").read_text()
    tables = re.findall(r"^\|[^\n]*\|\n\|---.*?(?=\n\n)",                 # every table: header, rule, rows
                        text.split("## Main table\n")[1].split("\n## ")[0] + "\n", flags=re.M | re.S)
    assert len(tables) >= 2                                 # final ER, and ER as the mean of the last evaluations
    body = (ROOT / "docs" / "results" / f"{page}.md").read_text()
    for t in tables:
        assert t in body, f"{page}.md lacks the report's table that starts {t.splitlines()[2][:60]!r}"


def test_a_cell_is_claimed_by_one_runner_and_broken_locks_are_one_line(tmp_path, monkeypatch):
    import errno
    import fcntl
    cell = specs.Cell("run-x", "run", [], tmp_path / "cells" / "run-x", tmp_path / "cells" / "run-x", tmp_path)
    runner.prepare(tmp_path)
    mine = runner.claim(cell)
    assert mine is not None and runner.claim(cell) is None          # held: nobody else gets it
    os.close(mine)
    again = runner.claim(cell)
    assert again is not None                                        # released with its descriptor
    os.close(again)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(InputError, match="file locks do not work in this folder"):
        runner.claim(cell)


def test_cell_summary_carries_the_strata_of_the_run(tmp_path):
    """The report is rebuilt from summaries alone: a run's test (and valid) strata go into its summary."""
    folder = tmp_path / "cells" / "c"
    folder.mkdir(parents=True)
    cell = specs.Cell("c", "run", ["run", "--out", str(folder)], folder, folder, tmp_path, labels=["c"])
    strata = {"history": {"cuts": [5, 20], "groups": {"<=5": {"users": 3, "HR@10": 0.5}}}}
    runner.write_json(folder / "results.json", {
        "config": {"seed": 0}, "dataset": {"name": "toy", "users": 3, "items": 5},
        "valid": {"HR@10": 0.4, "strata": strata}, "test": {"HR@10": 0.5, "strata": strata}, "timing": {}})
    got = runner.summary(cell, "ok", 1.0, None)
    assert got["test"]["strata"] == strata and got["valid"]["strata"] == strata
    assert "rounds_skipped" not in got                  # no round log, or none skipped: nothing to say


def test_cell_summary_counts_the_skipped_rounds(tmp_path):
    """A run can end `ok` with most of its rounds skipped (every upload rejected): its summary says how many."""
    folder = tmp_path / "cells" / "c"
    folder.mkdir(parents=True)
    cell = specs.Cell("c", "run", ["run", "--out", str(folder)], folder, folder, tmp_path, labels=["c"])
    history = [{"round": 1, "loss": 8.0}, {"round": 2, "loss": 3e5, "skipped": "3 of 256 clients answered"},
               {"round": 3, "loss": 3e5, "skipped": "0 of 256 clients answered"}]
    runner.write_json(folder / "results.json", {
        "config": {"seed": 0}, "dataset": {"name": "toy", "users": 3, "items": 5}, "valid": {"HR@10": 0.0},
        "test": {"HR@10": 0.0}, "timing": {}, "history": history, "rejected": [{"round": 2}] * 509})
    got = runner.summary(cell, "ok", 1.0, None)
    assert (got["rounds_skipped"], got["rounds_run"], got["rejected"]) == (2, 3, 509)


def test_cell_ids_count_whole_history_at_its_old_behaviour(tmp_path):
    """A cell computed before `whole_history` existed (= false, the default) keeps its id, with or without the key;
    whole-history cells get new ones."""
    old = specs.load(spec_file(tmp_path / "a", TINY.replace("[set]\n", "[set]\nwhole_history = false\n")),
                     tmp_path / "a", check_data=False)
    plain = specs.load(spec_file(tmp_path / "c"), tmp_path / "c", check_data=False)
    new = specs.load(spec_file(tmp_path / "b", TINY.replace("[set]\n", "[set]\nwhole_history = true\n")),
                     tmp_path / "b", check_data=False)
    def synthetic(plan):             # the other dataset's path differs per folder, and with it its cells' ids
        return {cid for cid, c in plan.cells.items() if "synthetic" in c.argv}
    assert synthetic(old) == synthetic(plain) != set()
    assert len(old.cells) == len(new.cells) > 0 and not set(old.cells) & set(new.cells)
    assert specs.id_defaults(Config(whole_history=True))["whole_history"] is False


def test_cell_ids_count_fedcl_lambda_at_its_old_default():
    """fedcl_lambda's default went from 1 (diverges from scratch) to 0.1: the main table's FedCL cells, which set
    0.1, keep their ids (run-97023e7850 is committed), a spec that leaves the key out now runs those same cells, and
    one that sets 1 runs the cells computed before at the old default."""
    text = (ROOT / "experiments" / "main-table.toml").read_text()
    explicit = specs.plan(tomllib.loads(text), ROOT / "m.toml", Path("/tmp/x"), check_data=False)
    fedcl = {e.cell for e in explicit.entries if e.row == "FedCL-SASRec"}
    assert "run-97023e7850" in fedcl and Config().fedcl_lambda == 0.1
    plain = specs.plan(tomllib.loads(text.replace("fedcl_lambda = 0.1", "")), ROOT / "m.toml", Path("/tmp/x"),
                       check_data=False)
    assert {e.cell for e in plain.entries if e.row == "FedCL-SASRec"} == fedcl
    one = specs.plan(tomllib.loads(text.replace("fedcl_lambda = 0.1", "fedcl_lambda = 1")), ROOT / "m.toml",
                     Path("/tmp/x"), check_data=False)
    old = {e.cell for e in one.entries if e.row == "FedCL-SASRec"}
    assert len(old) == len(fedcl) and not old & fedcl
    others = {e.cell for e in explicit.entries if e.row != "FedCL-SASRec"}       # not FedCL: the key changes nothing
    assert others == {e.cell for e in one.entries if e.row != "FedCL-SASRec"} and "run-4a31a0d97a" in others


def test_summaries_record_the_commit_the_runner_started_with(tmp_path, monkeypatch):
    """A long grid runs from a checkout that may be moved on while its cells run (they keep the code imported at the
    start): every summary names the commit of the start, not the one the checkout shows when a cell ends."""
    import functools
    head = {"commit": "start"}

    @functools.cache
    def versions():
        return {"commit": head["commit"]}
    monkeypatch.setattr(runner, "versions", versions)
    p = specs.load(spec_file(tmp_path), tmp_path / "out", check_data=False)
    p.cells = {cid: c for cid, c in list(p.cells.items())[:2]}
    runner.execute(p, lambda argv: 1, progress=False, log=lambda msg: head.update(commit="moved"))
    commits = {json.loads((c.folder / "summary.json").read_text())["versions"]["commit"] for c in p.cells.values()}
    assert commits == {"start"}


def test_defence_digest_counts_the_round_logs():
    """A cell's summary says, per defended run, how often a target was flagged and what each kind of client kept."""
    rounds = [{"round": 1, "defence": {"name": "fortress", "targets_flagged": [True], "weight_benign": 0.9,
                                       "weight_short": None, "weight_malicious": 0.2}},
              {"round": 2, "defence": {"name": "fortress", "targets_flagged": [False], "weight_benign": 0.7,
                                       "weight_short": 1.0, "weight_malicious": 0.4}},
              {"round": 3}]
    got = runner.defence_digest(rounds)
    assert got == {"name": "fortress", "rounds": 2, "rounds_target_flagged": 1, "weight_benign": pytest.approx(0.8),
                   "weight_short": 1.0, "weight_malicious": pytest.approx(0.3)}
    assert runner.defence_digest([{"round": 1, "loss": 1.0}]) is None
    assert runner.defence_digest([{"round": 1, "defence": {}}]) is None          # FedAvg's rounds (no defence)
    median = runner.defence_digest([{"round": 1, "defence": {"name": "median", "weight_benign": 1.0}}])
    assert median["rounds"] == 1 and median["rounds_target_flagged"] is None     # a rule that flags no items


def test_floor_table_compares_every_attacked_cell_with_the_stronger_floor(tmp_path):
    """[floor]: the floor is the larger seed mean of the floor method's last-evaluation ER@10 under the floor
    attacks; a cell holds when its mean is within floor + margin (here 0.3 and 0.05: 0.34 holds, 0.36 does not)."""
    grid = TINY.replace("er_last = 2", 'er_last = 2\nattacks = ["random", "popular", "ahum"]\nattack_ratios = [0.05]')
    text = grid.replace("[datasets.broken]\ndata = \"BROKEN\"\n", "") + '[floor]\nmethod = "FedAvg"\nmargin = 0.05\n'
    spec = spec_file(tmp_path, text)
    p = specs.load(spec, tmp_path / "out", check_data=False)
    assert p.floor == specs.Floor(("FedAvg",), ("random", "popular"), 0.05)
    last = {("FedAvg", "random"): [0.2, 0.2], ("FedAvg", "popular"): [0.25, 0.35], ("FedAvg", "ahum"): [0.36, 0.36],
            ("FedAvg-lr-half", "random"): [0.1, 0.1], ("FedAvg-lr-half", "popular"): [0.1, 0.1],
            ("FedAvg-lr-half", "ahum"): [0.3, 0.38]}
    for e in p.entries:
        if e.section != "main":
            continue
        er = last[e.row, e.attack][e.seed]
        rec = {"id": e.cell, "kind": "run", "status": "ok", "seconds": 1.0, "command": "", "labels": [],
               "test": {"HR@10": 0.1, "NDCG@10": 0.05},
               "attack": {"ER@5": er, "ER@10": er, "history": [{"round": 1, "ER@10": 1.0}, {"round": 2, "ER@10": er},
                                                              {"round": 3, "ER@10": er}]}}
        if e.row == "FedAvg-lr-half":
            rec["defence"] = {"name": "fortress", "rounds": 4, "rounds_target_flagged": 1 + e.seed,
                              "weight_benign": 0.9, "weight_short": 0.95, "weight_malicious": 0.5}
        p.cells[e.cell].folder.mkdir(parents=True, exist_ok=True)
        runner.write_json(p.cells[e.cell].folder / "summary.json", rec)
    runner.save_spec(p)
    assert main(["report", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    section = text.split("## Against the data-poisoning floor")[1].split("\n## ")[0]
    assert "### synthetic, 5%: floor 0.3000" in section
    glance = section.split("### At a glance")[1].split("\n### ")[0]
    assert ("| dataset, attackers | floor: Random / Popular | row | Random | Popular | A-hum |\n|---|---|---|---|---|---|\n"
            "| synthetic, 5% | 0.200 ± 0.000 (2) / 0.300 ± 0.071 (2) | FedAvg |  |  | 0.360 ± 0.000 (2) **fails**? |\n"
            "|  |  | FedAvg-lr-half | 0.100 ± 0.000 (2) holds | 0.100 ± 0.000 (2) holds | 0.340 ± 0.057 (2) holds? |\n"
            ) in glance          # a line per row, attacks in the spec's order; blank: FedAvg's random / popular are its floor
    # ?: 0.36 and 0.34 lie 0.01 from floor + margin, inside the floor's spread (popular's std 0.071); 0.10 does not
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in section.splitlines()
            if line.startswith("| FedAvg")}
    assert "| 0.3600 ± 0.0000 | **no**? |" in rows["FedAvg", "A-hum"]
    assert "| 0.3400 ± 0.0566 | yes? |" in rows["FedAvg-lr-half", "A-hum"]
    assert "| 0.1000 ± 0.0000 | yes |" in rows["FedAvg-lr-half", "Random"]
    assert "| 37.5% | 0.900 / 0.950 / 0.500 |" in rows["FedAvg-lr-half", "A-hum"]
    assert rows["FedAvg", "Popular"].endswith("| – | – |")
    assert "![ER@10 over the rounds on synthetic at 5%](figures/exposure-synthetic-5pct.png)" in section
    assert (tmp_path / "out" / "figures" / "exposure-synthetic-5pct.png").stat().st_size > 0


def test_a_verdict_within_the_seeds_spread_is_marked():
    """Slice.close: the distance to floor + margin against the larger std over seeds of the cell and of the floor
    attack that sets the floor (the larger mean: popular here, std 0.014); a one-seed cell brings no std of its own."""
    f = specs.Floor(("F",), ("random", "popular"), 0.02)
    er = {("F", "random"): [0.25, 0.05], ("F", "popular"): [0.21, 0.19],        # random's std 0.14, not the setter
          ("A", "ahum"): [0.23], ("A", "psmu"): [0.24], ("B", "ahum"): [0.05, 0.33], ("B", "psmu"): [0.40, 0.42]}
    values = {(r, a, "ER@10 last"): xs for (r, a), xs in er.items()}
    s = report.Slice("d", 0.05, [], report.floor_seeds(f, values), values)
    assert s.floors == {"F": pytest.approx(0.20)}
    assert s.verdict(f, "A", "ahum", "yes", "no") == "no?"          # 0.01 above 0.22, inside the floor's 0.014
    assert s.verdict(f, "A", "psmu", "yes", "no") == "no"           # 0.02 above it
    assert s.verdict(f, "B", "ahum", "yes", "no") == f"yes? {report.SEED_MARK}1/2"   # 0.03 below it, inside its own
    #                                                         std 0.20; seed 1's 0.33 above popular's 0.21 + 0.02
    assert s.verdict(f, "B", "psmu", "yes", "no") == "no"           # 0.19 above it
    assert s.verdict(f, "C", "ahum", "yes", "no") == ""             # not run


def test_a_verdict_that_holds_on_the_mean_but_not_on_some_seeds_is_marked():
    """Slice.seeds_above: a cell that holds on its seed mean gets SEED_MARK with how many of how many seeds lie above
    the floor attack's highest seed + margin (0.25 + 0.02 here); one that fails, or whose seeds all stay below, none."""
    f = specs.Floor(("F",), ("random",), 0.02)
    er = {("F", "random"): [0.15, 0.25], ("A", "ahum"): [0.0, 0.40], ("B", "ahum"): [0.16, 0.26],
          ("C", "ahum"): [0.30, 0.50], ("D", "ahum"): [0.0, 0.27]}
    values = {(r, a, "ER@10 last"): xs for (r, a), xs in er.items()}
    s = report.Slice("d", 0.05, [], report.floor_seeds(f, values), values)
    assert s.verdict(f, "A", "ahum", "yes", "no") == f"yes? {report.SEED_MARK}1/2"   # mean 0.20 <= 0.22; 0.40 > 0.27
    assert s.verdict(f, "B", "ahum", "yes", "no") == "yes?"                       # 0.26 is under 0.27
    assert s.verdict(f, "C", "ahum", "yes", "no") == "no"                         # fails: no seed mark
    assert s.seeds_above(f, "D", "ahum") == ""                                    # 0.27 is not above 0.27
    assert s.seeds_above(f, "E", "ahum") == ""                                    # not run


def test_a_verdict_from_a_model_that_barely_ranks_the_test_items_is_marked():
    """Slice.weak: a cell whose seed mean test HR@10 is under half the clean test HR@10 of the floor method it is
    held to (0.02 here) gets WEAK_MARK, whatever its verdict; the floor's own cells too; one whose mean is not but
    some seeds' are gets WEAK_MARK with how many of how many; no clean run, no mark."""
    f = specs.Floor(("F",), ("random",), 0.02)
    values = {("F", "random", "ER@10 last"): [0.2, 0.2], ("F", "random", "HR@10"): [0.002, 0.03],
              ("A", "ahum", "ER@10 last"): [0.01, 0.01], ("A", "ahum", "HR@10"): [0.004, 0.0059],
              ("B", "ahum", "ER@10 last"): [0.01], ("B", "ahum", "HR@10"): [0.01],
              ("C", "ahum", "ER@10 last"): [0.5], ("C", "ahum", "HR@10"): [0.001]}
    s = report.Slice("d", 0.05, [], report.floor_seeds(f, values), values, {"F": 0.02})
    assert s.verdict(f, "A", "ahum", "yes", "no") == f"yes {report.WEAK_MARK}"     # 0.00495 < 0.01
    assert s.verdict(f, "B", "ahum", "yes", "no") == "yes"                         # 0.01 is not under 0.01
    assert s.verdict(f, "C", "ahum", "yes", "no") == f"no {report.WEAK_MARK}"
    assert s.weak(f, "F", "random") == f"{report.WEAK_MARK}1/2"                    # mean 0.016, seed 0 0.002
    s.values["F", "random", "HR@10"] = [0.002, 0.0]
    assert s.weak(f, "F", "random") == report.WEAK_MARK
    s.values["B", "ahum", "ER@10 last"], s.values["B", "ahum", "HR@10"] = [0.01, 0.0, 0.01], [0.02, 0.0012, 0.03]
    assert s.verdict(f, "B", "ahum", "yes", "no") == f"yes {report.WEAK_MARK}1/3"  # one diverged seed of three
    bare = report.Slice("d", 0.05, [], report.floor_seeds(f, values), values, {"F": None})
    assert bare.verdict(f, "A", "ahum", "yes", "no") == "yes"


def test_exposure_trajectory_is_the_seed_mean_over_the_rounds_every_seed_evaluated():
    rounds, mean, lo, hi = report.mean_trajectory([[(1, 0.2), (2, 0.4), (3, 0.6)], [(2, 0.2), (3, 0.0)]])
    assert rounds == [2, 3]
    assert np.allclose(mean, [0.3, 0.3]) and np.allclose(lo, [0.2, 0.0]) and np.allclose(hi, [0.4, 0.6])


def test_each_row_is_held_to_the_floor_of_its_backbone(tmp_path):
    """[floor] method = a list, one per backbone: a GRU4Rec row is held to FedAvg-GRU4Rec's data poisoning, not
    SASRec's; two floor methods of one backbone, or one that does not run the floor attacks, is a one-line error."""
    grid = TINY.replace("er_last = 2", 'er_last = 2\nattacks = ["random", "ahum"]\nattack_ratios = [0.05]')
    grid = grid.replace("[datasets.broken]\ndata = \"BROKEN\"\n", "").replace("[pretrain]\ninherit = [\"backbone\"]\nrounds = 3\n", "")
    gru = grid + '[methods.FedAvg-GRU]\nobjective = "next_item"\nbackbone = "gru4rec"\n'
    text = gru + '[floor]\nmethod = ["FedAvg", "FedAvg-GRU"]\nattacks = ["random"]\n'
    p = specs.load(spec_file(tmp_path / "a", text), tmp_path / "a" / "out", check_data=False)
    assert p.floor.method_of("FedAvg-lr-half") == "FedAvg" and p.floor.method_of("FedAvg-GRU") == "FedAvg-GRU"
    last = {("FedAvg", "random"): 0.1, ("FedAvg", "ahum"): 0.1, ("FedAvg-lr-half", "random"): 0.1,
            ("FedAvg-lr-half", "ahum"): 0.3, ("FedAvg-GRU", "random"): 0.4, ("FedAvg-GRU", "ahum"): 0.3}
    for e in p.entries:
        rec = {"id": e.cell, "kind": "run", "status": "ok", "seconds": 1.0, "command": "", "labels": [],
               "test": {"HR@10": 0.1, "NDCG@10": 0.05}}
        if e.attack != "none":
            er = last[e.row, e.attack]
            rec["attack"] = {"ER@5": er, "ER@10": er, "history": [{"round": 1, "ER@10": er}]}
        p.cells[e.cell].folder.mkdir(parents=True, exist_ok=True)
        runner.write_json(p.cells[e.cell].folder / "summary.json", rec)
    section = report.write(p).read_text().split("## Against the data-poisoning floor")[1]
    assert "of the `FedAvg` / `FedAvg-GRU` rows under Random (each row against the floor method of its backbone): " in section
    assert "### synthetic, 5%: floor 0.1000 (FedAvg), 0.4000 (FedAvg-GRU)" in section
    assert "Held to FedAvg:" in section and "Held to FedAvg-GRU:" in section
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in section.splitlines() if line.startswith("| ")}
    assert "| **no** |" in rows["FedAvg-lr-half", "A-hum"]           # 0.3 against SASRec's 0.1
    assert "| yes |" in rows["FedAvg-GRU", "A-hum"]                  # 0.3 against GRU4Rec's 0.4
    bad = [(grid + '[floor]\nmethod = ["FedAvg", "FedAvg-lr-half"]\nattacks = ["random"]\n',
            "'FedAvg' and 'FedAvg-lr-half' have the same backbone 'sasrec'"),
           (gru + '[methods.FedAvg-GRU-lr]\nobjective = "next_item"\nbackbone = "gru4rec"\nlr = 0.5\n'
            '[floor]\nmethod = ["FedAvg", "FedAvg-GRU"]\nattacks = ["random"]\n', None),
           (gru.replace('backbone = "gru4rec"', 'backbone = "gru4rec"\nattacks = ["ahum"]')
            + '[floor]\nmethod = ["FedAvg", "FedAvg-GRU"]\nattacks = ["random"]\n',
            "'random' is not an attack that method 'FedAvg-GRU' runs")]
    for i, (text, error) in enumerate(bad):
        path = spec_file(tmp_path / f"bad{i}", text)
        if error is None:                                               # two GRU rows share one floor: fine
            assert specs.load(path, tmp_path / "o", check_data=False).floor.method_of("FedAvg-GRU-lr") == "FedAvg-GRU"
            continue
        with pytest.raises(InputError, match=re.escape(error)):
            specs.load(path, tmp_path / "o", check_data=False)
    missing = gru.replace("[methods.FedAvg-GRU]", "[methods.GRU-alone]") + '[floor]\nmethod = ["FedAvg"]\nattacks = ["random"]\n'
    assert specs.load(spec_file(tmp_path / "one", missing), tmp_path / "o", check_data=False).floor.method_of(
        "GRU-alone") == "FedAvg"                                        # one floor method holds every row


def test_attacks_only_the_floor_method_runs_stay_out_of_the_main_table(tmp_path):
    """experiments/main-table.toml: only FedAvg-SASRec runs random and popular (the floor). Those cells are the
    yardstick, in the floor's table; the main table keeps the attacks the rivals run, and the floor attacks too
    when a rival runs them."""
    grid = TINY.replace("er_last = 2", 'er_last = 2\nattacks = ["ahum", "random", "popular"]\nattack_ratios = [0.05]')
    grid = grid.replace("[datasets.broken]\ndata = \"BROKEN\"\n", "") + '[floor]\nmethod = "FedAvg"\n'
    only = grid.replace("lr = 0.5", 'lr = 0.5\nattacks = ["ahum"]')
    p = specs.load(spec_file(tmp_path / "a", only), tmp_path / "a" / "out", check_data=False)
    main_entries = [e for e in p.entries if e.section == "main"]
    kept = report.without_floor_only(p, main_entries)
    assert {e.attack for e in kept} == {"ahum"} and {e.attack for e in main_entries} == {"ahum", "random", "popular"}
    text = report.write(p).read_text()
    table = text.split("## Main table")[1].split("\n## ")[0]
    assert "A-hum 5%" in table and "Random" not in table and "Popular" not in table
    floor = text.split("## Against the data-poisoning floor")[1]
    assert "| FedAvg | Random |" in floor and "| FedAvg | Popular |" in floor
    both = specs.load(spec_file(tmp_path / "b", grid), tmp_path / "b" / "out", check_data=False)
    assert report.without_floor_only(both, both.entries) == both.entries        # a rival runs them: they stay


def test_a_slice_run_into_the_folder_keeps_the_larger_spec(tmp_path):
    """Running some of a spec's cells (a slice: fewer seeds, methods, attacks) into its folder keeps DIR/spec.toml,
    so `fortress report DIR` still covers the whole grid; a spec that grew replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    path = spec_file(tmp_path / "s")                   # the slice and the grown spec beside it: same datasets
    (tmp_path / "s" / "slice.toml").write_text(path.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    (tmp_path / "s" / "grown.toml").write_text(path.read_text() + '[methods.FedAvg-lr-double]\nobjective = "next_item"\n'
                                               "lr = 2.0\n")
    full, part, grown = (specs.load(tmp_path / "s" / name, out, check_data=False)
                         for name in ("spec.toml", "slice.toml", "grown.toml"))
    assert set(part.cells) < set(full.cells) < set(grown.cells)
    said = []
    runner.save_spec(full)
    runner.save_spec(part, said.append)
    assert (out / "spec.toml").read_text() == full.text
    assert said == [f"kept {out / 'spec.toml'}: it holds all {len(part.cells)} cells of {part.spec} "
                    f"(and {len(full.cells) - len(part.cells)} more)"]
    runner.save_spec(grown)
    assert (out / "spec.toml").read_text() == grown.text


def test_cells_that_may_use_a_gpu_run_as_subprocesses_not_forks(tmp_path, monkeypatch):
    """A fork cannot use CUDA once the runner has touched it (checking a spec's device=cuda does): such cells, and
    device=auto ones, run as `fortress` subprocesses, and finish (on a machine without a GPU auto is the CPU)."""
    text = TINY.replace('[datasets.broken]\ndata = "BROKEN"\n', "").replace("seeds = [0, 1]", "seeds = [0]")
    plain = specs.load(spec_file(tmp_path / "a", text), tmp_path / "a" / "out")
    auto = specs.load(spec_file(tmp_path / "b", text.replace("threads = 1", 'threads = 1\ndevice = "auto"')),
                      tmp_path / "b" / "out")
    assert runner.forks(plain) == runner.FORK and not runner.forks(auto)
    forked, real = [], runner.Job.__init__

    def job(self, cell, main_, close_fds=(), fork=runner.FORK):
        forked.append(fork)
        real(self, cell, main_, close_fds, fork)
    monkeypatch.setattr(runner.Job, "__init__", job)
    counts = runner.execute(auto, main, jobs=1, progress=False)
    assert counts["ok"] == len(auto.cells) and forked == [False] * len(auto.cells), counts


def test_a_gpu_spec_is_refused_without_a_gpu_but_its_report_rebuilds(tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"cuda-check.toml: cell '.*': device='cuda': CUDA is not available here"):
        specs.load(ROOT / "experiments" / "cuda-check.toml", tmp_path)
    assert len(specs.load(ROOT / "experiments" / "cuda-check.toml", tmp_path, check_data=False).cells) == 12
