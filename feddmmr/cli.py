"""The ``feddmmr`` command line. Results go to stdout (JSON with ``--json``), progress to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .data.readers import LAYOUTS, DataError, TableColumns
from .federation.server import TooFewClients
from .models.moe import CheckpointError

log = logging.getLogger("feddmmr")


def add_data_args(parser: argparse.ArgumentParser, default_top: int | None = None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, type=Path,
                       help="MovieLens-1M folder (official or ordered layout) or a CSV/TSV/Parquet table")
    group.add_argument("--layout", choices=LAYOUTS, default=None, help="input layout (default: detect)")
    group.add_argument("--top-users", type=_top_users, default=default_top,
                       help="keep the N most active users (ties: smaller id), or 'all'; default: "
                            + (str(default_top) if default_top else "all users"))
    group.add_argument("--user-col", default="user", help="custom table: user column")
    group.add_argument("--item-col", default="item", help="custom table: item column")
    group.add_argument("--time-col", default="timestamp", help="custom table: timestamp column")
    group.add_argument("--rating-col", default=None, help="custom table: optional rating column")


def _top_users(value: str) -> int | str:
    if value.lower() == "all":
        return "all"
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return number


def _int_at_least(minimum: int):
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


def load_from_args(args: argparse.Namespace):
    from .data.dataset import load_dataset

    columns = TableColumns(args.user_col, args.item_col, args.time_col, args.rating_col)
    top = None if args.top_users in (None, "all") else args.top_users
    return load_dataset(args.data, args.layout, top, columns)


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

    if args.checkpoint is not None:
        from .runner import restore

        if args.top_users is None:
            args.top_users = _run_top_users(args.checkpoint)
        data = load_from_args(args)
        run = restore(args.checkpoint, data, args.features)
        scorer, name, max_len = run.scorer(args.split), str(args.checkpoint), run.config.max_seq_len
        seed = run.config.seed if args.seed is None else args.seed
    else:
        from .baselines import popularity_scorer

        data = load_from_args(args)
        scorer, name, max_len, seed = popularity_scorer(data), args.model, 50, args.seed or 0
    results = []
    for protocol in _protocols(args.protocol):
        negatives = run.config.eval_negatives if args.checkpoint is not None else 100
        result = evaluate(scorer, data, args.split, protocol, seed=seed, max_len=max_len, cache_dir=args.cache_dir,
                          num_negatives=negatives)
        result["model"] = name
        results.append(result)
    emit(results[0] if len(results) == 1 else {"results": results}, args.json)
    return 0


def _run_top_users(run_dir: Path) -> int | None:
    from .federation.checkpoint import read_run_config

    return read_run_config(run_dir)["train"].get("top_users")


def _stage_config(stage: int, config_file: Path | None, init: Path | None):
    """The preset for a stage (Stage 3 after Stage 2 uses stage3_moe, else stage3_skip_stage2)."""
    from .config import load_preset
    from .federation.checkpoint import read_run_config

    if config_file is not None:
        return load_preset(config_file)
    if stage == 3:
        previous = read_run_config(init)["train"]["stage"] if init is not None else 1
        return load_preset("stage3_moe" if previous == 2 else "stage3_skip_stage2")
    return load_preset({1: "stage1_backbone", 2: "stage2_alignment"}[stage])


def cmd_train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, parse_sets
    from .runner import run_federated

    config = _stage_config(args.stage, args.config, args.init)
    if config.stage != args.stage:
        raise SystemExit(f"feddmmr: error: config {args.config} is for stage {config.stage}, not {args.stage}")
    apply_overrides(config, parse_sets(args.set), "--set")
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
    import numpy as np
    import torch

    from .data.dataset import last_n_padded
    from .runner import restore

    if args.top_users is None:
        args.top_users = _run_top_users(args.checkpoint)
    data = load_from_args(args)
    key = str(args.user)
    matches = np.flatnonzero(data.user_ids.astype(str) == key)
    if len(matches) == 0:
        raise SystemExit(f"feddmmr: error: user {args.user!r} is not in the dataset (after --top-users)")
    row = int(matches[0])
    run = restore(args.checkpoint, data, args.features)
    start, stop = data.offsets[row:row + 1], data.offsets[row + 1:row + 2]
    seq = torch.from_numpy(last_n_padded(data.items, start, stop, run.config.max_seq_len))
    scorer = run.scorer("test")  # memory after the held-out history; the input is the whole history
    with torch.no_grad():
        scores = scorer(np.array([row]), seq, None)[0].clone()
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


PIPELINE_STAGES = (("stage1", "stage1_tuned"), ("stage3", "stage3_tuned"))


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Features (cached) -> Stage 1 -> Stage 3 -> one test report; re-running resumes or skips done stages."""
    import json

    from .baselines import popularity_scorer
    from .config import apply_overrides, load_preset, parse_sets
    from .evaluation import evaluate, format_metrics
    from .features.extract import run_extract
    from .features.store import FeatureError, load_features
    from .federation.checkpoint import HISTORY_FILE, resume_dir
    from .runner import run_federated

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = load_from_args(args)
    data.save_item_mapping(out / "item_mapping.tsv")
    stats = data.stats()
    log.info("data: %s", json.dumps(stats))
    features = args.features or out / "features"
    try:  # features if missing: an existing valid feature folder is used as it is
        text, visual = load_features(features, data.num_items)
        summary = {name: {"status": "existing", "encoder": t.meta["encoder"], "coverage": t.coverage}
                   for name, t in (("text", text), ("visual", visual))}
    except FeatureError:
        summary = run_extract(data, args.data, features, workers=1, progress=not args.no_progress)
    log.info("features: %s", json.dumps({k: {"status": v["status"], "coverage": v.get("coverage")}
                                          for k, v in summary.items()}))
    report = {"data": stats, "features": summary, "seed": args.seed, "runs": {}}
    configs = []
    for (name, default), chosen in zip(PIPELINE_STAGES, (args.stage1_config, args.stage3_config)):
        config = load_preset(chosen or default)
        apply_overrides(config, parse_sets(args.set), "--set")
        config.seed, config.top_users = args.seed, (None if args.top_users == "all" else args.top_users)
        configs.append((name, config))
    for protocol in ("sampled", "full"):
        result = evaluate(popularity_scorer(data), data, "test", protocol, seed=args.seed, cache_dir=out / "cache",
                          num_negatives=configs[0][1].eval_negatives)
        report["runs"].setdefault("popularity", {})[f"test_{protocol}"] = result
        print("popularity " + format_metrics(result))
    previous = None
    for name, config in configs:
        run_dir = out / config.preset
        history_file = run_dir / HISTORY_FILE
        done = history_file.exists() and "final" in json.loads(history_file.read_text())
        if done:
            log.info("%s already finished in %s; skipping (delete the folder to retrain)", name, run_dir)
        else:
            resume = resume_dir(run_dir) is not None
            run_federated(config, data, run_dir, features if config.use_memory else None, previous,
                          resume=resume, progress=not args.no_progress, data_info=stats)
        history = json.loads(history_file.read_text())
        report["runs"][config.preset] = {**history["final"], "best_round": history["best_round"],
                                         "seconds": history.get("total_seconds"), "run_dir": str(run_dir)}
        previous = run_dir
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    print((out / "report.md").read_text())
    return 0


def markdown_report(report: dict) -> str:
    """The pipeline's results table: test split, both protocols, each run's best validation round."""
    from .evaluation import METRIC_NAMES

    lines = [f"Test split, {report['data']['users']} users, seed {report['seed']}; sampled = 1 + "
             f"{next(iter(report['runs'].values()))['test_sampled'].get('negatives', 100)} candidates, "
             "full = all items (history excluded).", "",
             "| run | protocol | best round | " + " | ".join(METRIC_NAMES) + " |",
             "|---|---|---|" + "---|" * len(METRIC_NAMES)]
    for name, run in report["runs"].items():
        for protocol in ("sampled", "full"):
            result = run[f"test_{protocol}"]
            cells = " | ".join(f"{result[m]:.4f}" for m in METRIC_NAMES)
            lines.append(f"| {name} | {protocol} | {run.get('best_round', '-')} | {cells} |")
    return "\n".join(lines) + "\n"


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
    ev.add_argument("--model", default="popularity", choices=["popularity"], help="without --checkpoint")
    ev.add_argument("--protocol", choices=["full", "sampled", "both"], default="both")
    ev.add_argument("--split", choices=["val", "test"], default="test")
    ev.add_argument("--seed", type=_int_at_least(0), default=None,
                    help="seed of the sampled candidates (default: the run's, or 0)")
    ev.add_argument("--cache-dir", type=Path, default=None, help="cache sampled candidates here")
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
    tr.add_argument("--seed", type=_int_at_least(0), default=None)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run in --out exactly where it stopped (same settings; "
                    "only num_rounds and min_clients may change)")
    tr.add_argument("--no-progress", action="store_true")
    tr.add_argument("--threads", type=_int_at_least(1), default=None,
                    help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    tr.set_defaults(func=cmd_train)

    rec = sub.add_parser("recommend", help="top-K unseen items for one user")
    add_data_args(rec)
    rec.add_argument("--checkpoint", type=Path, required=True)
    rec.add_argument("--features", type=Path, default=None)
    rec.add_argument("--user", required=True, help="raw user id")
    rec.add_argument("--k", type=_int_at_least(1), default=10)
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=cmd_recommend)

    pipe = sub.add_parser("pipeline", help="the main job: features -> Stage 1 -> Stage 3 -> test report")
    add_data_args(pipe, default_top=1000)
    pipe.add_argument("--out", type=Path, required=True)
    pipe.add_argument("--features", type=Path, default=None, help="feature folder (default: OUT/features)")
    pipe.add_argument("--stage1-config", default=None, help=f"preset or TOML (default {PIPELINE_STAGES[0][1]})")
    pipe.add_argument("--stage3-config", default=None, help=f"preset or TOML (default {PIPELINE_STAGES[1][1]})")
    pipe.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both stages")
    pipe.add_argument("--seed", type=_int_at_least(0), default=0)
    pipe.add_argument("--no-progress", action="store_true")
    pipe.add_argument("--threads", type=_int_at_least(1), default=None,
                      help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    pipe.set_defaults(func=cmd_pipeline)

    from .features.cli import add_features_parser

    add_features_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

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
