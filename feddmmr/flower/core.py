"""The Flower app's plain parts (no ``flwr`` import, so they are tested without Flower).

A node (SuperNode) serves the users of one partition: user ``u`` belongs to partition
``u % num_partitions``. It builds, once per run and process, what the in-process runner
builds for everyone (:func:`feddmmr.runner.setup`, the clients, one ``LocalTrainer``), trains
the sampled users of its partition with the same trainer call and pre-aggregates them
(``Aggregator.partial``); it scores its own users with the one evaluation loop. The server
merges the partial aggregates, clusters the prototypes and writes the run directory in the
in-process runner's format (:class:`RunRecord`).

The clients' memories never leave the node: they are kept as arrays in the node's
``context.state`` (:func:`pack_clients` / :func:`unpack_clients`), so a node process that
did not build them (a deployment starts a fresh ClientApp process per message) restores
them instead of replaying every user's history.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, apply_overrides, load_preset
from ..data.dataset import SequenceDataset, load_dataset
from ..evaluation import METRIC_NAMES, PROTOCOLS, evaluate, format_metrics
from ..federation import checkpoint as ckpt
from ..federation.client import ClientData, LocalTrainer, build_clients, pack_clients, unpack_clients
from ..federation.memory import MemoryConfig
from ..federation.server import ROBUST, Aggregator, ServerOptimizer, aggregate_prototypes
from ..models import UR4RecV2MoE
from ..runner import SELECT_METRIC, client_seed, memory_scorer, plot_history, setup
from ..safeio import load_npy

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- run config

TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Keys of the app besides the training config. Values in [tool.flwr.app.config]; "" = unset.
APP_KEYS = {
    "data": "",  # dataset path (a node may override it with --node-config 'data="..."')
    "layout": "",  # dataset layout (auto-detected when empty)
    "features": "",  # item feature folder (Stage 2/3; public item content)
    "init": "",  # run directory of the previous stage (same as `feddmmr train --init DIR`)
    "out": "runs/flower",  # the run directory the ServerApp writes
    "resume": False,  # continue an interrupted run in `out`
    "node_wait": 120.0,  # seconds the ServerApp waits for every partition's node to connect
    "round_timeout": 600.0,  # seconds a wave (train, evaluate, a SecAgg+ stage) waits; nodes late by then are dropped
    "secure_aggregation": False,  # sum the nodes' updates with SecAgg+ (feddmmr/flower/secure.py)
    "secagg_clipping_range": 8.0,  # SecAgg+: the scaled update entries must lie in [-range, range]
    "poll_interval": 0.05,  # seconds between pulls of replies
}
PATH_KEYS = ("data", "features", "init")  # a node's --node-config may override these


def default_app_config() -> dict:
    """What ``[tool.flwr.app.config]`` holds: every training key unset (the stage preset's value) plus the app keys."""
    return {**{key: "" for key in TRAIN_KEYS}, **APP_KEYS}


def stage_preset(stage: int, init: Path | str | None) -> str:
    """The preset of a stage, as the CLI picks it (Stage 3 after Stage 2 -> stage3_moe)."""
    if stage == 3:
        previous = ckpt.read_run_config(Path(init))["train"]["stage"] if init else 1
        return "stage3_moe" if previous == 2 else "stage3_skip_stage2"
    if stage not in (1, 2):
        raise ConfigError(f"run config: stage must be 1, 2 or 3, got {stage!r}")
    return {1: "stage1_backbone", 2: "stage2_alignment"}[stage]


def train_config(run_config: Mapping) -> TrainConfig:
    """The training config of a run: the preset (``preset`` or the ``stage``'s), then every set key."""
    unknown = sorted(k for k, v in run_config.items() if k not in TRAIN_KEYS and k not in APP_KEYS and v != "")
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}")
    stage = run_config.get("stage", "")
    preset = str(run_config.get("preset") or "")
    config = load_preset(preset) if preset else load_preset(stage_preset(int(stage or 1), run_config.get("init") or None))
    if stage != "" and int(stage) != config.stage:
        raise ConfigError(f"run config: preset {config.preset!r} is for stage {config.stage}, not stage {stage}")
    overrides = {key: run_config[key] for key in TRAIN_KEYS
                 if key not in ("preset", "stage") and run_config.get(key, "") != ""}
    config = apply_overrides(config, overrides, "run config")
    if config.dp_enabled:
        raise ConfigError("run config: differential privacy (dp_noise_multiplier / dp_target_epsilon) is only "
                          "supported by the in-process runner (`feddmmr train --set dp_...`); unset it for Flower")
    return config


def check_supported(config: TrainConfig) -> None:
    """Refuse what the Flower path cannot do rather than silently ignore it: fault injection is
    in-process only (on Flower, stop a SuperNode or send a bad reply instead)."""
    problems = []
    if config.attack != "none":
        problems.append(f"attack={config.attack!r} (in-process fault injection)")
    if config.client_dropout > 0:
        problems.append("client_dropout > 0 (in-process fault injection; on Flower, stop a SuperNode instead)")
    if problems:
        raise ConfigError("run config: the Flower app does not support " + "; ".join(problems)
                          + "; run it in-process with `feddmmr train`")


def sends_each_update(config: TrainConfig) -> bool:
    """Whether nodes reply with each client's update instead of their partition's sum: a median, a
    trimmed mean or server-side clipping needs every update on the server (FedAvg only the sum)."""
    return config.aggregation in ROBUST or config.clip_norm > 0


def path_setting(key: str, run_config: Mapping, node_config: Mapping | None = None) -> Path | None:
    """A path key: the node's own value (``--node-config``) wins over the run config's; "" = none."""
    value = (node_config or {}).get(key) or run_config.get(key) or ""
    return Path(str(value)).expanduser() if value else None


def load_node_data(config: TrainConfig, run_config: Mapping, node_config: Mapping | None = None) -> SequenceDataset:
    path = path_setting("data", run_config, node_config)
    if path is None:
        raise ConfigError("run config: set `data` (the dataset path), e.g. --run-config 'data=\"/path/ml-1m\"'")
    return load_dataset(path, str(run_config.get("layout") or "") or None, config.top_users)


# --------------------------------------------------------------------------- partitions

def partition_users(num_users: int, partition: int, num_partitions: int) -> np.ndarray:
    """The users a node serves: ``u % num_partitions == partition``, ascending."""
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition-id {partition} is outside 0..{num_partitions - 1}")
    return np.arange(partition, num_users, num_partitions, dtype=np.int64)


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


def load_state(model: UR4RecV2MoE, state: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


class NodeRuntime:
    """What a node process builds once per run: the data, the models, one trainer and its clients."""

    def __init__(self, config: TrainConfig, data: SequenceDataset, features: Path | None, init: Path | None):
        self.config, self.data = config, data
        self.fed = setup(config, data, features, init)
        self.memory_config = MemoryConfig.from_train_config(config) if config.use_memory else None
        self.trainer = LocalTrainer(copy.deepcopy(self.fed.model), config, self.fed.content, data.occurring_items())
        self.clients: dict[int, ClientData] = {}
        self.build_seconds = 0.0

    @classmethod
    def create(cls, run_config: Mapping, node_config: Mapping | None = None) -> "NodeRuntime":
        config = train_config({**run_config, "init": str(path_setting("init", run_config, node_config) or "")})
        data = load_node_data(config, run_config, node_config)
        return cls(config, data, path_setting("features", run_config, node_config),
                   path_setting("init", run_config, node_config))

    def memory_signature(self) -> str:
        """What saved memories must match to be reused: the data and the memory settings."""
        return json.dumps({"data": self.data.fingerprint(), "seed": self.config.seed,
                           "max_seq_len": self.config.max_seq_len,
                           "memory": dataclasses.asdict(self.memory_config) if self.memory_config else None},
                          sort_keys=True)

    def ensure_clients(self, users, saved: Mapping[str, np.ndarray] | None = None,
                       saved_signature: str | None = None) -> tuple[str, dict[str, np.ndarray] | None]:
        """Make ``users``' client data available: ``cached`` in this process, ``restored`` from
        ``saved`` arrays, or ``built`` from the data. Returns how, and the arrays to save (or None)."""
        missing = [int(u) for u in users if int(u) not in self.clients]
        if not missing:
            return "cached", None
        cfg = self.config
        if self.memory_config is None:  # no memory: the windows are all there is, cheap to cut
            self.clients.update(build_clients(self.data, cfg.max_seq_len, None, None, np.asarray(missing), cfg.seed))
            return "built", None
        if saved and saved_signature == self.memory_signature() and set(missing) <= set(saved["users"].tolist()):
            self.clients.update(unpack_clients(saved, self.data, cfg.max_seq_len, self.memory_config,
                                               self.fed.space, missing))
            return "restored", None
        tick = time.time()
        self.clients.update(build_clients(self.data, cfg.max_seq_len, self.memory_config, self.fed.space,
                                          np.asarray(missing), cfg.seed))
        self.build_seconds += time.time() - tick
        return "built", pack_clients({int(u): self.clients[int(u)] for u in users})

    def train(self, users, global_state: dict[str, torch.Tensor], round_number: int,
              prototypes: torch.Tensor | None) -> NodeUpdate:
        """The same local step as the in-process loop, for this node's sampled users: pre-aggregated,
        or each client's update when :func:`sends_each_update` (then ``sums`` is empty)."""
        cfg = self.config
        users = sorted(int(u) for u in users)
        aggregator = Aggregator(global_state, cfg.item_embedding_aggregation)
        seeds = [client_seed(cfg.seed, round_number, u) for u in users]
        updates = self.trainer.train_many([self.clients[u] for u in users], global_state, seeds, prototypes)
        received, losses, each, send_each = [], {}, [], sends_each_update(cfg)
        for user, update in zip(users, updates):
            if send_each:
                each.append((user, update.state, int(update.num_samples)))
            else:
                aggregator.add(update.state, update.num_samples)
            if update.prototypes is not None:
                received.append((user, update.prototypes))
            for key, value in update.metrics.items():
                losses[key] = losses.get(key, 0.0) + value
        sums, row_weight, total = aggregator.partial()
        return NodeUpdate(sums, row_weight, total, received, losses,
                          int(sum(self.clients[u].num_samples for u in users)), len(users), each)

    def memory_ids(self, split: str) -> np.ndarray | None:
        """``[num_users, K]`` memory ids for scoring (rows of other nodes' users stay empty)."""
        if not self.config.use_memory:
            return None
        out = np.zeros((self.data.num_users, self.config.memory_top_k), dtype=np.int64)
        for user, client in self.clients.items():
            out[user] = client.eval_memory[split]
        return out

    def evaluate(self, users, global_state: Mapping[str, torch.Tensor], prototypes: torch.Tensor | None,
                 requests: list[tuple[str, str, int]]) -> list[dict]:
        """Score ``users`` with the global model: one result per ``(split, protocol, batch_size)``."""
        cfg = self.config
        model = self.fed.model
        load_state(model, global_state)
        model.eval()
        users = np.asarray(sorted(int(u) for u in users), dtype=np.int64)
        return [evaluate(memory_scorer(model, self.fed.content, self.memory_ids(split), prototypes), self.data, split,
                         protocol, seed=cfg.seed, max_len=cfg.max_seq_len, batch_size=batch_size, users=users,
                         num_negatives=cfg.eval_negatives)
                for split, protocol, batch_size in requests]


# --------------------------------------------------------------------------- the server

VALIDATION_BATCH = 512  # evaluate()'s default, as the in-process validation uses it


def final_requests() -> list[tuple[str, str, int]]:
    """The final scoring of the best model, as the in-process runner does it."""
    return [(split, protocol, 256 if protocol == "sampled" else 64) for split in ("val", "test") for protocol in PROTOCOLS]


@dataclass
class Catalogue:
    """What the server knows of the data, from the nodes: sizes and a fingerprint, never interactions."""

    num_users: int
    num_items: int
    fingerprint: str
    stats: dict = field(default_factory=dict)


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


def merge_prototypes(config: TrainConfig, received: list[tuple[int, np.ndarray]], round_number: int,
                     current: torch.Tensor | None) -> torch.Tensor | None:
    """The next global prototypes from the users' centroids (in ascending user order, as in-process)."""
    if not (config.use_memory and config.use_prototypes):
        return current
    ordered = [protos for _, protos in sorted(received, key=lambda pair: pair[0])]
    centers = aggregate_prototypes(ordered, config.num_global_prototypes, config.seed + round_number)
    return torch.from_numpy(centers) if centers is not None else current


def run_config_payload(config: TrainConfig, fed, data_stats: dict, flower: dict) -> dict:
    """config.json, as the in-process runner writes it, plus how the Flower run was laid out."""
    model = fed.model
    return {
        "train": config.to_dict(), "model": config.model_kwargs(fed.data.num_items, model.visual_dim, model.text_dim),
        "trained_groups": fed.trained_groups, "init": fed.init_dir, "features": fed.feature_meta,
        "data": data_stats, "select_metric": SELECT_METRIC,
        "versions": {"torch": torch.__version__, **({"flwr": flower["version"]} if "version" in flower else {})},
        "flower": {k: v for k, v in flower.items() if k != "version"},
    }


class RunRecord:
    """The run directory, written exactly as ``run_federated`` writes it (see checkpoint.py):
    config.json, train_history.json, the best model (+ global prototypes), resume/ after every
    round, validation_curves.png at the end."""

    def __init__(self, out_dir: Path, resume: bool = False):
        self.out_dir = Path(out_dir)
        held = ckpt.resume_dir(self.out_dir) is not None
        if held and not resume:
            raise FileExistsError(f"{self.out_dir} already holds a run; pass resume=true to continue it, "
                                  "or choose another out")
        self.resuming = resume and held
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history: dict = {}
        self.best_value = -1.0
        self.payload: dict = {}
        self.point: ckpt.ResumePoint | None = None

    def start(self, payload: dict, memory_seconds: float | None) -> None:
        """Write config.json (after refusing to resume a run started with another config)."""
        self.payload = payload
        if self.resuming:
            self.point = ckpt.load_resume_point(self.out_dir, payload)
        ckpt.write_json(self.out_dir / ckpt.CONFIG_FILE, payload)
        self.history = {"rounds": [], "val_metrics": [], "best_round": None, "best_val": None,
                        "memory_build_seconds": None if memory_seconds is None else round(memory_seconds, 2)}

    def restore(self, model: UR4RecV2MoE, server_optimizer: ServerOptimizer) -> tuple[int, torch.Tensor | None]:
        """(first round to run, global prototypes) — after loading the last round when resuming."""
        point = self.point
        if point is None:
            return 1, None
        model.load_state_dict(point.model)
        server_optimizer.load_state_dict(point.server_optimizer)
        self.history, self.best_value = point.history, point.best_value
        ckpt.set_rng_state(point.rng)
        log.info("resuming %s after round %d", self.out_dir, point.round)
        return point.round + 1, point.prototypes

    def validated(self, entry: dict, result: dict, seconds: float, model: UR4RecV2MoE,
                  prototypes: torch.Tensor | None) -> None:
        entry["val_metrics"] = result
        entry["eval_seconds"] = round(seconds, 3)
        self.history["val_metrics"].append(result)
        if result[SELECT_METRIC] > self.best_value:
            self.best_value = result[SELECT_METRIC]
            self.history["best_round"], self.history["best_val"] = entry["round"], result
            ckpt.save_weights(self.out_dir / ckpt.MODEL_FILE, model.state_dict(), {"round": entry["round"]})
            if prototypes is not None:
                ckpt.save_array(self.out_dir / ckpt.BEST_PROTOTYPES_FILE, prototypes.numpy())

    def end_round(self, entry: dict, num_rounds: int, model: UR4RecV2MoE, prototypes: torch.Tensor | None,
                  server_optimizer: ServerOptimizer, seconds: float) -> str:
        entry["seconds"] = round(seconds, 3)
        self.history["rounds"].append(entry)
        summary = (f"round {entry['round']}/{num_rounds}: {entry['clients']} clients, "
                   f"loss {entry['losses'].get('next_item', float('nan')):.4f}, gate {entry['gate']:.4f}, "
                   f"{entry['train_seconds']:.1f}s train")
        if "val_metrics" in entry:
            summary += " | val " + format_metrics(entry["val_metrics"])
        ckpt.write_resume_point(self.out_dir, ckpt.ResumePoint(
            entry["round"], model.state_dict(), server_optimizer.state_dict(), prototypes, self.best_value,
            self.history, self.payload, ckpt.rng_state()))
        ckpt.write_json(self.out_dir / ckpt.HISTORY_FILE, self.history)
        return summary

    def load_best(self, model: UR4RecV2MoE) -> torch.Tensor | None:
        model.load_state_dict(ckpt.load_weights(self.out_dir / ckpt.MODEL_FILE))
        model.eval()
        path = self.out_dir / ckpt.BEST_PROTOTYPES_FILE
        return torch.from_numpy(load_npy(path, kind="f", ndim=2)) if path.exists() else None

    def finish(self, final: dict, title: str, extra: dict | None = None) -> dict:
        self.history["final"] = final
        self.history["total_seconds"] = round(sum(r["seconds"] for r in self.history["rounds"]), 2)
        if extra:
            self.history.update(extra)
        ckpt.write_json(self.out_dir / ckpt.HISTORY_FILE, self.history)
        plot_history(self.history, self.out_dir / "validation_curves.png", title)
        return self.history


def round_entry(round_number: int, clients: int, samples: int, losses: dict[str, float], model: UR4RecV2MoE,
                train_seconds: float, dropped: list[int] | tuple = ()) -> dict:
    """A round of train_history.json (the in-process runner's keys)."""
    return {"round": round_number, "clients": int(clients), "samples": int(samples),
            "losses": {k: v / clients for k, v in losses.items()},
            "gate": float(model.gating_weight.detach()), "train_seconds": round(train_seconds, 3),
            "dropped": sorted(int(u) for u in dropped)}
