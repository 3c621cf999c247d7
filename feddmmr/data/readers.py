"""Readers for the three accepted input layouts.

Every reader returns an :class:`Interactions` table in file order plus a key that orders each
user's interactions in time. Every problem is raised as :class:`DataError` naming the file,
the line and what is wrong: nothing is silently skipped.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

GROUPLENS_HINT = (
    "Download MovieLens-1M from GroupLens (https://files.grouplens.org/datasets/movielens/ml-1m.zip), "
    "unzip it and pass the folder with --data. Accepted layouts: 'ml1m' (a folder with ratings.dat "
    "[UserID::MovieID::Rating::Timestamp], movies.dat, users.dat), 'ml1m-ordered' (a folder with "
    "interactions_all_users_ordered.tsv[.gz] [UserID, MovieID, SeqPos]) or 'table' (a CSV/TSV/Parquet "
    "file with user, item, timestamp and optional rating columns)."
)

ORDERED_NAME = "interactions_all_users_ordered.tsv"
LAYOUTS = ("ml1m", "ml1m-ordered", "table")


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


# --------------------------------------------------------------------------- text lines

def _open_text_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) with strict decoding and a clear error per bad line."""
    if not path.exists():
        raise DataError(path, "file not found. " + GROUPLENS_HINT)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(path, f"corrupt gzip data ({exc})") from None
    if not raw.strip():
        raise DataError(path, "file is empty")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:
        raise DataError(path, f"wrong encoding: NUL bytes found (UTF-16 or binary?); expected {encoding} text", 1)
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as exc:
            raise DataError(path, f"wrong encoding: byte {line[exc.start]:#04x} at column {exc.start + 1} "
                                  f"is not valid {encoding}", number) from None
        text = text.rstrip("\r")
        if text.strip():
            yield number, text


def _int_field(path: Path, number: int, value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(path, f"{name} {value!r} is not an integer", number) from None


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
            return frame.to_numpy(dtype=np.int64)
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


# --------------------------------------------------------------------------- ML-1M pieces

def read_movies(path: Path) -> dict[int, str]:
    """movies.dat: ``MovieID::Title::Genres`` in ISO-8859-1. Returns MovieID -> 'Title (Year)'."""
    movies: dict[int, str] = {}
    for number, text in _open_text_lines(path, "iso-8859-1"):
        movie, title, _genres = _split_fields(path, number, text, "::", 3, "MovieID::Title::Genres")
        movies[_int_field(path, number, movie, "MovieID")] = title
    return movies


def read_movie_genres(path: Path) -> dict[int, str]:
    """movies.dat genres as 'A|B|C' per MovieID (the text features use them)."""
    genres: dict[int, str] = {}
    for number, text in _open_text_lines(path, "iso-8859-1"):
        movie, _title, genre = _split_fields(path, number, text, "::", 3, "MovieID::Title::Genres")
        genres[_int_field(path, number, movie, "MovieID")] = genre
    return genres


def read_users(path: Path) -> int:
    """users.dat: ``UserID::Gender::Age::Occupation::Zip-code``; validated, returns the user count."""
    count = 0
    for number, text in _open_text_lines(path, "iso-8859-1"):
        fields = _split_fields(path, number, text, "::", 5, "UserID::Gender::Age::Occupation::Zip-code")
        _int_field(path, number, fields[0], "UserID")
        count += 1
    return count


def read_ml1m(folder: Path) -> Interactions:
    """Official layout: ratings.dat (``UserID::MovieID::Rating::Timestamp``), movies.dat, users.dat."""
    ratings_path = _find(folder, "ratings.dat")
    if ratings_path is None:
        raise DataError(folder / "ratings.dat", "file not found. " + GROUPLENS_HINT)
    table = _int_rows(ratings_path, "::", ("UserID", "MovieID", "Rating", "Timestamp"))
    titles, known = _catalogue(folder)
    users_path = _find(folder, "users.dat")
    if users_path is not None:
        read_users(users_path)
    return Interactions(table[:, 0], table[:, 1], table[:, 3], table[:, 2], "ml1m", ratings_path, titles, known)


def read_ml1m_ordered(path: Path) -> Interactions:
    """``UserID<TAB>MovieID<TAB>SeqPos`` with a header; SeqPos orders each user's history."""
    if path.is_dir():
        found = _find(path, ORDERED_NAME)
        if found is None:
            raise DataError(path / ORDERED_NAME, "file not found. " + GROUPLENS_HINT)
        path = found
    table = _int_rows(path, "\t", ("UserID", "MovieID", "SeqPos"), header=True)
    titles, known = _catalogue(path.parent)
    return Interactions(table[:, 0], table[:, 1], table[:, 2], None, "ml1m-ordered", path, titles, known)


def _catalogue(folder: Path) -> tuple[dict[int, str], np.ndarray | None]:
    movies_path = _find(folder, "movies.dat")
    if movies_path is None:
        return {}, None
    titles = read_movies(movies_path)
    return titles, np.fromiter(titles.keys(), dtype=np.int64)


# --------------------------------------------------------------------------- custom tables

@dataclass(frozen=True)
class TableColumns:
    user: str = "user"
    item: str = "item"
    time: str = "timestamp"
    rating: str | None = None


def read_table(path: Path, columns: TableColumns = TableColumns()) -> Interactions:
    """A CSV/TSV/Parquet table; ids may be any strings (they are remapped later)."""
    import pandas as pd

    if not path.exists():
        raise DataError(path, "file not found. " + GROUPLENS_HINT)
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if ".parquet" in suffixes:
            frame = pd.read_parquet(path)
        else:
            sep = "\t" if ".tsv" in suffixes else ","
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"wrong encoding: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(path, f"malformed table: {exc}") from None
    except Exception as exc:  # pyarrow raises many types for a broken parquet file
        raise DataError(path, f"cannot read table: {exc}") from None
    if frame.empty:
        raise DataError(path, "table has a header but no rows")
    wanted = [c for c in (columns.user, columns.item, columns.time, columns.rating) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(frame.columns)} "
                              "(set the names with --user-col/--item-col/--time-col/--rating-col)", 1)
    users = frame[columns.user].astype(str).to_numpy()
    items = frame[columns.item].astype(str).to_numpy()
    for name, values in ((columns.user, users), (columns.item, items)):
        blank = np.flatnonzero(np.char.str_len(values.astype(str)) == 0)
        if blank.size:
            raise DataError(path, f"empty value in column {name!r}", _table_line(path, int(blank[0])))
    order = _numeric(path, frame[columns.time], columns.time, allow_dates=True)
    ratings = _numeric(path, frame[columns.rating], columns.rating) if columns.rating else None
    return Interactions(users, items, order, ratings, "table", path, {})


def _table_line(path: Path, row: int) -> int | None:
    """File line of a data row (header is line 1); parquet has no lines."""
    return None if path.suffix.lower() == ".parquet" else row + 2


def _numeric(path: Path, series, name: str, allow_dates: bool = False) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if bad.size and allow_dates:
        dates = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
        if not dates.isna().any():
            return dates.astype("int64").to_numpy()
    if bad.size:
        row = int(bad[0])
        raise DataError(path, f"column {name!r} value {series.iloc[row]!r} is not a number"
                              + (" or a date" if allow_dates else ""), _table_line(path, row))
    return values.to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------- layout detection

def detect_layout(path: Path) -> str:
    if path.is_dir():
        if _find(path, "ratings.dat") is not None:
            return "ml1m"
        if _find(path, ORDERED_NAME) is not None:
            return "ml1m-ordered"
        tables = [p for p in sorted(path.iterdir()) if p.suffix.lower() in (".csv", ".tsv", ".parquet")]
        if len(tables) == 1:
            return "table"
        raise DataError(path, "no recognised data files in this folder. " + GROUPLENS_HINT)
    if not path.exists():
        raise DataError(path, "not found. " + GROUPLENS_HINT)
    name = path.name.lower()
    if name.startswith(ORDERED_NAME.lower()):
        return "ml1m-ordered"
    if name.endswith((".dat", ".dat.gz")):
        return "ml1m"
    if name.endswith((".csv", ".tsv", ".parquet", ".csv.gz", ".tsv.gz")):
        return "table"
    raise DataError(path, "cannot tell the layout from this file name. " + GROUPLENS_HINT)


def read_interactions(path: Path | str, layout: str | None = None,
                      columns: TableColumns = TableColumns()) -> Interactions:
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found. " + GROUPLENS_HINT)
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise DataError(path, f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "ml1m":
        return read_ml1m(path if path.is_dir() else path.parent)
    if layout == "ml1m-ordered":
        return read_ml1m_ordered(path)
    if path.is_dir():
        tables = [p for p in sorted(path.iterdir()) if p.suffix.lower() in (".csv", ".tsv", ".parquet")]
        if len(tables) != 1:
            raise DataError(path, f"layout 'table' needs one CSV/TSV/Parquet file, found {len(tables)}")
        path = tables[0]
    return read_table(path, columns)


def read_json_gz(path: Path) -> dict:
    """A (possibly gzipped) JSON object, with the file named in any error."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"not a valid JSON file ({exc})") from None
