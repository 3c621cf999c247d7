"""The next-item objectives (config key ``loss``): full softmax, sampled softmax, gBCE.

Each is pinned against a hand computation on a tiny model; padding is never a candidate nor a
target; vmapped groups of clients match clients trained alone under each objective; long
sequences (max_seq_len=200) keep windows, memory snapshots and evaluation consistent.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feddmmr.config import ConfigError, TrainConfig, apply_overrides
from feddmmr.data.dataset import last_n_padded
from feddmmr.federation.client import catalogue_mask, training_windows
from feddmmr.models import UR4RecV2MoE
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset
from .test_federation import _comparable, _trainer

ITEMS = 12


def _model(seed: int = 0, **kwargs) -> UR4RecV2MoE:
    torch.manual_seed(seed)
    model = UR4RecV2MoE(num_items=ITEMS, sasrec_hidden_dim=8, sasrec_num_blocks=1, sasrec_num_heads=2,
                        max_seq_len=6, moe_num_heads=2, visual_dim=4, text_dim=3, dropout=0.0, **kwargs)
    with torch.no_grad():  # make the catalogue rows distinct enough that a wrong mask shows
        model.sasrec.item_emb.weight[1:] = torch.randn(ITEMS - 1, 8)
    return model.eval()


def _batch():
    inputs = torch.tensor([[0, 0, 3, 5, 2, 7], [1, 4, 4, 9, 6, 2]])
    targets = torch.tensor([[0, 0, 5, 2, 7, 8], [4, 4, 9, 6, 2, 0]])  # 0 = padding / no target
    return inputs, targets


def _catalogue(absent=(10, 11)) -> torch.Tensor:
    pool = np.array([i for i in range(1, ITEMS) if i not in absent])
    return catalogue_mask(ITEMS, pool)


def test_full_softmax_equals_a_hand_computed_cross_entropy():
    model = _model()
    inputs, targets = _batch()
    catalogue = _catalogue()
    out = model.losses(inputs, targets, None, objective="full_softmax", catalogue=catalogue)
    hidden = model.encode(inputs)
    weight = model.sasrec.item_emb.weight
    terms = []
    for b in range(2):
        for t in range(6):
            y = int(targets[b, t])
            if y == 0:
                continue
            allowed = [i for i in range(1, ITEMS) if bool(catalogue[i])]
            logits = torch.stack([hidden[b, t] @ weight[i] for i in allowed])
            terms.append(-torch.log_softmax(logits, 0)[allowed.index(y)])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(out["next_item"], expected.detach())
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)  # no auxiliary terms in Stage 1
    # the same through F.cross_entropy over the masked rows
    logits = (hidden @ weight.T).masked_fill(~catalogue, float("-inf"))
    ce = F.cross_entropy(logits.reshape(-1, ITEMS), targets.reshape(-1), ignore_index=0)
    torch.testing.assert_close(out["next_item"], ce.detach())


def test_padding_and_absent_items_are_never_candidates_or_targets():
    model = _model()
    inputs, targets = _batch()
    catalogue = _catalogue()
    base = model.losses(inputs, targets, None, objective="full_softmax", catalogue=catalogue)["loss"]
    model.zero_grad()
    base.backward()
    grad = model.sasrec.item_emb.weight.grad
    assert torch.count_nonzero(grad[0]) == 0  # padding row: no gradient, so never a candidate
    assert torch.count_nonzero(grad[10:]) == 0  # items that never occur: never candidates
    assert torch.count_nonzero(grad[1:10].abs().sum(1)) == 9  # every catalogue item is a negative
    with torch.no_grad():  # an absent item scoring enormously changes nothing
        model.sasrec.item_emb.weight[10] = 1e3 * model.encode(inputs)[0, -1]
        again = model.losses(inputs, targets, None, objective="full_softmax", catalogue=catalogue)["loss"]
    torch.testing.assert_close(again, base.detach())
    # positions whose target is padding do not count: dropping them by hand gives the same mean
    keep = targets.clone()
    keep[1, :2] = 0
    partial = model.losses(inputs, keep, None, objective="full_softmax", catalogue=catalogue)["next_item"]
    hidden = model.encode(inputs)
    logits = (hidden @ model.sasrec.item_emb.weight.T).masked_fill(~catalogue, float("-inf"))
    torch.testing.assert_close(partial, F.cross_entropy(logits.reshape(-1, ITEMS), keep.reshape(-1),
                                                        ignore_index=0).detach())
    # without a catalogue mask only padding is excluded
    model2 = _model()
    loss = model2.losses(inputs, targets, None, objective="full_softmax")["loss"]
    model2.zero_grad()
    loss.backward()
    g = model2.sasrec.item_emb.weight.grad
    assert torch.count_nonzero(g[0]) == 0 and torch.count_nonzero(g[1:].abs().sum(1)) == ITEMS - 1


def test_full_softmax_with_experts_uses_the_one_scoring_rule():
    """With memory, every catalogue logit is SASRec's score plus the experts' bonus, as in evaluation."""
    model = _model(gating_init=0.5)
    generator = torch.Generator().manual_seed(1)
    model.set_item_features(F.normalize(torch.randn(ITEMS, 4, generator=generator), dim=-1),
                            F.normalize(torch.randn(ITEMS, 3, generator=generator), dim=-1))
    inputs, targets = _batch()
    memory = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mem_vis, mem_txt = model.item_visual[memory], model.item_text[memory]
    catalogue = _catalogue()
    out = model.losses(inputs, targets, None, mem_vis, mem_txt, objective="full_softmax", catalogue=catalogue)
    hidden = model.encode(inputs)
    everything = torch.arange(ITEMS).expand(2, -1)
    terms = []
    for t in range(6):
        scores = model.score(hidden[:, t], everything, mem_vis, mem_txt).masked_fill(~catalogue, float("-inf"))
        loss = F.cross_entropy(scores, targets[:, t], ignore_index=0, reduction="none")
        terms += [loss[b] for b in range(2) if targets[b, t] != 0]
    torch.testing.assert_close(out["next_item"], torch.stack(terms).mean().detach(), rtol=1e-5, atol=1e-6)


def test_sampled_softmax_is_the_default_and_masks_a_negative_equal_to_the_positive():
    model = _model()
    inputs, targets = _batch()
    negatives = torch.tensor([[5, 1, 9], [4, 3, 3]])
    default = model.losses(inputs, targets, negatives)
    explicit = model.losses(inputs, targets, negatives, objective="sampled_softmax")
    assert torch.equal(default["loss"], explicit["loss"])
    hidden = model.encode(inputs)
    weight = model.sasrec.item_emb.weight
    terms = []
    for b in range(2):
        for t in range(6):
            y = int(targets[b, t])
            if y == 0:
                continue
            logits = [hidden[b, t] @ weight[y]] + [hidden[b, t] @ weight[n] for n in negatives[b].tolist() if n != y]
            terms.append(-torch.log_softmax(torch.stack(logits), 0)[0])
    torch.testing.assert_close(default["next_item"], torch.stack(terms).mean().detach())


@pytest.mark.parametrize("t", [0.0, 0.75, 1.0])
def test_gbce_equals_the_gsasrec_formula(t):
    model = _model()
    inputs, targets = _batch()
    negatives = torch.tensor([[5, 1, 9], [4, 3, 3]])
    catalogue = _catalogue()
    out = model.losses(inputs, targets, negatives, objective="gbce", catalogue=catalogue, gbce_t=t)
    size = int(catalogue.sum())
    alpha = 3 / (size - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    if t == 0.0:
        assert beta == pytest.approx(1.0)  # plain BCE
    hidden = model.encode(inputs)
    weight = model.sasrec.item_emb.weight
    terms = []
    for b in range(2):
        for t_ in range(6):
            y = int(targets[b, t_])
            if y == 0:
                continue
            s_pos = hidden[b, t_] @ weight[y]
            loss = -math.log(torch.sigmoid(s_pos).item() ** beta)
            loss -= sum(math.log(1 - torch.sigmoid(hidden[b, t_] @ weight[n]).item())
                        for n in negatives[b].tolist() if n != y)
            terms.append(loss)
    assert float(out["next_item"]) == pytest.approx(float(np.mean(terms)), rel=1e-5)


def test_the_loss_key_is_validated():
    with pytest.raises(ConfigError, match="loss"):
        apply_overrides(TrainConfig(), {"loss": "bce"}, "test")
    with pytest.raises(ConfigError, match="gbce_t"):
        apply_overrides(TrainConfig(), {"gbce_t": "1.5"}, "test")
    assert TrainConfig().loss == "sampled_softmax"


@pytest.mark.parametrize("stage, objective", [(1, "full_softmax"), (1, "gbce"), (3, "full_softmax"), (3, "gbce")])
def test_grouped_clients_match_clients_trained_alone_under_each_objective(tmp_path, stage, objective):
    config = tiny_config(stage, dropout=0.0, batch_size=1, local_epochs=2, learning_rate=0.01, loss=objective)
    fed, clients, trainer = _trainer(tmp_path, config)
    by_size = {len(c.inputs): c for c in clients.values()}
    chosen = list(by_size.values()) + [clients[0], clients[1]]
    assert len(by_size) > 1
    start = fed.model.group_state(config.transmitted_groups)
    together = trainer.train_many(chosen, start, seeds=list(range(5, 5 + len(chosen))))
    alone = [trainer.train(c, start, seed=s) for c, s in zip(chosen, range(5, 5 + len(chosen)))]
    for a, b in zip(together, alone):
        for key in start:
            torch.testing.assert_close(_comparable(key, a.state[key]), _comparable(key, b.state[key]),
                                       rtol=1e-4, atol=1e-5)
        assert any(not torch.equal(a.state[k], start[k]) for k in start)
    if stage == 1 and objective == "full_softmax":  # a dense loss moves every occurring item's row
        key = "sasrec.item_emb.weight"
        moved = (together[0].state[key] != start[key]).any(1)
        occurring = torch.zeros(len(moved), dtype=torch.bool)
        occurring[torch.from_numpy(fed.data.occurring_items())] = True
        assert not moved[0] and torch.equal(moved[1:], occurring[1:])


def test_windows_of_200_cover_every_transition_once_and_evaluation_reads_the_last_200():
    sequence = np.arange(1, 452)  # 451 items: 450 transitions -> windows of 200, 200, 50
    inputs, targets, starts = training_windows(sequence, 200)
    assert inputs.shape == (3, 200) and starts.tolist() == [0, 50, 250]
    pairs = [(int(x), int(y)) for x, y in zip(inputs.ravel(), targets.ravel()) if y]
    assert sorted(pairs) == [(i, i + 1) for i in range(1, 451)]  # each exactly once
    assert (inputs[-1] == sequence[250:450]).all()  # the newest window ends at the last transition
    evaluation = last_n_padded(sequence, np.array([0]), np.array([450]), 200)[0]
    assert (evaluation == sequence[250:450]).all()  # evaluation reads the same last 200 items
    short = last_n_padded(sequence, np.array([0]), np.array([30]), 200)[0]
    assert (short[:170] == 0).all() and (short[170:] == sequence[:30]).all()


def test_a_federation_at_length_200_with_full_softmax_selects_by_full_ndcg(tmp_path):
    data = tiny_dataset(tmp_path)
    config = tiny_config(1, max_seq_len=200, loss="full_softmax", eval_protocol="full", num_rounds=2)
    history = run_federated(config, data, tmp_path / "run", progress=False)
    vals = history["val_metrics"]
    assert all(v["protocol"] == "full" for v in vals)
    best = max(range(len(vals)), key=lambda i: vals[i]["NDCG@10"])
    assert history["best_round"] == best + 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["loss"] == "full_softmax" and saved["train"]["max_seq_len"] == 200


@pytest.mark.parametrize("objective", ["sampled_softmax", "full_softmax", "gbce"])
def test_the_centralized_pooled_pass_trains_under_each_objective(tmp_path, objective):
    from feddmmr.centralized import pooled_pass

    config = tiny_config(1, dropout=0.0, loss=objective, learning_rate=0.01)
    fed, clients, trainer = _trainer(tmp_path, config)
    inputs = np.concatenate([c.inputs for c in clients.values()])
    targets = np.concatenate([c.targets for c in clients.values()])
    memory = np.concatenate([c.memory for c in clients.values()])
    model = fed.model
    model.set_trainable(config.transmitted_groups)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    pool = torch.from_numpy(fed.data.occurring_items())
    generator = torch.Generator().manual_seed(0)
    first = pooled_pass(model, optimizer, inputs, targets, memory, fed.content, pool, config, generator)
    for _ in range(5):
        last = pooled_pass(model, optimizer, inputs, targets, memory, fed.content, pool, config, generator)
    assert np.mean(last) < np.mean(first)
    assert torch.count_nonzero(model.sasrec.item_emb.weight[0]) == 0  # padding row never trained
