"""Bytes a client uploads per round under each objective (ML-1M; no training: the negative draws are simulated).

    python bench/upload_bytes.py --data ../shared/data/ml-1m [--top-users 1000|all] [--max-seq-len 50]
        [--local-epochs 5] [--batch-size 64] [--num-negatives 100] [--clients 200]

A client sends the groups its stage trains (Stage 1: item embedding + backbone), float32. Two encodings:

* dense: every transmitted tensor whole, which is what the code sends today (`ClientUpdate.state`),
  whatever the objective;
* rows: the backbone whole plus only the item-embedding rows the client changed, each with its
  int32 row index (what `item_embedding_aggregation = "updated_rows"` needs on the server).

Rows a client changes: its own items (inputs and targets) plus, under `sampled_softmax`/`gbce`, every
negative drawn in its local steps (`num_negatives` per window per local epoch, uniform over the
occurring items; only the size of the set matters, so the draws are simulated with the same
distribution, not replayed from the client's seed); under `full_softmax` every occurring item (a
dense loss touches every row); with `update_negative_items = false` its own items only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def backbone_params(hidden: int, blocks: int, max_len: int) -> int:
    """SASRec parameters besides the item embedding: positions, blocks, final LayerNorm."""
    per_block = 2 * (2 * hidden) + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) \
        + 2 * (hidden * hidden + hidden)
    return max_len * hidden + blocks * per_block + 2 * hidden


def upload_bytes(touched_rows: int, num_items: int, hidden: int, blocks: int, max_len: int) -> dict:
    """One client's upload in bytes: ``dense`` (everything) and ``rows`` (changed item rows + index)."""
    backbone = backbone_params(hidden, blocks, max_len) * 4
    return {"dense": backbone + num_items * hidden * 4, "rows": backbone + touched_rows * (hidden * 4 + 4)}


def touched_rows(own: np.ndarray, windows: int, objective: str, pool: np.ndarray, epochs: int, negatives: int,
                 rng: np.random.Generator, update_negative_items: bool = True) -> int:
    own = set(int(i) for i in own if i)
    if not update_negative_items:
        return len(own)
    if objective == "full_softmax":
        return len(pool)
    drawn = rng.integers(len(pool), size=windows * epochs * negatives)
    return len(own | set(pool[drawn].tolist()))


def main() -> None:
    from feddmmr.data.dataset import load_dataset
    from feddmmr.federation.client import training_windows

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"))
    parser.add_argument("--top-users", default="1000")
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--num-negatives", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--clients", type=int, default=300, help="clients sampled for the mean")
    args = parser.parse_args()
    top = None if args.top_users == "all" else int(args.top_users)
    data = load_dataset(Path(args.data), top_users=top)
    pool = data.occurring_items()
    rng = np.random.default_rng(0)
    users = rng.choice(data.num_users, size=min(args.clients, data.num_users), replace=False)
    rows = []
    for objective, negatives, update_neg in (("sampled_softmax", args.num_negatives, True),
                                              ("sampled_softmax", 256, True), ("gbce", 256, True),
                                              ("full_softmax", 0, True), ("sampled_softmax", args.num_negatives, False)):
        counts = []
        for user in users:
            train = data.sequence(int(user))[:-2]
            inputs, targets, _ = training_windows(train, args.max_seq_len)
            counts.append(touched_rows(np.concatenate([inputs.ravel(), targets.ravel()]), len(inputs), objective,
                                       pool, args.local_epochs, negatives, rng, update_neg))
        mean = float(np.mean(counts))
        sizes = upload_bytes(round(mean), data.num_items, args.hidden, args.blocks, args.max_seq_len)
        rows.append({"objective": objective, "num_negatives": negatives, "update_negative_items": update_neg,
                     "touched_rows_mean": round(mean, 1), "occurring_items": len(pool),
                     "dense_MB": round(sizes["dense"] / 2**20, 3), "rows_MB": round(sizes["rows"] / 2**20, 3)})
    print(json.dumps({"users": data.num_users, "max_seq_len": args.max_seq_len, "local_epochs": args.local_epochs,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
