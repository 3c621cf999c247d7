"""Does a modality carry signal? Consecutive items in users' training sequences should be more
alike (mean cosine) than random item pairs; if not, the expert reading that modality can only add
noise. Fully vectorised: pairs are index arrays and cosines are chunked row-wise dot products.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.dataset import SequenceDataset, ranges
from .store import FeatureTable, load_features

CHUNK = 1 << 14  # pairs per dot-product chunk: bounds memory at CHUNK * dim floats
GRAM_MAX_ITEMS = 10_000  # up to here the [N, N] cosine matrix (<= 400 MB) is cheaper than gathers


def consecutive_pairs(data: SequenceDataset) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with b right after a inside a user's training part (validation/test items excluded)."""
    start, end, _ = data.split_bounds("train")
    _, idx = ranges(start, np.maximum(end - 1, start))
    return data.items[idx], data.items[idx + 1]


def mean_cosine(features: torch.Tensor, a: np.ndarray, b: np.ndarray, gram: torch.Tensor | None = None) -> float | None:
    """Mean of <f[a], f[b]> over the pairs (rows are unit vectors, so this is the cosine).

    With ``gram`` (all item-item cosines) each pair is a lookup; otherwise row-wise dot products
    in chunks, which bounds memory at ``CHUNK * dim`` floats for large catalogues.
    """
    if len(a) == 0:
        return None
    if gram is not None:
        return float(gram[torch.from_numpy(a), torch.from_numpy(b)].double().mean())
    total = 0.0
    for lo in range(0, len(a), CHUNK):
        ia = torch.from_numpy(a[lo:lo + CHUNK])
        ib = torch.from_numpy(b[lo:lo + CHUNK])
        total += float((features[ia] * features[ib]).sum(dim=1).double().sum())
    return total / len(a)


def random_pairs(universe: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n pairs of distinct items drawn uniformly from ``universe``."""
    if len(universe) < 2 or n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    a = rng.integers(0, len(universe), n)
    b = (a + rng.integers(1, len(universe), n)) % len(universe)  # never equal to a
    return universe[a], universe[b]


def modality_check(table: FeatureTable, data: SequenceDataset, seed: int = 0) -> dict:
    """coverage, mean cosine of consecutive training pairs, and of as many random pairs (seeded).

    Only pairs whose two items both have a feature count; random pairs are drawn among the items
    with a feature that occur in the training sequences.
    """
    if table.num_items != data.num_items:
        raise ValueError(f"feature table has {table.num_items} rows but the dataset has {data.num_items} "
                         "item indices; extract the features for this dataset")
    mask = table.mask.numpy()
    a, b = consecutive_pairs(data)
    both = mask[a] & mask[b]
    a, b = a[both], b[both]
    start, end, _ = data.split_bounds("train")
    _, idx = ranges(start, end)
    universe = np.unique(data.items[idx])
    universe = universe[mask[universe]]
    ra, rb = random_pairs(universe, len(a), np.random.default_rng(seed))
    features = table.features.float()
    gram = features @ features.T if table.num_items <= GRAM_MAX_ITEMS else None
    return {"coverage": table.coverage,
            "consecutive": _round(mean_cosine(features, a, b, gram)),
            "random": _round(mean_cosine(features, ra, rb, gram))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def feature_check(directory, data: SequenceDataset, seed: int = 0) -> dict:
    """``{"text": {...}, "visual": {...}}`` for a feature folder and a dataset."""
    text, visual = load_features(directory, data.num_items)
    return {"text": modality_check(text, data, seed), "visual": modality_check(visual, data, seed)}
