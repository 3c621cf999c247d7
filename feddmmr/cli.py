"""The ``feddmmr`` command line. Results go to stdout (JSON with ``--json``), progress to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .baselines import content_knn_scorer, popularity_scorer
from .cli_args import add_data_args, add_device_arg, columns_from_args, emit, int_at_least, load_from_args
from .config import ConfigError, apply_overrides, parse_sets
from .data.dataset import last_n_padded, why_absent
from .data.parsing import DataError
from .data.readers import read_interactions
from .engine.assemble import restore, stage_config
from .evaluation import evaluate
from .features.cli import add_features_parser
from .features.store import load_features
from .federation.checkpoint import read_run_config
from .federation.server import TooFewClients
from .models import CheckpointError
from .new_items import CHANNELS, new_item_channel
from .pipeline import STAGES, run_pipeline, stage_configs
from .runner import run_federated

log = logging.getLogger("feddmmr")


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
    if args.checkpoint is not None:
        if args.top_users is None:
            args.top_users = _run_top_users(args.checkpoint)
        data = load_from_args(args)
        run = restore(args.checkpoint, data, args.features, args.device)
        data = run.data  # under the run's new-item protocol, if it has one
        scorer, name, max_len = run.scorer(args.split), str(args.checkpoint), run.config.max_seq_len
        seed, device = (run.config.seed if args.seed is None else args.seed), run.model.device
    else:
        data = load_from_args(args)
        scorer, name, max_len, seed = baseline_scorer(args.model, data, args.features), args.model, 50, args.seed or 0
        device = "cpu"
    channel, kind = None, args.new_item_channel
    if kind is None:  # a run's own setting; a baseline's default is off
        kind = run.config.new_item_channel if args.checkpoint is not None else "off"
    if kind != "off":
        scorer_for = run.scorer if args.checkpoint is not None else (lambda split: scorer)
        channel = new_item_channel(scorer_for, data, args.features or run_features(args.checkpoint), seed,
                                   signal=kind, max_len=max_len, device=device)
        scorer = channel.scorer(scorer_for(args.split)) if channel is not None else scorer
    results = []
    for protocol in _protocols(args.protocol):
        negatives = run.config.eval_negatives if args.checkpoint is not None else 100
        result = evaluate(scorer, data, args.split, protocol, seed=seed, max_len=max_len, cache_dir=args.cache_dir,
                          num_negatives=negatives, device=device)
        result["model"] = name
        if channel is not None:
            result["new_item_channel"] = channel.summary()
        results.append(result)
    emit(results[0] if len(results) == 1 else {"results": results}, args.json)
    return 0


def baseline_scorer(model: str, data, features: Path | None):
    if model == "popularity":
        return popularity_scorer(data)
    if features is None:
        raise ValueError("--model content_knn reads item features: pass --features DIR")
    text, visual = load_features(features, data.num_items)
    return content_knn_scorer(data, visual.features.float(), text.features.float())


def run_features(run_dir: Path | None) -> Path | None:
    """The feature folder a run was trained with (None: none recorded)."""
    directory = (read_run_config(run_dir).get("features") or {}).get("dir") if run_dir is not None else None
    return Path(directory) if directory else None


def _run_top_users(run_dir: Path) -> int | None:
    return read_run_config(run_dir)["train"].get("top_users")


def cmd_train(args: argparse.Namespace) -> int:
    config = stage_config(args.stage, args.init, args.config)
    if config.stage != args.stage:
        raise SystemExit(f"feddmmr: error: config {args.config} is for stage {config.stage}, not {args.stage}")
    apply_overrides(config, parse_sets(args.set), "--set")
    if args.device is not None:
        apply_overrides(config, {"device": args.device}, "--device")
    if args.seed is not None:
        config.seed = args.seed
    if args.top_users is not None:
        config.top_users = None if args.top_users == "all" else args.top_users
    args.top_users = config.top_users
    data = load_from_args(args)
    data.save_item_mapping(args.out / "item_mapping.tsv")
    run_federated(config, data, args.out, args.features, args.init, resume=args.resume,
                  progress=not args.no_progress)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    if args.top_users is None:
        args.top_users = _run_top_users(args.checkpoint)
    data = load_from_args(args)
    key = str(args.user)
    matches = np.flatnonzero(data.user_ids.astype(str) == key)
    if len(matches) == 0:
        top = None if args.top_users in (None, "all") else args.top_users
        table = read_interactions(args.data, args.layout, columns_from_args(args))
        raise ValueError(why_absent(table, key, top))  # main() prints it as one error line, exit status 2
    row = int(matches[0])
    run = restore(args.checkpoint, data, args.features, args.device)
    start, stop = data.offsets[row:row + 1], data.offsets[row + 1:row + 2]
    seq = torch.from_numpy(last_n_padded(data.items, start, stop, run.config.max_seq_len)).to(run.model.device)
    scorer = run.scorer("test")  # memory after the held-out history; the input is the whole history
    with torch.no_grad():
        scores = scorer(np.array([row]), seq, None)[0].cpu().clone()
    scores[torch.from_numpy(data.sequence(row))] = float("-inf")
    unused = np.ones(data.num_items, dtype=bool)
    unused[data.occurring_items()] = False
    scores[torch.from_numpy(unused)] = float("-inf")
    top = torch.topk(scores, min(args.k, int(torch.isfinite(scores).sum())))  # k beyond the unseen items: all of them
    items = []
    for rank, (index, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
        raw = data.item_raw_ids[index] if data.item_raw_ids is not None else index
        items.append({"rank": rank, "item": raw if isinstance(raw, (int, str)) else str(raw),
                      "title": data.titles.get(index, ""), "score": round(float(value), 4)})
    emit({"user": args.user, "k": args.k, "checkpoint": str(args.checkpoint), "items": items}, args.json)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Features (cached) -> Stage 1 -> Stage 3 -> one test report; re-running resumes or skips done stages."""
    overrides = parse_sets(args.set)
    if args.device is not None:
        overrides["device"] = args.device
    configs = stage_configs((args.stage1_config, args.stage3_config), overrides, args.seed, args.top_users)
    run_pipeline(load_from_args(args), args.data, args.out, args.features, configs, args.seed,
                 progress=not args.no_progress, item_text=args.item_text, posters=args.posters)
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

    ev = sub.add_parser("evaluate", help="evaluate a trained run (or the popularity baseline)")
    add_data_args(ev)
    ev.add_argument("--checkpoint", type=Path, default=None, help="a run directory written by `feddmmr train`")
    ev.add_argument("--features", type=Path, default=None, help="feature folder (default: the run's)")
    ev.add_argument("--model", default="popularity", choices=["popularity", "content_knn"],
                    help="without --checkpoint: popularity, or content_knn (needs --features)")
    ev.add_argument("--new-item-channel", choices=list(CHANNELS), default=None,
                    help="new-item protocol: score the new items by their calibrated content (calibrated on "
                         "validation with pseudo-new items; needs --features or a run with them); no effect "
                         "without new items (default: the run's config key new_item_channel; off otherwise)")
    ev.add_argument("--protocol", choices=["full", "sampled", "both"], default="both")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--seed", type=int_at_least(0), default=None,
                    help="seed of the sampled candidates (default: the run's, or 0)")
    ev.add_argument("--cache-dir", type=Path, default=None, help="cache sampled candidates here")
    add_device_arg(ev, "the model scores (whatever it was trained on)")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train one stage of the federation in-process")
    tr.add_argument("--stage", type=int, choices=[1, 2, 3], required=True)
    add_data_args(tr)
    tr.add_argument("--features", type=Path, default=None, help="feature folder (stages 2 and 3)")
    tr.add_argument("--out", type=Path, required=True, help="run directory")
    tr.add_argument("--config", type=Path, default=None, help="a TOML preset (default: the stage's)")
    tr.add_argument("--init", type=Path, default=None, help="run directory of the previous stage")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--seed", type=int_at_least(0), default=None)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run in --out exactly where it stopped (same settings; "
                    "only num_rounds and min_clients may change)")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--threads", type=int_at_least(1), default=None,
                    help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    add_device_arg(tr, "the model trains and scores (the config key `device`)", default=None)
    tr.set_defaults(func=cmd_train)

    rec = sub.add_parser("recommend", help="top-K unseen items for one user")
    add_data_args(rec)
    rec.add_argument("--checkpoint", type=Path, required=True)
    rec.add_argument("--features", type=Path, default=None)
    rec.add_argument("--user", required=True, help="raw user id")
    rec.add_argument("--k", type=int_at_least(1), default=10)
    add_device_arg(rec, "the model scores")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=cmd_recommend)

    pipe = sub.add_parser("pipeline", help="the main job: features -> Stage 1 -> Stage 3 -> test report")
    add_data_args(pipe, default_top=1000)
    pipe.add_argument("--out", type=Path, required=True)
    pipe.add_argument("--features", type=Path, default=None, help="feature folder (default: OUT/features)")
    pipe.add_argument("--item-text", type=Path, default=None,
                      help="item<TAB>text file keyed by raw item id (default: the dataset's item file, e.g. "
                           "u.item, movies.csv, NAME.item; for ML-1M movies.dat and its plots)")
    pipe.add_argument("--posters", type=Path, default=None, help="poster folder with <raw id>.jpg "
                                                                 "(default: DATA/posters)")
    pipe.add_argument("--stage1-config", default=None, help=f"preset or TOML (default {STAGES[0][1]})")
    pipe.add_argument("--stage3-config", default=None, help=f"preset or TOML (default {STAGES[1][1]})")
    pipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both stages")
    pipe.add_argument("--seed", type=int_at_least(0), default=0)
    pipe.add_argument("--no-progress", action="store_true")
    pipe.add_argument("--threads", type=int_at_least(1), default=None,
                      help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    add_device_arg(pipe, "the feature encoders run and both stages train and score (the config key `device`)",
                   default=None)
    pipe.set_defaults(func=cmd_pipeline)

    add_features_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (DataError, CheckpointError, ConfigError, OSError, ValueError, TooFewClients) as exc:  # OSError: paths
        if args.verbose:
            raise
        message = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"feddmmr: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
