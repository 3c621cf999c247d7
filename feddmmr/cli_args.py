"""Command-line pieces shared by every ``feddmmr`` sub-command: data arguments, number types, output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data.dataset import SequenceDataset, load_dataset
from .data.readers import LAYOUTS, TableColumns


def add_data_args(parser: argparse.ArgumentParser, default_top: int | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, type=Path,
                       help="MovieLens-1M folder (official or ordered layout) or a CSV/TSV/Parquet table")
    group.add_argument("--layout", choices=LAYOUTS, default=None, help="input layout (default: detect)")
    group.add_argument("--top-users", type=top_users, default=default_top,
                       help="keep the N most active users (ties: smaller id), or 'all'; default: "
                            + (str(default_top) if default_top else "all users"))
    group.add_argument("--user-col", default="user", help="custom table: user column")
    group.add_argument("--item-col", default="item", help="custom table: item column")
    group.add_argument("--time-col", default="timestamp", help="custom table: timestamp column")
    group.add_argument("--rating-col", default=None, help="custom table: optional rating column")


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


def load_from_args(args: argparse.Namespace) -> SequenceDataset:
    columns = TableColumns(args.user_col, args.item_col, args.time_col, args.rating_col)
    top = None if args.top_users in (None, "all") else args.top_users
    return load_dataset(args.data, args.layout, top, columns)


def emit(result: dict, as_json: bool) -> None:
    """A command's result on stdout: one JSON object, or ``key: value`` lines."""
    if as_json:
        print(json.dumps(result, indent=None, sort_keys=False))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
