"""Client dropouts in-process: a round aggregates the clients that answered, logs the others,
and stops (resumably) when fewer than ``min_clients`` answered."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from feddmmr.config import ConfigError, TrainConfig, apply_overrides
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.client import LocalTrainer
from feddmmr.federation.server import TooFewClients, dropped_clients, sample_clients
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("dropouts"))  # 12 users; tiny_config samples 6 a round


def trained_users(monkeypatch) -> list[list[int]]:
    """Record which clients each ``train_many`` call trains."""
    calls: list[list[int]] = []
    original = LocalTrainer.train_many

    def spy(self, clients, *args, **kwargs):
        calls.append([c.user for c in clients])
        return original(self, clients, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "train_many", spy)
    return calls


def test_the_dropped_clients_are_a_seeded_fraction_of_the_sampled_ones():
    selected = sample_clients(100, 0.2, seed=0, round_number=3)
    dropped = dropped_clients(selected, 0.25, seed=0, round_number=3)
    assert len(dropped) == 5 and set(dropped) <= set(selected)
    assert np.array_equal(dropped, dropped_clients(selected, 0.25, seed=0, round_number=3))
    assert not np.array_equal(dropped, dropped_clients(selected, 0.25, seed=0, round_number=4))
    assert len(dropped_clients(selected, 0.0, 0, 3)) == 0


@pytest.mark.parametrize("key, value, message", [
    ("client_dropout", "1.0", r"'client_dropout' = 1.0 is out of range; allowed: \[0, 1\)"),
    ("client_dropout", "-0.1", r"'client_dropout' = -0.1 is out of range"),
    ("min_clients", "0", r"'min_clients' = 0 is out of range; allowed: >= 1"),
])
def test_out_of_range_values_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), {key: value}, "--set")


def test_a_quorum_larger_than_a_round_is_refused_before_training(data, tmp_path):
    with pytest.raises(ConfigError, match="min_clients=7 exceeds the 6 clients sampled per round"):
        run_federated(tiny_config(1, min_clients=7), data, tmp_path / "run", progress=False)


def test_dropped_clients_are_logged_and_not_aggregated(data, tmp_path, monkeypatch, caplog):
    calls = trained_users(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="feddmmr.runner"):
        history = run_federated(tiny_config(1, client_dropout=0.5), data, tmp_path / "run", progress=False)
    for number, (entry, trained) in enumerate(zip(history["rounds"], calls), start=1):
        selected = sample_clients(data.num_users, 0.5, 0, number).tolist()
        assert entry["dropped"] == dropped_clients(selected, 0.5, 0, number).tolist()
        assert len(entry["dropped"]) == 3 and set(entry["dropped"]) <= set(selected)
        assert sorted(trained) == sorted(set(selected) - set(entry["dropped"]))  # only they reach the aggregate
        assert entry["clients"] == 3
        assert entry["samples"] == sum(len(data.sequence(u)) - 3 for u in trained)
        assert set(entry["drop_reasons"].values()) == {"fault injection (client_dropout)"}
        assert f"round {number}: 3 of 6 sampled clients dropped: user {entry['dropped'][0]}" in caplog.text
    saved = json.loads((tmp_path / "run" / ckpt.HISTORY_FILE).read_text())
    assert saved["rounds"][0]["dropped"] == history["rounds"][0]["dropped"]
    clean = run_federated(tiny_config(1), data, tmp_path / "clean", progress=False)
    assert clean["rounds"][0]["dropped"] == [] and "drop_reasons" not in clean["rounds"][0]


def test_too_few_answers_stop_the_run_resumably(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TooFewClients, match=r"round 1: the updates of 3 of 6 sampled clients arrived, fewer than min_clients=4 \(dropped: user "):
        run_federated(tiny_config(1, client_dropout=0.5, min_clients=4), data, out, progress=False)
    assert json.loads((ckpt.resume_dir(out) / "state.json").read_text())["round"] == 0
    # relaxing the quorum is the one change a resume accepts besides num_rounds
    history = run_federated(tiny_config(1, client_dropout=0.5, min_clients=3), data, out, resume=True,
                            progress=False)
    assert [r["round"] for r in history["rounds"]] == [1, 2]


def test_a_client_whose_training_raises_is_dropped_and_the_run_continues(data, tmp_path, monkeypatch, caplog):
    bad = int(sample_clients(data.num_users, 0.5, 0, 1)[2])
    calls = trained_users(monkeypatch)
    original = LocalTrainer._train_group

    def broken(self, clients, seeds, prototypes):
        if any(c.user == bad for c in clients):
            raise RuntimeError("device out of memory")
        return original(self, clients, seeds, prototypes)

    monkeypatch.setattr(LocalTrainer, "_train_group", broken)
    with caplog.at_level(logging.WARNING, logger="feddmmr.runner"):
        history = run_federated(tiny_config(1, num_rounds=3), data, tmp_path / "run", progress=False)
    assert [r["round"] for r in history["rounds"]] == [1, 2, 3] and "final" in history
    for number, entry in enumerate(history["rounds"], start=1):
        selected = sample_clients(data.num_users, 0.5, 0, number).tolist()
        if bad in selected:
            assert entry["dropped"] == [bad] and entry["clients"] == len(selected) - 1
            assert entry["drop_reasons"] == {str(bad): "RuntimeError: device out of memory"}
        else:
            assert entry["dropped"] == [] and entry["clients"] == len(selected)
    # the failing vmapped group was retried client by client: the others still answered
    assert calls[0] == sorted(calls[0]) and len(calls) > 3
    assert f"user {bad}: RuntimeError: device out of memory" in caplog.text
