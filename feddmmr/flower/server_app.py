"""The ServerApp: the in-process runner's round loop, over the Grid Message API.

Per round: the same ``sample_clients(num_users, client_fraction, seed, round)``; the sampled
users grouped by partition; one ``train`` message per node that has sampled users; the nodes'
partial aggregates merged with ``Aggregator.merge`` in partition order; prototypes clustered
from the users' centroids in ascending user order; every ``eval_every`` rounds (and the last)
an ``evaluate`` message to every node, results combined over all users; the best round kept;
at the end the best model scored once on validation and test, both protocols. The run
directory is the in-process runner's (config.json, train_history.json, model.safetensors,
validation_curves.png, resume/). The clients' memories stay on the nodes (no memory_state.npz).

The loop pushes a round's messages at once and pulls replies every ``poll_interval`` seconds
(``Grid.send_and_receive`` sleeps 3 s between pulls in a deployment).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import flwr
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..evaluation import format_metrics
from ..federation.server import Aggregator, sample_clients
from ..runner import make_server_optimizer, setup
from . import messages as msgs
from .core import (VALIDATION_BATCH, Catalogue, RunRecord, combine_results, final_requests, group_by_partition,
                   load_state, merge_prototypes, path_setting, round_entry, run_config_payload, train_config)

log = logging.getLogger("feddmmr.flower")

app = ServerApp()


class NodeError(RuntimeError):
    pass


def _say(text: str) -> None:
    print(text, flush=True)  # the ServerApp's stdout is what `flwr run --stream` shows


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float) -> list[Message]:
    """Push ``messages``, pull until every one has a reply; replies in the order of ``messages``."""
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
                raise TimeoutError(f"{len(pending)} of {len(ids)} nodes did not reply within {timeout:.0f}s")
            time.sleep(poll)
    for message, reply in zip(messages, replies):
        if reply.has_error():
            raise NodeError(f"node {message.metadata.dst_node_id} failed on {message.metadata.message_type}: "
                            f"{reply.error.reason}")
    return replies


def discover(grid: Grid, wait: float, timeout: float, poll: float) -> tuple[dict[int, int], list[dict]]:
    """Query every node until each partition 0..P-1 has one: ``{partition: node_id}`` and the replies."""
    deadline = time.monotonic() + wait
    known: dict[int, dict] = {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in known]
        if new:
            queries = [Message(RecordDict({msgs.CONFIG: ConfigRecord({})}), dst_node_id=n,
                               message_type=MessageType.QUERY) for n in new]
            for node, reply in zip(new, exchange(grid, queries, timeout, poll)):
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


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: dict) -> dict:
    config = train_config(run_config)
    timeout = float(run_config.get("message_timeout", 3600.0))
    poll = float(run_config.get("poll_interval", 0.05))
    out_dir = path_setting("out", run_config) or Path("runs/flower")
    record = RunRecord(out_dir, bool(run_config.get("resume", False)))

    tick = time.time()
    nodes, infos = discover(grid, float(run_config.get("node_wait", 120.0)), timeout, poll)
    ready_seconds = time.time() - tick
    num_partitions = len(nodes)
    first = infos[0]
    catalogue = Catalogue(int(first["num-users"]), int(first["num-items"]), str(first["fingerprint"]),
                          json.loads(first["stats"]))
    _say(f"{num_partitions} node(s) ready after {ready_seconds:.1f}s: {catalogue.num_users} users, "
         f"{catalogue.num_items} item indices, data {catalogue.fingerprint}")

    fed = setup(config, catalogue, path_setting("features", run_config), path_setting("init", run_config))
    model = fed.model
    memory_seconds = max(float(info["memory-build-seconds"]) for info in infos) if config.use_memory else 0.0
    flower = {"version": flwr.__version__, "nodes": num_partitions,
              "partition": "user % nodes", "data_fingerprint": catalogue.fingerprint}
    record.start(run_config_payload(config, fed, catalogue.stats, flower), memory_seconds)
    server_optimizer = make_server_optimizer(config)
    start_round, prototypes = record.restore(model, server_optimizer)
    global_state = model.group_state(config.transmitted_groups)
    client_data = {"built": 0, "restored": 0, "cached": 0}
    names = {0: "cached", 1: "restored", 2: "built"}
    waves: list[dict] = [{"round": 0, "message": "query", "nodes": num_partitions, "seconds": round(ready_seconds, 3),
                          "node_seconds": round(max(float(info["seconds"]) for info in infos), 3),
                          "startup_seconds": round(max(float(info["startup-seconds"]) for info in infos), 3)}]
    for info in infos:
        client_data[str(info["client-data"])] += 1

    def note(kind: str, round_number, replies: list[Message], seconds: float) -> None:
        stats = [reply.content[msgs.STATS] for reply in replies]
        for stat in stats:
            client_data[names[int(stat["client-data"])]] += 1
        waves.append({"round": round_number, "message": kind, "nodes": len(replies), "seconds": round(seconds, 3),
                      "node_seconds": round(max(float(stat["seconds"]) for stat in stats), 3),
                      "startup_seconds": round(max(float(stat["startup-seconds"]) for stat in stats), 3)})

    def evaluate_all(state, protos, requests, group) -> list[dict]:
        tick = time.time()
        messages = [Message(msgs.evaluate_content(state, protos, requests), dst_node_id=node,
                            message_type=MessageType.EVALUATE, group_id=f"{group}") for node in nodes.values()]
        replies = exchange(grid, messages, timeout, poll)
        note("evaluate", group, replies, time.time() - tick)
        per_node = [msgs.content_to_results(reply.content) for reply in replies]
        return [combine_results([results[i] for results in per_node]) for i in range(len(requests))]

    for round_number in range(start_round, config.num_rounds + 1):
        tick = time.time()
        selected = sample_clients(catalogue.num_users, config.client_fraction, config.seed, round_number)
        groups = group_by_partition(selected, num_partitions)
        messages = [Message(msgs.train_content(global_state, round_number, users, prototypes),
                            dst_node_id=nodes[partition], message_type=MessageType.TRAIN, group_id=str(round_number))
                    for partition, users in groups.items()]
        replies = exchange(grid, messages, timeout, poll)
        aggregator = Aggregator(global_state, config.item_embedding_aggregation)
        received, losses, samples = [], {}, 0
        for reply in replies:  # partition order
            update = msgs.content_to_update(reply.content)
            aggregator.merge(update.sums, update.row_weight, update.total)
            received += update.prototypes
            samples += update.samples
            for key, value in update.losses.items():
                losses[key] = losses.get(key, 0.0) + value
        note("train", round_number, replies, time.time() - tick)
        global_state = server_optimizer.step(global_state, aggregator.result())
        load_state(model, global_state)
        prototypes = merge_prototypes(config, received, round_number, prototypes)
        train_seconds = time.time() - tick
        entry = round_entry(round_number, len(selected), samples, losses, model, train_seconds)
        seconds = train_seconds
        if round_number % config.eval_every == 0 or round_number == config.num_rounds:
            tick = time.time()
            model.eval()
            result = evaluate_all(global_state, prototypes, [("val", config.eval_protocol, VALIDATION_BATCH)],
                                  round_number)[0]
            record.validated(entry, result, time.time() - tick, model, prototypes)
            seconds += time.time() - tick
        _say(record.end_round(entry, config.num_rounds, model, prototypes, server_optimizer, seconds))

    best_prototypes = record.load_best(model)
    requests = final_requests()
    results = evaluate_all(model.group_state(config.transmitted_groups), best_prototypes, requests, "final")
    final = {f"{split}_{protocol}": result for (split, protocol, _), result in zip(requests, results)}
    history = record.finish(final, f"stage {config.stage} ({config.preset}, Flower)",
                            {"flower": {"nodes": num_partitions, "client_data": client_data, "waves": waves}})
    for key in ("test_sampled", "test_full"):
        _say(f"best round {history['best_round']} " + format_metrics(final[key]))
    return history
