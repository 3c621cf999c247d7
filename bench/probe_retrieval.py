"""Does the retrieval rule change what the experts compute? (issue #14, the seed's dynamic memory)

    .venv/bin/python bench/probe_retrieval.py --data ../shared/data/ml-1m --run RUN [--users 100] [--split test]

For a finished Stage 3 run (its best model, and the memories it ended with: with ``surprise_trigger``
the saved surprising steps), every ``1000 / --users``-th user: the experts' term ``g <aux, E[c]>`` of
each (user, warm item) with the split's memory read by candidate-conditioned retrieval
(``memory_retrieval=candidate``) and by the short-term centroid ranking, on the same memories. Prints
their spread, their mean absolute difference, the item-only and user-only shares of each one's variance
and the mean per-user correlation of the two (docs/quality-memory.md, "The seed's memory as written").
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from feddmmr.data.dataset import load_dataset
from feddmmr.engine.assemble import _memory_parts, restore
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.client import build_client
from feddmmr.federation.memory import MemoryConfig


def shares(x: np.ndarray) -> tuple[float, float]:
    """Item-only and user-only shares of the variance of ``x [users, items]``."""
    total = ((x - x.mean()) ** 2).mean()
    return float(((x.mean(0) - x.mean()) ** 2).mean() / total), float(((x.mean(1) - x.mean()) ** 2).mean() / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--features", type=Path)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, top_users=ckpt.read_run_config(args.run)["train"].get("top_users", 1000))
    run = restore(args.run, data, args.features)
    model, config = run.model, run.config
    model.eval()
    if not config.use_memory:
        raise SystemExit(f"{args.run}: a run without memory")
    users = np.linspace(0, data.num_users - 1, min(args.users, data.num_users)).astype(np.int64)
    space, _ = _memory_parts(config, run.content)
    candidate = dataclasses.replace(MemoryConfig.from_train_config(config), retrieval="candidate")
    centroid = dataclasses.replace(candidate, retrieval="centroid")
    items = torch.arange(model.num_items).expand(len(users), -1)
    with torch.no_grad():
        tables = model.projected_tables()
        if not model.candidate_retrieval:  # a centroid-trained model can be probed too
            model.candidate_retrieval = config.memory_top_k
            model.set_item_features(run.content.visual, run.content.text)
        out = {}
        for name, memory_config in (("candidate", candidate), ("centroid", centroid)):
            ids = np.stack([build_client(data, int(u), config.max_seq_len, memory_config, space,
                                         surprised=run.clients[int(u)].surprised).eval_memory[args.split]
                            for u in users])
            if name == "candidate":
                visual, text, pool = run.content.pooled_memory(ids, run.prototypes, "cpu", config.memory_top_k)
                out[name] = model.auxiliary(items, visual, text, memory_pool=pool, tables=tables)[0].numpy()
            else:
                visual, text = run.content.memory(ids, run.prototypes, "cpu")
                out[name] = model.auxiliary(items, visual, text, tables=tables)[0].numpy()
    warm = np.asarray(data.warm_items())
    warm = warm[warm > 0]
    a, b = out["candidate"][:, warm], out["centroid"][:, warm]
    print(f"{args.run} ({len(users)} users, {len(warm)} warm items, {args.split} memory), gate "
          f"{float(model.gating_weight):.4f}")
    print(f"  bonus std: candidate {a.std():.4f}, centroid {b.std():.4f}; mean |difference| {np.abs(a - b).mean():.5f}")
    print(f"  item / user share of the variance: candidate {shares(a)[0]:.5f} / {shares(a)[1]:.5f}, "
          f"centroid {shares(b)[0]:.5f} / {shares(b)[1]:.5f}")
    print(f"  per-user correlation of the two: {np.mean([np.corrcoef(a[i], b[i])[0, 1] for i in range(len(users))]):.5f}")


if __name__ == "__main__":
    main()
