"""Non-learned reference scorers."""

from __future__ import annotations

import numpy as np
import torch

from .data.dataset import SequenceDataset
from .evaluation import ScoreFn


def popularity_scorer(data: SequenceDataset) -> ScoreFn:
    """Rank items by how often they occur in the training parts of all sequences."""
    counts = torch.from_numpy(data.train_counts()).double()

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        if items is None:
            return counts.expand(len(users), -1)
        return counts[items]

    return score


CONTENT_MODALITIES = ("both", "text", "visual")


def content_item_vectors(data: SequenceDataset, visual: torch.Tensor | None, text: torch.Tensor | None,
                         modality: str = "both", center: bool = True) -> torch.Tensor:
    """``[num_items, D]`` unit item vectors from their content features (zero row: no features).

    Each modality is L2-normalised; with ``center`` the mean over the warm items that have the
    modality is subtracted first (raw features share a large common direction, so uncentred cosines
    mostly measure how typical an item is); the modalities present are concatenated and normalised.
    """
    if modality not in CONTENT_MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {CONTENT_MODALITIES}")
    tables = {"visual": visual, "text": text}
    chosen = [tables[m] for m in (("visual", "text") if modality == "both" else (modality,)) if tables[m] is not None]
    if not chosen:
        raise ValueError(f"content kNN ({modality}) needs item features; none were given")
    warm = torch.from_numpy(data.warm_items())
    parts = []
    for table in chosen:
        table = torch.nn.functional.normalize(table.double(), dim=-1)
        present = table.norm(dim=-1) > 0
        if center:
            rows = warm[present[warm]]
            table = torch.where(present[:, None], table - table[rows].mean(0), torch.zeros_like(table))
            table = torch.nn.functional.normalize(table, dim=-1)
        parts.append(table)
    return torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)


def content_knn_scorer(data: SequenceDataset, visual: torch.Tensor | None, text: torch.Tensor | None,
                       last: int = 10, modality: str = "both", center: bool = True) -> ScoreFn:
    """Content-only item kNN: a candidate's score is its mean cosine similarity (content features,
    :func:`content_item_vectors`) to the user's ``last`` most recent input items. Needs no training,
    so it scores new items exactly as warm ones."""
    vectors = content_item_vectors(data, visual, text, modality, center)

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        recent = seq[:, -last:]
        weight = (recent != 0).double()
        profile = (vectors[recent] * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp_min(1.0)
        if items is None:
            return profile @ vectors.T
        return (vectors[items] * profile[:, None, :]).sum(-1)

    return score


FUSION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # the grid a late fusion's weight is chosen from


def late_fusion_scorer(model: ScoreFn, content: ScoreFn, weight: float) -> ScoreFn:
    """A trained model's scores plus ``weight`` x a content scorer's (late fusion: the simplest way
    to add content to a recommender, the reference the experts must beat). Raw scores, not
    standardised per row: a catalogue scored block by block must give an item the same score in
    any block."""

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        base = model(users, seq, items).double()
        if weight == 0:
            return base
        return base + weight * content(users, seq, items).to(base.device, torch.float64)

    return score
