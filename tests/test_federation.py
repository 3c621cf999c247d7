"""Federated training: aggregation, sampling, what a client sends, stages, determinism, resume."""

from __future__ import annotations

import math

import json

import numpy as np
import pytest
import torch

from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.client import ClientUpdate, LocalTrainer, build_clients, training_windows
from feddmmr.federation.memory import ItemSpace, MemoryConfig
from feddmmr.federation.server import ITEM_EMBEDDING_KEY, aggregate, aggregate_prototypes, sample_clients
from feddmmr.models import CheckpointError
from feddmmr.engine.assemble import assemble as setup, restore
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features


# --------------------------------------------------------------------------- server arithmetic

def test_fedavg_is_weighted_by_sample_count():
    glob = {"w": torch.zeros(2)}
    out = aggregate(glob, [({"w": torch.tensor([1.0, 2.0])}, 1), ({"w": torch.tensor([5.0, 6.0])}, 3)])
    assert torch.allclose(out["w"], torch.tensor([4.0, 5.0]))


def test_item_rows_are_averaged_over_the_clients_that_updated_them():
    glob = {ITEM_EMBEDDING_KEY: torch.zeros(3, 2)}
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])  # updated rows 1, 2
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]])  # updated row 2 only
    rows = aggregate(glob, [({ITEM_EMBEDDING_KEY: a}, 1), ({ITEM_EMBEDDING_KEY: b}, 3)], "updated_rows")
    plain = aggregate(glob, [({ITEM_EMBEDDING_KEY: a}, 1), ({ITEM_EMBEDDING_KEY: b}, 3)], "fedavg")
    assert rows[ITEM_EMBEDDING_KEY][1].tolist() == [1.0, 1.0]  # only client a touched row 1
    assert rows[ITEM_EMBEDDING_KEY][2].tolist() == [3.5, 3.5]  # (1*2 + 3*4) / 4
    assert rows[ITEM_EMBEDDING_KEY][0].tolist() == [0.0, 0.0]  # untouched rows keep the global value
    assert plain[ITEM_EMBEDDING_KEY][1].tolist() == [0.25, 0.25]


def test_client_sampling_is_seeded_and_sized():
    a = sample_clients(100, 0.1, seed=3, round_number=1)
    assert len(a) == 10 and len(set(a.tolist())) == 10
    assert np.array_equal(a, sample_clients(100, 0.1, seed=3, round_number=1))
    assert not np.array_equal(a, sample_clients(100, 0.1, seed=3, round_number=2))
    with pytest.raises(ValueError, match="client_fraction"):
        sample_clients(100, 0.0, 0, 1)


def test_a_fixed_cohort_size_is_the_same_whatever_the_population():
    from feddmmr.config import ConfigError, TrainConfig, validate_config

    for users in (100, 6040):
        assert len(sample_clients(users, 0.1, seed=3, round_number=1, count=20)) == 20
    assert len(sample_clients(15, 0.1, seed=3, round_number=1, count=20)) == 15  # capped by the population
    with pytest.raises(ConfigError, match="min_clients=21 exceeds the 20 clients.*clients_per_round=20"):
        validate_config(TrainConfig(clients_per_round=20, min_clients=21), "test", num_users=1000)
    with pytest.raises(ConfigError, match="clients_per_round"):  # DP accounts for Poisson sampling at a rate
        validate_config(TrainConfig(clients_per_round=20, dp_noise_multiplier=1.0, dp_clip_norm=1.0,
                                    item_embedding_aggregation="fedavg"), "test", num_users=1000)


def test_prototype_aggregation_gives_unit_global_slots():
    protos = [np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32)[2:]]
    centers = aggregate_prototypes(protos, 2, seed=0)
    assert centers.shape == (2, 4) and np.allclose(np.linalg.norm(centers, axis=1), 1.0)
    assert aggregate_prototypes([], 2, 0) is None
    single = aggregate_prototypes([np.array([[3.0, 4.0]], dtype=np.float32)], 2, seed=0)
    assert single.shape == (1, 2) and np.allclose(single, [[0.6, 0.8]])  # fewer points than slots: the points, unit


# --------------------------------------------------------------------------- the client

def test_training_windows_cover_every_transition_once():
    sequence = np.arange(1, 13)
    inputs, targets, starts = training_windows(sequence, 5)
    pairs = {(int(x), int(y)) for x, y in zip(inputs.ravel(), targets.ravel()) if y}
    assert pairs == {(i, i + 1) for i in range(1, 12)}
    assert inputs.shape == (3, 5) and starts.tolist() == [0, 1, 6]


def test_memory_snapshot_holds_only_items_before_the_window(tmp_path):
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path)
    config = tiny_config(stage=3)
    from feddmmr.features.store import load_features

    text, visual = load_features(features)
    space = ItemSpace(visual.features, text.features)
    clients = build_clients(data, config.max_seq_len, MemoryConfig.from_train_config(config), space)
    for user, client in clients.items():
        train = data.sequence(user)[:-2]
        _, _, starts = training_windows(train, config.max_seq_len)
        for row, start in enumerate(starts):
            remembered = set(client.memory[row].tolist()) - {0}
            assert remembered <= set(train[:start].tolist())
        assert set(client.eval_memory["val"].tolist()) - {0} <= set(train.tolist())


def test_the_held_out_items_never_reach_what_a_client_shares(tmp_path):
    """Prototypes (uploaded every round, and merged into everyone's memory at scoring time) come
    from the training history only: replacing a user's validation and test items changes nothing
    the client shares."""
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path)
    config = tiny_config(stage=3)
    from feddmmr.features.store import load_features

    text, visual = load_features(features)
    space = ItemSpace(visual.features, text.features)
    memory = MemoryConfig.from_train_config(config)
    before = build_clients(data, config.max_seq_len, memory, space)
    ends = data.offsets[1:]
    data.items[ends - 2] = np.where(data.items[ends - 2] == 40, 1, 40)  # another validation item
    data.items[ends - 1] = np.where(data.items[ends - 1] == 39, 2, 39)  # another test item
    after = build_clients(data, config.max_seq_len, memory, space)
    for user in before:
        assert np.array_equal(before[user].prototypes, after[user].prototypes), user
        assert np.array_equal(before[user].eval_memory["val"], after[user].eval_memory["val"]), user



def test_evaluation_memories_hold_only_their_splits_input(tmp_path):
    """The memory a split is scored with has seen exactly that split's input, never its target.

    Validation: the training part only. Test: the training part plus the validation item (which
    is test input), and never the test item, which no user in this data consumed before.
    """
    data = tiny_dataset(tmp_path)
    config = tiny_config(stage=3)
    from feddmmr.features.store import load_features

    text, visual = load_features(tiny_features(tmp_path))
    clients = build_clients(data, config.max_seq_len, MemoryConfig.from_train_config(config),
                            ItemSpace(visual.features, text.features))
    for user, client in clients.items():
        sequence = data.sequence(user)
        train, val_item, test_item = sequence[:-2], int(sequence[-2]), int(sequence[-1])
        assert test_item not in sequence[:-1]  # so any test item in a memory is a leak
        val_memory = set(client.eval_memory["val"].tolist()) - {0}
        test_memory = set(client.eval_memory["test"].tolist()) - {0}
        assert val_memory <= set(train.tolist()) and val_item not in val_memory
        assert test_memory <= set(sequence[:-1].tolist()), f"user {user}: test memory holds its target"
        assert val_item in test_memory  # the most recent input item is in the short-term part



def test_packed_client_memories_unpack_to_the_same_clients(tmp_path):
    """``pack_clients`` -> ``unpack_clients`` (the resume point's and a Flower node's format) gives back
    every client's windows, snapshots, evaluation memories, prototypes and live memory state exactly,
    so a resumed client keeps remembering as the uninterrupted one would."""
    from feddmmr.federation.client import pack_clients, unpack_clients
    from feddmmr.features.store import load_features

    data = tiny_dataset(tmp_path)
    config = tiny_config(stage=3)
    text, visual = load_features(tiny_features(tmp_path))
    space, memory_config = ItemSpace(visual.features, text.features), MemoryConfig.from_train_config(config)
    clients = build_clients(data, config.max_seq_len, memory_config, space)
    again = unpack_clients(pack_clients(clients), data, config.max_seq_len, memory_config, space)
    assert sorted(again) == sorted(clients)
    for user, client in clients.items():
        copy = again[user]
        for name in ("inputs", "targets", "memory", "prototypes"):
            assert np.array_equal(getattr(copy, name), getattr(client, name)), (user, name)
        assert all(np.array_equal(copy.eval_memory[s], client.eval_memory[s]) for s in ("val", "test"))
        ours, theirs = client.memory_state.state_dict(), copy.memory_state.state_dict()
        assert all(np.array_equal(ours[key], theirs[key]) for key in ours), user
        assert copy.memory_state.threshold == client.memory_state.threshold
    with pytest.raises(KeyError, match="no saved memory"):
        unpack_clients(pack_clients(clients), data, config.max_seq_len, memory_config, space, users=[99])


def _trainer(tmp_path, config):
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path) if config.use_memory else None
    if config.stage > 1:
        stage1 = tmp_path / "stage1"
        if not stage1.exists():
            run_federated(tiny_config(1, num_rounds=1), data, stage1, progress=False)
        fed = setup(config, data, features, stage1)
    else:
        fed = setup(config, data, features)
    memory = MemoryConfig.from_train_config(config) if config.use_memory else None
    clients = build_clients(data, config.max_seq_len, memory, fed.space)
    trainer = LocalTrainer(fed.model, config, fed.content, data.occurring_items())
    return fed, clients, trainer


@pytest.mark.parametrize("stage, expected", [(1, {"item_embedding", "backbone"}),
                                             (3, {"backbone", "projectors", "experts", "router", "gate"})])
def test_a_client_returns_only_its_trained_groups_a_count_and_prototypes(tmp_path, stage, expected):
    from feddmmr.models import group_of

    config = tiny_config(stage)
    fed, clients, trainer = _trainer(tmp_path, config)
    global_state = fed.model.group_state(config.transmitted_groups)
    update = trainer.train(clients[0], global_state, seed=0)
    assert isinstance(update, ClientUpdate)
    assert set(vars(update)) == {"state", "num_samples", "prototypes", "metrics"}
    assert {group_of(k) for k in update.state} == expected
    assert update.num_samples == clients[0].num_samples == len(fed.data.sequence(0)) - 3
    assert all(isinstance(v, float) for v in update.metrics.values())
    if stage == 1:
        assert update.prototypes is None
    else:
        assert update.prototypes.shape[1] == 16 + 8  # centroids in content space, never item ids
        assert update.prototypes.dtype == np.float32



@pytest.mark.parametrize("stage", [1, 3])
def test_local_training_trains_exactly_the_transmitted_groups(tmp_path, stage):
    """What a client trains is what it sends: every local step differentiates the stage's
    transmitted groups and nothing else, so a frozen group (Stage 3's item embedding) keeps its
    global value through all local steps instead of drifting locally and silently steering the
    groups that are sent."""
    from feddmmr.models import group_of

    config = tiny_config(stage, local_epochs=2)
    fed, clients, trainer = _trainer(tmp_path, config)
    differentiated: set[str] = set()
    loss = trainer._loss

    def spy(params, *batch):
        differentiated.update(params)
        return loss(params, *batch)

    trainer._loss = spy
    update = trainer.train(clients[0], fed.model.group_state(config.transmitted_groups), seed=0)
    assert {group_of(k) for k in differentiated} == set(config.transmitted_groups)
    assert differentiated == set(update.state)
    trainable = {group_of(k) for k, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(config.transmitted_groups)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_clients_trained_together_match_clients_trained_alone(tmp_path, optimizer):
    """vmapped groups change nothing: clients of different sizes (some finish early) train as if alone."""
    config = tiny_config(3, dropout=0.0, batch_size=1, local_epochs=2, local_optimizer=optimizer,
                         learning_rate=0.01 if optimizer == "adam" else 0.5)
    fed, clients, trainer = _trainer(tmp_path, config)
    by_size = {len(c.inputs): c for c in clients.values()}
    chosen = list(by_size.values()) + [clients[0], clients[1]]
    assert len(by_size) > 1  # unequal step counts: some clients finish before others
    start = fed.model.group_state(config.transmitted_groups)
    together = trainer.train_many(chosen, start, seeds=list(range(5, 5 + len(chosen))))
    alone = [trainer.train(c, start, seed=s) for c, s in zip(chosen, range(5, 5 + len(chosen)))]
    for a, b in zip(together, alone):
        assert a.num_samples == b.num_samples
        for key in start:
            torch.testing.assert_close(_comparable(key, a.state[key]), _comparable(key, b.state[key]),
                                       rtol=1e-4, atol=1e-5)
        assert any(not torch.equal(a.state[k], start[k]) for k in start)


@pytest.mark.parametrize("eps", [1e-8, 1e-3, 1e2])
def test_the_local_adams_first_step_is_lr_g_over_abs_g_plus_eps(tmp_path, eps):
    """``local_adam_eps`` is the epsilon of a client's fresh Adam: its one step moves every coordinate by
    ``lr * g / (|g| + eps)``, a full ``lr`` where the gradient dwarfs eps and an SGD step of ``lr / eps``
    where eps dwarfs it (the gradient is read off one SGD step of size 1 from the same start and draws)."""
    one_step = dict(dropout=0.0, batch_size=64, local_epochs=1)
    fed, clients, sgd = _trainer(tmp_path, tiny_config(1, local_optimizer="sgd", learning_rate=1.0, **one_step))
    client = clients[0]
    assert len(client.inputs) <= 64  # one batch: one step
    start = fed.model.group_state(sgd.config.transmitted_groups)
    gradient = {k: start[k] - v for k, v in sgd.train(client, start, seed=3).state.items()}
    adam = LocalTrainer(fed.model, tiny_config(1, learning_rate=1e-3, local_adam_eps=eps, **one_step),
                        fed.content, sgd.item_pool.numpy())
    stepped = adam.train(client, start, seed=3).state
    for key in start:  # attention key biases: a zero true gradient, float noise (see _comparable)
        g = _comparable(key, gradient[key].double())
        expected = _comparable(key, start[key].double()) - 1e-3 * g / (g.abs() + eps)
        torch.testing.assert_close(_comparable(key, stepped[key].double()), expected, rtol=1e-4, atol=1e-7)
    moved = (stepped["sasrec.item_emb.weight"] - start["sasrec.item_emb.weight"]).abs()
    if eps == 1e-8:  # sign-like: every coordinate with a real gradient moves by the whole learning rate
        assert torch.isclose(moved[gradient["sasrec.item_emb.weight"].abs() > 1e-6], torch.tensor(1e-3), rtol=1e-2).all()
    if eps == 1e2:  # SGD-like: nothing moves more than lr * |g| / eps
        assert moved.max() <= 1e-3 * gradient["sasrec.item_emb.weight"].abs().max() / eps * 1.001


def _comparable(key: str, value: torch.Tensor) -> torch.Tensor:
    """Attention key biases have a zero true gradient, so their steps are float noise (Adam scales
    noise up to a full step); a padded group sums in another order, so leave them out."""
    if key.endswith("qkv.bias"):
        query, _, values = value.chunk(3)
        return torch.cat([query, values])
    return value[:0] if key.endswith(".k.bias") else value



def test_stage3_local_steps_read_both_memory_modalities_and_align_them(tmp_path):
    """A Stage 3 client trains with its visual and its text memory (the router gives weight to both
    experts) and with the InfoNCE alignment over its steps' target items; at
    ``contrastive_lambda = 0`` the alignment is not computed at all."""
    config = tiny_config(3)
    assert config.contrastive_lambda > 0
    fed, clients, trainer = _trainer(tmp_path, config)
    start = fed.model.group_state(config.transmitted_groups)
    metrics = trainer.train(clients[0], start, seed=0).metrics
    assert metrics["router_visual"] > 0.05 and metrics["router_semantic"] > 0.05
    assert metrics["contrastive"] > 0
    off = tiny_config(3, contrastive_lambda=0.0)
    quiet = LocalTrainer(fed.model, off, fed.content, fed.data.occurring_items()).train(clients[0], start, seed=0)
    assert quiet.metrics["contrastive"] == 0.0


def test_an_unused_router_is_neither_trained_nor_sent(tmp_path):
    config = tiny_config(3, use_router=False, local_epochs=2, learning_rate=0.05)
    fed, clients, trainer = _trainer(tmp_path, config)
    start = {k: v.clone() for k, v in fed.model.group_state(config.transmitted_groups).items()}
    update = trainer.train(clients[1], start, seed=0)
    assert "router" in config.trainable_groups and "router" not in config.transmitted_groups
    assert not any(k.startswith("router.") for k in update.state)
    assert any(not torch.equal(update.state[k], start[k]) for k in update.state)


def test_fixed_gate_is_neither_trained_nor_sent(tmp_path):
    """``fix_gate`` trains exactly as a stage without the gate group: a gate that moved locally would
    change every other parameter's update, even if the gate itself were never sent."""
    config = tiny_config(3, fix_gate=True, local_epochs=3, learning_rate=0.05)
    fed, clients, trainer = _trainer(tmp_path, config)
    start = {k: v.clone() for k, v in fed.model.group_state(config.transmitted_groups).items()}
    update = trainer.train(clients[1], start, seed=0)
    assert "gating_weight" not in update.state
    without_gate = tiny_config(3, local_epochs=3, learning_rate=0.05,
                               trainable_groups=[g for g in config.trainable_groups if g != "gate"])
    reference = LocalTrainer(fed.model, without_gate, fed.content, fed.data.occurring_items()).train(
        clients[1], start, seed=0)
    assert update.state.keys() == reference.state.keys()
    assert all(torch.equal(update.state[k], reference.state[k]) for k in update.state)
    assert any(not torch.equal(update.state[k], start[k]) for k in update.state)  # it did train


def test_a_federation_without_long_term_memory_shares_no_prototypes(tmp_path):
    data = tiny_dataset(tmp_path)
    config = tiny_config(3, lt_capacity=0, num_rounds=1, trainable_groups=["item_embedding", "backbone", "projectors",
                                                                           "experts", "router", "gate"])
    history = run_federated(config, data, tmp_path / "run", tiny_features(tmp_path), progress=False)
    assert all(math.isfinite(r["losses"]["next_item"]) for r in history["rounds"])
    assert not (tmp_path / "run" / ckpt.BEST_PROTOTYPES_FILE).exists()


def test_fedprox_pulls_the_local_model_toward_the_global_one(tmp_path):
    config = tiny_config(1, local_epochs=3, learning_rate=0.05)
    fed, clients, trainer = _trainer(tmp_path, config)
    start = fed.model.group_state(config.transmitted_groups)
    start = {k: v.clone() for k, v in start.items()}
    free = trainer.train(clients[0], start, seed=0).state
    config.fedprox_mu = 100.0
    prox = LocalTrainer(fed.model, config, fed.content, fed.data.occurring_items()).train(clients[0], start, seed=0).state
    distance = lambda s: sum(float(((s[k] - start[k]) ** 2).sum()) for k in s)
    assert distance(prox) < distance(free)


# --------------------------------------------------------------------------- runs and stages

def test_two_round_federation_is_deterministic_and_writes_a_run_directory(tmp_path):
    data = tiny_dataset(tmp_path)
    first = run_federated(tiny_config(1), data, tmp_path / "a", progress=False)
    second = run_federated(tiny_config(1), data, tmp_path / "b", progress=False)
    assert [r["val_metrics"] for r in first["rounds"]] == [r["val_metrics"] for r in second["rounds"]]
    run = tmp_path / "a"
    for name in ("model.safetensors", "config.json", "train_history.json", "validation_curves.png"):
        assert (run / name).exists(), name
    history = json.loads((run / "train_history.json").read_text())
    assert len(history["val_metrics"]) == 2 and "HR@10" in history["val_metrics"][0]
    assert history["val_metrics"][0]["protocol"] == "sampled"
    assert {"test_sampled", "test_full", "val_sampled", "val_full"} <= set(history["final"])
    entry = history["rounds"][0]
    assert {"losses", "gate", "seconds", "clients"} <= set(entry)
    other_seed = run_federated(tiny_config(1, seed=1), data, tmp_path / "c", progress=False)
    assert [r["losses"] for r in other_seed["rounds"]] != [r["losses"] for r in first["rounds"]]


def test_stage3_after_stage1_keeps_the_item_embedding_frozen(tmp_path):
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    history = run_federated(tiny_config(3), data, tmp_path / "s3", features, init_dir=tmp_path / "s1",
                            progress=False)
    from safetensors.torch import load_file

    s1, s3 = load_file(str(tmp_path / "s1" / "model.safetensors")), load_file(str(tmp_path / "s3" / "model.safetensors"))
    assert torch.equal(s1[ITEM_EMBEDDING_KEY], s3[ITEM_EMBEDDING_KEY])
    assert not torch.equal(s1["sasrec.pos_emb.weight"], s3["sasrec.pos_emb.weight"])
    config = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert set(config["trained_groups"]) == {"item_embedding", "backbone", "projectors", "experts", "router", "gate"}
    assert any("router_visual" in r["losses"] for r in history["rounds"])
    # the finished run can be restored and scored
    run = restore(tmp_path / "s3", data)
    assert run.config.use_memory and run.prototypes is not None


def test_a_frozen_group_needs_init(tmp_path):
    data = tiny_dataset(tmp_path)
    with pytest.raises(CheckpointError, match="item_embedding"):
        run_federated(tiny_config(3), data, tmp_path / "s3", tiny_features(tmp_path), progress=False)


def test_init_with_missing_or_misshaped_group_fails_naming_it(tmp_path):
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path)
    run_federated(tiny_config(1, sasrec_hidden_dim=8), data, tmp_path / "small", progress=False)
    with pytest.raises(CheckpointError, match="parameter group 'item_embedding'"):
        setup(tiny_config(3), data, features, tmp_path / "small")
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "s1" / "model.safetensors"))
    del weights["sasrec.pos_emb.weight"]
    save_file(weights, str(tmp_path / "s1" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="backbone"):
        setup(tiny_config(3), data, features, tmp_path / "s1")


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    data = tiny_dataset(tmp_path)
    full = run_federated(tiny_config(1, num_rounds=3), data, tmp_path / "full", progress=False)
    run_federated(tiny_config(1, num_rounds=2), data, tmp_path / "part", progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_federated(tiny_config(1, num_rounds=3), data, tmp_path / "part", progress=False)
    resumed = run_federated(tiny_config(1, num_rounds=3), data, tmp_path / "part", resume=True, progress=False)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][2]["val_metrics"] == full["rounds"][2]["val_metrics"]


def test_merging_partial_aggregates_equals_aggregating_everything():
    from feddmmr.federation.server import Aggregator

    glob = {ITEM_EMBEDDING_KEY: torch.zeros(4, 2), "w": torch.zeros(3)}
    generator = torch.Generator().manual_seed(0)
    updates = []
    for count in (3, 1, 5, 2):
        emb = torch.zeros(4, 2)
        rows = torch.randint(0, 4, (2,), generator=generator)
        emb[rows] = torch.randn(2, 2, generator=generator)
        updates.append(({ITEM_EMBEDDING_KEY: emb, "w": torch.randn(3, generator=generator)}, count))
    everything = aggregate(glob, updates)
    left, right, server = Aggregator(glob), Aggregator(glob), Aggregator(glob)
    for state, count in updates[:2]:
        left.add(state, count)
    for state, count in updates[2:]:
        right.add(state, count)
    server.merge(*left.partial())
    server.merge(*right.partial())
    merged = server.result()
    for key in everything:
        assert torch.allclose(everything[key], merged[key], atol=1e-6)


def test_updated_rows_sums_only_the_changed_rows_and_gives_the_full_size_formula_bit_for_bit():
    """The aggregator adds a client's changed item rows only (the others would add zeros): the
    result is the float64 formula over full-size tables, bit for bit, and a partial merged into
    another aggregator is not changed by what that aggregator adds later."""
    from feddmmr.federation.server import Aggregator

    generator = torch.Generator().manual_seed(1)
    glob = {ITEM_EMBEDDING_KEY: torch.randn(50, 4, generator=generator)}
    updates = []
    for count in (3, 1, 5, 2, 7):
        emb = glob[ITEM_EMBEDDING_KEY].clone()
        rows = torch.randint(1, 50, (12,), generator=generator)
        emb[rows] += torch.randn(12, 4, generator=generator)
        updates.append(({ITEM_EMBEDDING_KEY: emb}, count))
    sums = weights = 0
    for state, count in updates:  # the full-size reference
        value = state[ITEM_EMBEDDING_KEY].double()
        changed = (value != glob[ITEM_EMBEDDING_KEY].double()).any(-1).double() * float(count)
        sums, weights = sums + value * changed[:, None], weights + changed
    mean = sums / weights.clamp_min(1e-12)[:, None]
    expected = torch.where(weights[:, None] > 0, mean, glob[ITEM_EMBEDDING_KEY].double()).float()
    one = Aggregator(glob)
    for state, count in updates:
        one.add(state, count)
    assert torch.equal(one.result()[ITEM_EMBEDDING_KEY], expected)
    part = Aggregator(glob)
    part.add(*updates[0])
    before = part.partial()[0][ITEM_EMBEDDING_KEY].clone()
    server = Aggregator(glob)
    server.merge(*part.partial())
    for state, count in updates[1:]:
        server.add(state, count)
    assert torch.equal(part.partial()[0][ITEM_EMBEDDING_KEY], before)
    assert torch.equal(server.result()[ITEM_EMBEDDING_KEY], expected)


def test_server_momentum_accumulates_the_mean_update():
    from feddmmr.federation.server import ServerOptimizer

    glob = {"w": torch.zeros(2)}
    plain = ServerOptimizer("fedavg")
    assert torch.equal(plain.step(glob, {"w": torch.ones(2)})["w"], torch.ones(2))
    momentum = ServerOptimizer("fedavgm", learning_rate=1.0, momentum=0.5)
    first = momentum.step(glob, {"w": torch.ones(2)})  # m = 1 -> w = 1
    second = momentum.step(first, {"w": first["w"] + 1})  # m = 0.5 + 1 -> w = 2.5
    assert torch.allclose(second["w"], torch.full((2,), 2.5))
    restored = ServerOptimizer("fedavgm", momentum=0.5)
    restored.load_state_dict(momentum.state_dict())
    assert torch.allclose(restored.step(second, {"w": second["w"]})["w"], torch.full((2,), 3.25))
    adam = ServerOptimizer("fedadam", learning_rate=0.1)
    moved = adam.step(glob, {"w": torch.tensor([1.0, -1.0])})["w"]
    assert moved[0] > 0 > moved[1]
    with pytest.raises(ValueError, match="server_optimizer"):
        ServerOptimizer("sgd")


def test_a_cosine_server_schedule_anneals_the_step_from_full_to_the_final_ratio():
    from feddmmr.federation.server import ServerOptimizer

    cosine = ServerOptimizer("fedavg", schedule="cosine", num_rounds=5, final_ratio=0.1)
    rates = [cosine.learning_rate(r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert rates[2] == pytest.approx(0.55)  # half-way: the mean of both ends
    assert all(a > b for a, b in zip(rates, rates[1:]))
    glob = {"w": torch.zeros(2)}
    third = cosine.step(glob, {"w": torch.ones(2)}, round_number=3)["w"]  # delta 1, step 0.55
    assert torch.allclose(third, torch.full((2,), 0.55))
    assert torch.equal(ServerOptimizer("fedavg").step(glob, {"w": torch.ones(2)}, round_number=3)["w"],
                       torch.ones(2))  # constant: the plain mean, whatever the round
    with pytest.raises(ValueError, match="server_lr_schedule"):
        ServerOptimizer("fedavg", schedule="step")

def test_without_negative_updates_a_client_moves_only_its_own_item_rows(tmp_path):
    config = tiny_config(1, update_negative_items=False, num_negatives=20)
    fed, clients, trainer = _trainer(tmp_path, config)
    start = {k: v.clone() for k, v in fed.model.group_state(config.transmitted_groups).items()}
    update = trainer.train(clients[0], start, seed=0)
    moved = (update.state[ITEM_EMBEDDING_KEY] != start[ITEM_EMBEDDING_KEY]).any(1).nonzero().flatten().tolist()
    own = set(clients[0].targets.ravel().tolist()) | set(clients[0].inputs.ravel().tolist()) - {0}
    assert moved and set(moved) <= own
    config.update_negative_items = True
    other = LocalTrainer(fed.model, config, fed.content, fed.data.occurring_items()).train(clients[0], start, seed=0)
    assert ((other.state[ITEM_EMBEDDING_KEY] != start[ITEM_EMBEDDING_KEY]).any(1).sum()) > len(moved)
