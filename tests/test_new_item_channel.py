"""The calibrated new-item channel (``new_item_channel``, feddmmr/new_items.py): new items scored by their
content on the user's scale, calibrated on validation with pseudo-new items, inactive without new items."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from feddmmr import new_items
from feddmmr.baselines import content_knn_scorer, popularity_scorer
from feddmmr.config import ConfigError
from feddmmr.engine.assemble import restore
from feddmmr.evaluation import evaluate
from feddmmr.features.store import load_features
from feddmmr.new_items import (channel_scorer, item_mask, new_item_channel, pseudo_new_items,
                               reference_items)
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features

FRACTION, SEED = 0.25, 3  # as tests/test_new_items.py: 10 of the 40 items are new


@pytest.fixture
def data(tmp_path):
    return tiny_dataset(tmp_path)


@pytest.fixture
def cold(data):
    return data.with_cold_items(FRACTION, SEED)


def test_pseudo_new_items_are_warm_seeded_and_never_new(data):
    for cold_seed in range(5):
        cold = data.with_cold_items(FRACTION, cold_seed)
        for seed in range(3):
            pseudo = pseudo_new_items(cold, seed)
            assert len(pseudo) == round(0.1 * len(cold.warm_items()))
            assert set(pseudo) <= set(cold.warm_items()) and not np.isin(pseudo, cold.cold_items).any()
            assert not cold.is_cold(pseudo).any()
            assert np.array_equal(pseudo, pseudo_new_items(cold, seed))  # deterministic
            reference = reference_items(cold, seed, pseudo)
            assert not np.isin(reference, pseudo).any() and not cold.is_cold(reference).any()


def _channel(cold, tmp_path, base=None):
    base = base or popularity_scorer(cold)
    return new_item_channel(lambda split: base, cold, tiny_features(tmp_path), 0)


def test_calibration_reads_no_test_target(tmp_path, data, cold, monkeypatch):
    splits = []
    real = new_items.evaluate

    def spy(score_fn, scored, split, *args, **kwargs):
        splits.append(split)
        return real(score_fn, scored, split, *args, **kwargs)

    monkeypatch.setattr(new_items, "evaluate", spy)
    channel = _channel(cold, tmp_path)
    assert splits and set(splits) == {"val"}
    # the same data with the users' test targets shuffled among them: the same calibration
    last = cold.offsets[1:] - 1
    shuffled = cold.items.copy()
    shuffled[last] = cold.items[last][np.random.default_rng(0).permutation(len(last))]
    other = type(cold)(**{**cold.__dict__, "items": shuffled})
    assert not np.array_equal(other.split_bounds("test")[2], cold.split_bounds("test")[2])
    again = _channel(other, tmp_path)
    assert (again.slope, again.offset, again.validation) == (channel.slope, channel.offset, channel.validation)


def test_only_new_items_change_and_their_score_follows_content_and_memory(tmp_path, cold):
    text, visual = load_features(tiny_features(tmp_path))
    knn = content_knn_scorer(cold, visual.features.float(), text.features.float())
    popular = popularity_scorer(cold)
    new = torch.from_numpy(cold.cold_items)
    reference = torch.from_numpy(reference_items(cold, 0, pseudo_new_items(cold, 0)))
    scorer = channel_scorer(popular, knn, item_mask(cold.num_items, cold.cold_items), reference, 1.0, 0.0)
    seq = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 21, 22, 23, 24, 25]])  # genre A (items 1-20), genre B (21-40)
    users = np.array([0, 1])
    scores, base = scorer(users, seq, None), popular(users, seq, None).double()
    warm = torch.from_numpy(cold.warm_items())
    assert torch.equal(scores[:, warm], base[:, warm])  # warm items (pseudo-new ones too) keep the model's
    assert not torch.equal(scores[:, new], base[:, new])
    # popularity gives both users the same scale: a new item ranks by the user's memory (recent items)
    in_a, in_b = new[new <= 20], new[new > 20]
    assert len(in_a) and len(in_b)
    assert (scores[0, in_a].mean() > scores[1, in_a].mean()) and (scores[1, in_b].mean() > scores[0, in_b].mean())
    # ... and by its own content: the same new item with another genre's features scores otherwise
    item = int(in_a[0])
    moved_visual, moved_text = visual.features.float().clone(), text.features.float().clone()
    moved_visual[item], moved_text[item] = moved_visual[30], moved_text[30]
    moved = channel_scorer(popular, content_knn_scorer(cold, moved_visual, moved_text),
                           item_mask(cold.num_items, cold.cold_items), reference, 1.0, 0.0)(users, seq, None)
    assert moved[0, item] < scores[0, item] and moved[1, item] > scores[1, item]
    # given candidates (sampled protocol, item blocks): the same scores as the full catalogue's
    items = torch.stack([new[:5], new[-5:]])
    assert torch.allclose(scorer(users, seq, items), scores.gather(1, items))


def test_the_channel_lifts_new_targets_popularity_cannot_reach(tmp_path, cold):
    channel = _channel(cold, tmp_path)
    alone = evaluate(popularity_scorer(cold), cold, "test", "full")
    lifted = evaluate(channel.scorer(popularity_scorer(cold)), cold, "test", "full")
    assert alone["new"]["HR@10"] == 0.0 < lifted["new"]["HR@10"]
    assert channel.summary()["pseudo_new_items"] == len(pseudo_new_items(cold, 0))


def test_inactive_and_bit_identical_without_new_items(tmp_path, data):
    assert _channel(data, tmp_path) is None
    features = tiny_features(tmp_path)
    a = run_federated(tiny_config(1), data, tmp_path / "a", progress=False)
    b = run_federated(tiny_config(1, new_item_channel="content"), data, tmp_path / "b", features, progress=False)
    assert a["final"] == b["final"] and "new_item_channel" not in b
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_a_run_with_the_channel_reports_it_beside_the_model_alone(tmp_path, data, cold):
    features = tiny_features(tmp_path)
    config = tiny_config(1, cold_item_fraction=FRACTION, cold_item_seed=SEED, new_item_channel="content")
    with pytest.raises(ValueError, match="pass --features"):
        run_federated(config, data, tmp_path / "nofeatures", progress=False)
    history = run_federated(config, data, tmp_path / "run", features, progress=False)
    channel = history["new_item_channel"]
    alone = channel["final_without_channel"]
    for key in ("val_full", "test_full", "test_sampled"):
        assert history["final"][key]["users"] == alone[key]["users"]
    # the restored run, calibrated again: the same channel and the same scores
    run = restore(tmp_path / "run", data, features)
    again = new_item_channel(run.scorer, run.data, features, run.config.seed, max_len=run.config.max_seq_len)
    assert (again.slope, again.offset) == (channel["slope"], channel["offset"])
    result = evaluate(again.scorer(run.scorer("test")), run.data, "test", "full", seed=run.config.seed,
                      max_len=run.config.max_seq_len, batch_size=64)
    assert result["NDCG@10"] == pytest.approx(history["final"]["test_full"]["NDCG@10"])
    json.dumps(history)  # the history is JSON


def test_an_unknown_channel_is_a_config_error():
    with pytest.raises(ConfigError, match="new_item_channel"):
        tiny_config(1, new_item_channel="knn")


def test_feddmmr_evaluate_scores_a_run_with_its_channel_or_without(tmp_path, data):
    import subprocess
    import sys

    features = tiny_features(tmp_path)
    config = tiny_config(1, cold_item_fraction=FRACTION, cold_item_seed=SEED, new_item_channel="content")
    history = run_federated(config, data, tmp_path / "run", features, progress=False)
    base = [sys.executable, "-m", "feddmmr.cli", "evaluate", "--checkpoint", str(tmp_path / "run"), "--data",
            data.source.rsplit("/", 1)[0], "--features", str(features), "--protocol", "full", "--json"]
    for extra, expected in (([], history["final"]["test_full"]),
                            (["--new-item-channel", "off"],
                             history["new_item_channel"]["final_without_channel"]["test_full"])):
        done = subprocess.run(base + extra, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["NDCG@10"] == pytest.approx(expected["NDCG@10"])
        assert result["new"] == pytest.approx(expected["new"])
        assert ("new_item_channel" in result) == (not extra)


def test_the_pipeline_reports_each_stage_with_its_channel_and_without(tmp_path, data):
    from .test_cli import TINY, feddmmr

    out = tmp_path / "pipe"
    result = feddmmr("pipeline", "--data", data.source.rsplit("/", 1)[0], "--top-users", "all", "--features",
                     str(tiny_features(tmp_path)), "--out", str(out), "--no-progress", *TINY,
                     "--set", f"cold_item_fraction={FRACTION}", "--set", f"cold_item_seed={SEED}",
                     "--set", "new_item_channel=content")
    assert result.returncode == 0, result.stderr
    runs = json.loads((out / "report.json").read_text())["runs"]
    for stage in ("stage1_cohort20_eps", "stage3_tuned"):
        assert {"slope", "offset"} == set(runs[stage]["new_item_channel"])
        assert f"{stage} (no new-item channel)" in runs
    assert "| stage1_cohort20_eps (no new-item channel) | full, new targets" in (out / "report.md").read_text()


def test_the_neighbours_signal_borrows_the_models_scores_of_content_neighbours(tmp_path, cold):
    text, visual = load_features(tiny_features(tmp_path))
    vectors = new_items.content_item_vectors(cold, visual.features.float(), text.features.float())
    pool = np.setdiff1d(cold.warm_items(), pseudo_new_items(cold, 0))
    signal = new_items.neighbour_signal(vectors, pool, k=3)(popularity_scorer(cold))
    users, seq = np.array([0]), torch.tensor([[1, 2, 3]])
    full = signal(users, seq, None)
    counts = popularity_scorer(cold)(users, seq, None).double()[0]
    item = int(cold.cold_items[0])
    sims = vectors[item] @ vectors[torch.from_numpy(pool)].T
    near = torch.from_numpy(pool)[sims.topk(3).indices]  # a new item's score: its neighbours' counts
    weights = sims.topk(3).values.clamp_min(0)
    assert full[0, item].item() == pytest.approx((counts[near] * weights).sum().item() / weights.sum().item())
    assert torch.allclose(signal(users, seq, torch.tensor([[item, 5]])), full[:, [item, 5]])
    channel = new_item_channel(lambda split: popularity_scorer(cold), cold, tiny_features(tmp_path), 0,
                               signal="neighbours")
    assert channel.summary()["signal"] == "neighbours"
