"""Levers on Stage 3's content path (issue #14): standardised features before the projectors, and a
learning-rate multiplier for the groups Stage 3 adds. Both off by default, leaving runs unchanged."""

from __future__ import annotations

import numpy as np
import torch

from feddmmr.config import TrainConfig
from feddmmr.engine.assemble import assemble
from feddmmr.federation.client import NEW_GROUPS, learning_rates
from feddmmr.models import UR4RecV2MoE
from feddmmr.models.groups import group_of
from feddmmr.runner import run_federated

from .fedtools import stage3_after_stage1, tiny_config, tiny_dataset, tiny_features


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(rows, dim=-1)
    n = len(unit)
    return float((unit.sum(0).norm() ** 2 - n) / (n * (n - 1)))


def common_direction_features(count: int = 300, dim: int = 256) -> torch.Tensor:
    """Unit rows sharing one direction (mean cosine about 0.4, as ML-1M's poster features)."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(count, dim, generator=generator) / dim ** 0.5 + 0.8 * torch.nn.functional.normalize(
        torch.ones(dim), dim=0)
    return torch.nn.functional.normalize(rows, dim=-1)


def test_raw_unit_features_project_to_nearly_one_vector_and_standardised_ones_do_not():
    features = common_direction_features()
    table = torch.cat([torch.zeros(1, features.shape[1]), features])  # row 0: padding
    outputs = {}
    for standardise in (False, True):
        torch.manual_seed(0)
        model = UR4RecV2MoE(num_items=len(table), sasrec_hidden_dim=32, sasrec_num_heads=2, moe_num_heads=2,
                            visual_dim=features.shape[1], text_dim=8, standardise_features=standardise)
        model.set_item_features(table, None)
        with torch.no_grad():
            outputs[standardise] = model.proj_visual(features)
    assert mean_pairwise_cosine(outputs[False]) > 0.9  # the last layer's bias dominates
    assert mean_pairwise_cosine(outputs[True]) < 0.5


def test_standardising_is_off_by_default_and_outside_the_state_dict():
    torch.manual_seed(0)
    plain = UR4RecV2MoE(num_items=10, sasrec_hidden_dim=16, sasrec_num_heads=2, moe_num_heads=2, visual_dim=6,
                        text_dim=4)
    torch.manual_seed(0)
    standard = UR4RecV2MoE(num_items=10, sasrec_hidden_dim=16, sasrec_num_heads=2, moe_num_heads=2, visual_dim=6,
                           text_dim=4, standardise_features=True)
    assert plain.state_dict().keys() == standard.state_dict().keys()  # checkpoints are interchangeable
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), standard.state_dict().values()))
    x = torch.randn(3, 6)
    proj = plain.proj_visual
    assert torch.equal(proj(x), proj[2](proj[1](proj[0](x))))  # exactly the former nn.Sequential
    assert "standardise_features" not in TrainConfig().model_kwargs(10, 6, 4)  # config.json as before
    assert TrainConfig(standardise_features=True).model_kwargs(10, 6, 4)["standardise_features"] is True


def test_a_standardised_run_scores_the_same_after_restore(tmp_path):
    from feddmmr.evaluation import evaluate

    history, run = stage3_after_stage1(tmp_path, standardise_features=True)
    assert run.model.proj_visual.standardise and not torch.equal(run.model.proj_visual.scale,
                                                                 torch.ones_like(run.model.proj_visual.scale))
    again = evaluate(run.scorer("test"), run.data, "test", "sampled", seed=0, max_len=8, num_negatives=10)
    assert again["NDCG@10"] == history["final"]["test_sampled"]["NDCG@10"]


def test_the_multiplier_scales_the_new_groups_learning_rate_only(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    stage1 = tmp_path / "stage1"
    run_federated(tiny_config(1, num_rounds=1), data, stage1, progress=False)
    moved = {}
    for multiplier in (1.0, 10.0):
        # one plain SGD step (every window in one batch) from the same state: the step is lr x gradient
        config = tiny_config(3, local_optimizer="sgd", batch_size=64, local_epochs=1, dropout=0.0,
                             new_group_lr_multiplier=multiplier)
        fed = assemble(config, data, features, stage1)
        trainer = fed.trainer()
        rates = learning_rates(trainer.names, config)
        assert {group_of(n) for n in rates if rates[n] != config.learning_rate} == \
            ({g for g in NEW_GROUPS if g in config.trainable_groups} if multiplier != 1 else set())
        start = fed.model.group_state(config.transmitted_groups)
        client = fed.build_clients(np.array([0]))[0]
        state = trainer.train(client, start, seed=0).state
        moved[multiplier] = {n: state[n] - start[n] for n in state}
    for name, delta in moved[1.0].items():
        factor = 10.0 if group_of(name) in NEW_GROUPS else 1.0
        assert torch.allclose(moved[10.0][name], factor * delta, rtol=1e-3, atol=1e-6), name  # float32 differences
    assert moved[1.0]["gating_weight"].abs() > 0
