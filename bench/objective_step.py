"""Seconds per training batch of ``model.losses`` by sequence length and objective.

Random item ids over an ML-1M-sized catalogue, batch 64 windows, 1 torch thread; the best of
three timed steps after one warm-up. Prints one table.

    python bench/objective_step.py [--lengths 50 200] [--objectives sampled_softmax full_softmax]
"""

from __future__ import annotations

import argparse
import time

import torch

from feddmmr.models import UR4RecV2MoE
from feddmmr.models.moe import OBJECTIVES

NUM_ITEMS = 3953


def seconds_per_batch(length: int, objective: str, batch: int = 64, negatives: int = 100) -> float:
    """The best of three timed Adam steps of ``model.losses`` (after one warm-up step)."""
    torch.manual_seed(0)
    model = UR4RecV2MoE(num_items=NUM_ITEMS, max_seq_len=length, visual_dim=1280)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    inputs = torch.randint(1, NUM_ITEMS, (batch, length))
    targets = torch.randint(1, NUM_ITEMS, (batch, length))
    sampled = torch.randint(1, NUM_ITEMS, (batch, negatives))
    times = []
    for _ in range(4):
        tick = time.time()
        loss = model.losses(inputs, targets, sampled, objective=objective)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.time() - tick)
    return min(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=["sampled_softmax", "full_softmax"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| max_seq_len | objective | s / batch of 64 windows |\n|---|---|---|")
    for length in args.lengths:
        for objective in args.objectives:
            print(f"| {length} | {objective} | {seconds_per_batch(length, objective):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
