"""Hostile input: every malformed or adversarial input maps to one clear error.

Each row of ``HOSTILE`` is one input, the exception type it must raise and a message fragment
(a regex) naming the file, line or field and what is wrong. Inputs that are tolerated on purpose
(duplicate lines, ISO-8859-1 titles, unreadable posters) have their own tests below, which pin
down that behaviour. Everything is tiny and synthetic: the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import pickle
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from feddmmr.cli import main
from feddmmr.config import RANGES, ConfigError, TrainConfig, apply_overrides, load_preset
from feddmmr.data.dataset import load_dataset
from feddmmr.data.readers import DataError, read_interactions
from feddmmr.features.store import FeatureError, load_table
from feddmmr.federation.checkpoint import load_init, load_model, save_weights, write_json
from feddmmr.models import CheckpointError, UR4RecV2MoE

from .conftest import synthetic_rows, write_ratings

pytestmark = pytest.mark.reliability

Action = Callable[[], object]


@dataclass
class Case:
    """One hostile input: ``setup(tmp_path)`` writes it and returns the call that must fail."""

    name: str
    setup: Callable[[Path], Action]
    error: type[Exception]
    message: str  # regex searched in str(error)


# --------------------------------------------------------------------------- inputs

GOOD = "".join(f"{u}::{i}::4::{1000 + i}\n" for u in (1, 2) for i in range(1, 6))  # 10 clean lines
MOVIES = "1::Toy Story (1995)::Animation\n2::Heat (1995)::Action\n"
HEADER = "UserID\tMovieID\tSeqPos\n"
TABLE = "user,item,timestamp\n" + "".join(f"u{u},i{i},{i}\n" for u in (1, 2) for i in range(1, 4))
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
    f"{u}\t{i}\t4\t{i}\n" for u in (1, 2) for i in range(1, 4))  # 6 rows
ITEM = "item_id:token\tmovie_title:token_seq\n1\tA\n2\tB\n"
UDATA = "".join(f"{u}\t{i}\t4\t{i}\n" for u in (1, 2) for i in range(1, 4))  # 6 lines
UITEM = "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["1"]) + "\n" for i in (1, 2))
RATINGS_CSV = "userId,movieId,rating,timestamp\n1,1,3.5,1\n1,2,4.0,2\n1,3,4.5,3\n"
MOVIES_CSV = 'movieId,title,genres\n1,"Heat, The (1995)",Action\n2,B (1995),Drama\n'


def ratings(text: str | bytes, name: str = "ratings.dat", **extra: str | bytes) -> Callable[[Path], Action]:
    """A data folder holding ``name`` (plus ``extra`` files); the action loads it."""
    def setup(tmp: Path) -> Action:
        for file, content in {name: text, **extra}.items():
            (tmp / file).write_bytes(content.encode() if isinstance(content, str) else content)
        return lambda: load_dataset(tmp)
    return setup


def table(text: str | bytes, name: str = "t.csv") -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        (tmp / name).write_bytes(text.encode() if isinstance(text, str) else text)
        return lambda: load_dataset(tmp / name)
    return setup


def good_features(rows: int = 4, dim: int = 3) -> dict:
    features = torch.zeros(rows, dim)
    features[1:, 0] = 1.0
    mask = torch.tensor([False] + [True] * (rows - 1))
    return {"features": features, "mask": mask,
            "meta": {"encoder": "x", "dim": dim, "coverage": rows - 1, "input_hash": "h"}}


def feature_file(change: Callable[[dict], object] | None = None, raw: bytes | None = None,
                 num_items: int | None = None) -> Callable[[Path], Action]:
    """A feature file: a good table edited in place by ``change``, or ``raw`` bytes; the action loads it."""
    def setup(tmp: Path) -> Action:
        path = tmp / "visual_features.pt"
        if raw is not None:
            path.write_bytes(raw)
        else:
            payload = good_features()
            if change:
                change(payload)
            torch.save(payload, path)
        return lambda: load_table(path, num_items)
    return setup


def saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


class Exploit:
    """A pickle that would run code on load; weights_only loading must refuse it before it runs."""

    def __reduce__(self):
        return (print, ("this must never be printed",))




def overrides(**values: str) -> Callable[[Path], Action]:
    """``--set key=value`` pairs (strings, exactly as the command line passes them)."""
    return lambda tmp: lambda: apply_overrides(TrainConfig(), values, "--set")


def toml(text: str) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        (tmp / "bad.toml").write_text(text)
        return lambda: load_preset(tmp / "bad.toml")
    return setup


SMALL = dict(num_items=41, sasrec_hidden_dim=16, sasrec_num_blocks=1, sasrec_num_heads=2, max_seq_len=8,
             moe_num_heads=2, visual_dim=6, text_dim=5)


def run_dir(tmp: Path, weights: bytes | None = None, **model: int) -> Path:
    """A run directory of a small model trained on item_embedding + backbone (``weights`` replaces the file)."""
    kwargs = {**SMALL, **model}
    folder = tmp / "run"
    save_weights(folder / "model.safetensors", UR4RecV2MoE(**kwargs).state_dict())
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    write_json(folder / "config.json", {"train": TrainConfig().to_dict(), "model": kwargs,
                                        "trained_groups": ["item_embedding", "backbone"]})
    return folder


def init_into(saved: dict, target: dict) -> Callable[[Path], Action]:
    """Load a previous stage saved with ``saved`` sizes into a model built with ``target`` sizes."""
    def setup(tmp: Path) -> Action:
        folder = run_dir(tmp, **saved)
        return lambda: load_init(UR4RecV2MoE(**{**SMALL, **target}), folder, ["backbone"])
    return setup


def checkpoint_file(weights: bytes) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        folder = run_dir(tmp, weights=weights)
        return lambda: load_model(folder)
    return setup


def run_config(text: bytes) -> Callable[[Path], Action]:
    def setup(tmp: Path) -> Action:
        folder = run_dir(tmp)
        (folder / "config.json").write_bytes(text)
        return lambda: load_model(folder)
    return setup


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


def garbage(size: int = 600, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


# --------------------------------------------------------------------------- the table

HOSTILE = [
    # ---- ML-1M ratings.dat: structure
    Case("truncated file, cut mid-line", ratings(GOOD + "3::4::5"), DataError,
         r"ratings\.dat:11: expected 4 fields \(UserID::MovieID::Rating::Timestamp\), found 3"),
    Case("truncated file, cut after a separator", ratings(GOOD + "3::4::5::"), DataError,
         r"ratings\.dat:11: Timestamp '' is not an integer"),
    Case("truncated gzip", ratings(gz(GOOD)[:40], name="ratings.dat.gz"), DataError,
         r"ratings\.dat\.gz: corrupt gzip data"),
    Case("binary garbage", ratings(garbage()), DataError, r"ratings\.dat:\d+: wrong encoding"),
    Case("binary garbage (NUL bytes) on line 3", ratings("1::1::4::1\n1::2::4::2\n\x00\x01\x02\n"), DataError,
         r"ratings\.dat:3: wrong encoding: NUL byte"),
    Case("empty file", ratings(""), DataError, r"ratings\.dat: file is empty"),
    Case("whitespace-only file", ratings("\n \n\t\n"), DataError, r"ratings\.dat: file is empty"),
    Case("too few fields", ratings(GOOD + "1::2::3\n"), DataError, r"ratings\.dat:11: expected 4 fields"),
    Case("too many fields", ratings(GOOD + "1::2::3::4::5\n"), DataError, r"ratings\.dat:11: expected 4 fields"),
    Case("wrong separator", ratings("1,2,3,4\n"), DataError, r"ratings\.dat:1: expected 4 fields"),
    Case("ratings.dat is a folder", lambda tmp: ((tmp / "ratings.dat").mkdir(), lambda: load_dataset(tmp))[1],
         DataError, r"ratings\.dat: not a regular file"),
    # ---- ids and numbers
    Case("MovieID beyond int64", ratings(GOOD + "1::99999999999999999999999::4::1\n"), DataError,
         r"ratings\.dat:11: MovieID 99999999999999999999999 is out of range \(beyond 64-bit integers\)"),
    Case("UserID beyond int64", ratings(GOOD + "9223372036854775808::1::4::1\n"), DataError,
         r"ratings\.dat:11: UserID 9223372036854775808 is out of range"),
    Case("Timestamp beyond int64", ratings(GOOD + "1::1::4::-99999999999999999999\n"), DataError,
         r"ratings\.dat:11: Timestamp -99999999999999999999 is out of range"),
    Case("absurdly large MovieID (a 10^12-row embedding)", ratings(GOOD + "1::1000000000000::4::1\n"), DataError,
         r"ratings\.dat:11: MovieID 1000000000000 is larger than 10,000,000 .*use the 'table' layout"),
    Case("negative MovieID", ratings(GOOD + "1::-5::4::1\n"), DataError,
         r"ratings\.dat:11: MovieID -5 is not a positive integer"),
    Case("negative UserID (line found after blank lines)", ratings(GOOD + "\n\n-1::5::4::1\n"), DataError,
         r"ratings\.dat:13: UserID -1 is not a positive integer"),
    Case("MovieID 0 (the padding index)", ratings(GOOD + "1::0::4::1\n"), DataError,
         r"ratings\.dat:11: MovieID 0 is not a positive integer"),
    Case("non-numeric UserID", ratings(GOOD + "abc::1::4::1\n"), DataError,
         r"ratings\.dat:11: UserID 'abc' is not an integer"),
    Case("non-numeric timestamp", ratings(GOOD + "1::1::4::yesterday\n"), DataError,
         r"ratings\.dat:11: Timestamp 'yesterday' is not an integer"),
    Case("fractional timestamp", ratings(GOOD + "1::1::4::12.5\n"), DataError,
         r"ratings\.dat:11: Timestamp '12\.5' is not an integer"),
    # ---- encodings
    Case("UTF-16 ratings.dat", ratings(GOOD.encode("utf-16")), DataError,
         r"ratings\.dat:1: wrong encoding: NUL byte or UTF-16 byte order mark"),
    Case("invalid UTF-8 byte", ratings(GOOD.encode() + b"1::2\xff::4::1\n"), DataError,
         r"ratings\.dat:11: wrong encoding: byte 0xff at column 5 is not valid utf-8"),
    Case("UTF-16 movies.dat", ratings(GOOD, **{"movies.dat": MOVIES.encode("utf-16")}), DataError,
         r"movies\.dat:1: wrong encoding"),
    Case("movies.dat with too few fields", ratings(GOOD, **{"movies.dat": MOVIES + "3::Jumanji (1995)\n"}),
         DataError, r"movies\.dat:3: expected 3 fields \(MovieID::Title::Genres\), found 2"),
    Case("movies.dat with an absurd MovieID", ratings(GOOD, **{"movies.dat": MOVIES + "99999999999::X::Y\n"}),
         DataError, r"movies\.dat:3: MovieID 99999999999 is larger than"),
    Case("users.dat with a negative UserID", ratings(GOOD, **{"users.dat": "1::F::1::10::48067\n-2::M::1::1::1\n"}),
         DataError, r"users\.dat:2: UserID -2 is not a positive integer"),
    # ---- ML-1M ordered layout
    Case("ordered: header only", ratings(HEADER, name="interactions_all_users_ordered.tsv"), DataError,
         r"ordered\.tsv: file has no interactions after its header"),
    Case("ordered: wrong header", ratings("user\titem\tpos\n1\t2\t0\n", name="interactions_all_users_ordered.tsv"),
         DataError, r"ordered\.tsv:1: header must be"),
    Case("ordered: huge MovieID", ratings(HEADER + "1\t2\t0\n1\t18446744073709551616\t1\n",
                                          name="interactions_all_users_ordered.tsv"),
         DataError, r"ordered\.tsv:3: MovieID 18446744073709551616 is out of range"),
    Case("ordered: negative UserID", ratings(HEADER + "1\t2\t0\n-7\t3\t1\n", name="interactions_all_users_ordered.tsv"),
         DataError, r"ordered\.tsv:3: UserID -7 is not a positive integer"),
    # ---- custom tables
    Case("table: empty file", table(""), DataError, r"t\.csv: file is empty"),
    Case("table: header only", table("user,item,timestamp\n"), DataError, r"t\.csv: table has a header but no rows"),
    Case("table: binary garbage", table(garbage(seed=1)), DataError, r"t\.csv:\d+: wrong encoding"),
    Case("table: NUL byte in an id on line 3", table("user,item,timestamp\na,x,1\na,\x00y,2\n"), DataError,
         r"t\.csv:3: wrong encoding: NUL byte"),
    Case("table: UTF-16", table(TABLE.encode("utf-16")), DataError, r"t\.csv:1: wrong encoding"),
    Case("table: invalid UTF-8 on line 4", table(TABLE.encode() + b"u3,\xe9t\xe9,1\n"), DataError,
         r"t\.csv:8: wrong encoding: byte 0xe9"),
    Case("table: truncated (last line cut mid-row)", table(TABLE + "u3,i4"), DataError,
         r"t\.csv:8: column 'timestamp' value '' is empty \(a missing field or a truncated line\?\)"),
    Case("table: too many fields", table(TABLE + "u3,i4,5,6\n"), DataError, r"t\.csv: malformed table"),
    Case("table: no user or item column under a common name", table("uid,sku,timestamp\na,x,1\n"), DataError,
         r"t\.csv:1: cannot find the user and item column\(s\) among \['uid', 'sku', 'timestamp'\] \(common names "
         r"looked for: user: user_id, userId, UserID, user, \.\.\.; item: item_id, movieId, .*\); "
         r"name them with --user-col/--item-col"),
    Case("table: empty user id", table(TABLE + ",i4,5\n"), DataError, r"t\.csv:8: empty value in column 'user'"),
    Case("table: non-numeric timestamp", table(TABLE + "u3,i4,soon\n"), DataError,
         r"t\.csv:8: column 'timestamp' value 'soon' is not a number or a date"),
    Case("table: infinite timestamp", table(TABLE + "u3,i4,inf\n"), DataError,
         r"t\.csv:8: column 'timestamp' value 'inf' is not a finite number"),
    Case("table: timestamp overflowing float", table(TABLE + "u3,i4,1e400\n"), DataError,
         r"t\.csv:8: column 'timestamp' value '1e400' is not a finite number"),
    Case("table: parquet that is not parquet", table(garbage(seed=2), name="t.parquet"), DataError,
         r"t\.parquet: cannot read table"),
    Case("table: two columns could be the user (ambiguous)", table("user_id,user,item_id,timestamp\na,b,x,1\n"),
         DataError, r"t\.csv:1: ambiguous table: several columns could be the user: \['user_id', 'user'\]; "
                    r"pick one with --user-col"),
    Case("table: several tables in the folder", ratings(TABLE, name="a.csv", **{"b.csv": TABLE}), DataError,
         r"several tables in this folder \['a\.csv', 'b\.csv'\]; pass the one to use with --data FILE"),
    # ---- RecBole atomic files
    Case("recbole: header field without a type", ratings(INTER.replace("item_id:token", "item_id"), name="x.inter"),
         DataError, r"x\.inter:1: not a RecBole atomic-file header \(tab-separated name:type fields"),
    Case("recbole: unknown field type", ratings(INTER.replace("item_id:token", "item_id:string"), name="x.inter"),
         DataError, r"x\.inter:1: not a RecBole atomic-file header"),
    Case("recbole: no time field", ratings("user_id:token\titem_id:token\trating:float\n1\t2\t3\n", name="x.inter"),
         DataError, r"x\.inter:1: cannot find the time column\(s\) among \['user_id', 'item_id', 'rating'\]"),
    Case("recbole: non-numeric timestamp", ratings(INTER + "3\t4\t5\tsoon\n", name="x.inter"), DataError,
         r"x\.inter:8: column 'timestamp' value 'soon' is not a number or a date"),
    Case("recbole: UTF-16 .inter", ratings(INTER.encode("utf-16"), name="x.inter"), DataError,
         r"x\.inter:1: wrong encoding"),
    Case("recbole: two .inter files", ratings(INTER, name="a.inter", **{"b.inter": INTER}), DataError,
         r"the 'recbole' layout needs one NAME\.inter file, found 2 \['a\.inter', 'b\.inter'\]; pass the one"),
    Case("recbole: .item repeats an item", ratings(INTER, name="x.inter", **{"x.item": ITEM + "1\tAgain\n"}),
         DataError, r"x\.item:4: item '1' appears twice"),
    Case("recbole: .item without the .inter's item field",
         ratings(INTER, name="x.inter", **{"x.item": "id:token\ttitle:token_seq\n1\tA\n"}), DataError,
         r"x\.item:1: no 'item_id' field \(the item field of the \.inter file\); found \['id', 'title'\]"),
    Case("recbole: a side file passed as --data", lambda tmp: ((tmp / "x.item").write_text(ITEM),
                                                               lambda: load_dataset(tmp / "x.item"))[1],
         DataError, r"x\.item: a RecBole side file: pass the NAME\.inter file"),
    # ---- MovieLens 100K
    Case("ml100k: too few fields", ratings(UDATA + "1\t2\t3\n", name="u.data"), DataError,
         r"u\.data:7: expected 4 fields \(UserID, MovieID, Rating, Timestamp\), found 3"),
    Case("ml100k: non-numeric item", ratings(UDATA + "1\tx\t3\t4\n", name="u.data"), DataError,
         r"u\.data:7: MovieID 'x' is not an integer"),
    Case("ml100k: u.item with too few fields", ratings(UDATA, name="u.data", **{"u.item": UITEM + "3|Short|x\n"}),
         DataError, r"u\.item:3: expected 24 fields \(movie id\|title\|release date\|.*found 3"),
    Case("ml100k: u.item genre flag not 0/1",
         ratings(UDATA, name="u.data", **{"u.item": UITEM.replace("|0|0|1\n", "|0|0|2\n", 1)}), DataError,
         r"u\.item:1: genre flags must be 0 or 1"),
    # ---- MovieLens 10M / 20M+
    Case("ml10m: non-numeric rating", ratings(GOOD + "1::2::great::4\n", **{"tags.dat": "1::2::x::3\n"}), DataError,
         r"ratings\.dat:11: Rating 'great' is not a number"),
    Case("ml10m without tags.dat (read as ml1m): a half-star rating", ratings(GOOD + "1::2::3.5::4\n"), DataError,
         r"ratings\.dat:11: Rating '3\.5' is not an integer \(MovieLens 10M has half-star ratings: pass --layout "
         r"ml10m\)"),
    Case("ml20m: ratings.csv with another header", ratings("user,movie,rating,timestamp\n1,2,3,4\n",
                                                           name="ratings.csv", **{"movies.csv": MOVIES_CSV}),
         DataError, r"ratings\.csv:1: header must be 'userId,movieId,rating,timestamp'"),
    Case("ml20m: negative movieId", ratings(RATINGS_CSV + "1,-4,3.5,9\n", name="ratings.csv",
                                            **{"movies.csv": MOVIES_CSV}),
         DataError, r"ratings\.csv:5: movieId -4 is not a positive integer"),
    Case("ml20m: movies.csv with another header", ratings(RATINGS_CSV, name="ratings.csv",
                                                          **{"movies.csv": "id,name,genres\n1,A,B\n"}),
         DataError, r"movies\.csv:1: header must start with 'movieId,title,genres'"),
    Case("ml20m: movies.csv with a non-numeric movieId", ratings(RATINGS_CSV, name="ratings.csv",
                                                                 **{"movies.csv": MOVIES_CSV + "abc,X,Y\n"}),
         DataError, r"movies\.csv:4: movieId 'abc' is not a positive integer"),
    Case("missing data path", lambda tmp: lambda: read_interactions(tmp / "nope"), DataError,
         r"nope: not found\. Download MovieLens-1M"),
    # ---- feature files
    Case("features: not a torch file", feature_file(raw=b"definitely not a zip or a pickle"), FeatureError,
         r"visual_features\.pt: not a readable feature file"),
    Case("features: malicious pickle is refused, never run", feature_file(raw=saved({"features": Exploit()})),
         FeatureError,
         r"visual_features\.pt: not a readable feature file \(UnpicklingError: refused, the file holds code"),
    Case("features: integer dtype", feature_file(lambda p: p.update(features=p["features"].long())), FeatureError,
         r"visual_features\.pt: malformed feature file: 'features' must be a 2-D float tensor"),
    Case("features: 1-D", feature_file(lambda p: p.update(features=torch.zeros(4))), FeatureError,
         r"'features' must be a 2-D float tensor, found \(4,\)"),
    Case("features: 3-D", feature_file(lambda p: p.update(features=torch.zeros(4, 3, 2))), FeatureError,
         r"'features' must be a 2-D float tensor, found \(4, 3, 2\)"),
    Case("features: NaN row", feature_file(lambda p: p["features"].__setitem__((2, 1), float("nan"))),
         FeatureError, r"features contain NaN or infinite values \(first in row 2\)"),
    Case("features: NaN in a masked-out row", feature_file(lambda p: p["features"].__setitem__((0, 0), float("nan"))),
         FeatureError, r"features contain NaN or infinite values \(first in row 0\)"),
    Case("features: mask of the wrong dtype", feature_file(lambda p: p.update(mask=p["mask"].int())), FeatureError,
         r"'mask' must be a bool tensor of shape \[4\]"),
    Case("features: mask of the wrong length", feature_file(lambda p: p.update(mask=p["mask"][:3])), FeatureError,
         r"'mask' must be a bool tensor of shape \[4\]"),
    Case("features: meta dim disagrees with the shape", feature_file(lambda p: p["meta"].update(dim=384)),
         FeatureError, r"meta\['dim'\] = 384 but features have 3 columns"),
    Case("features: rows not unit norm", feature_file(lambda p: p["features"].mul_(3)), FeatureError,
         r"rows with mask True must be L2-normalised"),
    Case("features: not a dict", feature_file(raw=saved(torch.zeros(4, 3))), FeatureError,
         r"expected a dict with 'features', 'mask' and 'meta', found Tensor"),
    Case("features: for another dataset (row count)", feature_file(num_items=3953), FeatureError,
         r"visual_features\.pt: has 4 rows but the dataset has 3953 item indices"),
    # ---- config values (--set strings, TOML values)
    Case("config: negative rounds", overrides(num_rounds="-3"), ConfigError,
         r"--set: config key 'num_rounds' = -3 is out of range; allowed: >= 1"),
    Case("config: client_fraction 0", overrides(client_fraction="0"), ConfigError,
         r"'client_fraction' = 0\.0 is out of range; allowed: \(0, 1\]"),
    Case("config: client_fraction above 1", overrides(client_fraction="1.5"), ConfigError,
         r"'client_fraction' = 1\.5 is out of range; allowed: \(0, 1\]"),
    Case("config: learning_rate 0", overrides(learning_rate="0"), ConfigError,
         r"'learning_rate' = 0\.0 is out of range; allowed: > 0"),
    Case("config: negative learning_rate", overrides(learning_rate="-1e-3"), ConfigError,
         r"'learning_rate' = -0\.001 is out of range"),
    Case("config: NaN learning_rate", overrides(learning_rate="nan"), ConfigError,
         r"'learning_rate' = nan is out of range"),
    Case("config: dropout 1", overrides(dropout="1"), ConfigError,
         r"'dropout' = 1\.0 is out of range; allowed: \[0, 1\)"),
    Case("config: negative seed", overrides(seed="-1"), ConfigError, r"'seed' = -1 is out of range"),
    Case("config: top_users 0", overrides(top_users="0"), ConfigError, r"'top_users' = 0 is out of range"),
    Case("config: unknown stage", overrides(stage="4"), ConfigError, r"'stage' = 4 is out of range; allowed: \[1, 3\]"),
    Case("config: unknown key", overrides(num_round="5"), ConfigError, r"--set: unknown config key 'num_round'"),
    Case("config: wrong type (text for int)", overrides(num_rounds="ten"), ConfigError,
         r"--set: config key 'num_rounds': cannot read 'ten' as int"),
    Case("config: wrong type (float for int)", overrides(batch_size="6.5"), ConfigError,
         r"config key 'batch_size': cannot read '6\.5'"),
    Case("config: wrong type (bool)", overrides(use_memory="maybe"), ConfigError,
         r"config key 'use_memory': cannot read 'maybe' as bool"),
    Case("config: unknown choice", overrides(local_optimizer="adagrad"), ConfigError,
         r"'local_optimizer' = 'adagrad' is not one of \('adam', 'sgd'\)"),
    Case("config: unknown parameter group", overrides(trainable_groups="backbone,decoder"), ConfigError,
         r"'trainable_groups' = \['backbone', 'decoder'\]: expected a non-empty list of parameter groups"),
    Case("config: hidden dim not divisible by heads", overrides(sasrec_hidden_dim="30", sasrec_num_heads="4"),
         ConfigError, r"'sasrec_hidden_dim' = 30 is not divisible by sasrec_num_heads = 4"),
    Case("config TOML: float for an int key", toml("num_rounds = 2.5\n"), ConfigError,
         r"bad\.toml: config key 'num_rounds' = 2\.5 has type float, expected int"),
    Case("config TOML: bool for an int key", toml("batch_size = true\n"), ConfigError,
         r"config key 'batch_size' = True has type bool, expected int"),
    Case("config TOML: list for a float key", toml("learning_rate = [1, 2]\n"), ConfigError,
         r"config key 'learning_rate' = \[1, 2\] has type list"),
    Case("config TOML: not TOML", toml("num_rounds: 3\n"), ConfigError, r"bad\.toml: invalid TOML"),
    Case("config: missing preset", lambda tmp: lambda: load_preset("stage9"), ConfigError,
         r"stage9\.toml: config not found \(presets: \["),
    # ---- checkpoints
    Case("checkpoint from another hidden size", init_into({"sasrec_hidden_dim": 32}, {}), CheckpointError,
         r"run/model\.safetensors: parameter group 'item_embedding': key 'sasrec\.item_emb\.weight' has shape "
         r"\(41, 32\), the model expects \(41, 16\)"),
    Case("checkpoint from another item count", init_into({}, {"num_items": 51}), CheckpointError,
         r"run/model\.safetensors: parameter group 'item_embedding': key 'sasrec\.item_emb\.weight' has shape "
         r"\(41, 16\), the model expects \(51, 16\)"),
    Case("checkpoint from another sequence length", init_into({"max_seq_len": 20}, {}), CheckpointError,
         r"parameter group 'backbone': key 'sasrec\.pos_emb\.weight' has shape \(20, 16\), "
         r"the model expects \(8, 16\)"),
    Case("checkpoint that is not safetensors", checkpoint_file(b"PK\x03\x04 a zip, say a torch.save file"),
         CheckpointError, r"run/model\.safetensors: not a readable safetensors file"),
    Case("checkpoint that is a pickle", checkpoint_file(pickle.dumps({"weight": [1.0]})), CheckpointError,
         r"run/model\.safetensors: not a readable safetensors file"),
    Case("run config that is binary", run_config(garbage(seed=3)), CheckpointError, r"run/config\.json: invalid JSON"),
    Case("run config from another tool", run_config(b"[1, 2, 3]"), CheckpointError,
         r"run/config\.json: not a feddmmr run config"),
    Case("run config with a bad model section", run_config(b'{"train": {}, "model": {"num_items": "many"}}'),
         CheckpointError, r"run/config\.json: cannot rebuild the model"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_input_gives_its_clear_error(case: Case, tmp_path: Path, capsys):
    action = case.setup(tmp_path)
    with pytest.raises(case.error) as info:
        action()
    assert type(info.value) is case.error  # exactly that type: callers catch it by name
    assert len(str(info.value).splitlines()) == 1, "errors are one line"
    assert re.search(case.message, str(info.value)), str(info.value)
    assert "this must never be printed" not in capsys.readouterr().out


def test_every_numeric_config_key_has_a_range():
    numeric = [f.name for f in dataclasses.fields(TrainConfig) if "int" in str(f.type) or "float" in str(f.type)]
    assert "top_users" in numeric and "learning_rate" in numeric
    assert sorted(k for k in numeric if k not in RANGES) == [], "add the new key's range to config.RANGES"
    for name, allowed in RANGES.items():  # the default of every key is inside its own range
        assert getattr(TrainConfig(), name) is None or getattr(TrainConfig(), name) in allowed, name


def test_presets_are_valid():
    from feddmmr.config import CONFIG_DIR

    for preset in sorted(CONFIG_DIR.glob("*.toml")):
        load_preset(preset.stem)


# --------------------------------------------------------------------------- tolerated on purpose

@pytest.mark.parametrize("files, target, kept, dropped, first_repeat", [
    ({"ratings.dat": GOOD + "1::7::4::1007\n1::1::4::1001\n"}, "", 11, 1, 12),
    ({"interactions_all_users_ordered.tsv": HEADER + "1\t5\t0\n1\t6\t1\n1\t7\t2\n\n1\t5\t0\n"}, "", 3, 1, 6),
    ({"t.csv": TABLE + "u1,i1,1\nu1,i1,1\n"}, "t.csv", 6, 2, 8),
], ids=["ml1m", "ml1m-ordered", "table"])
def test_exact_duplicate_lines_are_dropped_with_a_warning(files, target, kept, dropped, first_repeat, tmp_path,
                                                          caplog):
    """A repeated line (all fields equal) counts once; the warning names the file and the first repeat.

    Duplicates carry no information but would count an interaction twice (a file concatenated twice,
    say), so they are dropped rather than refused; the same item at another time is kept.
    """
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with caplog.at_level(logging.WARNING):
        interactions = read_interactions(tmp_path / target)
    assert len(interactions.users) == kept
    assert f"{next(iter(files))}: dropped {dropped} exact duplicate line(s) (the first is line {first_repeat})" \
        in caplog.text


def test_re_consumption_at_another_time_is_kept(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::5::4::1\n1::6::4::2\n1::5::4::3\n")
    assert load_dataset(tmp_path).sequence(0).tolist() == [5, 6, 5]


@pytest.mark.parametrize("encoding", ["iso-8859-1", "utf-8", "utf-8-sig"])
def test_catalogue_titles_in_latin1_or_utf8_decode_to_the_same_text(encoding, tmp_path):
    """The real ML-1M movies.dat is ISO-8859-1 (e.g. 'Café'); a UTF-8 copy must not turn into 'CafÃ©'."""
    folder = write_ratings(tmp_path / "ml", synthetic_rows(num_users=4))
    (folder / "movies.dat").write_bytes("1::Café au lait (1993)::Comedy\n2::Señor Niño (1995)::Drama\n"
                                        .encode(encoding))
    data = load_dataset(folder)
    assert data.titles[1] == "Café au lait (1993)" and data.titles[2] == "Señor Niño (1995)"


def test_bom_crlf_and_blank_lines_parse_like_the_clean_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "ratings.dat").write_text(GOOD)
    (tmp_path / "b" / "ratings.dat").write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n\r\n").encode())
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert a.items.tolist() == b.items.tolist() and a.offsets.tolist() == b.offsets.tolist()


# --------------------------------------------------------------------------- posters

def png_header(width: int, height: int) -> bytes:
    """A 60-byte PNG that claims ``width`` x ``height`` pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def jpeg(color=(200, 30, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 60), color).save(buffer, "JPEG")
    return buffer.getvalue()


class StubEncoder:
    """A 4-d 'encoder' (mean colour + 1) so the poster path runs without loading real weights."""

    name, dim = "stub", 4

    @staticmethod
    def preprocess(image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([pixels.mean((2, 3)), torch.ones(len(pixels), 1)], 1)


POSTERS = {  # content -> the reason the warning must give
    "not an image (an HTML error page)": (b"<html><body>404 Not Found</body></html>", "cannot identify image file"),
    "empty file": (b"", "cannot identify image file"),
    "truncated JPEG": (jpeg()[:200], "Truncated File Read"),
    "JPEG magic then garbage": (b"\xff\xd8\xff\xe0" + garbage(300, seed=4), "Truncated File Read"),
    "decompression bomb (PNG claiming 100000 x 100000 px)": (png_header(100_000, 100_000),
                                                             "DecompressionBombError: Image size"),
}


def test_unreadable_posters_count_as_missing_and_are_named(tmp_path, monkeypatch, caplog):
    """A bad poster never stops extraction: it is logged with its file and reason and counts as missing."""
    from feddmmr.features import extract

    monkeypatch.setattr(extract, "load_visual_encoder", lambda *a, **k: StubEncoder())
    folder = tmp_path / "posters"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(jpeg())
    for raw_id, (content, _) in enumerate(POSTERS.values(), start=2):
        (folder / f"{raw_id}.jpg").write_bytes(content)
    (folder / "9.jpg").mkdir()  # a folder named like a poster is no poster
    known = {i: i for i in range(1, 10)}
    found = extract.find_posters(folder, known)
    assert sorted(found) == list(range(1, 2 + len(POSTERS)))
    with caplog.at_level(logging.WARNING):
        table, status = extract.extract_visual(found, known, 10, tmp_path / "v.pt", progress=False)
    assert status == "computed" and table.mask.nonzero().flatten().tolist() == [1]
    assert sorted(table.meta["unreadable"]) == list(range(2, 2 + len(POSTERS)))
    assert table.meta["sources"] == {"poster": 1, "no_poster": 3, "unreadable": len(POSTERS)}
    for raw_id, (_, reason) in enumerate(POSTERS.values(), start=2):
        assert re.search(rf"unreadable poster {re.escape(str(folder / f'{raw_id}.jpg'))}: .*{reason}", caplog.text)
    assert load_table(tmp_path / "v.pt", 10).coverage == 1


# --------------------------------------------------------------------------- command line

def tiny_data(tmp: Path) -> Path:
    return write_ratings(tmp / "ml", synthetic_rows(num_users=6))


CLI = [
    ("missing --data", lambda t: ["data", "stats", "--data", str(t / "nope")], r"nope: not found"),
    ("--data is a file of garbage", lambda t: ((t / "ratings.dat").write_bytes(garbage()),
                                               ["data", "stats", "--data", str(t / "ratings.dat")])[1],
     r"ratings\.dat:\d+: wrong encoding"),
    ("--data is another .dat file", lambda t: ((t / "ratings_old.dat").write_text(GOOD),
                                               ["data", "stats", "--data", str(t / "ratings_old.dat")])[1],
     r"ratings_old\.dat: the 'ml1m' layout reads ratings\.dat"),
    ("recommend for a user outside --top-users", lambda t: ["recommend", "--data", str(tiny_data(t)), "--checkpoint",
                                                            str(t / "run"), "--user", "4", "--top-users", "2"],
     r"user '4' has 7 interactions but is not among the 2 most active users kept by --top-users 2 \(the least "
     r"active kept user has 14, this one ranks 6 of 6\); pass --top-users all \(or --top-users 6\)"),
    ("recommend for an unknown user", lambda t: ["recommend", "--data", str(tiny_data(t)), "--checkpoint",
                                                 str(t / "run"), "--user", "77", "--top-users", "all"],
     r"user '77' is not in .*ratings\.dat: no interaction has that user id \(ids there look like '1', '2', '3'"),
    ("missing --checkpoint", lambda t: ["evaluate", "--data", str(tiny_data(t)), "--checkpoint", str(t / "run")],
     r"run/config\.json: not found; is .* a feddmmr run directory"),
    ("missing --init", lambda t: ["train", "--stage", "3", "--data", str(tiny_data(t)), "--out", str(t / "o"),
                                  "--init", str(t / "none")], r"none/config\.json: not found"),
    ("missing --config", lambda t: ["train", "--stage", "1", "--data", str(tiny_data(t)), "--out", str(t / "o"),
                                    "--config", str(t / "c.toml")], r"c\.toml: config not found"),
    ("missing --features", lambda t: ["features", "check", "--data", str(tiny_data(t)), "--features", str(t / "f")],
     r"f: feature folder not found"),
    ("--set out of range", lambda t: ["train", "--stage", "1", "--data", str(tiny_data(t)), "--out", str(t / "o"),
                                      "--set", "client_fraction=2"], r"--set: config key 'client_fraction' = 2\.0"),
    ("--set malformed", lambda t: ["train", "--stage", "1", "--data", str(tiny_data(t)), "--out", str(t / "o"),
                                   "--set", "num_rounds"], r"--set 'num_rounds': expected key=value"),
    ("--out is an existing file", lambda t: ((t / "o").write_text("x"), [
        "train", "--stage", "1", "--data", str(tiny_data(t)), "--out", str(t / "o"), "--set", "num_rounds=1",
        "--set", "sasrec_hidden_dim=8", "--set", "sasrec_num_heads=2", "--set", "moe_num_heads=2"])[1],
     r"/o: File exists$"),
]


@pytest.mark.parametrize("name, argv, message", CLI, ids=[row[0] for row in CLI])
def test_cli_errors_exit_2_with_one_line(name, argv, message, tmp_path, capsys):
    code = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("feddmmr: error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.parametrize("argv", [
    ["train", "--stage", "4", "--data", "x", "--out", "y"],
    ["recommend", "--data", "x", "--checkpoint", "y", "--user", "1", "--k", "0"],
    ["train", "--stage", "1", "--data", "x", "--out", "y", "--threads", "-2"],
    ["train", "--stage", "1", "--data", "x", "--out", "y", "--seed", "-1"],
], ids=["unknown stage", "k 0", "negative threads", "negative seed"])
def test_cli_argument_errors_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err
