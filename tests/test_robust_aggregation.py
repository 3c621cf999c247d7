"""Poisoned updates (issue 8): the server validates every client update, can clip update deltas,
and can aggregate with a robust rule; injected attacks (benchmarks/tests only) check all three."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from feddmmr.config import ConfigError, TrainConfig
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.faults import attack_state, pick_attackers
from feddmmr.federation.server import (ITEM_EMBEDDING_KEY, RobustAggregator, ServerOptimizer, aggregate,
                                       check_update, clip_update, make_aggregator, update_norm)
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset

pytestmark = pytest.mark.reliability

GLOBAL = {"w": torch.zeros(3), ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}


def state(w, emb=None) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w, dtype=torch.float32),
            ITEM_EMBEDDING_KEY: torch.zeros(4, 2) if emb is None else torch.tensor(emb, dtype=torch.float32)}


# --------------------------------------------------------------------------- aggregation arithmetic

W = [([1.0, 10.0, -1.0], 1), ([2.0, 20.0, -2.0], 1), ([3.0, 30.0, -3.0], 2), ([4.0, 40.0, -4.0], 1),
     ([100.0, -100.0, 0.0], 5)]


@pytest.mark.parametrize("aggregation, expected", [
    ("fedavg", [(1 + 2 + 6 + 4 + 500) / 10, (10 + 20 + 60 + 40 - 500) / 10, (-1 - 2 - 6 - 4) / 10]),
    ("fedprox", [(1 + 2 + 6 + 4 + 500) / 10, (10 + 20 + 60 + 40 - 500) / 10, (-1 - 2 - 6 - 4) / 10]),
    ("median", [3.0, 20.0, -2.0]),  # unweighted: every client one value
    ("trimmed_mean", [(2 + 3 + 4) / 3, (10 + 20 + 30) / 3, (-3 - 2 - 1) / 3]),  # drop 1 of 5 at each end
])
def test_each_aggregator_on_hand_made_updates(aggregation, expected):
    out = aggregate(GLOBAL, [(state(w), n) for w, n in W], aggregation=aggregation, trim_fraction=0.2)
    assert torch.allclose(out["w"], torch.tensor(expected), atol=1e-5)
    assert out["w"].dtype == torch.float32


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    out = aggregate(GLOBAL, [(state([v, 0.0, 0.0]), 1) for v in (1.0, 2.0, 4.0, 100.0)], aggregation="median")
    assert out["w"][0].item() == 3.0


def test_trimmed_mean_trims_nothing_with_too_few_clients_and_zero_samples_do_not_count():
    updates = [(state([1.0, 0, 0]), 1), (state([2.0, 0, 0]), 1), (state([9.0, 0, 0]), 1), (state([-50.0, 0, 0]), 0)]
    out = aggregate(GLOBAL, updates, aggregation="trimmed_mean", trim_fraction=0.1)  # floor(0.3) = 0 dropped
    assert out["w"][0].item() == pytest.approx(4.0)


def test_robust_item_rows_use_only_the_clients_that_updated_them():
    a = [[0, 0], [1, 1], [2, 2], [0, 0]]
    b = [[0, 0], [0, 0], [4, 4], [0, 0]]
    c = [[0, 0], [0, 0], [9, 9], [0, 0]]
    updates = [(state([0, 0, 0], e), 1) for e in (a, b, c)]
    median = aggregate(GLOBAL, updates, aggregation="median")[ITEM_EMBEDDING_KEY]
    assert median[1].tolist() == [1.0, 1.0]  # only a changed row 1: b and c do not drag it to 0
    assert median[2].tolist() == [4.0, 4.0]
    assert median[0].tolist() == [0.0, 0.0] and median[3].tolist() == [0.0, 0.0]  # untouched: global value
    plain = aggregate(GLOBAL, updates, "fedavg", aggregation="median")[ITEM_EMBEDDING_KEY]
    assert plain[1].tolist() == [0.0, 0.0]  # item_embedding_aggregation=fedavg: every client counts


def test_robust_reduction_in_chunks_equals_one_pass(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    glob = {ITEM_EMBEDDING_KEY: torch.zeros(50, 3), "w": torch.zeros(7, 5)}
    updates = []
    for _ in range(9):
        emb = torch.zeros(50, 3)
        rows = torch.randint(0, 50, (20,), generator=generator)
        emb[rows] = torch.randn(20, 3, generator=generator)
        updates.append(({ITEM_EMBEDDING_KEY: emb, "w": torch.randn(7, 5, generator=generator)}, 1))
    for kind in ("median", "trimmed_mean"):
        whole = aggregate(glob, updates, aggregation=kind, trim_fraction=0.2)
        monkeypatch.setattr(RobustAggregator, "CHUNK_ELEMENTS", 20)
        chunked = aggregate(glob, updates, aggregation=kind, trim_fraction=0.2)
        monkeypatch.undo()
        assert all(torch.equal(whole[k], chunked[k]) for k in glob)


def test_robust_aggregators_cannot_be_pre_aggregated_and_unknown_names_fail():
    with pytest.raises(NotImplementedError, match="median"):
        make_aggregator(GLOBAL, "median").partial()
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        make_aggregator(GLOBAL, "mean")


def test_the_server_optimizer_steps_toward_the_robust_aggregate():
    robust = aggregate(GLOBAL, [(state(w), n) for w, n in W], aggregation="median")
    step = ServerOptimizer("fedavgm", learning_rate=0.5).step(GLOBAL, robust)
    assert torch.allclose(step["w"], 0.5 * robust["w"])


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, reason", [
    ({"w": torch.tensor([0.0, float("nan"), 0.0]), ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}, "1 non-finite"),
    ({"w": torch.tensor([float("inf"), 0.0, -float("inf")]), ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}, "2 non-finite"),
    ({"w": torch.zeros(4), ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}, r"w: shape \(4,\), expected \(3,\)"),
    ({"w": torch.zeros(3)}, "missing key"),
    ({"w": torch.zeros(3), ITEM_EMBEDDING_KEY: torch.zeros(4, 2), "extra": torch.zeros(1)}, "unexpected key"),
    ({"w": torch.zeros(3, dtype=torch.int64), ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}, "floating-point"),
    ({"w": [0.0, 0.0, 0.0], ITEM_EMBEDDING_KEY: torch.zeros(4, 2)}, "not a tensor"),
    ([1, 2, 3], "not a dict"),
])
def test_malformed_updates_are_rejected_with_a_reason(bad, reason):
    import re

    found = check_update(GLOBAL, bad, 3)
    assert found is not None and re.search(reason, found), found


@pytest.mark.parametrize("count", [float("nan"), -1, float("inf"), "12", True])
def test_a_bad_sample_count_is_rejected(count):
    assert "num_samples" in check_update(GLOBAL, state([1.0, 2.0, 3.0]), count)


def test_a_valid_update_passes():
    assert check_update(GLOBAL, state([1.0, 2.0, 3.0]), 7) is None
    assert check_update(GLOBAL, {k: v.double() for k, v in state([1.0, 2.0, 3.0]).items()}, 0) is None


# --------------------------------------------------------------------------- clipping

def test_clipping_bounds_the_delta_norm_and_keeps_its_direction():
    glob = {"w": torch.tensor([1.0, 1.0, 1.0]), ITEM_EMBEDDING_KEY: torch.ones(4, 2)}
    big = {"w": torch.tensor([4.0, 5.0, 1.0]), ITEM_EMBEDDING_KEY: torch.ones(4, 2)}
    big[ITEM_EMBEDDING_KEY][2] = torch.tensor([13.0, 1.0])  # delta (3, 4, 0 | 12, 0): norm 13
    clipped, norm = clip_update(glob, big, 1.3)
    assert norm == pytest.approx(13.0)
    assert update_norm(glob, clipped) == pytest.approx(1.3, rel=1e-6)
    assert torch.allclose(clipped["w"], torch.tensor([1.3, 1.4, 1.0]))
    assert torch.equal(clipped[ITEM_EMBEDDING_KEY][[0, 1, 3]], glob[ITEM_EMBEDDING_KEY][[0, 1, 3]])  # untouched rows
    assert clipped[ITEM_EMBEDDING_KEY][2].tolist() == pytest.approx([2.2, 1.0])


def test_clipping_leaves_a_small_delta_unchanged():
    small = state([0.3, 0.4, 0.0])
    clipped, norm = clip_update(GLOBAL, small, 1.0)
    assert clipped is small and norm == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(GLOBAL, small, 0.0)



def test_the_screen_aggregates_exactly_the_valid_updates_and_counts_them():
    """``UpdateScreen``: a valid update is (clipped and) aggregated and counted as accepted, an invalid
    one is recorded with its reason and never reaches the aggregate. A round whose every update was
    rejected is an error; one valid update among rejected ones is a normal round."""
    from feddmmr.federation.server import UpdateScreen

    bad = state([float("nan"), 0.0, 0.0])
    screen = UpdateScreen(GLOBAL, make_aggregator(GLOBAL), round_number=1)
    assert screen.offer(1, state([1.0, 0.0, 0.0]), 1)
    assert not screen.offer(2, bad, 1)
    assert screen.offer(3, state([3.0, 0.0, 0.0]), 3)
    assert screen.accepted == 2 and [r["user"] for r in screen.rejected] == [2] and screen.clipped == 0
    assert screen.result()["w"].tolist() == [2.5, 0.0, 0.0]  # (1 * 1 + 3 * 3) / 4, the NaN update left out
    clipping = UpdateScreen(GLOBAL, make_aggregator(GLOBAL), clip_norm=1.0, round_number=1)
    assert clipping.offer(1, state([3.0, 4.0, 0.0]), 1) and clipping.offer(2, state([0.5, 0.0, 0.0]), 1)
    assert clipping.clipped == 1 and clipping.accepted == 2
    assert torch.allclose(clipping.result()["w"], torch.tensor([(0.6 + 0.5) / 2, 0.4, 0.0]))
    one = UpdateScreen(GLOBAL, make_aggregator(GLOBAL), round_number=2)
    one.offer(1, bad, 1)
    one.offer(2, state([2.0, 0.0, 0.0]), 1)
    assert one.result()["w"].tolist() == [2.0, 0.0, 0.0]
    none = UpdateScreen(GLOBAL, make_aggregator(GLOBAL), round_number=3)
    none.offer(1, bad, 1)
    with pytest.raises(RuntimeError, match="round 3: every client update was rejected"):
        none.result()
    # a node's pre-aggregated sum (Flower) goes through the same check, named by its source
    node = make_aggregator(GLOBAL)
    node.add(state([2.0, 0.0, 0.0]), 2)
    sums, row_weight, total = node.partial()
    poisoned = {key: value.clone() for key, value in sums.items()}
    poisoned["w"][0] = float("inf")
    partitions = UpdateScreen(GLOBAL, make_aggregator(GLOBAL), round_number=4)
    assert partitions.offer_sum({"partition": 0}, sums, row_weight, total)
    assert not partitions.offer_sum({"partition": 1}, poisoned, row_weight, total)
    assert partitions.accepted == 1 and [r["partition"] for r in partitions.rejected] == [1]
    assert partitions.result()["w"].tolist() == [2.0, 0.0, 0.0]


# --------------------------------------------------------------------------- config keys

@pytest.mark.parametrize("key, value, message", [
    ("aggregation", "krum", "'aggregation'"),
    ("trim_fraction", 0.5, "'trim_fraction'"),
    ("trim_fraction", -0.1, "'trim_fraction'"),
    ("clip_norm", -1.0, "'clip_norm'"),
    ("clip_norm", float("inf"), "'clip_norm'"),
    ("attack", "flood", "'attack'"),
    ("attack_fraction", 1.5, "'attack_fraction'"),
    ("attack_scale", float("nan"), "'attack_scale'"),
])
def test_out_of_range_robustness_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(1, **{key: value})


def test_fedprox_needs_a_positive_mu(tmp_path):
    with pytest.raises(ConfigError, match="'fedprox_mu'.*> 0"):
        tiny_config(1, aggregation="fedprox")
    assert tiny_config(1, aggregation="fedprox", fedprox_mu=0.01).aggregation == "fedprox"
    config = TrainConfig()
    config.aggregation = "fedprox"  # set directly, not through overrides: the runner still refuses it
    with pytest.raises(ConfigError, match="fedprox_mu"):
        run_federated(config, tiny_dataset(tmp_path), tmp_path / "unused")


# --------------------------------------------------------------------------- injected attacks

def test_attackers_are_a_seeded_fraction_of_the_sampled_clients():
    users = np.arange(0, 200, 2)
    picked = pick_attackers(users, 0.1, seed=3, round_number=4)
    assert len(picked) == 10 and set(picked) <= set(users)
    assert np.array_equal(picked, pick_attackers(users, 0.1, 3, 4))
    assert not np.array_equal(picked, pick_attackers(users, 0.1, 3, 5))
    assert len(pick_attackers(users[:6], 0.1, 0, 1)) == 1 and len(pick_attackers(users, 0.0, 0, 1)) == 0


def test_attacks_act_on_the_update_delta():
    glob = {"w": torch.tensor([1.0, 1.0])}
    honest = {"w": torch.tensor([2.0, 1.0])}
    assert attack_state(glob, honest, "scale", 10.0)["w"].tolist() == [11.0, 1.0]
    assert attack_state(glob, honest, "sign_flip", 10.0)["w"].tolist() == [-9.0, 1.0]
    assert torch.isnan(attack_state(glob, honest, "nan", 10.0)["w"]).all()


def final_parameters(run_dir) -> dict[str, torch.Tensor]:
    """The global model after the last round (the resume point), not the best round's."""
    return ckpt.load_weights(run_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE)


def test_nan_attackers_are_rejected_logged_and_the_federation_stays_finite(tmp_path, caplog):
    data = tiny_dataset(tmp_path)  # 12 users, 6 per round, 20 %: one attacker per round
    with caplog.at_level(logging.WARNING, logger="feddmmr.runner"):
        history = run_federated(tiny_config(1, attack="nan", attack_fraction=0.2), data, tmp_path / "nan",
                                progress=False)
    for entry in history["rounds"]:
        assert len(entry["attackers"]) == 1
        assert [r["user"] for r in entry["rejected"]] == entry["attackers"]
        assert "non-finite" in entry["rejected"][0]["reason"]
        assert all(math.isfinite(v) for v in entry["losses"].values())
    assert sum("rejected the update of user" in r.getMessage() for r in caplog.records) == 2
    assert all(torch.isfinite(v).all() for v in final_parameters(tmp_path / "nan").values())
    assert math.isfinite(history["final"]["test_sampled"]["HR@10"])


def test_clipping_in_a_federation_is_counted_per_round(tmp_path):
    data = tiny_dataset(tmp_path)
    history = run_federated(tiny_config(1, num_rounds=1, clip_norm=1e-3), data, tmp_path / "clip", progress=False)
    assert history["rounds"][0]["clipped"] == 6 and "rejected" not in history["rounds"][0]  # only when any


@pytest.mark.parametrize("attack", ["sign_flip", "scale"])
def test_robust_aggregators_stay_closer_to_their_clean_run_than_fedavg(tmp_path, attack):
    data = tiny_dataset(tmp_path)

    def distance(aggregation: str) -> float:
        keys = dict(aggregation=aggregation, trim_fraction=0.2)
        clean = run_federated(tiny_config(1, **keys), data, tmp_path / f"clean_{aggregation}", progress=False)
        attacked = run_federated(tiny_config(1, attack=attack, attack_fraction=0.2, attack_scale=10.0, **keys),
                                 data, tmp_path / f"{attack}_{aggregation}", progress=False)
        assert [len(r["attackers"]) for r in attacked["rounds"]] == [1, 1] and clean["rounds"]
        a, b = final_parameters(tmp_path / f"clean_{aggregation}"), final_parameters(tmp_path / f"{attack}_{aggregation}")
        return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))

    fedavg = distance("fedavg")
    assert distance("median") < fedavg and distance("trimmed_mean") < fedavg
