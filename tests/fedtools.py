"""Helpers for federation tests: a tiny dataset with content features that carry signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from feddmmr.config import TrainConfig, apply_overrides
from feddmmr.data.dataset import SequenceDataset, load_dataset
from feddmmr.features.store import FeatureTable, save_table

from .conftest import write_ratings

NUM_ITEMS = 40  # raw MovieIDs 1..40, index = id


def tiny_dataset(tmp_path: Path, users: int = 12, seed: int = 0) -> SequenceDataset:
    """Users walk through two genres (items 1-20 and 21-40) in order, 15-25 interactions each."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, users + 1):
        genre = user % 2
        length = int(rng.integers(15, 26))
        items = (rng.permutation(20)[:length] + 1 + 20 * genre) if length <= 20 else \
            np.concatenate([rng.permutation(20) + 1 + 20 * genre, rng.permutation(20)[:length - 20] + 21 - 20 * genre])
        rows += [(user, int(i), 4, 100 + t) for t, i in enumerate(items)]
    return load_dataset(write_ratings(tmp_path / "data", rows, movies=NUM_ITEMS))


def tiny_features(tmp_path: Path, visual_dim: int = 16, text_dim: int = 8, missing_visual=(3, 7)) -> Path:
    """Unit feature rows with a genre direction; some posters missing (zero rows, mask 0)."""
    generator = torch.Generator().manual_seed(0)
    folder = tmp_path / "features"
    for name, dim, missing in (("visual", visual_dim, missing_visual), ("text", text_dim, ())):
        features = torch.randn(NUM_ITEMS + 1, dim, generator=generator) * 0.3
        features[1:21, 0] += 1.0
        features[21:, 1] += 1.0
        features = torch.nn.functional.normalize(features, dim=-1)
        mask = torch.ones(NUM_ITEMS + 1, dtype=torch.bool)
        mask[0] = False
        mask[list(missing)] = False
        features[~mask] = 0
        meta = {"encoder": f"synthetic-{name}", "dim": dim, "coverage": int(mask.sum()), "input_hash": "test"}
        save_table(FeatureTable(features, mask, meta), folder / f"{name}_features.pt")
    return folder


def tiny_config(stage: int = 1, **overrides) -> TrainConfig:
    base = dict(num_rounds=2, client_fraction=0.5, batch_size=4, num_negatives=5, sasrec_hidden_dim=16,
                sasrec_num_blocks=1, sasrec_num_heads=2, max_seq_len=8, moe_num_heads=2, memory_top_k=4,
                st_window=5, lt_capacity=6, num_prototypes=2, num_global_prototypes=2, top_users=None, eval_negatives=10)
    if stage == 1:
        base.update(stage=1, trainable_groups=["item_embedding", "backbone"], use_memory=False)
    else:
        base.update(stage=3, trainable_groups=["backbone", "projectors", "experts", "router", "gate"],
                    use_memory=True, gating_init=0.5)
    base.update(overrides)
    return apply_overrides(TrainConfig(), {k: v for k, v in base.items()}, "test")


def stage3_after_stage1(tmp_path: Path, **stage3_keys):
    """One tiny Stage 1 round, then one Stage 3 round with ``stage3_keys``; the Stage 3 run's history
    and the run rebuilt from its directory (``restore``), to check a setting survives the round trip."""
    from feddmmr.engine.assemble import restore
    from feddmmr.runner import run_federated

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1, num_rounds=1), data, tmp_path / "stage1", progress=False)
    history = run_federated(tiny_config(3, num_rounds=1, **stage3_keys), data, tmp_path / "s3", features,
                            tmp_path / "stage1", progress=False)
    return history, restore(tmp_path / "s3", data)
