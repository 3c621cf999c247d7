"""The new-item channel measured on finished new-item pipeline runs: every method with and without it.

    .venv/bin/python bench/new_item_channel.py --data ../shared/data/ml-1m --features runs/features \
        --runs runs/ni14/s0 runs/ni14/s1 runs/ni14/s2 --out bench/results/ni14 [--signals content neighbours]

Each ``--runs`` folder is a ``feddmmr pipeline ... --seed K --set cold_item_fraction=0.1`` output (its
seed read from ``report.json``), holding a Stage 1 and a Stage 3 run directory. Per seed and method
(popularity, content kNN, each trained stage), the test split in full ranking, warm and new targets
apart: the method alone, then with the new-item channel of each ``--signals`` (``feddmmr.new_items``:
calibrated on validation with pseudo-new items, no test target read). Writes ``<out>/<seed>.json`` per
seed (skipped when present unless ``--force``) and ``<out>/results.md``: mean ± std over seeds and the
paired differences the issue's new-item target asks for.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.new_item_channel")

METRICS = ("HR@10", "NDCG@10")
GROUPS = ("all", "warm", "new")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="pipeline output folders, one per seed")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "new_item_channel")
    parser.add_argument("--signals", nargs="+", default=["content"], choices=["content", "neighbours"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true")
    return parser.parse_args(argv)


def groups(result: dict) -> dict:
    """``{"all": {...}, "warm": {...}, "new": {...}}`` with the headline metrics and user counts."""
    out = {"all": {"users": result["users"], **{m: result[m] for m in METRICS}}}
    for kind in ("warm", "new"):
        out[kind] = {"users": result[kind]["users"], **{m: result[kind].get(m, 0.0) for m in METRICS}}
    return out


def measure_seed(folder: Path, args: argparse.Namespace, done: dict | None = None) -> dict:
    """Every method of one pipeline folder, alone and with each channel signal (what ``done``, an
    earlier record's methods, holds already is kept)."""
    import torch

    from feddmmr.baselines import content_knn_scorer, popularity_scorer
    from feddmmr.data.dataset import load_dataset
    from feddmmr.engine.assemble import restore
    from feddmmr.evaluation import evaluate
    from feddmmr.features.store import load_features
    from feddmmr.new_items import new_item_channel

    if args.threads:
        torch.set_num_threads(args.threads)
    report = json.loads((folder / "report.json").read_text())
    seed, top_users = report["seed"], report["data"]["users"]
    data = load_dataset(args.data, top_users=top_users)
    stages = [(name, Path(run["run_dir"])) for name, run in report["runs"].items() if "run_dir" in run]
    first = restore(stages[0][1], data, args.features)
    cold = first.data
    text, visual = load_features(args.features, cold.num_items)
    baselines = {"popularity": popularity_scorer(cold),
                 "content_knn": content_knn_scorer(cold, visual.features.float(), text.features.float())}
    record = {"seed": seed, "folder": str(folder), "methods": {}}
    done = done or {}

    def measure(name: str, scorer_for, scored, max_len: int, batch: int, frontier: list[str] = ()) -> None:
        tick = time.time()
        rows = dict(done.get(name, {}))
        if "alone" not in rows:
            rows["alone"] = groups(evaluate(scorer_for("test"), scored, "test", "full", seed=seed, max_len=max_len,
                                            batch_size=batch))
        for signal in [s for s in args.signals if s not in rows]:
            channel = new_item_channel(scorer_for, scored, args.features, seed, signal=signal, max_len=max_len,
                                       batch_size=batch)
            result = evaluate(channel.scorer(scorer_for("test")), scored, "test", "full", seed=seed,
                              max_len=max_len, batch_size=batch)
            summary = channel.summary()
            rows[signal] = {**groups(result), "slope": summary["slope"], "offset": summary["offset"],
                            "val_best": max(summary["validation_full_ndcg10"].values())}
        for signal in [s for s in frontier if f"frontier_{s}" not in rows]:
            rows[f"frontier_{signal}"] = trade_off(scorer_for, scored, seed, max_len, batch, args.features, signal)
        record["methods"][name] = rows
        log.info("seed %d %s (%.0fs): %s", seed, name, time.time() - tick,
                 {k: round(v["new"]["NDCG@10"], 4) for k, v in rows.items() if not k.startswith("frontier")})

    for name, scorer in baselines.items():
        measure(name, lambda split, s=scorer: s, cold, 50, 256)
    for name, run_dir in stages:
        run = first if run_dir == stages[0][1] else restore(run_dir, data, args.features)
        measure(name, run.scorer, run.data, run.config.max_seq_len, 64, frontier=args.signals)
    return record


FRONTIER_OFFSETS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # slope 1: from no exposure to every new item on top


def trade_off(scorer_for, scored, seed: int, max_len: int, batch: int, features: Path, signal: str) -> dict:
    """The warm / new trade-off of ``signal`` along slope 1 (no calibration: every offset of
    ``FRONTIER_OFFSETS``): test warm and new metrics per offset, the test scores computed once."""
    import torch

    from feddmmr.evaluation import evaluate
    from feddmmr.new_items import channel_scorer, channel_signal, item_mask, memoized_full, reference_items

    signal_for, pseudo = channel_signal(scored, features, seed, signal)
    base = memoized_full(scorer_for("test"))
    strength = memoized_full(signal_for(base))
    mask = item_mask(scored.num_items, scored.cold_items)
    reference = torch.from_numpy(reference_items(scored, seed, pseudo))
    out = {}
    for offset in FRONTIER_OFFSETS:
        result = evaluate(channel_scorer(base, strength, mask, reference, 1.0, offset), scored, "test", "full",
                          seed=seed, max_len=max_len, batch_size=batch)
        out[f"{offset:g}"] = groups(result)
    return out


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def results_table(records: list[dict], signals: list[str]) -> str:
    seeds = [r["seed"] for r in records]
    methods = list(records[0]["methods"])
    lines = [f"Test split, full ranking, seeds {seeds} (mean ± std over seeds); NDCG@10 (HR@10) by target type.", "",
             "| method | channel | all NDCG@10 | warm NDCG@10 | warm HR@10 | new NDCG@10 | new HR@10 | slope / offset |",
             "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for variant in ["alone", *signals]:
            rows = [r["methods"][method][variant] for r in records]
            cells = [mean_std([row[g][m] for row in rows]) for g, m in (("all", "NDCG@10"), ("warm", "NDCG@10"),
                                                                          ("warm", "HR@10"), ("new", "NDCG@10"),
                                                                          ("new", "HR@10"))]
            calib = "-" if variant == "alone" else ", ".join(f"{row['slope']:g} / {row['offset']:g}" for row in rows)
            lines.append(f"| {method} | {'-' if variant == 'alone' else variant} | " + " | ".join(cells)
                         + f" | {calib} |")
    lines += ["", "Paired differences over seeds (mean ± std), NDCG@10:", "",
              "| comparison | all | warm | new |", "|---|---|---|---|"]

    def diff(a: tuple[str, str], b: tuple[str, str]) -> str:
        cells = [mean_std([r["methods"][a[0]][a[1]][g]["NDCG@10"] - r["methods"][b[0]][b[1]][g]["NDCG@10"]
                           for r in records]) for g in GROUPS]
        return f"| {a[0]} {a[1]} - {b[0]} {b[1]} | " + " | ".join(cells) + " |"

    trained = [m for m in methods if m not in ("popularity", "content_knn")]
    for method in methods:
        for signal in signals:
            lines.append(diff((method, signal), (method, "alone")))
    for method in trained:
        for signal in signals:
            lines += [diff((method, signal), ("content_knn", "alone")), diff((method, signal), ("popularity", "alone"))]
            if method != trained[0]:
                lines.append(diff((method, signal), (trained[0], "alone")))
    for signal in signals:
        if f"frontier_{signal}" not in records[0]["methods"][trained[0]]:
            continue
        lines += ["", f"The warm / new trade-off of signal {signal}: slope 1, every offset below, no calibration (test, "
                  "full ranking, mean over seeds), NDCG@10 warm / new:", "",
                  "| method | " + " | ".join(f"offset {o:g}" for o in FRONTIER_OFFSETS) + " |",
                  "|---|" + "---|" * len(FRONTIER_OFFSETS)]
        for method in trained:
            cells = []
            for offset in FRONTIER_OFFSETS:
                rows = [r["methods"][method][f"frontier_{signal}"][f"{offset:g}"] for r in records]
                cells.append(" / ".join(f"{statistics.mean(row[g]['NDCG@10'] for row in rows):.4f}"
                                        for g in ("warm", "new")))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for folder in args.runs:
        seed = json.loads((folder / "report.json").read_text())["seed"]
        path = args.out / f"seed{seed}.json"
        done = {}
        if path.exists() and not args.force:
            record = json.loads(path.read_text())
            complete = [set(args.signals) <= set(rows) for rows in record["methods"].values()]
            frontiers = [{f"frontier_{s}" for s in args.signals} <= set(rows)
                         for name, rows in record["methods"].items() if name not in ("popularity", "content_knn")]
            if all(complete) and all(frontiers):
                records.append(record)
                continue
            done = record["methods"]
        record = measure_seed(folder, args, done)
        path.write_text(json.dumps(record, indent=2))
        records.append(record)
    table = results_table(records, args.signals)
    (args.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
