"""Read RecBole atomic files: a raw `.inter` table and the benchmark split `NAME.{train,valid,test}.inter`.

RecBole (Zhao et al., CIKM 2021) stores data as tab-separated "atomic files" whose header line
names every field with its type, `name:type` (token, token_seq, float, float_seq); the values of a
`_seq` field are space-separated. A raw `.inter` table has one interaction per row
(`user_id:token item_id:token [rating:float] [timestamp:float] ...`). The benchmark split of a
sequential dataset has one row per target: the user, the user's earlier items (`item_id_list`,
oldest first) and the target (`item_id`); its train file holds one row per prefix of each user's
train sequence, its valid and test files one row per user.

This module only parses: it returns ids as strings, and `load.py` remaps them into a Dataset.
Every problem is a one-line InputError naming the file, the line, the field and the value.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from fortress.errors import InputError, printable

TYPES = ("token", "token_seq", "float", "float_seq")
USER, ITEM, TIME, ITEM_LIST = "user_id", "item_id", "timestamp", "item_id_list"   # RecBole's default field names
PARTS = ("train", "valid", "test")
BENCHMARK_FILE = re.compile(r"(.+)\.(train|valid|test)\.inter(\.gz)?")

_FIELD = re.compile(r"[^\s:]+:\w+")
_BENCHMARK_HINT = ("; a benchmark split is NAME.train.inter, NAME.valid.inter and NAME.test.inter in one folder, "
                   "with user_id:token, item_id_list:token_seq and item_id:token")


def is_header(line: str) -> bool:
    """Does `line` look like a RecBole header: two or more tab-separated `name:type` fields?"""
    fields = line.strip().split("\t")
    return len(fields) >= 2 and all(_FIELD.fullmatch(f.strip()) for f in fields)


def _show(tok: str) -> str:
    return printable(tok, 40)


def _rows(path: Path, lines: list[str], need: dict[str, str]):
    """(line number, {field: value}) for each row, holding the `need`ed fields (name -> type), checked."""
    start = next((n for n, line in enumerate(lines) if line.strip()), None)
    if start is None:
        raise InputError(f"{path}: file is empty")
    where = f"{path}:{start + 1}"
    header = lines[start].strip("\r\n").split("\t")
    shown = printable(", ".join(header), 200)
    columns: dict[str, tuple[int, str]] = {}
    for k, raw in enumerate(header):
        name, sep, kind = raw.strip().partition(":")
        if not sep or not name or kind not in TYPES:
            why = "is not name:type" if not sep or not name else f"has type '{_show(kind)}'"
            raise InputError(f"{where}: header field '{_show(raw.strip())}' {why}; a RecBole header is "
                             f"tab-separated name:type with type one of {', '.join(TYPES)} (header has: {shown})")
        if name in columns:
            raise InputError(f"{where}: header field '{_show(name)}' appears twice (header has: {shown})")
        columns[name] = (k, kind)
    if ITEM_LIST not in need and ITEM_LIST in columns:
        raise InputError(f"{where}: field '{ITEM_LIST}' makes this a RecBole benchmark file, not an interaction "
                         f"table{_BENCHMARK_HINT}")
    for name, kind in need.items():
        if name not in columns:
            raise InputError(f"{where}: missing field '{name}:{kind}' (header has: {shown})")
        if columns[name][1] != kind:
            raise InputError(f"{where}: field '{name}' has type '{columns[name][1]}', expected '{name}:{kind}'")
    for n in range(start + 2, len(lines) + 1):
        line = lines[n - 1]
        if not line.strip():
            continue
        values = line.strip("\r\n").split("\t")
        if len(values) != len(header):
            raise InputError(f"{path}:{n}: expected {len(header)} tab-separated fields ({shown}), got {len(values)}")
        row = {}
        for name, kind in need.items():
            value = values[columns[name][0]].strip()
            if kind == "token" and not value:
                raise InputError(f"{path}:{n}: field '{name}' is empty")
            if kind == "float":
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise InputError(f"{path}:{n}: field '{name}' value '{_show(value)}' is not a finite number")
                row[name] = number
            else:
                row[name] = value.split() if kind == "token_seq" else value
        yield n, row


def read_inter(path: Path, lines: list[str], names: tuple[tuple[str, ...], ...] = ((USER,), (ITEM,), (TIME,))
               ) -> tuple[list[str], list[str], np.ndarray | None]:
    """(users, items, timestamps or None) of a raw `.inter` table, in file order; extra fields are ignored.
    `names`: the accepted names of the user, item and (optional) timestamp fields, in order of preference."""
    header = next((line for line in lines if line.strip()), "")
    fields = [f.strip().partition(":")[0] for f in header.split("\t")]
    user, item, time = (next((f for w in wanted for f in fields if f.lower() == w), None) for wanted in names)
    need = {user or USER: "token", item or ITEM: "token", **({time: "float"} if time else {})}
    users: list[str] = []
    items: list[str] = []
    ts: list[float] = []
    for _, row in _rows(path, lines, need):
        users.append(row[user])
        items.append(row[item])
        if time:
            ts.append(row[time])
    if not users:
        raise InputError(f"{path}: has a header but no rows")
    return users, items, np.asarray(ts, dtype=np.float64) if time else None


def benchmark_files(folder: Path) -> dict[str, dict[str, Path]]:
    """NAME -> {part: file} for each benchmark split whose files stand in `folder`."""
    found: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        m = BENCHMARK_FILE.fullmatch(p.name)
        if m and p.is_file():
            found.setdefault(m.group(1), {})[m.group(2)] = p
    return found


def _continued(known: list[str], history: list[str], where: str, user: str) -> list[str]:
    """The user's sequence so far, given a row's `history`: the history must end with what is already
    known (or the known part with the history, when lists are cut to a maximum length)."""
    k = min(len(known), len(history))
    if known[len(known) - k:] != history[len(history) - k:]:
        raise InputError(f"{where}: user {_show(user)}'s {ITEM_LIST} '{_show(' '.join(history))}' does not continue "
                         f"the sequence of the user's earlier rows ('{_show(' '.join(known[-k:]))}' ends it)")
    return history if len(history) > len(known) else known


def read_benchmark(texts: dict[str, tuple[Path, list[str]]]
                   ) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """(train sequence, valid item, test item) per user of a benchmark split, `texts` holding each part's
    (file, lines). A user's train sequence is rebuilt from the prefix rows (shortest history first; ties
    in file order), each row's history continuing the sequence so far and adding its target."""
    need = {USER: "token", ITEM_LIST: "token_seq", ITEM: "token"}
    rows: dict[str, list[tuple[int, int, list[str], str]]] = {}
    path, lines = texts["train"]
    for n, row in _rows(path, lines, need):
        rows.setdefault(row[USER], []).append((len(row[ITEM_LIST]), n, row[ITEM_LIST], row[ITEM]))
    train: dict[str, list[str]] = {}
    for user, prefixes in rows.items():
        seq: list[str] = []
        for _, n, history, target in sorted(prefixes, key=lambda r: r[:2]):
            seq = _continued(seq, history, f"{path}:{n}", user)
            seq.append(target)
        train[user] = seq
    held: dict[str, dict[str, str]] = {"valid": {}, "test": {}}
    for part in ("valid", "test"):
        path, lines = texts[part]
        first: dict[str, int] = {}
        for n, row in _rows(path, lines, need):
            user = row[USER]
            if user in first:
                raise InputError(f"{path}:{n}: user {_show(user)} has a second {part} row (first at line "
                                 f"{first[user]}); a benchmark {part} file holds one row per user")
            first[user] = n
            valid = held["valid"].get(user) if part == "test" else None
            known = train.get(user, []) + ([valid] if valid else [])
            seq = _continued(known, row[ITEM_LIST], f"{path}:{n}", user)
            train[user] = seq[:len(seq) - 1] if valid else seq
            held[part][user] = row[ITEM]
    return train, held["valid"], held["test"]
