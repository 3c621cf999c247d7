"""Readers for the ML-1M layouts, layout detection and :func:`read_interactions`, the entry point;
the other layouts and generic tables are in :mod:`.formats`, the shared pieces (:class:`DataError`,
:class:`Interactions`, strict text lines, duplicate lines, the id limits) in :mod:`.parsing`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .formats import read_ml100k, read_ml10m, read_recbole, read_table, sniff
from .parsing import (CATALOGUE_ENCODINGS, GROUPLENS_HINT, DataError, Interactions, TableColumns, _dedupe, _find,
                      _int_field, _int_rows, _open_text_lines, _read_raw, _split_fields, read_movies)

ORDERED_NAME = "interactions_all_users_ordered.tsv"
LAYOUTS = ("ml1m", "ml1m-ordered", "ml100k", "ml10m", "recbole", "table")
REMAPPED = ("ml100k", "ml10m", "recbole", "table")  # layouts whose item ids are remapped to 1..n


# --------------------------------------------------------------------------- ML-1M pieces

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


def _catalogue(folder: Path) -> tuple[dict[int, str], np.ndarray | None]:
    movies_path = _find(folder, "movies.dat")
    if movies_path is None:
        return {}, None
    titles = read_movies(movies_path)
    return titles, np.fromiter(titles.keys(), dtype=np.int64)


# --------------------------------------------------------------------------- layout detection

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".csv.gz", ".tsv.gz")


def _tables(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.name.lower().endswith(TABLE_SUFFIXES) and p.is_file()]


def _sniffed_files(folder: Path, limit: int = 50) -> list[tuple[Path, str]]:
    """(file, layout) for the folder's other files whose first line tells their layout (the first ``limit``)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")][:limit]
    return [(p, layout) for p in files if (layout := sniff(p)) is not None]


def _is_ml10m_dat(folder: Path) -> bool:
    """MovieLens 10M ships tags.dat beside ratings.dat (ML-1M ships users.dat instead)."""
    return _find(folder, "tags.dat") is not None and _find(folder, "users.dat") is None


def detect_layout(path: Path) -> str:
    """The layout of a folder or file: by file name first, then by content (see README, 'Data')."""
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
        if path.is_dir() and not _canonical_file(path, layout):  # a folder holding one such file, any name
            sniffed = [p for p, found in _sniffed_files(path) if found == layout]
            if len(sniffed) == 1:
                path = sniffed[0]
        if layout == "recbole":
            return read_recbole(path, columns)
        return read_ml100k(path) if layout == "ml100k" else read_ml10m(path)
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
