"""Hypothesis (e) of issue #14: does the training-time / evaluation-time memory mismatch matter?

    .venv/bin/python bench/probe_memory_swap.py --data ../shared/data/ml-1m --features runs/features \
        --runs runs/s3_tuned_s0 runs/s3_tuned_s1 runs/s3_tuned_s2 --out bench/results/memory_swap

Each ``--runs`` folder is a finished Stage 3 run (its seed and user set read from its config). Nothing is
retrained: the trained model is scored on the test split, full ranking, with the memory its experts read
swapped:

* ``eval``: the evaluation memory (what the run's final scoring used; checked to reproduce it);
* ``train``: each user's training snapshot of its newest window (older context, what training saw);
* ``empty``: every personal memory slot empty, the global prototypes kept;
* ``none``: no memory at all, so the experts' bonus is exactly 0.

Prints, and writes to ``<out>/results.md``, the metrics per seed, the paired differences against ``eval``
and how much the two memories differ (share of the evaluation row also in the snapshot; share of each
row that is in the test input sequence SASRec already reads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("NDCG@10", "HR@10", "MRR")
MEMORIES = ("eval", "train", "empty", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished Stage 3 run directories")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_swap")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def overlap(rows_a: np.ndarray, rows_b: np.ndarray, inputs: np.ndarray) -> dict:
    """Mean over users: share of row a's items also in row b, and share of each row in the test input."""
    shared, in_a, in_b = [], [], []
    for a, b, seq in zip(rows_a, rows_b, inputs):
        a, b, seq = a[a != 0], b[b != 0], seq[seq != 0]
        shared.append(np.isin(a, b).mean() if len(a) else 1.0)
        in_a.append(np.isin(a, seq).mean() if len(a) else 0.0)
        in_b.append(np.isin(b, seq).mean() if len(b) else 0.0)
    return {"eval row also in train row": float(np.mean(shared)), "eval row in test input": float(np.mean(in_a)),
            "train row in test input": float(np.mean(in_b))}


def measure(run_dir: Path, args: argparse.Namespace) -> dict:
    from feddmmr.data.dataset import load_dataset
    from feddmmr.engine.assemble import eval_memory, memory_scorer, memory_width, restore
    from feddmmr.evaluation import evaluate

    config = json.loads((run_dir / "config.json").read_text())
    data = load_dataset(args.data, top_users=config["train"]["top_users"])
    run = restore(run_dir, data, args.features)
    run.model.eval()
    cfg, n = run.config, run.data.num_users
    ids = {"eval": eval_memory(run.clients, "test", n, memory_width(cfg), True)}
    ids["train"] = np.zeros_like(ids["eval"])
    for user, client in run.clients.items():
        ids["train"][user] = client.memory[-1]  # training windows come oldest first: the newest is last
    ids["empty"] = np.zeros_like(ids["eval"])
    record = {"seed": cfg.seed, "run": str(run_dir), "metrics": {}}
    for name in MEMORIES:
        scorer = memory_scorer(run.model, run.content, ids.get(name), None if name == "none" else run.prototypes, 0)
        result = evaluate(scorer, run.data, "test", "full", seed=cfg.seed, max_len=cfg.max_seq_len, batch_size=64,
                          num_negatives=cfg.eval_negatives)
        record["metrics"][name] = {k: result[k] for k in KEYS}
        print(f"seed {cfg.seed} {name}: " + ", ".join(f"{k} {result[k]:.5f}" for k in KEYS), flush=True)
    final = json.loads((run_dir / "train_history.json").read_text())["final"]["test_full"]
    record["reproduces_final"] = all(abs(record["metrics"]["eval"][k] - final[k]) < 1e-9 for k in KEYS)
    inputs = run.data.padded_inputs("test", None, cfg.max_seq_len)
    record["memory_difference"] = overlap(ids["eval"], ids["train"], inputs)
    return record


def report(records: list[dict]) -> str:
    lines = ["Test split, full ranking (history excluded); the trained Stage 3 model scored with each memory.", "",
             "| seed | memory | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for r in records:
        for name in MEMORIES:
            lines.append(f"| {r['seed']} | {name} | " + " | ".join(f"{r['metrics'][name][k]:.5f}" for k in KEYS) + " |")
    lines += ["", "Paired differences against `eval` (mean ± std over runs):", "",
              "| memory | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    for name in MEMORIES[1:]:
        cells = []
        for k in KEYS:
            d = [r["metrics"][name][k] - r["metrics"]["eval"][k] for r in records]
            cells.append(f"{statistics.mean(d):+.5f} ± {statistics.stdev(d) if len(d) > 1 else 0.0:.5f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "How the memories differ (mean over users):", "", "| run | " +
              " | ".join(records[0]["memory_difference"]) + " | eval reproduces the run's final |",
              "|---|" + "---|" * (len(records[0]["memory_difference"]) + 1)]
    for r in records:
        lines.append(f"| seed {r['seed']} | " + " | ".join(f"{v:.3f}" for v in r["memory_difference"].values())
                     + f" | {r['reproduces_final']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    records = [measure(run_dir, args) for run_dir in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    text = report(records)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
