"""Seconds per round of the same Stage 1 federation: in-process, Flower simulation, loopback deployment.

    .venv/bin/python bench/flower_speed.py [--data ../shared/data/ml-1m] [--users 1000] [--rounds 3]
        [--nodes 3] [--sim-nodes N] [--only inprocess,simulation,deployment] [--set key=value ...]
    .venv/bin/python bench/flower_speed.py --rounds 2 --only deployment,deployment-secagg   # SecAgg+ off vs on

The Stage 1 preset (100 negatives, batch 64, client_fraction 0.1: 100 clients a round for 1,000
users), validation (sampled protocol) after every round. A round's seconds are the runner's own
``train_history.json`` numbers (local training + aggregation + validation, messages included);
"discovery" is how long the ServerApp waited until every node had answered its first message
(node start-up, data loading, client set-up), "total" the whole run from launch (SuperLink start-up
and the final scoring of the best model on both protocols included).
Prints a markdown table to stdout, with the machine's load average before and after.
Run directories and Flower logs go to a temporary folder (``--keep DIR`` to keep them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m")
    p.add_argument("--users", type=int, default=1000, help="top users (the dataset's top_users)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=3, help="SuperNodes (user partitions) of the deployment")
    p.add_argument("--sim-nodes", type=int, default=None, help="virtual SuperNodes of the simulation (default --nodes)")
    p.add_argument("--only", default="inprocess,simulation,deployment",
                   help="comma-separated: inprocess, simulation, deployment, deployment-secagg")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra training config keys")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training process: the in-process runner and each deployed ClientApp "
                        "(simulation actors get Ray's 1 per CPU); 0 = torch's default")
    p.add_argument("--keep", type=Path, default=None, help="keep run directories and logs here")
    return p.parse_args()


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarise(name: str, nodes, history: dict, wall: float) -> dict:
    rounds = history["rounds"]
    first = None
    if "flower" in history:
        first = next(w["seconds"] for w in history["flower"]["waves"] if w["message"] == "query")
    return {"runner": name, "nodes": nodes, "rounds": len(rounds),
            "round": statistics.mean(r["seconds"] for r in rounds),
            "train": statistics.mean(r["train_seconds"] for r in rounds),
            "eval": statistics.mean(r.get("eval_seconds", 0.0) for r in rounds),
            "ready": first, "total": wall,
            "val": history["val_metrics"][-1]["NDCG@10"], "test": history["final"]["test_sampled"]["NDCG@10"]}


def main() -> int:
    args = parse_args()
    from feddmmr.config import apply_overrides, load_preset, parse_sets
    from feddmmr.flower import deploy

    os.environ.update(deploy.OFFLINE_ENV)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_preset("stage1_backbone")
    apply_overrides(config, {"num_rounds": args.rounds, "top_users": args.users, **parse_sets(args.set)}, "bench")
    run_config = {"stage": 1, "data": str(args.data.resolve()), "num_rounds": args.rounds, "top_users": args.users,
                  **parse_sets(args.set)}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="flower_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",")
    rows = []
    before = load()

    if "inprocess" in wanted:
        from feddmmr.data.dataset import load_dataset
        from feddmmr.runner import run_federated

        tick = time.time()
        data = load_dataset(args.data, top_users=config.top_users)
        history = run_federated(config, data, work / "inprocess", progress=False)
        wall = time.time() - tick
        rows.append(summarise("in-process", "-", history, wall))
        print(f"in-process done in {wall:.1f}s (load {load()})", flush=True)

    if "simulation" in wanted:
        nodes = args.sim_nodes or args.nodes
        result = deploy.simulate({**run_config, "out": str(work / "simulation")}, nodes,
                                 flwr_home=work / "flwr_home_sim", echo=False)
        if not result.ok:
            print(result.output[-4000:])
            raise SystemExit("the simulation failed")
        rows.append(summarise("Flower simulation", nodes, result.history, result.seconds))
        print(f"simulation done in {result.seconds:.1f}s (load {load()})", flush=True)

    variants = [(name, label, extra) for name, label, extra in (
        ("deployment", "Flower deployment (loopback)", {}),
        ("deployment-secagg", "Flower deployment (loopback), SecAgg+", {"secure_aggregation": True}))
        if name in wanted]
    if variants:  # one SuperLink and its SuperNodes for both
        with deploy.Deployment(args.nodes, work / "flwr_home_deploy", threads=args.threads or None) as deployment:
            for name, label, extra in variants:
                result = deployment.run({**run_config, **extra, "out": str(work / name)}, echo=False, log_name=name)
                if not result.ok:
                    print(result.output[-4000:])
                    raise SystemExit(f"the {name} run failed")
                rows.append(summarise(label, args.nodes, result.history, result.seconds))
                print(f"{name} done in {result.seconds:.1f}s (load {load()})", flush=True)

    after = load()
    print()
    print(f"Stage 1, {args.users} users, {config.client_fraction:g} of them a round, {args.rounds} rounds; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {platform.machine()}; "
          f"load average (1/5/15 min) before {before}, after {after}")
    print()
    print("| runner | nodes | s/round | train s/round | validation s/round | discovery s | total s | val NDCG@10 (last) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ready = f"{r['ready']:.1f}" if r["ready"] is not None else "-"
        print(f"| {r['runner']} | {r['nodes']} | {r['round']:.1f} | {r['train']:.1f} | {r['eval']:.1f} | {ready} | "
              f"{r['total']:.1f} | {r['val']:.4f} |")
    if args.keep:
        (work / "rows.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
