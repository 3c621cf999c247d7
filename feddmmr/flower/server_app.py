"""The ServerApp: the in-process runner's round loop, over the Grid Message API.

Per round: the same ``sample_clients(num_users, client_fraction, seed, round, clients_per_round)``; the sampled
users grouped by partition; one ``train`` message per node that has sampled users; the nodes'
partial aggregates (each checked by ``check_update``) merged with ``Aggregator.merge`` in partition
order, or, for ``median``/``trimmed_mean``/``clip_norm``, each client's update taken through the
in-process runner's ``UpdateScreen`` (check, clip, robust aggregate); prototypes clustered
from the users' centroids in ascending user order; every ``eval_every`` rounds (and the last)
an ``evaluate`` message to every node, results combined over all users; the best round kept;
at the end the best model scored once on validation and test, both protocols. The run
directory is the in-process runner's (config.json, train_history.json, model.safetensors,
validation_curves.png, resume/). The clients' memories stay on the nodes (no memory_state.npz).

The loop pushes a round's messages at once and pulls replies every ``poll_interval`` seconds
(``Grid.send_and_receive`` sleeps 3 s between pulls in a deployment).

Dropouts: a wave (train, evaluate) uses the replies that arrive within ``round_timeout``; a node
that failed is logged and recorded (``dropped`` in the round entry and the wave), one that timed
out or went offline is lost for the rest of the run. A round stops the run only when fewer than
``min_clients`` sampled clients' updates arrived; evaluation combines the nodes that answered.
With ``secure_aggregation`` the train step is a SecAgg+ round (:mod:`.secure`) over every
reachable node: the server gets the sum of the nodes' updates, not the updates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import flwr
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from ..config import TrainConfig, validate_config
from ..engine.assemble import assemble
from ..engine.loop import Reply, RoundResult, run_rounds
from ..engine.run_dir import RunDir, run_config_payload
from ..models import UR4RecV2MoE
from . import messages as msgs
from . import secure
from .core import Catalogue, combine_results, group_by_partition, path_setting, train_config

log = logging.getLogger("feddmmr.flower")

app = ServerApp()


class NodeError(RuntimeError):
    pass


def _say(text: str) -> None:
    print(text, flush=True)  # the ServerApp's stdout is what `flwr run --stream` shows


def gather(grid: Grid, messages: list[Message], timeout: float, poll: float) -> list[Message | None]:
    """Push ``messages``, pull until every one has a reply or ``timeout`` seconds passed; the replies
    in the order of ``messages`` (None: no reply in time; error replies are returned as they are)."""
    if not messages:
        return []
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages) or any(not i for i in ids):
        raise NodeError(f"the SuperLink accepted {sum(1 for i in ids if i)} of {len(messages)} messages")
    pending = {message_id: index for index, message_id in enumerate(ids)}
    replies: list[Message | None] = [None] * len(ids)
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            index = pending.pop(reply.metadata.reply_to_message_id, None)
            if index is not None:
                replies[index] = reply
        if pending:
            if time.monotonic() > deadline:
                break
            time.sleep(poll)
    return replies


def failure(reply: Message | None, timeout: float) -> tuple[str, bool] | None:
    """Why a reply is unusable (None: usable), and whether its node is gone for good (timed out or
    reported unavailable by the SuperLink) rather than failed once (an exception in its ClientApp)."""
    if reply is None:
        return f"no reply within {timeout:g}s", True
    if reply.has_error():
        return f"error {reply.error.code}: {reply.error.reason}", reply.error.code == ErrorCode.NODE_UNAVAILABLE
    return None


def discover(grid: Grid, wait: float, poll: float) -> tuple[dict[int, int], list[dict]]:
    """Query every node until each partition 0..P-1 has one: ``{partition: node_id}`` and the replies."""
    deadline = time.monotonic() + wait
    known: dict[int, dict] = {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            queries = [Message(RecordDict({msgs.CONFIG: ConfigRecord({})}), dst_node_id=n,
                               message_type=MessageType.QUERY) for n in new]
            timeout = max(deadline - time.monotonic(), 1.0)
            for node, reply in zip(new, gather(grid, queries, timeout, poll)):
                why = failure(reply, timeout)
                if why:
                    raise NodeError(f"node {node} failed on query: {why[0]}")
                known[node] = dict(reply.content[msgs.CONFIG])
        sizes = {int(info["num-partitions"]) for info in known.values()}
        if len(sizes) > 1:
            raise NodeError(f"nodes disagree on num-partitions: {sorted(sizes)}")
        by_partition: dict[int, int] = {}
        for node, info in sorted(known.items()):
            partition = int(info["partition-id"])
            if partition in by_partition:
                raise NodeError(f"nodes {by_partition[partition]} and {node} both serve partition {partition}")
            by_partition[partition] = node
        if sizes and len(by_partition) == next(iter(sizes)):
            infos = [known[by_partition[p]] for p in sorted(by_partition)]
            if len({info["fingerprint"] for info in infos}) > 1:
                raise NodeError("nodes hold different datasets (fingerprints differ); give them the same data")
            return dict(sorted(by_partition.items())), infos
        if time.monotonic() > deadline:
            total = next(iter(sizes)) if sizes else "?"
            raise TimeoutError(f"{len(by_partition)} of {total} partitions connected after {wait:.0f}s")
        time.sleep(max(poll, 0.5))


class Nodes:
    """The nodes of the run (one per partition) and the waves of messages to them. A node that does
    not answer a wave is dropped from it; one that timed out or went offline is *lost* and gets no
    further messages (the run continues without its partition)."""

    def __init__(self, grid: Grid, nodes: dict[int, int], timeout: float, poll: float):
        self.grid, self.nodes, self.timeout, self.poll = grid, nodes, timeout, poll
        self.lost: dict[int, str] = {}  # partition -> why

    def reachable(self, partitions, what: str) -> tuple[dict[int, int], list[dict]]:
        """``{partition: node}`` of the partitions still served, and the dropped ones (lost or offline)."""
        live = set(self.grid.get_node_ids())
        out, dropped = {}, []
        for partition in partitions:
            node = self.nodes[partition]
            if partition not in self.lost and node not in live:
                self.lost[partition] = f"node {node} went offline (no heartbeat), before {what}"
            if partition in self.lost:
                dropped.append(self.drop(partition, f"lost: {self.lost[partition]}", what))
            else:
                out[partition] = node
        return out, dropped

    def drop(self, partition: int, reason: str, what: str) -> dict:
        _say(f"dropped partition {partition} (node {self.nodes[partition]}) in {what}: {reason}")
        return {"partition": int(partition), "node": int(self.nodes[partition]), "reason": reason}

    def wave(self, kind: str, contents: dict[int, RecordDict], group) -> tuple[dict[int, Message], list[dict]]:
        """One message per partition; the usable replies by partition, and the dropped partitions."""
        what = f"{kind} {group}"
        targets, dropped = self.reachable(contents, what)
        messages = [Message(contents[p], dst_node_id=node, message_type=kind, group_id=str(group))
                    for p, node in targets.items()]
        replies = {}
        for partition, reply in zip(targets, gather(self.grid, messages, self.timeout, self.poll)):
            why = failure(reply, self.timeout)
            if why is None:
                replies[partition] = reply
                continue
            reason, gone = why
            if gone:
                self.lost[partition] = f"{reason} in {what}"
            dropped.append(self.drop(partition, reason, what))
        return replies, dropped

    def send_and_receive(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """``Grid.send_and_receive`` for the SecAgg+ workflow, polling every ``poll`` seconds."""
        replies = gather(self.grid, messages, self.timeout if timeout is None else timeout, self.poll)
        return [reply for reply in replies if reply is not None]


class FlowerTransport:
    """The round loop's transport over the Grid: one train message per partition with sampled users
    (or a SecAgg+ round over every reachable node), one evaluate message per node."""

    def __init__(self, nodes: Nodes, config: TrainConfig, catalogue: Catalogue, infos: list[dict],
                 ready_seconds: float, secure_on: bool, clipping: float):
        self.nodes, self.config, self.catalogue = nodes, config, catalogue
        self.num_users, self.partitions = catalogue.num_users, len(nodes.nodes)
        self.secure_on, self.clipping = secure_on, clipping
        self.client_data = {"built": 0, "restored": 0, "cached": 0}
        for info in infos:
            self.client_data[str(info["client-data"])] += 1
        self.waves: list[dict] = [{
            "round": 0, "message": "query", "nodes": self.partitions, "seconds": round(ready_seconds, 3),
            "node_seconds": round(max(float(info["seconds"]) for info in infos), 3),
            "startup_seconds": round(max(float(info["startup-seconds"]) for info in infos), 3)}]

    def note(self, kind: str, round_number, stats: list, seconds: float, dropped: list[dict], **extra) -> None:
        """Record a wave: how many nodes answered, how long it and the slowest node took, who dropped."""
        names = {0: "cached", 1: "restored", 2: "built"}
        for stat in stats:
            self.client_data[names[int(stat["client-data"])]] += 1
        self.waves.append({
            "round": round_number, "message": kind, "nodes": len(stats), "seconds": round(seconds, 3),
            "node_seconds": round(max((float(stat["seconds"]) for stat in stats), default=0.0), 3),
            "startup_seconds": round(max((float(stat["startup-seconds"]) for stat in stats), default=0.0), 3),
            **({"dropped": dropped} if dropped else {}), **extra})

    def train(self, round_number: int, users, global_state: dict[str, torch.Tensor],
              prototypes: torch.Tensor | None, offer) -> RoundResult:
        tick = time.time()
        groups = group_by_partition(users, self.partitions)
        train = self._train_secure if self.secure_on else self._train_plain
        answered, updates, stats, dropped, extra = train(round_number, groups, global_state, prototypes)
        self.note("train", round_number, stats, time.time() - tick, dropped, **extra)
        sources = answered if len(answered) == len(updates) else [None] * len(updates)  # SecAgg+: one sum
        for partition, update in zip(sources, updates):  # in partition order
            source = {"partition": int(partition)} if partition is not None else {"nodes": "SecAgg+ sum"}
            offer(Reply(source, clients=update.each,
                        sums=None if update.each else (update.sums, update.row_weight, update.total),
                        prototypes=update.prototypes, losses=update.losses, samples=update.samples,
                        num_clients=update.clients))
        lost = {u: f"partition {d['partition']} (node {d['node']}): {d['reason']}"
                for d in dropped for u in groups.get(d["partition"], [])}
        return RoundResult(sum(len(groups.get(p, [])) for p in answered), dict(sorted(lost.items())))

    def _train_plain(self, round_number: int, groups: dict[int, list[int]], global_state, prototypes):
        contents = {p: msgs.train_content(global_state, round_number, users, prototypes) for p, users in groups.items()}
        replies, dropped = self.nodes.wave(MessageType.TRAIN, contents, round_number)
        updates = [msgs.content_to_update(replies[p].content) for p in sorted(replies)]  # partition order
        return sorted(replies), updates, [replies[p].content[msgs.STATS] for p in sorted(replies)], dropped, {}

    def _train_secure(self, round_number: int, groups: dict[int, list[int]], global_state, prototypes):
        # every reachable node takes part (with no users it adds zeros): SecAgg+ needs >= 2 of them
        nodes, timeout, clipping = self.nodes, self.nodes.timeout, self.clipping
        targets, dropped = nodes.reachable(range(self.partitions), f"train {round_number}")
        if len(targets) < 2:
            raise NodeError(f"round {round_number}: secure aggregation needs >= 2 reachable nodes, "
                            f"{len(targets)} left; dropped: {dropped}")
        scale = secure.round_scale(groups, int(self.catalogue.stats.get("max_seq_len", 1)))
        extra = {secure.SCALE_KEY: scale, secure.CLIPPING_KEY: clipping}
        contents = {node: msgs.train_content(global_state, round_number, groups.get(p, []), prototypes, extra)
                    for p, node in targets.items()}
        partition_of = {node: p for p, node in targets.items()}
        stages = []
        while True:
            result = secure.secure_round(nodes.send_and_receive, contents, round_number, timeout, clipping)
            stages += result.stages
            if result.total is not None or not result.setup_missing or len(targets) - len(result.setup_missing) < 2:
                break
            # Flower's workflow halts when a node drops before sharing its keys: run again without it
            for node in sorted(result.setup_missing):
                partition = partition_of[node]
                silent = node in result.setup_silent
                reason = "no usable SecAgg+ setup reply" + (f" within {timeout:g}s" if silent else "")
                if silent:
                    nodes.lost[partition] = f"{reason} in train {round_number}"
                dropped.append(nodes.drop(partition, reason, f"train {round_number}"))
                del targets[partition], contents[node]
            _say(f"SecAgg+ halted in round {round_number}; again with partitions {sorted(targets)}")
        answered = sorted(partition_of[node] for node in result.answered)
        reason = "did not complete SecAgg+" + (f" ({'; '.join(result.failures)})" if result.failures else "")
        dropped += [nodes.drop(p, reason, f"train {round_number}") for p in sorted(targets) if p not in answered]
        info = {"secagg": {"stages": stages, "quantization_range": result.quantization_range,
                           "clipping_range": clipping, "scale": scale}}
        if result.total is None:  # no sum: no update arrived
            return [], [], [], dropped, info
        clients = sum(len(groups.get(p, [])) for p in answered)
        layout = secure.Layout.of(global_state, self.config.item_embedding_aggregation)
        update = layout.unpack(result.total, scale, clients)
        update.prototypes = result.prototypes
        return answered, [update], [result.answered[targets[p]] for p in answered], dropped, info

    def evaluate(self, model: UR4RecV2MoE, prototypes: torch.Tensor | None, requests, tag,
                 users=None) -> list[dict]:
        """Every reachable node scores its users; the results of the nodes that answered, combined.
        (``users``: a validation sample, refused on Flower by ``validate_config`` for now.)"""
        tick = time.time()
        state = model.group_state(self.config.transmitted_groups)
        contents = {p: msgs.evaluate_content(state, prototypes, requests) for p in self.nodes.nodes}
        replies, dropped = self.nodes.wave(MessageType.EVALUATE, contents, tag)
        if not replies:
            raise NodeError(f"evaluate {tag}: no node answered; dropped: {dropped}")
        self.note("evaluate", tag, [replies[p].content[msgs.STATS] for p in sorted(replies)], time.time() - tick,
                  dropped)
        per_node = [msgs.content_to_results(replies[p].content) for p in sorted(replies)]
        return [combine_results([results[i] for results in per_node]) for i in range(len(requests))]

    def memory(self) -> None:
        return None  # the clients' memories never leave the nodes

    def summary(self) -> dict:
        lost = [{"partition": p, "node": self.nodes.nodes[p], "reason": why} for p, why in sorted(self.nodes.lost.items())]
        return {"flower": {"nodes": self.partitions, "client_data": self.client_data, "waves": self.waves,
                           "secure_aggregation": self.secure_on, "lost": lost}}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: dict) -> dict:
    """The run: wait for every partition's node, then the one round loop with the nodes as transport."""
    config = train_config(run_config)
    timeout = float(run_config.get("round_timeout", 600.0))
    poll = float(run_config.get("poll_interval", 0.05))
    secure_on = bool(run_config.get("secure_aggregation", False))
    run_dir = RunDir(path_setting("out", run_config) or Path("runs/flower"), bool(run_config.get("resume", False)))

    tick = time.time()
    node_ids, infos = discover(grid, float(run_config.get("node_wait", 120.0)), poll)
    ready_seconds = time.time() - tick
    if secure_on and len(node_ids) < 2:
        raise NodeError("secure aggregation needs at least 2 nodes (with one, the sum is that node's update)")
    first = infos[0]
    catalogue = Catalogue(int(first["num-users"]), int(first["num-items"]), str(first["fingerprint"]),
                          json.loads(first["stats"]))
    validate_config(config, "run config", num_users=catalogue.num_users, transport="flower",
                    secure_aggregation=secure_on)
    _say(f"{len(node_ids)} node(s) ready after {ready_seconds:.1f}s: {catalogue.num_users} users, "
         f"{catalogue.num_items} item indices, data {catalogue.digest}"
         + (" | secure aggregation: SecAgg+" if secure_on else ""))

    # the server only holds, aggregates and saves the global state: on the CPU, whatever `device` the nodes use
    assembly = assemble(config, catalogue, path_setting("features", run_config), path_setting("init", run_config),
                        device="cpu")
    flower = {"nodes": len(node_ids), "partition": "user % nodes", "data_fingerprint": catalogue.digest,
              "secure_aggregation": secure_on}
    run_dir.start(run_config_payload(config, assembly, catalogue.stats, flower=flower,
                                     versions={"flwr": flwr.__version__}))
    memory_seconds = max(float(info["memory-build-seconds"]) for info in infos) if config.use_memory else 0.0
    run_dir.history["memory_build_seconds"] = round(memory_seconds, 2)
    transport = FlowerTransport(Nodes(grid, node_ids, timeout, poll), config, catalogue, infos, ready_seconds,
                                secure_on, float(run_config.get("secagg_clipping_range", 8.0)))
    return run_rounds(config, assembly.model, transport, run_dir, say=_say,
                      title=f"stage {config.stage} ({config.preset}, Flower)")
