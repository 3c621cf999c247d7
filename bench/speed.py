"""Seconds per federated round on ML-1M, where they go, and how far from a pooled pass they are.

    .venv/bin/python bench/speed.py --data ../shared/data/ml-1m [--users 1000 6040] [--rounds 2]
        [--stages 1 3] [--out bench/results/speed] [--features features/ml-1m] [--set key=value ...]

For each user count (the dataset's ``top_users``; 6040 = every ML-1M user) and each stage (1 =
``stage1_backbone``, 3 = ``stage3_skip_stage2`` with the multimodal memory, initialised from the
Stage 1 run just made), ``run_federated`` runs ``--rounds`` rounds (client_fraction 0.1, validation
every round, sampled protocol) in a fresh process, and the table reports, per round (mean over
rounds 2..; round 1 carries the warm-up, first vmap calls and allocator growth, and its training
seconds get their own column):

* **train s** / **val s**: the runner's own ``train_seconds`` (local updates + aggregation + prototypes)
  and ``eval_seconds`` (validation, every user);
* **fwd+bwd s**: time inside ``LocalTrainer._grad`` (the vmapped per-client forward + backward), timed
  by wrapping that method in this process only (the library is not changed);
* **overhead**: train s - fwd+bwd s (batch assembly, negatives, memory gathers, the vmapped Adam
  step, aggregation, prototypes), in seconds per round and in milliseconds per sampled client;
* **central s**: one centralized pass over the *same windows* of that round's sampled clients,
  pooled and shuffled, batch 64, plain ``torch.optim.Adam``, the same model, starting weights,
  memory snapshots, global prototypes and ``num_negatives`` (alignment over <= 128 distinct
  targets per batch, as the local trainer); **fed/central** = train s / central s (1.0 = the
  federated round costs what a pooled pass over its data costs; padding clients of different
  sizes into one vmapped step, per-client Adam states and aggregation put it above that);
* **memory build s**: ``build_clients`` for every user (windows, and for Stage 3 the memories);
* **peak RSS**: ``ru_maxrss`` of the measuring process after the run (each configuration runs
  in its own process, so peaks do not carry over).

Every round's numbers are in the JSON. On a busy machine ``--threads 1`` avoids the two torch
threads spinning against other processes (measured: several times faster there).
Prints the table to stdout and writes ``<out>/speed.md`` and ``<out>/speed.json``; run directories
go to ``<out>/runs/`` (replaced on every bench run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import OFFLINE_ENV, REPO, ensure_features, machine  # noqa: E402

log = logging.getLogger("bench.speed")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, required=True, help="MovieLens-1M folder")
    p.add_argument("--users", type=int, nargs="+", default=[1000, 6040], help="top_users values")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 3], choices=[1, 3])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed")
    p.add_argument("--features", type=Path, default=REPO / "features" / "ml-1m",
                   help="item feature folder for Stage 3 (extracted there if missing)")
    p.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the measuring processes (default: torch's choice)")
    args = p.parse_args(argv)
    args.set = [pair for group in args.set for pair in group]
    return args


# --------------------------------------------------------------------------- the instrumented run

class _Timings:
    def __init__(self):
        self.grad = 0.0
        self.grad_calls = 0
        self.rounds: list[dict] = []
        self.trainer = None


def _instrument(timings: _Timings) -> None:
    """Wrap LocalTrainer._grad and train_stream (this process only) to time them."""
    from feddmmr.federation.client import LocalTrainer

    grad, train_stream = LocalTrainer._grad, LocalTrainer.train_stream

    def timed_grad(self, *args):
        start = time.perf_counter()
        out = grad(self, *args)
        timings.grad += time.perf_counter() - start
        timings.grad_calls += 1
        return out

    def timed_train_stream(self, clients, global_state, seeds, global_prototypes=None, *args, **options):
        grad0, calls0, start, cpu = timings.grad, timings.grad_calls, time.perf_counter(), time.process_time()
        # what the centralized pass of this round starts from
        snapshot = (list(clients), {k: v.detach().clone() for k, v in global_state.items()},
                    None if global_prototypes is None else global_prototypes.clone())
        yield from train_stream(self, clients, global_state, seeds, global_prototypes, *args, **options)
        timings.trainer = self
        timings.rounds.append({
            "local_seconds": time.perf_counter() - start, "local_cpu_seconds": time.process_time() - cpu,
            "grad_seconds": timings.grad - grad0,
            "grad_calls": timings.grad_calls - calls0, "clients": len(clients), "snapshot": snapshot})

    LocalTrainer._grad, LocalTrainer.train_stream = timed_grad, timed_train_stream


def centralized_pass(trainer, config, clients, global_state, prototypes, seed: int) -> float:
    """Seconds of one pooled pass over ``clients``' windows: batch ``config.batch_size``, plain Adam."""
    import numpy as np
    import torch

    from feddmmr.centralized import pooled_pass

    model = copy.deepcopy(trainer.model)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in global_state.items():
            own[key].copy_(value)
    model.set_trainable(config.transmitted_groups)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    inputs = np.concatenate([c.inputs for c in clients])
    targets = np.concatenate([c.targets for c in clients])
    memory = np.concatenate([c.memory for c in clients])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    pooled_pass(model, optimizer, inputs, targets, memory, trainer.content, trainer.item_pool, config, generator,
                prototypes)
    return time.perf_counter() - start


def measure(data_path: str, users: int, stage: int, rounds: int, out: str, features: str | None,
            init: str | None, sets: list[str], seed: int, threads: int | None = None) -> dict:
    """One configuration, meant to run in a fresh process (its own peak RSS)."""
    os.environ.update(OFFLINE_ENV)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from feddmmr.config import apply_overrides, load_preset, parse_sets, stage_preset
    from feddmmr.data.dataset import load_dataset
    from feddmmr.runner import run_federated

    timings = _Timings()
    _instrument(timings)
    config = load_preset(stage_preset(stage))
    config.num_rounds = rounds
    apply_overrides(config, parse_sets(sets), "--set")
    config.seed, config.top_users = seed, users
    data = load_dataset(data_path, top_users=users)
    run_dir = Path(out) / "runs" / f"u{users}_stage{stage}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    wall, cpu = time.time(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):
        history = run_federated(config, data, run_dir, Path(features) if config.use_memory else None,
                                Path(init) if init else None, progress=False)
    wall, cpu = time.time() - wall, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_round = []
    for entry, timing in zip(history["rounds"], timings.rounds):
        clients, global_state, prototypes = timing.pop("snapshot")
        log.info("users %d stage %d round %d: centralized pass over %d clients' windows", users, stage,
                 entry["round"], len(clients))
        central = centralized_pass(timings.trainer, config, clients, global_state, prototypes,
                                   seed + entry["round"])
        train = entry["train_seconds"]
        per_round.append({
            "round": entry["round"], "clients": entry["clients"], "samples": entry["samples"],
            "windows": int(sum(len(c.inputs) for c in clients)),
            "train_seconds": train, "eval_seconds": entry.get("eval_seconds", 0.0),
            "local_seconds": round(timing["local_seconds"], 3),
            "local_cpu_seconds": round(timing["local_cpu_seconds"], 3),
            "grad_seconds": round(timing["grad_seconds"], 3),
            "grad_calls": timing["grad_calls"], "overhead_seconds": round(train - timing["grad_seconds"], 3),
            "overhead_ms_per_client": round(1000 * (train - timing["grad_seconds"]) / entry["clients"], 2),
            "central_seconds": round(central, 3), "fed_over_central": round(train / central, 3)})
    return {"users": data.num_users, "stage": stage, "preset": config.preset, "rounds": per_round,
            "memory_build_seconds": history["memory_build_seconds"], "peak_rss_mb": round(peak_mb, 1),
            "run_wall_seconds": round(wall, 1), "run_cpu_seconds": round(cpu, 1),
            "torch_threads": torch.get_num_threads(),
            "config": config.to_dict(), "run_dir": str(run_dir),
            "val_ndcg10": history["val_metrics"][-1]["NDCG@10"] if history["val_metrics"] else None}


# --------------------------------------------------------------------------- the bench

COLUMNS = ("users", "stage", "clients/round", "samples/round", "round 1 train s", "train s/round", "val s/round",
           "fwd+bwd s/round",
           "overhead s/round", "overhead ms/client", "central s", "fed/central", "memory build s", "peak RSS MB")


def summary_row(result: dict) -> list[str]:
    """Means over rounds 2.. (round 1 carries the warm-up; it is its own column); all rounds if only one."""
    rounds = result["rounds"][1:] or result["rounds"]

    def mean(key):
        return statistics.mean(r[key] for r in rounds)

    return [str(result["users"]), str(result["stage"]), f"{mean('clients'):.0f}", f"{mean('samples'):.0f}",
            f"{result['rounds'][0]['train_seconds']:.1f}", f"{mean('train_seconds'):.1f}",
            f"{mean('eval_seconds'):.1f}", f"{mean('grad_seconds'):.1f}",
            f"{mean('overhead_seconds'):.1f}", f"{mean('overhead_ms_per_client'):.0f}",
            f"{mean('central_seconds'):.1f}", f"{mean('fed_over_central'):.2f}",
            f"{result['memory_build_seconds']:.1f}", f"{result['peak_rss_mb']:.0f}"]


def speed_table(results: list[dict], args: argparse.Namespace, info: dict, load_after: str) -> str:
    from feddmmr.config import stage_preset

    lines = [
        "# Federated round speed",
        "",
        "ML-1M, top N users; presets "
        + ", ".join(f"Stage {s} `{stage_preset(s)}`" for s in args.stages)
        + f", {args.rounds} round(s) each, seed {args.seed}; per-round columns are means over rounds 2.. (round 1 "
        "carries the warm-up and has its own column; with one round, that round)"
        + (f", `--set {' '.join(args.set)}`" if args.set else "") + ". Stage 3 starts from the Stage 1 run "
        "just measured and reads the multimodal memory.",
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, torch {info['torch']} ({info['torch_threads']} "
        f"threads), commit {info['commit']}, {info['date']}; load average {info['load_avg']} before, "
        f"{load_after} after (seconds are wall clock; a busy machine inflates them).",
        "",
        "fwd+bwd = time in the vmapped `LocalTrainer._grad` calls; overhead = train - fwd+bwd (per sampled "
        "client in ms); central = one pooled pass over the same windows of the round's clients (batch 64, "
        "plain Adam, same model and negatives); fed/central = train / central (1.0: the round costs what a "
        "pooled pass over its data costs).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(summary_row(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def run_speed(args: argparse.Namespace) -> str:
    from feddmmr.data.dataset import load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    if args.threads:
        info["torch_threads"] = args.threads
    log.info("machine: %s", json.dumps(info))
    if 3 in args.stages:
        data = load_dataset(args.data, top_users=max(args.users))
        ensure_features(data, args.data, Path(args.features), progress=True)
        del data
    results = []
    context = multiprocessing.get_context("spawn")
    for users in args.users:
        init = None
        for stage in sorted(args.stages):
            if stage == 3 and init is None:  # Stage 3 needs a Stage 1 run to start from
                init = str(out / "runs" / f"u{users}_stage1")
                if not (Path(init) / "model.safetensors").exists():
                    raise SystemExit(f"bench/speed.py: error: Stage 3 needs {init} (run with --stages 1 3)")
            log.info("users %d, stage %d: %d round(s)", users, stage, args.rounds)
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                result = pool.submit(measure, str(args.data), users, stage, args.rounds, str(out),
                                     str(args.features), init if stage == 3 else None, args.set,
                                     args.seed, args.threads).result()
            results.append(result)
            if stage == 1:
                init = result["run_dir"]
            log.info("users %d, stage %d: %s", users, stage, dict(zip(COLUMNS, summary_row(result))))
            (out / "speed.json").write_text(json.dumps({"machine": info, "args": {
                "users": args.users, "rounds": args.rounds, "stages": args.stages, "set": args.set,
                "seed": args.seed}, "results": results}, indent=2))
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = speed_table(results, args, info, load_after)
    (out / "speed.md").write_text(table)
    log.info("wrote %s and %s", out / "speed.md", out / "speed.json")
    return table


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    print(run_speed(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
