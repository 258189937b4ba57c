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


# --- RecBole atomic files ---------------------------------------------------------------------

def test_recbole_inter_any_column_order_extra_fields_by_time(tmp_path):
    text = ("rating:float\ttimestamp:float\titem_id:token\tuser_id:token\tlabel:token\r\n"
            "5\t30\tB3\tA1\tx\r\n4\t10\tB1\tA1\ty\r\n3\t20\tB2\tA1\tz\r\n1\t20\tB9\tA1\tz\r\n"
            "2\t5\tB1\tA2\tx\r\n")
    path = write(tmp_path / "shop.inter", text)
    assert detect_format(path) == "recbole"
    ds = load_dataset(path)
    assert ds.data_format == "recbole" and ds.chronological
    assert seqs_by_name(ds) == {"A1": ["B1", "B2", "B9", "B3"], "A2": ["B1"]}    # ties keep file order
    assert split_of(ds, "A1") == ([1, 2], 4, 3)
    # other field names a table header may use (as `table` reads them) are accepted too
    other = write(tmp_path / "mm.inter", "userID:token\titemID:token\ttime:float\nA1\tB2\t9\nA1\tB1\t3\n")
    assert seqs_by_name(load_dataset(other)) == {"A1": ["B1", "B2"]}


def test_recbole_inter_without_timestamp_keeps_file_order(tmp_path):
    path = write(tmp_path / "t.inter", "user_id:token\titem_id:token\n1\t30\n1\t10\n1\t20\n2\t10\n")
    assert seqs_by_name(load_dataset(path)) == {"1": ["30", "10", "20"], "2": ["10"]}
    # id-sorted lines betray a lost time order, as in sequence text
    path = write(tmp_path / "s.inter", "user_id:token\titem_id:token\n" + "".join(f"1\t{i}\n" for i in range(1, 6)))
    with pytest.warns(UserWarning, match="sorted by item id"):
        assert not load_dataset(path).chronological


def test_recbole_inter_in_a_folder_beside_its_entity_files(tmp_path):
    write(tmp_path / "ml" / "ml.inter", "user_id:token\titem_id:token\n1\t5\n1\t6\n")
    write(tmp_path / "ml" / "ml.item", "item_id:token\ttitle:token_seq\n5\tA film\n")
    write(tmp_path / "ml" / "ml.user", "user_id:token\tage:float\n1\t30\n")
    ds = load_dataset(tmp_path / "ml")
    assert ds.data_format == "recbole" and seqs_by_name(ds) == {"1": ["5", "6"]}


# user 1: 12 10 13 11 | valid 14 | test 15; user 2 (3 items, no train row): 20 | 21 | 22; user 3: train only
BENCH = {
    "train": "user_id:token\titem_id_list:token_seq\titem_id:token\r\n"
             "1\t12 10 13\t11\r\n3\t30\t31\r\n1\t12\t10\r\n1\t12 10\t13\r\n",
    "valid": "user_id:token\titem_id_list:token_seq\titem_id:token\r\n1\t12 10 13 11\t14\r\n2\t20\t21\r\n",
    "test": "item_id:token\tuser_id:token\titem_id_list:token_seq\r\n15\t1\t12 10 13 11 14\r\n22\t2\t20 21\r\n",
}


def bench_folder(root: Path, **parts: str) -> Path:
    for part, text in {**BENCH, **parts}.items():
        write(root / f"toy.{part}.inter", text)
    return root


def test_recbole_benchmark_rebuilds_sequences_and_keeps_the_split(tmp_path):
    folder = bench_folder(tmp_path / "toy")
    assert detect_format(folder) == "recbole"
    ds = load_dataset(folder)
    assert ds.name == "toy/toy" and ds.data_format == "recbole"
    assert seqs_by_name(ds) == {"1": ["12", "10", "13", "11", "14", "15"], "2": ["20", "21", "22"],
                                "3": ["30", "31"]}
    assert [ds.item_ids[i] for i in ds.train_seq(ds.user_ids.index("1"))] == ["12", "10", "13", "11"]
    assert split_of(ds, "2")[1:] == (ds.item_ids.index("21"), ds.item_ids.index("22"))
    assert split_of(ds, "3")[1:] == (0, 0)
    # any one of the files names the whole split, and the same sequences as text give the same dataset
    again = load_dataset(folder / "toy.valid.inter", fmt="recbole")
    text = load_dataset(write(tmp_path / "toy.txt", "1 12 10 13 11 14 15\n2 20 21 22\n3 30 31\n"))
    for other in (again, text):
        assert other.user_ids == ds.user_ids and other.item_ids == ds.item_ids
        for key in ("train_ptr", "train_items", "valid", "test"):
            assert np.array_equal(getattr(other, key), getattr(ds, key)), key


def test_recbole_benchmark_with_histories_cut_to_a_maximum_length(tmp_path):
    # RecBole cuts item_id_list to MAX_ITEM_LIST_LENGTH (here 2): the prefix rows still give the whole sequence
    folder = bench_folder(tmp_path / "cut",
                          train="user_id:token\titem_id_list:token_seq\titem_id:token\n"
                                "1\t12\t10\n1\t12 10\t13\n1\t10 13\t11\n",
                          valid="user_id:token\titem_id_list:token_seq\titem_id:token\n1\t13 11\t14\n",
                          test="user_id:token\titem_id_list:token_seq\titem_id:token\n1\t11 14\t15\n")
    assert seqs_by_name(load_dataset(folder)) == {"1": ["12", "10", "13", "11", "14", "15"]}


RECBOLE_ERRORS = [
    # (file, its text, expected substring after "FILE:LINE: ")
    ("h.inter", "user_id\titem_id:token\n1\t2\n", ":1: header field 'user_id' is not name:type"),
    ("h.inter", "user_id:string\titem_id:token\n1\t2\n", ":1: header field 'user_id:string' has type 'string'"),
    ("h.inter", "user_id:token\tthing:token\n1\t2\n",
     ":1: missing field 'item_id:token' (header has: user_id:token, thing:token)"),
    ("h.inter", "user_id:token\titem_id:token_seq\n1\t2\n", ":1: field 'item_id' has type 'token_seq', expected 'item_id:token'"),
    ("h.inter", "user_id:token\titem_id:token\tuser_id:float\n", ":1: header field 'user_id' appears twice"),
    ("h.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t4\tsoon\n",
     ":3: field 'timestamp' value 'soon' is not a finite number"),
    ("h.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n", ":2: field 'timestamp' value 'nan'"),
    ("h.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\n", ":2: expected 3 tab-separated fields"),
    ("h.inter", "user_id:token\titem_id:token\n\t2\n", ":2: field 'user_id' is empty"),
    ("h.inter", "user_id:token\titem_id:token\n", ": has a header but no rows"),
    ("h.inter", BENCH["valid"], ":1: field 'item_id_list' makes this a RecBole benchmark file"),
    ("b.train.inter", "user_id:token\titem_id_list:token\titem_id:token\n1\t10\t11\n",
     ":1: field 'item_id_list' has type 'token', expected 'item_id_list:token_seq'"),
    ("b.train.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n1\t10\t11\n1\t10 12\t13\n",
     ":3: user 1's item_id_list '10 12' does not continue the sequence of the user's earlier rows ('10 11' ends it)"),
    ("b.valid.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n1\t12 10 13 9\t14\n",
     ":2: user 1's item_id_list '12 10 13 9' does not continue the sequence of the user's earlier rows ('12 10 13 11' ends it)"),
    ("b.test.inter", "user_id:token\titem_id_list:token_seq\titem_id:token\n1\t12 10 13 11 14\t15\n1\t12\t1\n",
     ":3: user 1 has a second test row (first at line 2)"),
]


@pytest.mark.parametrize("name, text, expect", RECBOLE_ERRORS, ids=[e[2][:40] for e in RECBOLE_ERRORS])
def test_recbole_bad_files_are_one_line_errors(tmp_path, name, text, expect):
    if ".train." in name or ".valid." in name or ".test." in name:
        bench_folder(tmp_path)
        for old in tmp_path.glob("toy.*"):
            old.rename(tmp_path / old.name.replace("toy.", "b."))
    path = write(tmp_path / name, text)
    assert str(path) + expect in input_error(str(path), path, fmt="recbole" if name == "h.inter" else "auto")


def test_recbole_benchmark_folder_errors(tmp_path):
    folder = bench_folder(tmp_path / "b")
    assert "kcore=2 cannot be applied to a RecBole benchmark split" in input_error(str(folder), folder, kcore=2)
    (folder / "toy.test.inter").unlink()
    assert "the RecBole benchmark split toy has no toy.test.inter" in input_error(str(folder), folder / "toy.train.inter")
    bench_folder(folder)
    write(folder / "other.train.inter", BENCH["train"])
    assert "holds several RecBole benchmark splits (other, toy)" in input_error(str(folder), folder)


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
    # user 1: train 5, valid 3 (user 2 trains on it), test 7 (in nobody's train); user 2 is too short to evaluate
    assert "unseen items   valid 0.0% / test 100.0% of the held-out items" in text


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


def test_real_amazon_baby_chrono_benchmark_equals_its_sequence_file(shared_data):
    """The RecBole benchmark files rebuild exactly the sequences and the split of Baby_chrono.txt."""
    folder = shared_data / "amazon-baby-chrono"
    bench = load_dataset(resolve("amazon-baby-chrono"))
    text = load_dataset(folder / "Baby_chrono.txt")
    assert (bench.data_format, text.data_format) == ("recbole", "seq")
    assert bench.name == "amazon-baby-chrono/baby"
    assert bench.user_ids == text.user_ids and bench.item_ids == text.item_ids
    for key in ("train_ptr", "train_items", "valid", "test"):
        assert np.array_equal(getattr(bench, key), getattr(text, key)), key
    s = bench.stats()
    assert (s["users"], s["items"], s["interactions"], s["users_with_test"]) == (19_445, 7_050, 160_792, 19_445)
    assert bench.chronological and text.chronological
    u = bench.user_ids.index("1")        # valid line 3: `1<TAB>5403 1434 2828 0<TAB>5176`, test target 1177
    assert [bench.item_ids[i] for i in bench.train_seq(u)] == ["5403", "1434", "2828", "0"]
    assert (bench.item_ids[bench.valid[u]], bench.item_ids[bench.test[u]]) == ("5176", "1177")


def test_real_mind_small(shared_data):
    ds = load_dataset(shared_data / "mind-small" / "behaviors.tsv")
    # every user here has a history or a click, so none is dropped
    assert ds.n_users == 4_637
    assert ds.stats()["interactions"] == 138_932 + 7_542
    assert ds.chronological
    # the test item is each user's last impression click, fresh news: a quarter are in no train sequence (valid: 12%)
    assert ds.unseen_targets() == pytest.approx({"valid": 540 / 4_509, "test": 1_139 / 4_509})


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
