"""How the cost of a federated round grows with the population and the catalogue.

A seeded synthetic dataset with the shape of real ones (Zipf item popularity, log-normal sequence
lengths, random unit-norm text and visual features), sized by flags, then a few in-process rounds
of Stage 1 or Stage 3 (seed presets, ``--fraction`` of the clients a round). Each run is a child
process, so its peak RSS is its own.

    python bench/scale.py --users 1000 10000 --items 4000 27000 --rounds 2 --stage 1
    python bench/scale.py --users 138000 --items 27000 --rounds 1 --stage 1 --fraction 0.01 --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KEYS = ("users", "items", "stage", "rounds", "clients_per_round", "seconds_per_round", "seconds_per_client",
        "peak_rss_gb", "bytes_per_client", "eval_seconds", "setup_seconds", "final_seconds_per_user")


def synthetic_dataset(users: int, items: int, seed: int = 0):
    """Sequences with Zipf(1) item popularity and log-normal lengths (median 60, 5..2000)."""
    from feddmmr.data.dataset import SequenceDataset

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 0.9, users).astype(np.int64), 5, 2000)
    popularity = 1.0 / np.arange(1, items + 1)
    popularity /= popularity.sum()
    flat = rng.choice(np.arange(1, items + 1), size=int(lengths.sum()), p=popularity)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return SequenceDataset(flat.astype(np.int64), offsets, np.arange(1, users + 1), items + 1, "synthetic",
                           f"synthetic:{users}x{items}:{seed}")


def synthetic_features(folder: Path, num_items: int, seed: int = 0, text_dim: int = 384,
                       visual_dim: int = 1280) -> Path:
    """Random unit-norm text and visual rows for every item (row 0, the padding, is empty)."""
    import torch

    from feddmmr.features.store import FeatureTable, save_table

    generator = torch.Generator().manual_seed(seed)
    for name, dim in (("text", text_dim), ("visual", visual_dim)):
        table = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=generator), dim=-1)
        table[0] = 0
        mask = torch.ones(num_items, dtype=torch.bool)
        mask[0] = False
        save_table(FeatureTable(table, mask, {"encoder": f"synthetic-{name}", "dim": dim,
                                              "coverage": num_items - 1, "input_hash": "synthetic"}),
                   folder / f"{name}_features.pt")
    return folder


def stage1_init(folder: Path, data, features: Path) -> Path:
    """A Stage 1 run directory holding an untrained backbone: what Stage 3 starts from."""
    from feddmmr.config import load_preset, stage_preset
    from feddmmr.engine.assemble import assemble
    from feddmmr.engine.run_dir import run_config_payload
    from feddmmr.federation import checkpoint as ckpt

    config = load_preset(stage_preset(1))
    config.top_users = None
    assembly = assemble(config, data)
    ckpt.write_json(folder / ckpt.CONFIG_FILE, run_config_payload(config, assembly, {}))
    ckpt.save_weights(folder / ckpt.MODEL_FILE, assembly.model.state_dict())
    return folder


def score_final_on_a_sample(final_users: int) -> dict:
    """Make the run's final scoring use ``final_users`` users (a bench of round costs, not of quality:
    the full final pass of a Stage 3 model over 10^5 users x 10^4 items is hours on 2 cores)."""
    from feddmmr import runner

    timing = {"seconds": 0.0, "users": 0}

    class SampledFinal(runner.InProcess):
        def evaluate(self, model, prototypes, requests, tag=None, users=None):
            if tag != "final" or final_users <= 0 or final_users >= self.num_users:
                return super().evaluate(model, prototypes, requests, tag, users)
            sample = np.sort(np.random.default_rng(0).choice(self.num_users, final_users, replace=False))
            tick = time.time()
            results = super().evaluate(model, prototypes, requests, tag, sample)
            timing.update(seconds=time.time() - tick, users=final_users)
            return results

    runner.InProcess = SampledFinal
    return timing


def measure(users: int, items: int, stage: int, rounds: int, fraction: float, threads: int,
            overrides: list[str], final_users: int, queue) -> None:
    """One run in this (child) process; puts the result row on ``queue``."""
    import torch

    from feddmmr.config import apply_overrides, load_preset, parse_sets, stage_preset
    from feddmmr.runner import run_federated

    torch.set_num_threads(threads)
    final = score_final_on_a_sample(final_users)
    tick = time.time()
    data = synthetic_dataset(users, items)
    with tempfile.TemporaryDirectory(prefix="feddmmr-scale-") as tmp:
        tmp = Path(tmp)
        features = init = None
        if stage == 3:
            features = synthetic_features(tmp / "features", data.num_items)
            init = stage1_init(tmp / "stage1", data, features)
        config = load_preset(stage_preset(stage))
        config = apply_overrides(config, {"num_rounds": rounds, "client_fraction": fraction, "top_users": "all",
                                          **parse_sets(overrides)}, "bench/scale.py")
        setup_seconds = time.time() - tick
        history = run_federated(config, data, tmp / "run", features, init, progress=False)
    train = [r["train_seconds"] for r in history["rounds"]]
    clients = [r["clients"] for r in history["rounds"]]
    per_round = float(np.mean(train[1:] or train))
    bytes_per_client = sum(int(np.prod(shape)) * 4 for shape in _transmitted_shapes(config, data.num_items))
    queue.put({"users": users, "items": items, "stage": stage, "rounds": rounds,
               "clients_per_round": int(np.mean(clients)), "seconds_per_round": round(per_round, 2),
               "seconds_per_client": round(float(per_round / max(np.mean(clients), 1)), 4),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "bytes_per_client": bytes_per_client,
               "eval_seconds": round(sum(r.get("eval_seconds", 0.0) for r in history["rounds"]) / len(train), 2),
               "setup_seconds": round(setup_seconds + history.get("memory_build_seconds", 0.0), 1),
               "final_seconds_per_user": round(final["seconds"] / final["users"], 5) if final["users"] else None})


def _transmitted_shapes(config, num_items: int) -> list[tuple[int, ...]]:
    """Shapes of what a client uploads (the stage's transmitted groups), dense float32."""
    from feddmmr.models import UR4RecV2MoE

    model = UR4RecV2MoE(**config.model_kwargs(num_items, 1280, 384))
    return [tuple(v.shape) for v in model.group_state(config.transmitted_groups).values()]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(KEYS) + " |", "|" + "---|" * len(KEYS)]
    lines += ["| " + " | ".join(str(row.get(k, "-")) for k in KEYS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[1000])
    parser.add_argument("--items", type=int, nargs="+", default=[4000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stage", type=int, choices=[1, 3], default=1)
    parser.add_argument("--fraction", type=float, default=0.1, help="clients sampled per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--final-users", type=int, default=0,
                        help="score the final pass on this many users (0: all; the per-user cost is reported)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    context = multiprocessing.get_context("spawn")
    rows = []
    for users in args.users:
        for items in args.items:
            queue = context.Queue()
            child = context.Process(target=measure, args=(users, items, args.stage, args.rounds, args.fraction,
                                                           args.threads, args.set, args.final_users, queue))
            child.start()
            child.join()
            row = queue.get() if child.exitcode == 0 else {"users": users, "items": items, "stage": args.stage,
                                                            "error": f"exit code {child.exitcode}"}
            rows.append(row)
            print(json.dumps(row) if args.json else f"{users} users x {items} items: {row}", file=sys.stderr
                  if not args.json else sys.stdout, flush=True)
    if not args.json:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
