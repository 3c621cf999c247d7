"""Property-based tests of the data readers (hypothesis).

1. Round trip: any valid interaction table, written in the ML-1M ``::`` layout or as a CSV table,
   reads back with the same users, the same counts, each user's items in chronological order
   (ties in file order) and the right item-id mapping; exact duplicate lines count once.
2. Robustness: any byte- or line-level corruption of a valid file either still parses or raises
   :class:`DataError`: never another exception type, never a hang.

The budget is small (``max_examples`` <= 100, derandomised so CI is reproducible): seconds in total.
"""

from __future__ import annotations

import csv
import gzip
import io
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddmmr.data.dataset import MIN_INTERACTIONS, load_dataset
from feddmmr.data.readers import DataError, TableColumns

pytestmark = pytest.mark.reliability

SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SECONDS_PER_EXAMPLE = 20  # a hang fails the test instead of stalling CI


# --------------------------------------------------------------------------- strategies

Row = tuple  # (user, item, rating, timestamp), in file order


@st.composite
def interaction_rows(draw, user_ids, item_ids) -> list[Row]:
    """Some users with 1-8 interactions each (some below the minimum), timestamps with ties, file order shuffled."""
    users = draw(st.lists(user_ids, min_size=1, max_size=6, unique=True))
    rows = []
    for user in users:
        for _ in range(draw(st.integers(1, 8))):
            rows.append((user, draw(item_ids), draw(st.integers(1, 5)), draw(st.integers(0, 30))))
    if draw(st.booleans()):  # a few exact duplicate lines
        rows += draw(st.lists(st.sampled_from(rows), max_size=3))
    return draw(st.permutations(rows))


ML1M_ROWS = interaction_rows(st.integers(1, 2**40), st.integers(1, 3000))
TEXT_IDS = st.text(alphabet="abcxyzABC019-_.:/éß中", min_size=1, max_size=6)
TABLE_ROWS = interaction_rows(TEXT_IDS, TEXT_IDS)


def expected_sequences(rows: list[Row]) -> dict:
    """The oracle: duplicates dropped (first kept), per user stable-sorted by time, short users dropped."""
    seen, unique = set(), []
    for row in rows:
        if row not in seen:
            seen.add(row)
            unique.append(row)
    per_user: dict = {}
    for user, item, _rating, time in unique:
        per_user.setdefault(user, []).append((time, item))
    return {user: [item for _, item in sorted(events, key=lambda e: e[0])]  # sorted() is stable
            for user, events in per_user.items()}


def ml1m_text(rows: list[Row]) -> str:
    return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows)


def table_text(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["user", "item", "rating", "timestamp"])
    writer.writerows(rows)
    return buffer.getvalue()


def recbole_text(rows: list[Row]) -> str:
    return "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)


@contextmanager
def time_limit(seconds: int):
    def fail(*_):
        raise TimeoutError(f"the reader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_round_trip(data, rows: list[Row], raw_item) -> None:
    expected = expected_sequences(rows)
    kept = {u: items for u, items in expected.items() if len(items) >= MIN_INTERACTIONS}
    assert data.dropped_users == len(expected) - len(kept)
    assert [str(u) for u in data.user_ids] == [str(u) for u in sorted(kept)]
    assert data.lengths.tolist() == [len(kept[u]) for u in sorted(kept)]
    for row, user in enumerate(sorted(kept)):
        assert [raw_item(i) for i in data.sequence(row)] == kept[user], f"user {user}"


# --------------------------------------------------------------------------- round trips

@settings(max_examples=60, **SETTINGS)
@given(rows=ML1M_ROWS)
def test_ml1m_layout_round_trips(rows):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "ratings.dat").write_text(ml1m_text(rows))
        try:
            data = load_dataset(folder)
        except DataError as exc:  # only when nobody has enough interactions
            assert "no user has at least" in str(exc)
            assert all(len(s) < MIN_INTERACTIONS for s in expected_sequences(rows).values())
            return
    check_round_trip(data, rows, raw_item=int)  # raw MovieID is the item index
    assert data.num_items == max(item for _, item, _, _ in rows) + 1 and data.item_raw_ids is None


@settings(max_examples=60, **SETTINGS)
@given(rows=TABLE_ROWS)
def test_table_layout_round_trips_and_remaps_ids(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "events.csv"
        path.write_text(table_text(rows), encoding="utf-8")
        try:
            data = load_dataset(path, columns=TableColumns(rating="rating"))
        except DataError as exc:
            assert "no user has at least" in str(exc)
            return
    check_round_trip(data, rows, raw_item=lambda index: data.item_raw_ids[index])
    items = sorted({item for _, item, _, _ in rows})
    assert data.num_items == len(items) + 1 and list(data.item_raw_ids[1:]) == items  # 0 is padding


@settings(max_examples=40, **SETTINGS)
@given(rows=TABLE_ROWS)
def test_recbole_layout_round_trips_and_remaps_ids(rows):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "x.inter").write_text(recbole_text(rows), encoding="utf-8")
        try:
            data = load_dataset(folder)
        except DataError as exc:
            assert "no user has at least" in str(exc)
            return
    assert data.layout == "recbole"
    check_round_trip(data, rows, raw_item=lambda index: data.item_raw_ids[index])


# --------------------------------------------------------------------------- corruptions

@st.composite
def corrupted(draw, clean: bytes) -> bytes:
    """``clean`` after 1-4 random edits: flipped, inserted or deleted bytes, truncation, lines moved."""
    data = bytearray(clean)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "line", "separator"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 12))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "line":  # a line repeated, emptied or swapped for a token
            lines = bytes(data).split(b"\n")
            index = draw(st.integers(0, len(lines) - 1))
            lines[index] = draw(st.sampled_from([lines[index] * 2, b"", b"-1::-1::-1::-1", b"nan,inf,",
                                                 b"99999999999999999999999", b"\xef\xbb\xbf", b"\x00"]))
            data = bytearray(b"\n".join(lines))
        elif kind == "separator":
            data[at:at] = draw(st.sampled_from([b"::", b",", b"\t", b"\r", b"\n", b'"']))
    return bytes(data)


LAYOUT_FILES = {  # file name -> (clean content from rows)
    "ratings.dat": lambda rows: ml1m_text(rows).encode(),
    "u.data": lambda rows: "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows).encode(),
    "x.inter": lambda rows: recbole_text(rows).encode(),
    "ratings.csv": lambda rows: ("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in rows)).encode(),
    "ratings.dat.gz": lambda rows: gzip.compress(ml1m_text(rows).encode(), mtime=0),
    "interactions_all_users_ordered.tsv": lambda rows: ("UserID\tMovieID\tSeqPos\n" + "".join(
        f"{u}\t{i}\t{t}\n" for u, i, _, t in rows)).encode(),
    "events.csv": lambda rows: table_text(rows).encode(),
}


@settings(max_examples=100, **SETTINGS)
@given(name=st.sampled_from(sorted(LAYOUT_FILES)), rows=ML1M_ROWS, data=st.data())
def test_corrupted_files_parse_or_raise_data_error(name, rows, data):
    content = data.draw(corrupted(LAYOUT_FILES[name](rows)), label="corrupted file")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        with time_limit(SECONDS_PER_EXAMPLE):
            try:
                result = load_dataset(path if name.endswith(".csv") else folder)
            except DataError as exc:
                assert str(exc).startswith(str(path)), exc  # the message names the file
                return
    assert result.num_users >= 1 and np.all(result.items >= 1) and np.all(result.items < result.num_items)


@settings(max_examples=50, **SETTINGS)
@given(name=st.sampled_from(sorted(LAYOUT_FILES) + ["movies.dat"]), content=st.binary(max_size=400))
def test_arbitrary_bytes_parse_or_raise_data_error(name, content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).write_bytes(content)
        if name == "movies.dat":  # a catalogue of garbage beside valid ratings
            (Path(folder) / "ratings.dat").write_text("1::1::5::1\n1::2::5::2\n1::3::5::3\n")
        with time_limit(SECONDS_PER_EXAMPLE):
            try:
                load_dataset(Path(folder) / name if name.endswith(".csv") else folder)
            except DataError:
                pass
