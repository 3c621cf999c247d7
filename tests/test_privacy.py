"""Privacy (issue 8): what a client's outgoing message may hold, and the differential-privacy mode.

A client sends only the transmitted parameter groups (names and shapes of the global state of
the stage's trainable groups), its sample count and, if enabled, at most K prototype vectors in
content space — never item ids, raw features or memory entries. The Flower reply of a node is the
same, pre-aggregated over the node's sampled users (the only integers are the user ids the server
itself sent and the row offsets of each user's prototypes).

The DP mode clips each update to ``dp_clip_norm``, adds N(0, (sigma C)^2) per coordinate to the
sum and divides by the expected number of clients; Opacus' RDP accountant reports (epsilon, delta).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from feddmmr.config import ConfigError
from feddmmr.federation import privacy
from feddmmr.federation.client import ClientUpdate, LocalTrainer, build_clients
from feddmmr.federation.memory import MemoryConfig
from feddmmr.engine.assemble import assemble as setup
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features

pytestmark = pytest.mark.reliability

LOSS_NAMES = {"next_item", "load_balance", "contrastive", "router_visual", "router_semantic"}
ALL_GROUPS = ["item_embedding", "backbone", "projectors", "experts", "router", "gate"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset with content features, a Stage 3 federation with memory and prototypes (nothing frozen)."""
    root = tmp_path_factory.mktemp("privacy")
    data = tiny_dataset(root)
    features = tiny_features(root)
    config = tiny_config(3, trainable_groups=ALL_GROUPS, lt_capacity=12)
    fed = setup(config, data, features)
    clients = build_clients(data, config.max_seq_len, MemoryConfig.from_train_config(config), fed.space)
    return {"root": root, "data": data, "features": features, "config": config, "fed": fed, "clients": clients}


def leaves(value, path="update"):
    """Every (path, leaf) inside a message: dataclass fields, dicts, lists and tuples are walked."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from leaves(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def assert_private(update: ClientUpdate, client, global_state: dict, config, content_dim: int) -> None:
    """The one definition of an acceptable client update."""
    assert [f.name for f in dataclasses.fields(update)] == ["state", "num_samples", "prototypes", "metrics"]
    # the transmitted groups, exactly: names, shapes, float dtypes
    assert set(update.state) == set(global_state)
    for key, value in update.state.items():
        assert value.shape == global_state[key].shape and value.dtype == global_state[key].dtype, key
    # its sample count, a plain int
    assert type(update.num_samples) is int and update.num_samples == client.num_samples
    # K prototype vectors in content space, or none
    if config.use_memory and config.use_prototypes:
        assert isinstance(update.prototypes, np.ndarray) and update.prototypes.dtype == np.float32
        assert update.prototypes.ndim == 2 and update.prototypes.shape[1] == content_dim
        assert len(update.prototypes) <= config.num_prototypes
    else:
        assert update.prototypes is None
    # the metrics: scalar losses only
    assert set(update.metrics) <= LOSS_NAMES
    assert all(type(v) is float and math.isfinite(v) for v in update.metrics.values())
    # nothing else: no integer array or tensor anywhere, no array shaped like the client's data or memory
    allowed_shapes = {tuple(v.shape) for v in global_state.values()}
    if update.prototypes is not None:
        allowed_shapes.add(update.prototypes.shape)
    private_shapes = {client.inputs.shape, client.targets.shape, client.memory.shape,
                      *(v.shape for v in client.eval_memory.values())}
    for path, leaf in leaves(update):
        if isinstance(leaf, (np.ndarray, torch.Tensor)):
            kind = leaf.dtype.is_floating_point if isinstance(leaf, torch.Tensor) else leaf.dtype.kind == "f"
            assert kind, f"{path}: {leaf.dtype} values would be ids"
            assert tuple(leaf.shape) in allowed_shapes, f"{path}: unexpected shape {tuple(leaf.shape)}"
            assert tuple(leaf.shape) not in private_shapes - allowed_shapes, path
        else:
            assert isinstance(leaf, (int, float)) or leaf is None, f"{path}: {type(leaf).__name__}"


def assert_no_memory_entry(prototypes: np.ndarray, client, space) -> None:
    """No prototype is the content embedding of one of the client's items (which names the item)."""
    if prototypes is None or not len(prototypes):
        return
    items = np.unique(np.concatenate([client.memory_state.lt_items, client.memory_state.recent]))
    distance = np.linalg.norm(prototypes[:, None, :] - space.embedding[items][None], axis=-1)
    assert distance.min() > 1e-4


# --------------------------------------------------------------------------- what a client sends

@pytest.mark.parametrize("stage", [1, 3])
def test_a_client_update_holds_only_the_groups_its_count_and_prototypes(world, stage):
    data = world["data"]
    if stage == 1:
        config = tiny_config(1)
        fed = setup(config, data)
        clients = build_clients(data, config.max_seq_len, None, None)
    else:
        config, fed, clients = world["config"], world["fed"], world["clients"]
    trainer = LocalTrainer(fed.model, config, fed.content, data.occurring_items(), client_batch=4)
    global_state = fed.model.group_state(config.transmitted_groups)
    users = [0, 1, 2, 5, 7]
    single = trainer.train(clients[3], global_state, seed=1)
    many = trainer.train_many([clients[u] for u in users], global_state, seeds=users)
    for client, update in [(clients[3], single)] + [(clients[u], x) for u, x in zip(users, many)]:
        assert_private(update, client, global_state, config, 16 + 8)
        if stage == 3:
            assert update.prototypes is not None
            assert_no_memory_entry(update.prototypes, client, fed.space)



def test_with_prototypes_switched_off_a_client_sends_none(world):
    """``use_prototypes = false`` (which DP mode sets) keeps the memory entirely on the device: the
    client holds centroids of its long-term memory, but its update carries no prototypes."""
    data, fed, clients = world["data"], world["fed"], world["clients"]
    config = tiny_config(3, trainable_groups=ALL_GROUPS, lt_capacity=12, use_prototypes=False)
    trainer = LocalTrainer(fed.model, config, fed.content, data.occurring_items())
    global_state = fed.model.group_state(config.transmitted_groups)
    client = next(c for c in clients.values() if len(c.prototypes))
    update = trainer.train(client, global_state, seed=1)
    assert update.prototypes is None
    assert_private(update, client, global_state, config, 16 + 8)


def test_prototypes_never_repeat_a_memory_entry(world):
    """K-Means over few or scattered items makes singleton clusters: those centroids are not shared."""
    config, fed, data = world["config"], world["fed"], world["data"]
    for capacity in (1, 2, 3, 12):
        memory_config = dataclasses.replace(MemoryConfig.from_train_config(config), lt_capacity=capacity,
                                            novelty_threshold=0.0, num_prototypes=5)
        clients = build_clients(data, config.max_seq_len, memory_config, fed.space, users=np.arange(6))
        for client in clients.values():
            distinct = len(np.unique(client.memory_state.lt_items))
            assert len(client.prototypes) <= distinct // 2  # each centroid averages two or more items
            assert_no_memory_entry(client.prototypes, client, fed.space)


def test_the_flower_reply_holds_the_same_and_only_the_users_the_server_sent(world):
    pytest.importorskip("flwr")
    from flwr.app import ArrayRecord, Context, Message, Metadata, MetricRecord, RecordDict

    from feddmmr.flower import client_app, core
    from feddmmr.flower import messages as msgs

    config, data = world["config"], world["data"]
    for mode in ("fedavg", "updated_rows"):
        cfg = dataclasses.replace(config, item_embedding_aggregation=mode)
        every_key = {k: ",".join(v) if isinstance(v, list) else ("all" if v is None else v)
                     for k, v in cfg.to_dict().items() if k != "preset"}
        run_config = {**core.default_app_config(), **every_key, "data": str(world["root"] / "data"),
                      "features": str(world["features"])}
        context = Context(run_id=7, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                          state=RecordDict(), run_config=run_config)
        global_state = world["fed"].model.group_state(cfg.transmitted_groups)
        sent = [1, 5, 9]
        metadata = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                            group_id="", created_at=0.0, ttl=3600.0, message_type="train")
        request = Message(content=msgs.train_content(global_state, 1, sent, None), metadata=metadata)
        content = client_app.train(request, context).content
        names = {msgs.SUMS, msgs.STATS, msgs.PROTOTYPES} | ({msgs.ROW_WEIGHT} if mode == "updated_rows" else set())
        assert set(content.keys()) == names
        # the summed groups: names and shapes of the global state, float64 sums
        sums = msgs.record_to_arrays(content[msgs.SUMS])
        assert set(sums) == set(global_state)
        assert all(sums[k].shape == tuple(global_state[k].shape) and sums[k].dtype == np.float64 for k in sums)
        # scalars: totals, counts, summed losses, timings, the node process's peak RSS
        stats = content[msgs.STATS]
        assert isinstance(stats, MetricRecord)
        fixed = {"total", "samples", "clients", "client-data", "seconds", "startup-seconds", "peak-rss-mb"}
        assert set(stats) - fixed <= {msgs.LOSS_PREFIX + name for name in LOSS_NAMES}
        assert all(isinstance(v, (int, float)) for v in stats.values())
        assert stats["clients"] == len(sent)
        # prototypes: float rows; the only integers are the users the server sent and their row offsets
        protos = msgs.record_to_arrays(content[msgs.PROTOTYPES])
        assert set(protos) == {"users", "offsets", "values"}
        assert set(protos["users"].tolist()) <= set(sent)
        assert protos["offsets"][-1] == len(protos["values"]) and protos["values"].dtype == np.float32
        assert protos["values"].shape[1] == 16 + 8
        # with updated_rows, one float weight per item row (the rows the node's clients changed, which
        # the sums reveal as well; the DP mode refuses this mode)
        if mode == "updated_rows":
            weight = msgs.record_to_arrays(content[msgs.ROW_WEIGHT])
            assert set(weight) == {"weight"} and weight["weight"].dtype.kind == "f"
            assert weight["weight"].shape == (data.num_items,)
        for record in content.values():
            if isinstance(record, ArrayRecord):
                for key, array in msgs.record_to_arrays(record).items():
                    assert array.dtype.kind == "f" or key in ("users", "offsets"), key
        clients = client_app._runtime(context).clients
        for user, rows in msgs.unpack_user_arrays(protos):
            assert_no_memory_entry(rows, clients[user], world["fed"].space)
    client_app._RUNTIMES.clear()


# --------------------------------------------------------------------------- DP arithmetic

def test_dp_mean_is_the_clipped_sum_plus_noise_over_the_expected_count():
    glob = {"w": torch.zeros(4)}
    updates = [({"w": torch.tensor([10.0, 0, 0, 0])}, 1), ({"w": torch.tensor([0.0, 0.5, 0, 0])}, 99)]
    # without noise: clipped deltas [1,0,0,0] and [0,.5,0,0], unweighted, over 4 expected clients
    quiet = privacy.DPAggregator(glob, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0,
                                 generator=torch.Generator().manual_seed(0))
    for state, count in updates:
        quiet.add(state, count)
    assert torch.allclose(quiet.result()["w"], torch.tensor([0.25, 0.125, 0.0, 0.0]))
    assert quiet.stats()["clipped_fraction"] == 0.5
    # noise: std sigma * C / expected per coordinate
    big = {"w": torch.zeros(200_000)}
    noisy = privacy.DPAggregator(big, clip_norm=2.0, noise_multiplier=1.5, expected_clients=10.0,
                                 generator=torch.Generator().manual_seed(0))
    values = noisy.result()["w"]
    assert float(values.mean()) == pytest.approx(0.0, abs=0.002)
    assert float(values.std()) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.01)
    with pytest.raises(ValueError, match="expected"):
        noisy.add({"other": torch.zeros(1)}, 1)


def test_poisson_sampling_is_seeded_and_has_the_expected_rate():
    a = privacy.poisson_sample(10_000, 0.1, seed=3, round_number=1)
    assert np.array_equal(a, privacy.poisson_sample(10_000, 0.1, seed=3, round_number=1))
    assert not np.array_equal(a, privacy.poisson_sample(10_000, 0.1, seed=3, round_number=2))
    assert 900 < len(a) < 1100 and np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="client_fraction"):
        privacy.poisson_sample(10, 0.0, 0, 1)
    assert privacy.poisson_sample(10, 1.0, 0, 1).tolist() == list(range(10))  # q = 1: everyone, every round
    with pytest.raises(ValueError, match="client_fraction"):
        privacy.poisson_sample(10, 1.5, 0, 1)


def test_the_rdp_orders_are_opacus_defaults_plus_larger_ones():
    """epsilon is the minimum over the RDP orders: Opacus' default orders, plus 80-256 which give the
    tightest bound at large sigma / small epsilon. Another grid gives other (still valid) epsilons, and
    with a target epsilon another sigma, so the grid is part of the mechanism's definition."""
    from opacus.accountants import RDPAccountant

    assert privacy.ALPHAS == list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 160, 192, 256]
    accountant = RDPAccountant()
    accountant.history = [(10.0, 0.1, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: "optimal order is the largest alpha" (for both grids)
        default, ours = accountant.get_epsilon(delta=1e-5), privacy.epsilon(10.0, 0.1, 1, 1e-5)
    assert ours < 0.5 * default  # 0.037 vs 0.106: the optimum lies beyond 63


def test_epsilon_falls_with_more_noise_and_grows_with_rounds():
    eps = {(s, t): privacy.epsilon(s, 0.1, t, 1e-5) for s, t in ((0.8, 10), (1.0, 10), (2.0, 10), (1.0, 1), (1.0, 30))}
    assert eps[(0.8, 10)] > eps[(1.0, 10)] > eps[(2.0, 10)] > 0
    assert eps[(1.0, 1)] < eps[(1.0, 10)] < eps[(1.0, 30)]
    assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    sigma = privacy.noise_multiplier_for(2.0, 1e-5, 0.1, 30)
    assert privacy.epsilon(sigma, 0.1, 30, 1e-5) <= 2.0 < privacy.epsilon(sigma * 0.9, 0.1, 30, 1e-5)


# --------------------------------------------------------------------------- the DP config and run

def test_dp_config_is_validated_and_leaky_settings_are_refused():
    """DP keys are checked together, and a DP config that would leak past the noise is an error
    naming the key to change (never silently rewritten)."""
    dp = dict(dp_noise_multiplier=1.0, dp_clip_norm=1.0, item_embedding_aggregation="fedavg")
    assert tiny_config(1, **dp).dp_enabled
    with pytest.raises(ConfigError, match="dp_clip_norm"):
        tiny_config(1, **{**dp, "dp_clip_norm": 0.0})
    with pytest.raises(ConfigError, match="both set"):
        tiny_config(1, **dp, dp_target_epsilon=2.0)
    with pytest.raises(ConfigError, match="dp_delta"):
        tiny_config(1, **dp, dp_delta=1.0)
    with pytest.raises(ConfigError, match="dp_noise_multiplier"):
        tiny_config(1, dp_noise_multiplier=-1.0)
    with pytest.raises(ConfigError, match="cannot read"):
        tiny_config(1, dp_clip_norm="big")
    with pytest.raises(ConfigError, match="'dp_target_epsilon': 1e-06 is out of reach"):
        privacy.DifferentialPrivacy.from_config(
            tiny_config(1, dp_target_epsilon=1e-6, dp_clip_norm=1.0, item_embedding_aggregation="fedavg"), 12)
    with pytest.raises(ConfigError, match="item_embedding_aggregation=fedavg"):
        tiny_config(1, **{**dp, "item_embedding_aggregation": "updated_rows"})
    with pytest.raises(ConfigError, match="use_prototypes=false"):
        tiny_config(3, **dp)
    assert tiny_config(3, **dp, use_prototypes=False).dp_enabled


def test_the_flower_app_refuses_dp_with_a_clear_message():
    from feddmmr.flower import core

    with pytest.raises(ConfigError, match="Flower app does not support differential privacy"):
        core.train_config({**core.default_app_config(), "dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0,
                           "item_embedding_aggregation": "fedavg"})


def test_a_dp_run_completes_and_reports_epsilon_per_round(world, tmp_path, capsys):
    config = tiny_config(1, num_rounds=3, dp_target_epsilon=5.0, dp_clip_norm=0.05, dp_delta=1e-3,
                         item_embedding_aggregation="fedavg")
    history = run_federated(config, world["data"], tmp_path / "run", progress=False)
    spent = [r["privacy"]["epsilon"] for r in history["rounds"]]
    assert 0 < spent[0] < spent[1] < spent[2] <= 5.0
    assert history["privacy"]["epsilon"] == spent[-1] and history["privacy"]["delta"] == 1e-3
    assert history["rounds"][0]["privacy"]["accountant"] == "opacus-rdp"
    assert 0 <= history["rounds"][0]["privacy"]["clipped_fraction"] <= 1
    saved = json.loads((tmp_path / "run" / "train_history.json").read_text())
    assert saved["privacy"] == history["privacy"]
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["train"]["item_embedding_aggregation"] == "fedavg"
    assert run["privacy"]["noise_multiplier"] == history["privacy"]["noise_multiplier"] > 0
    assert "DP (eps=" in capsys.readouterr().out
    assert set(history["final"]) == {"val_full", "val_sampled", "test_full", "test_sampled"}


def test_a_resumed_dp_run_draws_the_same_clients_and_noise(world, tmp_path):
    """Sampling and noise come from (seed, round): a run resumed after round 1 ends like an uninterrupted one."""
    def config(rounds):
        return tiny_config(1, num_rounds=rounds, dp_noise_multiplier=0.8, dp_clip_norm=0.05, dropout=0.0,
                           item_embedding_aggregation="fedavg")

    whole = run_federated(config(2), world["data"], tmp_path / "whole", progress=False)
    run_federated(config(1), world["data"], tmp_path / "split", progress=False)
    resumed = run_federated(config(2), world["data"], tmp_path / "split", resume=True, progress=False)
    assert [r["clients"] for r in resumed["rounds"]] == [r["clients"] for r in whole["rounds"]]
    assert resumed["rounds"][1]["val_metrics"] == whole["rounds"][1]["val_metrics"]
    assert resumed["final"] == whole["final"] and resumed["privacy"] == whole["privacy"]


def test_a_dp_run_adds_the_noise_its_epsilon_accounts_for(world, tmp_path):
    """On the path a run takes (config -> DifferentialPrivacy -> aggregator), the released model
    carries N(0, (sigma C / qN)^2) noise per coordinate at the sigma whose epsilon is reported.

    Two one-round runs that differ only in sigma sample the same clients, train the same updates
    and draw the same standard normal vector z (seeded by (seed, round)), so their models differ
    by exactly (sigma_a - sigma_b) C z / (q N): a noise wired to zero would make them equal.
    """
    from feddmmr.federation.checkpoint import load_weights
    from feddmmr.models import group_of

    clip, rate, users = 0.05, 0.5, world["data"].num_users
    models, spent = {}, {}
    for sigma in (1.0, 0.5):
        config = tiny_config(1, num_rounds=1, dp_noise_multiplier=sigma, dp_clip_norm=clip, client_fraction=rate,
                             item_embedding_aggregation="fedavg")
        history = run_federated(config, world["data"], tmp_path / f"s{sigma}", progress=False)
        assert history["privacy"]["noise_multiplier"] == sigma
        spent[sigma] = history["privacy"]["epsilon"]
        models[sigma] = load_weights(tmp_path / f"s{sigma}" / "model.safetensors")
    assert spent[1.0] < spent[0.5]
    transmitted = [k for k in models[1.0] if group_of(k) in config.transmitted_groups]
    diff = torch.cat([(models[1.0][k].double() - models[0.5][k].double()).flatten() for k in transmitted])
    expected = (1.0 - 0.5) * clip / (rate * users)
    assert diff.numel() > 1000
    assert float(diff.std()) == pytest.approx(expected, rel=0.1)
    assert abs(float(diff.mean())) < 5 * expected / math.sqrt(diff.numel())
