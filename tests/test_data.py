"""Data readers, subsets and the leave-one-out split."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from feddmmr.data.dataset import load_dataset
from feddmmr.data.readers import DataError, TableColumns, detect_layout, read_interactions

from .conftest import write_ratings


def test_official_layout_is_detected_and_sorted_by_time(tmp_path):
    rows = [(1, 5, 4, 30), (1, 3, 4, 10), (1, 7, 4, 20), (2, 1, 3, 5), (2, 2, 3, 6), (2, 3, 3, 7)]
    folder = write_ratings(tmp_path / "ml", rows)
    assert detect_layout(folder) == "ml1m"
    data = load_dataset(folder)
    assert data.layout == "ml1m"
    assert list(data.sequence(0)) == [3, 7, 5]  # by timestamp, not file order
    assert data.num_items == 21  # movies.dat lists 1..20 -> raw MovieID index, 0 = padding
    assert data.titles[3].startswith("Movie 3")


def test_equal_timestamps_keep_file_order(tmp_path):
    rows = [(1, 9, 4, 10), (1, 4, 4, 10), (1, 6, 4, 10), (1, 2, 4, 5)]
    data = load_dataset(write_ratings(tmp_path / "ml", rows))
    assert list(data.sequence(0)) == [2, 9, 4, 6]


def test_leave_one_out_split(tiny_ml1m):
    data = load_dataset(tiny_ml1m)
    seq = data.sequence(3)
    start, end, target = data.split_bounds("val")
    assert list(data.items[start[3]:end[3]]) == list(seq[:-2]) and target[3] == seq[-2]
    start, end, target = data.split_bounds("test")
    assert list(data.items[start[3]:end[3]]) == list(seq[:-1]) and target[3] == seq[-1]
    padded = data.padded_inputs("test", max_len=50)
    assert padded.shape == (data.num_users, 50)
    assert list(padded[3][-(len(seq) - 1):]) == list(seq[:-1]) and padded[3][0] == 0


def test_ordered_layout(tmp_path):
    path = tmp_path / "interactions_all_users_ordered.tsv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("UserID\tMovieID\tSeqPos\n1\t10\t2\n1\t11\t0\n1\t12\t1\n2\t5\t0\n2\t6\t1\n2\t7\t2\n")
    assert detect_layout(tmp_path) == "ml1m-ordered"
    data = load_dataset(tmp_path)
    assert list(data.sequence(0)) == [11, 12, 10]
    assert data.num_items == 13


def test_custom_table_is_remapped_and_mapping_saved(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("uid,sku,ts,stars\n"
                    "alice,b-2,2024-01-02,5\nalice,a-1,2024-01-01,4\nalice,c-3,2024-01-03,3\n"
                    "bob,c-3,2024-01-01,1\nbob,a-1,2024-01-02,2\nbob,d-4,2024-01-05,2\n"
                    "carol,a-1,2024-01-01,2\n")
    data = load_dataset(path, columns=TableColumns("uid", "sku", "ts", "stars"))
    assert data.layout == "table" and data.num_items == 5 and data.num_users == 2
    assert data.dropped_users == 1  # carol has one interaction
    assert [data.item_raw_ids[i] for i in data.sequence(0)] == ["a-1", "b-2", "c-3"]
    data.save_item_mapping(tmp_path / "map.tsv")
    assert (tmp_path / "map.tsv").read_text().splitlines()[1] == "1\ta-1"


def test_parquet_table(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"user": [1, 1, 1, 2, 2, 2], "item": [7, 8, 9, 9, 8, 7], "timestamp": [1, 2, 3, 1, 2, 3]})
    frame.to_parquet(tmp_path / "x.parquet")
    data = load_dataset(tmp_path / "x.parquet")
    assert data.num_users == 2 and data.num_items == 4


def test_a_tables_raw_ids_are_indexed_in_string_order_by_hashing_them_not_by_sorting_every_row(tmp_path,
                                                                                              monkeypatch):
    """Raw ids are strings: index 1.. follows their sorted (string) order, the order ``np.unique`` gives.
    Only the distinct ids are sorted: sorting one Python string per interaction held the GIL for
    minutes at 10^7 interactions (a Flower ClientApp's heartbeat stopped, and its SuperNode gave up on it)."""
    import pandas as pd

    from feddmmr.data.dataset import unique_inverse

    rng = np.random.default_rng(0)
    for values in ([], ["9"], ["10", "9", "10", "", "é", "B", "a", "9"],
                   [str(v) for v in rng.integers(0, 500, 3000)]):
        values = np.array(values, dtype=object)
        expected, got = np.unique(values, return_inverse=True), unique_inverse(values)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(expected, got)), values[:8]

    frame = pd.DataFrame({"user_id": np.repeat([30, 4, 200], 4), "item_id": [10, 9, 100, 2] * 3,
                          "timestamp": np.tile(np.arange(4), 3)})
    frame.to_parquet(tmp_path / "events.parquet")
    sort = np.unique

    def no_object_rows(values, *args, **kwargs):
        assert np.asarray(values).dtype != object, "a sort of every row's string id"
        return sort(values, *args, **kwargs)

    table = read_interactions(tmp_path / "events.parquet")  # integer ids, read as the strings they print as
    assert table.users.tolist() == frame.user_id.astype(str).tolist()
    assert table.items.tolist() == frame.item_id.astype(str).tolist()
    monkeypatch.setattr(np, "unique", no_object_rows)
    data = load_dataset(tmp_path / "events.parquet")
    assert data.user_ids.tolist() == ["200", "30", "4"]  # string order, as the ids are read
    assert data.item_raw_ids[1:].tolist() == ["10", "100", "2", "9"]
    assert [data.item_raw_ids[i] for i in data.sequence(0)] == ["10", "9", "100", "2"]


def test_users_with_fewer_than_three_interactions_are_dropped_and_counted(tmp_path, caplog):
    rows = [(1, 1, 5, 1), (1, 2, 5, 2), (1, 3, 5, 3), (2, 1, 5, 1), (2, 2, 5, 2)]
    data = load_dataset(write_ratings(tmp_path / "ml", rows))
    assert data.num_users == 1 and data.dropped_users == 1
    assert "dropped 1 user" in caplog.text


def test_top_users_breaks_ties_by_smaller_id(tmp_path):
    rows = [(u, i, 5, i) for u in (5, 3, 9) for i in range(1, 5)] + [(7, i, 5, i) for i in range(1, 7)]
    data = load_dataset(write_ratings(tmp_path / "ml", rows), top_users=2)
    assert sorted(data.user_ids.tolist()) == [3, 7]


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content, line, problem", [
    ("1::2::3::4\n1::2::3\n", 2, "expected 4 fields"),
    ("1::2::3::4\n1::2::3::4::5\n", 2, "expected 4 fields"),
    ("1::2::3::4\n1::x::3::4\n", 2, "MovieID 'x' is not an integer"),
    ("1::2::3::4\n1::2::3::4\nabc\n", 3, "expected 4 fields"),
])
def test_malformed_ratings_lines_name_file_and_line(tmp_path, content, line, problem):
    (tmp_path / "ratings.dat").write_text(content)
    with pytest.raises(DataError) as info:
        read_interactions(tmp_path)
    assert info.value.line == line and problem in str(info.value)
    assert str(tmp_path / "ratings.dat") in str(info.value)


def test_wrong_encoding_is_reported_with_line(tmp_path):
    (tmp_path / "ratings.dat").write_bytes(b"1::2::3::4\n1::2\xff::3::4\n")
    with pytest.raises(DataError, match=r"ratings.dat:2: wrong encoding"):
        read_interactions(tmp_path)


def test_utf16_file_is_reported_as_wrong_encoding(tmp_path):
    (tmp_path / "ratings.dat").write_bytes("1::2::3::4\n".encode("utf-16"))
    with pytest.raises(DataError, match="wrong encoding"):
        read_interactions(tmp_path)


def test_movies_dat_wrong_field_count(tmp_path):
    folder = write_ratings(tmp_path / "ml", [(1, 1, 5, 1), (1, 2, 5, 2), (1, 3, 5, 3)])
    (folder / "movies.dat").write_bytes(b"1::Toy Story (1995)::Animation\n2::Jumanji (1995)\n")
    with pytest.raises(DataError, match=r"movies.dat:2: expected 3 fields"):
        load_dataset(folder)


def test_empty_file(tmp_path):
    (tmp_path / "ratings.dat").write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_interactions(tmp_path)


def test_missing_data_says_where_to_get_movielens(tmp_path):
    with pytest.raises(DataError, match="ml-1m.zip"):
        read_interactions(tmp_path / "nope")
    with pytest.raises(DataError, match="no recognised data files"):
        read_interactions(tmp_path)


def test_ordered_file_bad_header_and_bad_value(tmp_path):
    path = tmp_path / "interactions_all_users_ordered.tsv"
    path.write_text("user\titem\tpos\n1\t2\t0\n")
    with pytest.raises(DataError, match=r":1: header must be"):
        read_interactions(tmp_path)
    path.write_text("UserID\tMovieID\tSeqPos\n1\t2\t0\n1\t2.5\t1\n")
    with pytest.raises(DataError, match=r":3: MovieID '2.5' is not an integer"):
        read_interactions(tmp_path)


def test_table_errors_name_column_and_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("user,item,timestamp\na,x,1\nb,y,notatime\n")
    with pytest.raises(DataError, match=r"t.csv:3: column 'timestamp' value 'notatime'"):
        read_interactions(path)
    path.write_text("u,i,timestamp\na,x,1\n")
    with pytest.raises(DataError, match=r"t.csv:1: cannot find the user and item column\(s\) among \['u', 'i', "
                                        r"'timestamp'\] .*name them with --user-col/--item-col"):
        read_interactions(path)
    path.write_text("user,item,timestamp\na,x,1\na,y,2,9\n")
    with pytest.raises(DataError, match="malformed table"):
        read_interactions(path)
    path.write_bytes(b"user,item,timestamp\na,\xff\xfe,1\n")
    with pytest.raises(DataError, match="wrong encoding"):
        read_interactions(path)


# --------------------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feddmmr.cli", *args], capture_output=True, text=True)


def test_cli_data_stats_json(tiny_ml1m):
    result = run_cli("data", "stats", "--data", str(tiny_ml1m), "--top-users", "10", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["users"] == 10 and stats["layout"] == "ml1m"
    assert {"items", "interactions", "min_seq_len", "max_seq_len"} <= set(stats)


def test_cli_error_is_one_clear_line(tmp_path):
    result = run_cli("data", "stats", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "ml-1m.zip" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_ml1m_top1000_matches_the_seed(ml1m):
    data = load_dataset(ml1m, top_users=1000)
    stats = data.stats()
    assert stats["users"] == 1000 and stats["interactions"] == 515329
    assert stats["min_seq_len"] == 293 and data.num_items == 3953


@pytest.mark.integration
def test_ml1m_all_users(ml1m):
    data = load_dataset(ml1m)
    assert data.num_users == 6040 and data.lengths.sum() == 1000209
    assert np.all(np.diff(data.offsets) >= 20)
