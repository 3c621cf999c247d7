"""SecAgg+ for the nodes' updates: the server learns the sum over the nodes, never one node's update.

Flower's ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (ClientApp) run the protocol in
four message waves per round: *setup* (each node makes key pairs, sends public keys), *share
keys* (each node sends encrypted Shamir shares of its secrets to the others, through the
server), *collect masked vectors* (the train step runs; its update, quantized to integers, goes
back with pairwise and private masks added) and *unmask* (the nodes send the shares that remove
the masks of the nodes that answered, and of the ones that dropped out). The masks cancel only in
the sum, so the server sees one integer vector per node that looks random, and the sum.

A node sends **one flat vector** (:class:`Layout`): its partial aggregate (the float64 weighted
sums of the transmitted groups, the per-row weights of the item embedding), its sample total,
sample count and loss sums, all divided by a public ``scale`` the server picks per round
(``max users at a node x the longest sequence`` >= any node's sample total, so every entry is
bounded by the largest parameter magnitude). Every node weighs 1 in Flower's weighted average
(``max_weight = 1``, ``num_examples = 1``: exact), so ``average x nodes x scale`` is the plain
sum, the same numbers ``Aggregator.merge`` adds in the clear: FedAvg is preserved up to the
quantization error (``2 x clipping_range / quantization_range`` per entry and node, stochastic
rounding; sample totals and row weights are integers and are rounded back exactly).

What travels in the clear (see docs/flower.md): per node, its wall/start-up seconds and how it
got its client data; with prototypes enabled, the users' prototype centroids (the algorithm's
abstract memory is clustered by k-means on the server, which needs the points, not their sum).
Robust aggregators (median, trimmed mean) and server-side clipping need the individual updates and are refused.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..federation.server import ITEM_EMBEDDING_KEY
from .core import NodeUpdate

# The losses a client reports (LocalTrainer metrics); the vector has a slot for each, in this order.
LOSS_NAMES = ("next_item", "load_balance", "contrastive", "router_visual", "router_semantic")
LOSS_HEADROOM = 16.0  # losses are divided by scale x this: a loss sum may exceed the parameters' range
MODULUS = 2 ** 32  # SecAgg+ mask arithmetic (Flower's maximum)
SCALE_KEY, CLIPPING_KEY = "secure-scale", "secure-clipping"  # in a train message's config record
CLEAR_PROTOTYPES = "prototypes-clear"  # a ConfigRecord: SecAgg+ clears every ArrayRecord of the reply


def quantization_range(nodes: int) -> int:
    """The largest power of two R with ``nodes x R < 2**32``: the sum of the nodes' quantized entries
    (each in [0, R]) must not wrap around the modulus. A power of two keeps exact zeros exact."""
    return 2 ** int(math.floor(math.log2((MODULUS - 1) / max(nodes, 1))))


def round_scale(users_per_node: Mapping[int, list[int]], max_seq_len: int) -> float:
    """A public bound on any node's sample total this round (a user has fewer targets than interactions)."""
    return float(max(max((len(u) for u in users_per_node.values()), default=1), 1) * max(int(max_seq_len), 1))


@dataclass(frozen=True)
class Layout:
    """Where each part of a node's update sits in the one flat vector SecAgg+ sums."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    row_weights: int  # rows of the item embedding with per-row weights (0: plain FedAvg)

    @classmethod
    def of(cls, global_state: Mapping[str, torch.Tensor], item_embedding_aggregation: str) -> "Layout":
        keys = tuple(sorted(global_state))
        rows = 0
        if item_embedding_aggregation == "updated_rows" and ITEM_EMBEDDING_KEY in global_state:
            rows = int(global_state[ITEM_EMBEDDING_KEY].shape[0])
        return cls(keys, tuple(tuple(global_state[k].shape) for k in keys), rows)

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes) + self.row_weights + 2 + len(LOSS_NAMES)

    def pack(self, update: NodeUpdate, scale: float, clipping: float) -> np.ndarray:
        """The node's update as one float64 vector, every entry scaled into [-clipping, clipping]."""
        unknown = sorted(set(update.losses) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"SecAgg+: losses {unknown} have no slot; add them to LOSS_NAMES in {__name__}")
        parts = []
        for key, shape in zip(self.keys, self.shapes):
            value = update.sums.get(key)
            parts.append(np.zeros(math.prod(shape)) if value is None else value.double().numpy().reshape(-1))
        if self.row_weights:
            rows = update.row_weight
            parts.append(np.zeros(self.row_weights) if rows is None else rows.double().numpy().reshape(-1))
        vector = np.concatenate(parts + [np.array([update.total, update.samples], dtype=np.float64)]) / scale
        losses = np.array([update.losses.get(name, 0.0) for name in LOSS_NAMES]) / (scale * LOSS_HEADROOM)
        vector = np.concatenate([vector, losses])
        if vector.size != self.size:
            raise ValueError(f"SecAgg+: the update has {vector.size} entries, the layout {self.size}")
        peak = float(np.max(np.abs(vector))) if vector.size else 0.0
        if not np.isfinite(peak) or peak > clipping:
            raise ValueError(f"SecAgg+: a scaled update entry reaches {peak:.4g}, outside the clipping range "
                             f"+-{clipping}; raise secagg_clipping_range (run config)")
        return vector

    def unpack(self, vector: np.ndarray, scale: float, clients: int) -> NodeUpdate:
        """The summed vector back into a partial aggregate (what ``Aggregator.merge`` takes)."""
        vector = np.asarray(vector, dtype=np.float64).reshape(-1)
        if vector.size != self.size:
            raise ValueError(f"SecAgg+: the sum has {vector.size} entries, the layout {self.size}")
        sums, at = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            count = math.prod(shape)
            sums[key] = torch.from_numpy(vector[at:at + count] * scale).reshape(shape)
            at += count
        row_weight = None
        if self.row_weights:  # integer sample counts: round away the quantization noise
            row_weight = torch.from_numpy(np.rint(vector[at:at + self.row_weights] * scale))
            at += self.row_weights
        total, samples = np.rint(vector[at:at + 2] * scale)
        losses = dict(zip(LOSS_NAMES, (vector[at + 2:] * scale * LOSS_HEADROOM).tolist()))
        return NodeUpdate(sums, row_weight, float(total), [], losses, int(samples), int(clients))


# --------------------------------------------------------------------------- records

def prototypes_to_config(pairs: list[tuple[int, np.ndarray]]) -> ConfigRecord:
    """Users' centroids as a ConfigRecord (the SecAgg+ mod empties the reply's ArrayRecords)."""
    buffer = io.BytesIO()
    values = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in pairs]) if pairs else np.zeros((0, 0))
    np.save(buffer, values, allow_pickle=False)
    offsets = np.concatenate([[0], np.cumsum([len(v) for _, v in pairs])]).astype(int).tolist()
    return ConfigRecord({"users": [int(u) for u, _ in pairs], "offsets": offsets, "values": buffer.getvalue()})


def config_to_prototypes(record: ConfigRecord) -> list[tuple[int, np.ndarray]]:
    values = np.load(io.BytesIO(record["values"]), allow_pickle=False)
    offsets = list(record["offsets"])
    return [(int(u), values[offsets[i]:offsets[i + 1]]) for i, u in enumerate(record["users"])]


def secure_reply(vector: np.ndarray, prototypes: list[tuple[int, np.ndarray]],
                 stats: Mapping[str, float]) -> RecordDict:
    """A node's train reply under SecAgg+: the vector in Flower's FitRes layout (the mod masks it),
    weight 1; the clear part: ``stats`` and the prototypes."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), 1, dict(stats))
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    if prototypes:
        content[CLEAR_PROTOTYPES] = prototypes_to_config(prototypes)
    return content


def secure_aggregation_mod(msg: Message, context: Context, call_next):
    """ClientApp mod: train messages of the SecAgg+ protocol go through Flower's ``secaggplus_mod``
    (which calls the train handler in its masked-vector stage); anything else passes through."""
    if RECORD_KEY_CONFIGS in msg.content:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


# --------------------------------------------------------------------------- server

class _Proxy:
    """What the workflow needs of a legacy ClientProxy: the node id."""

    def __init__(self, node_id: int):
        self.node_id = node_id


class _OneRound:
    """The legacy-strategy hooks the workflow calls: the round's nodes, and what it hands back."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes
        self.results: list[tuple[_Proxy, FitRes]] | None = None
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(node), FitIns(Parameters([], ""), {})) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with our own train message per node (instead of a legacy FitIns)."""

    def __init__(self, contents: Mapping[int, RecordDict], **kwargs):
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {node: self.contents[node] for node in state.nid_to_fitins}
        # a node that misses the setup stage makes the unmask stage fail later (its neighbours hold no
        # share of its key): halt now, before any training; the caller runs again without it
        return ok and state.active_node_ids == set(self.contents)


class _Stages:
    """The grid as the workflow sees it: each stage's messages go through ``send_and_receive`` (our
    fast-polling exchange, not ``Grid.send_and_receive``'s 3 s sleeps); records the stages and keeps
    the prototypes the nodes sent in the clear with their masked vectors."""

    def __init__(self, send_and_receive: Callable[[list[Message], float | None], list[Message]]):
        self.send_and_receive_fn = send_and_receive
        self.stages: list[dict] = []
        self.prototypes: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.setup_missing: set[int] = set()  # nodes without a usable reply to the setup stage
        self.setup_silent: set[int] = set()  # ... of which no reply at all (gone)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = str(messages[0].content[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "none"
        tick = time.time()
        replies = self.send_and_receive_fn(messages, timeout)
        answered = {r.metadata.src_node_id for r in replies if not r.has_error()}
        silent = {m.metadata.dst_node_id for m in messages} - {r.metadata.src_node_id for r in replies}
        self.stages.append({"stage": stage, "sent": len(messages), "answered": len(answered),
                            "seconds": round(time.time() - tick, 3)})
        if stage == Stage.SETUP:
            self.setup_missing = {m.metadata.dst_node_id for m in messages} - answered
            self.setup_silent = silent
        for reply in replies:
            if not reply.has_error() and CLEAR_PROTOTYPES in reply.content:
                self.prototypes[reply.metadata.src_node_id] = config_to_prototypes(reply.content[CLEAR_PROTOTYPES])
        return replies


@dataclass
class SecureRound:
    total: np.ndarray | None  # the summed vector (None: the protocol halted)
    answered: dict[int, dict]  # node -> its clear stats
    prototypes: list[tuple[int, np.ndarray]]  # the answered nodes' users' centroids (clear)
    failures: list[str]
    stages: list[dict]  # per SecAgg+ stage: messages sent, answered, seconds
    quantization_range: int
    setup_missing: set[int] = field(default_factory=set)  # Flower's workflow halts when a node drops at setup
    setup_silent: set[int] = field(default_factory=set)


def secure_round(send_and_receive: Callable[[list[Message], float | None], list[Message]],
                 contents: Mapping[int, RecordDict], round_number: int, timeout: float,
                 clipping: float) -> SecureRound:
    """Run SecAgg+ over ``contents`` (node -> its train message content): the sum of the vectors of
    the nodes that completed the protocol, their clear stats and prototypes, the stages, what failed."""
    nodes = sorted(contents)
    strategy = _OneRound(nodes)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_number)}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    levels = quantization_range(len(nodes))
    workflow = _Workflow(contents, num_shares=1.0, reconstruction_threshold=0.5, max_weight=1.0,
                         clipping_range=float(clipping), quantization_range=levels, modulus_range=MODULUS,
                         timeout=timeout)
    grid = _Stages(send_and_receive)
    workflow(grid, context)
    failures = [str(f) for f in strategy.failures]
    if not strategy.results:
        return SecureRound(None, {}, [], failures, grid.stages, levels, grid.setup_missing, grid.setup_silent)
    average = parameters_to_ndarrays(strategy.results[0][1].parameters)[0]
    answered = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in strategy.results}
    prototypes = [pair for node in sorted(answered) for pair in grid.prototypes.get(node, [])]
    # Flower's average over the answering nodes (all of weight 1) times their number: the sum
    total = np.asarray(average, dtype=np.float64) * len(strategy.results)
    return SecureRound(total, answered, prototypes, failures, grid.stages, levels)
