"""The calibrated new-item channel: items the model was never trained on, scored by their content.

Under the new-item protocol (``cold_item_fraction`` > 0) a new item's ID row is its untrained
initialisation, so a trained model's score for it never reaches a top 10. A real system knows which
catalogue items are newer than its model (``data.cold_items``); the channel scores exactly those by a
content signal put on the scale of the user's own model scores. Two signals (the config key
``new_item_channel``):

* ``content``: the content kNN's (:func:`feddmmr.baselines.content_knn_scorer`), the mean centred
  text + poster cosine of the item to the user's 10 most recent items (computed on the client);
* ``neighbours``: the model's own scores of the item's 10 content-nearest warm items (similarity
  weighted): the user's state and the trained rows, borrowed through content.

Either way

    score(u, new c) = mu_u + sd_u * (slope * (s(u, c) - m_u) / d_u + offset)

``mu_u``, ``sd_u``: mean and standard deviation of the model's scores of user u over a fixed seeded set
of reference warm items; ``m_u``, ``d_u``: the same for the signal. Every other item keeps the model's
score, so without new items (``cold_items`` None) the channel is never built and nothing changes.

``(slope, offset)`` is chosen on validation, never on test targets, with *pseudo-new* items: a seeded
``PSEUDO_NEW_FRACTION`` of the warm items (never a new item) whose model scores are replaced by the
channel's as if they were new. Each grid point is scored over every validation target in full ranking
(in a federation: each client ranks its validation target under every grid point, the server averages
and keeps the best); the best validation full NDCG@10 wins (ties: the smaller offset, then slope).
At test only the real new items go through the channel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .baselines import content_item_vectors, content_knn_scorer
from .data.dataset import SequenceDataset
from .evaluation import SELECT_METRIC, ScoreFn, evaluate
from .features.store import load_features

log = logging.getLogger(__name__)

CHANNELS = ("off", "content", "neighbours")  # the config key ``new_item_channel``: off or the signal
PSEUDO_NEW_FRACTION = 0.1
REFERENCE_ITEMS = 512  # warm items whose scores give each user's mean and spread
NEIGHBOURS = 10  # the "neighbours" signal: content-nearest warm items per item
CHANNEL_SLOPES = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)
CHANNEL_OFFSETS = tuple(float(o) for o in range(-8, 5))
_PSEUDO_SALT, _REFERENCE_SALT = 0x9E11, 0x4EF0


def pseudo_new_items(data: SequenceDataset, seed: int, fraction: float = PSEUDO_NEW_FRACTION) -> np.ndarray:
    """A seeded ``fraction`` of the warm items (sorted): the stand-ins for new items on validation."""
    warm = data.warm_items()
    count = max(1, int(round(fraction * len(warm))))
    return np.sort(np.random.default_rng([seed, _PSEUDO_SALT]).choice(warm, size=count, replace=False))


def reference_items(data: SequenceDataset, seed: int, pseudo: np.ndarray) -> np.ndarray:
    """Up to ``REFERENCE_ITEMS`` seeded warm items, none pseudo-new (sorted): each user's score scale."""
    pool = np.setdiff1d(data.warm_items(), pseudo)
    count = min(REFERENCE_ITEMS, len(pool))
    return np.sort(np.random.default_rng([seed, _REFERENCE_SALT]).choice(pool, size=count, replace=False))


def _moments(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scores.mean(1, keepdim=True), scores.std(1, keepdim=True).clamp_min(1e-12)


def channel_scorer(base: ScoreFn, signal: ScoreFn, channel: torch.Tensor, reference: torch.Tensor,
                   slope: float, offset: float) -> ScoreFn:
    """``base``'s scores, but the items of the bool mask ``channel`` [num_items] scored by the calibrated
    ``signal`` (module docstring). A batch's moments are computed once for all its item blocks."""
    batch: dict = {}

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        scores = base(users, seq, items).double()
        strength = signal(users, seq, items).to(scores.device, torch.float64)
        if batch.get("seq") is not seq:
            if items is None:
                ref_base, ref_signal = scores[:, reference], strength[:, reference]
            else:
                candidates = reference.to(seq.device).expand(len(users), -1)
                ref_base = base(users, seq, candidates).double()
                ref_signal = signal(users, seq, candidates).to(scores.device, torch.float64)
            batch.update(seq=seq, base=_moments(ref_base), signal=_moments(ref_signal))
        (mean, spread), (signal_mean, signal_spread) = batch["base"], batch["signal"]
        new = mean + spread * (slope * (strength - signal_mean) / signal_spread + offset)
        mask = channel.to(scores.device)
        mask = mask.expand(len(users), -1) if items is None else mask[items]
        return torch.where(mask, new, scores)

    return score


def memoized_full(score_fn: ScoreFn) -> ScoreFn:
    """``score_fn`` whose full-catalogue scores (``items`` None) are kept per batch of users: the
    calibration grid scores the same validation batches many times. One split per memo (the key is
    the users alone)."""
    cache: dict[bytes, torch.Tensor] = {}

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        if items is not None:
            return score_fn(users, seq, items)
        key = np.ascontiguousarray(users).tobytes()
        if key not in cache:
            cache[key] = score_fn(users, seq, None)
        return cache[key]

    return score


def without_items(score_fn: ScoreFn, hidden: torch.Tensor) -> ScoreFn:
    """``score_fn`` with the items of the bool mask ``hidden`` [num_items] scored -inf (never ranked ahead
    of a target): the calibration's validation world is the catalogue before the new items came, its
    pseudo-new items standing in for them."""

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        scores = score_fn(users, seq, items).double()
        mask = hidden.to(scores.device)
        mask = mask.expand(len(users), -1) if items is None else mask[items]
        return scores.masked_fill(mask, float("-inf"))

    return score


def item_mask(num_items: int, items: np.ndarray) -> torch.Tensor:
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[torch.from_numpy(np.asarray(items, dtype=np.int64))] = True
    return mask


@dataclass
class NewItemChannel:
    """A calibrated channel: its signal, reference items and chosen ``(slope, offset)``."""

    data: SequenceDataset
    signal: Callable[[ScoreFn], ScoreFn]  # the signal of a model's scorer
    signal_name: str
    reference: np.ndarray
    slope: float
    offset: float
    pseudo_new: np.ndarray
    validation: dict = field(default_factory=dict)  # "slope/offset" -> validation full NDCG@10

    def scorer(self, base: ScoreFn) -> ScoreFn:
        """``base`` with the real new items scored by the channel (a dataset without any: ``base``)."""
        if self.data.cold_items is None or not len(self.data.cold_items):
            return base
        return channel_scorer(base, self.signal(base), item_mask(self.data.num_items, self.data.cold_items),
                              torch.from_numpy(self.reference), self.slope, self.offset)

    def summary(self) -> dict:
        return {"signal": self.signal_name, "slope": self.slope, "offset": self.offset,
                "pseudo_new_items": int(len(self.pseudo_new)), "reference_items": int(len(self.reference)),
                "validation_full_ndcg10": self.validation}


def calibrate(val_scorer: ScoreFn, signal: Callable[[ScoreFn], ScoreFn], data: SequenceDataset, seed: int,
              pseudo: np.ndarray, *, signal_name: str = "content", max_len: int = 50, batch_size: int = 64, users: np.ndarray | None = None,
              device: torch.device | str = "cpu") -> NewItemChannel:
    """Pick ``(slope, offset)`` on the validation split: full ranking, every validation target, the
    ``pseudo`` (pseudo-new) items through the channel and the real new items not yet in the catalogue.
    Reads no test target."""
    reference = torch.from_numpy(reference_items(data, seed, pseudo))
    channel = item_mask(data.num_items, pseudo)
    model = memoized_full(val_scorer)  # one full pass per validation batch, shared by the grid and the signal
    base = model
    if data.cold_items is not None and len(data.cold_items):
        base = without_items(model, item_mask(data.num_items, data.cold_items))
    strength = memoized_full(signal(model))
    table = {}
    for slope in CHANNEL_SLOPES:
        for offset in CHANNEL_OFFSETS:
            scorer = channel_scorer(base, strength, channel, reference, slope, offset)
            result = evaluate(scorer, data, "val", "full", seed=seed, max_len=max_len, batch_size=batch_size,
                              users=users, device=device)
            table[(slope, offset)] = result[SELECT_METRIC]
    slope, offset = max(table, key=lambda k: (table[k], -k[1], -k[0]))
    log.info("new-item channel: slope %g, offset %g (validation full %s %.4f; %d pseudo-new items)",
             slope, offset, SELECT_METRIC, table[(slope, offset)], len(pseudo))
    return NewItemChannel(data, signal, signal_name, reference.numpy(), slope, offset, pseudo,
                          {f"{s:g}/{o:g}": v for (s, o), v in table.items()})


def neighbour_signal(vectors: torch.Tensor, pool: np.ndarray, k: int = NEIGHBOURS) -> Callable[[ScoreFn], ScoreFn]:
    """A model's scores borrowed through content: item c's signal is the similarity-weighted mean of the
    model's scores of its ``k`` content-nearest items of ``pool`` (warm items with trained rows)."""
    pool_t = torch.from_numpy(np.asarray(pool, dtype=np.int64))
    sims = vectors.float() @ vectors[pool_t].float().T  # [num_items, pool]
    sims[pool_t, torch.arange(len(pool_t))] = float("-inf")  # never its own neighbour
    top, where = sims.topk(k, dim=1)
    neighbours = pool_t[where]  # [num_items, k]
    weights = top.clamp_min(0).double()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))
    weights = weights / weights.sum(1, keepdim=True)

    def signal_for(base: ScoreFn) -> ScoreFn:
        def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
            if items is None:
                full = base(users, seq, None).double()
                return (full[:, neighbours] * weights.to(full.device)).sum(-1)
            near = neighbours.to(items.device)[items]  # [B, N, k]
            scores = base(users, seq, near.reshape(len(users), -1)).double().view(near.shape)
            return (scores * weights.to(scores.device)[items]).sum(-1)

        return score

    return signal_for


SIGNALS = CHANNELS[1:]


def channel_signal(data: SequenceDataset, features_dir: Path, seed: int, signal: str = "content"
                   ) -> tuple[Callable[[ScoreFn], ScoreFn], np.ndarray]:
    """The channel's signal (a function of the model's scorer) read from the item features in
    ``features_dir``, and the pseudo-new items it must not lean on."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown new-item signal {signal!r}; choose one of {SIGNALS}")
    text, visual = load_features(Path(features_dir), data.num_items)
    visual, text = visual.features.float(), text.features.float()
    pseudo = pseudo_new_items(data, seed)
    if signal == "neighbours":
        return neighbour_signal(content_item_vectors(data, visual, text),
                                np.setdiff1d(data.warm_items(), pseudo)), pseudo
    knn = content_knn_scorer(data, visual, text)
    return (lambda base: knn), pseudo


def new_item_channel(scorer_for: Callable[[str], ScoreFn], data: SequenceDataset, features_dir: Path | None,
                     seed: int, signal: str = "content", **kwargs) -> NewItemChannel | None:
    """The calibrated channel of a model (``scorer_for(split)``: its scorer on a split), its signal read
    from the item features in ``features_dir``; None without new items (nothing to score)."""
    if data.cold_items is None or not len(data.cold_items):
        return None
    if features_dir is None:
        raise ValueError("the new-item channel scores new items by their content: pass --features DIR")
    signal_for, pseudo = channel_signal(data, features_dir, seed, signal)
    return calibrate(scorer_for("val"), signal_for, data, seed, pseudo, signal_name=signal, **kwargs)
