"""The ``feddmmr`` command line. Results go to stdout (JSON with ``--json``), progress to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .data.readers import LAYOUTS, DataError, TableColumns

log = logging.getLogger("feddmmr")


def add_data_args(parser: argparse.ArgumentParser, default_top: int | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, type=Path,
                       help="MovieLens-1M folder (official or ordered layout) or a CSV/TSV/Parquet table")
    group.add_argument("--layout", choices=LAYOUTS, default=None, help="input layout (default: detect)")
    group.add_argument("--top-users", type=int, default=default_top,
                       help="keep the N most active users (ties: smaller id); default: "
                            + (str(default_top) if default_top else "all users"))
    group.add_argument("--user-col", default="user", help="custom table: user column")
    group.add_argument("--item-col", default="item", help="custom table: item column")
    group.add_argument("--time-col", default="timestamp", help="custom table: timestamp column")
    group.add_argument("--rating-col", default=None, help="custom table: optional rating column")


def load_from_args(args: argparse.Namespace):
    from .data.dataset import load_dataset

    columns = TableColumns(args.user_col, args.item_col, args.time_col, args.rating_col)
    return load_dataset(args.data, args.layout, args.top_users, columns)


def emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=None, sort_keys=False))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


# --------------------------------------------------------------------------- commands

def cmd_data_stats(args: argparse.Namespace) -> int:
    data = load_from_args(args)
    if args.save_mapping:
        data.save_item_mapping(args.save_mapping)
    emit(data.stats(), args.json)
    return 0


def _protocols(choice: str) -> list[str]:
    return ["full", "sampled"] if choice == "both" else [choice]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    data = load_from_args(args)
    if args.model != "popularity":
        raise SystemExit(f"unknown model {args.model!r}")
    from .baselines import popularity_scorer

    scorer = popularity_scorer(data)
    results = [evaluate(scorer, data, args.split, protocol, seed=args.seed, cache_dir=args.cache_dir)
               for protocol in _protocols(args.protocol)]
    for result in results:
        result["model"] = args.model
    emit(results[0] if len(results) == 1 else {"results": results}, args.json)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .baselines import popularity_scorer
    from .evaluation import evaluate, format_metrics

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = load_from_args(args)
    data.save_item_mapping(out / "item_mapping.tsv")
    stats = data.stats()
    log.info("data: %s", json.dumps(stats))
    report = {"data": stats, "popularity": []}
    for protocol in ("sampled", "full"):
        result = evaluate(popularity_scorer(data), data, "test", protocol, seed=args.seed,
                          cache_dir=out / "cache")
        report["popularity"].append(result)
        print("popularity " + format_metrics(result))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report written to {out / 'report.json'}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddmmr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="users, items, interactions and sequence lengths")
    add_data_args(stats)
    stats.add_argument("--save-mapping", type=Path, default=None,
                       help="custom datasets: write the item index -> raw id mapping here")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_data_stats)

    ev = sub.add_parser("evaluate", help="evaluate a model on the val or test split")
    add_data_args(ev)
    ev.add_argument("--model", default="popularity", choices=["popularity"])
    ev.add_argument("--protocol", choices=["full", "sampled", "both"], default="both")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sampled candidates")
    ev.add_argument("--cache-dir", type=Path, default=None, help="cache sampled candidates here")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    pipe = sub.add_parser("pipeline", help="the main job, end to end")
    add_data_args(pipe, default_top=1000)
    pipe.add_argument("--out", type=Path, required=True)
    pipe.add_argument("--seed", type=int, default=0)
    pipe.set_defaults(func=cmd_pipeline)

    from .features.cli import add_features_parser

    add_features_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"feddmmr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
