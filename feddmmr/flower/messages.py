"""Conversions between the core's values and Flower records (exact: numpy ``.npy`` bytes, no pickle).

* a state dict (``name -> tensor``) <-> ``ArrayRecord`` (dtypes kept: float32 weights stay
  float32, the float64 partial sums stay float64);
* a node's partial aggregate (``Aggregator.partial()`` + its users' prototypes and losses)
  <-> a reply ``RecordDict``; or, for robust aggregation and clipping, each client's state
  (stacked per key, float32 as trained) with its user and sample count;
* evaluation results <-> ``ConfigRecord`` (JSON text: floats round-trip exactly).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .core import NodeUpdate

# record names in message contents
GLOBAL = "global"  # the global state of the transmitted groups
PROTOTYPES = "prototypes"  # global prototypes (server -> node) or the users' centroids (node -> server)
CONFIG = "config"
SUMS = "sums"
ROW_WEIGHT = "row-weight"
STATS = "stats"
RESULTS = "results"
EACH = "each"  # each client's state, stacked per key (robust aggregation / clipping)
EACH_INFO = "each-info"  # their users and sample counts, in the stacking order
LOSS_PREFIX = "loss."


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    # np.asarray, not np.ascontiguousarray: the latter turns a 0-d array (the gate) into shape (1,)
    return ArrayRecord({key: Array.from_numpy_ndarray(np.asarray(value)) for key, value in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in record.items()}


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as an ArrayRecord (each tensor's dtype and shape kept exactly)."""
    return arrays_to_record({key: value.detach().cpu().contiguous().numpy() for key, value in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in record_to_arrays(record).items()}


def pack_user_arrays(pairs: list[tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """``[(user, array [k_u, D])]`` -> ``users``, ``offsets``, ``values`` (rows concatenated)."""
    if not pairs:
        return {}
    values = [np.asarray(v, dtype=np.float32) for _, v in pairs]
    return {"users": np.asarray([u for u, _ in pairs], dtype=np.int64),
            "offsets": np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64),
            "values": np.concatenate(values)}


def unpack_user_arrays(arrays: Mapping[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    if not arrays:
        return []
    offsets = arrays["offsets"]
    return [(int(u), arrays["values"][offsets[i]:offsets[i + 1]]) for i, u in enumerate(arrays["users"])]


def prototypes_to_record(prototypes: torch.Tensor) -> ArrayRecord:
    return arrays_to_record({"centers": prototypes.detach().cpu().numpy()})


def record_to_prototypes(content: RecordDict) -> torch.Tensor | None:
    if PROTOTYPES not in content:
        return None
    return torch.from_numpy(content[PROTOTYPES]["centers"].numpy())


# --------------------------------------------------------------------------- train

def train_content(global_state: Mapping[str, torch.Tensor], round_number: int, users: list[int],
                  prototypes: torch.Tensor | None, extra: Mapping[str, float] | None = None) -> RecordDict:
    """A node's train message; ``extra`` config entries (e.g. the SecAgg+ scale) go into its config record."""
    content = RecordDict({GLOBAL: state_to_record(global_state),
                          CONFIG: ConfigRecord({"round": int(round_number), "users": [int(u) for u in users],
                                                **(extra or {})})})
    if prototypes is not None:
        content[PROTOTYPES] = prototypes_to_record(prototypes)
    return content


def update_to_content(update: NodeUpdate, extra: Mapping[str, float] | None = None) -> RecordDict:
    """A node's reply: float64 sums (+ per-row weights), total, samples, loss sums, prototypes."""
    stats = {"total": float(update.total), "samples": int(update.samples), "clients": int(update.clients)}
    stats.update({LOSS_PREFIX + key: float(value) for key, value in update.losses.items()})
    stats.update(extra or {})
    content = RecordDict({SUMS: state_to_record(update.sums), STATS: MetricRecord(stats)})
    if update.row_weight is not None:
        content[ROW_WEIGHT] = arrays_to_record({"weight": update.row_weight.numpy()})
    if update.prototypes:
        content[PROTOTYPES] = arrays_to_record(pack_user_arrays(update.prototypes))
    if update.each:
        states = [state for _, state, _ in update.each]
        content[EACH] = state_to_record({key: torch.stack([state[key] for state in states]) for key in states[0]})
        content[EACH_INFO] = ConfigRecord({"users": [int(u) for u, _, _ in update.each],
                                           "samples": [int(n) for _, _, n in update.each]})
    return content


def content_to_update(content: RecordDict) -> NodeUpdate:
    stats = content[STATS]
    row_weight = torch.from_numpy(content[ROW_WEIGHT]["weight"].numpy()) if ROW_WEIGHT in content else None
    prototypes = unpack_user_arrays(record_to_arrays(content[PROTOTYPES])) if PROTOTYPES in content else []
    losses = {key[len(LOSS_PREFIX):]: float(value) for key, value in stats.items() if key.startswith(LOSS_PREFIX)}
    each = []
    if EACH in content:
        stacked, info = record_to_state(content[EACH]), content[EACH_INFO]
        sizes = {len(info["users"]), len(info["samples"])} | {len(value) for value in stacked.values()}
        if len(sizes) != 1:
            raise ValueError(f"a reply's per-client updates disagree in count: {len(info['users'])} users, "
                             f"{len(info['samples'])} sample counts, stacked sizes {sorted(sizes)}")
        each = [(int(user), {key: value[i] for key, value in stacked.items()}, int(count))
                for i, (user, count) in enumerate(zip(info["users"], info["samples"]))]
    return NodeUpdate(record_to_state(content[SUMS]), row_weight, float(stats["total"]), prototypes, losses,
                      int(stats["samples"]), int(stats["clients"]), each)


# --------------------------------------------------------------------------- evaluate

def evaluate_content(global_state: Mapping[str, torch.Tensor], prototypes: torch.Tensor | None,
                     requests: list[tuple[str, str, int]], users: list[int] | None = None) -> RecordDict:
    """A node's evaluate message: score its users (or ``users``, e.g. its share of a validation sample)."""
    config = {"splits": [r[0] for r in requests], "protocols": [r[1] for r in requests],
              "batch-sizes": [int(r[2]) for r in requests]}
    if users is not None:
        config["users"] = [int(u) for u in users]
    content = RecordDict({GLOBAL: state_to_record(global_state), CONFIG: ConfigRecord(config)})
    if prototypes is not None:
        content[PROTOTYPES] = prototypes_to_record(prototypes)
    return content


def content_to_users(content: RecordDict) -> np.ndarray | None:
    """The users an evaluate message names (ascending), or None: all of the node's users."""
    config = content[CONFIG]
    if "users" not in config:
        return None
    return np.asarray(sorted(int(u) for u in config["users"]), dtype=np.int64)


def content_to_requests(content: RecordDict) -> list[tuple[str, str, int]]:
    config = content[CONFIG]
    return list(zip(config["splits"], config["protocols"], [int(b) for b in config["batch-sizes"]]))


def results_to_content(results: list[dict]) -> RecordDict:
    return RecordDict({RESULTS: ConfigRecord({"json": [json.dumps(r) for r in results]})})


def content_to_results(content: RecordDict) -> list[dict]:
    return [json.loads(text) for text in content[RESULTS]["json"]]
