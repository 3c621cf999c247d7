"""The one evaluation protocol: metrics, candidates and the batched evaluation loop.

Protocols:
  * ``full``: the target is ranked among every item that occurs in the dataset; the user's
    other history items (its input sequence) are excluded unless ``exclude_history=False``.
  * ``sampled``: the target against 100 negatives drawn uniformly, without replacement, from the
    items that occur in the dataset and that the user never interacted with; drawn once per
    (dataset, split, seed) and cached so every model faces the same candidates.

Ties are ranked pessimistically (an item scoring the same as the target counts as ahead of
it), so a constant scorer cannot look good.

Under the new-item protocol (``SequenceDataset.with_cold_items``) every result also holds the
metrics of the users whose target is a warm item (``"warm"``) and of those whose target is a new
item (``"new"``); the two groups partition the users scored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data.dataset import SequenceDataset, trim_padding
from .safeio import ArrayFileError, load_npy

log = logging.getLogger(__name__)

KS = (5, 10, 20)
PROTOCOLS = ("full", "sampled")
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("HR", "NDCG") for k in KS) + ("MRR",)
SELECT_METRIC = "NDCG@10"  # the validation metric that picks a run's best round
VALIDATION_BATCH = 512  # users per scoring batch while validating each round
FINAL_REQUESTS = tuple((split, protocol, 256 if protocol == "sampled" else 64)
                       for split in ("val", "test") for protocol in PROTOCOLS)  # (split, protocol, batch) at the end
NUM_SAMPLED_NEGATIVES = 100
ITEM_BLOCK = 8192  # full ranking over a larger catalogue streams it in blocks of this many items
SCORED_PAIRS = 8 * 4096  # (user, candidate) pairs the memory's scorer puts through the experts at once: a
# full-ranking batch is scored a few users at a time (bit-identical scores; bounds their [users, items, D] activations)

# score_fn(user_rows [B], input_seq [B, L], items [B, N] or None) -> scores [B, N] or [B, num_items]
ScoreFn = Callable[[np.ndarray, torch.Tensor, torch.Tensor | None], torch.Tensor]


def ranks_from_scores(scores: torch.Tensor, target_col: torch.Tensor) -> torch.Tensor:
    """0-based pessimistic rank of ``scores[b, target_col[b]]`` within row b (-inf = excluded)."""
    target = scores.gather(1, target_col.view(-1, 1))
    ahead = (scores > target).sum(1) + (scores == target).sum(1) - 1
    return ahead


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item) and MRR from 0-based ranks, averaged over users."""
    ranks = torch.as_tensor(ranks, dtype=torch.float64, device="cpu")
    out: dict[str, float] = {}
    for k in KS:
        hit = ranks < k
        out[f"HR@{k}"] = hit.double().mean().item()
    for k in KS:
        hit = ranks < k
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks)).mean().item()
    out["MRR"] = (1.0 / (ranks + 1.0)).mean().item()
    return out


# --------------------------------------------------------------------------- sampled candidates

def sample_candidates(data: SequenceDataset, split: str, seed: int = 0,
                      num_negatives: int = NUM_SAMPLED_NEGATIVES, chunk: int = 1024) -> np.ndarray:
    """``[U, 1 + num_negatives]``: column 0 is the held-out item, then uniform negatives.

    Uniform without replacement over allowed items = the top-k of i.i.d. uniform keys over
    the allowed items; vectorised per chunk of users. The keys are one stream over every user in
    user order, so a user's keys do not depend on anyone's history: data holding only some users
    (a node's partition, :meth:`SequenceDataset.held_users`) draws the whole stream and gives its
    users the rows the whole data gives them (the other rows stay 0).
    """
    _, _, targets = data.split_bounds(split)
    allowed = np.zeros(data.num_items, dtype=bool)
    allowed[data.occurring_items()] = True
    allowed[0] = False
    generator = torch.Generator().manual_seed(_split_seed(seed, split))
    held = np.zeros(data.num_users, dtype=bool)
    held[data.held_users()] = True
    out = np.zeros((data.num_users, 1 + num_negatives), dtype=np.int64)
    out[held, 0] = targets[held]
    allowed_t = torch.from_numpy(allowed)
    last = int(np.flatnonzero(held)[-1]) + 1 if held.any() else 0
    for lo in range(0, last, chunk):
        keys = torch.rand((min(chunk, data.num_users - lo), data.num_items), generator=generator,
                          device=generator.device)
        kept = np.flatnonzero(held[lo:lo + len(keys)])
        if len(kept) < len(keys):
            keys = keys[torch.from_numpy(kept)]
        users = lo + kept
        mask = ~allowed_t.expand(len(users), -1).clone()
        rows, items = data.history_mask_rows(users)
        mask[torch.from_numpy(rows), torch.from_numpy(items)] = True
        too_few = (~mask).sum(1) < num_negatives
        if bool(too_few.any()):
            user = int(users[int(too_few.nonzero()[0, 0])])
            raise ValueError(f"user {data.user_ids[user]} has fewer than {num_negatives} items left to sample "
                             "negatives from; use the full protocol for this dataset")
        keys[mask] = -1.0
        out[users, 1:] = keys.topk(num_negatives, dim=1).indices.numpy()
    return out


def _split_seed(seed: int, split: str) -> int:
    return int(seed) * 1000 + {"val": 1, "test": 2}[split]


_CANDIDATE_CACHE: dict[tuple, np.ndarray] = {}


def candidates(data: SequenceDataset, split: str, seed: int = 0, cache_dir: Path | None = None,
               num_negatives: int = NUM_SAMPLED_NEGATIVES) -> np.ndarray:
    """Cached :func:`sample_candidates` (in memory, and on disk when ``cache_dir`` is given)."""
    key = (data.cache_key(), split, seed, num_negatives)
    if key in _CANDIDATE_CACHE:
        return _CANDIDATE_CACHE[key]
    path = Path(cache_dir) / f"candidates_{key[0]}_{split}_s{seed}_n{num_negatives}.npy" if cache_dir else None
    cached = None
    if path is not None and path.exists():
        try:
            cached = load_npy(path, kind="iu", ndim=2)
            if cached.shape != (data.num_users, 1 + num_negatives):
                raise ArrayFileError(f"{path}: shape {cached.shape}, expected {(data.num_users, 1 + num_negatives)}")
        except ArrayFileError as exc:  # a cache is never trusted: refuse it, then recompute
            log.warning("ignoring candidate cache: %s", exc)
            cached = None
    if cached is None:
        cached = sample_candidates(data, split, seed, num_negatives)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, cached, allow_pickle=False)
    _CANDIDATE_CACHE[key] = cached
    return cached


# --------------------------------------------------------------------------- the evaluation loop

def evaluate(score_fn: ScoreFn, data: SequenceDataset, split: str = "val", protocol: str = "sampled", *,
             seed: int = 0, max_len: int = 50, batch_size: int = 512, exclude_history: bool = True,
             cache_dir: Path | None = None, users: np.ndarray | None = None,
             num_negatives: int = NUM_SAMPLED_NEGATIVES, item_block: int = ITEM_BLOCK,
             device: torch.device | str = "cpu") -> dict:
    """Score every user (or ``users``) under one protocol; returns metrics named with their protocol.

    Full ranking over a catalogue larger than ``item_block`` streams it in item blocks, so a batch
    never holds ``[users, catalogue]`` scores (or the experts' per-candidate activations).
    ``device`` is the scorer's (its model's): every batch is made there and scored and ranked there;
    only the ranks come back to the CPU. The sampled candidates are drawn on the CPU (cached)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    users = data.held_users() if users is None else np.asarray(users)
    _, _, targets = data.split_bounds(split)
    inputs = data.padded_inputs(split, users, max_len)
    cands = candidates(data, split, seed, cache_dir, num_negatives)[users] if protocol == "sampled" else None
    device = torch.device(device)

    def on(array: np.ndarray) -> torch.Tensor:
        """A numpy batch on the scorer's device."""
        return torch.from_numpy(array).to(device)

    not_candidate = None
    if protocol == "full":
        not_candidate = torch.ones(data.num_items, dtype=torch.bool, device=device)
        not_candidate[on(data.occurring_items())] = False
        not_candidate[0] = True
    all_ranks = []
    for lo in range(0, len(users), batch_size):
        rows = users[lo:lo + batch_size]
        batch = inputs[lo:lo + batch_size]
        seq = on(batch[:, -trim_padding(batch):])
        if protocol == "sampled":
            with torch.no_grad():
                scores = score_fn(rows, seq, on(cands[lo:lo + batch_size])).float()
            target_col = torch.zeros(len(rows), dtype=torch.long, device=device)
        else:
            target = on(targets[rows])
            excluded = not_candidate.expand(len(rows), -1).clone()
            if exclude_history:
                hist_rows, hist_items = data.history_mask_rows(rows, split)
                excluded[on(hist_rows), on(hist_items)] = True
            excluded[torch.arange(len(rows), device=device), target] = False
            if data.num_items > item_block:
                all_ranks.append(blocked_ranks(score_fn, rows, seq, target, excluded, item_block).cpu())
                continue
            with torch.no_grad():
                scores = score_fn(rows, seq, None).float().clone()
            scores[excluded] = float("-inf")
            target_col = target
        all_ranks.append(ranks_from_scores(scores, target_col).cpu())
    result = {"protocol": protocol, "split": split, "users": int(len(users))}
    if protocol == "sampled":
        result.update(seed=int(seed), negatives=int(num_negatives))
    else:
        result.update(exclude_history=bool(exclude_history))
    ranks = torch.cat(all_ranks)
    result.update(metrics_from_ranks(ranks))
    if data.cold_items is not None:
        result.update(by_target_type(ranks, data.is_cold(targets[users])))
    return result


TARGET_TYPES = ("warm", "new")


def by_target_type(ranks: torch.Tensor, new: np.ndarray) -> dict[str, dict]:
    """``{"warm": {"users": n, metrics...}, "new": {...}}``: the metrics of each group of users by target
    type (a group without users has only ``"users": 0``)."""
    new = torch.from_numpy(np.asarray(new, dtype=bool))
    out = {}
    for name, members in zip(TARGET_TYPES, (~new, new)):
        count = int(members.sum())
        out[name] = {"users": count, **(metrics_from_ranks(ranks[members]) if count else {})}
    return out


def blocked_ranks(score_fn: ScoreFn, rows: np.ndarray, seq: torch.Tensor, target: torch.Tensor,
                  excluded: torch.Tensor, item_block: int) -> torch.Tensor:
    """The pessimistic ranks of ``ranks_from_scores`` (items scoring at least the target's score, the
    target not counted), counted block by block; the target's own score comes from a one-column call.
    Made on ``excluded``'s device (the scorer's)."""
    device = excluded.device
    with torch.no_grad():
        own = score_fn(rows, seq, target.view(-1, 1)).float()
        ahead = torch.zeros(len(rows), dtype=torch.long, device=device)
        num_items = excluded.shape[1]
        for lo in range(0, num_items, item_block):
            items = torch.arange(lo, min(lo + item_block, num_items), device=device)
            scores = score_fn(rows, seq, items.expand(len(rows), -1)).float()
            counted = (scores >= own) & ~excluded[:, lo:lo + item_block] & (items[None, :] != target[:, None])
            ahead += counted.sum(1)
    return ahead


def format_metrics(result: dict) -> str:
    """One line: protocol, split and the headline metrics."""
    head = f"[{result['protocol']}/{result['split']}]"
    line = head + " " + " ".join(f"{name}={result[name]:.4f}" for name in METRIC_NAMES if name in result)
    for kind in TARGET_TYPES:
        if kind in result and result[kind]["users"]:
            group = result[kind]
            line += f" | {kind} ({group['users']} users) HR@10={group['HR@10']:.4f} NDCG@10={group['NDCG@10']:.4f}"
    return line
