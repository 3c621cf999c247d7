"""Per-user chronological sequences, the top-N subset, the item index and the leave-one-out split.

Sequences are stored flat (``items`` plus ``offsets``) so every split and batch is a
vectorised slice, never a Python loop over users.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .parsing import DataError, Interactions, TableColumns
from .readers import REMAPPED, read_interactions

log = logging.getLogger(__name__)

MIN_INTERACTIONS = 3  # train >= 1, validation, test
SPLITS = ("val", "test")


@dataclass
class SequenceDataset:
    """Users' chronological item sequences, items indexed 1..num_items-1 (0 = padding)."""

    items: np.ndarray  # int64, all users' sequences concatenated
    offsets: np.ndarray  # int64 [num_users + 1]
    user_ids: np.ndarray  # raw user id per row
    num_items: int
    layout: str
    source: str
    item_raw_ids: np.ndarray | None = None  # index -> raw id for remapped (custom) datasets
    titles: dict = field(default_factory=dict)  # item index -> title
    dropped_users: int = 0
    item_texts: dict = field(default_factory=dict)  # item index -> text, from the dataset's item file
    item_file: str | None = None  # that item file (None: none, or ML-1M whose texts come from movies.dat)
    cold_items: np.ndarray | None = None  # new items (``with_cold_items``): removed from every history, test targets only
    catalogue: np.ndarray | None = None  # the candidate universe when it is not ``unique(items)`` (new items)

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def held_users(self) -> np.ndarray:
        """The users whose sequences are here: all of them (a node's partition holds only its own)."""
        return np.arange(self.num_users)

    def cache_key(self) -> str:
        """What caches of per-user arrays (sampled candidates) are keyed by: the data, and whose rows they hold."""
        return self.fingerprint()

    def occurring_items(self) -> np.ndarray:
        """Item indices that occur in at least one sequence (the candidate universe).

        With new items (:meth:`with_cold_items`) the universe stays the catalogue before they were
        removed: a new item is a candidate even where it is nobody's test target."""
        return self.catalogue if self.catalogue is not None else np.unique(self.items)

    def warm_items(self) -> np.ndarray:
        """The items training may see (as inputs, targets, negatives or memory): all but the new ones."""
        items = self.occurring_items()
        return items if self.cold_items is None else items[~np.isin(items, self.cold_items)]

    def with_cold_items(self, fraction: float, seed: int = 0) -> "SequenceDataset":
        """The new-item (cold-start) protocol: a seeded ``fraction`` of the occurring items becomes *new*.

        A new item is removed from every user's history (so from training windows, memory, prototypes,
        the validation split and every input sequence) but stays a candidate, and a user whose last
        interaction (the test target) is a new item keeps it as the test target: validation targets
        and every input are warm, test targets are warm or new. ``fraction`` 0 returns ``self``.
        """
        if fraction <= 0:
            return self
        occurring = self.occurring_items()
        count = int(round(fraction * len(occurring)))
        cold = np.sort(np.random.default_rng(seed).choice(occurring, size=count, replace=False)).astype(np.int64)
        if self.cold_items is not None:
            if np.array_equal(cold, self.cold_items):
                return self
            raise ValueError("the dataset already has another set of new items")
        keep = ~np.isin(self.items, cold)
        keep[self.offsets[1:] - 1] = True  # the test target may be new
        lengths = np.add.reduceat(keep.astype(np.int64), self.offsets[:-1]) if len(self.items) else self.lengths
        short = np.flatnonzero(lengths < MIN_INTERACTIONS)
        if len(short):
            raise DataError(self.source, f"user {self.user_ids[short[0]]} has {lengths[short[0]]} interaction(s) "
                                         f"left once the new items (cold_item_fraction={fraction}) are removed; "
                                         f"at least {MIN_INTERACTIONS} are needed")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return dataclasses.replace(self, items=self.items[keep], offsets=offsets, cold_items=cold,
                                   catalogue=occurring)

    def is_cold(self, items: np.ndarray) -> np.ndarray:
        """Bool per item: is it a new item (always False without the new-item protocol)."""
        items = np.asarray(items)
        return np.zeros(items.shape, dtype=bool) if self.cold_items is None else np.isin(items, self.cold_items)

    def fingerprint(self) -> str:
        """Content hash: caches keyed by it are invalid as soon as the data changes."""
        digest = hashlib.sha256()
        for array in (self.items, self.offsets):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        digest.update(str(self.num_items).encode())
        if self.cold_items is not None:  # new items: the candidate universe is not the sequences' items
            digest.update(b"cold")
            digest.update(np.ascontiguousarray(self.cold_items, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ leave-one-out split
    def split_bounds(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, end, target) per user: the input is ``items[start:end]``, the target follows it.

        ``train`` has no single target (every position predicts the next); its end excludes
        the validation and test items and its target array is the validation item.
        """
        start, stop = self.offsets[:-1], self.offsets[1:]
        if split == "train":
            return start, stop - 2, self.items[stop - 2]
        if split == "val":
            return start, stop - 2, self.items[stop - 2]
        if split == "test":
            return start, stop - 1, self.items[stop - 1]
        raise ValueError(f"unknown split {split!r}; choose 'train', 'val' or 'test'")

    def padded_inputs(self, split: str, users: np.ndarray | None = None, max_len: int = 50) -> np.ndarray:
        """The last ``max_len`` input items per user, left-padded with 0: ``[U, max_len]``."""
        start, end, _ = self.split_bounds(split)
        if users is not None:
            start, end = start[users], end[users]
        return last_n_padded(self.items, start, end, max_len)

    def history_mask_rows(self, users: np.ndarray, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) pairs of ``users``' interactions (row = position in ``users``).

        With ``split`` only the split's input history; without, every interaction.
        """
        if split is None:
            start, stop = self.offsets[:-1][users], self.offsets[1:][users]
        else:
            start, stop, _ = self.split_bounds(split)
            start, stop = start[users], stop[users]
        rows, idx = ranges(start, stop)
        return rows, self.items[idx]

    def train_counts(self) -> np.ndarray:
        """How often each item occurs in the training parts (popularity)."""
        start, end, _ = self.split_bounds("train")
        _, idx = ranges(start, end)
        return np.bincount(self.items[idx], minlength=self.num_items)

    def stats(self) -> dict:
        lengths = self.lengths
        return {
            "layout": self.layout,
            "source": self.source,
            "users": int(self.num_users),
            "items": int(len(self.occurring_items())),
            "num_items": int(self.num_items),
            "interactions": int(lengths.sum()),
            "min_seq_len": int(lengths.min()),
            "max_seq_len": int(lengths.max()),
            "mean_seq_len": round(float(lengths.mean()), 2),
            "dropped_users": int(self.dropped_users),
            **({"new_items": int(len(self.cold_items)),
                "new_test_targets": int(self.is_cold(self.split_bounds("test")[2]).sum())}
               if self.cold_items is not None else {}),
        }

    def save_item_mapping(self, path: Path) -> None:
        """index<TAB>raw id, for remapped custom datasets (nothing to save for ML-1M)."""
        if self.item_raw_ids is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("index\traw_id\n")
            for index in range(1, self.num_items):
                handle.write(f"{index}\t{self.item_raw_ids[index]}\n")


def ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(start[r], stop[r])`` and the row r of each element, vectorised."""
    lengths = np.maximum(stop - start, 0)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    idx = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(start, lengths)
    return rows, idx.astype(np.int64)


def last_n_padded(items: np.ndarray, start: np.ndarray, end: np.ndarray, n: int) -> np.ndarray:
    """``[U, n]``: items[start:end] per row, keeping the last n, left-padded with 0."""
    idx = end[:, None] - n + np.arange(n)[None, :]
    valid = idx >= start[:, None]
    return np.where(valid, items[np.clip(idx, 0, max(len(items) - 1, 0))], 0).astype(np.int64)


def trim_padding(inputs: np.ndarray) -> int:
    """How many columns of a left-padded ``[..., L]`` batch hold any item (at least 1).

    Padding is masked everywhere and positions are right-aligned, so cutting the all-padding
    left columns changes no output: a batch of short windows costs its real length, not L."""
    filled = np.flatnonzero(inputs.reshape(-1, inputs.shape[-1]).any(axis=0))
    return int(inputs.shape[-1] - filled[0]) if len(filled) else 1


def top_users(counts: np.ndarray, raw_ids: np.ndarray, n: int) -> np.ndarray:
    """Rows of the n most active users; ties go to the smaller raw user id (deterministic)."""
    order = np.lexsort((raw_ids, -counts))
    return np.sort(order[:n])


def unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)``, the same arrays, without sorting every value.

    Raw ids read from tables are strings (object arrays): sorting millions of them compares Python
    objects one pair at a time, about a minute at 10^7 interactions, in one call that holds the
    GIL (a Flower ClientApp's heartbeat thread then cannot run, and the SuperNode declares the app
    dead). The distinct values are found by hashing instead and only they are sorted."""
    if values.dtype != object:
        return np.unique(values, return_inverse=True)
    import pandas as pd

    codes, distinct = pd.factorize(values, use_na_sentinel=False)  # in order of first appearance
    distinct = np.asarray(distinct, dtype=object)
    order = np.argsort(distinct, kind="stable")
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    return distinct[order], rank[codes]


def build_sequences(table: Interactions, top_n: int | None = None,
                    min_interactions: int = MIN_INTERACTIONS) -> SequenceDataset:
    users, items, order = table.users, table.items, table.order
    remap = table.layout in REMAPPED
    item_texts: dict = {}
    if remap:
        raw_items, item_index = unique_inverse(items)
        item_index = item_index.astype(np.int64) + 1
        item_raw_ids = np.concatenate([np.array([""], dtype=object), raw_items.astype(object)])
        num_items = len(raw_items) + 1
        metadata = table.metadata
        titles = {}
        if metadata is not None:
            for index in range(1, num_items):
                raw = item_raw_ids[index]
                if raw in metadata.titles:
                    titles[index] = metadata.titles[raw]
                if raw in metadata.texts:
                    item_texts[index] = metadata.texts[raw]
    else:
        if items.min() < 1 or users.min() < 1:
            bad = int(np.flatnonzero((items < 1) | (users < 1))[0])
            raise DataError(table.source, f"ids must be positive integers (row {bad + 1} has user "
                                          f"{users[bad]}, item {items[bad]})")
        item_index = items.astype(np.int64)
        item_raw_ids = None
        catalogue_max = int(table.known_items.max()) if table.known_items is not None and len(table.known_items) else 0
        num_items = max(int(items.max()), catalogue_max) + 1
        titles = dict(table.titles)

    raw_users, user_row = unique_inverse(users)
    # per user, time order; ties keep file order (lexsort is stable on the last key)
    rows = np.lexsort((np.arange(len(users)), order, user_row))
    user_row, item_index = user_row[rows], item_index[rows]
    counts = np.bincount(user_row, minlength=len(raw_users))

    keep = counts >= min_interactions
    dropped = int((~keep).sum())
    if dropped:
        log.warning("%s: dropped %d user(s) with fewer than %d interactions", table.source, dropped,
                    min_interactions)
    kept_rows = np.flatnonzero(keep)
    if top_n is not None:
        if top_n < 1:
            raise ValueError(f"--top-users must be positive, got {top_n}")
        kept_rows = kept_rows[top_users(counts[kept_rows], raw_users[kept_rows], top_n)]
    if len(kept_rows) == 0:
        raise DataError(table.source, f"no user has at least {min_interactions} interactions")
    selected = np.isin(user_row, kept_rows)
    seq_items = item_index[selected]
    lengths = counts[kept_rows]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    assert len(seq_items) == offsets[-1]
    item_file = getattr(table.metadata, "source", None)
    return SequenceDataset(seq_items, offsets, raw_users[kept_rows], num_items, table.layout,
                           str(table.source), item_raw_ids, titles, dropped, item_texts,
                           str(item_file) if item_file else None)


def why_absent(table: Interactions, user: str, top_n: int | None,
                min_interactions: int = MIN_INTERACTIONS) -> str:
    """Why raw user id ``user`` is not among a dataset's users, and what to pass instead (one line)."""
    raw_users, user_row = unique_inverse(table.users)
    counts = np.bincount(user_row, minlength=len(raw_users))
    match = np.flatnonzero(raw_users.astype(str) == user)
    if match.size == 0:
        examples = ", ".join(repr(str(u)) for u in raw_users[:3])
        return (f"user {user!r} is not in {table.source}: no interaction has that user id "
                f"(ids there look like {examples}, ...)")
    count = int(counts[match[0]])
    if count < min_interactions:
        return (f"user {user!r} has {count} interaction(s) in {table.source}; at least {min_interactions} are needed "
                "(training, validation, test), so they are not among the dataset's users")
    eligible = np.flatnonzero(counts >= min_interactions)
    order = eligible[np.lexsort((raw_users[eligible], -counts[eligible]))]
    rank = int(np.flatnonzero(order == match[0])[0]) + 1
    last = int(counts[order[top_n - 1]]) if top_n and top_n <= len(order) else 0
    return (f"user {user!r} has {count} interactions but is not among the {top_n:,} most active users kept by "
            f"--top-users {top_n} (the least active kept user has {last}, this one ranks "
            f"{rank:,} of {len(order):,}); pass --top-users all (or --top-users {rank}) to recommend for them")


def load_dataset(path: Path | str, layout: str | None = None, top_users: int | None = None,
                 columns: TableColumns = TableColumns(),
                 min_interactions: int = MIN_INTERACTIONS) -> SequenceDataset:
    """Read any accepted layout and return the (optionally top-N) sequence dataset."""
    return build_sequences(read_interactions(path, layout, columns), top_users, min_interactions)
