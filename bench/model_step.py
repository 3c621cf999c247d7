"""Micro-benchmark of the model on this machine: one training step and the two scoring protocols.

    .venv/bin/python bench/model_step.py [--iters 10] [--warmup 2] [--threads N]

Times (median over ``--iters`` after ``--warmup``) of
  * a training step of ``losses`` (forward + backward + Adam step) for a batch of sequences,
    every position a target, shared sampled negatives: SASRec only (no memory, no alignment)
    and the full model (memory + alignment);
  * the eval forward scoring 1 + 100 candidates per user (the sampled protocol);
  * full ranking of every item per user (the full protocol).
Prints a markdown table to stdout. Random weights and features: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from feddmmr.models import UR4RecV2MoE


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=50)
    p.add_argument("--negatives", type=int, default=100)
    p.add_argument("--memory", type=int, default=20, help="memory entries K per user")
    p.add_argument("--num-items", type=int, default=3953)
    p.add_argument("--visual-dim", type=int, default=1280)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def timed(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    b, n_items = args.batch, args.num_items
    model = UR4RecV2MoE(num_items=n_items, sasrec_hidden_dim=args.hidden, sasrec_num_blocks=2, sasrec_num_heads=4,
                        max_seq_len=args.seq_len, moe_num_heads=8, visual_dim=args.visual_dim,
                        text_dim=args.text_dim, gating_init=0.01, contrastive_lambda=0.5,
                        load_balance_lambda=0.01)
    visual, text = torch.randn(n_items, args.visual_dim), torch.randn(n_items, args.text_dim)
    visual[0] = text[0] = 0
    model.set_item_features(visual, text)

    full = torch.randint(1, n_items, (b, args.seq_len + 1))
    seq, positives = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    negatives = torch.randint(1, n_items, (b, args.negatives))
    mem_items = torch.randint(1, n_items, (b, args.memory))
    mem_vis, mem_txt = visual[mem_items], text[mem_items]
    candidates = torch.cat([positives[:, -1:], negatives], dim=1)  # 1 + 100 per user
    every_item = torch.arange(n_items).expand(b, n_items)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    # the alignment runs over the batch's distinct target items
    distinct = torch.unique(positives)

    def train_step(memory: bool, align: bool):
        switch = {"align_items": distinct if align else None}

        def step():
            model.train()
            out = model.losses(seq, positives, negatives, mem_vis if memory else None,
                               mem_txt if memory else None, **switch)
            optimiser.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimiser.step()
        return step

    def score(items: torch.Tensor, memory: bool, target_visual: torch.Tensor | None = None):
        def run():
            model.eval()
            with torch.no_grad():
                model(None, seq, items, target_visual, mem_vis if memory else None, mem_txt if memory else None,
                      training_mode=False)
        return run

    cases = [
        ("train step: SASRec only (memory None, align False)", train_step(False, False), b),
        ("train step: full model (memory K, align True)", train_step(True, True), b),
        (f"eval: {candidates.shape[1]} candidates, SASRec only", score(candidates, False), b),
        (f"eval: {candidates.shape[1]} candidates, full model", score(candidates, True), b),
        (f"eval: {candidates.shape[1]} candidates, full model, target_visual given",
         score(candidates, True, visual[candidates]), b),
        (f"full ranking: {n_items} items, SASRec only", score(every_item, False), b),
        (f"full ranking: {n_items} items, full model", score(every_item, True), b),
    ]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()} (torch.get_num_threads()); batch {b}, L {args.seq_len}, "
          f"{args.negatives} negatives, K {args.memory}, visual_dim {args.visual_dim}, text_dim {args.text_dim}, "
          f"num_items {n_items}, hidden {args.hidden}; alignment over {len(distinct)} items "
          f"(align_items); median of {args.iters} after {args.warmup} warm-up\n")
    print("| configuration | median ms | min ms | max ms | ms per sequence/user |")
    print("|---|---:|---:|---:|---:|")
    for name, fn, count in cases:
        times = timed(fn, args.iters, args.warmup)
        med = statistics.median(times) * 1e3
        print(f"| {name} | {med:.1f} | {min(times) * 1e3:.1f} | {max(times) * 1e3:.1f} | {med / count:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
