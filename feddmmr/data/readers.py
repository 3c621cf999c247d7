"""Readers for the ML-1M layouts and generic tables; the other layouts are in :mod:`.formats`.

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
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

GROUPLENS_HINT = (
    "Download MovieLens-1M from GroupLens (https://files.grouplens.org/datasets/movielens/ml-1m.zip), "
    "unzip it and pass the folder with --data. Accepted layouts: 'ml1m' (a folder with ratings.dat "
    "[UserID::MovieID::Rating::Timestamp], movies.dat, users.dat), 'ml1m-ordered' (a folder with "
    "interactions_all_users_ordered.tsv[.gz] [UserID, MovieID, SeqPos]), 'ml100k' (u.data, u.item), "
    "'ml10m' (MovieLens 10M/20M/25M/32M: ratings.dat + movies.dat + tags.dat, or ratings.csv + movies.csv), "
    "'recbole' (RecBole atomic files NAME.inter [+ NAME.item]) or 'table' (a CSV/TSV/Parquet "
    "file with user, item, timestamp and optional rating columns)."
)

ORDERED_NAME = "interactions_all_users_ordered.tsv"
LAYOUTS = ("ml1m", "ml1m-ordered", "ml100k", "ml10m", "recbole", "table")
REMAPPED = ("ml100k", "ml10m", "recbole", "table")  # layouts whose item ids are remapped to 1..n
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


# --------------------------------------------------------------------------- ML-1M pieces

def read_movies(path: Path) -> dict[int, str]:
    """movies.dat: ``MovieID::Title::Genres`` (ISO-8859-1, or UTF-8). Returns MovieID -> 'Title (Year)'."""
    movies: dict[int, str] = {}
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        movie, title, _genres = _split_fields(path, number, text, "::", 3, "MovieID::Title::Genres")
        movies[_int_field(path, number, movie, "MovieID")] = title
    return movies


def read_movie_genres(path: Path) -> dict[int, str]:
    """movies.dat genres as 'A|B|C' per MovieID (the text features use them)."""
    genres: dict[int, str] = {}
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        movie, _title, genre = _split_fields(path, number, text, "::", 3, "MovieID::Title::Genres")
        genres[_int_field(path, number, movie, "MovieID")] = genre
    return genres


def read_users(path: Path) -> int:
    """users.dat: ``UserID::Gender::Age::Occupation::Zip-code``; validated, returns the user count."""
    count = 0
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        fields = _split_fields(path, number, text, "::", 5, "UserID::Gender::Age::Occupation::Zip-code")
        _int_field(path, number, fields[0], "UserID")
        count += 1
    return count


def read_ml1m(folder: Path) -> Interactions:
    """Official layout: ratings.dat (``UserID::MovieID::Rating::Timestamp``), movies.dat, users.dat."""
    ratings_path = _find(folder, "ratings.dat")
    if ratings_path is None:
        raise DataError(folder / "ratings.dat", "file not found. " + GROUPLENS_HINT)
    try:
        rows = _int_rows(ratings_path, "::", ("UserID", "MovieID", "Rating", "Timestamp"))
    except DataError as exc:
        if exc.problem.startswith("Rating '") and re.fullmatch(r"Rating '\d+\.\d+' is not an integer", exc.problem):
            raise DataError(exc.path, exc.problem + " (MovieLens 10M has half-star ratings: pass --layout ml10m)",
                            exc.line) from None
        raise
    table = _dedupe(ratings_path, rows, header=False)
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
    table = _dedupe(path, _int_rows(path, "\t", ("UserID", "MovieID", "SeqPos"), header=True), header=True)
    titles, known = _catalogue(path.parent)
    return Interactions(table[:, 0], table[:, 1], table[:, 2], None, "ml1m-ordered", path, titles, known)


def _dedupe(path: Path, table: np.ndarray, header: bool) -> np.ndarray:
    keep = drop_duplicate_rows(path, [table[:, i] for i in range(table.shape[1])], header)
    return table if keep is None else table[keep]


def _catalogue(folder: Path) -> tuple[dict[int, str], np.ndarray | None]:
    movies_path = _find(folder, "movies.dat")
    if movies_path is None:
        return {}, None
    titles = read_movies(movies_path)
    return titles, np.fromiter(titles.keys(), dtype=np.int64)


# --------------------------------------------------------------------------- custom tables

@dataclass(frozen=True)
class TableColumns:
    """A table's column names; None = found by its common names (``formats.COLUMN_NAMES``)."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    rating: str | None = None


def read_table(path: Path, columns: TableColumns = TableColumns(), sep: str | None = None,
               typed_header: bool = False, layout: str = "table") -> Interactions:
    """A CSV/TSV/Parquet table; ids may be any strings (they are remapped later).

    ``typed_header``: a RecBole atomic file, whose header fields are ``name:type``; the names are
    matched without their types.
    """
    from .formats import is_recbole_header, recbole_field_types, resolve_columns
    import io

    import pandas as pd

    if not path.exists():
        raise DataError(path, "file not found. " + GROUPLENS_HINT)
    if not path.is_file():
        raise DataError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if ".parquet" in suffixes:
            frame = pd.read_parquet(path)
        else:
            raw = _read_raw(path)
            if b"\x00" in raw or raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                _first_text_error(path)
            frame = pd.read_csv(io.BytesIO(raw), sep=sep or ("\t" if ".tsv" in suffixes else ","), dtype=str,
                                keep_default_na=False, encoding="utf-8", compression=None,
                                quoting=3 if typed_header else 0)
    except UnicodeDecodeError as exc:
        _first_text_error(path)
        raise DataError(path, f"wrong encoding: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(path, f"malformed table: {exc}") from None
    except Exception as exc:  # pyarrow raises many types for a broken parquet file
        raise DataError(path, f"cannot read table: {exc}") from None
    if frame.empty:
        raise DataError(path, "table has a header but no rows")
    if typed_header:
        header = [str(c) for c in frame.columns]
        if not is_recbole_header("\t".join(header)):
            raise DataError(path, f"not a RecBole atomic-file header (tab-separated name:type fields, e.g. "
                                  f"'user_id:token'): {header}", 1)
        frame.columns = list(recbole_field_types(path, header))
        columns = TableColumns(*(c.split(":", 1)[0] if c else None
                                 for c in (columns.user, columns.item, columns.time, columns.rating)))
    columns = resolve_columns(path, [str(c) for c in frame.columns], columns)
    users = frame[columns.user].astype(str).to_numpy()
    items = frame[columns.item].astype(str).to_numpy()
    for name, values in ((columns.user, users), (columns.item, items)):
        blank = np.flatnonzero(np.char.str_len(values.astype(str)) == 0)
        if blank.size:
            raise DataError(path, f"empty value in column {name!r}", _table_line(path, int(blank[0])))
    order = _numeric(path, frame[columns.time], columns.time, allow_dates=True)
    ratings = _numeric(path, frame[columns.rating], columns.rating) if columns.rating else None
    keep = drop_duplicate_rows(path, [c for c in (users, items, order, ratings) if c is not None], header=True)
    if keep is not None:
        users, items, order = users[keep], items[keep], order[keep]
        ratings = ratings[keep] if ratings is not None else None
    return Interactions(users, items, order, ratings, layout, path, {}, item_column=columns.item)


def _first_text_error(path: Path) -> None:
    """The slow, precise pass over a text file: raises its first encoding problem, with the line."""
    for _ in _open_text_lines(path, "utf-8"):
        pass


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
        value = series.iloc[row]
        problem = ("is empty (a missing field or a truncated line?)" if isinstance(value, str) and not value.strip()
                   else "is not a number" + (" or a date" if allow_dates else ""))
        raise DataError(path, f"column {name!r} value {value!r} {problem}", _table_line(path, row))
    numbers = values.to_numpy(dtype=np.float64)
    infinite = np.flatnonzero(~np.isfinite(numbers))
    if infinite.size:
        row = int(infinite[0])
        raise DataError(path, f"column {name!r} value {series.iloc[row]!r} is not a finite number",
                        _table_line(path, row))
    return numbers


# --------------------------------------------------------------------------- layout detection

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".csv.gz", ".tsv.gz")


def _tables(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.name.lower().endswith(TABLE_SUFFIXES) and p.is_file()]


def _sniffed_files(folder: Path, limit: int = 50) -> list[tuple[Path, str]]:
    """(file, layout) for the folder's other files whose first line tells their layout (the first ``limit``)."""
    from .formats import sniff

    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")][:limit]
    return [(p, layout) for p in files if (layout := sniff(p)) is not None]


def _is_ml10m_dat(folder: Path) -> bool:
    """MovieLens 10M ships tags.dat beside ratings.dat (ML-1M ships users.dat instead)."""
    return _find(folder, "tags.dat") is not None and _find(folder, "users.dat") is None


def detect_layout(path: Path) -> str:
    """The layout of a folder or file: by file name first, then by content (see README, 'Data')."""
    from .formats import sniff

    if path.is_dir():
        if _find(path, "ratings.dat") is not None:
            return "ml10m" if _is_ml10m_dat(path) else "ml1m"
        if _find(path, ORDERED_NAME) is not None:
            return "ml1m-ordered"
        if _find(path, "u.data") is not None:
            return "ml100k"
        inter = [p for p in sorted(path.iterdir()) if p.name.endswith(".inter")]
        if inter:
            return "recbole"
        ratings_csv = _find(path, "ratings.csv")
        if ratings_csv is not None and (_find(path, "movies.csv") is not None or sniff(ratings_csv) == "ml10m"):
            return "ml10m"
        tables = _tables(path)
        if len(tables) == 1:
            return sniff(tables[0]) or "table"
        if len(tables) > 1:
            raise DataError(path, f"several tables in this folder {[p.name for p in tables]}; pass the one "
                                  "to use with --data FILE")
        sniffed = _sniffed_files(path)
        if len(sniffed) == 1:
            return sniffed[0][1]
        if len(sniffed) > 1:
            raise DataError(path, f"several data files in this folder {[p.name for p, _ in sniffed]}; pass the "
                                  "one to use with --data FILE")
        raise DataError(path, "no recognised data files in this folder. " + GROUPLENS_HINT)
    if not path.exists():
        raise DataError(path, "not found. " + GROUPLENS_HINT)
    name = path.name.lower()
    if name.startswith(ORDERED_NAME.lower()):
        return "ml1m-ordered"
    if name in ("ratings.dat", "ratings.dat.gz") and _is_ml10m_dat(path.parent):
        return "ml10m"
    if name.endswith((".dat", ".dat.gz")):
        return "ml1m"
    if name in ("u.data", "u.data.gz"):
        return "ml100k"
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith((".item", ".user", ".kg", ".link", ".net")):
        raise DataError(path, "a RecBole side file: pass the NAME.inter file (or its folder); the .item file "
                              "beside it is read for item titles and texts")
    if name in ("ratings.csv", "ratings.csv.gz") and _find(path.parent, "movies.csv") is not None:
        return "ml10m"
    found = sniff(path) if not name.endswith(".parquet") else None
    if found is not None:
        return found
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    raise DataError(path, "cannot tell the layout from this file name or its first line. " + GROUPLENS_HINT)


def read_interactions(path: Path | str, layout: str | None = None,
                      columns: TableColumns = TableColumns()) -> Interactions:
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found. " + GROUPLENS_HINT)
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise DataError(path, f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if layout == "ml1m":
        if path.is_file() and path.name.lower() not in ("ratings.dat", "ratings.dat.gz"):  # never read a sibling
            raise DataError(path, "the 'ml1m' layout reads ratings.dat (with movies.dat and users.dat beside it); "
                                  "pass their folder or the ratings.dat file itself")
        return read_ml1m(path if path.is_dir() else path.parent)
    if layout == "ml1m-ordered":
        return read_ml1m_ordered(path)
    if layout in ("ml100k", "ml10m", "recbole"):
        from . import formats

        if path.is_dir() and not _canonical_file(path, layout):  # a folder holding one such file, any name
            sniffed = [p for p, found in _sniffed_files(path) if found == layout]
            if len(sniffed) == 1:
                path = sniffed[0]
        if layout == "recbole":
            return formats.read_recbole(path, columns)
        return formats.read_ml100k(path) if layout == "ml100k" else formats.read_ml10m(path)
    if path.is_dir():
        tables = _tables(path)
        if len(tables) != 1:
            raise DataError(path, f"layout 'table' needs one CSV/TSV/Parquet file, found {len(tables)}"
                                  + (f" {[p.name for p in tables]}; pass the one to use with --data FILE"
                                     if tables else ""))
        path = tables[0]
    return read_table(path, columns, sep="\t" if sniff_tab(path) else None)


def _canonical_file(folder: Path, layout: str) -> bool:
    if layout == "ml100k":
        return _find(folder, "u.data") is not None
    if layout == "ml10m":
        return _find(folder, "ratings.csv") is not None or _find(folder, "ratings.dat") is not None
    return any(p.name.endswith(".inter") for p in folder.iterdir())


def sniff_tab(path: Path) -> bool:
    """A '.txt'-like table whose header is tab-separated (the suffix decides for .csv/.tsv/.parquet)."""
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")) or not path.is_file():
        return False
    try:
        first = _read_raw(path)[:65536].split(b"\n", 1)[0]
    except DataError:
        return False
    return b"\t" in first and b"," not in first


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
