"""The model: causality, padding, gradient flow, shapes, the scoring identity, router masking,
auxiliary losses, checkpoints by parameter group, and the seed's constructor call.

Everything runs on tiny sizes (CPU, a few seconds for the whole file).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from feddmmr.data.dataset import trim_padding
from feddmmr.models import PARAM_GROUPS, CheckpointError, UR4RecV2MoE

NUM_ITEMS, HIDDEN, L, DV, DT = 40, 16, 8, 12, 10
B, N, K = 4, 6, 5
AUX_GROUPS = ["projectors", "experts", "router", "gate"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, features: bool = True, **overrides) -> UR4RecV2MoE:
    torch.manual_seed(seed)
    kwargs = dict(num_items=NUM_ITEMS, sasrec_hidden_dim=HIDDEN, sasrec_num_blocks=2, sasrec_num_heads=2,
                  max_seq_len=L, moe_num_heads=2, visual_dim=DV, text_dim=DT, gating_init=0.01)
    kwargs.update(overrides)
    model = UR4RecV2MoE(**kwargs)
    if features:
        visual, text = feature_tables(seed)
        model.set_item_features(visual, text)
    return model


def feature_tables(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random item features; row 0 (padding) is missing in both, item 1 has no poster, item 2 no text."""
    g = torch.Generator().manual_seed(1000 + seed)
    visual, text = torch.randn(NUM_ITEMS, DV, generator=g), torch.randn(NUM_ITEMS, DT, generator=g)
    visual[0] = text[0] = 0
    visual[1] = 0
    text[2] = 0
    return visual, text


def batch(seed: int = 0, batch_size: int = B, length: int = L, cands: int = N, mem: int = K):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, NUM_ITEMS, (batch_size, length), generator=g)
    targets = torch.randint(3, NUM_ITEMS, (batch_size, cands), generator=g)
    mem_vis = torch.randn(batch_size, mem, DV, generator=g)
    mem_txt = torch.randn(batch_size, mem, DT, generator=g)
    return seq, targets, mem_vis, mem_txt


def training_batch(seed: int = 0, negatives: int = N):
    """Left-padded sequences, positives shifted by one (0 = no target), shared negatives per sequence."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(3, NUM_ITEMS, (B, L + 1), generator=g)
    for row, pad in enumerate([0, 2, 3, 5][:B]):
        full[row, :pad] = 0
    seq, pos = full[:, :-1].clone(), full[:, 1:].clone()
    pos[seq == 0] = 0
    neg = torch.randint(3, NUM_ITEMS, (B, negatives), generator=g)
    mem_vis = torch.randn(B, K, DV, generator=g)
    mem_txt = torch.randn(B, K, DT, generator=g)
    return seq, pos, neg, mem_vis, mem_txt


def losses(model: UR4RecV2MoE, seq, pos, neg, mem_vis=None, mem_txt=None, align: bool = False) -> dict:
    """``model.losses`` with the InfoNCE alignment over the batch's target items when ``align``."""
    return model.losses(seq, pos, neg, mem_vis, mem_txt, align_items=pos.reshape(-1) if align else None)


def snapshot(model: UR4RecV2MoE) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_by_group(model: UR4RecV2MoE, before: dict[str, torch.Tensor]) -> dict[str, list[bool]]:
    return {group: [not torch.equal(before[name], p.detach()) for name, p in params]
            for group, params in model.named_groups().items()}


def adam_step(model: UR4RecV2MoE, align: bool = True, memory: bool = True, seed: int = 0) -> dict:
    seq, pos, neg, mem_vis, mem_txt = training_batch(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = losses(model, seq, pos, neg, mem_vis if memory else None, mem_txt if memory else None, align=align)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out


# ---------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("pad", [0, 3], ids=["no-padding", "left-padding"])
@pytest.mark.parametrize("cut", [1, 4, 6])
def test_later_items_change_no_earlier_output(pad, cut):
    model = make_model().eval()
    seq, cands, mem_vis, mem_txt = batch(1)
    seq[:, :pad] = 0
    cut = max(cut, pad)  # last position kept equal
    other = seq.clone()
    other[:, cut + 1:] = torch.randint(3, NUM_ITEMS, other[:, cut + 1:].shape, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(seq, other)
    with torch.no_grad():
        a, b = model.encode(seq), model.encode(other)
        torch.testing.assert_close(a[:, :cut + 1], b[:, :cut + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, cut + 1:], b[:, cut + 1:])  # the change is visible later on
        for t in range(cut + 1):
            sa = model.score(a[:, t], cands, mem_vis, mem_txt)
            sb = model.score(b[:, t], cands, mem_vis, mem_txt)
            torch.testing.assert_close(sa, sb, rtol=0, atol=1e-6)


def test_padding_is_invisible_to_real_positions():
    """A left-padded sequence: real queries never attend to padding keys, padding rows give no NaN."""
    model = make_model().eval()
    seq, _, _, _ = batch(2)
    seq[:, :3] = 0
    seq[0, :5] = 0
    pad = (seq == 0).unsqueeze(-1)
    noise = torch.randn(B, L, HIDDEN, generator=torch.Generator().manual_seed(3))

    def perturbed(where: torch.Tensor) -> torch.Tensor:
        """Encode with noise added to the attention input (the keys/values offered) at ``where``."""
        hooks = [block.ln_attn.register_forward_hook(lambda m, i, o: o + 3.0 * noise * where)
                 for block in model.sasrec.blocks]
        try:
            return model.encode(seq)
        finally:
            for h in hooks:
                h.remove()

    real = ~pad.squeeze(-1)
    with torch.no_grad():
        out = model.encode(seq)
        noisy = perturbed(pad)
        first_real = torch.zeros_like(pad)
        first_real[:, 5] = True
        control = perturbed(first_real)
    assert torch.isfinite(out).all()
    # whatever the padding rows would offer, real positions do not change ...
    torch.testing.assert_close(out[real], noisy[real], rtol=0, atol=1e-6)
    # ... while the same perturbation of a real row does reach the later positions
    assert not torch.allclose(out[:, 6:], control[:, 6:])



def test_cutting_all_padding_columns_changes_no_output():
    """Positions are right-aligned: a batch of short windows cut to its real length scores as the
    full width does, so short windows need not pay for L positions."""
    model = make_model().eval()
    seq, cands, mem_vis, mem_txt = batch(4)
    seq[:, :3] = 0
    seq[1, :5] = 0
    width = trim_padding(seq.numpy())
    assert width == L - 3
    with torch.no_grad():
        full = model.score(model.encode(seq)[:, -1], cands, mem_vis, mem_txt)
        cut = model.score(model.encode(seq[:, -width:])[:, -1], cands, mem_vis, mem_txt)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)


def test_trim_padding_counts_the_columns_that_hold_an_item():
    import numpy as np

    assert trim_padding(np.array([[0, 0, 1], [0, 2, 3]])) == 2
    assert trim_padding(np.zeros((2, 3, 4), dtype=np.int64)) == 1  # an all-padding batch keeps one column
    assert trim_padding(np.array([[[5, 0, 1]]])) == 3

# ---------------------------------------------------------------------------------------- padding
def test_padding_row_is_zero_at_init_and_after_adam_step():
    model = make_model()
    assert torch.equal(model.sasrec.item_emb.weight[0], torch.zeros(HIDDEN))
    seq, pos, neg, mem_vis, mem_txt = training_batch(3)
    neg[:, 0] = 0  # even a (bogus) padding negative must not move the padding row
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = losses(model, seq, pos, neg, mem_vis, mem_txt, align=True)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    weight = model.sasrec.item_emb.weight
    assert torch.equal(weight[0], torch.zeros(HIDDEN))
    assert not torch.equal(weight[1:], make_model().sasrec.item_emb.weight[1:])  # the rest did train


# ---------------------------------------------------------------------------------------- gradient flow
def test_one_step_with_memory_and_alignment_trains_every_group():
    model = make_model(gating_init=0.01)
    before = snapshot(model)
    out = adam_step(model, align=True, memory=True)
    assert out["contrastive"] > 0 and torch.isfinite(out["loss"])
    changed = changed_by_group(model, before)
    assert set(changed) == set(PARAM_GROUPS)
    for group in AUX_GROUPS:  # every tensor of the auxiliary path receives a gradient
        assert changed[group] and all(changed[group]), (group, changed[group])
    for group in ("item_embedding", "backbone"):
        assert changed[group] and any(changed[group]), group


def test_set_trainable_aux_groups_freezes_sasrec():
    model = make_model()
    model.set_trainable(AUX_GROUPS)
    before = snapshot(model)
    adam_step(model, align=True, memory=True)
    changed = changed_by_group(model, before)
    for group in AUX_GROUPS:
        assert all(changed[group]), group
    for group in ("item_embedding", "backbone"):
        assert not any(changed[group]), group
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.set_trainable(["projector"])


def test_without_memory_scores_are_exactly_sasrec():
    model = make_model().eval()
    seq, cands, mem_vis, mem_txt = batch(4)
    with torch.no_grad():
        pure = (model.encode(seq)[:, -1].unsqueeze(1) * model.sasrec.item_emb.weight[cands]).sum(-1)
        none = model(None, seq, cands, None, None, None)
        zero = model(None, seq, cands, None, torch.zeros_like(mem_vis), torch.zeros_like(mem_txt))
        empty = model(None, seq, cands, None, mem_vis[:, :0], mem_txt[:, :0])
        full = model(None, seq, cands, None, mem_vis, mem_txt)
    assert torch.equal(none, pure)
    assert torch.equal(zero, pure)
    assert torch.equal(empty, pure)
    assert not torch.allclose(full, pure, rtol=0, atol=1e-7)  # a real memory does contribute


def test_sasrec_only_step_leaves_auxiliary_groups_untouched():
    """Stage 1: no memory, no alignment -> only the SASRec groups get gradients."""
    model = make_model()
    before = snapshot(model)
    adam_step(model, align=False, memory=False)
    changed = changed_by_group(model, before)
    for group in AUX_GROUPS:
        assert not any(changed[group]), group
    assert any(changed["item_embedding"]) and any(changed["backbone"])


# ---------------------------------------------------------------------------------------- shapes, NaN
MEMORIES = ["none", "empty", "zero", "full"]


def memory_of(kind: str, mem_vis: torch.Tensor, mem_txt: torch.Tensor):
    if kind == "none":
        return None, None
    if kind == "empty":
        return mem_vis[:, :0], mem_txt[:, :0]
    if kind == "zero":
        return torch.zeros_like(mem_vis), torch.zeros_like(mem_txt)
    return mem_vis, mem_txt


@pytest.mark.parametrize("kind", MEMORIES)
@pytest.mark.parametrize("modalities", ["both", "visual-only", "text-only"])
def test_forward_shapes_in_both_modes(kind, modalities):
    model = make_model().eval()
    seq, cands, mem_vis, mem_txt = batch(5)
    mv, mt = memory_of(kind, mem_vis, mem_txt)
    if modalities == "visual-only":
        mt = None
    elif modalities == "text-only":
        mv = None
    target_visual = torch.randn(B, N, DV)
    with torch.no_grad():
        sampled = model(user_ids=None, input_seq=seq, target_items=cands, target_visual=target_visual,
                        memory_visual=mv, memory_text=mt, training_mode=False)
        in_batch = model(user_ids=None, input_seq=seq, target_items=cands[:, 0], target_visual=target_visual[:, 0],
                         memory_visual=mv, memory_text=mt, training_mode=True)
        no_tv = model(None, seq, cands, None, mv, mt)
    assert sampled.shape == (B, N) and no_tv.shape == (B, N)
    assert in_batch.shape == (B, B)
    assert torch.isfinite(sampled).all() and torch.isfinite(in_batch).all() and torch.isfinite(no_tv).all()


@pytest.mark.parametrize("kind", MEMORIES)
def test_losses_backward_is_finite(kind):
    model = make_model()
    seq, pos, neg, mem_vis, mem_txt = training_batch(6)
    mv, mt = memory_of(kind, mem_vis, mem_txt)
    out = losses(model, seq, pos, neg, mv, mt, align=True)
    out["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_all_zero_features_everywhere_give_no_nan():
    model = make_model(features=False)
    model.set_item_features(torch.zeros(NUM_ITEMS, DV), torch.zeros(NUM_ITEMS, DT))
    seq, cands, mem_vis, mem_txt = batch(7)
    zv, zt = torch.zeros_like(mem_vis), torch.zeros_like(mem_txt)
    model.eval()
    with torch.no_grad():
        scores = model(None, seq, cands, torch.zeros(B, N, DV), zv, zt)
        in_batch = model(None, seq, cands[:, 0], torch.zeros(B, DV), zv, zt, training_mode=True)
    assert torch.isfinite(scores).all() and torch.isfinite(in_batch).all()
    model.train()
    s, pos, neg, _, _ = training_batch(7)
    out = losses(model, s, pos, neg, zv, zt, align=True)
    out["loss"].backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["contrastive"] == 0 and out["load_balance"] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_feature_tables_behave_like_zero_tables():
    seq, cands, mem_vis, mem_txt = batch(8)
    unset = make_model(features=False).eval()
    zeros = make_model(features=False).eval()
    zeros.set_item_features(None, None)
    with torch.no_grad():
        assert torch.equal(unset(None, seq, cands, None, mem_vis, mem_txt),
                           zeros(None, seq, cands, None, mem_vis, mem_txt))
    with pytest.raises(ValueError, match="item_visual"):
        zeros.set_item_features(torch.zeros(NUM_ITEMS - 1, DV), None)


# ---------------------------------------------------------------------------------------- scoring identity
def test_score_is_the_fusion_formula():
    """score(b, c) = <LN(seq_b) + g * (w_vis * LN(vis) + w_sem * LN(sem)), E[c]>, computed by hand."""
    model = make_model(gating_init=0.7).eval()
    seq, cands, mem_vis, mem_txt = batch(9)
    captured = {}
    hooks = [model.vis_ln.register_forward_hook(lambda m, i, o: captured.__setitem__("vis", o)),
             model.sem_ln.register_forward_hook(lambda m, i, o: captured.__setitem__("sem", o))]
    with torch.no_grad():
        _, weights, _ = model.auxiliary(cands, mem_vis, mem_txt)
        for h in hooks:
            h.remove()
        seq_out = model.sasrec.seq_ln(model.sasrec(seq))[:, -1]
        torch.testing.assert_close(model.encode(seq)[:, -1], seq_out, rtol=0, atol=0)
        fused = seq_out.unsqueeze(1) + model.gating_weight * (
            weights[..., :1] * captured["vis"] + weights[..., 1:] * captured["sem"])
        expected = (fused * model.sasrec.item_emb.weight[cands]).sum(-1)
        got = model(None, seq, cands, None, mem_vis, mem_txt)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(weights.sum(-1)[weights.sum(-1) > 0], torch.ones(1))


def test_in_batch_diagonal_equals_sampled_scores():
    model = make_model(gating_init=0.5).eval()
    seq, cands, mem_vis, mem_txt = batch(10)
    targets = cands[:, 0]
    with torch.no_grad():
        for tv in (None, torch.randn(B, DV)):
            in_batch = model(None, seq, targets, tv, mem_vis, mem_txt, training_mode=True)
            sampled = model(None, seq, targets[:, None], None if tv is None else tv[:, None], mem_vis, mem_txt)
            torch.testing.assert_close(in_batch.diagonal(), sampled[:, 0], rtol=1e-5, atol=1e-6)
            # column j is target j scored for every user with that user's own memory and sequence
            for j in range(B):
                col = model(None, seq, targets[j].expand(B, 1),
                            None if tv is None else tv[j].expand(B, 1, DV), mem_vis, mem_txt)
                torch.testing.assert_close(in_batch[:, j], col[:, 0], rtol=1e-5, atol=1e-6)


def test_full_ranking_equals_gathered_sampled_scores():
    model = make_model(gating_init=0.5).eval()
    seq, cands, mem_vis, mem_txt = batch(11)
    cands[:, :2] = torch.tensor([1, 2])  # the items with a missing modality too
    every = torch.arange(NUM_ITEMS).expand(B, NUM_ITEMS)
    with torch.no_grad():
        full = model(None, seq, every, None, mem_vis, mem_txt)
        sampled = model(None, seq, cands, None, mem_vis, mem_txt)
        hidden = model.encode(seq)[:, -1]
        direct = model.score(hidden, cands, mem_vis, mem_txt)
    assert full.shape == (B, NUM_ITEMS)
    torch.testing.assert_close(full.gather(1, cands), sampled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(direct, sampled, rtol=0, atol=0)


def test_training_loss_uses_the_same_scores_as_inference():
    """The logits behind `losses` at the last position equal forward()'s scores (no dropout)."""
    model = make_model(gating_init=0.5, dropout=0.0)
    seq, pos, neg, mem_vis, mem_txt = training_batch(12, negatives=3)
    cands = torch.cat([pos[:, -1:], neg], dim=1)
    with torch.no_grad():
        scores = model(None, seq, cands, None, mem_vis, mem_txt)
        expected = torch.nn.functional.cross_entropy(scores, torch.zeros(B, dtype=torch.long))
        only_last = pos.clone()
        only_last[:, :-1] = 0
        got = losses(model, seq, only_last, neg, mem_vis, mem_txt)["next_item"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_projecting_the_whole_catalogue_gives_the_per_lookup_scores_and_gradients():
    """Training projects every item once (``projected_tables``) instead of every (row, candidate) lookup."""
    model = make_model(gating_init=0.5, dropout=0.0)
    seq, items, mem_vis, mem_txt = batch(13)
    items[0, :2] = torch.tensor([1, 2])  # an item without a poster, one without text
    results = []
    for tables in (None, "precomputed"):
        model.zero_grad()
        bonus, weights, balance = model.auxiliary(items, mem_vis, mem_txt, dedupe=False,
                                                  tables=model.projected_tables() if tables else None)
        (bonus.sum() + weights.sum() + balance).backward()
        results.append((bonus.detach(), weights.detach(), balance.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (b1, w1, l1, g1), (b2, w2, l2, g2) = results
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys() and any(name.startswith("proj_visual") for name in g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def test_dropout_keeps_each_value_with_probability_1_minus_p_and_rescales():
    from feddmmr.models.sasrec import Dropout

    drop = Dropout(0.25)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept values only, rescaled
    drop.eval()
    assert drop(x) is x


# ---------------------------------------------------------------------------------------- router masking
def test_candidate_without_poster_gets_no_visual_weight():
    model = make_model().eval()
    _, cands, mem_vis, mem_txt = batch(13)
    target_visual = torch.randn(B, N, DV)
    target_visual[:, 0] = 0
    with torch.no_grad():
        _, weights, _ = model.auxiliary(cands, mem_vis, mem_txt, target_visual=target_visual)
        # from the table: item 1 has no poster
        _, table_w, _ = model.auxiliary(torch.full((B, 2), 1), mem_vis, mem_txt)
    assert torch.equal(weights[:, 0, 0], torch.zeros(B))
    assert torch.allclose(weights[:, 0, 1], torch.ones(B))
    assert (weights[:, 1:, 0] > 0).all() and (weights[:, 1:, 1] > 0).all()
    assert torch.equal(table_w[..., 0], torch.zeros(B, 2))


def test_without_the_router_the_experts_are_mixed_equally_whatever_its_weights():
    model = make_model(use_router=False).eval()
    _, cands, mem_vis, mem_txt = batch(14)
    with torch.no_grad():
        bonus, weights, balance = model.auxiliary(cands, mem_vis, mem_txt)
        model.router[-1].bias.add_(torch.tensor([5.0, -5.0]))  # a router that would pick the visual expert
        moved, _, _ = model.auxiliary(cands, mem_vis, mem_txt)
        only_text, no_poster, _ = model.auxiliary(torch.full((B, 2), 1), mem_vis, mem_txt)  # item 1: no poster
    assert torch.equal(weights, torch.full_like(weights, 0.5))
    assert torch.equal(bonus, moved)
    assert balance.item() == 0.0
    assert torch.equal(no_poster[..., 1], torch.ones(B, 2))


def test_given_target_features_are_per_row_not_per_item_id():
    """The same item id in every row, its poster missing in row 0 only: row 0 alone loses w_vis.

    (Given features were once deduplicated by item id, so a row silently got another row's
    feature, chosen nondeterministically.)
    """
    model = make_model().eval()
    _, _, mem_vis, mem_txt = batch(21)
    cands = torch.full((B, N), 5)
    target_visual = torch.randn(B, N, DV)
    target_visual[0] = 0
    with torch.no_grad():
        bonus, weights, _ = model.auxiliary(cands, mem_vis, mem_txt, target_visual=target_visual)
        alone, _, _ = model.auxiliary(cands[1:2], mem_vis[1:2], mem_txt[1:2], target_visual=target_visual[1:2])
    assert torch.equal(weights[0, :, 0], torch.zeros(N))
    assert (weights[1:, :, 0] > 0).all()
    torch.testing.assert_close(bonus[1:2], alone, rtol=1e-5, atol=1e-7)
    # a poster broadcast along the batch (in-batch scoring) equals the materialised one
    shared = torch.randn(1, N, DV)
    with torch.no_grad():
        cands = torch.randint(3, NUM_ITEMS, (1, N)).expand(B, N)
        broadcast, _, _ = model.auxiliary(cands, mem_vis, mem_txt, target_visual=shared.expand(B, N, DV))
        copied, _, _ = model.auxiliary(cands, mem_vis, mem_txt, target_visual=shared.repeat(B, 1, 1))
    torch.testing.assert_close(broadcast, copied, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", ["zero", "none"])
def test_memory_without_text_gets_no_semantic_weight(how):
    model = make_model().eval()
    _, cands, mem_vis, mem_txt = batch(14)
    mt = torch.zeros_like(mem_txt) if how == "zero" else None
    with torch.no_grad():
        _, weights, _ = model.auxiliary(cands, mem_vis, mt)
        _, no_vis, _ = model.auxiliary(cands, torch.zeros_like(mem_vis) if how == "zero" else None, mem_txt)
    assert torch.equal(weights[..., 1], torch.zeros(B, N))
    assert torch.allclose(weights[..., 0], torch.ones(B, N))
    assert torch.equal(no_vis[..., 0], torch.zeros(B, N))
    assert torch.allclose(no_vis[..., 1], torch.ones(B, N))


def test_memory_mask_hides_entries():
    model = make_model().eval()
    _, cands, mem_vis, mem_txt = batch(15)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0] = False
    mask[1, 2:] = False
    with torch.no_grad():
        bonus, weights, _ = model.auxiliary(cands, mem_vis, mem_txt, memory_mask=mask)
        trimmed, _, _ = model.auxiliary(cands[1:2], mem_vis[1:2, :2], mem_txt[1:2, :2])
    assert torch.equal(bonus[0], torch.zeros(N)) and torch.equal(weights[0], torch.zeros(N, 2))
    torch.testing.assert_close(bonus[1:2], trimmed, rtol=1e-5, atol=1e-7)


def test_both_experts_unavailable_gives_zero_bonus():
    model = make_model(gating_init=1.0).eval()
    _, cands, mem_vis, mem_txt = batch(16)
    with torch.no_grad():
        bonus, weights, lb = model.auxiliary(cands, mem_vis, torch.zeros_like(mem_txt),
                                             target_visual=torch.zeros(B, N, DV))
        some, _, _ = model.auxiliary(cands, mem_vis, mem_txt, target_visual=torch.zeros(B, N, DV))
    assert torch.equal(bonus, torch.zeros(B, N))
    assert torch.equal(weights, torch.zeros(B, N, 2))
    assert lb == 0
    assert (some != 0).all()  # the semantic expert alone still contributes


# ---------------------------------------------------------------------------------------- auxiliary losses
def test_load_balance_is_nonnegative_and_zero_at_even_usage():
    model = make_model().eval()
    _, cands, mem_vis, mem_txt = batch(17)
    with torch.no_grad():
        _, _, lb_random = model.auxiliary(cands, mem_vis, mem_txt)
        last = model.router[-1]
        last.weight.zero_()
        last.bias.zero_()
        _, weights, lb_even = model.auxiliary(cands, mem_vis, mem_txt)
        last.bias.copy_(torch.tensor([4.0, -4.0]))
        _, _, lb_skewed = model.auxiliary(cands, mem_vis, mem_txt)
    assert lb_random >= 0
    torch.testing.assert_close(weights, torch.full((B, N, 2), 0.5))
    assert lb_even.abs() < 1e-6
    assert lb_skewed > 0.9  # almost all on one expert: (2u - 1)^2 close to 1


def test_contrastive_loss_decreases_on_correlated_features():
    torch.manual_seed(0)
    latent = torch.randn(NUM_ITEMS, 4)
    visual = latent @ torch.randn(4, DV) + 0.05 * torch.randn(NUM_ITEMS, DV)
    text = latent @ torch.randn(4, DT) + 0.05 * torch.randn(NUM_ITEMS, DT)
    visual[0] = text[0] = 0
    model = make_model(features=False, contrastive_lambda=1.0)
    model.set_item_features(visual, text)
    model.set_trainable(["projectors"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    seq, pos, neg, _, _ = training_batch(18)
    history = []
    for _ in range(8):
        out = losses(model, seq, pos, neg, align=True)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append(float(out["contrastive"]))
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0] - 0.1, history
    # only items with both modalities are aligned; fewer than two gives 0, not NaN
    with torch.no_grad():
        assert model.alignment_loss(torch.tensor([0, 5])).item() == 0.0


def test_losses_report_usage_and_align_flag():
    model = make_model()
    seq, pos, neg, mem_vis, mem_txt = training_batch(19)
    off = losses(model, seq, pos, neg, mem_vis, mem_txt, align=False)
    on = losses(model, seq, pos, neg, mem_vis, mem_txt, align=True)
    assert off["contrastive"] == 0 and on["contrastive"] > 0
    assert on["router_usage"].shape == (2,)
    torch.testing.assert_close(on["router_usage"].sum(), torch.tensor(1.0), rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------- checkpoints
def test_safetensors_round_trip_gives_identical_scores(tmp_path):
    model = make_model(seed=0).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    fresh = make_model(seed=1).eval()  # other weights, same (public) item feature tables
    fresh.set_item_features(model.item_visual, model.item_text)
    seq, cands, mem_vis, mem_txt = batch(20)
    with torch.no_grad():
        assert not torch.equal(fresh(None, seq, cands, None, mem_vis, mem_txt),
                               model(None, seq, cands, None, mem_vis, mem_txt))
        fresh.load_state_dict(load_file(str(path)))
        assert torch.equal(fresh(None, seq, cands, None, mem_vis, mem_txt),
                           model(None, seq, cands, None, mem_vis, mem_txt))
        assert torch.equal(fresh(None, seq, cands[:, 0], None, mem_vis, mem_txt, training_mode=True),
                           model(None, seq, cands[:, 0], None, mem_vis, mem_txt, training_mode=True))


@pytest.mark.parametrize("key, group", [("sasrec.item_emb.weight", "item_embedding"),
                                        ("sasrec.pos_emb.weight", "backbone"),
                                        ("proj_text.0.weight", "projectors"),
                                        ("semantic_expert.q.weight", "experts"),
                                        ("router.0.bias", "router"),
                                        ("gating_weight", "gate")])
def test_missing_or_misshaped_group_is_a_named_error(key, group):
    source = make_model(seed=1).state_dict()
    model = make_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    missing = {k: v for k, v in source.items() if k != key}
    with pytest.raises(CheckpointError, match=f"'{group}'"):
        model.load_state_dict(missing)
    bad = dict(source)
    bad[key] = torch.zeros(*source[key].shape, 2) if source[key].dim() == 0 else torch.zeros(3, *source[key].shape[1:])
    with pytest.raises(CheckpointError, match=f"'{group}'"):
        model.load_state_dict(bad)
    with pytest.raises(CheckpointError, match=f"'{group}'"):
        model.load_state_dict(bad, groups=[group])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a failed load changes nothing


def test_item_embedding_of_another_vocabulary_is_refused():
    """The original project's failure: embeddings of the wrong size silently replaced by random ones."""
    other = make_model(num_items=NUM_ITEMS + 5, features=False).state_dict()
    model = make_model()
    with pytest.raises(CheckpointError, match="'item_embedding'"):
        model.load_state_dict(other, groups=["item_embedding", "backbone"])


def test_loading_selected_groups_loads_only_those():
    source = make_model(seed=1)
    model = make_model(seed=0)
    before = copy.deepcopy(model.state_dict())
    result = model.load_state_dict(source.state_dict(), groups=["item_embedding", "backbone"])
    assert result is not None
    src, after = source.state_dict(), model.state_dict()
    from feddmmr.models import group_of
    for key in after:
        if group_of(key) in ("item_embedding", "backbone"):
            assert torch.equal(after[key], src[key]), key
        else:
            assert torch.equal(after[key], before[key]), key
    # a transmitted group state (only some groups) loads with `groups`, is incomplete without it
    partial = source.group_state(["projectors", "gate"])
    assert {group_of(k) for k in partial} == {"projectors", "gate"}
    model.load_state_dict(partial, groups=["projectors", "gate"])
    assert torch.equal(model.gating_weight, source.gating_weight)
    with pytest.raises(CheckpointError, match="'item_embedding'"):
        model.load_state_dict(partial)
    with pytest.raises(CheckpointError, match="'router'"):
        model.load_state_dict(partial, groups=["projectors", "router"])


def test_seed_wrapped_checkpoint_format_loads():
    source = make_model(seed=1)
    model = make_model(seed=0)
    model.load_state_dict({"model_state_dict": source.state_dict()})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_unknown_group_name_is_refused():
    """A typo in a group name must not load nothing silently."""
    model = make_model()
    with pytest.raises(ValueError, match="item_embeddings"):
        model.load_state_dict(make_model(seed=1).state_dict(), groups=["item_embeddings"])


# ---------------------------------------------------------------------------------------- seed call
def test_seed_constructor_and_inference_call():
    torch.manual_seed(0)
    model = UR4RecV2MoE(num_items=3953, sasrec_hidden_dim=128, sasrec_num_blocks=2, sasrec_num_heads=4,
                        max_seq_len=50, moe_num_heads=8, visual_dim=512, text_dim=384, gating_init=0.01,
                        contrastive_lambda=0.5, load_balance_lambda=0.01).eval()
    assert model.sasrec.item_emb.weight.shape == (3953, 128)
    assert model.gating_weight.item() == pytest.approx(0.01)
    assert model.contrastive_lambda == 0.5 and model.load_balance_lambda == 0.01
    assert len(model.sasrec.blocks) == 2 and model.semantic_expert.heads == 8
    b, n, k = 2, 101, 20
    seq = torch.randint(1, 3953, (b, 50))
    with torch.no_grad():
        scores = model(user_ids=None, input_seq=seq, target_items=torch.randint(1, 3953, (b, n)),
                       target_visual=torch.randn(b, n, 512), memory_visual=torch.randn(b, k, 512),
                       memory_text=torch.randn(b, k, 384), training_mode=False)
        in_batch = model(user_ids=None, input_seq=seq, target_items=torch.randint(1, 3953, (b,)),
                         target_visual=torch.randn(b, 512), memory_visual=torch.randn(b, k, 512),
                         memory_text=torch.randn(b, k, 384), training_mode=True)
    assert scores.shape == (b, n) and in_batch.shape == (b, b)
    assert torch.isfinite(scores).all() and torch.isfinite(in_batch).all()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.encode(torch.ones(1, 51, dtype=torch.long))


def test_a_misspelt_constructor_argument_is_refused_by_name():
    """Every seed argument is accepted; an unknown one is an error naming it (never silently ignored)."""
    with pytest.raises(TypeError, match="sasrec_hiden_dim"):
        UR4RecV2MoE(num_items=10, sasrec_hiden_dim=8)


# ------------------------------------------------------------------------------- reference formulas

def test_sasrec_forward_is_the_pre_ln_transformer_of_the_paper():
    """SASRec (eval mode) against an independent reference: item embeddings scaled by sqrt(D) plus
    learned positions, then per block x + Out(Attn(LN(x))) and x + FFN(LN(x)), with attention by
    PyTorch's ``scaled_dot_product_attention`` (1/sqrt(d_head) scaling) over earlier real positions
    (and itself); padding rows are zero."""
    import math

    import torch.nn.functional as F

    sasrec = make_model(features=False).sasrec.eval()
    seq, _, _, _ = batch(3)
    seq[1, :3] = 0  # left padding
    real = seq != 0
    x = sasrec.item_emb(seq) * math.sqrt(HIDDEN) + sasrec.pos_emb(torch.arange(L))
    x = x * real.unsqueeze(-1)
    attend = torch.ones(L, L, dtype=torch.bool).tril() & real.unsqueeze(1) | torch.eye(L, dtype=torch.bool)
    for block in sasrec.blocks:
        heads = block.heads
        q, k, v = block.qkv(block.ln_attn(x)).view(B, L, 3, heads, HIDDEN // heads).unbind(2)
        a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=attend.unsqueeze(1))
        x = x + block.out(a.transpose(1, 2).reshape(B, L, HIDDEN))
        x = (x + block.ffn(block.ln_ffn(x))) * real.unsqueeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(sasrec(seq), x.detach(), rtol=1e-5, atol=1e-5)


def test_alignment_loss_is_the_symmetric_infonce_of_the_projected_features():
    """Over distinct items with both modalities (two are enough for a loss):
    0.5 * (CE(zv zt^T / tau, diag) + CE(zt zv^T / tau, diag)) with zv, zt the L2-normalised projections."""
    import torch.nn.functional as F

    model = make_model()
    visual, text = feature_tables()
    for items in (torch.tensor([5, 9]), torch.tensor([3, 4, 5, 6, 7, 8])):
        zv = F.normalize(model.proj_visual(visual[items]), dim=-1)
        zt = F.normalize(model.proj_text(text[items]), dim=-1)
        logits = zv @ zt.T / model.temperature
        target = torch.arange(len(items))
        expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        torch.testing.assert_close(model.alignment_loss(items), expected, rtol=1e-5, atol=1e-6)
    assert float(model.alignment_loss(torch.tensor([5, 0, 2])).detach()) == 0.0  # one usable item: nothing to align


def test_load_balance_counts_a_single_candidate_with_both_experts():
    """The load-balance loss is (2 * sum(usage^2) - 1) over the pairs where both experts are available,
    even when that is one (user, candidate) pair."""
    model = make_model().eval()
    _, cands, mem_vis, mem_txt = batch(17)
    with torch.no_grad():
        last = model.router[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([4.0, -4.0]))
        _, weights, loss = model.auxiliary(cands[:1, :1], mem_vis[:1], mem_txt[:1])
    usage = weights[0, 0]
    assert float(loss) == pytest.approx(float(2 * (usage ** 2).sum() - 1)) and float(loss) > 0.9
