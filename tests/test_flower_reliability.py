"""The Flower deployment under faults, and SecAgg+.

* Dropouts: a wave uses the replies that arrive within ``round_timeout``; a node that failed is
  logged and recorded as dropped, one that timed out is lost for the rest of the run; the run
  stops with a clear error only when fewer than ``min_clients`` sampled clients' updates arrived.
* Robust aggregation and clipping: nodes send each client's update, and the ServerApp takes them
  through the in-process runner's screen (check, clip, median / trimmed mean): the same model as
  ``feddmmr train``; a NaN update is rejected by user, a bad partition sum by partition.
* SecAgg+ (``secure_aggregation=true``): the server gets only the sum of the nodes' updates; the
  model equals the plain run's up to the quantization error; robust aggregators and clipping are refused.

Most tests drive the real ServerApp loop and ClientApp through :class:`tests.flowertools.LocalGrid`
(no processes, seconds); two run on a loopback SuperLink with real SuperNodes, one of them
killed with SIGKILL mid-run.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr.config import ConfigError
from feddmmr.evaluation import METRIC_NAMES
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.server import ITEM_EMBEDDING_KEY, TooFewClients, sample_clients
from feddmmr.flower import core, deploy, secure
from feddmmr.flower.server_app import run_server
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset
from feddmmr.config import apply_overrides, validate_config
from .flowertools import LocalGrid
from .test_flower import TINY

pytestmark = [pytest.mark.flower, pytest.mark.reliability]

CONFIG = tiny_config(1, dropout=0.0)  # TINY's config: 12 users, 6 sampled a round, 2 rounds


@pytest.fixture(autouse=True)
def offline_flower(tmp_path, monkeypatch):
    for key, value in deploy.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flower_faults")
    tiny_dataset(root)
    return root / "data"


def run_config(data_dir: Path, out: Path, **overrides) -> dict:
    return {**core.default_app_config(), **TINY, "data": str(data_dir), "out": str(out), "round_timeout": 1.0,
            "node_wait": 5.0, **overrides}


def sampled_in(partition: int, round_number: int, partitions: int) -> list[int]:
    selected = sample_clients(12, CONFIG.client_fraction, CONFIG.seed, round_number)
    return core.group_by_partition(selected, partitions).get(partition, [])


def is_train(round_number: int | None = None):
    """A predicate: the train message (of a round) that carries the node's work (also a SecAgg+ stage's)."""
    def check(message) -> bool:
        config = message.content.get("config")
        return config is not None and "users" in config and (round_number is None or config["round"] == round_number)
    return check


def finite_metrics(history: dict) -> bool:
    results = history["val_metrics"] + list(history["final"].values())
    return all(math.isfinite(r[name]) for r in results for name in METRIC_NAMES)


# --------------------------------------------------------------------------- dropouts (in-process grid)

def test_a_node_that_stops_answering_is_dropped_and_lost_and_the_run_finishes(data_dir, tmp_path, capsys):
    config = run_config(data_dir, tmp_path / "run")
    grid = LocalGrid(config, 3)
    grid.silent_when[grid.node(1)] = lambda message: message.metadata.message_type != "query"  # killed after joining
    history = run_server(grid, config)
    for entry in history["rounds"]:
        missing = sampled_in(1, entry["round"], 3)
        assert entry.get("dropped", []) == missing
        assert entry["clients"] == 6 - len(missing)
    assert history["flower"]["lost"] == [{"partition": 1, "node": grid.node(1),
                                          "reason": "no reply within 1s in train 1"}]
    first = next(w for w in history["flower"]["waves"] if w["message"] == "train")
    assert first["dropped"] == [{"partition": 1, "node": grid.node(1), "reason": "no reply within 1s"}]
    # once lost, the node gets no more messages; evaluation covers the users of the other nodes
    assert all(r["users"] == 8 for r in history["val_metrics"] + list(history["final"].values()))
    assert finite_metrics(history)
    assert "dropped partition 1" in capsys.readouterr().out


def test_a_node_whose_clientapp_fails_is_dropped_for_that_round_only(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path / "run")
    grid = LocalGrid(config, 3)
    grid.fail_when[grid.node(2)] = is_train(round_number=1)
    history = run_server(grid, config)
    first, second = history["rounds"]
    assert first["dropped"] == sampled_in(2, 1, 3) and second["dropped"] == []
    assert second["clients"] == 6 and history["flower"]["lost"] == []
    wave = next(w for w in history["flower"]["waves"] if w["message"] == "train")
    assert "injected failure on node" in wave["dropped"][0]["reason"]
    assert finite_metrics(history)


def test_too_few_arrived_clients_stop_the_run_with_a_clear_error(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path / "run", min_clients=6)  # every sampled client must arrive
    grid = LocalGrid(config, 3)
    grid.silent_when[grid.node(0)] = is_train()
    missing = len(sampled_in(0, 1, 3))
    with pytest.raises(TooFewClients, match=rf"round 1: the updates of {6 - missing} of 6 sampled clients arrived, "
                                            r"fewer than min_clients=6 \(dropped: user \d+: partition 0 \(node 1000\): "
                                            r"no reply within 1s"):
        run_server(grid, config)


# --------------------------------------------------------------------------- robust aggregation and clipping

ROBUST_CASES = {"median": {"aggregation": "median"},
                "trimmed-mean": {"aggregation": "trimmed_mean", "trim_fraction": 0.2},
                "fedavg-clipped": {"clip_norm": 1e-3},
                "median-clipped": {"aggregation": "median", "clip_norm": 1e-3}}


@pytest.mark.parametrize("keys", list(ROBUST_CASES.values()), ids=list(ROBUST_CASES))
def test_robust_aggregation_and_clipping_on_flower_give_the_in_process_model(tmp_path, keys):
    data = tiny_dataset(tmp_path)
    inproc = run_federated(apply_overrides(tiny_config(1, dropout=0.0), dict(keys), "test"), data,
                           tmp_path / "inproc", progress=False)
    config = run_config(tmp_path / "data", tmp_path / "flower", **keys)
    grid = LocalGrid(config, 3)
    history = run_server(grid, config)
    assert _max_difference(_weights(tmp_path / "inproc"), _weights(tmp_path / "flower")) < 1e-6
    assert [r["clients"] for r in history["rounds"]] == [r["clients"] for r in inproc["rounds"]]
    if "clip_norm" in keys:  # every honest update of the tiny model is longer than 1e-3
        assert [r["clipped"] for r in history["rounds"]] == [r["clipped"] for r in inproc["rounds"]] == [6, 6]
    train_replies = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert train_replies and all("each" in m.content and not m.content["sums"] for m in train_replies)


def _poison(monkeypatch, user: int | None) -> None:
    """Nodes return NaN for ``user``'s update (None: NaN in every partition sum)."""
    train = core.NodeRuntime.train

    def poisoned(self, users, global_state, round_number, prototypes):
        update = train(self, users, global_state, round_number, prototypes)
        for other, state, _ in update.each:
            if other == user:
                state[ITEM_EMBEDDING_KEY] = torch.full_like(state[ITEM_EMBEDDING_KEY], float("nan"))
        if user is None and update.sums:
            update.sums[ITEM_EMBEDDING_KEY][0, 0] = float("nan")
        return update

    monkeypatch.setattr(core.NodeRuntime, "train", poisoned)


def test_a_nan_client_update_on_flower_is_rejected_by_user_and_the_model_stays_finite(data_dir, tmp_path,
                                                                                      monkeypatch):
    victim = sampled_in(1, 1, 3)[0]
    _poison(monkeypatch, victim)
    config = run_config(data_dir, tmp_path / "run", aggregation="median")
    history = run_server(LocalGrid(config, 3), config)
    first = history["rounds"][0]
    assert [r["user"] for r in first["rejected"]] == [victim]
    assert "non-finite" in first["rejected"][0]["reason"]
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "run").values())
    assert finite_metrics(history)


def test_a_nan_partition_sum_on_flower_is_rejected_by_partition(data_dir, tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, None)
    config = run_config(data_dir, tmp_path / "run")  # FedAvg: the nodes send sums
    with pytest.raises(RuntimeError, match="round 1: every client update was rejected"):
        run_server(LocalGrid(config, 3), config)
    assert "rejected the update of {'partition': 0}" in caplog.text


def test_flower_refuses_in_process_fault_injection():
    for keys, message in (({"attack": "sign_flip"}, "attack='sign_flip'"), ({"client_dropout": 0.2}, "client_dropout")):
        with pytest.raises(ConfigError, match=f"the Flower app does not support {message}"):
            validate_config(tiny_config(1, **keys), transport="flower")
    validate_config(tiny_config(1, aggregation="median", clip_norm=1.0), transport="flower")  # supported now


# --------------------------------------------------------------------------- SecAgg+

def test_the_secure_vector_layout_round_trips_and_refuses_entries_beyond_the_clipping_range():
    glob = {ITEM_EMBEDDING_KEY: torch.zeros(4, 2), "w": torch.zeros(3), "gate": torch.tensor(0.0)}
    layout = secure.Layout.of(glob, "updated_rows")
    update = core.NodeUpdate({ITEM_EMBEDDING_KEY: torch.tensor([[0.0, 0.0], [3.0, -6.0], [0.0, 0.0], [1.0, 1.0]],
                                                               dtype=torch.float64),
                              "w": torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64),
                              "gate": torch.tensor(0.5, dtype=torch.float64)},
                             torch.tensor([0.0, 3.0, 0.0, 1.0], dtype=torch.float64), 4.0, [],
                             {"next_item": 9.0, "contrastive": 0.0}, 4, 2)
    vector = layout.pack(update, scale=4.0, clipping=8.0)
    assert vector.shape == (layout.size,) and np.abs(vector).max() <= 8.0
    back = layout.unpack(vector, scale=4.0, clients=2)
    assert all(torch.equal(back.sums[k], update.sums[k]) for k in update.sums)
    assert torch.equal(back.row_weight, update.row_weight) and (back.total, back.samples) == (4.0, 4)
    assert back.losses["next_item"] == 9.0 and back.losses["load_balance"] == 0.0
    empty = layout.pack(core.NodeUpdate({}, None, 0.0, [], {}, 0, 0), 4.0, 8.0)  # a node with no sampled users
    assert not empty.any()
    with pytest.raises(ValueError, match=r"reaches 1.5, outside the clipping range \+-1.0; raise secagg_clipping"):
        layout.pack(update, scale=4.0, clipping=1.0)


def test_secure_aggregation_refuses_robust_aggregators():
    config = tiny_config(1)
    for name in ("median", "trimmed_mean"):
        config.aggregation = name  # the robust aggregators' key (set directly: absent before they are merged)
        with pytest.raises(ConfigError, match=f"secure_aggregation=true cannot be combined with aggregation='{name}'"):
            validate_config(config, transport="flower", secure_aggregation=True)
    config.aggregation = "fedavg"
    validate_config(config, transport="flower", secure_aggregation=True)
    config.clip_norm = 1.0
    with pytest.raises(ConfigError, match="secure_aggregation=true cannot be combined with clip_norm > 0"):
        validate_config(config, transport="flower", secure_aggregation=True)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(run_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE)  # after the last round


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("failing", [None, "training", "gone"],
                         ids=["all-nodes", "a-node-fails-in-training", "a-node-is-gone-before-setup"])
def test_secure_aggregation_gives_the_plain_sum_and_reveals_no_update(data_dir, tmp_path, failing):
    histories, weights = {}, {}
    for on in (False, True):
        config = run_config(data_dir, tmp_path / f"secure_{on}", secure_aggregation=on, num_rounds=1)
        grid = LocalGrid(config, 3)
        if failing == "training":  # its ClientApp raises in training (SecAgg+: in the masked-vector stage)
            grid.fail_when[grid.node(2)] = is_train()
        elif failing == "gone":  # it never answers again after joining (SecAgg+: not even the setup stage)
            grid.silent_when[grid.node(2)] = lambda message: message.metadata.message_type != "query"
        histories[on] = run_server(grid, config)
        weights[on] = _weights(tmp_path / f"secure_{on}")
        if on:
            trained = [r for r in grid.replies if not r.has_error() and "secaggplus_configs" in r.content
                       and "masked_params" in r.content["secaggplus_configs"]]
            assert len(trained) == (3 if failing is None else 2)
            for reply in trained:  # the update left the node masked; no array in the clear
                assert all(len(record) == 0 for record in reply.content.array_records.values())
                assert "sums" not in reply.content and "stats" not in reply.content
    plain, secured = histories[False], histories[True]
    assert _max_difference(weights[False], weights[True]) < 1e-6  # measured: <= 3e-8 (float32 rounding)
    assert plain["rounds"][0]["samples"] == secured["rounds"][0]["samples"]  # integers: exact
    assert plain["rounds"][0].get("dropped") == secured["rounds"][0].get("dropped")
    for key, value in plain["rounds"][0]["losses"].items():
        assert abs(value - secured["rounds"][0]["losses"][key]) < 1e-4
    stages = next(w for w in secured["flower"]["waves"] if w["message"] == "train")["secagg"]["stages"]
    expected = {None: [("setup", 3), ("share_keys", 3), ("collect_masked_vectors", 3), ("unmask", 3)],
                "training": [("setup", 3), ("share_keys", 3), ("collect_masked_vectors", 2), ("unmask", 2)],
                "gone": [("setup", 2), ("setup", 2), ("share_keys", 2), ("collect_masked_vectors", 2), ("unmask", 2)]}
    assert [(s["stage"], s["answered"]) for s in stages] == expected[failing]


# --------------------------------------------------------------------------- loopback deployment

def _kill_when(log: Path, marker: str, pid_tree, timeout: float = 300.0) -> threading.Thread:
    """SIGKILL ``pid_tree()`` as soon as ``marker`` appears in ``log`` (a machine that crashes)."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and marker in log.read_text(errors="replace"):
                for pid in pid_tree():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.2)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_loopback_secure_aggregation_survives_a_killed_supernode_and_matches_the_plain_model(data_dir, tmp_path):
    """Three SuperNodes, SecAgg+ on, one SuperNode (and everything it started) SIGKILLed once the nodes
    have joined: the round goes on without its partition, through every SecAgg+ stage, and yields the
    model of the plain (unsecured) loop without that partition."""
    home = tmp_path / "flwr_home"
    with deploy.Deployment(3, home, threads=1) as deployment:
        node = next(p for p in deployment.processes.started if p.name == "supernode-2")
        killer = _kill_when(home / "logs" / "flwr_run.log", "node(s) ready",
                            lambda: deploy.process_tree(node.process.pid))
        result = deployment.run({**TINY, "num_rounds": 1, "secure_aggregation": True, "round_timeout": 45.0,
                                 "data": str(data_dir), "out": str(tmp_path / "secure")}, timeout=400, echo=False)
        killer.join(timeout=1)
        assert node.process.poll() == -signal.SIGKILL
        running = deployment.processes.pids()
    assert not deploy.alive(running)  # every Flower process started here is gone
    assert result.ok, result.output[-3000:]
    history = result.history
    # the killed node's partition: dropped (logged and recorded), lost for the rest of the run
    assert history["rounds"][0]["dropped"] == sampled_in(2, 1, 3)
    assert [d["partition"] for d in history["flower"]["lost"]] == [2]
    assert "dropped partition 2" in result.output
    assert all(r["users"] == 8 for r in history["val_metrics"] + list(history["final"].values()))
    assert finite_metrics(history)
    # through SecAgg+: the setup without the dead node, then every stage with the two others
    assert "Secure aggregation completed" in result.output
    wave = next(w for w in history["flower"]["waves"] if w["message"] == "train")
    assert [(s["stage"], s["sent"], s["answered"]) for s in wave["secagg"]["stages"]] == \
        [("setup", 3, 2), ("setup", 2, 2), ("share_keys", 2, 2), ("collect_masked_vectors", 2, 2), ("unmask", 2, 2)]
    # the plain loop, same code without Flower processes, with partition 2 gone: the same model
    config = run_config(data_dir, tmp_path / "plain", num_rounds=1)
    grid = LocalGrid(config, 3)
    grid.silent_when[grid.node(2)] = lambda message: message.metadata.message_type != "query"
    plain = run_server(grid, config)
    assert plain["rounds"][0]["dropped"] == history["rounds"][0]["dropped"]
    assert _max_difference(_weights(tmp_path / "plain"), _weights(tmp_path / "secure")) < 1e-6
