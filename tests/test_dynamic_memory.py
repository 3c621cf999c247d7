"""The seed's memory as written (issue #14): candidate-conditioned retrieval, the surprise trigger,
a memory that updates as the client trains, and no leakage. All off by default (docs/quality-memory.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddmmr.config import ConfigError, TrainConfig, validate_config
from feddmmr.engine.assemble import assemble, restore
from feddmmr.federation.client import (build_client, build_clients, pack_clients,
                                       pool_budget, training_windows, unpack_clients, window_target_steps)
from feddmmr.federation.memory import ItemSpace, LocalMemory, MemoryConfig
from feddmmr.features.store import load_features
from feddmmr.models import UR4RecV2MoE
from feddmmr.models.moe import combined_content
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features
from .test_memory import axis_space, space_from_vectors

pytestmark = pytest.mark.usefixtures("one_thread")


def _space(features) -> ItemSpace:
    text, visual = load_features(features)
    return ItemSpace(visual.features, text.features)


# --------------------------------------------------------------------------- off by default

def test_every_key_is_off_by_default_and_leaves_the_model_and_the_memory_as_before(tmp_path):
    defaults = TrainConfig()
    assert (defaults.memory_retrieval, defaults.surprise_trigger) == ("centroid", False)
    config = tiny_config(3)
    assert "candidate_retrieval" not in config.model_kwargs(41, 16, 8)
    memory = MemoryConfig.from_train_config(config)
    assert memory.retrieval == "centroid" and memory.width == config.memory_top_k
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    assembly = assemble(config, data, features, _stage1(tmp_path, data))
    clients = assembly.build_clients()
    assert all(c.memory.shape[1] == config.memory_top_k and c.surprised is None for c in clients.values())
    trainer = assembly.trainer()
    client = clients[0]
    batch = trainer._batch([client], [np.arange(len(client.inputs))], [torch.Generator().manual_seed(0)], None)
    assert len(batch) == 6  # no memory_pool: the model is called as before
    update = trainer.train(client, assembly.model.group_state(config.transmitted_groups), seed=1)
    assert not trainer.surprised_steps and "position_loss" not in update.metrics
    assert not any(key.startswith("surprise") for key in pack_clients(clients))


def _stage1(tmp_path, data):
    out = tmp_path / "stage1"
    if not (out / "model.safetensors").exists():
        run_federated(tiny_config(1, num_rounds=1), data, out, progress=False)
    return out


def test_a_trigger_that_never_fires_trains_bit_for_bit_as_without_it(tmp_path):
    """The trigger reads each position's loss as a by-product (no gradient): with a threshold no loss
    reaches, the run writes nothing and its model is byte-identical to the run without the key."""
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    init = _stage1(tmp_path, data)
    plain = run_federated(tiny_config(3, num_rounds=2), data, tmp_path / "plain", features, init, progress=False)
    quiet = run_federated(tiny_config(3, num_rounds=2, surprise_trigger=True, surprise_threshold=1e9), data,
                          tmp_path / "quiet", features, init, progress=False)
    assert (tmp_path / "plain" / "model.safetensors").read_bytes() == (tmp_path / "quiet" / "model.safetensors").read_bytes()
    assert plain["final"] == quiet["final"]


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="memory_retrieval"):
        validate_config(tiny_config(1, memory_retrieval="candidate"))  # no memory in Stage 1
    with pytest.raises(ConfigError, match="memory_retrieval.*full_softmax"):
        validate_config(tiny_config(3, memory_retrieval="candidate", loss="full_softmax"))
    with pytest.raises(ConfigError, match="surprise_trigger"):
        validate_config(tiny_config(3, surprise_trigger=True, lt_capacity=0))
    with pytest.raises(ConfigError, match="surprise_trigger"):
        validate_config(tiny_config(3, surprise_trigger=True), transport="flower")
    with pytest.raises(ConfigError, match="memory_retrieval"):
        validate_config(tiny_config(3, memory_retrieval="target"))
    validate_config(tiny_config(3, memory_retrieval="candidate"), transport="flower")


# --------------------------------------------------------------------------- candidate-conditioned retrieval

def test_candidate_rows_hold_the_short_term_share_and_the_whole_long_term_pool():
    space = axis_space(30)
    centroid = MemoryConfig(st_window=4, top_k=8, lt_capacity=12)
    candidate = MemoryConfig(st_window=4, top_k=8, lt_capacity=12, retrieval="candidate")
    memories = [LocalMemory(c, space, threshold=0.5) for c in (centroid, candidate)]
    for memory in memories:
        memory.observe(np.arange(1, 21))
    ranked, row = memories[0].retrieve(), memories[1].retrieve()
    assert len(row) == candidate.width == 20
    short = row[:8][row[:8] != 0]
    assert short.tolist() == ranked[:len(short)].tolist()  # the same short-term share, most recent first
    pool = row[8:][row[8:] != 0]
    lt = memories[1].lt_items
    assert sorted(pool.tolist()) == sorted(set(lt.tolist()) - set(short.tolist()))
    budget, ids = pool_budget(row[None], 8)[0].T
    assert (budget[:8] == 0).all() and (budget[8:][row[8:] != 0] == 8 - len(short)).all()
    assert (budget[8:][row[8:] == 0] == 0).all()
    assert (ids[:8] == 0).all() and np.array_equal(ids[8:], row[8:])


def _pooled_model(candidate_retrieval: int = 4):
    torch.manual_seed(0)
    model = UR4RecV2MoE(num_items=30, sasrec_hidden_dim=16, sasrec_num_blocks=1, sasrec_num_heads=2, max_seq_len=8,
                        moe_num_heads=2, visual_dim=6, text_dim=5, gating_init=0.5, standardise_features=True,
                        candidate_retrieval=candidate_retrieval)
    visual, text = torch.randn(30, 6), torch.randn(30, 5)
    visual[0], text[0], visual[5] = 0, 0, 0  # padding; item 5 has no poster
    model.set_item_features(visual, text)
    model.eval()
    ids = torch.zeros(3, 11, dtype=torch.long)  # top_k = 4 short-term slots, then the pool
    ids[0, :1], ids[0, 4:11] = torch.tensor([3]), torch.tensor([7, 8, 9, 10, 11, 12, 13])
    ids[1, :2], ids[1, 4:7] = torch.tensor([4, 5]), torch.tensor([14, 15, 16])
    ids[2, :4] = torch.tensor([1, 2, 6, 17])
    return model, visual, text, ids, torch.from_numpy(pool_budget(ids.numpy(), 4))


def test_each_candidate_reads_the_short_term_share_and_the_pool_entries_nearest_itself():
    """The seed's target-conditioned retrieval, for every candidate: the experts' term of (row, candidate)
    is the one the default experts give over the short-term share plus the ``top_k - n_st`` pool entries
    whose combined content is closest to that candidate."""
    model, visual, text, ids, pool = _pooled_model()
    items = torch.randint(1, 30, (3, 9), generator=torch.Generator().manual_seed(1))
    content = combined_content(visual, text)
    with torch.no_grad():
        bonus, _, _ = model.auxiliary(items, visual[ids], text[ids], memory_pool=pool)
        for b in range(3):
            short = [int(x) for x in ids[b, :4] if x]
            long = [int(x) for x in ids[b, 4:] if x]
            for c in range(items.shape[1]):
                near = np.argsort(-(content[long] @ content[items[b, c]]).numpy(), kind="stable")[:4 - len(short)]
                memory = torch.tensor([short + [long[j] for j in near]])
                alone, _, _ = model.auxiliary(items[b:b + 1, c:c + 1], visual[memory], text[memory])
                assert torch.allclose(alone[0, 0], bonus[b, c], atol=1e-6), (b, c)
        # a different candidate reads different entries: the term is not the centroid's
        ranked, _, _ = model.auxiliary(items, visual[ids], text[ids])
        assert not torch.allclose(ranked, bonus, atol=1e-4)


def test_pooled_experts_with_every_entry_visible_are_the_default_experts_and_blocks_change_nothing():
    model, visual, text, ids, pool = _pooled_model(candidate_retrieval=11)
    items = torch.randint(1, 30, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        budget = pool[..., 0]
        every = torch.where(budget > 0, torch.full_like(budget, 99), budget)
        assert torch.equal(model.auxiliary(items, visual[ids], text[ids], memory_pool=every)[0],
                           model.auxiliary(items, visual[ids], text[ids])[0])
        model.candidate_retrieval = 4
        whole = model.auxiliary(items, visual[ids], text[ids], memory_pool=pool)[0]
        model.POOLED_BLOCK = 20  # evaluation processes the candidates in blocks
        assert torch.allclose(model.auxiliary(items, visual[ids], text[ids], memory_pool=pool)[0], whole, atol=1e-6)
        # the item x item cosine table and the feature rows choose the same entries
        assert torch.allclose(model.auxiliary(items, visual[ids], text[ids], memory_pool=pool[..., 0])[0], whole,
                              atol=1e-6)
        assert model.item_similarity.shape == (30, 30)


def test_training_and_evaluation_read_the_memory_through_the_same_candidate_rule(tmp_path, monkeypatch):
    """Local training's batches and the evaluation scorer both hand the pooled experts the rows and their
    budgets (never the centroid ranking), and a candidate-retrieval run survives the run-directory round trip."""
    from tests.fedtools import stage3_after_stage1

    calls = []
    original = UR4RecV2MoE._auxiliary_pooled

    def spy(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UR4RecV2MoE, "_auxiliary_pooled", spy)
    history, run = stage3_after_stage1(tmp_path, memory_retrieval="candidate")
    assert True in calls and False in calls  # training (with gradient) and evaluation (without)
    assert run.model.candidate_retrieval == run.config.memory_top_k
    width = run.config.memory_top_k + run.config.lt_capacity
    assert all(c.memory.shape[1] == width and len(c.eval_memory["val"]) == width for c in run.clients.values())
    again = run.scorer("test")
    assert history["final"]["test_full"]["users"] > 0 and again is not None


# --------------------------------------------------------------------------- the surprise trigger

def test_surprised_items_are_written_whatever_their_novelty():
    space = space_from_vectors([[1, 0], [1, 0], [0, 1], [0, 1]])
    memory = LocalMemory(MemoryConfig(st_window=5, duplicate_threshold=1.5), space, threshold=0.5)
    memory.observe(np.array([1, 2, 3, 4]), surprised=np.array([False, True, False, False]))
    assert memory.lt_items.tolist() == [1, 2, 3]  # 2 and 4 duplicate the window; 2 was surprising
    assert memory.lt_last.tolist() == [0.0, 1.0, 2.0]  # written at its own step


def test_the_trigger_flags_the_positions_above_the_clients_loss_quantile_or_threshold(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, surprise_trigger=True, surprise_quantile=0.75)
    assembly = assemble(config, data, features, _stage1(tmp_path, data))
    trainer = assembly.trainer()
    client = assembly.build_clients(np.array([0]))[0]
    losses = np.where(client.targets != 0, np.arange(client.targets.size, dtype=np.float32).reshape(client.targets.shape),
                      np.nan)
    steps = trainer.surprising(client, losses)
    where = window_target_steps(client.num_samples + 1, config.max_seq_len)
    values = losses[client.targets != 0]
    expected = np.sort(where[(client.targets != 0) & (losses > np.quantile(values, 0.75))])
    assert steps.tolist() == expected.tolist() and len(steps) > 0
    train = data.sequence(0)[:-2]
    for step in steps:  # a flagged step is the training item its position predicts
        assert train[step] == client.targets[where == step][0]
    trainer.config = tiny_config(3, surprise_trigger=True, surprise_threshold=float(values.max()) - 0.5)
    assert trainer.surprising(client, losses).tolist() == [int(where[losses == values.max()][0])]


def test_window_target_steps_index_each_positions_target():
    train = np.arange(101, 113)
    _, targets, _ = training_windows(train, 5)
    steps = window_target_steps(len(train), 5)
    assert np.array_equal(np.where(steps >= 0, train[np.clip(steps, 0, None)], 0), targets)


def test_local_training_reports_each_positions_loss_and_flags_training_steps_only(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, surprise_trigger=True)
    assembly = assemble(config, data, features, _stage1(tmp_path, data))
    clients = assembly.build_clients()
    trainer = assembly.trainer()
    state = assembly.model.group_state(config.transmitted_groups)
    updates = trainer.train_many([clients[u] for u in range(4)], state, [1, 2, 3, 4])
    assert sorted(trainer.surprised_steps) == [0, 1, 2, 3]
    for user, update in enumerate(updates):
        train_len = len(data.sequence(user)) - 2
        steps = trainer.surprised_steps[user]  # kept on the client side: the update carries none of it
        assert len(steps) >= 1
        assert steps.min() >= 1 and steps.max() < train_len  # targets of training windows
        assert "position_loss" not in update.metrics and set(vars(update)) == {"state", "num_samples",
                                                                               "prototypes", "metrics"}


# --------------------------------------------------------------------------- no leakage, with surprise writes

def _check_no_leak(data, clients, max_len):
    for user, client in clients.items():
        sequence = data.sequence(user)
        train, val_item, test_item = sequence[:-2], int(sequence[-2]), int(sequence[-1])
        _, _, starts = training_windows(train, max_len)
        for row, start in enumerate(starts):
            remembered = set(client.memory[row].tolist()) - {0}
            assert remembered <= set(train[:start].tolist()), (user, row)  # only items before every position
            assert val_item not in remembered and test_item not in remembered
        assert set(client.eval_memory["val"].tolist()) - {0} <= set(train.tolist())
        assert test_item not in set(client.eval_memory["test"].tolist())


@pytest.mark.parametrize("retrieval", ["centroid", "candidate"])
def test_a_surprise_write_reaches_only_windows_after_its_step(tmp_path, retrieval):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, memory_retrieval=retrieval, lt_capacity=40, memory_top_k=4, max_seq_len=4)
    memory_config, space = MemoryConfig.from_train_config(config), _space(features)
    for user in range(6):
        train = data.sequence(user)[:-2]
        plain = build_client(data, user, config.max_seq_len, memory_config, space)
        step = len(train) // 2
        if step in plain.memory_state.lt_last:  # choose a step the novelty rule did not write
            step = next(s for s in range(1, len(train)) if s not in plain.memory_state.lt_last)
        item = int(train[step])
        client = build_client(data, user, config.max_seq_len, memory_config, space, surprised=np.array([step]))
        assert item in client.memory_state.lt_items
        _, _, starts = training_windows(train, config.max_seq_len)
        for row, start in enumerate(starts):
            if start <= step:  # the window's positions predict the item or come before it
                assert np.array_equal(client.memory[row], plain.memory[row]), (user, row)
        _check_no_leak(data, {user: client}, config.max_seq_len)


def test_steps_outside_the_training_sequence_are_refused(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3)
    train_len = len(data.sequence(0)) - 2
    with pytest.raises(ValueError, match="training items"):  # the validation item's index
        build_client(data, 0, config.max_seq_len, MemoryConfig.from_train_config(config), _space(features),
                     surprised=np.array([train_len]))


@pytest.mark.parametrize("resident", [True, False])
def test_a_surprise_run_updates_the_memory_across_rounds_without_leaks(tmp_path, resident):
    """Three rounds with the trigger and candidate retrieval: the trained clients' memories changed, every
    snapshot holds only items before its window, held-out items are never written, prototypes come from
    training items only, and a finished run's evaluation memory (restore) is the one it ended with."""
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    init = _stage1(tmp_path, data)
    config = tiny_config(3, num_rounds=3, surprise_trigger=True, memory_retrieval="candidate",
                         resident_clients=resident, lt_capacity=12)
    run_federated(config, data, tmp_path / "s3", features, init, progress=False)
    run = restore(tmp_path / "s3", data)
    changed = {u: c for u, c in run.clients.items() if c.surprised is not None and len(c.surprised)}
    assert changed  # some clients trained and wrote
    static = build_clients(data, config.max_seq_len, MemoryConfig.from_train_config(config), _space(features))
    assert any(not np.array_equal(c.memory_state.lt_items, static[u].memory_state.lt_items) for u, c in changed.items())
    _check_no_leak(data, run.clients, config.max_seq_len)
    # held-out items changed: nothing a client shares or trains with changes (same surprise steps)
    surprised = {u: c.surprised for u, c in changed.items()}
    memory_config, space = MemoryConfig.from_train_config(config), _space(features)
    before = build_clients(data, config.max_seq_len, memory_config, space, surprised=surprised)
    ends = data.offsets[1:]
    data.items[ends - 2] = np.where(data.items[ends - 2] == 40, 1, 40)
    data.items[ends - 1] = np.where(data.items[ends - 1] == 39, 2, 39)
    after = build_clients(data, config.max_seq_len, memory_config, space, surprised=surprised)
    for user in before:
        assert np.array_equal(before[user].prototypes, after[user].prototypes), user
        assert np.array_equal(before[user].memory, after[user].memory), user
        assert np.array_equal(before[user].eval_memory["val"], after[user].eval_memory["val"]), user


def test_resident_and_on_demand_clients_run_the_same_dynamic_memory(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    init = _stage1(tmp_path, data)
    keys = dict(num_rounds=3, surprise_trigger=True, memory_retrieval="candidate")
    held = run_federated(tiny_config(3, **keys), data, tmp_path / "held", features, init, progress=False)
    built = run_federated(tiny_config(3, resident_clients=False, **keys), data, tmp_path / "built", features, init,
                          progress=False)
    assert [r["val_metrics"] for r in held["rounds"]] == [r["val_metrics"] for r in built["rounds"]]
    assert held["final"] == built["final"]
    assert (tmp_path / "held" / "model.safetensors").read_bytes() == (tmp_path / "built" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("resident", [True, False])
def test_a_dynamic_memory_run_resumes_bit_for_bit(tmp_path, resident):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    init = _stage1(tmp_path, data)
    keys = dict(surprise_trigger=True, memory_retrieval="candidate", resident_clients=resident)
    full = run_federated(tiny_config(3, num_rounds=3, **keys), data, tmp_path / "full", features, init, progress=False)
    run_federated(tiny_config(3, num_rounds=2, **keys), data, tmp_path / "part", features, init, progress=False)
    resumed = run_federated(tiny_config(3, num_rounds=3, **keys), data, tmp_path / "part", features, init,
                            resume=True, progress=False)
    assert [r["val_metrics"] for r in resumed["rounds"]] == [r["val_metrics"] for r in full["rounds"]]
    assert resumed["final"] == full["final"]


def test_packed_memories_keep_the_surprise_steps(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, memory_retrieval="candidate")
    memory_config, space = MemoryConfig.from_train_config(config), _space(features)
    clients = build_clients(data, config.max_seq_len, memory_config, space, surprised={0: np.array([2, 5]), 3: np.array([1])})
    again = unpack_clients(pack_clients(clients), data, config.max_seq_len, memory_config, space)
    assert again[0].surprised.tolist() == [2, 5] and again[3].surprised.tolist() == [1] and not len(again[1].surprised)
    for user, client in clients.items():
        assert np.array_equal(again[user].memory, client.memory)


def test_a_flower_node_trains_and_scores_with_candidate_retrieval_as_in_process(tmp_path):
    """The Flower path accepts memory_retrieval=candidate: a node (the ClientApp's runtime) builds the wide
    rows, trains with the pooled experts and scores as the in-process clients do."""
    from feddmmr.engine.assemble import LocalClients
    from feddmmr.flower import core

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    config = tiny_config(3, memory_retrieval="candidate", trainable_groups=["item_embedding", "backbone", "projectors",
                                                                            "experts", "router", "gate"])
    node = core.NodeRuntime(config, data, features, None)
    users = np.arange(data.num_users)
    node.ensure_clients(users)
    assert all(c.memory.shape[1] == config.memory_top_k + config.lt_capacity for c in node.clients.values())
    state = node.assembly.model.group_state(config.transmitted_groups)
    update = node.train(users[:4], state, 1, None)
    assert update.total > 0 and all(torch.isfinite(v).all() for v in update.sums.values())
    request = [("val", "full", 64)]
    ours = node.evaluate_users(users, state, None, request)[0]
    assembly = assemble(config, data, features, None)
    theirs = LocalClients(assembly, assembly.build_clients(), None).evaluate(assembly.model, None, request)[0]
    assert ours == theirs


def test_the_centralized_reference_reads_candidate_retrieval_and_refuses_the_trigger(tmp_path):
    from feddmmr.centralized import run_centralized

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    init = _stage1(tmp_path, data)
    history = run_centralized(tiny_config(3, memory_retrieval="candidate"), data, tmp_path / "c", 1, features, init)
    assert np.isfinite(history["rounds"][0]["losses"]["next_item"])
    with pytest.raises(ValueError, match="surprise_trigger"):
        run_centralized(tiny_config(3, surprise_trigger=True), data, tmp_path / "d", 1, features, init)


def test_pooled_experts_follow_the_router_ablation():
    """use_router=false mixes the experts equally in the pooled path too (the same rule as the default path)."""
    model, visual, text, ids, pool = _pooled_model(candidate_retrieval=11)
    model.use_router = False
    items = torch.randint(1, 30, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        budget = pool[..., 0]
        every = torch.where(budget > 0, torch.full_like(budget, 99), budget)
        pooled, weights, _ = model.auxiliary(items, visual[ids], text[ids], memory_pool=every)
        plain, plain_weights, _ = model.auxiliary(items, visual[ids], text[ids])
    assert torch.equal(pooled, plain) and torch.equal(weights, plain_weights)
