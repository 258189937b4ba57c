"""report.md: mean ± std over seeds, best per column, final and last-evaluations ER, sensitivity PNGs, cells."""
from __future__ import annotations

import json
from pathlib import Path

from fortress.experiments import report
from fortress.experiments.runner import write_json
from fortress.experiments.spec import Cell, Entry, Plan


def test_table_marks_best_per_column_and_short_seeds():
    hr = report.Column("HR@10", "none", None, "max")
    er = report.Column("ER@10", "ahum", 0.01, "min")
    clean_er = report.Column("ER@10", "none", None, None)
    values = {("a", hr): [0.2, 0.4], ("b", hr): [0.1], ("a", er): [0.5, 0.5], ("b", er): [0.1, 0.3],
              ("a", clean_er): [0.0, 0.0], ("b", clean_er): [0.1, 0.1]}
    lines = report.table(["a", "b", "c"], [hr, er, clean_er], values, expected=2).splitlines()
    assert lines[0] == "| method | HR@10 | ER@10 A-hum 1% | ER@10 no attack |"
    assert lines[1] == "|---|---:|---:|---:|"
    # sample std |0.2 - 0.4| / √2; no best without attack
    # HR: a leads, but b has one seed (no spread to weigh the lead against): nothing marked
    assert lines[2] == "| a | 0.3000 ± 0.1414 | 0.5000 ± 0.0000 | 0.0000 ± 0.0000 |"
    assert lines[3] == "| b | 0.1000 (n=1) | **0.2000 ± 0.1414** | 0.1000 ± 0.0000 |"    # one seed: the value alone
    assert lines[4] == "| c | – | – | – |"
    assert report.mean_std([0.0863], expected=1) == "0.0863"    # a one-seed grid: no "± 0"


def test_ties_are_all_marked_unless_the_whole_column_ties():
    hr = report.Column("HR@10", "none", None, "max")
    er = report.Column("ER@10", "ahum", 0.01, "min")
    values = {("a", hr): [0.30001, 0.30001], ("b", hr): [0.3, 0.3], ("c", hr): [0.2, 0.2],
              ("a", er): [0.0, 0.0], ("b", er): [0.0, 0.0], ("c", er): [0.0, 0.0]}
    lines = report.table(["a", "b", "c"], [hr, er], values, expected=2).splitlines()
    assert [line.count("**") for line in lines[2:]] == [2, 2, 0]


def test_a_single_seed_is_never_marked_best():
    """ER swings by +-0.15 between evaluations: one seed's lead, however large, is no evidence of a better method."""
    hr = report.Column("HR@10", "none", None, "max")
    values = {("a", hr): [0.5], ("b", hr): [0.1], ("c", hr): [0.4, 0.42], ("d", hr): [0.1, 0.11]}
    assert report.table(["a", "b"], [hr], values, expected=1).count("**") == 0          # a one-seed grid
    assert report.table(["a", "c"], [hr], values, expected=2).count("**") == 0          # the leader has one seed
    assert report.table(["c", "b"], [hr], values, expected=2).count("**") == 0          # the next-best has one
    lines = report.table(["c", "d", "b"], [hr], values, expected=2).splitlines()        # b is behind d: no matter
    assert [line.count("**") for line in lines[2:]] == [2, 0, 0]


def test_a_lead_inside_the_seed_spread_is_not_marked():
    hr = report.Column("HR@10", "none", None, "max")
    # a leads b by 0.01, but b's seeds spread by 0.0141: no mark; c leads d by 0.05 against a spread of 0.0141
    values = {("a", hr): [0.31, 0.31], ("b", hr): [0.29, 0.31], ("c", hr): [0.36, 0.36], ("d", hr): [0.30, 0.32]}
    lines = report.table(["a", "b"], [hr], values, expected=2).splitlines()
    assert [line.count("**") for line in lines[2:]] == [0, 0]
    lines = report.table(["c", "d"], [hr], values, expected=2).splitlines()
    assert [line.count("**") for line in lines[2:]] == [2, 0]
    # the spread of the next-best row counts, not of a row further behind
    values[("e", hr)] = [0.0, 0.3]
    lines = report.table(["c", "d", "e"], [hr], values, expected=2).splitlines()
    assert [line.count("**") for line in lines[2:]] == [2, 0, 0]


def test_metrics_final_and_mean_of_last_evaluations():
    res = {"test": {"HR@10": 0.5, "NDCG@10": 0.25},
           "attack": {"ER@5": 0.3, "ER@10": 0.4,
                      "history": [{"round": r, "ER@5": e / 2, "ER@10": e} for r, e in [(10, 0.9), (20, 0.1), (30, 0.2),
                                                                                         (40, 0.4)]]}}
    m = report.metrics(res, er_last=3)
    assert m["HR@10"] == 0.5 and m["ER@10"] == 0.4 and m["ER@5"] == 0.3
    assert abs(m["ER@10 last"] - (0.1 + 0.2 + 0.4) / 3) < 1e-12 and abs(m["ER@5 last"] - 0.35 / 3) < 1e-12
    assert "ER@10" not in report.metrics({"test": {"HR@10": 0.5, "NDCG@10": 0.2}}, 3)       # no targets tracked


def test_heading_names_the_evaluations_actually_averaged():
    """'mean of the last 5 evaluations' only where the cells had 5; a 30-round cell evaluated every 10 rounds has 3."""
    def rec(n, status="ok"):
        return {"status": status, "attack": {"history": [{"round": r, "ER@10": 0.1} for r in range(n)]}}
    assert report.window(5, [rec(15), rec(5)]) == "5"
    assert report.window(5, [rec(3), rec(3), None, rec(9, "failed")]) == "3"
    assert report.window(5, [rec(3), rec(15)]) == "3-5"
    assert report.window(5, [None, {"status": "ok"}]) == "5"        # nothing averaged yet: the spec's window


def fake_plan(root: Path) -> Plan:
    """Two methods x (none, ahum) x 2 seeds, an ablation row, a sensitivity sweep, one failed cell."""
    cells, entries = {}, []

    def cell(cid, hr, er=None, status="ok", error=None):
        c = Cell(cid, "run", ["run", "--data", "synthetic", "--out", str(root / "cells" / cid)],
                 root / "cells" / cid, root / "cells" / cid, root, labels=[cid])
        c.folder.mkdir(parents=True)
        res = {"test": {"HR@10": hr, "NDCG@10": hr / 2}}
        if er is not None:
            res["attack"] = {"ER@5": er / 2, "ER@10": er,
                             "history": [{"ER@5": 1.0, "ER@10": 1.0}, {"ER@5": er / 2, "ER@10": er}]}
        if cid == "FORTRESS-c0":        # one cell ran with early stopping
            res["early_stopping"] = {"best_round": 20, "rounds_run": 50, "max_rounds": 100, "stopped_early": True}
        write_json(c.folder / "summary.json", {"status": status, "seconds": 1.5, "error": error,
                                               **(res if status == "ok" else {})})
        cells[cid] = c
        return cid

    for m, base in (("FedAvg", 0.30), ("FORTRESS", 0.32)):
        for seed in (0, 1):
            entries.append(Entry("main", "toy", m, "none", None, seed, cell(f"{m}-c{seed}", base + seed / 100)))
            er = 0.5 if m == "FedAvg" else 0.05
            entries.append(Entry("main", "toy", m, "ahum", 0.01, seed, cell(f"{m}-a{seed}", base, er + seed / 100)))
    for seed in (0, 1):
        entries.append(Entry("ablation", "toy", "FORTRESS", "none", None, seed, f"FORTRESS-c{seed}"))
        status = "failed" if seed == 1 else "ok"
        entries.append(Entry("ablation", "toy", "w/o temporal", "none", None, seed,
                             cell(f"wot-{seed}", 0.31, status=status, error="exit 1: ValueError: boom")))
        for v in ("0.0", "0.1"):
            entries.append(Entry("sensitivity", "toy", "lambda_cl", "none", None, seed,
                                 cell(f"s{v}-{seed}", 0.2 + float(v)), value=v))
            entries.append(Entry("sensitivity", "toy", "lambda_cl", "ahum", 0.01, seed,
                                 cell(f"s{v}-a{seed}", 0.2, er=0.5 - float(v)), value=v))
    return Plan(Path("spec.toml"), root, cells, entries, {}, er_last=1)


def test_report_sections(tmp_path):
    p = fake_plan(tmp_path)
    text = report.write(p).read_text()
    final = text.split("### toy: final ER")[1].split("###")[0]
    assert "| method | HR@10 | NDCG@10 | ER@10 no attack | ER@5 A-hum 1% | ER@10 A-hum 1% |" not in final
    assert "| method | HR@10 | NDCG@10 | ER@5 A-hum 1% | ER@10 A-hum 1% |" in final
    assert "| FORTRESS | **0.3250 ± 0.0071** | **0.1625 ± 0.0035** | **0.0275 ± 0.0035** | **0.0550 ± 0.0071** |" in final
    assert "| FedAvg | 0.3050 ± 0.0071 | 0.1525 ± 0.0035 | 0.2525 ± 0.0035 | 0.5050 ± 0.0071 |" in final
    # er_last = 1: the last evaluation is the final one, so the second table has the same ER numbers
    last = text.split("### toy: ER as the mean of the last 1 evaluations")[1].split("##")[0]
    assert "| FedAvg | 0.3050 ± 0.0071 | 0.1525 ± 0.0035 | 0.2525 ± 0.0035 | 0.5050 ± 0.0071 |" in last
    ablation = text.split("## Ablation")[1].split("## Sensitivity")[0]
    assert "| w/o temporal | 0.3100 (n=1) |" in ablation
    assert "## Failed cells" in text and "`wot-1` (wot-1): exit 1: ValueError: boom" in text
    assert "| `FORTRESS-c0` | FORTRESS-c0 | ok | 1.5 | 20 / 50 |" in text          # early stopping: best / run
    assert "| `wot-1` | wot-1 | failed | 1.5 | – |" in text
    sens = text.split("## Sensitivity")[1]
    assert "![sensitivity to lambda_cl](figures/sensitivity-toy-lambda_cl.png)" in sens
    assert "| 0.1 | 0.3000 ± 0.0000 | 0.1500 ± 0.0000 | 0.4000 ± 0.0000 | 0.4000 ± 0.0000 |" in sens
    assert (tmp_path / "figures" / "sensitivity-toy-lambda_cl.png").stat().st_size > 5000
    assert text.count("| ok | 1.5 |") == len(p.cells) - 1 and "| failed | 1.5 |" in text
    assert "`fortress run --data synthetic --out DIR/cells/FedAvg-c0`" in text and str(tmp_path) not in text


def test_sensitivity_figure_shows_seeds_labels_and_no_negative_er():
    series = {"HR@10": [[0.30, 0.32], [0.31, 0.35], []], "NDCG@10": [[0.15, 0.16], [0.15, 0.17], []],
              "ER@10": [[0.0, 0.01], [0.0, 0.0], [0.02, 0.0]], "ER@10 last": [[0.0, 0.0], [0.0, 0.01], [0.0, 0.0]]}
    fig = report.sensitivity_figure("lambda_cl", ["0.0", "0.02", "0.1"], series, "A-hum 1%", "Sensitivity to λ1 on toy")
    assert fig._suptitle.get_text() == "Sensitivity to λ1 on toy"
    clean, er = fig.axes
    for ax in fig.axes:
        assert ax.get_title() and ax.get_ylabel() and "swept value" in ax.get_xlabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0", "0.02", "0.1"]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "each seed" in labels and sum("mean ± std" in t for t in labels) == 2
        assert ax.get_ylim()[0] == 0                         # a std bar must not take a share below 0
    assert "ER@10" in er.get_ylabel() and "HR@10" in clean.get_ylabel()
    from matplotlib.collections import PathCollection
    import matplotlib.pyplot as plt
    for ax, n in ((clean, 8), (er, 12)):                      # every seed's value is a dot
        assert sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)) == n
    plt.close(fig)


def test_one_method_under_several_attacks_is_one_attack_per_row():
    got = {"c0": {"HR@10": 0.3, "NDCG@10": 0.1, "ER@10": 0.0, "ER@5": 0.0},
           "a0": {"HR@10": 0.2, "NDCG@10": 0.05, "ER@5": 0.5, "ER@10": 0.6},
           "a1": {"HR@10": 0.4, "NDCG@10": 0.15, "ER@5": 0.7, "ER@10": 0.8}}
    entries = [Entry("main", "toy", "FedAvg", "none", None, 0, "c0"),
               Entry("main", "toy", "FedAvg", "ahum", 0.05, 0, "a0"), Entry("main", "toy", "FedAvg", "ahum", 0.05, 1, "a1")]
    lines = report.grid_tables(entries, got, "", "method").splitlines()
    assert lines[0] == "| FedAvg: attack | HR@10 | NDCG@10 | ER@5 | ER@10 |"
    assert lines[2] == "| no attack | 0.3000 (n=1) | 0.1000 (n=1) | 0.0000 (n=1) | 0.0000 (n=1) |"
    assert lines[3] == "| A-hum 5% | 0.3000 ± 0.1414 | 0.1000 ± 0.0707 | 0.6000 ± 0.1414 | 0.7000 ± 0.1414 |"


def strata_of(hr: float, cold: float) -> dict:
    """A run's test metrics with strata, as `fortress run` / `fortress eval` write them (HR@10 only matters here)."""
    def group(users, h):
        return {"users": users, "HR@10": h, "NDCG@10": h / 2}
    return {"HR@10": hr, "NDCG@10": hr / 2, "users": 100, "strata": {
        "history": {"by": "the user's train interactions", "cuts": [5, 20],
                    "groups": {"<=5": group(70, hr), "6-20": group(25, hr), ">20": group(5, hr)}},
        "popularity": {"by": "the test item's train interactions", "head_share": 0.2, "cold_max": 8, "popular_min": 79,
                       "groups": {"cold": group(30, cold), "mid": group(50, hr), "popular": group(20, hr)}}}}


def test_report_stratified_table_from_summaries_and_strata_json(tmp_path, monkeypatch):
    """Strata in a summary (a run that wrote them) or in the cell's strata.json (`fortress eval` of an older cell);
    a cell with neither is left out of the stratified table; a published folder gives the same table."""
    import json
    runs = (("FedAvg", 0, "summary", 0.30, 0.02), ("FedAvg", 1, "eval", 0.32, 0.04),
            ("FORTRESS", 0, "summary", 0.33, 0.10), ("FORTRESS", 1, None, 0.35, 0.0))

    def plan(root: Path) -> Plan:
        cells = {f"{m}-{seed}": Cell(f"{m}-{seed}", "run", ["run", "--out", str(root / "cells" / f"{m}-{seed}")],
                                     root / "cells" / f"{m}-{seed}", root / "cells" / f"{m}-{seed}", root,
                                     labels=[f"{m}-{seed}"]) for m, seed, *_ in runs}
        entries = [Entry("main", "toy", m, "none", None, seed, f"{m}-{seed}") for m, seed, *_ in runs]
        return Plan(Path("spec.toml"), root, cells, entries, {}, er_last=1, text="[grid]\n")
    p = plan(tmp_path / "exp")
    for m, seed, where, hr, cold in runs:
        c = p.cells[f"{m}-{seed}"]
        c.folder.mkdir(parents=True)
        test = strata_of(hr, cold)
        if where == "eval":
            write_json(c.folder / "strata.json", {"run": str(c.folder), "test": test})
        if where != "summary":
            test = {k: v for k, v in test.items() if k != "strata"}
        write_json(c.folder / "summary.json", {"status": "ok", "seconds": 1.0, "test": test})
    text = report.write(p).read_text()
    hr = text.split("### toy: test HR@10 by stratum")[1].split("###")[0]
    assert ("| method | all (100 users) | history <=5 (70 users) | history 6-20 (25 users) | history >20 (5 users) | "
            "cold (30 users) | mid (50 users) | popular (20 users) |") in hr
    assert "| FedAvg | 0.3100 ± 0.0141 |" in hr and "| 0.0300 ± 0.0141 |" in hr      # seed 1 from strata.json
    assert "| FORTRESS | 0.3300 (n=1) |" in hr and "| 0.1000 (n=1) |" in hr      # seed 1 has no strata; one seed: no bold
    assert "20%: cold <= 8, popular >= 79" in text and "### toy: test NDCG@10 by stratum" in text
    monkeypatch.setattr(report, "rebuild", plan)                # the published folder's plan (no real spec here)
    published = report.publish(p, tmp_path / "pub")
    assert (tmp_path / "pub" / "cells" / "FedAvg-1" / "strata.json").is_file()
    assert json.loads((tmp_path / "pub" / "cells" / "FedAvg-0" / "summary.json").read_text())["test"]["strata"]
    again = report.write(published).read_text()
    assert again.split("## Main table by stratum")[1].split("## Cells")[0] == \
        text.split("## Main table by stratum")[1].split("## Cells")[0]


def test_a_run_with_skipped_rounds_is_marked_wherever_its_numbers_show(tmp_path):
    """A run whose rounds were skipped (every upload rejected) ends `ok`; its numbers must not read as a result."""
    p = fake_plan(tmp_path)
    rec = p.cells["FedAvg-c1"].folder / "summary.json"
    s = json.loads(rec.read_text())
    write_json(rec, {**s, "rounds_skipped": 827, "rounds_run": 1500, "rejected": 376000})
    text = report.write(p).read_text()
    final = text.split("### toy: final ER")[1].split("###")[0]
    # FedAvg's clean HR@10 holds seed 1's skipped run: marked, never bold; the ER columns (other cells) are not
    assert f"| FedAvg | 0.3050 ± 0.0071 {report.SKIP_MARK} | 0.1525 ± 0.0035 {report.SKIP_MARK} | 0.2525 ± 0.0035 |" in final
    assert "## Runs with skipped rounds" in text
    assert "- `FedAvg-c1` (FedAvg-c1): 827 of 1500 rounds skipped, 376,000 uploads rejected" in text
    assert f"| `FedAvg-c1` | FedAvg-c1 | ok, 827 rounds skipped {report.SKIP_MARK} | 1.5 |" in text
    assert report.metrics(json.loads(rec.read_text()), 1)["skipped"] == 827.0
