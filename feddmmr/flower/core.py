"""The Flower app's plain parts (no ``flwr`` import, so they are tested without Flower).

A node (SuperNode) serves the users of one partition: user ``u`` belongs to partition
``u % num_partitions``. It builds, once per run and process, what the in-process transport
builds for everyone (:func:`feddmmr.engine.assemble.assemble`, the clients, one ``LocalTrainer``),
trains the sampled users of its partition with the same trainer call and pre-aggregates them
(``Aggregator.partial``); it scores its own users with the one evaluation loop. The server runs
the one round loop (:mod:`feddmmr.engine.loop`) with the nodes as its transport.

The clients' memories never leave the node: they are kept as arrays in the node's
``context.state`` (:func:`pack_clients` / :func:`unpack_clients`), so a node process that
did not build them (a deployment starts a fresh ClientApp process per message) restores
them instead of replaying every user's history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, apply_overrides, validate_config
from ..data.dataset import SequenceDataset, load_dataset
from ..data.partitions import is_partitioned, load_partition, partition_users  # noqa: F401 (the app's users of a node)
from ..data.parsing import TableColumns
from ..devices import resolve_device
from ..engine.assemble import LocalClients, assemble, client_seed, stage_config
from ..evaluation import METRIC_NAMES
from ..federation.client import pack_clients, unpack_clients
from ..federation.server import ROBUST, Aggregator

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- run config

TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Keys of the app besides the training config. Values in [tool.flwr.app.config]; "" = unset.
APP_KEYS = {
    "data": "",  # dataset path (a node may override it with --node-config 'data="..."')
    "layout": "",  # dataset layout (auto-detected when empty)
    "user_col": "",  # table/RecBole columns, as --user-col & co. ("" = found by their common names)
    "item_col": "",
    "time_col": "",
    "rating_col": "",
    "features": "",  # item feature folder (Stage 2/3; public item content)
    "init": "",  # run directory of the previous stage (same as `feddmmr train --init DIR`)
    "out": "runs/flower",  # the run directory the ServerApp writes
    "cache": "",  # a node's folder for its evaluation candidates (per partition; "" = recomputed by every process)
    "resume": False,  # continue an interrupted run in `out`
    "node_wait": 120.0,  # seconds the ServerApp waits for every partition's node to connect
    "round_timeout": 600.0,  # seconds a wave (train, evaluate, a SecAgg+ stage) waits; nodes late by then are dropped
    "secure_aggregation": False,  # sum the nodes' updates with SecAgg+ (feddmmr/flower/secure.py)
    "secagg_clipping_range": 8.0,  # SecAgg+: the scaled update entries must lie in [-range, range]
    "poll_interval": 0.05,  # seconds between pulls of replies
}
PATH_KEYS = ("data", "features", "init", "cache")  # a node's --node-config may override these


def default_app_config() -> dict:
    """What ``[tool.flwr.app.config]`` holds: every training key unset (the stage preset's value) plus the app keys."""
    return {**{key: "" for key in TRAIN_KEYS}, **APP_KEYS}


def train_config(run_config: Mapping) -> TrainConfig:
    """The training config of a run: the preset (``preset`` or the ``stage``'s), then every set key;
    validated for the Flower transport (and SecAgg+ when ``secure_aggregation`` is on)."""
    unknown = sorted(k for k, v in run_config.items() if k not in TRAIN_KEYS and k not in APP_KEYS and v != "")
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}")
    stage = run_config.get("stage", "")
    config = stage_config(int(stage or 1), run_config.get("init") or None, str(run_config.get("preset") or ""))
    if stage != "" and int(stage) != config.stage:
        raise ConfigError(f"run config: preset {config.preset!r} is for stage {config.stage}, not stage {stage}")
    overrides = {key: run_config[key] for key in TRAIN_KEYS
                 if key not in ("preset", "stage") and run_config.get(key, "") != ""}
    config = apply_overrides(config, overrides, "run config", transport="flower")  # `device`: each node checks its own
    return validate_config(config, "run config", transport="flower",
                           secure_aggregation=bool(run_config.get("secure_aggregation", False)))


def sends_each_update(config: TrainConfig) -> bool:
    """Whether nodes reply with each client's update instead of their partition's sum: a median, a
    trimmed mean or server-side clipping needs every update on the server (FedAvg only the sum)."""
    return config.aggregation in ROBUST or config.clip_norm > 0


def path_setting(key: str, run_config: Mapping, node_config: Mapping | None = None) -> Path | None:
    """A path key: the node's own value (``--node-config``) wins over the run config's; "" = none."""
    value = (node_config or {}).get(key) or run_config.get(key) or ""
    return Path(str(value)).expanduser() if value else None


def load_node_data(config: TrainConfig, run_config: Mapping, node_config: Mapping | None = None) -> SequenceDataset:
    """The node's data: its partition's file when ``data`` is a partition folder (:mod:`feddmmr.data.partitions`:
    only its users' sequences are read), else the whole dataset (every user read, only the node's used)."""
    path = path_setting("data", run_config, node_config)
    if path is None:
        raise ConfigError("run config: set `data` (the dataset path), e.g. --run-config 'data=\"/path/ml-1m\"'")
    partition = node_partition(path, node_config)
    if partition is not None:
        return load_partition(path, *partition, config.top_users)
    columns = TableColumns(*(str(run_config.get(key) or "") or None
                             for key in ("user_col", "item_col", "time_col", "rating_col")))
    return load_dataset(path, str(run_config.get("layout") or "") or None, config.top_users, columns)


def node_partition(path: Path, node_config: Mapping | None) -> tuple[int, int] | None:
    """``(partition-id, num-partitions)`` when the node reads its own partition file from ``path``; None
    when ``path`` holds the whole dataset (a process may then serve any node from one copy)."""
    if not is_partitioned(path):
        return None
    node_config = node_config or {}
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(f"{path} holds one file per partition: the node needs partition-id and num-partitions")
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


# --------------------------------------------------------------------------- partitions


def group_by_partition(users, num_partitions: int) -> dict[int, list[int]]:
    """Sampled users per partition (only partitions with users; partitions and users ascending)."""
    groups: dict[int, list[int]] = {}
    for user in sorted(int(u) for u in users):
        groups.setdefault(user % num_partitions, []).append(user)
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------- the node

@dataclass
class NodeUpdate:
    """What a node returns for a train message: the pre-aggregated sums and the users' side channel."""

    sums: dict[str, torch.Tensor]
    row_weight: torch.Tensor | None
    total: float
    prototypes: list[tuple[int, np.ndarray]]  # (user, centroids), users ascending
    losses: dict[str, float]  # summed over the node's clients
    samples: int
    clients: int
    each: list[tuple[int, dict[str, torch.Tensor], int]] = field(default_factory=list)  # (user, state, samples)


class NodeRuntime(LocalClients):
    """What a node process builds once per run: the data, the models, one trainer and its clients."""

    def __init__(self, config: TrainConfig, data: SequenceDataset, features: Path | None, init: Path | None,
                 cache_dir: Path | None = None):
        # the run's `device` on this node's hardware: with `auto`, a node with a GPU trains and scores on it
        device = resolve_device(config.device, "run config: config key 'device' on this node")
        super().__init__(assemble(config, data, features, init, device), {}, cache_dir)
        self.config, self.data = config, data
        self.trainer = self.assembly.trainer()
        self.build_seconds = 0.0
        if not config.resident_clients:
            self.build_on_demand()

    @classmethod
    def create(cls, run_config: Mapping, node_config: Mapping | None = None) -> "NodeRuntime":
        config = train_config({**run_config, "init": str(path_setting("init", run_config, node_config) or "")})
        data = load_node_data(config, run_config, node_config)
        cache = path_setting("cache", run_config, node_config)
        if cache is not None:  # one folder per partition: nodes sharing a disk never write the same file
            cache = cache / f"partition-{int((node_config or {}).get('partition-id', 0))}"
        return cls(config, data, path_setting("features", run_config, node_config),
                   path_setting("init", run_config, node_config), cache)

    def memory_signature(self) -> str:
        """What saved memories must match to be reused: the data and the memory settings."""
        memory_config = self.assembly.memory_config
        return json.dumps({"data": self.data.fingerprint(), "seed": self.config.seed,
                           "max_seq_len": self.config.max_seq_len,
                           "memory": dataclasses.asdict(memory_config) if memory_config else None},
                          sort_keys=True)

    def ensure_clients(self, users, saved: Mapping[str, np.ndarray] | None = None,
                       saved_signature: str | None = None) -> tuple[str, dict[str, np.ndarray] | None]:
        """Make ``users``' client data available: ``cached`` in this process, ``restored`` from
        ``saved`` arrays, or ``built`` from the data. Returns how, and the arrays to save (or None)."""
        if not self.resident:  # nothing is built ahead: clients when sampled, evaluation memories when scored
            if saved and saved_signature == self.memory_signature():
                self.load_eval_memory_arrays(saved)
            return "on-demand", None
        missing = [int(u) for u in users if int(u) not in self.clients]
        if not missing:
            return "cached", None
        self._memory_ids.clear()
        if self.assembly.memory_config is None:  # no memory: the windows are all there is, cheap to cut
            self.clients.update(self.assembly.build_clients(np.asarray(missing)))
            return "built", None
        if saved and saved_signature == self.memory_signature() and set(missing) <= set(saved["users"].tolist()):
            self.clients.update(unpack_clients(saved, self.data, self.config.max_seq_len, self.assembly.memory_config,
                                               self.assembly.space, missing))
            return "restored", None
        tick = time.time()
        self.clients.update(self.assembly.build_clients(np.asarray(missing)))
        self.build_seconds += time.time() - tick
        return "built", pack_clients({int(u): self.clients[int(u)] for u in users})

    def train(self, users, global_state: dict[str, torch.Tensor], round_number: int,
              prototypes: torch.Tensor | None) -> NodeUpdate:
        """The same local step as the in-process loop, for this node's sampled users: pre-aggregated as
        each vmapped group finishes, or each client's update when :func:`sends_each_update` (then ``sums``
        is empty)."""
        cfg = self.config
        users = sorted(int(u) for u in users)
        aggregator = Aggregator(global_state, cfg.item_embedding_aggregation)
        seeds = [client_seed(cfg.seed, round_number, u) for u in users]
        clients = self.take(users)
        stream = self.trainer.train_stream([clients[u] for u in users], global_state, seeds, prototypes)
        received, losses, each, send_each = [], {}, [], sends_each_update(cfg)
        for index, update in stream:  # added as each vmapped group finishes: one group's updates held at a time
            user = users[index]
            if send_each:
                each.append((user, update.state, int(update.num_samples)))
            else:
                aggregator.add(update.state, update.num_samples)
            if update.prototypes is not None:
                received.append((user, update.prototypes))
            for key, value in update.metrics.items():
                losses[key] = losses.get(key, 0.0) + value
        sums, row_weight, total = aggregator.partial()
        each.sort(key=lambda item: item[0])
        received.sort(key=lambda item: item[0])
        return NodeUpdate(sums, row_weight, total, received, losses,
                          int(sum(clients[u].num_samples for u in users)), len(users), each)

    def saved_eval_memory(self, users) -> dict[str, np.ndarray] | None:
        """On demand and with memory: the evaluation memories built so far for ``users`` (what the node's
        ``context.state`` keeps, so a later ClientApp process need not rebuild them); None otherwise."""
        if self.resident or not self.config.use_memory:
            return None
        return self.eval_memory_arrays(users)

    def evaluate_users(self, users, global_state: Mapping[str, torch.Tensor], prototypes: torch.Tensor | None,
                       requests: list[tuple[str, str, int]]) -> list[dict]:
        """Score ``users`` with the global model: one result per ``(split, protocol, batch_size)``."""
        model = self.assembly.model
        model.copy_state_(global_state)
        return self.evaluate(model, prototypes, requests, users=np.asarray(sorted(int(u) for u in users),
                                                                             dtype=np.int64))


# --------------------------------------------------------------------------- the server

@dataclass
class Catalogue:
    """What the server knows of the data, from the nodes: sizes and a fingerprint, never interactions."""

    num_users: int
    num_items: int
    digest: str
    stats: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return self.digest


def combine_results(parts: list[dict]) -> dict:
    """One evaluation result from the nodes' results over disjoint users (user-weighted means)."""
    if not parts:
        raise ValueError("no evaluation results to combine")
    first = parts[0]
    for part in parts[1:]:
        if (part["split"], part["protocol"]) != (first["split"], first["protocol"]):
            raise ValueError("cannot combine results of different splits or protocols")
    if len(parts) == 1:
        return dict(first)
    total = sum(int(p["users"]) for p in parts)
    out = {}
    for key, value in first.items():
        if key == "users":
            out[key] = total
        elif key in METRIC_NAMES:
            out[key] = sum(float(p[key]) * int(p["users"]) for p in parts) / total
        else:
            out[key] = value
    return out
