"""DIR/report.md of `fortress experiment`: main and ablation tables, sensitivity plots, figures, cells.

Built from the cells' summaries alone (DIR/cells/ID/summary.json, and the figures' PNGs), so a
folder of committed summaries gives the same report as the folder the cells ran in. Every number is test-split, mean ± std over the seeds that finished (sample std, ddof 1, also
used by bench/; a single seed shows its value alone; `(n=k)` marks a mean over fewer seeds than
asked). ER swings from round to round, so each table comes twice: with the final ER@K, and with
the mean ER@K of the last `er_last` evaluations. Best per column is bold: highest HR/NDCG,
lowest ER under an attack, and only where the lead over the next row is larger than the seed spread
and both have at least two seeds (`clear_best`). Clean runs (no attack) whose results carry strata (HR/NDCG@10 by the
user's train-history length and by the test item's popularity; `fortress run` writes them, and
`fortress eval` adds them to a cell made before, as cells/ID/strata.json) get stratified tables too.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fortress.errors import InputError
from fortress.experiments.runner import SPEC_COPY, STRATA, SUMMARY, record, write_text
from fortress.experiments.spec import Entry, Floor, Plan, load

ATTACK_NAMES = {"none": "no attack", "ahum": "A-hum", "psmu": "PSMU", "random": "Random",
                "popular": "Popular", "boost": "Boost"}
KEY_NAMES = {"lambda_cl": "λ1 (lambda_cl)", "lambda_temp": "λ2 (lambda_temp)", "alpha": "α (alpha)",
             "beta": "β (beta)"}


def last_evaluations(results: dict[str, Any], k: str, er_last: int) -> list[float]:
    """The ER@K values 'ER@K last' averages: those of the last `er_last` evaluations in the attack's history."""
    return [float(h[k]) for h in (results.get("attack") or {}).get("history", []) if k in h][-er_last:]


def metrics(results: dict[str, Any], er_last: int) -> dict[str, float]:
    """HR@10, NDCG@10 and, with tracked targets, ER@5/10 (final) and 'ER@K last' (mean of the last evaluations)."""
    out = {k: float(results["test"][k]) for k in ("HR@10", "NDCG@10")}
    if results.get("rounds_skipped"):               # `skipped`: its numbers are marked in every table
        out["skipped"] = float(results["rounds_skipped"])
    attack = results.get("attack") or {}
    for k in ("ER@5", "ER@10"):
        if k in attack:
            out[k] = float(attack[k])
            tail = last_evaluations(results, k, er_last)
            out[f"{k} last"] = float(np.mean(tail)) if tail else out[k]
    return out


def window(er_last: int, recs) -> str:
    """How many evaluations 'ER@K last' averages over the finished cells of `recs`: `er_last`, or fewer where none
    has that many ("3", or "3-5" where cells differ), so a heading never claims a longer window than was averaged."""
    n = {len(last_evaluations(r, "ER@10", er_last)) for r in recs if r and r.get("status") == "ok"}
    n.discard(0)
    if not n or n == {er_last}:
        return str(er_last)
    return str(min(n)) if len(n) == 1 else f"{min(n)}-{max(n)}"


def load_metrics(p: Plan) -> dict[str, dict[str, float]]:
    """Metrics of every run cell whose summary says ok."""
    out = {}
    for cid, cell in p.cells.items():
        rec = record(cell)
        if cell.kind != "figure" and rec and rec.get("status") == "ok":
            out[cid] = metrics(rec, p.er_last)
    return out


@dataclass(frozen=True)
class Column:
    metric: str                     # key of `metrics()`
    attack: str
    ratio: float | None
    better: str | None              # max | min | None (no best marked)

    def header(self) -> str:
        if self.metric in ("HR@10", "NDCG@10") or self.attack == ANY:
            return self.metric.replace(" last", "")
        return f"{self.metric.replace(' last', '')} {attack_name(self.attack, self.ratio)}"


ANY = "*"       # a column of every attack: the attack is the row
Values = dict[tuple[str, Column], list[float]]     # (row, column) -> the values over seeds


def attack_name(attack: str, ratio: float | None) -> str:
    return ATTACK_NAMES.get(attack, attack) + (f" {ratio * 100:g}%" if ratio is not None else "")


def std(xs) -> float:
    """Sample standard deviation over seeds (ddof 1); 0 for a single value."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def mean_std(xs: list[float], expected: int) -> str:
    text = f"{np.mean(xs):.4f} ± {std(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"
    return text + (f" (n={len(xs)})" if len(xs) < expected else "")


def clear_best(rows: list[str], c: Column, values: Values) -> set[str]:
    """The rows to mark in column c: those at the best mean (rounded as shown, ties included), when their lead
    over the next-best row is larger than the seed spread (the largest sample std among them and that row).
    A lead inside the spread, a column where every row ties, or a comparison in which the best or the next-best
    row has a single seed (no spread to weigh the lead against) marks nothing."""
    shown = {r: round(float(np.mean(values[r, c])), 4) for r in rows if values.get((r, c))}
    if not c.better or len(set(shown.values())) < 2:
        return set()
    pick = max if c.better == "max" else min
    best = pick(shown.values())
    winners = {r for r, m in shown.items() if m == best}
    runner_up = pick(m for r, m in shown.items() if r not in winners)
    compared = [values[r, c] for r, m in shown.items() if r in winners or m == runner_up]
    if any(len(xs) < 2 for xs in compared):
        return set()
    return winners if abs(best - runner_up) > max(std(xs) for xs in compared) else set()


SKIP_MARK = "‡"      # a number that comes, for at least one seed, from a run with skipped rounds
CLOSE_MARK = "?"     # a verdict within the seeds' spread of floor + margin (`Slice.close`)
WEAK_MARK = "↓"      # a cell whose model barely ranks the test items (`Slice.weak`)
SEED_MARK = "↑"      # a cell that holds on the mean but not on some seeds (`Slice.seeds_above`)
WEAK_SHARE = 0.5


def table(rows: list[str], cols: list[Column], values: Values, expected: int,
          first: str = "method", skipped: set[tuple[str, Column]] = frozenset()) -> str:
    """A markdown table of mean ± std; in each column the best mean is bold where it is ahead by more than the
    seed spread (`clear_best`). A (row, column) in `skipped` holds a run that skipped rounds: its number is marked
    SKIP_MARK and never bold (its model did not train for all the rounds asked)."""
    ok = {k: v for k, v in values.items() if k not in skipped}
    marked = {c: clear_best(rows, c, ok) for c in cols}
    lines = [f"| {first} | " + " | ".join(c.header() for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            xs = values.get((r, c))
            if not xs:
                cells.append("–")
                continue
            text = mean_std(xs, expected)
            cells.append(f"{text} {SKIP_MARK}" if (r, c) in skipped else f"**{text}**" if r in marked[c] else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(entries: list[Entry], got: dict[str, dict[str, float]], cols: list[Column],
            row_of: Callable[[Entry], str]) -> tuple[Values, set[tuple[str, Column]]]:
    """Each (row, column)'s values over the seeds, and the (row, column)s that hold a run with skipped rounds
    (marked SKIP_MARK in `table`). An entry fills the columns of its attack and ratio (or every ANY column)."""
    values: Values = defaultdict(list)
    skipped: set[tuple[str, Column]] = set()
    for e in entries:
        for c in cols:
            if (c.attack == ANY or (e.attack, e.ratio) == (c.attack, c.ratio)) and c.metric in got.get(e.cell, {}):
                values[row_of(e), c].append(got[e.cell][c.metric])
                if got[e.cell].get("skipped"):
                    skipped.add((row_of(e), c))
    return values, skipped


def grid_tables(entries: list[Entry], got: dict[str, dict[str, float]], er: str, first: str) -> str:
    """Rows = entries' rows; columns: clean HR@10, NDCG@10 (and ER@10 without attack, when a run tracked targets),
    ER@5/ER@10 per attack. A table of one row under several attacks is turned round: one attack per row
    (`attack_rows`)."""
    rows = list(dict.fromkeys(e.row for e in entries))
    attacks = list(dict.fromkeys((e.attack, e.ratio) for e in entries))
    if len(rows) == 1 and len(attacks) > 1:
        return attack_rows(entries, got, er, f"{rows[0]}: attack")
    cols: list[Column] = []
    for attack, ratio in attacks:
        if attack == "none":
            cols += [Column("HR@10", "none", None, "max"), Column("NDCG@10", "none", None, "max"),
                     Column(f"ER@10{er}", "none", None, None)]
        else:
            cols += [Column(f"ER@5{er}", attack, ratio, "min"), Column(f"ER@10{er}", attack, ratio, "min")]
    values, skipped = collect(entries, got, cols, lambda e: e.row)
    cols = [c for c in cols if c.attack != "none" or c.metric.startswith(("HR", "NDCG"))
            or any(values.get((r, c)) for r in rows)]
    return table(rows, cols, values, len({e.seed for e in entries}), first, skipped)


def attack_rows(entries: list[Entry], got: dict[str, dict[str, float]], er: str, first: str) -> str:
    """One row per attack (and ratio): test HR@10, NDCG@10, ER@5, ER@10 under it; no best marked (the
    rows are attacks, not rivals)."""
    cols = [Column(m, ANY, None, None) for m in ("HR@10", "NDCG@10", f"ER@5{er}", f"ER@10{er}")]
    values, skipped = collect(entries, got, cols, lambda e: attack_name(e.attack, e.ratio))
    rows = list(dict.fromkeys(attack_name(e.attack, e.ratio) for e in entries))
    return table(rows, cols, values, len({e.seed for e in entries}), first, skipped)


def without_floor_only(p: Plan, entries: list[Entry]) -> list[Entry]:
    """The main table's entries less the attacks that only the floor's method runs (random and popular in
    experiments/main-table.toml): those cells are the yardstick, shown in the floor's own section, not rivals
    in a column of dashes."""
    if p.floor is None:
        return entries
    only = {a for a in p.floor.attacks if all(e.row in p.floor.methods for e in entries if e.attack == a)}
    return [e for e in entries if e.attack not in only]


Trajectory = list[tuple[int, float]]       # one run's (round, ER@10) at each evaluation


def mean_trajectory(runs: list[Trajectory]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """The rounds every run evaluated, and at each the mean, lowest and highest ER@10 over the runs."""
    rounds = sorted(set.intersection(*(set(r for r, _ in run) for run in runs)))
    ys = np.array([[dict(run)[r] for r in rounds] for run in runs]).reshape(len(runs), len(rounds))
    return rounds, ys.mean(0), ys.min(0), ys.max(0)


def exposure_figure(series: dict[str, dict[str, list[Trajectory]]], floors: dict[str, float | None], margin: float,
                    er_last: int, title: str):
    """ER@10 over the rounds, one panel per attack (`series`: attack -> row -> one trajectory per seed), a line per
    row: the mean over its seeds, a band from the lowest to the highest seed; the floor of each floor method
    (dashed), floor + margin (dotted), and the last `er_last` evaluations (shaded: the window the verdict
    averages). Returns the matplotlib Figure."""
    from fortress.plots import pyplot
    plt = pyplot()
    cols = min(3, len(series))
    lines = -(-len(series) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.6 * cols, 3.4 * lines + 0.4), squeeze=False)
    rows = list(dict.fromkeys(row for by_row in series.values() for row in by_row))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax, (attack, by_row) in zip(axes.flat, series.items()):
        evals: set[int] = set()
        for row, runs in by_row.items():
            rounds, mean, lo, hi = mean_trajectory(runs)
            evals.update(rounds)
            colour = colours[rows.index(row) % len(colours)]
            ax.plot(rounds, mean, marker=".", color=colour, label=f"{row} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(rounds, lo, hi, color=colour, alpha=0.15, lw=0)
        known = [(m, x) for m, x in floors.items() if x is not None]
        for k, (m, x) in enumerate(known):
            grey = str(0.15 + 0.35 * k)
            name = f" ({m})" if len(known) > 1 else ""
            ax.axhline(x, ls="--", lw=1, color=grey, label=f"floor{name}")
            ax.axhline(x + margin, ls=":", lw=1, color=grey, label=f"floor + {margin:g}{name}")
        if len(evals) >= er_last:
            last = sorted(evals)[-er_last:]
            ax.axvspan(last[0], last[-1], color="0.5", alpha=0.1, lw=0, label=f"last {er_last} evaluations")
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("ER@10 (share of eligible test users)", fontsize=8)
        ax.set_ylim(0, 1.02)                                    # a share: every panel on the same scale
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return fig


def save_png(path: Path, fig, dpi: int) -> Path:
    """A report figure as a PNG, written atomically: runners sharing DIR may draw it at once."""
    from fortress.plots import pyplot, save
    os.replace(save(pyplot(), fig, path.with_name(f".{path.stem}.{os.getpid()}.png"), dpi), path)
    return path


@dataclass
class Slice:
    """One (dataset, ratio) of the main grid judged against the data-poisoning floor: its entries, the seed values
    of the floor attack that sets each floor method's floor (`floor_seeds`; None: not run yet), and the seed values
    of (row, attack, metric) that finished."""
    dataset: str
    ratio: float
    entries: list[Entry]
    floor_seeds: dict[str, list[float] | None]
    values: dict[tuple[str, str, str], list[float]]
    clean_hr: dict[str, float | None] = field(default_factory=dict)   # per floor method: its clean test HR@10 (mean)

    @property
    def floors(self) -> dict[str, float | None]:
        """Each floor method's floor: the seed mean of the attack that sets it."""
        return {m: None if xs is None else float(np.mean(xs)) for m, xs in self.floor_seeds.items()}

    def sides(self, f: Floor, row: str, attack: str) -> tuple[list[float], list[float]] | None:
        """The seed values of the floor attack that sets the row's floor and of the row under the attack (last-
        evaluation ER@10); None without a floor or a finished seed."""
        floor, last = self.floor_seeds[f.method_of(row)], self.values.get((row, attack, "ER@10 last"))
        return None if floor is None or not last else (floor, last)

    def holds(self, f: Floor, row: str, attack: str) -> bool | None:
        """Whether the row's mean last-evaluation ER@10 under the attack is within its floor + margin; None
        without a floor or a finished seed."""
        if (both := self.sides(f, row, attack)) is None:
            return None
        floor, last = both
        return bool(np.mean(last) <= np.mean(floor) + f.margin)

    def close(self, f: Floor, row: str, attack: str) -> bool:
        """Whether the verdict lies within the seeds' spread: the row's mean is no farther from floor + margin than
        the larger sample std over seeds of the row's cell and of the floor attack that sets the floor (a one-seed
        cell brings no std of its own), so more seeds may flip it."""
        if (both := self.sides(f, row, attack)) is None:
            return False
        floor, last = both
        return bool(abs(np.mean(last) - (np.mean(floor) + f.margin)) <= max(std(last), std(floor)))

    def seeds_above(self, f: Floor, row: str, attack: str) -> str:
        """SEED_MARK with "k/n" where the row holds on the mean over seeds but k of its n seeds' ER@10 lie above
        the highest seed of the floor attack + margin (no seed of honest fake users got that far: the attack wins
        on those seeds, e.g. 0.000 and 0.981 hold on their mean of 0.490 against a floor of 0.59); "" else."""
        if not self.holds(f, row, attack):
            return ""
        floor, last = self.sides(f, row, attack)
        k = sum(x > max(floor) + f.margin for x in last)
        return f"{SEED_MARK}{k}/{len(last)}" if k else ""

    def weak(self, f: Floor, row: str, attack: str) -> str:
        """How the cell's model ranks the test items against the clean test HR@10 of the floor method that the row
        is held to (on the same dataset): WEAK_MARK where its seed mean test HR@10 is under WEAK_SHARE of it (its low
        ER then shows no defence: a model that promotes nothing also leaves the target out); WEAK_MARK with "k/n"
        where the mean is not but k of its n seeds are (a diverged seed whose ER sits in the row's mean); "" else."""
        hr, ref = self.values.get((row, attack, "HR@10")), self.clean_hr.get(f.method_of(row))
        if not hr or ref is None:
            return ""
        if float(np.mean(hr)) < WEAK_SHARE * ref:
            return WEAK_MARK
        k = sum(x < WEAK_SHARE * ref for x in hr)
        return f"{WEAK_MARK}{k}/{len(hr)}" if k else ""

    def verdict(self, f: Floor, row: str, attack: str, yes: str, no: str) -> str:
        """The verdict as text (yes / no), CLOSE_MARK appended where it is within the seeds' spread, SEED_MARK where
        it holds on the mean but not on some seeds (`seeds_above`) and WEAK_MARK where the model barely ranks the
        test items (`weak`); "" without one."""
        held = self.holds(f, row, attack)
        if held is None:
            return ""
        return ((yes if held else no) + (CLOSE_MARK if self.close(f, row, attack) else "")
                + "".join(f" {mark}" for mark in (self.seeds_above(f, row, attack), self.weak(f, row, attack)) if mark))


def floor_seeds(f: Floor, values: dict[tuple[str, str, str], list[float]]) -> dict[str, list[float] | None]:
    """Per floor method, the seed values of the floor attack with the larger mean last-evaluation ER@10 (the one
    that sets its floor); None where none has finished."""
    out: dict[str, list[float] | None] = {}
    for m in f.methods:
        runs = [xs for a in f.attacks if (xs := values.get((m, a, "ER@10 last")))]
        out[m] = max(runs, key=np.mean) if runs else None
    return out


def judged(p: Plan, got: dict[str, dict[str, float]]) -> list[Slice]:
    """The attacked cells of the main grid, per dataset and ratio, with the floors they are held to: the larger
    mean ER@10 of the last evaluations (over seeds) of each floor method under the floor attacks."""
    f = p.floor
    entries = [e for e in p.entries if e.section == "main" and e.attack != "none"]
    out = []
    for ds in dict.fromkeys(e.dataset for e in entries):
        for ratio in dict.fromkeys(e.ratio for e in entries if e.dataset == ds):
            es = [e for e in entries if e.dataset == ds and e.ratio == ratio]
            values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
            for e in es:
                for metric, x in got.get(e.cell, {}).items():
                    values[e.row, e.attack, metric].append(x)
            clean = {m: [got[e.cell]["HR@10"] for e in p.entries if e.section == "main" and e.attack == "none"
                         and e.dataset == ds and e.row == m and "HR@10" in got.get(e.cell, {})] for m in f.methods}
            out.append(Slice(ds, ratio, es, floor_seeds(f, values), dict(values),
                             {m: float(np.mean(xs)) if xs else None for m, xs in clean.items()}))
    return out


def glance(p: Plan, slices: list[Slice]) -> list[str]:
    """The verdicts at a glance: per floor method (backbone), a line per dataset, ratio and attacked row held to
    that floor (rows with a finished cell there), its ER@10 under each attack with the verdict, the floor attacks'
    ER@10 on the first line of the dataset and ratio (the tables the README quotes). A blank cell: an attack the
    spec does not run on that row; "–": not run yet."""
    f = p.floor

    def short(xs: list[float] | None) -> str:
        if not xs:
            return "–"
        return f"{np.mean(xs):.3f}" + (f" ± {std(xs):.3f}" if len(xs) > 1 else "") + f" ({len(xs)})"

    def last(s: Slice, row: str, attack: str) -> list[float] | None:
        return s.values.get((row, attack, "ER@10 last"))

    lines = ["### At a glance", "",
             "ER@10 as the mean of the last evaluations, mean ± std over seeds (in brackets: how many); each attacked "
             f"cell holds (within floor + {f.margin:g}) or **fails**, marked {CLOSE_MARK} where its distance to "
             f"floor + {f.margin:g} is within the seeds' spread (the larger std over seeds of the cell and of the "
             "floor; a one-seed cell has none of its own), so more seeds may flip it, marked "
             f"{SEED_MARK}k/n where it holds on the mean but k of its n seeds lie above the floor attack's highest "
             f"seed + {f.margin:g} (the attack wins on those seeds), and marked {WEAK_MARK} where its model barely "
             f"ranks the test items (mean test HR@10 under {WEAK_SHARE:g} x the "
             f"clean floor row's on that dataset: its low ER shows no defence; {WEAK_MARK}k/n where only k of its n "
             "seeds' models do, whose ER still counts in the mean); a blank: not in the spec; –: "
             "not run yet.", ""]
    for m in f.methods:
        planned = {(e.row, e.attack) for s in slices for e in s.entries if f.method_of(e.row) == m
                   and not (e.row in f.methods and e.attack in f.attacks)}
        done = [(e.row, e.attack) for s in slices for e in s.entries if (e.row, e.attack) in planned
                and last(s, e.row, e.attack)]
        ran = {a for _, a in done}
        attacks = [a for a in dict.fromkeys(e.attack for e in p.entries) if a in ran]   # in the spec's order
        rows = list(dict.fromkeys(r for r, _ in done))
        out = []
        for s in slices:
            shown = [r for r in rows if any(last(s, r, a) for a in attacks)]
            if not shown and s.floors[m] is None:
                continue
            floor = " / ".join(short(last(s, m, a)) + (f" {mark}" if (mark := s.weak(f, m, a)) else "")
                               for a in f.attacks)
            if not shown:                                   # the floor alone so far
                out.append(f"| {s.dataset}, {s.ratio * 100:g}% | {floor} | – | " + " | ".join("–" for _ in attacks) + " |")
            for k, row in enumerate(shown):
                cells = []
                for a in attacks:
                    if (row, a) not in planned:
                        cells.append("")
                        continue
                    verdict = s.verdict(f, row, a, "holds", "**fails**")
                    cells.append(short(last(s, row, a)) + (f" {verdict}" if verdict else ""))
                lead = f"{s.dataset}, {s.ratio * 100:g}% | {floor}" if k == 0 else " | "
                out.append(f"| {lead} | {row} | " + " | ".join(cells) + " |")
        if not out:
            continue
        names = " / ".join(attack_name(a, None) for a in f.attacks)
        lines += [f"Held to {m}:", "",
                  f"| dataset, attackers | floor: {names} | row | " + " | ".join(attack_name(a, None) for a in attacks)
                  + " |", "|---|---|---|" + "---|" * len(attacks)] + out + [""]
    return lines


def floor_tables(p: Plan, got: dict[str, dict[str, float]], recs: dict[str, dict | None]) -> list[str]:
    """The verdict of every attacked cell of the main grid against the data-poisoning floor ([floor] of the spec):
    at a glance (`glance`), then per dataset and ratio with what the defence's round logs say
    (`runner.defence_digest`) and a figure of ER@10 over the rounds (DIR/figures/exposure-DATASET-Rpct.png, drawn
    from the summaries' evaluations)."""
    f = p.floor
    slices = judged(p, got)
    names = " and ".join(attack_name(a, None) for a in f.attacks)
    each = "" if len(f.methods) == 1 else " (each row against the floor method of its backbone)"
    floor_rows = " / ".join(f"`{m}`" for m in f.methods) + (" rows" if len(f.methods) > 1 else " row")
    floor_n = window(p.er_last, (recs[e.cell] for e in p.entries if e.section == "main"))
    lines = ["## Against the data-poisoning floor", "",
             f"The floor is the larger mean ER@10 (of the last {floor_n} evaluations, over seeds) of "
             f"the {floor_rows} under {names}{each}: fake users who train honestly on sequences that hold the "
             f"target. An attacked cell holds when its mean is within floor + {f.margin:g} ({CLOSE_MARK}: within the "
             f"seeds' spread of it; {SEED_MARK}k/n: it holds on the mean, but k of its n seeds lie above the "
             f"floor attack's highest seed + {f.margin:g}; {WEAK_MARK}: its model barely ranks the test items, "
             "mean test HR@10 under "
             f"{WEAK_SHARE:g} x that of the clean floor row on the dataset, so its low ER is no defence; "
             f"{WEAK_MARK}k/n: k of its n seeds' models do). Target "
             "flagged: the share of the rounds in which the defence flagged a target; "
             "weight kept: the mean share of their FedAvg contribution (reported weight × update) "
             "kept by benign / short benign (≤ 5 interactions) / malicious clients; – without a defence.", ""]
    lines += glance(p, slices)

    def figure(s: Slice) -> list[str]:
        """The slice's ER@10 over the rounds, from the summaries' evaluations (`exposure_figure`)."""
        series: dict[str, dict[str, list[Trajectory]]] = defaultdict(lambda: defaultdict(list))
        for e in s.entries:
            history = ((recs.get(e.cell) or {}).get("attack") or {}).get("history") or []
            run = [(int(h["round"]), float(h["ER@10"])) for h in history if "ER@10" in h]
            if run and e.cell in got:
                series[attack_name(e.attack, None)][e.row].append(run)
        if not series:
            return []
        ds, ratio = s.dataset, s.ratio
        png = p.root / "figures" / f"exposure-{ds}-{ratio * 100:g}pct.png"
        title = (f"ER@10 over the rounds on {ds}, attackers {ratio * 100:g}% of the clients (mean over seeds, band: "
                 "lowest to highest seed)")
        save_png(png, exposure_figure(series, s.floors, f.margin, p.er_last, title), 110)
        return [f"![ER@10 over the rounds on {ds} at {ratio * 100:g}%]({png.relative_to(p.root)})", ""]

    for s in slices:
        seeds = len({e.seed for e in s.entries})
        shown = ", ".join((f"{x:.4f}" if x is not None else "not run yet")
                          + (f" ({m})" if len(f.methods) > 1 else "") for m, x in s.floors.items())
        lines += [f"### {s.dataset}, {s.ratio * 100:g}%: floor {shown}", ""] + figure(s) + [
                  "| method | attack | ER@10 final | ER@10, mean of last evals | ≤ floor + "
                  f"{f.margin:g} | test HR@10 | target flagged | weight kept |", "|---|---|---:|---:|---|---:|---:|---|"]
        for row, attack in dict.fromkeys((e.row, e.attack) for e in s.entries):
            last = s.values.get((row, attack, "ER@10 last"))
            if not last:
                lines.append(f"| {row} | {attack_name(attack, None)} | – | – | | – | | |")
                continue
            ok = s.verdict(f, row, attack, "yes", "**no**")
            if s.values.get((row, attack, "skipped")):
                ok += f" {SKIP_MARK}"
            digests = [d for e in s.entries if e.row == row and e.attack == attack
                       and (d := (recs.get(e.cell) or {}).get("defence"))]
            shares = [d["rounds_target_flagged"] / d["rounds"] for d in digests if d.get("rounds_target_flagged") is not None]
            flagged = f"{100 * np.mean(shares):.1f}%" if shares else "–"
            kept = " / ".join("–" if not (xs := [d[k] for d in digests if d.get(k) is not None])
                              else f"{np.mean(xs):.3f}" for k in ("weight_benign", "weight_short", "weight_malicious"))
            lines.append(f"| {row} | {attack_name(attack, None)} | {mean_std(s.values[row, attack, 'ER@10'], seeds)} | "
                         f"{mean_std(last, seeds)} | {ok} | {mean_std(s.values[row, attack, 'HR@10'], seeds)} | "
                         f"{flagged} | {kept if digests else '–'} |")
        lines.append("")
    return lines


def stratified(cell, rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run cell's test metrics with their `strata`: from its summary (a run that wrote them), else from the
    strata.json `fortress eval` left in its folder; None when neither has them."""
    test = (rec or {}).get("test") or {}
    if test.get("strata"):
        return test
    try:
        test = json.loads((cell.folder / STRATA).read_text())["test"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return test if isinstance(test, dict) and test.get("strata") else None


def stratum_name(name: str, stratum: str) -> str:
    return f"history {stratum}" if name == "history" else stratum


def strata_tables(entries: list[Entry], got: dict[str, dict[str, Any]], first: str) -> list[str]:
    """Per dataset, test HR@10 and NDCG@10 of the clean runs overall and per stratum (mean ± std over seeds,
    users per stratum in the header), and the cut points; runs without strata are left out."""
    lines: list[str] = []
    clean = [e for e in entries if e.attack == "none" and e.cell in got]
    for ds in dict.fromkeys(e.dataset for e in clean):
        es = [e for e in clean if e.dataset == ds]
        rows = list(dict.fromkeys(e.row for e in es))
        seeds = len({e.seed for e in entries if e.dataset == ds})
        groups = list(dict.fromkeys((name, s) for e in es for name, st in got[e.cell]["strata"].items()
                                    for s in st["groups"]))
        users: dict[tuple[str, str], set[int]] = defaultdict(set)
        for e in es:
            users["all", ""].add(int(got[e.cell]["users"]))
            for name, s in groups:
                g = got[e.cell]["strata"].get(name, {}).get("groups", {}).get(s)
                if g:
                    users[name, s].add(int(g["users"]))

        def n(key: tuple[str, str]) -> str:
            return "/".join(f"{u:,}" for u in sorted(users[key]))
        for metric in ("HR@10", "NDCG@10"):
            cols = {key: Column(f"{stratum_name(*key) if key[0] != 'all' else 'all'} ({n(key)} users)", ANY, None, "max")
                    for key in [("all", ""), *groups]}
            values: Values = defaultdict(list)
            for e in es:
                res = got[e.cell]
                values[e.row, cols["all", ""]].append(float(res[metric]))
                for name, s in groups:
                    g = res["strata"].get(name, {}).get("groups", {}).get(s)
                    if g:
                        values[e.row, cols[name, s]].append(float(g[metric]))
            lines += [f"### {ds}: test {metric} by stratum", "", table(rows, list(cols.values()), values, seeds, first),
                      ""]
        stratas = [got[e.cell]["strata"] for e in es]
        cuts = sorted({(st["popularity"]["cold_max"], st["popularity"]["popular_min"], st["popularity"]["head_share"])
                       for st in stratas if "popularity" in st})
        lines += ["History: the user's train interactions. Popularity: the test item's train interactions; cold and "
                  "popular are the least and the most popular items that together hold a share of them ("
                  + "; ".join(f"{share:.0%}: cold <= {lo}, popular >= {hi}" for lo, hi, share in cuts) + ").", ""]
    return lines


def sensitivity_figure(key: str, values: list[str], series: dict[str, list[list[float]]], attack: str | None,
                       title: str):
    """Clean HR@10 / NDCG@10 over the swept values and, with an attack, its ER@10: every seed as a dot,
    their mean with error bars of one sample std (one seed: no bar). Returns the matplotlib Figure."""
    from fortress.plots import pyplot
    plt = pyplot()
    panels = [("clean accuracy (no attack)", "test HR@10 / NDCG@10 (share of test users)", ["HR@10", "NDCG@10"])]
    if attack:
        panels.append((f"target exposure under {attack}", "ER@10 (share of eligible test users)",
                       ["ER@10", "ER@10 last"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    x = np.arange(len(values))
    for ax, (panel, ylabel, names) in zip(axes[0], panels):
        seed_label = "each seed"                                # in the legend once per panel
        for j, name in enumerate(names):
            label = name.replace(" last", ", mean of last evaluations") + (" (final)" if name.startswith("ER") and
                                                                             "last" not in name else "")
            pts = [(i, np.mean(v), std(v)) for i, v in enumerate(series[name]) if v]
            if not pts:
                continue
            shift = (j - (len(names) - 1) / 2) * 0.08          # side by side, so the bars do not overlap
            i, m, s = map(np.array, zip(*pts))
            line = ax.errorbar(x[i.astype(int)] + shift, m, yerr=np.nan_to_num(s), marker="o", capsize=3,
                               label=f"{label}, mean ± std")
            for k, v in enumerate(series[name]):
                if v:
                    ax.scatter(np.full(len(v), x[k] + shift), v, s=12, alpha=0.45, color=line[0].get_color(),
                               label=seed_label)
                    seed_label = None
        ax.set_xticks(x, values)
        ax.set_xlabel(KEY_NAMES.get(key, key) + " (swept value)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel, fontsize=10)
        ax.set_ylim(bottom=0)                                   # shares: never below 0
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def sensitivity_plot(path: Path, key: str, values: list[str], series: dict[str, list[list[float]]],
                     attack: str | None, title: str = "") -> Path:
    """The sensitivity figure as a PNG (`save_png`)."""
    return save_png(path, sensitivity_figure(key, values, series, attack,
                                             title or f"Sensitivity to {KEY_NAMES.get(key, key)}"), 120)


def sensitivity(entries: list[Entry], got: dict[str, dict[str, float]], root: Path) -> list[str]:
    """A PNG and a table per (dataset, swept key)."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.dataset, e.row].append(e)
    for (ds, key), es in groups.items():
        values = list(dict.fromkeys(e.value for e in es))
        attacked = next((e for e in es if e.attack != "none"), None)
        att = attacked and attack_name(attacked.attack, attacked.ratio)
        names = ["HR@10", "NDCG@10"] + (["ER@10", "ER@10 last"] if att else [])
        series: dict[str, list[list[float]]] = {n: [[] for _ in values] for n in names}
        for e in es:
            m = got.get(e.cell, {})
            for n in ("HR@10", "NDCG@10") if e.attack == "none" else ("ER@10", "ER@10 last"):
                if n in m and n in series:
                    series[n][values.index(e.value)].append(m[n])
        png = root / "figures" / f"sensitivity-{ds}-{key}.png"
        n_seeds = len({e.seed for e in es})
        sensitivity_plot(png, key, values, series, att,
                         f"Sensitivity to {KEY_NAMES.get(key, key)} on {ds} ({n_seeds} seed{'s' * (n_seeds != 1)})")
        heads = ["HR@10", "NDCG@10"] + ([f"ER@10 {att}", f"ER@10 {att} (mean of last evaluations)"] if att else [])
        lines += [f"### {KEY_NAMES.get(key, key)} on {ds}", "", f"![sensitivity to {key}]({png.relative_to(root)})", "",
                  f"| {key} | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
        seeds = len({e.seed for e in es})
        for i, v in enumerate(values):
            lines.append(f"| {v} | " + " | ".join(mean_std(series[n][i], seeds) if series[n][i] else "–"
                                                  for n in names) + " |")
        lines.append("")
    return lines


def coverage(entries: list[Entry], recs: dict[str, dict | None]) -> list[str]:
    """Per dataset, the seeds finished (status ok) of each main-grid (method, attack, ratio), as `k/n`; – where the
    method does not run that attack. What is missing at a glance, beside the list of cell ids."""
    lines: list[str] = []
    for ds in dict.fromkeys(e.dataset for e in entries):
        es = [e for e in entries if e.dataset == ds]
        rows = list(dict.fromkeys(e.row for e in es))
        cols = list(dict.fromkeys((e.attack, e.ratio) for e in es))
        done: dict[tuple, list[bool]] = defaultdict(list)
        for e in es:
            done[e.row, e.attack, e.ratio].append((recs.get(e.cell) or {}).get("status") == "ok")
        lines += [f"### {ds}", "", "| method | " + " | ".join(attack_name(a, r) for a, r in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for row in rows:
            marks = [f"{sum(xs)}/{len(xs)}" if (xs := done.get((row, a, r))) else "–" for a, r in cols]
            lines.append(f"| {row} | " + " | ".join(marks) + " |")
        lines.append("")
    return lines


def cost(p: Plan, recs: dict[str, dict | None], missing: list[str]) -> str:
    """What the missing cells may cost: each at the mean wall time of the finished cells most like it, the first
    of these that has one: the same kind of cell (pretrain, run, figure) and dataset, method, attack and ratio; and
    dataset, method and attack; dataset and method; dataset, attack and ratio; dataset; kind alone (a cell outside
    the tables: its kind). Empty when a missing cell has none at all."""
    first: dict[str, Entry] = {}
    for e in p.entries:
        first.setdefault(e.cell, e)

    def likes(cid: str) -> list[tuple]:
        kind, e = p.cells[cid].kind, first.get(cid)
        if e is None:
            return [(kind,)]
        return [(kind, e.dataset, e.row, e.attack, e.ratio), (kind, e.dataset, e.row, e.attack),
                (kind, e.dataset, e.row), (kind, e.dataset, "*", e.attack, e.ratio), (kind, e.dataset), (kind,)]

    done: dict[tuple, list[float]] = defaultdict(list)
    for cid, r in recs.items():
        if r and r.get("status") == "ok" and "seconds" in r:
            for key in likes(cid):
                done[key].append(float(r["seconds"]))
    hours: dict[str, float] = defaultdict(float)        # per dataset ('' outside the tables)
    for cid in missing:
        seconds = next((float(np.mean(done[k])) for k in likes(cid) if done.get(k)), None)
        if seconds is None:
            return ""
        hours[first[cid].dataset if cid in first else ""] += seconds / 3600
    split = [f"{ds} {h:.2g}" for ds, h in hours.items() if ds]
    return (f" At the mean wall time of the finished cells most like each (same dataset, method, attack and ratio where "
            f"one has finished; `cost` in report.py) they take about {sum(hours.values()):.2g} cell-hours"
            + (f" ({', '.join(split)})" if len(split) > 1 else "") + ".")


def mixed_starts(p: Plan, recs: dict[str, dict | None]) -> list[str]:
    """Pretrained cells whose followers started from more than one model, by the weights' fingerprints their
    summaries record (`model`, `start`; summaries written before them have none). A pretrain run again where its
    model.pt was not at hand (another machine or shard, a fresh clone) is the same command but, on another CPU,
    not the same model; the numbers of its followers then come from different starting points."""
    followers: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))  # pretrain -> start -> ids
    for cid, c in p.cells.items():
        if len(c.after) == 1 and (rec := recs[cid] or {}).get("status") == "ok" and rec.get("start"):
            followers[c.after[0]][rec["start"]].append(cid)
    lines = []
    for pid, starts in followers.items():
        pre, own = p.cells[pid], (recs[pid] or {}).get("model")
        if len(starts) > 1 or (own and set(starts) != {own}):
            mark = {own: " (the pretrained cell's)"}
            by = "; ".join(f"from `{fp}`{mark.get(fp, '')}: {len(cs)} ({', '.join(f'`{c}`' for c in cs)})"
                           for fp, cs in starts.items())
            lines.append(f"- `{pid}` ({_esc(pre.labels[0])}; its summary: model `{own or 'not recorded'}`): {by}")
    if not lines:
        return []
    return ["## Cells that started from different models", "",
            "These cells continue the same pretrained cell, but not the same model: it was run more than once (on "
            "machines whose CPUs sum floats in another order, the same command ends in other weights), so their "
            "numbers mix starting points. Run them again from one copy of it (delete the followers' folders and keep "
            "the pretrained cell's model.pt) before comparing them.", ""] + lines + [""]


def _esc(text: str) -> str:
    return text.replace("|", "\\|")


def write(p: Plan) -> Path:
    """Write DIR/report.md (and the sensitivity PNGs) from whatever cells have finished."""
    got = load_metrics(p)
    recs = {cid: record(c) for cid, c in p.cells.items()}
    last_n = window(p.er_last, (recs[e.cell] for e in p.entries))
    status = defaultdict(int)
    for cid in p.cells:
        status[(recs[cid] or {}).get("status", "not run")] += 1
    lines = ["# Experiment report", "",
             f"Spec: [`{SPEC_COPY}`]({SPEC_COPY}) (a copy of the spec file that ran); `fortress report DIR` rebuilds "
             "this page from it and the cells' summaries (`cells/ID/summary.json`).", "",
             f"{len(p.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + ". "
             "Test split; mean ± sample std over seeds (one seed: its value alone; `(n=k)`: only k seeds finished); "
             f"bold = best in its column (highest HR/NDCG, lowest ER under attack), marked only where its lead over the "
             f"next row is larger than the seed spread (the largest sample std of the rows compared), never where either "
             f"has a single seed. "
             f"ER@K is given twice: "
             f"the final value, and the mean of the last {last_n} evaluations (ER swings from round to round). "
             "Every cell's command is listed at the end.", ""]
    by_section: dict[str, list[Entry]] = defaultdict(list)
    for e in p.entries:
        by_section[e.section].append(e)
    for title, section, first in (("Main table", "main", "method"), ("Ablation", "ablation", "variant")):
        entries = by_section.get(section, [])
        if not entries:
            continue
        if section == "main":
            entries = without_floor_only(p, entries)
        lines += [f"## {title}", ""]
        for ds in dict.fromkeys(e.dataset for e in entries):
            es = [e for e in entries if e.dataset == ds]
            final = grid_tables(es, got, "", first)
            if "ER@" not in final.splitlines()[0]:       # no attack and no tracked targets: one table
                lines += [f"### {ds}", "", final, ""]
                continue
            n = window(p.er_last, (recs[e.cell] for e in es))
            lines += [f"### {ds}: final ER", "", final, "",
                      f"### {ds}: ER as the mean of the last {n} evaluations", "",
                      grid_tables(es, got, " last", first), ""]
    if p.floor is not None:
        lines += floor_tables(p, got, recs)
    strata = {cid: t for cid, c in p.cells.items() if c.kind != "figure" and (t := stratified(c, recs[cid]))}
    for title, section, first in (("Main table by stratum", "main", "method"), ("Ablation by stratum", "ablation",
                                                                                 "variant")):
        tables = strata_tables(by_section.get(section, []), strata, first)
        if tables:
            lines += [f"## {title}", "", "Clean runs (no attack), test split; each column header gives the users in the stratum.", ""] + tables
    if by_section.get("sensitivity"):
        lines += ["## Sensitivity", ""] + sensitivity(by_section["sensitivity"], got, p.root)
    if p.figures:
        lines += ["## Figures", ""]
        for name, cid in p.figures.items():
            cell, rec = p.cells[cid], recs[cid] or {}
            if rec.get("status") == "ok" and cell.out.exists():
                lines += [f"### {name}", "", f"![{name}]({cell.out.relative_to(p.root)})", "", f"`{cell.command()}`", ""]
            else:
                lines += [f"### {name}", "", f"not made: {rec.get('error') or rec.get('status', 'not run yet')}", ""]
    skips = [(cid, r) for cid, r in recs.items() if r and r.get("status") == "ok" and r.get("rounds_skipped")]
    if skips:
        lines += ["## Runs with skipped rounds", "",
                  f"A number marked {SKIP_MARK} comes, for at least one seed, from a run in which some rounds were skipped "
                  "(fewer clients than `min_answered` sent a valid update: the others' were rejected as NaN/Inf, "
                  "too large or misshapen, or dropped), so its model trained for fewer rounds than asked; the round log "
                  "(results.json, `history`) says why.", ""]
        lines += [f"- `{cid}` ({_esc('; '.join(p.cells[cid].labels[:2]))}): {r['rounds_skipped']} of "
                  f"{r.get('rounds_run', '?')} rounds skipped, {r.get('rejected', 0):,} uploads rejected"
                  for cid, r in skips] + [""]
    lines += mixed_starts(p, recs)
    failed = [(cid, recs[cid]) for cid in p.cells if (recs[cid] or {}).get("status") == "failed"]
    if failed:
        lines += ["## Failed cells", ""] + [f"- `{cid}` ({'; '.join(p.cells[cid].labels[:2])}): {_esc(r.get('error') or '')}"
                                            for cid, r in failed] + [""]
    missing = [cid for cid in p.cells if recs[cid] is None]
    if missing:
        lines += ["## Missing cells", "", f"{len(missing)} of {len(p.cells)} cells have not run yet (or not here): "
                  + ", ".join(f"`{cid}`" for cid in missing) + ". Their commands are in the list below."
                  + cost(p, recs, missing), ""]
        if by_section.get("main"):
            lines += ["Seeds finished of each cell of the main table (`k/n`; – where the method does not run the "
                      "attack):", ""] + coverage(by_section["main"], recs)
    lines += ["## Cells", "",
              "Each cell is one command, run from the folder where `fortress experiment` ran, with DIR its `--out` "
              "folder; a cell that starts from a pretrained model (`init_from`) needs that cell's command run first. "
              "Wall time in seconds; with early stopping, the best round (epoch) whose model was tested, of those run.", "",
              "| cell | for | status | wall s | best of run | command |", "|---|---|---|---:|---:|---|"]
    for cid, cell in p.cells.items():
        rec = recs[cid] or {}
        what = "; ".join(cell.labels[:3]) + (f"; +{len(cell.labels) - 3} more" if len(cell.labels) > 3 else "")
        secs = f"{rec['seconds']:.1f}" if "seconds" in rec else "–"
        status = rec.get("status", "not run") + (f", {rec['rounds_skipped']} rounds skipped {SKIP_MARK}"
                                                 if rec.get("rounds_skipped") else "")
        lines.append(f"| `{cid}` | {_esc(what)} | {status} | {secs} | {stopped(rec)} | "
                     f"`{_esc(cell.command())}` |")
    path = p.root / "report.md"
    p.root.mkdir(parents=True, exist_ok=True)
    write_text(path, "\n".join(lines) + "\n")
    return path


def stopped(rec: dict) -> str:
    """'best / run' of a cell that ran with early stopping (rounds or epochs), else '–'."""
    es = rec.get("early_stopping") or {}
    for unit in ("round", "epoch"):
        if f"best_{unit}" in es:
            return f"{es[f'best_{unit}']} / {es[f'{unit}s_run']}"
    return "–"


def rebuild(root: Path) -> Plan:
    """The plan of an experiment folder, from its copy of the spec (the datasets need not be here)."""
    spec = root / SPEC_COPY
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; expected the --out folder of `fortress experiment`")
    if not spec.is_file():
        raise InputError(f"{root}: no {SPEC_COPY}; expected the --out folder of `fortress experiment` "
                         "(which keeps a copy of its spec there) or one made by `fortress report --publish`")
    return load(spec, root, check_data=False)


def publish(p: Plan, dest: Path) -> Plan:
    """Copy the spec, the cells' summaries (and strata.json) and the figures' PNGs (no models, no logs) to `dest`,
    which may already hold cells of the same spec from other machines; returns the plan of `dest`."""
    if (dest / SPEC_COPY).is_file() and (dest / SPEC_COPY).read_text() != p.text:
        raise InputError(f"--publish {dest}: holds the cells of another spec ({dest / SPEC_COPY} differs from "
                         f"{p.spec}); publish to a new folder")
    try:
        (dest / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--publish {dest}: cannot create the folder ({err.strerror or type(err).__name__})") from None
    (dest / SPEC_COPY).write_text(p.text or "")
    for cid, cell in p.cells.items():
        if record(cell) is None:
            continue
        (dest / "cells" / cid).mkdir(exist_ok=True)
        shutil.copyfile(cell.folder / SUMMARY, dest / "cells" / cid / SUMMARY)
        if (cell.folder / STRATA).is_file():            # `fortress eval` of a cell that ran before strata
            shutil.copyfile(cell.folder / STRATA, dest / "cells" / cid / STRATA)
        if cell.kind == "figure" and cell.out.exists():
            (dest / "figures").mkdir(exist_ok=True)
            shutil.copyfile(cell.out, dest / cell.out.relative_to(p.root))
    return rebuild(dest)
