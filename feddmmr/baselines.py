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
