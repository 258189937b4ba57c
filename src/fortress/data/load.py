"""Read interaction data (sequence text, csv/tsv tables, MIND behaviors, RecBole atomic files, pre-split
folders) into a Dataset.

Every file problem is raised as a one-line InputError naming the file (and line) and the problem.
Except for split folders and RecBole benchmark splits (their split is used as given), reading ends the
same way: optional k-core, remap of users to 0..U-1 and items to 1..N in sorted original-id order, then
the leave-one-out split of `from_sequences`.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import warnings
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fortress.data import recbole
from fortress.data.dataset import Dataset, from_sequences
from fortress.errors import InputError, printable

FORMATS = ("auto", "seq", "table", "mind", "split", "recbole")

# Header names (lower-cased, RecBole-style ":type" suffix removed), in order of preference; RecBole `.inter`
# files name them user_id, item_id and timestamp, and these are accepted there too.
USER_COLUMNS = ("user", "user_id", "userid", "reviewerid", "reviewer_id", "uid")
ITEM_COLUMNS = ("item", "item_id", "itemid", "asin", "movieid", "movie_id", "iid", "news_id", "newsid")
TIME_COLUMNS = ("timestamp", "time", "ts", "unixreviewtime", "unix_review_time", "date", "datetime")

_INT = re.compile(r"[+-]?[0-9]+")
_MIND_TIME = re.compile(r"\d{1,2}/\d{1,2}/\d{4} \d{1,2}:\d{2}:\d{2} [AaPp][Mm]")
_SPLIT_FILE = r"{part}\.(txt|csv|tsv)(\.gz)?"
_UNIX_1973 = 1e8    # unix seconds above this look like timestamps, not item ids
_SNIFF_LINES = 50
_SEQ_HINT = "; --format table reads an interaction table"


def shared_dir() -> Path:
    """The shared data folder: $FORTRESS_DATA, else ../shared/data relative to the working directory."""
    return Path(os.environ.get("FORTRESS_DATA") or "../shared/data")


def resolve(spec: str) -> Path:
    """Find data given as a path, or as a name inside the shared data folder."""
    path = Path(spec)
    if path.exists():
        return path
    shared = shared_dir() / spec
    if shared.exists():
        return shared
    raise InputError(f"data '{spec}' not found (looked at {path} and {shared}; "
                     "$FORTRESS_DATA names the folder of shared datasets)")


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of a file or folder: 'split', 'recbole', 'mind', 'table' or 'seq'."""
    path = _existing(path)
    if path.is_dir():
        return "recbole" if recbole.benchmark_files(path) else "split"
    return _sniff(path, _nonblank(_read_text(path, head=1 << 16).splitlines(), _SNIFF_LINES))


def load_dataset(path: str | os.PathLike, fmt: str = "auto", kcore: int = 0) -> Dataset:
    """Load a dataset file or split folder in format `fmt`, optionally k-core filtered."""
    if fmt not in FORMATS:
        raise InputError(f"unknown data format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    if kcore < 0:
        raise InputError(f"kcore={kcore} is out of range; it must be >= 0")
    path = _existing(path)
    if fmt in ("auto", "recbole"):
        bench = _benchmark_of(path)
        if bench is not None:
            if kcore:
                raise InputError(f"{path}: kcore={kcore} cannot be applied to a RecBole benchmark split "
                                 "(the given split must not be altered); use kcore=0")
            return _load_benchmark(*bench)
    if path.is_dir() and fmt != "split" and not _is_split_folder(path):
        path = _data_file_in(path)
    full = path.resolve()
    if path.is_dir():
        if fmt not in ("auto", "split"):
            raise InputError(f"{path}: is a folder; only the 'split' format reads folders")
        if kcore:
            raise InputError(f"{path}: kcore={kcore} cannot be applied to a pre-split folder "
                             "(the given split must not be altered); use kcore=0")
        ds = _load_split(path, full.name)
        ds.data_format = "split"
        return ds
    if fmt == "split":
        raise InputError(f"{path}: format 'split' needs a folder with train, valid and test files")
    text = _read_text(path)
    lines = text.splitlines()
    if fmt == "auto":
        fmt = _sniff(path, _nonblank(lines, _SNIFF_LINES))
    reader = {"seq": _read_seq, "table": _read_table_interactions, "mind": _read_mind, "recbole": _read_recbole}[fmt]
    users, items, chronological = reader(path, lines)
    ds = _build(f"{full.parent.name}/{full.name}", path, users, items, chronological, kcore)
    ds.data_format = fmt
    return ds


# ---------------------------------------------------------------------------------------------
# files

def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return path


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_text(path: Path, head: int = -1) -> str:
    """Decoded text of a (possibly gzipped) file; `head` > 0 reads only that many bytes."""
    gz = path.name.endswith(".gz")
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                data = f.read(head)
        else:
            with open(path, "rb") as f:
                data = f.read(head)
    except (OSError, EOFError, zlib.error) as err:
        if gz and not isinstance(err, PermissionError):
            raise InputError(f"{path}: not a readable gzip file ({_one_line(err)})") from None
        raise InputError(f"{path}: cannot read ({_one_line(err)})") from None
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    errors = "strict"
    if 0 < head == len(data):
        # a head read cuts the last line (and maybe a multi-byte character): drop that part
        cut = data.rfind(b"\n")
        data, errors = (data[:cut + 1], "strict") if cut > 0 else (data, "ignore")
    try:
        return data.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def _nonblank(lines: list[str], n: int) -> list[str]:
    out = []
    for line in lines:
        if line.strip():
            out.append(line)
            if len(out) == n:
                break
    return out


def _sniff(path: Path, sample: list[str]) -> str:
    if not sample:
        raise InputError(f"{path}: file is empty")
    if recbole.is_header(sample[0]):
        return "recbole"
    cols = [line.split("\t") for line in sample]
    if all(len(c) == 5 for c in cols) and all(_MIND_TIME.fullmatch(c[2].strip()) for c in cols):
        return "mind"
    if any("\t" in line or "," in line or "::" in line for line in sample):
        return "table"
    toks = [line.split() for line in sample]
    widths = {len(t) for t in toks}
    # "user item timestamp" with spaces would otherwise read as a 2-item sequence per line
    if len(widths) == 1 and widths <= {3, 4} and all(_is_number(t[-1]) for t in toks):
        all_int = [all(_is_int(x) for x in t) for t in toks]
        # string ids or float ratings are on every line of a table; a non-integer on some lines only is
        # a stray token in sequence text, which the seq reader reports with its line
        if not any(all_int) or all(float(t[-1]) >= _UNIX_1973 for t in toks):
            return "table"
    return "seq"


def _is_int(tok: str) -> bool:
    return (tok.isascii() and tok.isdigit()) or _INT.fullmatch(tok) is not None


def _show(tok: str) -> str:
    return printable(tok, 40)


# ---------------------------------------------------------------------------------------------
# formats; each returns flat per-interaction (user ids, item ids) in per-user time order

def _read_seq(path: Path, lines: list[str]) -> tuple[list[str], list[str], bool]:
    """`user item item ...` per line; a user on several lines (SASRec's `user item`) is concatenated."""
    seqs: dict[str, list[str]] = {}
    for n, line in enumerate(lines, 1):
        toks = line.split()
        if not toks:
            continue
        user = toks[0]
        if not _is_int(user):
            raise InputError(f"{path}:{n}: user id '{_show(user)}' is not an integer "
                             f"(ids are integers in sequence text{_SEQ_HINT})")
        if len(toks) == 1:
            raise InputError(f"{path}:{n}: user {user} has no items")
        for tok in toks[1:]:
            if not _is_int(tok):
                raise InputError(f"{path}:{n}: item id '{_show(tok)}' is not an integer "
                                 f"(ids are integers in sequence text{_SEQ_HINT})")
        seqs.setdefault(user, []).extend(toks[1:])
    chronological = _check_chronology(path, seqs.values())
    users = [u for u, s in seqs.items() for _ in s]
    items = [i for s in seqs.values() for i in s]
    return users, items, chronological


def _check_chronology(path: Path, seqs) -> bool:
    """Without timestamps, id-sorted lines betray a file that lost its time order."""
    long = [s for s in seqs if len(s) >= 4]
    if not long or not all(_is_int(x) for s in long for x in s):     # string ids have no id order to betray
        return True
    n_sorted = 0
    for s in long:
        ids = [int(x) for x in s]
        n_sorted += all(a < b for a, b in zip(ids, ids[1:]))
    if 2 * n_sorted <= len(long):
        return True
    pct = round(100 * n_sorted / len(long))
    warnings.warn(f"{path}: items of {pct}% of users are sorted by item id; this order is probably "
                  "not chronological, so the next-item split is not a temporal split", stacklevel=4)
    return False


def _read_table_interactions(path: Path, lines: list[str]) -> tuple[list[str], list[str], bool]:
    users, items, ts, _ = _read_table(path, lines)
    return _by_time(users, items, ts)


def _by_time(users: list[str], items: list[str], ts: np.ndarray) -> tuple[list[str], list[str], bool]:
    order = np.argsort(ts, kind="stable")   # stable: equal timestamps keep file order
    return [users[k] for k in order], [items[k] for k in order], True


def _read_recbole(path: Path, lines: list[str]) -> tuple[list[str], list[str], bool]:
    """A raw RecBole `.inter` table: by timestamp when it has one, else in file order."""
    names = tuple((default, *aliases) for default, aliases in
                  ((recbole.USER, USER_COLUMNS), (recbole.ITEM, ITEM_COLUMNS), (recbole.TIME, TIME_COLUMNS)))
    users, items, ts = recbole.read_inter(path, lines, names)
    if ts is not None:
        return _by_time(users, items, ts)
    seqs: dict[str, list[str]] = {}
    for user, item in zip(users, items):
        seqs.setdefault(user, []).append(item)
    return users, items, _check_chronology(path, seqs.values())


def _read_table(path: Path, lines: list[str]) -> tuple[list[str], list[str], np.ndarray, list[int]]:
    """(users, items, timestamps, line numbers) of a csv/tsv/whitespace table, in file order."""
    sample = _nonblank(lines, _SNIFF_LINES)
    if not sample:
        raise InputError(f"{path}: file is empty")
    rows = _table_rows(path, sample, lines)
    first_n, first = next(((n, row) for n, row in rows if row), (0, []))
    if not first:
        raise InputError(f"{path}: has no rows")
    if not any(_is_number(f) for f in first):
        ui, ii, ti = _header_columns(path, first)
        width = max(ui, ii, ti) + 1
        exact = False
    elif len(first) in (3, 4):
        ui, ii, ti = 0, 1, len(first) - 1
        width = len(first)
        exact = True        # 3 vs 4 columns changes what the last-but-one column means
        rows = _chain(first_n, first, rows)
    else:
        raise InputError(f"{path}:{first_n}: expected 3 columns (user, item, timestamp) or 4 "
                         f"(user, item, rating, timestamp) in a table without header, got {len(first)}")
    users: list[str] = []
    items: list[str] = []
    ts: list[float] = []
    nums: list[int] = []
    for n, row in rows:
        if not row:
            continue
        if (len(row) != width) if exact else (len(row) < width):
            raise InputError(f"{path}:{n}: expected {width} columns, got {len(row)}")
        user, item, t = row[ui].strip(), row[ii].strip(), row[ti]
        if not user or not item:
            raise InputError(f"{path}:{n}: empty {'user' if not user else 'item'} id")
        try:
            ts.append(float(t))
        except ValueError:
            ts.append(_date(path, n, t))
        users.append(user)
        items.append(item)
        nums.append(n)
    if not users:
        raise InputError(f"{path}: has a header but no rows")
    return users, items, np.asarray(ts, dtype=np.float64), nums


def _chain(n: int, row: list[str], rest):
    yield n, row
    yield from rest


def _table_rows(path: Path, sample: list[str], lines: list[str]):
    """(line number, fields) for every line; blank lines give empty field lists."""
    if any("\t" in line for line in sample):
        for n, line in enumerate(lines, 1):
            yield n, line.split("\t") if line.strip() else []
    elif any("," in line for line in sample):
        reader = csv.reader(lines, skipinitialspace=True)
        try:
            for row in reader:
                yield reader.line_num, row if any(f.strip() for f in row) else []
        except csv.Error as err:
            raise InputError(f"{path}:{reader.line_num}: bad csv ({_one_line(err)})") from None
    elif any("::" in line for line in sample):
        for n, line in enumerate(lines, 1):
            yield n, line.strip().split("::") if line.strip() else []
    else:
        for n, line in enumerate(lines, 1):
            yield n, line.split()


def _is_number(tok: str) -> bool:
    try:
        float(tok)
    except ValueError:
        return False
    return True


def _header_columns(path: Path, header: list[str]) -> tuple[int, int, int]:
    names = [h.strip().strip("\"'").split(":")[0].lower() for h in header]
    found = []
    for role, wanted in (("user", USER_COLUMNS), ("item", ITEM_COLUMNS), ("timestamp", TIME_COLUMNS)):
        hits = [w for w in wanted if w in names]
        if not hits:
            raise InputError(f"{path}: missing column '{role}' (header has: {printable(', '.join(header), 200)})")
        found.append(names.index(hits[0]))
    return found[0], found[1], found[2]


def _date(path: Path, n: int, tok: str) -> float:
    """Seconds of an ISO date/time (naive means UTC): tables with a 'date' column use these."""
    try:
        when = datetime.fromisoformat(tok.strip())
    except ValueError:
        raise InputError(f"{path}:{n}: timestamp '{_show(tok)}' is not a number or an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _read_mind(path: Path, lines: list[str]) -> tuple[list[str], list[str], bool]:
    """MIND behaviors: the user's click history, then the news clicked in each impression, by time."""
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 5:
            raise InputError(f"{path}:{n}: expected 5 tab-separated columns (impression_id, user_id, "
                             f"time, history, impressions), got {len(cols)}")
        _, user, time, history, impressions = cols
        if not user.strip():
            raise InputError(f"{path}:{n}: empty user id")
        clicks = []
        for tok in impressions.split():
            news, _, label = tok.rpartition("-")
            if not news or label not in ("0", "1"):
                raise InputError(f"{path}:{n}: impression '{_show(tok)}' is not newsid-label with "
                                 "label 0 or 1 (unlabelled MIND test files cannot be used)")
            if label == "1":
                clicks.append(news)
        records.append((_mind_time(path, n, time), n, user.strip(), history.split(), clicks))
    records.sort()      # by impression time, ties in file order
    seqs: dict[str, list[str]] = {}
    for _, _, user, history, clicks in records:
        if user not in seqs:
            seqs[user] = list(history)   # the earliest impression carries the history
        seqs[user].extend(clicks)
    users = [u for u, s in seqs.items() for _ in s]
    items = [i for s in seqs.values() for i in s]
    return users, items, True


def _mind_time(path: Path, n: int, tok: str) -> tuple[int, ...]:
    """Sortable (Y, M, D, h, m, s) of MIND's `M/D/YYYY h:mm:ss AM/PM`."""
    try:
        date, clock, half = tok.split()
        month, day, year = (int(x) for x in date.split("/"))
        hour, minute, second = (int(x) for x in clock.split(":"))
        if half.upper() not in ("AM", "PM") or not 1 <= hour <= 12:
            raise ValueError(tok)
        hour = hour % 12 + (12 if half.upper() == "PM" else 0)
        datetime(year, month, day, hour, minute, second)     # validates the ranges
    except ValueError:
        raise InputError(f"{path}:{n}: time '{_show(tok)}' is not M/D/YYYY h:mm:ss AM/PM") from None
    return year, month, day, hour, minute, second


def _load_split(folder: Path, name: str) -> Dataset:
    """A folder with train/valid/test tables, used as given (no k-core, no re-split)."""
    parts = {}
    for part in ("train", "valid", "test"):
        file = _split_file(folder, part)
        parts[part] = (file, *_read_table(file, _read_text(file).splitlines()))
    user_vocab = _vocab(u for p in parts.values() for u in p[1])
    item_vocab = _vocab(i for p in parts.values() for i in p[2])
    user_ids, urank = _sorted_ids(user_vocab, 0)
    item_ids, irank = _sorted_ids(item_vocab, 1)
    item_ids = [""] + item_ids

    _, users, items, ts, _ = parts["train"]
    u = urank[np.fromiter((user_vocab[x] for x in users), np.int64, len(users))]
    i = irank[np.fromiter((item_vocab[x] for x in items), np.int64, len(items))]
    order = np.argsort(ts, kind="stable")
    order = order[np.argsort(u[order], kind="stable")]     # per user by time, ties in file order
    ptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=len(user_ids)), out=ptr[1:])

    held = {}
    for part in ("valid", "test"):
        file, users, items, _, nums = parts[part]
        out = np.zeros(len(user_ids), dtype=np.int64)
        first: dict[str, int] = {}
        for user, item, n in zip(users, items, nums):
            if user in first:
                raise InputError(f"{file}:{n}: user {_show(user)} has a second {part} row (first at line "
                                 f"{first[user]}); a split folder holds one {part} row per user")
            first[user] = n
            out[urank[user_vocab[user]]] = irank[item_vocab[item]]
        held[part] = out
    return Dataset(name, len(item_ids) - 1, user_ids, item_ids, ptr, i[order], held["valid"],
                   held["test"], True, _names(folder / "imap.json"), _names(folder / "umap.json"))


def _benchmark_of(path: Path) -> tuple[Path, str, dict[str, Path]] | None:
    """(folder, NAME, {part: file}) of the RecBole benchmark split that `path` (its folder or one of its
    files) holds, or None when it holds none."""
    if path.is_dir():
        folder, found = path, recbole.benchmark_files(path)
        if len(found) > 1:
            raise InputError(f"{path}: holds several RecBole benchmark splits ({', '.join(found)}); "
                             "point --data at a file of the one to read")
        if not found:
            return None
        name = next(iter(found))
    else:
        match = recbole.BENCHMARK_FILE.fullmatch(path.name)
        if match is None:
            return None
        folder, name = path.parent, match.group(1)
    files = recbole.benchmark_files(folder)[name]
    missing = [f"{name}.{part}.inter" for part in recbole.PARTS if part not in files]
    if missing:
        raise InputError(f"{folder}: the RecBole benchmark split {name} has no {' or '.join(missing)} "
                         "(it needs NAME.train.inter, NAME.valid.inter and NAME.test.inter)")
    return folder, name, files


def _load_benchmark(folder: Path, name: str, files: dict[str, Path]) -> Dataset:
    """A RecBole benchmark split, used as given: each user's rebuilt train sequence, valid and test item."""
    texts = {part: (file, _read_text(file).splitlines()) for part, file in files.items()}
    train, valid, test = recbole.read_benchmark(texts)
    user_vocab = _vocab([*train, *valid, *test])
    item_vocab = _vocab([*(i for s in train.values() for i in s), *valid.values(), *test.values()])
    user_ids, _ = _sorted_ids(user_vocab, 0)
    item_ids, irank = _sorted_ids(item_vocab, 1)
    seqs = [irank[[item_vocab[i] for i in train.get(u, ())]] for u in user_ids]
    ptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=ptr[1:])
    held = [np.array([irank[item_vocab[part[u]]] if u in part else 0 for u in user_ids], dtype=np.int64)
            for part in (valid, test)]
    full = ([*train.get(u, ()), *([valid[u]] if u in valid else []), *([test[u]] if u in test else [])]
            for u in user_ids)
    chronological = _check_chronology(files["train"], full)
    ds = Dataset(f"{folder.resolve().name}/{name}", len(item_ids), user_ids, [""] + item_ids, ptr,
                 np.concatenate([np.zeros(0, dtype=np.int64), *seqs]), *held, chronological)
    ds.data_format = "recbole"
    return ds


def _is_split_folder(folder: Path) -> bool:
    pattern = re.compile(_SPLIT_FILE.format(part="train"))
    return any(pattern.fullmatch(p.name) for p in folder.iterdir())


# files in a dataset folder that are documentation or side tables, not interactions
# (RecBole's .item, .user, .kg, .link and .net files describe the entities of the .inter file)
_NOT_DATA = re.compile(r"(license|provenance|readme|news)\b.*|.*\.(json|md|pdf|pkl|npy|item|user|kg|link|net)",
                       re.IGNORECASE)


def _data_file_in(folder: Path) -> Path:
    """The one interaction file of a non-split dataset folder (MIND: behaviors.tsv)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not _NOT_DATA.fullmatch(p.name))
    behaviors = [p for p in files if p.name.startswith("behaviors.")]
    if behaviors:
        return behaviors[0]
    if len(files) != 1:
        listed = ", ".join(p.name for p in files) or "none"
        raise InputError(f"{folder}: not a split folder (no train file) and not one data file "
                         f"(data files: {listed}); point --data at the file")
    return files[0]


def _split_file(folder: Path, part: str) -> Path:
    pattern = re.compile(_SPLIT_FILE.format(part=part))
    found = sorted(p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name))
    if not found:
        raise InputError(f"{folder}: no {part} file (expected {part}.txt, {part}.csv or {part}.tsv, "
                         "optionally .gz)")
    if len(found) > 1:
        raise InputError(f"{folder}: several {part} files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _names(path: Path) -> dict[str, str]:
    """Invert a `{name: id}` JSON map into id (as written in the data files) -> name."""
    if not path.exists():
        return {}
    try:
        mapping = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(mapping, dict):
        raise InputError(f"{path}: expected a JSON object of name -> id")
    return {str(v): str(k) for k, v in mapping.items()}


# ---------------------------------------------------------------------------------------------
# k-core, remap, split

def _vocab(ids) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for x in ids:
        if x not in vocab:
            vocab[x] = len(vocab)
    return vocab


def _sorted_ids(vocab: dict[str, int], start: int,
                keep: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Kept ids sorted numerically when all are integers, else as strings; and code -> new id."""
    names = [x for x, c in vocab.items() if keep is None or keep[c]]
    if all(_is_int(x) for x in names):
        names.sort(key=lambda x: (int(x), x))
    else:
        names.sort()
    rank = np.full(len(vocab), -1, dtype=np.int64)
    rank[[vocab[x] for x in names]] = np.arange(start, start + len(names))
    return names, rank


def _kcore(u: np.ndarray, i: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop users and items with fewer than k interactions until none is left to drop."""
    while len(u):
        keep = (np.bincount(u)[u] >= k) & (np.bincount(i)[i] >= k)
        if keep.all():
            break
        u, i = u[keep], i[keep]
    return u, i


def _build(name: str, path: Path, users: list[str], items: list[str], chronological: bool,
           kcore: int) -> Dataset:
    """k-core, remap and leave-one-out split of flat interactions given in per-user time order."""
    if not users:
        raise InputError(f"{path}: no interactions")
    user_vocab, item_vocab = _vocab(users), _vocab(items)
    u = np.fromiter((user_vocab[x] for x in users), np.int64, len(users))
    i = np.fromiter((item_vocab[x] for x in items), np.int64, len(items))
    keep_u = keep_i = None
    if kcore:
        u, i = _kcore(u, i, kcore)
        if not len(u):
            raise InputError(f"{path}: no interactions left after {kcore}-core filtering")
        keep_u = np.bincount(u, minlength=len(user_vocab)) > 0
        keep_i = np.bincount(i, minlength=len(item_vocab)) > 0
    user_ids, urank = _sorted_ids(user_vocab, 0, keep_u)
    item_ids, irank = _sorted_ids(item_vocab, 1, keep_i)
    u, i = urank[u], irank[i]
    order = np.argsort(u, kind="stable")    # stable keeps each user's time order
    bounds = np.cumsum(np.bincount(u, minlength=len(user_ids)))[:-1]
    seqs = np.split(i[order], bounds)
    return from_sequences(name, seqs, user_ids, [""] + item_ids, chronological)
