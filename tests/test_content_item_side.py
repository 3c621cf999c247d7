"""The candidate-side content tower (``content_item_side``, issue #14 (d)).

Off (the default) the model, its checkpoints and its scores are exactly as before. On, a candidate
is scored through ``E[c] + P(content[c])`` in the one scoring rule that training (sampled softmax,
full softmax) and evaluation (``model.score``, full ranking) share, so an item whose ID row was never
trained (a new item) still gets a score from its content. The tower's parameters are in the
"projectors" group: Stage 3 trains and transmits them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from feddmmr.config import ConfigError, TrainConfig, validate_config
from feddmmr.models import UR4RecV2MoE
from feddmmr.models.groups import group_of

from .fedtools import stage3_after_stage1, tiny_config

NUM_ITEMS, HIDDEN, L, DV, DT, B, K = 30, 16, 6, 12, 10, 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(on: bool, trained_tower: bool = False, **overrides) -> UR4RecV2MoE:
    torch.manual_seed(0)
    kwargs = dict(num_items=NUM_ITEMS, sasrec_hidden_dim=HIDDEN, sasrec_num_blocks=1, sasrec_num_heads=2,
                  max_seq_len=L, moe_num_heads=2, visual_dim=DV, text_dim=DT, gating_init=0.5, dropout=0.0)
    kwargs.update(overrides)
    model = UR4RecV2MoE(**kwargs, **({"content_item_side": True} if on else {}))
    g = torch.Generator().manual_seed(7)
    visual, text = torch.randn(NUM_ITEMS, DV, generator=g), torch.randn(NUM_ITEMS, DT, generator=g)
    visual[0] = text[0] = 0
    visual[1] = 0  # item 1 has no poster
    model.set_item_features(visual, text)
    if trained_tower:  # stands in for a trained tower: the zero-initialised last layer made non-zero
        with torch.no_grad():
            last = model.item_content.net[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.3)
            last.bias.copy_(torch.randn(last.bias.shape, generator=g) * 0.3)
    return model


def a_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(2, NUM_ITEMS, (B, L + 1), generator=g)
    full[1, :2] = 0
    seq, pos = full[:, :-1].clone(), full[:, 1:].clone()
    pos[seq == 0] = 0
    neg = torch.randint(1, NUM_ITEMS, (B, 5), generator=g)
    memory = torch.randint(1, NUM_ITEMS, (B, K), generator=g)
    return seq, pos, neg, memory


def test_off_by_default_and_the_model_is_unchanged():
    assert TrainConfig().content_item_side is False
    assert "content_item_side" not in TrainConfig().model_kwargs(10, 6, 4)  # config.json as before
    off, on = make_model(False), make_model(True)
    assert off.item_content is None
    # the tower is built last: every other parameter has the same seeded initial value
    extra = set(on.state_dict()) - set(off.state_dict())
    assert extra and all(k.startswith("item_content.") for k in extra)
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())


def test_at_initialisation_the_tower_adds_exactly_zero():
    """Its last layer starts at zero: Stage 3 starts from the Stage 1 model's scores, bit for bit."""
    off, on = make_model(False).eval(), make_model(True).eval()
    seq, pos, neg, memory = a_batch()
    every = torch.arange(NUM_ITEMS).expand(B, -1)
    with torch.no_grad():
        for model in (off, on):
            model.out = (model.score(model.encode(seq)[:, -1], every, model.item_visual[memory],
                                     model.item_text[memory]),
                         model.losses(seq, pos, neg, model.item_visual[memory], model.item_text[memory])["loss"])
    assert torch.equal(off.out[0], on.out[0]) and torch.equal(off.out[1], on.out[1])


def test_an_item_without_id_training_is_scored_by_its_content():
    model = make_model(True, trained_tower=True).eval()
    with torch.no_grad():
        model.sasrec.item_emb.weight[[5, 6, 7]] = 0  # no ID information at all
        model.item_visual[6], model.item_text[6] = model.item_visual[5], model.item_text[5]  # 6: 5's content
    hidden = torch.randn(B, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scores = model.score(hidden, torch.tensor([[5, 6, 7]]).expand(B, -1))
        off = make_model(False).eval()
        off.sasrec.item_emb.weight.data[[5, 6, 7]] = 0
        without = off.score(hidden, torch.tensor([[5, 6, 7]]).expand(B, -1))
    assert torch.count_nonzero(without) == 0  # off, a zero ID row scores 0 for everyone
    assert torch.equal(scores[:, 0], scores[:, 1])  # same content, same score
    assert (scores[:, 0] - scores[:, 2]).abs().min() > 1e-3  # other content, another score
    assert scores[:, 0].std() > 1e-3  # and it depends on the user


@pytest.mark.parametrize("objective", ["sampled_softmax", "full_softmax"])
def test_training_logits_are_the_scores_of_model_score(objective):
    model = make_model(True, trained_tower=True)
    seq, pos, neg, memory = a_batch(1)
    mem_vis, mem_txt = model.item_visual[memory], model.item_text[memory]
    with torch.no_grad():
        got = model.losses(seq, pos, neg, mem_vis, mem_txt, objective=objective)["next_item"]
        hidden = model.encode(seq)
        terms = []
        for t in range(L):
            if objective == "full_softmax":
                cands = torch.arange(NUM_ITEMS).expand(B, -1)
                scores = model.score(hidden[:, t], cands, mem_vis, mem_txt)
                scores[:, 0] = float("-inf")  # padding is never a candidate
                target = pos[:, t]
            else:
                cands = torch.cat([pos[:, t:t + 1], neg], dim=1)
                scores = model.score(hidden[:, t], cands, mem_vis, mem_txt)
                scores[:, 1:] = scores[:, 1:].masked_fill(neg == pos[:, t:t + 1], float("-inf"))
                target = torch.zeros(B, dtype=torch.long)
            loss = F.cross_entropy(scores, target, reduction="none")
            terms += [loss[b] for b in range(B) if pos[b, t] != 0]
    torch.testing.assert_close(got, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)


def test_full_ranking_and_precomputed_tables_give_the_same_scores():
    """Evaluation's paths (a catalogue block with precomputed tables, or per candidate) agree."""
    model = make_model(True, trained_tower=True).eval()
    seq, _, neg, memory = a_batch(2)
    mem_vis, mem_txt = model.item_visual[memory], model.item_text[memory]
    with torch.no_grad():
        hidden = model.encode(seq)[:, -1]
        every = torch.arange(NUM_ITEMS).expand(B, -1)
        block = model.score(hidden, every, mem_vis, mem_txt, tables=model.projected_tables(), shared_candidates=True)
        direct = model.score(hidden, neg, mem_vis, mem_txt)
    torch.testing.assert_close(block.gather(1, neg), direct, rtol=1e-5, atol=1e-5)


def test_the_tower_is_trained_and_transmitted_with_the_projectors():
    model = make_model(True)
    names = [n for n, _ in model.named_parameters() if n.startswith("item_content.")]
    assert names and {group_of(n) for n in names} == {"projectors"}
    assert set(names) <= set(model.group_state(["projectors"]))
    seq, pos, neg, memory = a_batch(3)
    model.losses(seq, pos, neg, model.item_visual[memory], model.item_text[memory])["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("item_content.")}
    assert grads["item_content.net.2.weight"].abs().sum() > 0  # from the first step on
    model = make_model(True, trained_tower=True)
    model.losses(seq, pos, neg, model.item_visual[memory], model.item_text[memory])["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n.startswith("item_content."))


def test_it_needs_the_memory_features_and_trained_projectors():
    validate_config(tiny_config(3, content_item_side=True))
    with pytest.raises(ConfigError, match="content_item_side"):
        validate_config(tiny_config(3, content_item_side=True, use_memory=False))
    with pytest.raises(ConfigError, match="content_item_side"):
        validate_config(tiny_config(3, content_item_side=True, trainable_groups=["backbone", "experts"]))


def test_a_stage3_run_trains_the_tower_and_scores_the_same_after_restore(tmp_path):
    from feddmmr.evaluation import evaluate

    history, run = stage3_after_stage1(tmp_path, content_item_side=True)
    assert run.model.item_content is not None
    assert run.model.item_content.net[2].weight.abs().sum() > 0  # moved from its zero initialisation
    again = evaluate(run.scorer("test"), run.data, "test", "sampled", seed=0, max_len=8, num_negatives=10)
    assert again["NDCG@10"] == history["final"]["test_sampled"]["NDCG@10"]


def test_id_dropout_happens_in_training_only():
    model = make_model(True, content_id_dropout=0.5)
    torch.manual_seed(0)
    masks = torch.stack([model.id_keep_mask() for _ in range(200)])
    assert set(masks.unique().tolist()) == {0.0, 1.0} and abs(masks.mean() - 0.5) < 0.02
    assert model.eval().id_keep_mask() is None  # evaluation scores with every ID row
    assert make_model(True).id_keep_mask() is None  # p = 0: the scoring rule of model.score
    with pytest.raises(ValueError, match="content_item_side"):
        make_model(False, content_id_dropout=0.5)
    with pytest.raises(ConfigError, match="content_id_dropout"):
        validate_config(tiny_config(3, content_id_dropout=0.5))
    assert TrainConfig(content_item_side=True, content_id_dropout=0.5).model_kwargs(10, 6, 4)["content_id_dropout"] == 0.5


@pytest.mark.parametrize("objective", ["sampled_softmax", "full_softmax"])
def test_a_dropped_id_row_is_scored_as_a_zero_row(objective, monkeypatch):
    """Training with an item's ID dropped scores it as a candidate whose ID row is zero: by its content
    alone (the input sequence and the experts keep the ID rows; here no memory, and no dropped item in
    the inputs, so the only difference is the candidate side)."""
    seq, pos, neg, _ = a_batch(4)
    dropped = torch.tensor([i for i in range(1, NUM_ITEMS) if i not in seq][:8])
    assert len(dropped) and (torch.isin(neg, dropped).any() or torch.isin(pos, dropped).any())
    keep = torch.ones(NUM_ITEMS)
    keep[dropped] = 0
    model = make_model(True, trained_tower=True, content_id_dropout=0.5)
    monkeypatch.setattr(model, "id_keep_mask", lambda: keep)
    reference = make_model(True, trained_tower=True)
    with torch.no_grad():
        reference.sasrec.item_emb.weight[dropped] = 0
    got = model.losses(seq, pos, neg, objective=objective)["next_item"]
    want = reference.losses(seq, pos, neg, objective=objective)["next_item"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, make_model(True, trained_tower=True).losses(seq, pos, neg, objective=objective)[
        "next_item"])
