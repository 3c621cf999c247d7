"""The text describing each item, and where it came from.

ML-1M: title, year and genres from ``movies.dat`` plus, in order of preference, the OMDb plot
(``text/movies_extrainfos.dat.gz``), else the DBpedia abstract (``text/dbpedia_abstracts.json.gz``),
else nothing more. Other layouts take each item's text from the dataset's item file (``u.item``,
``movies.csv``/``movies.dat``, RecBole ``NAME.item``: title, year, categories and the other text
fields; see :mod:`feddmmr.data.formats`); an ``item<TAB>text`` file keyed by raw item id
(``--item-text``) overrides both. The source of every text is kept so the metadata can say how many
items rest on a real description and how many on a bare title.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import compose, split_title  # noqa: F401  (re-exported: moved to the data layer)
from ..data.parsing import (DataError, _find, _int_field, _open_text_lines, _split_fields, read_json_gz,
                            read_movie_catalogue, read_movies)

log = logging.getLogger(__name__)

PLOTS_FILE = "text/movies_extrainfos.dat"
ABSTRACTS_FILE = "text/dbpedia_abstracts.json"
EXTRAINFO_FORM = "MovieID::title::year::rated::released::genre::director::writers::actors::plot::poster"
PLOT_FIELD = 9  # 0-based: field 10 of 11
NO_VALUE = {"", "N/A", "n/a", "None"}

@dataclass
class ItemTexts:
    """Texts by item index, the source of each, and the raw ids of the items the data knows."""

    texts: dict[int, str]
    sources: dict[int, str]
    known: dict[int, object] = field(default_factory=dict)  # item index -> raw id (real items only)

    def source_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.sources.values()).items()))


def read_plots(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """OMDb extra infos (UTF-8, CRLF, 11 '::' fields): MovieID -> plot, MovieID -> year."""
    plots: dict[int, str] = {}
    years: dict[int, str] = {}
    for number, text in _open_text_lines(path, "utf-8"):
        fields = _split_fields(path, number, text, "::", 11, EXTRAINFO_FORM)
        movie = _int_field(path, number, fields[0], "MovieID")
        plot = fields[PLOT_FIELD].strip()
        if plot not in NO_VALUE:
            plots[movie] = plot
        if re.fullmatch(r"\d{4}", fields[2].strip()):
            years[movie] = fields[2].strip()
    return plots, years


def read_abstracts(path: Path) -> dict[int, str]:
    """DBpedia abstracts: a JSON object MovieID-string -> abstract."""
    raw = read_json_gz(path)
    if not isinstance(raw, dict):
        raise DataError(path, f"expected a JSON object MovieID -> abstract, found {type(raw).__name__}")
    abstracts: dict[int, str] = {}
    for key, value in raw.items():
        try:
            movie = int(key)
        except ValueError:
            raise DataError(path, f"key {key!r} is not an integer MovieID") from None
        if isinstance(value, str) and value.strip() not in NO_VALUE:
            abstracts[movie] = value.strip()
    return abstracts


def movie_texts(folder: Path) -> ItemTexts:
    """ML-1M texts (MovieID = item index) with plot > abstract > title+genres priority."""
    movies_path = _find(folder, "movies.dat")
    if movies_path is None:
        raise DataError(folder / "movies.dat", "file not found; the text features need the movie titles")
    titles, genres = read_movie_catalogue(movies_path)
    plots_path = _find(folder, PLOTS_FILE)
    plots, omdb_years = read_plots(plots_path) if plots_path else ({}, {})
    abstracts_path = _find(folder, ABSTRACTS_FILE)
    abstracts = read_abstracts(abstracts_path) if abstracts_path else {}
    for name, found in ((PLOTS_FILE, plots_path), (ABSTRACTS_FILE, abstracts_path)):
        if found is None:
            log.warning("%s not found: texts fall back to the next source", folder / name)
    texts: dict[int, str] = {}
    sources: dict[int, str] = {}
    for movie, raw_title in titles.items():
        title, year = split_title(raw_title)
        year = year or omdb_years.get(movie)
        if movie in plots:
            description, source = plots[movie], "plot"
        elif movie in abstracts:
            description, source = abstracts[movie], "abstract"
        else:
            description, source = None, "title_genres"
        texts[movie] = compose(title, year, genres.get(movie, ""), description)
        sources[movie] = source
    return ItemTexts(texts, sources, {movie: movie for movie in titles})


def read_item_text_file(path: Path) -> dict[str, str]:
    """``item<TAB>text`` (UTF-8), optional header 'item<TAB>text'; raw id -> text."""
    out: dict[str, str] = {}
    for number, line in _open_text_lines(path, "utf-8"):
        if "\t" not in line:
            raise DataError(path, "expected 'item<TAB>text'", number)
        raw_id, text = line.split("\t", 1)
        raw_id, text = raw_id.strip(), text.strip()
        if number == 1 and raw_id.lower() in ("item", "item_id", "raw_id") and text.lower() == "text":
            continue
        if not raw_id:
            raise DataError(path, "empty item id", number)
        if raw_id in out:
            raise DataError(path, f"item {raw_id!r} appears twice", number)
        if text:
            out[raw_id] = text
    return out


def index_of_raw(item_raw_ids, num_items: int) -> dict[str, int]:
    """Raw id (as string) -> item index; identity for ML-1M where MovieID is the index."""
    if item_raw_ids is None:
        return {str(i): i for i in range(1, num_items)}
    return {str(item_raw_ids[i]): i for i in range(1, num_items)}


def file_texts(path: Path, item_raw_ids, num_items: int, known: dict[int, object]) -> ItemTexts:
    """Texts from an ``item<TAB>text`` file; ids not in the dataset are counted and ignored."""
    by_raw = read_item_text_file(path)
    lookup = index_of_raw(item_raw_ids, num_items)
    texts = {lookup[raw]: text for raw, text in by_raw.items() if raw in lookup}
    unknown = len(by_raw) - len(texts)
    if unknown:
        log.warning("%s: %d item id(s) are not in the dataset and were ignored", path, unknown)
    return ItemTexts(texts, {index: "item_text" for index in texts}, known)


def known_items(item_raw_ids, occurring, catalogue: dict[int, object] | None = None) -> dict[int, object]:
    """Item index -> raw id for every real item (catalogue entries and items that occur)."""
    known = dict(catalogue or {})
    for index in occurring:
        index = int(index)
        if index and index not in known:
            known[index] = int(index) if item_raw_ids is None else str(item_raw_ids[index])
    return dict(sorted(known.items()))


def movie_catalogue(folder: Path) -> dict[int, object] | None:
    """MovieID -> MovieID for every movie in ``movies.dat`` (None without a catalogue)."""
    movies_path = _find(folder, "movies.dat")
    return {movie: movie for movie in read_movies(movies_path)} if movies_path else None


def item_texts(folder: Path, item_raw_ids, num_items: int, known: dict[int, object],
               item_text_file: Path | None = None, dataset_texts: dict[int, str] | None = None) -> ItemTexts:
    """Dispatch: an explicit ``--item-text`` file wins; else ML-1M files; else the texts of the
    dataset's own item file (``dataset_texts``, item index -> text); else no text (warned)."""
    if item_text_file is not None:
        return file_texts(item_text_file, item_raw_ids, num_items, known)
    if item_raw_ids is None:
        result = movie_texts(folder)
        result.known = known
        return result
    if dataset_texts:
        texts = {index: text for index, text in dataset_texts.items() if 0 < index < num_items}
        log.info("item texts from the dataset's item file: %d of %d indexed items", len(texts), num_items - 1)
        return ItemTexts(texts, {index: "item_file" for index in texts}, known)
    log.warning("dataset without an item file and without --item-text FILE (item<TAB>text): no text features")
    return ItemTexts({}, {}, known)
