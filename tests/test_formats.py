"""The recommender-systems layouts besides ML-1M (RecBole atomic files, MovieLens 100K, MovieLens
10M/20M/25M/32M, generic tables found by their column names): detection, the same sequences from
every layout, item metadata (titles, texts), and the errors that teach.

Every file is tiny and written here; no real dataset is read or copied.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feddmmr.data.dataset import load_dataset, why_absent
from feddmmr.data.readers import DataError, TableColumns, detect_layout, read_interactions

from .conftest import write_ratings

# one user history per user: (user, item, rating, timestamp), with ties (user 1: items 9, 4 at t=10)
ROWS = [(1, 9, 4, 10), (1, 4, 3, 10), (1, 6, 5, 12), (1, 2, 2, 5),
        (2, 3, 4, 7), (2, 1, 5, 3), (2, 12, 1, 9), (2, 9, 4, 8),
        (3, 5, 3, 1), (3, 6, 3, 2), (3, 7, 3, 3), (3, 8, 3, 4), (3, 10, 3, 0), (3, 11, 3, 5),
        (4, 1, 5, 1), (4, 2, 5, 1)]  # user 4 has two interactions: dropped everywhere
ITEMS = range(1, 13)
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def title(item: int) -> str:
    return f"Film {item}, The (199{item % 10})" if item % 3 == 0 else f"Café {item} (199{item % 10})"


def write_ml100k(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    flags = lambda item: "|".join("1" if g in (item % 19 if item != 9 else 0, 8) else "0"  # noqa: E731
                                  for g in range(19))
    (folder / "u.item").write_bytes("".join(f"{i}|{title(i)}|01-Jan-1995||http://x/{i}|{flags(i)}\n"
                                            for i in ITEMS).encode("iso-8859-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(GENRES)) + "\n")
    return folder


def write_ml10m_dat(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r - 0.5}::{t}\n" for u, i, r, t in ROWS))
    (folder / "movies.dat").write_text("".join(f"{i}::{title(i)}::Drama|Comedy\n" for i in ITEMS))
    (folder / "tags.dat").write_text("1::9::funny::11\n")
    return folder


def write_ml20m_csv(folder: Path, movies: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        + "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in ROWS))
    if movies:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows([(i, title(i), "Drama|Comedy" if i != 5 else "(no genres listed)") for i in ITEMS])
        (folder / "movies.csv").write_text(buffer.getvalue())
    return folder


def write_recbole(folder: Path, name: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                          + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    (folder / f"{name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tdirector:token\n"
        + "".join(f"{i}\tFilm {i}\t199{i % 10}\tDrama Comedy\tDirector {i}\n" for i in ITEMS))
    (folder / f"{name}.user").write_text("user_id:token\tage:token\n1\t20\n")
    return folder


def write_table(folder: Path, name: str, header: tuple[str, str, str], sep: str = ",") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(sep.join(header) + "\n" + "".join(f"{u}{sep}{i}{sep}{t}\n" for u, i, _, t in ROWS))
    return folder / name


def write_parquet(folder: Path) -> Path:
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"UserID": [str(r[0]) for r in ROWS], "item": [str(r[1]) for r in ROWS],
                          "time": [r[3] for r in ROWS]})
    frame.to_parquet(folder / "x.parquet")
    return folder / "x.parquet"


# (writer, the layout detected, the path to pass: the folder or one file in it)
LAYOUT_WRITERS = {
    "ml1m": (lambda f: write_ratings(f, [r for r in ROWS], movies=12), "ml1m", None),
    "ml100k": (write_ml100k, "ml100k", None),
    "ml100k file": (write_ml100k, "ml100k", "u.data"),
    "ml10m .dat": (write_ml10m_dat, "ml10m", None),
    "ml20m .csv": (write_ml20m_csv, "ml10m", None),
    "ml20m ratings.csv alone": (lambda f: write_ml20m_csv(f, movies=False), "ml10m", None),
    "recbole folder": (write_recbole, "recbole", None),
    "recbole .inter": (write_recbole, "recbole", "tiny.inter"),
    "csv user_id,item_id,timestamp": (lambda f: write_table(f, "events.csv", ("user_id", "item_id", "timestamp")).parent,
                                      "table", "events.csv"),
    "csv userId,movieId,time": (lambda f: write_table(f, "e.csv", ("userId", "movieId", "time")).parent, "table", None),
    "tsv UserID,MovieID,Timestamp": (lambda f: write_table(f, "e.tsv", ("UserID", "MovieID", "Timestamp"), "\t").parent,
                                     "table", None),
    "parquet UserID,item,time": (lambda f: write_parquet(f).parent, "table", "x.parquet"),
}


def sequences(data) -> dict[str, list[str]]:
    raw = (lambda i: str(i)) if data.item_raw_ids is None else (lambda i: str(data.item_raw_ids[i]))
    return {str(user): [raw(i) for i in data.sequence(row)] for row, user in enumerate(data.user_ids)}


EXPECTED = {"1": ["2", "9", "4", "6"], "2": ["1", "3", "9", "12"], "3": ["10", "5", "6", "7", "8", "11"]}


@pytest.mark.parametrize("name", list(LAYOUT_WRITERS))
def test_every_layout_is_detected_and_gives_the_same_sequences(name, tmp_path):
    write, layout, file = LAYOUT_WRITERS[name]
    folder = tmp_path / "d"
    write(folder)
    path = folder / file if file else folder
    assert detect_layout(path) == layout
    data = load_dataset(path)
    assert data.layout == layout
    assert sequences(data) == EXPECTED  # time order, ties in file order, user 4 (2 interactions) dropped
    assert data.dropped_users == 1


def test_remapped_layouts_index_items_alike(tmp_path):
    """The same interactions in any remapped layout: the same item index, hence the same fingerprint."""
    prints = set()
    for name in ("recbole folder", "csv user_id,item_id,timestamp", "parquet UserID,item,time"):
        write, _, file = LAYOUT_WRITERS[name]
        folder = tmp_path / name.replace(" ", "_")
        write(folder)
        prints.add(load_dataset(folder / file if file else folder).fingerprint())
    assert len(prints) == 1


def test_ml1m_layout_keeps_its_raw_id_index(tmp_path):
    """ML-1M is not remapped: MovieID is the item index and movies.dat sizes the table (as before)."""
    data = load_dataset(write_ratings(tmp_path / "ml", ROWS, movies=20))
    assert data.item_raw_ids is None and data.num_items == 21 and data.item_texts == {}


def test_content_decides_when_the_name_does_not(tmp_path):
    (tmp_path / "a.txt").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    (tmp_path / "b.txt").write_text("1\t2\t3\t4\n")
    (tmp_path / "c.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,4\n")
    (tmp_path / "d.bin").write_text("hello\n")
    assert [detect_layout(tmp_path / n) for n in ("a.txt", "b.txt", "c.csv")] == ["recbole", "ml100k", "ml10m"]
    with pytest.raises(DataError, match=r"d\.bin: cannot tell the layout from this file name or its first line"):
        detect_layout(tmp_path / "d.bin")
    for name, layout in (("inter.txt", "recbole"), ("data.tsv", "ml100k")):
        folder = tmp_path / layout
        write = {"recbole": write_recbole, "ml100k": write_ml100k}[layout]
        write(folder / "src")
        source = next(p for p in (folder / "src").iterdir() if p.name.endswith((".inter", "u.data")))
        (folder / "only").mkdir()
        (folder / "only" / name).write_bytes(source.read_bytes())
        assert detect_layout(folder / "only") == layout
        assert sequences(load_dataset(folder / "only")) == EXPECTED


# --------------------------------------------------------------------------- item metadata

def test_ml100k_titles_and_texts_come_from_u_item(tmp_path):
    data = load_dataset(write_ml100k(tmp_path / "d"))
    index = {str(data.item_raw_ids[i]): i for i in range(1, data.num_items)}
    assert data.titles[index["4"]] == "Café 4 (1994)"  # ISO-8859-1 decoded
    assert data.item_texts[index["4"]] == "Café 4 (1994). Genres: Children's, Drama."
    assert data.item_texts[index["9"]] == "The Film 9 (1999). Genres: Drama."  # article moved, 'unknown' left out
    assert data.item_file.endswith("u.item")


def test_ml20m_and_ml10m_titles_and_genres(tmp_path):
    for writer in (write_ml20m_csv, write_ml10m_dat):
        data = load_dataset(writer(tmp_path / writer.__name__))
        index = {str(data.item_raw_ids[i]): i for i in range(1, data.num_items)}
        assert data.titles[index["6"]] == "Film 6, The (1996)"
        assert data.item_texts[index["6"]] == "The Film 6 (1996). Genres: Drama, Comedy."
        if writer is write_ml20m_csv:
            assert data.item_texts[index["5"]] == "Café 5 (1995)."  # '(no genres listed)' is no genre


def test_recbole_item_file_gives_titles_and_texts(tmp_path):
    data = load_dataset(write_recbole(tmp_path / "d"))
    index = {str(data.item_raw_ids[i]): i for i in range(1, data.num_items)}
    assert data.titles[index["7"]] == "Film 7 (1997)"
    assert data.item_texts[index["7"]] == "Film 7 (1997). Genres: Drama, Comedy. director: Director 7"


def test_features_use_the_item_file_unless_item_text_is_given(tmp_path):
    from feddmmr.features.texts import item_texts, known_items

    data = load_dataset(write_recbole(tmp_path / "d"))
    known = known_items(data.item_raw_ids, data.occurring_items())
    texts = item_texts(tmp_path / "d", data.item_raw_ids, data.num_items, known, None, data.item_texts)
    assert texts.source_counts() == {"item_file": 12} and texts.texts == data.item_texts
    (tmp_path / "own.tsv").write_text("7\tmy own words\n")
    texts = item_texts(tmp_path / "d", data.item_raw_ids, data.num_items, known, tmp_path / "own.tsv",
                       data.item_texts)
    assert list(texts.texts.values()) == ["my own words"] and texts.source_counts() == {"item_text": 1}


# --------------------------------------------------------------------------- columns

def test_explicit_columns_win_and_ambiguity_lists_the_candidates(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("user_id,customer_id,item,timestamp\n" + "".join(f"u{u},c{u},i{i},{t}\n" for u, i, _, t in ROWS))
    with pytest.raises(DataError, match=r"t\.csv:1: ambiguous table: several columns could be the user: "
                                        r"\['user_id', 'customer_id'\]; pick one with --user-col"):
        load_dataset(path)
    data = load_dataset(path, columns=TableColumns(user="customer_id"))
    assert sorted(map(str, data.user_ids)) == ["c1", "c2", "c3"]
    with pytest.raises(DataError, match=r"missing column\(s\) \['who'\]; found"):
        load_dataset(path, columns=TableColumns(user="who"))


def test_recbole_columns_may_be_named_with_or_without_their_type(tmp_path):
    write_recbole(tmp_path / "d")
    for name in ("user_id", "user_id:token"):
        data = load_dataset(tmp_path / "d", columns=TableColumns(user=name))
        assert sequences(data) == EXPECTED


# --------------------------------------------------------------------------- errors that teach

def test_a_user_outside_the_kept_set_gets_their_count_and_the_flag(tmp_path):
    table = read_interactions(write_recbole(tmp_path / "d"))
    assert why_absent(table, "2", top_n=1) == (
        "user '2' has 4 interactions but is not among the 1 most active users kept by --top-users 1 (the least "
        "active kept user has 6, this one ranks 3 of 3); pass --top-users all (or --top-users 3) to recommend "
        "for them")
    assert "has 2 interaction(s)" in why_absent(table, "4", top_n=None)
    assert "at least 3 are needed" in why_absent(table, "4", top_n=None)
    assert "no interaction has that user id (ids there look like '1', '2', '3'" in why_absent(table, "99", 1)


def test_flower_nodes_take_the_same_data_options(tmp_path):
    from feddmmr.config import TrainConfig
    from feddmmr.flower import core

    path = tmp_path / "t.csv"
    path.write_text("who,what,when\n" + "".join(f"{u},{i},{t}\n" for u, i, _, t in ROWS))
    run_config = {**core.default_app_config(), "data": str(path), "user_col": "who", "item_col": "what",
                  "time_col": "when"}
    assert sequences(core.load_node_data(TrainConfig(top_users=None), run_config)) == EXPECTED


# --------------------------------------------------------------------------- one command

TINY = ["--set", "sasrec_hidden_dim=16", "--set", "sasrec_num_blocks=1", "--set", "sasrec_num_heads=2",
        "--set", "max_seq_len=8", "--set", "moe_num_heads=2", "--set", "memory_top_k=4", "--set", "num_rounds=1",
        "--set", "client_fraction=0.5", "--set", "batch_size=4", "--set", "num_negatives=5",
        "--set", "eval_negatives=10", "--set", "num_global_prototypes=2", "--set", "num_prototypes=2"]


def feddmmr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feddmmr.cli", *args], capture_output=True, text=True)


def test_pipeline_on_recbole_files_in_one_command_then_recommend_with_titles(tmp_path):
    """No posters, no --item-text: the texts come from NAME.item, Stage 3 runs text-only and says so."""
    folder = tmp_path / "rb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, 13):
        for step, item in enumerate(rng.permutation(30)[:8] + 1):
            inter.append(f"U{user}\tI{item}\t{100 + step}")
    (folder / "shop.inter").write_text("\n".join(inter) + "\n")
    (folder / "shop.item").write_text("item_id:token\tname:token_seq\tcategories:token_seq\n" + "".join(
        f"I{i}\tThing {i}\t{'red' if i % 2 else 'blue'}\n" for i in range(1, 31)))
    out = tmp_path / "pipe"
    result = feddmmr("pipeline", "--data", str(folder), "--out", str(out), "--top-users", "all", "--threads", "1",
                     "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["layout"] == "recbole" and report["features"]["text"]["coverage"] >= 24
    assert report["features"]["text"]["sources"] == {"item_file": report["features"]["text"]["coverage"]}
    assert report["features"]["visual"]["coverage"] == 0
    assert "no item has posters: Stage 3 runs with text features only" in (out / "report.md").read_text()
    assert set(report["runs"]) == {"popularity", "stage1_cohort20_eps", "stage3_tuned"}

    result = feddmmr("recommend", "--checkpoint", str(out / "stage3_tuned"), "--data", str(folder),
                     "--user", "U3", "--k", "3", "--json")
    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["items"]
    assert len(items) == 3 and all(r["title"] == f"Thing {r['item'][1:]}" for r in items)
    result = feddmmr("recommend", "--checkpoint", str(out / "stage3_tuned"), "--data", str(folder),
                     "--user", "U3", "--top-users", "2")
    assert result.returncode == 2
    assert "user 'U3' has 8 interactions but is not among the 2 most active users" in result.stderr
    assert "pass --top-users all" in result.stderr
