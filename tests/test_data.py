"""Data loading, k-core, remap, split and synthetic generation: tiny hand-made files plus the real data."""
from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from fortress.data import (Dataset, describe, detect_format, from_sequences, load_dataset, resolve,
                           shared_dir, synthetic)
from fortress.errors import InputError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def seqs_by_name(ds: Dataset) -> dict[str, list[str]]:
    """Full sequences (train + valid + test) in original ids, keyed by original user id."""
    return {ds.user_ids[u]: [ds.item_ids[i] for i in ds.full_seq(u)] for u in range(ds.n_users)}


def split_of(ds: Dataset, user: str) -> tuple[list[int], int, int]:
    u = ds.user_ids.index(user)
    return ds.train_seq(u).tolist(), int(ds.valid[u]), int(ds.test[u])


def input_error(path_in_message: str, *args, **kwargs) -> str:
    """Load expecting an InputError; check it is one line naming the file; return the message."""
    with pytest.raises(InputError) as err:
        load_dataset(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert path_in_message in msg
    return msg


# --- seq ---------------------------------------------------------------------------------------

def test_seq_remap_and_split(tmp_path):
    ds = load_dataset(write(tmp_path / "s.txt", "10 5 3 7\n\n2 3 3\n7 9\n"))
    # users and items sorted numerically: "2" < "7" < "10"
    assert ds.user_ids == ["2", "7", "10"]
    assert ds.item_ids == ["", "3", "5", "7", "9"]
    assert ds.n_items == 4 and ds.chronological
    assert split_of(ds, "10") == ([2], 1, 3)         # 5 | valid 3 | test 7
    assert split_of(ds, "2") == ([1, 1], 0, 0)       # fewer than 3: train only, repeats kept
    assert split_of(ds, "7") == ([4], 0, 0)
    assert ds.name == f"{tmp_path.name}/s.txt"


def test_seq_user_on_several_lines_is_concatenated(tmp_path):
    ds = load_dataset(write(tmp_path / "sasrec.txt", "1 5\n1 3\n2 4\n1 4\n"), fmt="seq")
    assert seqs_by_name(ds) == {"1": ["5", "3", "4"], "2": ["4"]}


def test_seq_gz_equals_plain(tmp_path):
    text = "1 4 2 9 7\n2 3 1 2\n"
    plain = load_dataset(write(tmp_path / "a.txt", text))
    gz = load_dataset(write(tmp_path / "b.txt.gz", text))
    assert seqs_by_name(gz) == seqs_by_name(plain) == {"1": ["4", "2", "9", "7"], "2": ["3", "1", "2"]}
    assert np.array_equal(gz.train_items, plain.train_items)


def test_id_sorted_seq_warns_and_is_not_chronological(tmp_path):
    path = write(tmp_path / "sorted.txt", "1 1 2 3 4\n2 2 5 7 9\n3 1 3 8 10\n4 9 2 5 1\n")
    with pytest.warns(UserWarning, match=r"sorted\.txt: items of 75% of users are sorted by item id"):
        ds = load_dataset(path)
    assert not ds.chronological


def test_shuffled_seq_does_not_warn(tmp_path):
    path = write(tmp_path / "shuffled.txt", "1 4 2 3 1\n2 2 5 9 7\n3 10 3 8 1\n4 1 2 3 4\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(path)
    assert ds.chronological


# --- table -------------------------------------------------------------------------------------

def test_table_csv_header_stable_ties(tmp_path):
    text = "User_ID,item_id,rating,Timestamp\na,x,5,300\na,y,4,100\na,z,3,100\nb,x,1,50\n"
    ds = load_dataset(write(tmp_path / "t.csv", text))
    assert ds.user_ids == ["a", "b"] and ds.item_ids == ["", "x", "y", "z"]
    # a: y and z tie at 100 and keep file order, x at 300 is last
    assert split_of(ds, "a") == ([2], 3, 1)
    assert split_of(ds, "b") == ([1], 0, 0)
    swapped = text.replace("a,y,4,100\na,z,3,100", "a,z,3,100\na,y,4,100")
    assert seqs_by_name(load_dataset(write(tmp_path / "t2.csv", swapped)))["a"] == ["z", "y", "x"]


def test_table_header_names_and_column_order(tmp_path):
    text = "reviewerID\tunixReviewTime\tasin\nA1\t20\tB2\nA1\t10\tB1\nA1\t30\tB3\n"
    ds = load_dataset(write(tmp_path / "t.tsv", text))
    assert seqs_by_name(ds) == {"A1": ["B1", "B2", "B3"]}


def test_table_no_header_3_and_4_columns(tmp_path):
    three = load_dataset(write(tmp_path / "t3.tsv", "\n1\t7\t30\n1\t8\t10\n2\t7\t5\n\n1\t9\t20\n"))
    assert seqs_by_name(three) == {"1": ["8", "9", "7"], "2": ["7"]}
    # MovieLens u.data: user item rating timestamp
    four = load_dataset(write(tmp_path / "u.data", "196\t242\t3\t881250949\n196\t302\t3\t881250940\n"))
    assert seqs_by_name(four) == {"196": ["302", "242"]}
    # raw Amazon ratings_*.csv: user,item,rating,timestamp
    amazon = load_dataset(write(tmp_path / "r.csv.gz", "AX,B2,5.0,1385856000\nAX,B1,4.0,1385000000\n"))
    assert seqs_by_name(amazon) == {"AX": ["B1", "B2"]}


def test_table_whitespace_and_double_colon(tmp_path):
    spaced = write(tmp_path / "w.txt", "1 20 978300760\n1 10 978300700\n2 10 978300000\n")
    assert detect_format(spaced) == "table"
    assert seqs_by_name(load_dataset(spaced)) == {"1": ["10", "20"], "2": ["10"]}
    ml1m = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n")
    assert seqs_by_name(load_dataset(ml1m)) == {"1": ["1193", "661"]}


def test_table_iso_dates(tmp_path):
    text = "user,item,date\nu,b,2014-07-23\nu,a,2014-07-22\nu,c,2014-07-23 10:00:00\n"
    assert seqs_by_name(load_dataset(write(tmp_path / "d.csv", text))) == {"u": ["a", "b", "c"]}


# --- mind --------------------------------------------------------------------------------------

MIND = (
    "1\tU2\t11/12/2019 2:00:00 PM\tN1 N2\tN3-0 N4-1\n"
    "2\tU1\t11/11/2019 12:30:00 PM\t\tN10-1\n"
    "3\tU2\t11/11/2019 11:59:59 PM\tN1 N2\tN7-1 N8-0\n"
    "4\tU3\t11/11/2019 1:00:00 PM\t\tN9-0\n"
    "5\tU1\t11/11/2019 9:00:00 AM\t\tN5-1 N6-0\n"
)


def test_mind_history_then_clicks_by_time(tmp_path):
    path = write(tmp_path / "behaviors.tsv", MIND)
    assert detect_format(path) == "mind"
    ds = load_dataset(path)
    # U3 clicked nothing and has no history: dropped; 12:30 PM is after 9:00 AM
    assert seqs_by_name(ds) == {"U1": ["N5", "N10"], "U2": ["N1", "N2", "N7", "N4"]}
    assert ds.item_ids == ["", "N1", "N10", "N2", "N4", "N5", "N7"]
    assert split_of(ds, "U2") == ([1, 3], 6, 4)
    assert split_of(ds, "U1") == ([5, 2], 0, 0)


# --- split folder ------------------------------------------------------------------------------

def split_folder(root: Path, valid: str = "1\t13\t400\n2\t11\t60\n") -> Path:
    write(root / "train.txt", "1\t10\t300\n1\t11\t100\n1\t12\t100\n2\t10\t50\n3\t12\t5\n")
    write(root / "valid.txt", valid)
    write(root / "test.txt.gz", "1\t10\t500\n2\t12\t70\n")
    write(root / "umap.json", json.dumps({"alice": 1, "bob": 2, "carol": 3}))
    write(root / "imap.json", json.dumps({"B10": 10, "B11": 11, "B12": 12, "B13": 13}))
    return root


def test_split_folder_used_as_given(tmp_path):
    path = split_folder(tmp_path / "mini")
    assert detect_format(path) == "split"
    ds = load_dataset(path)
    assert ds.name == "mini"
    assert ds.user_ids == ["1", "2", "3"] and ds.item_ids == ["", "10", "11", "12", "13"]
    assert split_of(ds, "1") == ([2, 3, 1], 4, 1)    # 11, 12 tie at 100 (file order), then 10
    assert split_of(ds, "2") == ([1], 2, 3)          # held-out rows kept even for a short user
    assert split_of(ds, "3") == ([3], 0, 0)          # no valid/test row: train only
    assert ds.user_names["2"] == "bob" and ds.item_names["13"] == "B13"


def test_split_folder_two_valid_rows(tmp_path):
    path = split_folder(tmp_path / "dup", valid="1\t13\t400\n2\t11\t60\n1\t12\t410\n")
    msg = input_error("valid.txt:3", path)
    assert "user 1" in msg and "line 1" in msg


def test_split_folder_rejects_kcore_and_missing_part(tmp_path):
    path = split_folder(tmp_path / "k")
    assert "kcore" in input_error(str(path), path, kcore=2)
    (path / "test.txt.gz").unlink()
    assert "no test file" in input_error(str(path), path)


# --- k-core ------------------------------------------------------------------------------------

def test_kcore_cascades(tmp_path):
    path = write(tmp_path / "k.txt", "1 1 2 3\n2 1 2\n3 3 9\n")
    # (3, 9) goes first; then user 3 has one interaction; then item 3 has one
    ds = load_dataset(path, kcore=2)
    assert seqs_by_name(ds) == {"1": ["1", "2"], "2": ["1", "2"]}
    assert ds.item_ids == ["", "1", "2"]
    assert load_dataset(path, kcore=1).n_users == 3
    assert "no interactions left after 3-core" in input_error("k.txt", path, kcore=3)


# --- bad input ---------------------------------------------------------------------------------

def test_missing_and_empty_files(tmp_path):
    assert "no such file or directory" in input_error("nope.txt", tmp_path / "nope.txt")
    assert "file is empty" in input_error("empty.txt", write(tmp_path / "empty.txt", ""))
    assert "file is empty" in input_error("blank.txt", write(tmp_path / "blank.txt", "\n  \n"))


def test_seq_bad_ids(tmp_path):
    path = write(tmp_path / "bad.txt", "1 2 3\n\n2 4 abc\n")
    msg = input_error("bad.txt:3: item id 'abc' is not an integer", path)
    assert msg.startswith(str(path))
    assert "user 5 has no items" in input_error("lonely.txt:2", write(tmp_path / "lonely.txt", "1 2\n5\n"))


def test_table_errors(tmp_path):
    msg = input_error("nots.csv", write(tmp_path / "nots.csv", "user,item,rating\n1,2,3\n"))
    assert "missing column 'timestamp' (header has: user, item, rating)" in msg
    assert "has a header but no rows" in input_error(
        "hdr.csv", write(tmp_path / "hdr.csv", "user,item,timestamp\n"))
    assert "timestamp 'soon'" in input_error(
        "ts.csv:3", write(tmp_path / "ts.csv", "user,item,timestamp\n1,2,3\n1,3,soon\n"))
    assert "expected 3 columns, got 2" in input_error(
        "short.tsv:2", write(tmp_path / "short.tsv", "1\t2\t3\n1\t2\n"))


def test_bad_gzip(tmp_path):
    junk = tmp_path / "junk.txt.gz"
    junk.write_bytes(b"this is not gzip data")
    assert "not a readable gzip file" in input_error("junk.txt.gz", junk)
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(b"1 2 3 4\n" * 100)[:30])
    assert "not a readable gzip file" in input_error("cut.txt.gz", cut)


def test_mind_errors(tmp_path):
    bad_time = write(tmp_path / "b1.tsv", "1\tU1\tyesterday\t\tN1-1\n")
    assert "time 'yesterday'" in input_error("b1.tsv:1", bad_time, fmt="mind")
    unlabelled = write(tmp_path / "b2.tsv", MIND + "6\tU1\t11/11/2019 9:00:00 AM\t\tN5 N6\n")
    assert "impression 'N5'" in input_error("b2.tsv:6", unlabelled, fmt="mind")


def test_format_choice_errors(tmp_path):
    path = write(tmp_path / "s.txt", "1 2 3\n")
    assert "unknown data format 'xml'" in input_error("xml", path, fmt="xml")
    assert "needs a folder" in input_error("s.txt", path, fmt="split")
    # a non-split folder with one data file (beside docs) loads that file
    write(tmp_path / "README.md", "about\n")
    assert load_dataset(tmp_path, fmt="seq").n_users == 1
    write(tmp_path / "t.txt", "1 2 3\n")
    assert "not one data file (data files: s.txt, t.txt)" in input_error(str(tmp_path), tmp_path, fmt="seq")


# --- detection, paths, describe ----------------------------------------------------------------

def test_detect_format(tmp_path):
    assert detect_format(write(tmp_path / "a.txt", "1 2 3 4\n2 5 6\n")) == "seq"
    assert detect_format(write(tmp_path / "b.txt", "1\t2\t3\n")) == "table"
    assert detect_format(write(tmp_path / "c.csv.gz", "u,i,t\n1,2,3\n")) == "table"
    assert detect_format(write(tmp_path / "d.txt", "AX B1 1385856000\nAY B2 1385856001\n")) == "table"
    assert detect_format(write(tmp_path / "e.txt", "1 2 3\n2 4 5\n")) == "seq"
    # a non-integer on some lines only is a stray token in sequence text (the reader names it), not a table
    assert detect_format(write(tmp_path / "f.txt", "1 2 3 4\n2 3 4 5\n3 x 5 6\n")) == "seq"
    assert "f.txt:3: item id 'x' is not an integer" in input_error("f.txt", tmp_path / "f.txt")
    assert detect_format(write(tmp_path / "g.txt", "1 2 4.0 5\n2 3 3.5 6\n")) == "table"     # ratings on every line
    assert load_dataset(tmp_path / "e.txt").data_format == "seq"
    assert load_dataset(tmp_path / "g.txt").data_format == "table"
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "missing")


def test_resolve_and_shared_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FORTRESS_DATA", str(tmp_path))
    assert shared_dir() == tmp_path
    write(tmp_path / "mine" / "x.txt", "1 2 3\n")
    assert resolve("mine") == tmp_path / "mine"
    assert resolve(str(tmp_path / "mine" / "x.txt")) == tmp_path / "mine" / "x.txt"
    with pytest.raises(InputError) as err:
        resolve("nothing-here")
    assert str(err.value) == (f"data 'nothing-here' not found (looked at nothing-here and {tmp_path}/nothing-here; "
                              "$FORTRESS_DATA names the folder of shared datasets)")


def test_describe(tmp_path):
    text = describe(load_dataset(write(tmp_path / "s.txt", "1 5 3 7\n2 3 3\n")))
    assert "users          2" in text and "interactions   5" in text
    assert "min 2 / p25" in text and "max 3" in text and "chronological  yes" in text


# --- real data ---------------------------------------------------------------------------------

def test_real_amazon_cell_phones(shared_data):
    folder = shared_data / "amazon-cell-phones"
    ds = load_dataset(resolve("amazon-cell-phones"))
    s = ds.stats()
    assert (s["users"], s["items"], s["interactions"]) == (27_879, 10_429, 194_439)
    assert (ds.valid > 0).all() and (ds.test > 0).all()
    user, item, _ = (folder / "test.txt").read_text().splitlines()[0].split("\t")
    assert user == "0"
    u = ds.user_ids.index("0")
    assert ds.item_ids[ds.test[u]] == item
    imap = json.loads((folder / "imap.json").read_text())
    assert imap[ds.item_names[item]] == int(item)


def test_real_amazon_baby_is_not_chronological(shared_data):
    with pytest.warns(UserWarning, match="items of 100% of users are sorted by item id"):
        ds = load_dataset(shared_data / "amazon-baby" / "Baby.txt")
    assert (ds.n_users, ds.n_items) == (19_445, 7_050)
    assert not ds.chronological and ds.name == "amazon-baby/Baby.txt"


def test_real_mind_small(shared_data):
    ds = load_dataset(shared_data / "mind-small" / "behaviors.tsv")
    # every user here has a history or a click, so none is dropped
    assert ds.n_users == 4_637
    assert ds.stats()["interactions"] == 138_932 + 7_542
    assert ds.chronological


# --- synthetic ---------------------------------------------------------------------------------

def test_synthetic_deterministic_and_seeded():
    a, b, c = synthetic(300, 50, seed=1), synthetic(300, 50, seed=1), synthetic(300, 50, seed=2)
    for name in ("train_ptr", "train_items", "valid", "test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.train_items[:100], c.train_items[:100])


def test_synthetic_shape_and_split():
    ds = synthetic(500, 40, seed=0)
    assert ds.n_users == 500 and ds.n_items == 40 and ds.name == "synthetic" and ds.chronological
    assert ds.user_ids[:2] == ["u0", "u1"] and ds.item_ids[:2] == ["", "i1"] and len(ds.item_ids) == 41
    lengths = ds.train_len + 2
    assert lengths.min() >= 5 and lengths.max() <= 60
    assert (ds.valid > 0).all() and (ds.test > 0).all()
    assert ds.train_items.min() >= 1 and ds.train_items.max() <= 40
    # the direct CSR split equals from_sequences on the same sequences
    ref = from_sequences("synthetic", [ds.full_seq(u) for u in range(ds.n_users)], ds.user_ids,
                         ds.item_ids)
    for name in ("train_ptr", "train_items", "valid", "test"):
        assert np.array_equal(getattr(ds, name), getattr(ref, name))


def test_synthetic_mean_length_knob():
    short, long = synthetic(2000, 100, seed=0), synthetic(2000, 100, seed=0, mean_len=40)
    assert (short.train_len + 2).mean() < 10 < 35 < (long.train_len + 2).mean() < 45
    assert (long.train_len + 2).min() >= 5 and (long.train_len + 2).max() <= 160
    with pytest.raises(InputError, match="synthetic_len=5"):
        synthetic(10, 10, mean_len=5)


def test_synthetic_taste_keeps_users_in_their_genre():
    ds = synthetic(1000, 200, seed=0, mean_len=30, taste=1.0)
    plain = synthetic(1000, 200, seed=0, mean_len=30)

    def distinct(d):       # mean share of distinct items in a user's sequence
        return np.mean([len(np.unique(d.full_seq(u))) / len(d.full_seq(u)) for u in range(d.n_users)])
    # a home genre of 10 items makes users revisit a small set; without taste they roam the catalogue
    assert distinct(ds) < distinct(plain) - 0.05
    with pytest.raises(InputError, match="synthetic_taste"):
        synthetic(10, 10, taste=1.5)


def test_synthetic_has_sequential_signal():
    ds = synthetic(2000, 200, seed=0)
    seqs = [ds.full_seq(u) for u in range(ds.n_users)]
    pairs = np.concatenate([s[:-1] * 1000 + s[1:] for s in seqs])
    # about 70% of steps follow one of 3 successors: the top 3 next items cover most transitions
    keys, counts = np.unique(pairs, return_counts=True)
    current = keys // 1000
    top3 = sum(np.sort(counts[current == i])[-3:].sum() for i in np.unique(current))
    assert top3 / len(pairs) > 0.6
