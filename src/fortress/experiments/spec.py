"""A spec file -> cells: parse and check every field, expand the grid, give each cell its id.

A spec (see `experiments/smoke.toml`) names datasets, methods (each a table of config keys, i.e.
`--set` overrides), attacks x attack ratios x seeds, and optional ablation variants, sensitivity
sweeps and figures. It expands to *cells*; each cell is one `fortress` command:

  pretrain  a clean model that runs start from (`init_from`), shared by every attack of a method (a method that
            sets `init_from` itself, e.g. "" for a protocol that trains from scratch, starts from that instead)
  run       `fortress run` of one (dataset, method [+ variant or swept value], attack, ratio, seed)
  figure    a `fortress plot ...` command over the folders of some runs

A cell's id is a hash of what it computes (its data and the config keys that differ from the
defaults, `id_defaults`, and the cell it starts from), so a run needed by several tables runs once, a changed
spec re-runs only the cells whose settings changed, and the ids do not depend on the folder.
"""
from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fortress import config
from fortress.config import Config
from fortress.errors import InputError

# the defaults cell ids are taken against: a key added later, or a default changed later, counts at its old
# value in the cells it acts on, so a cell computed before keeps its id and one computed with the new default gets
# a new one; cells it does not act on are unaffected. whole_history (every run; runs before it trained on the
# last window only), fedcl_lambda (objective fedcl; 1 until 2026-12-03, now 0.1)
ID_PINS: dict[str, tuple[Any, Callable[[Config], bool]]] = {
    "whole_history": (False, lambda cfg: True),
    "fedcl_lambda": (1.0, lambda cfg: cfg.objective == "fedcl"),
}


def id_defaults(cfg: Config) -> dict[str, Any]:
    """The config a cell's id lists its differences from: today's defaults, with the pinned keys of ID_PINS at
    their old values where they act on this cell."""
    base = config.to_dict(Config())
    base.update({k: old for k, (old, acts) in ID_PINS.items() if acts(cfg)})
    return base


SECTIONS = ("grid", "set", "datasets", "methods", "pretrain", "floor", "ablation", "sensitivity", "figures")
GRID_FIELDS = ("seeds", "attacks", "attack_ratios", "er_last")
ABLATION_FIELDS = ("method", "variants", "attacks", "attack_ratio", "datasets", "seeds")
SENSITIVITY_FIELDS = ("method", "sweeps", "attack", "attack_ratio", "datasets", "seeds")
FLOOR_FIELDS = ("method", "attacks", "margin")
FIGURE_FIELDS = ("name", "command", "args", "runs")
REF_FIELDS = ("method", "set", "attack", "attack_ratio", "dataset", "seed")


@dataclass
class Cell:
    """One command of the grid and where its output goes."""

    id: str
    kind: str                       # pretrain | run | figure
    argv: list[str]                 # arguments after `fortress` (--out included)
    out: Path                       # what it makes: the run folder (results.json inside) or a PNG
    folder: Path                    # DIR/cells/ID: log.txt, summary.json (for runs, also their output)
    root: Path                      # DIR, the experiment's folder
    after: list[str] = field(default_factory=list)   # cells that must have finished first
    labels: list[str] = field(default_factory=list)  # what it is for (a shared cell has several)
    need: tuple[str, ...] = ()      # figure: the `fortress` subcommand it calls

    def made(self) -> Path:
        return self.out / "results.json" if self.kind != "figure" else self.out

    def command(self) -> str:
        """The standalone command that reproduces this cell (run its `after` cells first), with the
        experiment's folder written DIR, so that it reads the same wherever the cells live."""
        prefix = f"{self.root}/"
        return "fortress " + shlex.join(a.replace(prefix, "DIR/") for a in self.argv)


@dataclass(frozen=True)
class Entry:
    """Where a run cell's numbers go in the report."""

    section: str                    # main | ablation | sensitivity
    dataset: str
    row: str                        # method, ablation row, or swept key
    attack: str
    ratio: float | None             # None for attack "none"
    seed: int
    cell: str
    value: str | None = None        # sensitivity: the swept value


@dataclass(frozen=True)
class Floor:
    """The yardstick of a defence grid: the data-poisoning floor, the larger mean ER@10 (of the last evaluations)
    of a floor method under `attacks` (fake users who train honestly), per dataset and ratio; an attacked cell holds
    when its mean is within floor + margin. With several floor methods (one per backbone), each main-grid row is
    held to the floor of the one with its backbone (`of_row`)."""

    methods: tuple[str, ...]
    attacks: tuple[str, ...]
    margin: float
    of_row: tuple[tuple[str, str], ...] = ()      # (main-grid row, its floor method); one floor method: every row

    def method_of(self, row: str) -> str:
        return next((m for r, m in self.of_row if r == row), self.methods[0])


@dataclass
class Plan:
    """A checked spec: its cells in run order and the table entries they fill."""

    spec: Path
    root: Path
    cells: dict[str, Cell]          # in run order: pretrains, runs, figures
    entries: list[Entry]
    figures: dict[str, str]         # figure name -> cell id
    er_last: int
    text: str | None = None         # the spec file as read (the runner keeps a copy in DIR/spec.toml)
    floor: Floor | None = None      # [floor]: the report's verdict table against the data-poisoning floor


def render(value: Any) -> str:
    """A TOML value as `--set` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(render(v) for v in value)
    return str(value)


def _resolve(sets: dict[str, str], where: str) -> Config:
    """The config these overrides give, or a one-line error that starts with `where`."""
    try:
        return config.override(Config(), sets, source=where)
    except InputError as err:
        msg = str(err)
        raise InputError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _sets(table: Any, where: str, reserved: tuple[str, ...] = ()) -> dict[str, str]:
    """A table of config overrides (minus `reserved` fields), checked alone so errors name their place."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: expected a table of config keys, got {table!r}")
    values = {}
    for key, value in table.items():
        if key in reserved:
            continue
        if isinstance(value, dict):
            raise InputError(f"{where}: {key} must be a value, not a table")
        values[key] = render(value)
    _resolve(values, where)
    return values


def _fields(table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InputError(f"{where}: expected a table, got {table!r}")
    for key in table:
        if key not in allowed:
            raise InputError(f"{where}: unknown field {key!r}; known: {', '.join(allowed)}")
    return table


def _list(value: Any, kind: type, where: str, empty: bool = False) -> list:
    """A TOML list of str, int or float (ints accepted as floats; booleans never)."""
    kinds = (int, float) if kind is float else (kind,)
    ok = isinstance(value, list) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    if not ok or (not value and not empty):
        raise InputError(f"{where} = {value!r}: expected a non-empty list of {kind.__name__}s")
    return [kind(v) for v in value]


def _attack_sets(attack: str, ratio: float | None) -> dict[str, str]:
    return {} if attack == "none" else {"attack": attack, "attack_ratio": render(ratio)}


def _suffix(attack: str, ratio: float | None) -> str:
    return attack if attack == "none" else f"{attack} {ratio:g}"


def _dataset_exists(data: str, where: str) -> None:
    if data == "synthetic":
        return
    from fortress.data import resolve
    try:
        resolve(data)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None


class _Spec:
    """A spec being checked and expanded into cells; identical cells are made once."""

    def __init__(self, table: dict[str, Any], spec: Path, root: Path, check_data: bool):
        self.s, self.root, self.check_data = str(spec), root, check_data
        self.cells: dict[str, Cell] = {}
        self.entries: list[Entry] = []
        self.figures: dict[str, str] = {}
        s = self.s
        for key in table:
            if key not in SECTIONS:
                raise InputError(f"{s}: unknown section [{key}]; known: {', '.join(SECTIONS)}")
        grid = _fields(table.get("grid", {}), GRID_FIELDS, f"{s} [grid]")
        if "seeds" not in grid:
            raise InputError(f"{s} [grid]: seeds is missing (e.g. seeds = [0, 1, 2])")
        self.seeds = _list(grid["seeds"], int, f"{s} [grid] seeds")
        self.attacks = _list(grid.get("attacks", ["none"]), str, f"{s} [grid] attacks")
        self.ratios = _list(grid.get("attack_ratios", [0.01]), float, f"{s} [grid] attack_ratios")
        self.er_last = grid.get("er_last", 5)
        if not isinstance(self.er_last, int) or isinstance(self.er_last, bool) or self.er_last < 1:
            raise InputError(f"{s} [grid] er_last = {self.er_last!r}: expected an integer >= 1")
        self.check_attacks(self.attacks, self.ratios, f"{s} [grid] attacks")
        self.base = _sets(table.get("set", {}), f"{s} [set]")

        raw = table.get("datasets")
        if not isinstance(raw, dict) or not raw:
            raise InputError(f"{s}: no datasets; add a table such as [datasets.synthetic] or [datasets.amazon-cell-phones]")
        self.datasets: dict[str, tuple[str, dict[str, str]]] = {}
        for name, t in raw.items():
            where = f"{s} [datasets.{name}]"
            sets = _sets(t, where, reserved=("data",))
            data = t.get("data", name)
            if not isinstance(data, str) or not data:
                raise InputError(f"{where} data = {data!r}: expected a path, a name in $FORTRESS_DATA, or 'synthetic'")
            if check_data:
                _dataset_exists(data, where)
            self.datasets[name] = (data, sets)

        raw = table.get("methods")
        if not isinstance(raw, dict) or not raw:
            raise InputError(f"{s}: no methods; add a table such as [methods.FedAvg-SASRec] with backbone = \"sasrec\"")
        self.methods = {name: _sets(t, f"{s} [methods.{name}]", reserved=("attacks",)) for name, t in raw.items()}
        # a method may run only some of the grid's attacks (`attacks = [...]`): e.g. PTF-FSR uploads no model
        # update for the update attacks to forge; the report shows its other cells as –
        self.method_attacks: dict[str, list[str]] = {}
        for name, t in raw.items():
            if "attacks" in t:
                where = f"{s} [methods.{name}] attacks"
                chosen = _list(t["attacks"], str, where)
                extra = [a for a in chosen if a not in self.attacks]
                if extra:
                    raise InputError(f"{where}: {extra[0]!r} is not an attack of [grid] attacks "
                                     f"({', '.join(self.attacks)})")
                self.method_attacks[name] = chosen

        self.pretrain, self.inherit, self.then = None, None, None
        if "pretrain" in table:
            t = table["pretrain"]
            self.pretrain = _sets(t, f"{s} [pretrain]", reserved=("inherit", "then"))
            if "then" in t:     # a second clean stage that continues the first (e.g. a warm defence)
                self.then = _sets(t["then"], f"{s} [pretrain] then")
            if "inherit" in t:
                self.inherit = _list(t["inherit"], str, f"{s} [pretrain] inherit", empty=True)
                for k in self.inherit:
                    if k not in config.keys():
                        raise InputError(f"{s} [pretrain] inherit: unknown key {k!r}; known keys: {', '.join(config.keys())}")

    def floor(self, table: Any) -> Floor:
        """[floor]: method = a method of the spec, or a list of them with one backbone each (every main-grid row is
        then held to the one with its backbone); attacks = the grid attacks (run by each) that make the floor."""
        where = f"{self.s} [floor]"
        t = _fields(table, FLOOR_FIELDS, where)
        raw = t.get("method")
        if not isinstance(raw, (str, list)):
            raise InputError(f"{where} method = {raw!r}: expected a method of this spec, or a list of them "
                             f"(one per backbone); known: {', '.join(self.methods)}")
        names = _list(raw, str, f"{where} method") if isinstance(raw, list) else [raw]
        for name in names:
            self.method(name, f"{where} method")
        attacks = _list(t.get("attacks", ["random", "popular"]), str, f"{where} attacks")
        for name in names:
            runs = self.method_attacks.get(name, self.attacks)
            for a in attacks:
                if a not in runs or a == "none":
                    raise InputError(f"{where} attacks: {a!r} is not an attack that method {name!r} runs "
                                     f"({', '.join(x for x in runs if x != 'none')})")
        margin = t.get("margin", 0.02)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise InputError(f"{where} margin = {margin!r}: expected a number in [0, 1), e.g. 0.02")
        of_row: tuple[tuple[str, str], ...] = ()
        if len(names) > 1:
            floors: dict[str, str] = {}
            for name in names:
                b = self.backbone(name)
                if b in floors:
                    raise InputError(f"{where} method: {floors[b]!r} and {name!r} have the same backbone {b!r}; "
                                     "give one floor method per backbone")
                floors[b] = name
            rows = dict.fromkeys(e.row for e in self.entries if e.section == "main")
            for row in rows:
                if self.backbone(row) not in floors:
                    raise InputError(f"{where} method: no floor method has the backbone {self.backbone(row)!r} of "
                                     f"[methods.{row}] (floor backbones: {', '.join(floors)})")
            of_row = tuple((row, floors[self.backbone(row)]) for row in rows)
        return Floor(tuple(names), tuple(attacks), float(margin), of_row)

    def backbone(self, method: str) -> str:
        """The backbone a method's cells train: its own, else [set]'s, else the config default."""
        return self.methods[method].get("backbone", self.base.get("backbone", Config().backbone))

    # -- checks shared by the sections
    def check_attacks(self, attacks: list[Any], ratios: list[float], where: str) -> None:
        for a in attacks:
            if not isinstance(a, str):
                raise InputError(f"{where} = {a!r}: expected an attack name")
            for r in ratios:
                _resolve(_attack_sets(a, r), where)

    def method(self, name: Any, where: str) -> dict[str, str]:
        if name not in self.methods:
            raise InputError(f"{where} = {name!r}: not a method of this spec; known: {', '.join(self.methods)}")
        return self.methods[name]

    def dataset_names(self, value: Any, where: str) -> list[str]:
        chosen = _list(value, str, where)
        for d in chosen:
            if d not in self.datasets:
                raise InputError(f"{where}: {d!r} is not a dataset of this spec; known: {', '.join(self.datasets)}")
        return chosen

    def ratio(self, value: Any, where: str) -> float:
        return _list([value], float, where)[0]

    # -- cells
    def _add(self, kind: str, data: str, sets: dict[str, str], after: str | None, label: str) -> str:
        cfg = _resolve(sets, f"{self.s}: cell '{label}'")
        if self.check_data:             # what this machine must have to run it (a report needs neither)
            try:
                config.check_device(cfg)
            except InputError as err:
                raise InputError(f"{self.s}: cell '{label}': {err}") from None
        default = id_defaults(cfg)
        changed = {k: v for k, v in config.to_dict(cfg).items() if v != default[k]}
        cid = _cell_id(kind, {"data": data, "config": changed, "after": after})
        if cid not in self.cells:
            out = self.root / "cells" / cid
            argv = ["run", "--data", data, "--out", str(out)]
            for k, v in sets.items():
                argv += ["--set", f"{k}={v}"]
            if after:
                argv += ["--set", f"init_from={self.root / 'cells' / after}"]
            self.cells[cid] = Cell(cid, kind, argv, out, out, self.root, [after] if after else [])
        if label not in self.cells[cid].labels:
            self.cells[cid].labels.append(label)
        return cid

    def run(self, ds: str, method: dict[str, str], attack: str, ratio: float | None, seed: int, label: str) -> str:
        """A run cell (and, with [pretrain], the clean model it starts from)."""
        data, ds_sets = self.datasets[ds]
        after = None
        if self.pretrain is not None and "init_from" not in method:    # a method's own init_from ("": scratch) wins
            inherited = {k: v for k, v in method.items() if self.inherit is None or k in self.inherit}
            # a seed written in [pretrain] wins: one clean model shared by every seed of the grid
            pre = {**self.base, **ds_sets, **inherited, "seed": str(seed), **self.pretrain}
            after = self._add("pretrain", data, pre, None, f"pretrain for {label}")
            if self.then is not None:
                after = self._add("pretrain", data, {**pre, **self.then}, after, f"pretrain (then) for {label}")
        sets = {**self.base, **ds_sets, **method, **_attack_sets(attack, ratio), "seed": str(seed)}
        return self._add("run", data, sets, after, label)

    def entry(self, section: str, ds: str, row: str, method: dict[str, str], attack: str, ratio: float, seed: int,
              label: str, value: str | None = None) -> None:
        r = None if attack == "none" else ratio
        cid = self.run(ds, method, attack, r, seed, f"{label} {_suffix(attack, r)} seed {seed}")
        self.entries.append(Entry(section, ds, row, attack, r, seed, cid, value))

    # -- sections
    def main_grid(self) -> None:
        for ds in self.datasets:
            for m, msets in self.methods.items():
                for attack in self.method_attacks.get(m, self.attacks):
                    for ratio in self.ratios if attack != "none" else [0.0]:
                        for seed in self.seeds:
                            self.entry("main", ds, m, msets, attack, ratio, seed, f"{ds} {m}")

    def ablation(self, table: Any) -> None:
        where = f"{self.s} [ablation]"
        t = _fields(table, ABLATION_FIELDS, where)
        msets = self.method(t.get("method"), f"{where} method")
        variants = t.get("variants")
        if not isinstance(variants, dict) or not variants:
            raise InputError(f"{where} variants: expected a table of named overrides, "
                             f"e.g. \"w/o temporal\" = {{ temporal = false }}")
        rows = {t["method"]: {}} | {v: _sets(x, f"{where} variants.{v!r}") for v, x in variants.items()}
        attacks = _list(t.get("attacks", self.attacks), str, f"{where} attacks")
        ratio = self.ratio(t.get("attack_ratio", self.ratios[0]), f"{where} attack_ratio")
        self.check_attacks(attacks, [ratio], f"{where} attacks")
        seeds = _list(t.get("seeds", self.seeds), int, f"{where} seeds")
        for ds in self.dataset_names(t.get("datasets", list(self.datasets)), f"{where} datasets"):
            for row, extra in rows.items():
                for attack in attacks:
                    for seed in seeds:
                        self.entry("ablation", ds, row, {**msets, **extra}, attack, ratio, seed, f"ablation {ds} {row}")

    def sensitivity(self, table: Any) -> None:
        where = f"{self.s} [sensitivity]"
        t = _fields(table, SENSITIVITY_FIELDS, where)
        msets = self.method(t.get("method"), f"{where} method")
        sweeps = t.get("sweeps")
        if not isinstance(sweeps, dict) or not sweeps:
            raise InputError(f"{where} sweeps: expected a table of key = [values], e.g. lambda_cl = [0.0, 0.01, 0.1]")
        attack = t.get("attack", "none")
        ratio = self.ratio(t.get("attack_ratio", self.ratios[0]), f"{where} attack_ratio")
        self.check_attacks([attack], [ratio], f"{where} attack")
        seeds = _list(t.get("seeds", self.seeds), int, f"{where} seeds")
        for key, values in sweeps.items():
            if not isinstance(values, list) or not values:
                raise InputError(f"{where} sweeps.{key} = {values!r}: expected a non-empty list of values")
            for v in values:
                _sets({key: v}, f"{where} sweeps.{key}")
        for ds in self.dataset_names(t.get("datasets", list(self.datasets)), f"{where} datasets"):
            for key, values in sweeps.items():
                for v in map(render, values):
                    for att in dict.fromkeys(["none", attack]):
                        for seed in seeds:
                            self.entry("sensitivity", ds, key, {**msets, key: v}, att, ratio, seed,
                                       f"sensitivity {ds} {key}={v}", v)

    def figure(self, i: int, table: Any) -> None:
        where = f"{self.s} [[figures]] #{i + 1}"
        t = _fields(table, FIGURE_FIELDS, where)
        name = t.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise InputError(f"{where} name = {name!r}: expected a file-name-like string, e.g. \"trajectories\"")
        if name in self.figures:
            raise InputError(f"{where} name = {name!r}: two figures have this name")
        command = _list(t.get("command"), str, f"{where} command")
        args = _list(t.get("args", []), str, f"{where} args", empty=True)
        refs = t.get("runs")
        if not isinstance(refs, list) or not refs:
            raise InputError(f"{where} runs: expected a list of runs, e.g. [{{ method = \"FedAvg-SASRec\" }}]")
        runs = []
        for j, ref in enumerate(refs):
            rw = f"{where} runs[{j}]"
            ref = _fields(ref, REF_FIELDS, rw)
            msets = self.method(ref.get("method"), f"{rw} method")
            extra = _sets(ref.get("set", {}), f"{rw} set")
            attack = ref.get("attack", "none")
            ratio = self.ratio(ref.get("attack_ratio", self.ratios[0]), f"{rw} attack_ratio")
            self.check_attacks([attack], [ratio], f"{rw} attack")
            ds = self.dataset_names([ref.get("dataset", next(iter(self.datasets)))], f"{rw} dataset")[0]
            seed = _list([ref.get("seed", self.seeds[0])], int, f"{rw} seed")[0]
            r = None if attack == "none" else ratio
            what = "".join(f" {k}={v}" for k, v in extra.items())
            runs.append(self.run(ds, {**msets, **extra}, attack, r, seed,
                                 f"figure {name}: {ds} {ref['method']}{what} {_suffix(attack, r)} seed {seed}"))
        png = self.root / "figures" / f"{name}.png"
        cid = _cell_id("figure", {"name": name, "command": command, "runs": runs, "args": args})
        argv = [*command, *(str(self.cells[r].out) for r in runs), *args, "--out", str(png)]
        self.cells[cid] = Cell(cid, "figure", argv, png, self.root / "cells" / cid, self.root,
                               list(dict.fromkeys(runs)), [f"figure {name}"], tuple(command))
        self.figures[name] = cid


def _cell_id(kind: str, payload: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, **payload}, sort_keys=True)
    return f"{kind[:3]}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def load(spec: str | Path, root: str | Path, check_data: bool = True) -> Plan:
    """Read and check a spec file; every error is one line naming the file, field and value.

    `check_data=False` skips looking for the datasets and the device (a report is rebuilt from summaries alone)."""
    spec = Path(spec)
    table = config.read_toml(spec, "spec file")
    p = plan(table, spec, Path(root), check_data)
    p.text = spec.read_text()
    return p


def plan(table: dict[str, Any], spec: Path, root: Path, check_data: bool = True) -> Plan:
    """Expand a parsed spec into cells and report entries, checking all of it before anything runs."""
    x = _Spec(table, spec, root, check_data)
    x.main_grid()
    floor = x.floor(table["floor"]) if "floor" in table else None
    if "ablation" in table:
        x.ablation(table["ablation"])
    if "sensitivity" in table:
        x.sensitivity(table["sensitivity"])
    figures = table.get("figures", [])
    if not isinstance(figures, list):
        raise InputError(f"{spec} figures: write each figure as a [[figures]] table")
    for i, f in enumerate(figures):
        x.figure(i, f)
    order = {"pretrain": 0, "run": 1, "figure": 2}
    cells = dict(sorted(x.cells.items(), key=lambda kv: order[kv[1].kind]))
    return Plan(spec, root, cells, x.entries, x.figures, x.er_last, floor=floor)
