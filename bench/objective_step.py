"""Seconds per training batch of ``model.losses`` by sequence length and objective.

Random item ids over an ML-1M-sized catalogue, batch 64 windows, 1 torch thread; the best of
three timed steps after one warm-up. Prints one table.

``--fill`` gives each window only that share of real items (left-padded, as short histories
are) and times the step twice: over the full ``max_seq_len`` columns, and cut to the batch's
real length (``trim_padding``, what training does).

    python bench/objective_step.py [--lengths 50 200] [--objectives sampled_softmax full_softmax]
        [--fill 1.0 0.5 0.25]
"""

from __future__ import annotations

import argparse
import time

import torch

from feddmmr.data.dataset import trim_padding
from feddmmr.models import UR4RecV2MoE
from feddmmr.models.moe import OBJECTIVES

NUM_ITEMS = 3953


def seconds_per_batch(length: int, objective: str, batch: int = 64, negatives: int = 100,
                      fill: float = 1.0, trim: bool = True) -> float:
    """The best of three timed Adam steps of ``model.losses`` (after one warm-up step)."""
    torch.manual_seed(0)
    model = UR4RecV2MoE(num_items=NUM_ITEMS, max_seq_len=length, visual_dim=1280)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    inputs = torch.randint(1, NUM_ITEMS, (batch, length))
    targets = torch.randint(1, NUM_ITEMS, (batch, length))
    padding = length - max(1, round(fill * length))
    inputs[:, :padding] = 0
    targets[:, :padding] = 0
    if trim:
        width = trim_padding(inputs.numpy())
        inputs, targets = inputs[:, -width:], targets[:, -width:]
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
    parser.add_argument("--fill", type=float, nargs="+", default=[1.0],
                        help="share of each window holding real items (the rest is left padding)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| max_seq_len | objective | real share | s / batch, full width | s / batch, cut to real length |\n"
          "|---|---|---|---|---|")
    for length in args.lengths:
        for objective in args.objectives:
            for fill in args.fill:
                full = seconds_per_batch(length, objective, fill=fill, trim=False)
                cut = seconds_per_batch(length, objective, fill=fill, trim=True)
                print(f"| {length} | {objective} | {fill:g} | {full:.2f} | {cut:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
