"""The recommender-systems layouts besides ML-1M: RecBole atomic files, MovieLens 100K, MovieLens
10M/20M/25M/32M, and generic CSV/TSV/Parquet tables with the column names their user, item and time
columns go by.

Every layout here remaps its item ids (``build_sequences``), so ids may be sparse integers or any
strings. Each reader also returns the item metadata of the dataset's item file when there is one
(``u.item``, ``movies.csv``/``movies.dat``, ``NAME.item``): a display title and one descriptive
text per raw item id, which ``feddmmr recommend`` shows and the text features encode.

Errors follow :mod:`feddmmr.data.parsing`: one :class:`DataError` naming the file, the line and the
problem; nothing is silently skipped (exact duplicate lines are dropped with a warning, as there).
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .parsing import (CATALOGUE_ENCODINGS, GROUPLENS_HINT, DataError, Interactions, TableColumns, _dedupe, _find,
                      _int_field, _int_rows, _open_text_lines, _read_raw, _split_fields, drop_duplicate_rows,
                      read_movie_catalogue)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- column names

def normalise(name: str) -> str:
    """'User_ID' -> 'userid': column names compared without case, '_', '-', ' ' or '.'."""
    return re.sub(r"[\s_\-.]", "", name).lower()


# role -> normalised names that column goes by (user_id, userId, UserID, user, ...)
COLUMN_NAMES = {
    "user": ("userid", "user", "users", "customerid", "visitorid", "reviewerid", "memberid", "clientid",
             "sessionid"),
    "item": ("itemid", "item", "items", "movieid", "productid", "asin", "trackid", "songid", "bookid", "isbn",
             "businessid", "articleid", "videoid", "poiid", "venueid", "parentasin"),
    "time": ("timestamp", "time", "datetime", "date", "ts", "unixtime", "unixreviewtime", "createdat",
             "eventtime"),
    "rating": ("rating", "ratings", "score", "stars", "overall", "bookrating"),
}
FLAGS = {"user": "--user-col", "item": "--item-col", "time": "--time-col", "rating": "--rating-col"}
EXAMPLES = {"user": "user_id, userId, UserID, user", "item": "item_id, movieId, MovieID, item, product_id, asin",
            "time": "timestamp, time, datetime, date", "rating": "rating, score, stars"}


def resolve_columns(path: Path, present: list[str], columns: TableColumns) -> TableColumns:
    """The user, item, time (and rating) columns of a table: explicit names win, else common names.

    A role with no candidate, or with several, is an error that lists what was found.
    """
    chosen: dict[str, str | None] = {}
    missing_explicit, not_found, ambiguous = [], [], []
    for role in ("user", "item", "time", "rating"):
        explicit = getattr(columns, role)
        if explicit:
            if explicit not in present:
                missing_explicit.append(explicit)
            chosen[role] = explicit
            continue
        candidates = [c for c in present if normalise(c) in COLUMN_NAMES[role]]
        if len(candidates) == 1:
            chosen[role] = candidates[0]
        elif len(candidates) > 1:
            ambiguous.append((role, candidates))
            chosen[role] = None
        else:
            if role != "rating":
                not_found.append(role)
            chosen[role] = None
    if missing_explicit:
        raise DataError(path, f"missing column(s) {missing_explicit}; found {present} "
                              "(set the names with --user-col/--item-col/--time-col/--rating-col)", _header_line(path))
    if ambiguous and any(role != "rating" for role, _ in ambiguous):
        parts = "; ".join(f"{role}: {candidates}" for role, candidates in ambiguous if role != "rating")
        flags = "/".join(FLAGS[role] for role, _ in ambiguous if role != "rating")
        raise DataError(path, f"ambiguous table: several columns could be the {parts}; pick one with {flags}",
                        _header_line(path))
    if not_found:
        looked = "; ".join(f"{role}: {EXAMPLES[role]}, ..." for role in not_found)
        flags = "/".join(FLAGS[role] for role in not_found)
        raise DataError(path, f"cannot find the {' and '.join(not_found)} column(s) among {present} (common names "
                              f"looked for: {looked}); name them with {flags}", _header_line(path))
    used = [chosen[r] for r in ("user", "item", "time") if chosen[r]]
    if len(set(used)) < len(used):
        raise DataError(path, f"one column serves two roles (user {chosen['user']!r}, item {chosen['item']!r}, "
                              f"time {chosen['time']!r}); name them with --user-col/--item-col/--time-col")
    return TableColumns(chosen["user"], chosen["item"], chosen["time"], chosen["rating"])


def _header_line(path: Path) -> int | None:
    return None if path.suffix.lower() == ".parquet" else 1


# --------------------------------------------------------------------------- custom tables

def read_table(path: Path, columns: TableColumns = TableColumns(), sep: str | None = None,
               typed_header: bool = False, layout: str = "table") -> Interactions:
    """A CSV/TSV/Parquet table; ids may be any strings (they are remapped later).

    ``typed_header``: a RecBole atomic file, whose header fields are ``name:type``; the names are
    matched without their types.
    """
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
    users, items = _id_strings(frame[columns.user]), _id_strings(frame[columns.item])
    for name, values in ((columns.user, users), (columns.item, items)):
        if isinstance(frame[name].dtype, np.dtype) and frame[name].dtype.kind in "iuf":
            continue  # numbers (a Parquet column's) are never blank
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


def _id_strings(column) -> np.ndarray:
    """A column of raw ids as strings (an object array), as ``column.astype(str)`` gives them. Integer ids
    (a Parquet table's) are made one string per distinct id, which every row of that id shares: 10^7 rows
    of 10^5 users hold 10^5 strings, not 10^7 (about 60 bytes each)."""
    import pandas as pd

    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "iu":
        codes, distinct = pd.factorize(column.to_numpy())
        return np.asarray(pd.Series(distinct).astype(str), dtype=object)[codes]
    return column.astype(str).to_numpy()


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


# --------------------------------------------------------------------------- item metadata

_YEAR = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")
# "American President, The" -> "The American President" (also before an alternative title)
_ARTICLE = re.compile(r"^(.*?), (The|A|An|La|Le|Les|L'|Il|El|Das|Der|Die|Den|Det)( \(.*\))?$")


def split_title(raw: str) -> tuple[str, str | None]:
    """'American President, The (1995)' -> ('The American President', '1995')."""
    match = _YEAR.match(raw)
    title, year = (match.group(1), match.group(2)) if match else (raw.strip(), None)
    article = _ARTICLE.match(title)
    if article:
        title = f"{article.group(2)} {article.group(1)}{article.group(3) or ''}"
        title = title.replace("L' ", "L'")
    return title, year


def compose(title: str, year: str | None, genres: str | list[str], description: str | None) -> str:
    """One text per item: 'Title (Year). Genres: A, B. Description' (genres 'A|B' or a list)."""
    head = f"{title} ({year})" if year else title
    parts = [head + "."] if head else []
    names = [g for g in (genres.split("|") if isinstance(genres, str) else genres) if g]
    if names:
        parts.append("Genres: " + ", ".join(names) + ".")
    if description:
        parts.append(description)
    return " ".join(parts)


@dataclass
class ItemMetadata:
    """Per raw item id: the display title and the text the text features encode; where they came from."""

    titles: dict = field(default_factory=dict)
    texts: dict = field(default_factory=dict)
    source: Path | None = None


def movie_metadata(titles: dict, genres: dict, source: Path) -> ItemMetadata:
    texts = {}
    for movie, raw_title in titles.items():
        title, year = split_title(raw_title)
        texts[movie] = compose(title, year, genres.get(movie, ""), None)
    return ItemMetadata(dict(titles), texts, source)


ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
U_ITEM_FORM = "movie id|title|release date|video release date|IMDb URL|19 genre flags"


def read_u_genre(path: Path) -> tuple[str, ...]:
    """ML-100K ``u.genre``: ``name|index`` lines; the genre names in flag order."""
    names: dict[int, str] = {}
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        name, index = _split_fields(path, number, text, "|", 2, "genre|index")
        names[_int_field(path, number, index, "genre index")] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(path, f"genre indices must be 0..{len(names) - 1}, found {sorted(names)}")
    return tuple(names[i] for i in range(len(names)))


def read_u_item(path: Path, genre_names: tuple[str, ...] = ML100K_GENRES) -> ItemMetadata:
    """ML-100K ``u.item`` (ISO-8859-1, '|'): id|title|release date|video release date|url|genre flags."""
    titles, genres = {}, {}
    expected = 5 + len(genre_names)
    for number, text in _open_text_lines(path, CATALOGUE_ENCODINGS):
        fields = _split_fields(path, number, text, "|", expected, U_ITEM_FORM)
        movie = _int_field(path, number, fields[0], "MovieID")
        flags = fields[5:]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(path, f"genre flags must be 0 or 1, found {'|'.join(flags)!r}", number)
        titles[movie] = fields[1].strip()
        genres[movie] = [name for name, flag in zip(genre_names, flags) if flag == "1" and name != "unknown"]
    return movie_metadata(titles, {m: "|".join(g) for m, g in genres.items()}, path)


def read_movies_csv(path: Path) -> ItemMetadata:
    """MovieLens 20M+ ``movies.csv``: ``movieId,title,genres`` (UTF-8, quoted titles)."""
    import pandas as pd

    frame = _read_csv(path, ",")
    if list(frame.columns[:3]) != ["movieId", "title", "genres"]:
        raise DataError(path, f"header must start with 'movieId,title,genres', found {','.join(frame.columns)!r}", 1)
    ids = pd.to_numeric(frame["movieId"], errors="coerce")
    bad = np.flatnonzero(ids.isna().to_numpy() | (ids.to_numpy(dtype=float, na_value=0) < 1))
    if bad.size:
        raise DataError(path, f"movieId {frame['movieId'].iloc[int(bad[0])]!r} is not a positive integer",
                        int(bad[0]) + 2)
    movies = ids.astype(np.int64).tolist()
    genres = {m: "" if g == "(no genres listed)" else g for m, g in zip(movies, frame["genres"])}
    return movie_metadata(dict(zip(movies, frame["title"])), genres, path)


def _read_csv(path: Path, sep: str):
    """A text table read as strings (header on line 1); every failure a DataError naming the file."""
    import pandas as pd

    raw = _read_raw(path)
    if b"\x00" in raw or raw[:2] in (b"\xff\xfe", b"\xfe\xff") or not raw.strip():
        for _ in _open_text_lines(path, "utf-8"):  # raises the precise encoding / emptiness error
            pass
    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=sep, dtype=str, keep_default_na=False, encoding="utf-8",
                            compression=None, quoting=3 if sep == "\t" else 0)
    except UnicodeDecodeError:
        for _ in _open_text_lines(path, "utf-8"):
            pass
        raise DataError(path, "wrong encoding: not valid UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(path, "file is empty") from None
    except pd.errors.ParserError as exc:
        raise DataError(path, f"malformed table: {exc}") from None
    if frame.empty:
        raise DataError(path, "table has a header but no rows")
    return frame


# --------------------------------------------------------------------------- RecBole atomic files

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_TYPED = re.compile(r"^[^:\s]+:(token|token_seq|float|float_seq)$")


def is_recbole_header(line: str) -> bool:
    """A RecBole atomic-file header: tab-separated ``name:type`` fields (``user_id:token``, ...)."""
    fields = line.rstrip("\r\n").lstrip("\ufeff").split("\t")
    return len(fields) >= 2 and all(_TYPED.match(f) for f in fields)


def recbole_field_types(path: Path, header: list[str]) -> dict[str, str]:
    """``{'user_id': 'token', ...}`` from a header; a field without a known type is an error."""
    types = {}
    for raw in header:
        name, _, kind = raw.partition(":")
        if kind not in RECBOLE_TYPES:
            raise DataError(path, f"RecBole header field {raw!r} must be name:type with type one of {RECBOLE_TYPES}", 1)
        if name in types:
            raise DataError(path, f"RecBole header names field {name!r} twice", 1)
        types[name] = kind
    return types


def read_recbole(path: Path, columns: TableColumns = TableColumns()) -> Interactions:
    """``NAME.inter`` (tab-separated, typed header), with ``NAME.item`` beside it for item metadata."""
    if path.is_dir():
        path = recbole_inter(path)
    table = read_table(path, columns, sep="\t", typed_header=True, layout="recbole")
    item_path = path.with_name(path.name[:-len(".inter")] + ".item") if path.name.endswith(".inter") else None
    if item_path is not None and item_path.exists():
        table.metadata = read_recbole_items(item_path, table.item_column)
        table.titles = table.metadata.titles
    return table


def recbole_inter(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.endswith(".inter"))
    if len(found) != 1:
        names = [p.name for p in found]
        raise DataError(folder, f"the 'recbole' layout needs one NAME.inter file, found {len(found)} {names}; "
                                "pass the one to use with --data FILE")
    return found[0]


TITLE_HINTS = ("title", "name")
CATEGORY_HINTS = ("class", "genre", "categor", "tag", "brand")
YEAR_HINTS = ("year",)


def read_recbole_items(path: Path, item_field: str) -> ItemMetadata:
    """``NAME.item``: the item id field (named as in ``.inter``), a title from a field named like
    'title'/'name', categories from 'class'/'genre'/'categories'/..., a year, and the other text fields."""
    frame = _read_csv(path, "\t")
    header = [str(c) for c in frame.columns]
    if not is_recbole_header("\t".join(header)):
        raise DataError(path, f"not a RecBole .item header (tab-separated name:type fields): {header}", 1)
    types = recbole_field_types(path, header)
    frame.columns = list(types)
    if item_field not in types:
        raise DataError(path, f"no {item_field!r} field (the item field of the .inter file); found {list(types)}", 1)
    text_fields = [n for n, t in types.items() if t in ("token", "token_seq") and n != item_field]
    title = next((n for n in text_fields if any(h in n.lower() for h in TITLE_HINTS)), None)
    if title is None:
        title = next((n for n in text_fields if types[n] == "token_seq"), None)
    years = [n for n in text_fields if n != title and any(h in n.lower() for h in YEAR_HINTS)]
    categories = [n for n in text_fields if n != title and any(h in n.lower() for h in CATEGORY_HINTS)]
    others = [n for n in text_fields if n not in (title, *years, *categories)]
    ids = frame[item_field].to_numpy()
    blank = np.flatnonzero(np.char.str_len(ids.astype(str)) == 0)
    if blank.size:
        raise DataError(path, f"empty value in field {item_field!r}", int(blank[0]) + 2)
    titles, texts = {}, {}
    seen: set = set()
    for row, raw in enumerate(ids):
        if raw in seen:
            raise DataError(path, f"item {raw!r} appears twice", row + 2)
        seen.add(raw)
        name = frame[title].iat[row].strip() if title else ""
        name, year_in_title = split_title(name) if name else ("", None)
        year = next((frame[n].iat[row].strip() for n in years if frame[n].iat[row].strip()), year_in_title)
        genres = [g for n in categories for g in frame[n].iat[row].split()]
        extra = ". ".join(f"{n.replace('_', ' ')}: {frame[n].iat[row].strip()}" for n in others
                          if frame[n].iat[row].strip())
        if name:
            titles[raw] = f"{name} ({year})" if year else name
        text = compose(name, year, genres, extra or None)
        if text:
            texts[raw] = text
    return ItemMetadata(titles, texts, path)


# --------------------------------------------------------------------------- MovieLens 100K

def read_ml100k(path: Path) -> Interactions:
    """``u.data`` (tab-separated ``user item rating timestamp``, no header), ``u.item`` beside it."""
    folder = path if path.is_dir() else path.parent
    data_path = (_find(folder, "u.data") if path.is_dir() else path)
    if data_path is None:
        raise DataError(folder / "u.data", "file not found (the 'ml100k' layout reads u.data and u.item)")
    table = _dedupe(data_path, _int_rows(data_path, "\t", ("UserID", "MovieID", "Rating", "Timestamp")), header=False)
    metadata = ItemMetadata()
    item_path = _find(folder, "u.item")
    if item_path is not None:
        genre_path = _find(folder, "u.genre")
        metadata = read_u_item(item_path, read_u_genre(genre_path) if genre_path else ML100K_GENRES)
    result = Interactions(table[:, 0], table[:, 1], table[:, 3], table[:, 2], "ml100k", data_path,
                          metadata.titles)
    result.metadata = metadata
    return result


# --------------------------------------------------------------------------- MovieLens 10M and later

ML_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
ML_DAT_FORM = "UserID::MovieID::Rating::Timestamp"


def read_ml10m(path: Path) -> Interactions:
    """MovieLens 10M (``ratings.dat``, ``::``, half-star ratings; ``movies.dat``) or 20M/25M/32M and
    ml-latest (``ratings.csv`` with header ``userId,movieId,rating,timestamp``; ``movies.csv``)."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = _find(folder, "ratings.csv") or _find(folder, "ratings.dat")
        if found is None:
            raise DataError(folder / "ratings.csv", "file not found (the 'ml10m' layout reads ratings.csv with "
                                                    "movies.csv, or ratings.dat with movies.dat)")
        path = found
    csv = path.name.lower().startswith("ratings.csv") or ".csv" in path.name.lower()
    users, items, ratings, times = _rating_rows(path, csv)
    metadata = ItemMetadata()
    if csv and (movies := _find(folder, "movies.csv")) is not None:
        metadata = read_movies_csv(movies)
    elif not csv and (movies := _find(folder, "movies.dat")) is not None:
        metadata = movie_metadata(*read_movie_catalogue(movies), movies)
    result = Interactions(users, items, times, ratings, "ml10m", path, metadata.titles)
    result.metadata = metadata
    return result


def _rating_rows(path: Path, csv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings, timestamps) of a MovieLens 10M+ ratings file; a fast C parse, else the
    line-by-line parser that names the first bad line."""
    import pandas as pd

    sep = "," if csv else "::"
    form = ",".join(ML_CSV_HEADER) if csv else ML_DAT_FORM
    try:
        raw = _read_raw(path)
        source = io.BytesIO(raw) if csv else io.StringIO(raw.decode("utf-8").replace("::", "\t"))
        frame = pd.read_csv(source, sep="," if csv else "\t", header=0 if csv else None,
                            dtype={0: np.int64, 1: np.int64, 2: np.float64, 3: np.int64} if not csv else
                            {"userId": np.int64, "movieId": np.int64, "rating": np.float64, "timestamp": np.int64},
                            engine="c", skip_blank_lines=True)
        if frame.shape[1] == 4 and len(frame) and (not csv or list(frame.columns) == ML_CSV_HEADER):
            values = [frame.iloc[:, i].to_numpy() for i in range(4)]
            if (np.all(values[0] >= 1) and np.all(values[1] >= 1) and np.all(np.isfinite(values[2]))):
                keep = _keep_unique(path, values, header=csv)
                return tuple(v if keep is None else v[keep] for v in (values[0], values[1], values[2], values[3]))
    except DataError:
        raise
    except Exception:
        pass
    lines = _open_text_lines(path, "utf-8")
    if csv:
        number, first = next(lines)
        if first.split(",") != ML_CSV_HEADER:
            raise DataError(path, f"header must be {form!r}, found {first!r}", number)
    rows, ratings = [], []
    names = ML_CSV_HEADER[:2]
    for number, line in lines:
        fields = _split_fields(path, number, line, sep, 4, form)
        user, item = (_positive(path, number, value, name) for value, name in zip(fields[:2], names))
        try:
            rating = float(fields[2])
        except ValueError:
            raise DataError(path, f"Rating {fields[2]!r} is not a number", number) from None
        if not np.isfinite(rating):
            raise DataError(path, f"Rating {fields[2]!r} is not a finite number", number)
        rows.append((user, item, _int_field(path, number, fields[3], "Timestamp")))
        ratings.append(rating)
    if not rows:
        raise DataError(path, "file has no interactions" + (" after its header" if csv else ""))
    table = np.asarray(rows, dtype=np.int64)
    values = [table[:, 0], table[:, 1], np.asarray(ratings, dtype=np.float64), table[:, 2]]
    keep = _keep_unique(path, values, header=csv)
    return tuple(v if keep is None else v[keep] for v in values)


def _positive(path: Path, number: int, value: str, name: str) -> int:
    number_value = _int_field(path, number, value, name)
    if number_value < 1:
        raise DataError(path, f"{name} {number_value} is not a positive integer", number)
    return number_value


def _keep_unique(path: Path, values: list[np.ndarray], header: bool):
    return drop_duplicate_rows(path, values, header)


# --------------------------------------------------------------------------- detection by content

def sniff(path: Path) -> str | None:
    """The layout of a file whose name says nothing, from its first line; None when unsure."""
    try:
        raw = _read_raw(path)[:65536]
    except DataError:
        return None
    first = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r")
    if is_recbole_header(first):
        return "recbole"
    if re.fullmatch(r"\d+\t\d+\t\d+\t\d+", first):
        return "ml100k"
    if first.split(",") == ML_CSV_HEADER:
        return "ml10m"
    return None
