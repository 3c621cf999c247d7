"""The new-item (cold-start) protocol: a seeded share of the catalogue is never trained on, stays a
candidate, and the test metrics are reported for warm and new targets separately."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddmmr.baselines import content_knn_scorer, late_fusion_scorer, popularity_scorer
from feddmmr.config import ConfigError, validate_config
from feddmmr.data.dataset import ranges
from feddmmr.engine.assemble import assemble, restore
from feddmmr.evaluation import METRIC_NAMES, evaluate
from feddmmr.federation.client import catalogue_mask
from feddmmr.federation.server import ITEM_EMBEDDING_KEY
from feddmmr.features.store import load_features
from feddmmr.models import CheckpointError
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features

FRACTION, SEED = 0.25, 3  # 10 of the 40 items; 4 of the 12 users' test targets are new (checked below)


@pytest.fixture
def data(tmp_path):
    return tiny_dataset(tmp_path)


@pytest.fixture
def cold(data):
    cold = data.with_cold_items(FRACTION, SEED)
    new_targets = int(cold.is_cold(cold.split_bounds("test")[2]).sum())
    assert 0 < new_targets < cold.num_users  # both groups have users
    return cold


def every_input(data, split):
    start, end, _ = data.split_bounds(split)
    return data.items[ranges(start, end)[1]]


def test_new_items_are_a_seeded_share_of_the_catalogue(data, cold):
    occurring = data.occurring_items()
    assert len(cold.cold_items) == round(FRACTION * len(occurring))
    assert set(cold.cold_items) <= set(occurring)
    assert np.array_equal(data.with_cold_items(FRACTION, SEED).cold_items, cold.cold_items)  # deterministic
    assert not np.array_equal(data.with_cold_items(FRACTION, SEED + 1).cold_items, cold.cold_items)
    # the candidate universe is still the whole catalogue; training sees the warm part only
    assert np.array_equal(cold.occurring_items(), occurring)
    assert set(cold.warm_items()) == set(occurring) - set(cold.cold_items)
    assert cold.num_users == data.num_users and cold.fingerprint() != data.fingerprint()


def test_a_new_item_is_only_ever_a_test_target(data, cold):
    assert not cold.is_cold(every_input(cold, "test")).any()  # test inputs include the validation item
    assert not cold.is_cold(cold.split_bounds("val")[2]).any()
    for user in range(cold.num_users):  # each history keeps its warm items in order, and its test target
        original = data.sequence(user)
        kept = original[:-1][~cold.is_cold(original[:-1])]
        assert cold.sequence(user).tolist() == kept.tolist() + [original[-1]]


def test_no_new_item_reaches_windows_memory_prototypes_or_negatives(tmp_path, data, cold):
    config = tiny_config(3, cold_item_fraction=FRACTION, cold_item_seed=SEED, lt_capacity=20)
    fed = assemble(config, data, tiny_features(tmp_path), _stage1(tmp_path, data, config))
    assert fed.data.fingerprint() == cold.fingerprint()
    clients = fed.build_clients()
    new = cold.cold_items
    for client in clients.values():
        for part in (client.inputs, client.targets, client.memory, client.eval_memory["val"],
                     client.eval_memory["test"], client.memory_state.lt_items, client.memory_state.recent):
            assert not np.isin(part, new).any()
        # prototypes are centroids of the long-term entries, computed before the held-out items are read
        assert client.memory_state.writes > 0
    trainer = fed.trainer()
    assert not np.isin(trainer.item_pool.numpy(), new).any()  # sampled negatives
    mask = catalogue_mask(cold.num_items, cold.warm_items())  # the full-softmax catalogue
    assert not mask[torch.from_numpy(new)].any()


def _stage1(tmp_path, data, stage3_config):
    stage1 = tmp_path / "stage1"
    run_federated(tiny_config(1, num_rounds=1, cold_item_fraction=stage3_config.cold_item_fraction,
                              cold_item_seed=stage3_config.cold_item_seed), data, stage1, progress=False)
    return stage1


def test_a_new_items_id_embedding_is_never_trained(tmp_path, data, cold):
    config = tiny_config(1, num_rounds=2, client_fraction=1.0, cold_item_fraction=FRACTION, cold_item_seed=SEED)
    init = assemble(config, data).model.state_dict()[ITEM_EMBEDDING_KEY].clone()
    run_federated(config, data, tmp_path / "run", progress=False)
    trained = restore(tmp_path / "run", data)
    rows = trained.model.state_dict()[ITEM_EMBEDDING_KEY]
    new, warm = torch.from_numpy(cold.cold_items), torch.from_numpy(cold.warm_items())
    assert torch.equal(rows[new], init[new])
    assert not torch.equal(rows[warm], init[warm])
    assert trained.data.fingerprint() == cold.fingerprint()  # a restored run is scored under its protocol


def test_warm_and_new_metrics_partition_the_test_users(cold):
    targets = cold.split_bounds("test")[2]
    new = cold.is_cold(targets)
    for protocol in ("full", "sampled"):
        result = evaluate(popularity_scorer(cold), cold, "test", protocol, seed=0, num_negatives=10)
        assert result["warm"]["users"] + result["new"]["users"] == result["users"] == cold.num_users
        assert result["new"]["users"] == int(new.sum())
        for name in METRIC_NAMES:  # the overall metric is the user-weighted mean of the two groups
            parts = sum(result[g]["users"] * result[g][name] for g in ("warm", "new")) / result["users"]
            assert result[name] == pytest.approx(parts)
    # popularity never saw a new item: all of them score 0, below every warm item
    counts = popularity_scorer(cold)(np.array([0]), None, None)[0]
    assert (counts[torch.from_numpy(cold.cold_items)] == 0).all() and (counts[torch.from_numpy(cold.warm_items())] > 0).all()
    val = evaluate(popularity_scorer(cold), cold, "val", "full")
    assert val["new"] == {"users": 0} and val["warm"]["users"] == cold.num_users


def test_new_items_stay_candidates(cold):
    """An oracle that scores each user's test target highest ranks it first, new or warm: new items are
    neither dropped from the catalogue nor excluded as history."""
    targets = torch.from_numpy(cold.split_bounds("test")[2])

    def oracle(users, seq, items):
        onehot = torch.zeros(len(users), cold.num_items)
        onehot[torch.arange(len(users)), targets[users]] = 1.0
        return onehot if items is None else onehot.gather(1, items)

    for protocol in ("full", "sampled"):
        result = evaluate(oracle, cold, "test", protocol, num_negatives=10)
        assert result["warm"]["HR@5"] == result["new"]["HR@5"] == 1.0


def test_fraction_zero_changes_nothing(tmp_path, data):
    assert data.with_cold_items(0.0, SEED) is data
    config = tiny_config(1, cold_item_fraction=0.0)
    fed = assemble(config, data)
    assert fed.data is data
    assert np.array_equal(fed.trainer().item_pool.numpy(), data.occurring_items())
    result = evaluate(popularity_scorer(data), data, "test", "full")
    assert "warm" not in result and "new" not in result
    a = run_federated(tiny_config(1), data, tmp_path / "a", progress=False)
    b = run_federated(config, data, tmp_path / "b", progress=False)
    assert a["final"] == b["final"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_every_stage_holds_out_the_same_new_items(tmp_path, data):
    config = tiny_config(3, cold_item_fraction=FRACTION, cold_item_seed=SEED)
    stage1 = _stage1(tmp_path, data, config)
    features = tiny_features(tmp_path)
    for other in ({"cold_item_seed": SEED + 1}, {"cold_item_fraction": 0.0}):
        with pytest.raises(CheckpointError, match="new items must be the same"):
            assemble(tiny_config(3, **{"cold_item_fraction": FRACTION, "cold_item_seed": SEED, **other}), data,
                     features, stage1)
    assemble(config, data, features, stage1)


def test_too_short_histories_are_an_error_naming_the_user(data):
    with pytest.raises(ValueError, match="interaction\\(s\\) left once the new items"):
        data.with_cold_items(0.9, SEED)


def test_the_flower_app_refuses_the_new_item_protocol():
    with pytest.raises(ConfigError, match="cold_item_fraction"):
        validate_config(tiny_config(1, cold_item_fraction=0.1), transport="flower")


def test_content_knn_ranks_by_content_and_scores_new_items(tmp_path, data, cold):
    text, visual = load_features(tiny_features(tmp_path))
    scorer = content_knn_scorer(cold, visual.features.float(), text.features.float(), last=5)
    seq = torch.tensor([[0, 0, 1, 2, 3], [0, 21, 22, 23, 24]])  # genre A (items 1-20), genre B (21-40)
    scores = scorer(np.array([0, 1]), seq, None)
    assert scores[0, 4:21].mean() > scores[0, 21:].mean() and scores[1, 21:].mean() > scores[1, 4:21].mean()
    assert torch.allclose(scorer(np.array([0, 1]), seq, torch.tensor([[5, 30], [5, 30]])),
                          scores[:, [5, 30]].float().to(scores.dtype))
    result = evaluate(scorer, cold, "test", "full")
    # the tiny users stay inside one genre: content finds new targets where popularity cannot
    assert result["new"]["HR@10"] > 0.5 > evaluate(popularity_scorer(cold), cold, "test", "full")["new"]["HR@10"]


def test_late_fusion_adds_the_weighted_content_scores_to_the_models(tmp_path, data, cold):
    text, visual = load_features(tiny_features(tmp_path))
    knn = content_knn_scorer(cold, visual.features.float(), text.features.float(), last=5)
    popular = popularity_scorer(cold)
    users, seq, items = np.array([0, 1]), torch.tensor([[0, 0, 1, 2, 3], [0, 21, 22, 23, 24]]), torch.tensor([[5, 30]] * 2)
    for candidates in (None, items):
        fused = late_fusion_scorer(popular, knn, 2.0)(users, seq, candidates)
        assert torch.allclose(fused, popular(users, seq, candidates).double() + 2.0 * knn(users, seq, candidates))
        assert torch.equal(late_fusion_scorer(popular, knn, 0.0)(users, seq, candidates),
                           popular(users, seq, candidates).double())
    # content lifts the new targets popularity cannot reach, without training anything
    alone = evaluate(popular, cold, "test", "full")["new"]["HR@10"]
    assert evaluate(late_fusion_scorer(popular, knn, 100.0), cold, "test", "full")["new"]["HR@10"] > alone
