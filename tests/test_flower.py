"""The Flower app: record conversions, partitions, the node's memory in context.state, and the
app itself in a local simulation (every node reading the whole dataset) and on a loopback SuperLink
with three SuperNodes (each reading only its own partition file).

The simulation and deployment tests (marked ``flower``) start Flower processes; each stops
every process it started, also on failure (``deploy.simulate`` / ``deploy.Deployment``).
They run the tiny config with ``dropout=0``: the trainer draws dropout masks per vmapped group
of clients, and a node groups only its own sampled users, so with dropout the masks (not the
algorithm) differ from the in-process run. Without dropout the runs agree exactly, up to the
order of float64 additions when partial sums are merged and per-node metric means combined.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr.config import ConfigError, load_preset
from feddmmr.evaluation import FINAL_REQUESTS, METRIC_NAMES, metrics_from_ranks
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.server import ITEM_EMBEDDING_KEY, Aggregator
from feddmmr.flower import core, deploy
from feddmmr.flower import messages as msgs
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-9


def as_run_config(config) -> dict:
    """A TrainConfig as run-config entries (what `--run-config` would carry): the keys that differ from its preset."""
    preset = load_preset(config.preset).to_dict()
    out = {}
    for key, value in config.to_dict().items():
        if key == "preset" or (key != "stage" and value == preset[key]):
            continue
        if isinstance(value, list):
            value = ",".join(value)
        out[key] = "all" if value is None else value
    return out


TINY = as_run_config(tiny_config(1, dropout=0.0))


@pytest.fixture(autouse=True)
def offline_flower(tmp_path, monkeypatch):
    """Every test: the offline switches and a throw-away FLWR_HOME."""
    for key, value in deploy.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))


# --------------------------------------------------------------------------- records

def test_state_dict_round_trips_exactly_with_dtypes():
    state = {"a.weight": torch.randn(3, 4), "b": torch.randn(5, dtype=torch.float64),
             "c": torch.arange(6).view(2, 3), "empty": torch.zeros(0, 2), "gate": torch.tensor(0.01),
             "strided": torch.randn(4, 3).t()}
    back = msgs.record_to_state(msgs.state_to_record(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])


def test_a_partial_aggregate_survives_the_reply_and_merges_like_direct_aggregation():
    glob = {ITEM_EMBEDDING_KEY: torch.zeros(4, 2), "w": torch.zeros(3)}
    updates = [({ITEM_EMBEDDING_KEY: torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]),
                 "w": torch.tensor([1.0, 2.0, 3.0])}, 2),
               ({ITEM_EMBEDDING_KEY: torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.5, 0.0], [0.0, 0.0]]),
                 "w": torch.tensor([0.1, 0.2, 0.3])}, 5),
               ({ITEM_EMBEDDING_KEY: torch.zeros(4, 2), "w": torch.tensor([7.0, 0.0, 1.0])}, 1)]
    direct = Aggregator(glob)
    for state, count in updates:
        direct.add(state, count)
    node = Aggregator(glob)
    for state, count in updates:
        node.add(state, count)
    sums, rows, total = node.partial()
    protos = [(3, np.ones((2, 4), np.float32)), (7, np.zeros((0, 4), np.float32)), (9, np.eye(4, dtype=np.float32))]
    update = core.NodeUpdate(sums, rows, total, protos, {"next_item": 2.5}, 17, 3)
    back = msgs.content_to_update(msgs.update_to_content(update, {"seconds": 1.0}))
    assert back.total == total and back.samples == 17 and back.clients == 3 and back.losses == {"next_item": 2.5}
    assert [u for u, _ in back.prototypes] == [3, 7, 9]
    assert all(np.array_equal(a, b) and a.shape == b.shape for (_, a), (_, b) in zip(back.prototypes, protos))
    server = Aggregator(glob)
    server.merge(back.sums, back.row_weight, back.total)
    merged, expected = server.result(), direct.result()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_each_client_update_survives_the_reply_and_a_miscounted_reply_is_refused():
    states = [{ITEM_EMBEDDING_KEY: torch.randn(4, 2), "w": torch.randn(3), "gate": torch.tensor(0.5)} for _ in range(3)]
    each = [(3, states[0], 10), (6, states[1], 0), (9, states[2], 7)]
    update = core.NodeUpdate({}, None, 0.0, [], {"next_item": 1.5}, 17, 3, each)
    content = msgs.update_to_content(update)
    back = msgs.content_to_update(content)
    assert [(u, n) for u, _, n in back.each] == [(3, 10), (6, 0), (9, 7)]
    for (_, state, _), (_, original, _) in zip(back.each, each):
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) and state[k].dtype == original[k].dtype for k in state)
    content["each-info"]["samples"] = [10, 0]
    with pytest.raises(ValueError, match="per-client updates disagree in count"):
        msgs.content_to_update(content)


def test_evaluation_requests_and_results_round_trip():
    requests = list(FINAL_REQUESTS)
    content = msgs.evaluate_content({"w": torch.ones(2)}, torch.eye(3), requests)
    assert msgs.content_to_requests(content) == requests
    assert torch.equal(msgs.record_to_prototypes(content), torch.eye(3))
    results = [{"protocol": "sampled", "split": "val", "users": 3, "HR@10": 1 / 3, "MRR": 0.1 + 0.2}]
    assert msgs.content_to_results(msgs.results_to_content(results)) == results  # floats exact


def test_per_node_results_combine_to_the_metrics_over_all_users():
    ranks = np.array([0, 3, 12, 1, 40, 7, 2, 0, 25, 9])
    whole = metrics_from_ranks(ranks)
    parts = []
    for partition in range(3):
        users = core.partition_users(len(ranks), partition, 3)
        parts.append({"protocol": "full", "split": "val", "users": len(users), "exclude_history": True,
                      **metrics_from_ranks(ranks[users])})
    combined = core.combine_results(parts)
    assert combined["users"] == len(ranks) and list(combined)[:4] == ["protocol", "split", "users", "exclude_history"]
    assert all(abs(combined[name] - whole[name]) < 1e-12 for name in METRIC_NAMES)
    assert core.combine_results(parts[:1]) == parts[0]  # one node: its result, unchanged
    with pytest.raises(ValueError, match="different"):
        core.combine_results([parts[0], {**parts[1], "split": "test"}])


def test_partitions_cover_every_user_once_and_group_sampled_users():
    users = [core.partition_users(10, p, 3) for p in range(3)]
    assert sorted(np.concatenate(users).tolist()) == list(range(10))
    assert users[1].tolist() == [1, 4, 7]
    assert core.group_by_partition(np.array([7, 0, 4, 5, 9]), 3) == {0: [0, 9], 1: [4, 7], 2: [5]}
    with pytest.raises(ValueError, match="partition-id"):
        core.partition_users(10, 3, 3)


# --------------------------------------------------------------------------- run config

def test_the_app_run_config_lists_every_training_key():
    app = tomllib.loads((REPO / "flower_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "feddmmr.flower.server_app:app",
                                 "clientapp": "feddmmr.flower.client_app:app"}
    missing = set(core.default_app_config()) - set(app["config"])
    assert not missing, f"add {sorted(missing)} to [tool.flwr.app.config] in flower_app/pyproject.toml"
    assert set(app["config"]) == set(core.default_app_config())


def test_run_config_picks_the_stage_preset_and_applies_set_keys(tmp_path):
    config = core.train_config({**core.default_app_config(), "stage": 1, "num_rounds": 2, "top_users": "all",
                                "trainable_groups": "item_embedding,backbone", "learning_rate": 5e-4})
    assert (config.stage, config.preset, config.num_rounds, config.top_users) == (1, "stage1_backbone", 2, None)
    assert config.trainable_groups == ["item_embedding", "backbone"] and config.learning_rate == 5e-4
    ckpt.write_json(tmp_path / "s1" / ckpt.CONFIG_FILE, {"train": {"stage": 1}})
    assert core.train_config({"stage": 3, "init": str(tmp_path / "s1")}).preset == "stage3_skip_stage2"
    with pytest.raises(ConfigError, match="stage 3"):
        core.train_config({"stage": 1, "preset": "stage3_moe"})
    with pytest.raises(ConfigError, match="cannot read"):
        core.train_config({"stage": 1, "num_rounds": "many"})
    with pytest.raises(ConfigError, match="unknown key"):
        core.train_config({"stage": 1, "num_round": 3})


def test_run_config_argument_quotes_strings_and_resolves_paths(tmp_path):
    text = deploy.run_config_arg({"num_rounds": 2, "stage": 1, "resume": False, "data": str(tmp_path / "d"),
                                  "top_users": "all", "learning_rate": 0.001})
    parsed = tomllib.loads("\n".join(text.split(" ")))
    assert parsed == {"num_rounds": 2, "stage": 1, "resume": False, "data": str((tmp_path / "d").resolve()),
                      "top_users": "all", "learning_rate": 0.001}


def test_flower_home_config_names_the_local_simulation_and_the_loopback(tmp_path):
    path = deploy.write_flower_config(tmp_path / "home", "127.0.0.1:1234")
    conf = tomllib.loads(path.read_text())["superlink"]
    assert conf["default"] == "local" and conf["local"]["address"] == ":local:"
    assert conf["loopback"] == {"address": "127.0.0.1:1234", "insecure": True}


# --------------------------------------------------------------------------- the node's memory

def _stage3_node(tmp_path, data, features):
    config = tiny_config(3, trainable_groups=["item_embedding", "backbone", "projectors", "experts", "router",
                                              "gate"])  # nothing frozen: no --init needed
    return core.NodeRuntime(config, data, features, None)


def test_a_new_node_process_restores_the_memories_from_context_state(tmp_path):
    data = tiny_dataset(tmp_path)
    features = tiny_features(tmp_path)
    users = core.partition_users(data.num_users, 1, 3)
    first = _stage3_node(tmp_path, data, features)
    how, saved = first.ensure_clients(users)
    assert how == "built" and saved["users"].tolist() == users.tolist()
    assert first.ensure_clients(users) == ("cached", None)
    # what a later ClientApp process finds in context.state (through Flower's records)
    state = msgs.record_to_arrays(msgs.arrays_to_record(saved))
    fresh = _stage3_node(tmp_path, data, features)
    assert fresh.ensure_clients(users, state, first.memory_signature()) == ("restored", None)
    for user in users.tolist():
        a, b = first.clients[user], fresh.clients[user]
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
        assert np.array_equal(a.memory, b.memory) and np.array_equal(a.prototypes, b.prototypes)
        assert all(np.array_equal(a.eval_memory[s], b.eval_memory[s]) for s in ("val", "test"))
        sa, sb = a.memory_state.state_dict(), b.memory_state.state_dict()
        assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    # the restored clients train to the same update
    glob = first.assembly.model.group_state(first.config.transmitted_groups)
    one = first.train(users[:3], glob, 1, None)
    two = fresh.train(users[:3], glob, 1, None)
    assert one.total == two.total and all(torch.equal(one.sums[k], two.sums[k]) for k in one.sums)
    assert [u for u, _ in one.prototypes] == [u for u, _ in two.prototypes]
    # memories saved for other data or settings are not reused
    other = _stage3_node(tmp_path, data, features)
    assert other.ensure_clients(users, state, "stale")[0] == "built"


# --------------------------------------------------------------------------- the app

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The same tiny Stage 1 federation in-process and as a 3-node Flower simulation."""
    root = tmp_path_factory.mktemp("flower")
    data = tiny_dataset(root)
    inproc = run_federated(tiny_config(1, dropout=0.0), data, root / "inproc", progress=False)
    home = root / "flwr_home"
    env = {k: os.environ.get(k) for k in ("FLWR_HOME", *deploy.OFFLINE_ENV)}
    os.environ.update({**deploy.OFFLINE_ENV, "FLWR_HOME": str(home)})
    try:
        sim = deploy.simulate({**TINY, "data": str(root / "data"), "out": str(root / "sim")}, nodes=3,
                              flwr_home=home, timeout=600, echo=False)
    finally:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert not deploy.local_superlinks(home), "the simulation SuperLink is still running"
    return {"root": root, "data": data, "inproc": inproc, "sim": sim, "home": home}


def _check_run_dir(run_dir: Path, history: dict, nodes: int) -> None:
    for name in ("model.safetensors", "config.json", "train_history.json", "validation_curves.png"):
        assert (run_dir / name).exists(), name
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert all("val_metrics" in r and r["val_metrics"]["protocol"] == "sampled" for r in history["rounds"])
    assert set(history["final"]) == {"val_full", "val_sampled", "test_full", "test_sampled"}
    assert history["best_round"] in (1, 2) and history["flower"]["nodes"] == nodes
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["stage"] == 1 and config["flower"]["nodes"] == nodes
    model, _ = ckpt.load_model(run_dir)
    assert model.num_items == 41


def _assert_same_results(a: dict, b: dict) -> None:
    assert a["best_round"] == b["best_round"]
    for x, y in zip(a["val_metrics"] + [a["final"][k] for k in sorted(a["final"])],
                    b["val_metrics"] + [b["final"][k] for k in sorted(b["final"])]):
        assert {k: v for k, v in x.items() if k not in METRIC_NAMES} == \
               {k: v for k, v in y.items() if k not in METRIC_NAMES}
        assert all(abs(x[name] - y[name]) < TOL for name in METRIC_NAMES), (x, y)
    for x, y in zip(a["rounds"], b["rounds"]):
        assert (x["clients"], x["samples"]) == (y["clients"], y["samples"])
        assert all(abs(x["losses"][k] - y["losses"][k]) < 1e-6 for k in x["losses"])


@pytest.mark.flower
def test_simulation_runs_two_rounds_and_writes_the_run_directory(tiny_runs):
    sim = tiny_runs["sim"]
    assert sim.ok, sim.output[-3000:]
    _check_run_dir(sim.run_dir, sim.history, nodes=3)
    assert "round 2/2" in sim.output  # the ServerApp's progress reaches `flwr run --stream`


@pytest.mark.flower
def test_simulation_matches_the_in_process_runner(tiny_runs):
    sim, inproc = tiny_runs["sim"], tiny_runs["inproc"]
    assert sim.ok, sim.output[-3000:]
    _assert_same_results(inproc, sim.history)
    assert set(inproc["rounds"][0]) == set(sim.history["rounds"][0])  # the same history entries
    assert set(inproc) <= set(sim.history)
    ours = json.loads((sim.run_dir / "config.json").read_text())
    theirs = json.loads((tiny_runs["root"] / "inproc" / "config.json").read_text())
    for key in ("train", "model", "trained_groups", "init", "select_metric"):
        assert ours[key] == theirs[key], key
    a = ckpt.load_weights(tiny_runs["root"] / "inproc" / "model.safetensors")
    b = ckpt.load_weights(sim.run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.flower
def test_loopback_deployment_with_three_supernodes(tiny_runs, tmp_path):
    root = tiny_runs["root"]
    home = tmp_path / "flwr_home"
    # each SuperNode reads only its own partition's file (written once, as `deploy partition` does)
    assert deploy.main(["partition", "--nodes", "3", "--data", str(root / "data"), "--top-users", "all",
                        "--out", str(tmp_path / "parts")]) == 0
    with deploy.Deployment(3, home) as deployment:
        started = list(deployment.processes.started)
        assert [p.name for p in started] == ["superlink", "supernode-0", "supernode-1", "supernode-2"]
        result = deployment.run({**TINY, "data": str(tmp_path / "parts"), "out": str(tmp_path / "deployed")},
                                timeout=600, echo=False)
        running = deployment.processes.pids()  # SuperLink, SuperNodes, their SuperExecs, ...
        assert len(running) >= 8
    assert all(p.process.poll() is not None for p in started)  # every process we started is gone
    assert not deploy.alive(running)
    assert result.ok, result.output[-3000:]
    _check_run_dir(result.run_dir, result.history, nodes=3)
    _assert_same_results(tiny_runs["inproc"], result.history)
    assert tomllib.loads((home / "config.toml").read_text())["superlink"]["loopback"]["insecure"] is True
