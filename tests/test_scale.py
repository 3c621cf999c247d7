"""Costs that grow with the work: clients built when sampled, validation on a sample of users.

Both are exact where they claim to be: a run whose clients are built on demand is the run whose
clients are all held, bit for bit; a sampled validation scores exactly the sampled users; an
evaluation memory built alone is the one a whole client carries. On Flower (the real ServerApp
loop and ClientApp through :class:`tests.flowertools.LocalGrid`) both settings give the
in-process model, and a node keeps only its own partition's evaluation memories.
"""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from feddmmr import evaluation
from feddmmr.config import ConfigError
from feddmmr.data.parsing import DataError
from feddmmr.data.partitions import write_partitions
from feddmmr.engine.assemble import LocalClients, assemble
from feddmmr.engine.loop import validation_sample
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.client import build_eval_memory
from feddmmr.flower import client_app, core, deploy
from feddmmr.flower import messages as msgs
from feddmmr.flower.server_app import run_server
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features
from .flowertools import LocalGrid
from .test_flower import as_run_config


def _model_bytes(run_dir) -> bytes:
    return (run_dir / ckpt.MODEL_FILE).read_bytes()


def test_clients_built_on_demand_train_the_same_model_as_resident_clients(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    for stage, init in ((1, None), (3, tmp_path / "s1")):
        runs = {}
        for resident in (True, False):
            out = tmp_path / f"stage{stage}-{resident}"
            history = run_federated(tiny_config(stage, resident_clients=resident), data, out,
                                    features if stage == 3 else None, init, progress=False)
            runs[resident] = (history, out)
        (held, held_dir), (lazy, lazy_dir) = runs[True], runs[False]
        assert _model_bytes(held_dir) == _model_bytes(lazy_dir)
        assert held["final"] == lazy["final"]
        assert [r["losses"] for r in held["rounds"]] == [r["losses"] for r in lazy["rounds"]]
        assert not (lazy_dir / ckpt.MEMORY_FILE).exists()  # nothing of the clients is held to write


def test_validation_on_a_user_sample_scores_those_users_and_the_final_scores_all(tmp_path):
    data = tiny_dataset(tmp_path)
    config = tiny_config(1, eval_users=5)
    history = run_federated(config, data, tmp_path / "run", progress=False)
    assert all(r["val_metrics"]["users"] == 5 for r in history["rounds"])
    assert all(result["users"] == data.num_users for result in history["final"].values())
    sample = validation_sample(config, data.num_users)
    assert len(sample) == 5 and len(set(sample.tolist())) == 5
    assert np.array_equal(sample, validation_sample(config, data.num_users))  # the same users every round
    assert validation_sample(tiny_config(1, eval_users=0), data.num_users) is None
    assert validation_sample(tiny_config(1, eval_users=data.num_users), data.num_users) is None
    saved = json.loads((tmp_path / "run" / ckpt.CONFIG_FILE).read_text())
    assert saved["train"]["eval_users"] == 5


def test_full_ranking_in_item_blocks_gives_the_ranks_of_one_pass(tmp_path):
    """Streaming the catalogue in blocks (with the item-only expert terms computed once) ranks
    every target exactly where scoring the whole catalogue at once does."""
    from feddmmr.engine.assemble import LocalClients, assemble
    from feddmmr.evaluation import evaluate
    import feddmmr.engine.assemble as assemble_module

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    for stage, init in ((1, None), (3, tmp_path / "s1")):
        assembly = assemble(tiny_config(stage), data, features if stage == 3 else None, init)
        local = LocalClients(assembly, assembly.build_clients(), None)
        model = assembly.model.eval()
        for split in ("val", "test"):
            whole = evaluate(assemble_module.memory_scorer(model, assembly.content, local.memory_ids(split), None),
                             data, split, "full", max_len=8)
            original = assemble_module.ITEM_BLOCK
            assemble_module.ITEM_BLOCK = 7  # the scorer's tables too, as for a large catalogue
            try:
                scorer = assemble_module.memory_scorer(model, assembly.content, local.memory_ids(split), None)
            finally:
                assemble_module.ITEM_BLOCK = original
            blocked = evaluate(scorer, data, split, "full", max_len=8, item_block=7)
            assert blocked == whole, (stage, split)


@pytest.mark.parametrize("stage", [1, 3])
def test_a_scoring_batch_put_through_the_model_a_few_users_at_a_time_changes_no_score(tmp_path, stage):
    """With a memory (Stage 3) the evaluation scorer puts a batch through the model about ``pairs``
    (user, candidate) pairs at a time (so a full-ranking batch never holds the experts' activations
    of all its users): every score is the one-call score bit for bit, in one pass over the catalogue
    and in item blocks, so no metric of either protocol depends on it. Without a memory (Stage 1)
    a batch is one call."""
    import feddmmr.engine.assemble as assemble_module
    from feddmmr.evaluation import PROTOCOLS, SCORED_PAIRS, evaluate

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    config = tiny_config(stage)
    assembly = assemble(config, data, features if stage == 3 else None, tmp_path / "s1" if stage == 3 else None)
    local = LocalClients(assembly, assembly.build_clients(), None)
    model = assembly.model.eval()
    # Stage 3: global prototypes join every user's memory, as from round 2 on
    prototypes = torch.nn.functional.normalize(torch.randn(2, 16 + 8), dim=-1) if stage == 3 else None
    users = np.arange(data.num_users)
    fewest, four_users = 1, 4 * data.num_items  # pairs per model call: 6 calls of 2 users, 3 calls of 4
    assert [assemble_module.scoring_calls(len(users), data.num_items, pairs)
            for pairs in (SCORED_PAIRS, four_users, fewest)] == [1, 3, 6]
    for split in ("val", "test"):
        memory = local.memory_ids(split)
        scorer = {pairs: assemble_module.memory_scorer(model, assembly.content, memory, prototypes, pairs=pairs)
                  for pairs in (SCORED_PAIRS, four_users, fewest)}
        seq = torch.from_numpy(data.padded_inputs(split, users, 8))
        calls, score = [], model.score
        model.score = lambda *args, **kwargs: calls.append(len(args[0])) or score(*args, **kwargs)
        try:
            with torch.no_grad():
                whole = scorer[SCORED_PAIRS](users, seq, None)
                assert all(torch.equal(scorer[pairs](users, seq, None), whole) for pairs in (four_users, fewest))
        finally:
            del model.score
        assert calls == ([12, 4, 4, 4] + [2] * 6 if stage == 3 else [12] * 3)
        results = {}
        for protocol in PROTOCOLS:
            first, *others = (evaluate(scorer[pairs], data, split, protocol, max_len=8,
                                             num_negatives=config.eval_negatives) for pairs in scorer)
            assert all(other == first for other in others), (split, protocol)
            results[protocol] = first
        original = assemble_module.ITEM_BLOCK
        assemble_module.ITEM_BLOCK = 7  # in item blocks, as for a large catalogue
        try:
            blocked = [assemble_module.memory_scorer(model, assembly.content, memory, prototypes, pairs=pairs)
                       for pairs in (SCORED_PAIRS, fewest)]
        finally:
            assemble_module.ITEM_BLOCK = original
        first, second = (evaluate(s, data, split, "full", max_len=8, item_block=7) for s in blocked)
        assert first == second == results["full"], split


def test_a_scoring_batch_is_split_evenly_and_never_into_a_call_of_one_user_out_of_several():
    from feddmmr.engine.assemble import scoring_calls

    assert scoring_calls(64, 3953, 8 * 4096) == 8  # ML-1M's full ranking: 8 calls of 8 users
    assert scoring_calls(256, 101, 8 * 4096) == 1  # a sampled batch: one call
    assert scoring_calls(1, 3953, 1) == 1
    for users in range(1, 70):
        for rows in (1, 2, 3, 16):
            calls = scoring_calls(users, 100, rows * 100)
            sizes = np.diff(np.linspace(0, users, calls + 1).round().astype(int))
            assert sizes.sum() == users and (sizes.min() >= 2 or users == 1), (users, rows)
            assert sizes.max() <= max(rows, 2) + 1, (users, rows)


def test_an_evaluation_memory_built_alone_is_the_one_a_built_client_carries(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    assembly = assemble(tiny_config(3), data, features, tmp_path / "s1")
    clients = assembly.build_clients()
    for user, client in clients.items():
        alone = build_eval_memory(data, user, assembly.memory_config, assembly.space)
        assert all(np.array_equal(alone[split], client.eval_memory[split]) for split in ("val", "test")), user
    # clients built on demand build a user's evaluation memory when that user is first scored (or trained)
    local = LocalClients.on_demand(assembly, None)
    assert local.eval_memory_arrays()["users"].tolist() == []
    val = local.memory_ids("val", np.array([3, 5]))
    assert local.eval_memory_arrays()["users"].tolist() == [3, 5]
    assert np.array_equal(val[5], clients[5].eval_memory["val"]) and not val[4].any()
    local.take([4])
    assert local.eval_memory_arrays()["users"].tolist() == [3, 4, 5]
    restored = LocalClients.on_demand(assembly, None)
    restored.load_eval_memory_arrays(local.eval_memory_arrays([4, 5]))
    assert restored.eval_memory_arrays()["users"].tolist() == [4, 5]
    assert np.array_equal(restored.memory_ids("test", np.array([4]))[4], clients[4].eval_memory["test"])


# --------------------------------------------------------------------------- on Flower

@pytest.fixture()
def offline_flower(tmp_path, monkeypatch):
    for key, value in deploy.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))


def _weights(path):
    return ckpt.load_weights(path / ckpt.MODEL_FILE)


@pytest.mark.parametrize("stage, partitioned", [(1, False), (3, False), (1, True), (3, True)])
def test_flower_with_clients_built_on_demand_and_a_validation_sample_gives_the_in_process_model(
        tmp_path, offline_flower, monkeypatch, stage, partitioned):
    """Nodes reading the whole dataset, or each only its own partition file: the in-process model."""
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    keys = {"dropout": 0.0, "resident_clients": False, "eval_users": 5}
    config = tiny_config(stage, **keys)
    init = tmp_path / "s1" if stage == 3 else None
    inproc = run_federated(config, data, tmp_path / "inproc", features if stage == 3 else None, init, progress=False)
    source = write_partitions(data, 3, tmp_path / "parts", None) if partitioned else tmp_path / "data"
    run_config = {**core.default_app_config(), **as_run_config(config), "data": str(source),
                  "out": str(tmp_path / "flower"), "node_wait": 5.0, "cache": str(tmp_path / "node_cache"),
                  **({"features": str(features), "init": str(init)} if stage == 3 else {})}
    grid = LocalGrid(run_config, 3)
    monkeypatch.setattr(evaluation, "_CANDIDATE_CACHE", {})  # what a node process starts with
    history = run_server(grid, run_config)
    a, b = _weights(tmp_path / "inproc"), _weights(tmp_path / "flower")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert history["best_round"] == inproc["best_round"]
    for x, y in zip(inproc["val_metrics"] + [inproc["final"][k] for k in sorted(inproc["final"])],
                    history["val_metrics"] + [history["final"][k] for k in sorted(history["final"])]):
        assert x["users"] == y["users"] and all(abs(x[m] - y[m]) < 1e-9 for m in ("NDCG@10", "HR@10", "MRR"))
    assert [r["val_metrics"]["users"] for r in history["rounds"]] == [5, 5]
    saved = json.loads((tmp_path / "flower" / ckpt.CONFIG_FILE).read_text())
    assert saved["data_fingerprint"] == data.fingerprint() and saved["data"] == data.stats()
    assert all(result["users"] == data.num_users for result in history["final"].values())
    # a validation wave goes only to the nodes holding sampled users (each scores its share); the final one to all
    shares = core.group_by_partition(validation_sample(config, data.num_users), 3)
    assert sum(kind == "evaluate" for _, kind in grid.delivered) == 2 * len(shares) + 3
    # a node keeps its sampled candidates in its partition's cache folder (a later process reads them)
    cached = list((tmp_path / "node_cache").glob("*/candidates_*.npy"))
    assert {p.name.split("_")[2] for p in cached} == {"val", "test"}
    assert all(p.parent.name.startswith("partition-") for p in cached)
    # nothing is built ahead; each node keeps (in context.state) only its own users' evaluation memories
    assert history["flower"]["client_data"]["on-demand"] > 0
    assert history["flower"]["client_data"]["built"] == history["flower"]["client_data"]["restored"] == 0
    for partition in range(3):
        state = grid.contexts[grid.node(partition)].state
        if stage == 1:
            assert client_app.MEMORY not in state
            continue
        saved = msgs.record_to_arrays(state[client_app.MEMORY])
        assert saved["users"].tolist() == core.partition_users(data.num_users, partition, 3).tolist()


def test_a_node_reading_its_partition_file_holds_only_its_users_and_draws_their_candidates(tmp_path):
    """A node given a partition folder reads only its users' sequences; the user indices, fingerprint,
    statistics and candidate universe are the whole dataset's, and so are its users' sampled candidates."""
    data = tiny_dataset(tmp_path, users=30)
    folder = write_partitions(data, 3, tmp_path / "parts", None)
    run_config = {**core.default_app_config(), **as_run_config(tiny_config(1)), "data": str(folder)}
    for partition in range(3):
        node = core.NodeRuntime.create(run_config, {"partition-id": partition, "num-partitions": 3})
        held, users = node.data, core.partition_users(data.num_users, partition, 3)
        assert np.flatnonzero(held.lengths).tolist() == users.tolist()
        assert len(held.items) == int(data.lengths[users].sum()) < len(data.items) // 2
        assert all(np.array_equal(held.sequence(u), data.sequence(u)) for u in users)
        assert (held.num_users, held.num_items, held.fingerprint(), held.stats()) == \
            (data.num_users, data.num_items, data.fingerprint(), data.stats())
        assert np.array_equal(held.occurring_items(), data.occurring_items())
        assert np.array_equal(node.trainer.item_pool.numpy(), data.warm_items())
        for split in ("val", "test"):
            ours = evaluation.sample_candidates(held, split, seed=3, num_negatives=10)
            whole = evaluation.sample_candidates(data, split, seed=3, num_negatives=10)
            assert np.array_equal(ours[users], whole[users]) and not ours[np.setdiff1d(np.arange(30), users)].any()
        assert node.ensure_clients(users)[0] == "built" and sorted(node.clients) == users.tolist()
    # a partition folder must be the node's split of the run's data
    with pytest.raises(DataError, match="written for 3 partitions"):
        core.NodeRuntime.create(run_config, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(DataError, match="top_users"):
        core.NodeRuntime.create({**run_config, "top_users": 20}, {"partition-id": 0, "num-partitions": 3})
    with pytest.raises(ConfigError, match="partition-id"):
        core.NodeRuntime.create(run_config, {})
    (folder / "partition-0.npz").write_bytes((folder / "partition-1.npz").read_bytes())
    with pytest.raises(DataError, match="partition 0's users"):
        core.NodeRuntime.create(run_config, {"partition-id": 0, "num-partitions": 3})


def test_a_new_on_demand_node_process_restores_the_evaluation_memories_from_context_state(tmp_path, offline_flower):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, resident_clients=False, trainable_groups=["item_embedding", "backbone", "projectors",
                                                                     "experts", "router", "gate"])
    first = core.NodeRuntime(config, data, features, None)
    users = core.partition_users(data.num_users, 1, 3)
    assert first.ensure_clients(users) == ("on-demand", None)
    glob = first.assembly.model.group_state(config.transmitted_groups)
    first.evaluate_users(users[:2], glob, None, [("val", "sampled", 64)])
    saved = first.saved_eval_memory(users)
    assert saved["users"].tolist() == users[:2].tolist()
    fresh = core.NodeRuntime(config, data, features, None)
    assert fresh.ensure_clients(users, saved, first.memory_signature()) == ("on-demand", None)
    assert fresh.ensure_eval_memory(users[:2]) == 0  # restored, not rebuilt
    assert fresh.ensure_eval_memory(users) == len(users) - 2
    stale = core.NodeRuntime(config, data, features, None)
    stale.ensure_clients(users, saved, "stale")
    assert stale.ensure_eval_memory(users[:2]) == 2
    # trained on demand: the same update as from held clients
    held = core.NodeRuntime(tiny_config(3, trainable_groups=config.trainable_groups), data, features, None)
    held.ensure_clients(users)
    one, two = fresh.train(users[:3], glob, 1, None), held.train(users[:3], glob, 1, None)
    assert one.total == two.total and all(torch.equal(one.sums[k], two.sums[k]) for k in one.sums)


# --------------------------------------------------------------------------- item rows a client trains

def _sparse_and_dense(tmp_path, config, item_pool=None):
    """A client trainer on the item rows it touches, and the same trainer forced dense."""
    from feddmmr.engine.assemble import assemble as setup
    from feddmmr.federation.client import LocalTrainer, build_clients

    data = tiny_dataset(tmp_path, users=14)
    fed = setup(config, data, None)
    clients = build_clients(data, config.max_seq_len, None, None)
    pool = data.occurring_items() if item_pool is None else item_pool
    sparse = LocalTrainer(fed.model, config, fed.content, pool, client_batch=3)
    dense = LocalTrainer(fed.model, config, fed.content, pool, client_batch=3)
    dense.sparse_rows = False
    return fed, clients, sparse, dense


def _table_rows(trainer) -> list[int]:
    """Spy: the item-table rows every vmapped step of ``trainer`` differentiates."""
    from feddmmr.federation.server import ITEM_EMBEDDING_KEY

    seen, loss = [], trainer._loss

    def spy(params, *batch):
        seen.append(params[ITEM_EMBEDDING_KEY].shape[-2])
        return loss(params, *batch)

    trainer._loss = spy
    return seen


@pytest.mark.parametrize("overrides", [
    dict(),  # Stage 1: sampled softmax, Adam, dropout on
    dict(loss="gbce"),
    dict(update_negative_items=False),
    dict(local_optimizer="sgd", learning_rate=0.5),
    dict(fedprox_mu=0.1, aggregation="fedprox", local_epochs=2),
], ids=["sampled_softmax", "gbce", "own_rows", "sgd", "fedprox"])
def test_a_client_training_only_its_item_rows_gives_the_dense_update_bit_for_bit(tmp_path, overrides):
    """Each client trains only the item rows its inputs, targets and negatives name (a ``[G, R, D]``
    table, R below the catalogue) and sends the same full-size update as training every row: in
    vmapped groups of 3 and 2 clients of different sizes, every tensor is identical."""
    from feddmmr.federation.server import ITEM_EMBEDDING_KEY

    config = tiny_config(1, batch_size=1, local_epochs=overrides.pop("local_epochs", 1), **overrides)
    fed, clients, sparse, dense = _sparse_and_dense(tmp_path, config)
    by_size = {len(c.inputs): c for c in clients.values()}
    chosen = (list(by_size.values()) + [c for c in clients.values() if c not in by_size.values()])[:5]
    assert len({len(c.inputs) for c in chosen}) > 1  # some clients finish before others
    start = {k: v.clone() for k, v in fed.model.group_state(config.transmitted_groups).items()}
    seeds = [11, 12, 13, 14, 15]
    rows = _table_rows(sparse)
    ours, theirs = sparse.train_many(chosen, start, seeds), dense.train_many(chosen, start, seeds)
    catalogue = start[ITEM_EMBEDDING_KEY].shape[0]
    assert rows and max(rows) < catalogue  # the sparse path ran on fewer rows than the catalogue
    for a, b in zip(ours, theirs):
        assert set(a.state) == set(b.state) == set(start)
        for key in start:
            assert a.state[key].shape == start[key].shape
            assert torch.equal(a.state[key], b.state[key]), key
        assert a.metrics == b.metrics and a.num_samples == b.num_samples
        assert not torch.equal(a.state[ITEM_EMBEDDING_KEY], start[ITEM_EMBEDDING_KEY])
    assert all(torch.equal(start[k], v) for k, v in fed.model.group_state(config.transmitted_groups).items())


def test_item_rows_no_client_touched_keep_the_global_value(tmp_path):
    """Negatives drawn from a pool of 5 items: every other row a client neither reads nor predicts is
    the global row exactly, as the dense path leaves it."""
    from feddmmr.federation.server import ITEM_EMBEDDING_KEY

    config = tiny_config(1)
    fed, clients, sparse, dense = _sparse_and_dense(tmp_path, config, item_pool=np.arange(1, 6))
    start = {k: v.clone() for k, v in fed.model.group_state(config.transmitted_groups).items()}
    chosen = [clients[0], clients[1], clients[2]]
    for trainer in (sparse, dense):
        for client, update in zip(chosen, trainer.train_many(chosen, start, [1, 2, 3])):
            touched = set(client.inputs.ravel().tolist()) | set(client.targets.ravel().tolist()) | set(range(1, 6))
            untouched = sorted(set(range(start[ITEM_EMBEDDING_KEY].shape[0])) - touched)
            assert untouched
            assert torch.equal(update.state[ITEM_EMBEDDING_KEY][untouched], start[ITEM_EMBEDDING_KEY][untouched])
            assert not torch.equal(update.state[ITEM_EMBEDDING_KEY], start[ITEM_EMBEDDING_KEY])


@pytest.mark.parametrize("overrides", [dict(loss="full_softmax"), dict(weight_decay=0.01)],
                         ids=["full_softmax", "weight_decay"])
def test_the_full_softmax_and_weight_decay_still_train_every_item_row(tmp_path, overrides):
    """Every row is a full softmax's candidate, and weight decay moves every row: both stay dense."""
    from feddmmr.federation.server import ITEM_EMBEDDING_KEY

    config = tiny_config(1, **overrides)
    fed, clients, sparse, dense = _sparse_and_dense(tmp_path, config)
    start = fed.model.group_state(config.transmitted_groups)
    rows = _table_rows(sparse)
    ours, theirs = sparse.train_many([clients[0], clients[1]], start, [1, 2]), dense.train_many(
        [clients[0], clients[1]], start, [1, 2])
    assert set(rows) == {start[ITEM_EMBEDDING_KEY].shape[0]}
    for a, b in zip(ours, theirs):
        assert all(torch.equal(a.state[k], b.state[k]) for k in start)
