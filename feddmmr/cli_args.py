"""Command-line pieces shared by every ``feddmmr`` sub-command: data arguments, number types, output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import DEVICES
from .data.dataset import SequenceDataset, load_dataset
from .data.parsing import TableColumns
from .data.readers import LAYOUTS


def add_data_args(parser: argparse.ArgumentParser, default_top: int | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, type=Path,
                       help="a dataset folder or file: MovieLens 1M/100K/10M/20M/25M/32M, RecBole atomic files "
                            "(NAME.inter [+ NAME.item]) or a CSV/TSV/Parquet table")
    group.add_argument("--layout", choices=LAYOUTS, default=None,
                       help="input layout (default: detected from the file names, then their content)")
    group.add_argument("--top-users", type=top_users, default=default_top,
                       help="keep the N most active users (ties: smaller id), or 'all'; default: "
                            + (str(default_top) if default_top else "all users"))
    group.add_argument("--user-col", default=None,
                       help="table/RecBole: user column (default: found by name: user_id, userId, UserID, user, ...)")
    group.add_argument("--item-col", default=None,
                       help="table/RecBole: item column (default: found by name: item_id, movieId, item, ...)")
    group.add_argument("--time-col", default=None,
                       help="table/RecBole: time column (default: found by name: timestamp, time, date, ...)")
    group.add_argument("--rating-col", default=None,
                       help="table/RecBole: optional rating column (default: 'rating', 'score', ... if exactly one)")


def add_device_arg(parser, what: str, default: str | None = "cpu") -> None:
    """``--device cpu|cuda|auto``, the same option on every command that computes (``auto``: a GPU when
    there is one); ``None`` as default leaves the config's ``device`` key as it is."""
    parser.add_argument("--device", choices=DEVICES, default=default,
                        help=f"where {what}: cpu, cuda or auto (the GPU when torch sees one); default: "
                             + (default or "the config's `device`, cpu unless set"))


def top_users(value: str) -> int | str:
    """An argparse type: a positive integer or ``all``."""
    if value.lower() == "all":
        return "all"
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return number


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a clear usage error otherwise)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number
    return parse


def columns_from_args(args: argparse.Namespace) -> TableColumns:
    return TableColumns(args.user_col, args.item_col, args.time_col, args.rating_col)


def load_from_args(args: argparse.Namespace) -> SequenceDataset:
    top = None if args.top_users in (None, "all") else args.top_users
    return load_dataset(args.data, args.layout, top, columns_from_args(args))


def emit(result: dict, as_json: bool) -> None:
    """A command's result on stdout: one JSON object, or ``key: value`` lines."""
    if as_json:
        print(json.dumps(result, indent=None, sort_keys=False))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
