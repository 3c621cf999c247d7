"""The pieces every data reader shares: the error type, the interaction table, strict text lines,
integer fields, duplicate-line handling and the ML-1M catalogue files (``movies.dat``).

Every reader returns an :class:`Interactions` table in file order plus a key that orders each
user's interactions in time. Every problem is raised as :class:`DataError` naming the file,
the line and what is wrong: nothing is silently skipped.

Two deliberate leniencies, both loud: exact duplicate lines (every field the reader uses equal,
typically a file concatenated twice) are dropped with a warning naming the file, the count and the
first repeated line, because they carry no information yet would double-count an interaction (the
same item at another time is a real re-consumption and stays); and catalogue files
(movies.dat, users.dat) are read as UTF-8 when the whole file is valid UTF-8, else as ISO-8859-1
(the encoding of the real ML-1M), so a re-encoded copy keeps its accented titles.

MovieLens ids index the item embedding directly, so they must be integers in
``1..MAX_ITEM_ID``; larger or arbitrary ids belong in the 'table' layout, which remaps them.

The layouts are read by :mod:`.readers` (ML-1M, detection, the entry point) and :mod:`.formats`
(RecBole, MovieLens 100K/10M+, generic tables, item files).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# the duplicate-line warning keeps the logger name it had before these pieces left readers.py
log = logging.getLogger("feddmmr.data.readers")

GROUPLENS_HINT = (
    "Download MovieLens-1M from GroupLens (https://files.grouplens.org/datasets/movielens/ml-1m.zip), "
    "unzip it and pass the folder with --data. Accepted layouts: 'ml1m' (a folder with ratings.dat "
    "[UserID::MovieID::Rating::Timestamp], movies.dat, users.dat), 'ml1m-ordered' (a folder with "
    "interactions_all_users_ordered.tsv[.gz] [UserID, MovieID, SeqPos]), 'ml100k' (u.data, u.item), "
    "'ml10m' (MovieLens 10M/20M/25M/32M: ratings.dat + movies.dat + tags.dat, or ratings.csv + movies.csv), "
    "'recbole' (RecBole atomic files NAME.inter [+ NAME.item]) or 'table' (a CSV/TSV/Parquet "
    "file with user, item, timestamp and optional rating columns)."
)
INT64_MAX = 2**63 - 1
# ids index the embedding table directly: 10M rows is already several GB of parameters
MAX_ITEM_ID = 10_000_000
ID_FIELDS = {"UserID": INT64_MAX, "MovieID": MAX_ITEM_ID}  # field -> largest accepted value
CATALOGUE_ENCODINGS = ("utf-8", "iso-8859-1")


class DataError(ValueError):
    """A problem with an input file; the message names the file and, when known, the line."""

    def __init__(self, path: Path | str, problem: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass
class Interactions:
    """One row per interaction, in file order. ``order`` sorts a user's rows in time."""

    users: np.ndarray  # int64 raw ids, or object (str) for custom tables
    items: np.ndarray
    order: np.ndarray  # timestamp or sequence position
    ratings: np.ndarray | None
    layout: str
    source: Path
    titles: dict  # raw item id -> display title (may be empty)
    known_items: np.ndarray | None = None  # raw ids listed in a catalogue file (movies.dat)
    metadata: object = None  # formats.ItemMetadata of the dataset's item file (remapped layouts)
    item_column: str | None = None  # the table's item column (a RecBole .item file is keyed by it)


@dataclass(frozen=True)
class TableColumns:
    """A table's column names; None = found by its common names (``formats.COLUMN_NAMES``)."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    rating: str | None = None


# --------------------------------------------------------------------------- text lines

def _read_raw(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    if not path.exists():
        raise DataError(path, "file not found. " + GROUPLENS_HINT)
    if not path.is_file():
        raise DataError(path, "not a regular file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(path, f"corrupt gzip data ({exc})") from None
    return raw


def _open_text_lines(path: Path, encoding: str | tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) with strict decoding and a clear error per bad line.

    With several encodings the first that decodes the whole file is used (a UTF-8 BOM is ignored).
    """
    raw = _read_raw(path)
    if not raw.strip():
        raise DataError(path, "file is empty")
    nul = 0 if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.find(b"\x00")
    if nul >= 0:
        expected = encoding if isinstance(encoding, str) else " or ".join(encoding)
        raise DataError(path, f"wrong encoding: NUL byte or UTF-16 byte order mark (UTF-16 or binary data?); "
                              f"expected {expected} text", raw.count(b"\n", 0, nul) + 1)
    if raw[:3] == b"\xef\xbb\xbf":
        raw = raw[3:]
    if not isinstance(encoding, str):
        encoding = next((e for e in encoding[:-1] if _decodes(raw, e)), encoding[-1])
    empty = True
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataError(path, f"wrong encoding: byte {line[exc.start]:#04x} at column {exc.start + 1} "
                                  f"is not valid {encoding}", number) from None
        text = text.rstrip("\r")
        if text.strip():
            empty = False
            yield number, text
    if empty:  # only (Unicode) whitespace, e.g. a lone \x1c
        raise DataError(path, "file is empty")


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def _int_field(path: Path, number: int, value: str, name: str) -> int:
    try:
        number_value = int(value)
    except ValueError:
        raise DataError(path, f"{name} {value!r} is not an integer", number) from None
    if not -INT64_MAX - 1 <= number_value <= INT64_MAX:
        raise DataError(path, f"{name} {value.strip()} is out of range (beyond 64-bit integers)", number)
    if name in ID_FIELDS:
        _check_id(path, number, number_value, name)
    return number_value


def _check_id(path: Path, number: int | None, value: int, name: str) -> None:
    """Ids are positive; MovieIDs index the embedding, so an absurdly large one is refused too."""
    if value < 1:
        raise DataError(path, f"{name} {value} is not a positive integer", number)
    if value > ID_FIELDS[name]:
        raise DataError(path, f"{name} {value} is larger than {ID_FIELDS[name]:,} (it would index an item "
                              "embedding of that many rows); use the 'table' layout, which remaps ids", number)


def _split_fields(path: Path, number: int, text: str, sep: str, expected: int, form: str) -> list[str]:
    fields = text.split(sep)
    if len(fields) != expected:
        raise DataError(path, f"expected {expected} fields ({form}), found {len(fields)}", number)
    return fields


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.exists():
            return candidate
    return None


def _int_rows(path: Path, sep: str, names: tuple[str, ...], header: bool = False) -> np.ndarray:
    """Parse a file of integer fields into an ``[n, len(names)]`` int64 array.

    A fast C parser handles clean files; on any doubt the line-by-line parser runs and
    raises the precise error (file, line, problem).
    """
    import io

    import pandas as pd

    form = sep.join(names) if sep != "\t" else ", ".join(names)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
        if sep != "\t":
            text = text.replace(sep, "\t")
        frame = pd.read_csv(io.StringIO(text), sep="\t", header=0 if header else None, dtype=np.int64,
                            engine="c", skip_blank_lines=True)
        if frame.shape[1] == len(names) and len(frame) and (not header or list(frame.columns) == list(names)):
            table = frame.to_numpy(dtype=np.int64)
            _check_id_columns(path, table, names, header)
            return table
    except DataError:
        raise
    except Exception:
        pass
    lines = _open_text_lines(path, "utf-8")
    if header:
        number, first = next(lines)
        if first.split(sep) != list(names):
            raise DataError(path, f"header must be {form!r}, found {first!r}", number)
    rows = []
    for number, text_line in lines:
        fields = _split_fields(path, number, text_line, sep, len(names), form)
        rows.append([_int_field(path, number, v, n) for v, n in zip(fields, names)])
    if not rows:
        raise DataError(path, "file has no interactions" + (" after its header" if header else ""))
    return np.asarray(rows, dtype=np.int64)


def _check_id_columns(path: Path, table: np.ndarray, names: tuple[str, ...], header: bool) -> None:
    """Vectorised id range check of a parsed table; the first offender is reported with its line."""
    for column, name in enumerate(names):
        if name not in ID_FIELDS:
            continue
        bad = np.flatnonzero((table[:, column] < 1) | (table[:, column] > ID_FIELDS[name]))
        if bad.size:
            row = int(bad[0])
            _check_id(path, _data_line(path, row, header), int(table[row, column]), name)


def _data_line(path: Path, row: int, header: bool) -> int | None:
    """The file line of the 0-based data ``row`` (blank lines and the header skipped); only on errors."""
    lines = _open_text_lines(path, "utf-8")
    if header:
        next(lines, None)
    for index, (number, _) in enumerate(lines):
        if index == row:
            return number
    return None


def drop_duplicate_rows(path: Path, columns: list[np.ndarray], header: bool) -> np.ndarray | None:
    """Indices of the rows to keep when some rows repeat an earlier one in every column, else None.

    Exact duplicates carry no information but would count an interaction twice, so they are
    dropped with a warning naming the first repeated line (documented in the module docstring).
    """
    import pandas as pd

    codes = {i: pd.factorize(c)[0] if c.dtype == object else c for i, c in enumerate(columns)}  # ints hash faster
    duplicated = pd.DataFrame(codes).duplicated(keep="first").to_numpy()
    if not duplicated.any():
        return None
    first = int(np.flatnonzero(duplicated)[0])
    line = _data_line(path, first, header) if path.suffix.lower() != ".parquet" else None
    where = f"line {line}" if line is not None else f"row {first + 1}"
    log.warning("%s: dropped %d exact duplicate line(s) (the first is %s)", path, int(duplicated.sum()), where)
    return np.flatnonzero(~duplicated)

def _dedupe(path: Path, table: np.ndarray, header: bool) -> np.ndarray:
    keep = drop_duplicate_rows(path, [table[:, i] for i in range(table.shape[1])], header)
    return table if keep is None else table[keep]


# --------------------------------------------------------------------------- catalogue files

def read_movie_catalogue(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """movies.dat: ``MovieID::Title::Genres`` (ISO-8859-1, or UTF-8). Returns MovieID -> 'Title (Year)'
    and MovieID -> 'A|B|C', from one pass over the file."""
    titles: dict[int, str] = {}
    genres: dict[int, str] = {}
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        movie, title, genre = _split_fields(path, number, text, "::", 3, "MovieID::Title::Genres")
        movie = _int_field(path, number, movie, "MovieID")
        titles[movie], genres[movie] = title, genre
    return titles, genres


def read_movies(path: Path) -> dict[int, str]:
    """movies.dat titles by MovieID."""
    return read_movie_catalogue(path)[0]


def read_json_gz(path: Path) -> dict:
    """A (possibly gzipped) JSON object, with the file named in any error."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a valid JSON file ({exc})") from None
