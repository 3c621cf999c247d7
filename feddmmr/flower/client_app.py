"""The ClientApp: one node serves a partition of users (``u % num-partitions == partition-id``).

Messages (all built and read in :mod:`.messages`):

* ``query``: build (or restore) the node's clients; reply with the partition and what the
  server needs to know of the data (sizes, fingerprint, statistics) — never interactions.
* ``train``: the global state of the transmitted groups, the round, the node's sampled users
  and the global prototypes -> the users trained in ascending order by one LocalTrainer,
  pre-aggregated (``Aggregator.partial``), plus their prototypes and summed losses. With
  secure aggregation the train messages are SecAgg+ stages (:mod:`.secure`): the mod answers
  three of them itself, and the update goes back as one masked vector.
* ``evaluate``: a global state and prototypes -> the node's users scored by the one
  evaluation loop, one result per requested (split, protocol).

A process keeps what it built in a module-level cache keyed by run and node settings (a
simulation actor serves many messages). The clients' memories also go into the node's
``context.state``, which Flower keeps on the node for the whole run: a process that did not
build them (a deployment starts a new ClientApp process per message) restores them from there.
"""

from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import messages as msgs
from . import secure
from .core import PATH_KEYS, NodeRuntime, node_partition, partition_users, path_setting

MEMORY = "feddmmr.memory"
MEMORY_INFO = "feddmmr.memory-info"

app = ClientApp()

_RUNTIMES: dict[tuple, NodeRuntime] = {}
_HANDLED = 0  # messages this process has handled


def _startup_seconds() -> float:
    """For the first message of a process: seconds from process start to the handler (imports included)."""
    global _HANDLED
    _HANDLED += 1
    if _HANDLED > 1:
        return 0.0
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _runtime(context: Context) -> NodeRuntime:
    """This process's runtime for the context's run and node data: one for every node it serves from the
    whole dataset (a simulation actor), one per partition when each node reads its own partition file."""
    data = path_setting("data", context.run_config, context.node_config)
    key = (context.run_id, json.dumps(dict(context.run_config), sort_keys=True, default=str),
           json.dumps({k: str(context.node_config.get(k, "")) for k in PATH_KEYS}, sort_keys=True),
           node_partition(data, context.node_config) if data is not None else None)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one run per process at a time
        _RUNTIMES[key] = NodeRuntime.create(context.run_config, context.node_config)
    return _RUNTIMES[key]


def _node(context: Context) -> tuple[NodeRuntime, np.ndarray, str]:
    """The runtime, this node's users, and how their client data was obtained (cached/restored/built)."""
    runtime = _runtime(context)
    partition = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    users = partition_users(runtime.data.num_users, partition, num_partitions)
    saved = signature = None
    if MEMORY in context.state and MEMORY_INFO in context.state:
        saved = msgs.record_to_arrays(context.state[MEMORY])
        signature = str(context.state[MEMORY_INFO]["signature"])
    how, to_save = runtime.ensure_clients(users, saved, signature)
    if to_save is not None:
        _save(context, runtime, to_save)
    return runtime, users, how


def _save(context: Context, runtime: NodeRuntime, arrays: dict) -> None:
    context.state[MEMORY] = msgs.arrays_to_record(arrays)
    context.state[MEMORY_INFO] = ConfigRecord({"signature": runtime.memory_signature(),
                                               "users": int(len(arrays.get("users", [])))})


def _keep_eval_memory(context: Context, runtime: NodeRuntime, users: np.ndarray) -> None:
    """Clients built on demand: save the evaluation memories built so far when there are new ones."""
    arrays = runtime.saved_eval_memory(users)
    saved = int(context.state[MEMORY_INFO]["users"]) if MEMORY_INFO in context.state else 0
    if arrays is not None and len(arrays["users"]) > saved:
        _save(context, runtime, arrays)


def _stats(how: str, tick: float, startup: float) -> dict:
    """A reply's statistics: how the client data was had, handler and start-up seconds, the process's peak RSS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"client-data": _SOURCE[how], "seconds": time.time() - tick, "startup-seconds": startup,
            "peak-rss-mb": float(peak)}


_SOURCE = {"cached": 0, "restored": 1, "built": 2, "on-demand": 3}


@app.query()
def query(msg: Message, context: Context) -> Message:
    startup, tick = _startup_seconds(), time.time()
    runtime, users, how = _node(context)
    data = runtime.data
    reply = ConfigRecord({
        "partition-id": int(context.node_config["partition-id"]),
        "num-partitions": int(context.node_config["num-partitions"]),
        "num-users": int(data.num_users), "num-items": int(data.num_items), "fingerprint": data.fingerprint(),
        "stats": json.dumps(data.stats()), "users": int(len(users)), "client-data": how,
        "memory-build-seconds": float(runtime.build_seconds), "seconds": time.time() - tick,
        "startup-seconds": startup, "peak-rss-mb": _stats(how, tick, startup)["peak-rss-mb"],
    })
    return Message(RecordDict({msgs.CONFIG: reply}), reply_to=msg)


@app.train(mods=[secure.secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    startup, tick = _startup_seconds(), time.time()
    runtime, users, how = _node(context)
    config = msg.content[msgs.CONFIG]
    sampled = [int(u) for u in config["users"]]
    foreign = sorted(set(sampled) - set(users.tolist()))
    if foreign:
        raise ValueError(f"users {foreign[:5]} are not in partition {context.node_config['partition-id']}")
    global_state = msgs.record_to_state(msg.content[msgs.GLOBAL])
    update = runtime.train(sampled, global_state, int(config["round"]), msgs.record_to_prototypes(msg.content))
    _keep_eval_memory(context, runtime, users)
    stats = _stats(how, tick, startup)
    if secure.SCALE_KEY in config:  # SecAgg+: one vector, masked by the mod; only stats and prototypes in the clear
        layout = secure.Layout.of(global_state, runtime.config.item_embedding_aggregation)
        vector = layout.pack(update, float(config[secure.SCALE_KEY]), float(config[secure.CLIPPING_KEY]))
        return Message(secure.secure_reply(vector, update.prototypes, stats), reply_to=msg)
    return Message(msgs.update_to_content(update, stats), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    startup, tick = _startup_seconds(), time.time()
    runtime, users, how = _node(context)
    wanted = msgs.content_to_users(msg.content)  # a validation sample's users of this partition, or all
    if wanted is not None:
        foreign = sorted(set(wanted.tolist()) - set(users.tolist()))
        if foreign:
            raise ValueError(f"users {foreign[:5]} are not in partition {context.node_config['partition-id']}")
        users = wanted
    results = runtime.evaluate_users(users, msgs.record_to_state(msg.content[msgs.GLOBAL]),
                                     msgs.record_to_prototypes(msg.content), msgs.content_to_requests(msg.content))
    _keep_eval_memory(context, runtime, partition_users(runtime.data.num_users,
                                                        int(context.node_config["partition-id"]),
                                                        int(context.node_config["num-partitions"])))
    content = msgs.results_to_content(results)
    content[msgs.STATS] = MetricRecord(_stats(how, tick, startup))
    return Message(content, reply_to=msg)
