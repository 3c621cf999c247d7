"""How the cost of a federated round grows with the population and the catalogue.

A seeded synthetic dataset with the shape of real ones (Zipf item popularity, log-normal sequence
lengths, random unit-norm text and visual features), sized by flags, then a few in-process rounds
of Stage 1 or Stage 3 (seed presets, ``--fraction`` of the clients a round). Each run is a child
process, so its peak RSS is its own.

    python bench/scale.py --users 1000 10000 --items 4000 27000 --rounds 2 --stage 1
    python bench/scale.py --users 138000 --items 27000 --rounds 1 --stage 1 --fraction 0.01 --json
    python bench/scale.py --users 20000 --items 27000 --rounds 2 --stage 1 --fraction 0.01 --flower 2 \
        --set eval_users=500 --set resident_clients=false --final-users 200

``--flower NODES`` runs the same federation on a SuperLink and NODES SuperNodes on 127.0.0.1
(each a separate process tree, node ``i`` serving the users ``u % NODES == i``), from the dataset
written to disk as a Parquet table and split into one file per node (each node reads only its
own; ``--whole-table``: every node reads the table); it reports each node's peak RSS (the summed RSS of the
SuperNode and the processes serving it, polled every 0.5 s; and its largest ClientApp process's
own peak, which the ClientApp reports with every reply) and the ServerApp side's.
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


def measure(users: int, items: int, stage: int, rounds: int, fraction: float, threads: int,
            overrides: list[str], final_users: int, queue) -> None:
    """One run in this (child) process; puts the result row on ``queue``."""
    import torch

    from feddmmr.config import apply_overrides, load_preset, parse_sets, stage_preset
    from feddmmr.runner import run_federated

    torch.set_num_threads(threads)
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
                                          "final_users": final_users, **parse_sets(overrides)}, "bench/scale.py")
        setup_seconds = time.time() - tick
        history = run_federated(config, data, tmp / "run", features, init, progress=False)
    queue.put({"users": users, "items": items, "stage": stage, "rounds": rounds, **row(history, config, data),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "setup_seconds": round(setup_seconds + history.get("memory_build_seconds", 0.0), 1)})


def row(history: dict, config, data) -> dict:
    """A run's columns from its history: rounds 2.. (round 1 when alone) for the per-round costs."""
    train = [r["train_seconds"] for r in history["rounds"]]
    clients = [r["clients"] for r in history["rounds"]]
    per_round = float(np.mean(train[1:] or train))
    final_users = next(iter(history["final"].values()))["users"]
    return {"clients_per_round": int(np.mean(clients)), "seconds_per_round": round(per_round, 2),
            "seconds_per_client": round(float(per_round / max(np.mean(clients), 1)), 4),
            "bytes_per_client": sum(int(np.prod(shape)) * 4 for shape in _transmitted_shapes(config, data.num_items)),
            "eval_seconds": round(sum(r.get("eval_seconds", 0.0) for r in history["rounds"]) / len(train), 2),
            "final_seconds_per_user": round(history["final_seconds"] / final_users, 5)
            if config.final_users and "final_seconds" in history else None}


# --------------------------------------------------------------------------- sharded over Flower SuperNodes

FLOWER_KEYS = ("users", "items", "stage", "rounds", "nodes", "clients_per_round", "seconds_per_round",
               "seconds_per_client", "eval_seconds", "discovery_seconds", "final_seconds_per_user",
               "node_peak_rss_gb", "clientapp_peak_rss_gb", "server_peak_rss_gb", "total_seconds")


def write_table(data, path: Path) -> Path:
    """The dataset as a Parquet table (``user_id``, ``item_id``, ``timestamp`` = position), which any
    node reads with the ``table`` layout."""
    import pandas as pd

    lengths = np.diff(data.offsets)
    users = np.repeat(data.user_ids, lengths)
    positions = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lengths)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": users, "item_id": data.items, "timestamp": positions}).to_parquet(path, index=False)
    return path


class RssSampler:
    """Polls the resident set size of every process under the deployment's processes (every
    ``interval`` s): per SuperNode, the peak of the summed RSS of the SuperNode and the processes
    serving it (its SuperExec and ClientApp processes: its process tree, or, should one leave it,
    the processes naming the SuperNode's port); the same for the SuperLink and its ServerApp."""

    def __init__(self, processes, interval: float = 0.5):
        import threading

        self.processes, self.interval = processes, interval
        self.peaks: dict[str, int] = {}  # group -> peak summed RSS (bytes)
        self.hwm: dict[int, tuple[str, int]] = {}  # pid -> (group, VmHWM bytes)
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self.thread.join()

    def _groups(self) -> dict[str, str]:
        """``group -> text on the command lines of its processes`` (a port)."""
        return {item.name: "127.0.0.1:" + item.process.args[item.process.args.index("--port") + 1]
                for item in self.processes.started}

    def _run(self) -> None:
        from feddmmr.flower.deploy import process_table, process_tree

        groups = self._groups()
        roots = {item.process.pid: item.name for item in self.processes.started}
        while not self.stop_flag.wait(self.interval):
            table = process_table()
            owner = {}
            for pid, name in roots.items():
                for member in process_tree(pid, table):
                    owner[member] = name
            for pid in list(table):
                if pid in owner:
                    continue
                try:
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                for name, marker in groups.items():
                    if marker in command and ("flwr" in command or "flower" in command):
                        owner[pid] = name
            totals: dict[str, int] = {}
            for pid, name in owner.items():
                status = _status(pid)
                if status is None:
                    continue
                totals[name] = totals.get(name, 0) + status[0]
                self.hwm[pid] = (name, max(status[1], self.hwm.get(pid, (name, 0))[1]))
            for name, total in totals.items():
                self.peaks[name] = max(self.peaks.get(name, 0), total)


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in bytes, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, amount = line.split(":", 1)
            values[key] = int(amount.split()[0]) * 1024
    return (values["VmRSS"], values["VmHWM"]) if len(values) == 2 else None


def measure_flower(users: int, items: int, stage: int, rounds: int, fraction: float, threads: int,
                   overrides: list[str], final_users: int, nodes: int, keep: Path | None,
                   whole_table: bool = False) -> dict:
    """The same run as :func:`measure`, on a SuperLink and ``nodes`` SuperNodes on loopback (separate
    processes, each node holding its partition ``u % nodes``), from the dataset written to disk: one
    partition file per node (each node reads only its own), or with ``whole_table`` the Parquet table
    that every node reads whole."""
    from feddmmr.config import apply_overrides, load_preset, parse_sets, stage_preset
    from feddmmr.data.dataset import load_dataset
    from feddmmr.data.partitions import write_partitions
    from feddmmr.flower import deploy

    os.environ.update(deploy.OFFLINE_ENV)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="feddmmr-scale-flower-"))
    tick = time.time()
    table_path = write_table(synthetic_dataset(users, items), work / "data" / "interactions.parquet")
    data = load_dataset(table_path, "table", None)  # as the nodes read it (ids remapped to 1..n)
    source = {"data": str(table_path), "layout": "table"} if whole_table else \
        {"data": str(write_partitions(data, nodes, work / "data" / "partitions", None))}
    run_config = {"stage": stage, **source, "num_rounds": rounds,
                  "client_fraction": fraction, "top_users": "all", "final_users": final_users,
                  "out": str(work / "run"), "cache": str(work / "node_cache"), "node_wait": 1800.0,
                  "round_timeout": 7200.0, **parse_sets(overrides)}
    if stage == 3:
        run_config["features"] = str(synthetic_features(work / "features", data.num_items))
        run_config["init"] = str(stage1_init(work / "stage1", data, Path(run_config["features"])))
    config = apply_overrides(load_preset(stage_preset(stage)), {k: v for k, v in run_config.items()
                                                                 if k not in ("stage", "data", "layout", "out",
                                                                              "cache", "node_wait", "round_timeout",
                                                                              "features", "init")}, "bench/scale.py")
    setup_seconds = time.time() - tick
    print(f"{users} users x {items} items: data on disk ({data.num_users} users, {data.num_items} item indices, "
          f"{setup_seconds:.0f}s); starting a SuperLink and {nodes} SuperNodes", file=sys.stderr, flush=True)
    with deploy.Deployment(nodes, work / "flwr_home", threads=threads) as deployment, \
            RssSampler(deployment.processes) as sampler:
        result = deployment.run(run_config, timeout=6 * 3600, echo=False)
    if not result.ok:
        raise SystemExit(f"the Flower run failed:\n{result.output[-4000:]}")
    history = result.history
    waves = history["flower"]["waves"]
    clientapp = [0.0] * nodes  # each node's largest ClientApp process (its own ru_maxrss, reported per reply)
    for wave in waves:
        if len(wave.get("peak_rss_mb", [])) == nodes:
            clientapp = [max(a, b) for a, b in zip(clientapp, wave["peak_rss_mb"])]
    gb = 2**30
    return {"users": users, "items": items, "stage": stage, "rounds": rounds, "nodes": nodes,
            **row(history, config, data),
            "discovery_seconds": round(next(w["seconds"] for w in waves if w["message"] == "query"), 1),
            "node_peak_rss_gb": [round(sampler.peaks.get(f"supernode-{i}", 0) / gb, 2) for i in range(nodes)],
            "clientapp_peak_rss_gb": [round(mb / 1024, 2) for mb in clientapp],
            "server_peak_rss_gb": round(sampler.peaks.get("superlink", 0) / gb, 2),
            "total_seconds": round(result.seconds, 1), "setup_seconds": round(setup_seconds, 1),
            "client_data": history["flower"]["client_data"], "work": str(work) if keep else None}


def _transmitted_shapes(config, num_items: int) -> list[tuple[int, ...]]:
    """Shapes of what a client uploads (the stage's transmitted groups), dense float32."""
    from feddmmr.models import UR4RecV2MoE

    model = UR4RecV2MoE(**config.model_kwargs(num_items, 1280, 384))
    return [tuple(v.shape) for v in model.group_state(config.transmitted_groups).values()]


def table(rows: list[dict], keys=KEYS) -> str:
    def cell(value) -> str:
        return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "-")) for k in keys) + " |" for row in rows]
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
    parser.add_argument("--flower", type=int, default=0, metavar="NODES",
                        help="run on a loopback SuperLink with NODES SuperNodes (separate processes) instead of "
                             "in-process; reports each node's peak RSS")
    parser.add_argument("--keep", type=Path, default=None, help="--flower: keep the data, run and logs here")
    parser.add_argument("--whole-table", action="store_true",
                        help="--flower: every node reads the whole Parquet table (default: its own partition file)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    context = multiprocessing.get_context("spawn")
    rows = []
    for users in args.users:
        for items in args.items:
            if args.flower:
                torch_threads(args.threads)
                row = measure_flower(users, items, args.stage, args.rounds, args.fraction, args.threads, args.set,
                                     args.final_users, args.flower, args.keep, args.whole_table)
                rows.append(row)
                print(json.dumps(row), file=sys.stdout if args.json else sys.stderr, flush=True)
                continue
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
        print(table(rows, FLOWER_KEYS if args.flower else KEYS))
    return 0


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
