"""A dataset split once into one file per node, so a node reads and holds only its own users.

A Flower node serves the users ``u % num_partitions == partition``. Reading the whole interaction
table in every node (and in every ClientApp process of a deployment) costs the whole table's
memory and load time per node; the user indices, the fingerprint and the statistics are the
whole dataset's, so they are computed once, by whoever splits the data (:func:`write_partitions`),
and kept in a small side table. A partition folder holds:

* ``partitions.json``: the whole dataset's sizes, fingerprint and statistics, how it was read
  (``top_users``), the number of partitions and each partition file's digest;
* ``catalogue.npy``: the items that occur in the dataset (the candidate universe, O(items));
* ``partition-<p>.npz``: that partition's users (global indices), their sequence lengths, their
  items (concatenated) and their raw ids.

:func:`load_partition` gives a :class:`PartitionData`: a :class:`SequenceDataset` whose offsets span
every user (O(users)) with empty sequences for the other partitions' users, so every per-user
index is the whole dataset's, while its items are the partition's interactions only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..safeio import load_npy, load_npz
from .dataset import MIN_INTERACTIONS, SequenceDataset, ranges
from .parsing import DataError

INDEX_FILE = "partitions.json"
CATALOGUE_FILE = "catalogue.npy"
FORMAT = 1


def partition_users(num_users: int, partition: int, num_partitions: int) -> np.ndarray:
    """The users a node serves: ``u % num_partitions == partition``, ascending."""
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition-id {partition} is outside 0..{num_partitions - 1}")
    return np.arange(partition, num_users, num_partitions, dtype=np.int64)


def partition_file(partition: int) -> str:
    return f"partition-{partition}.npz"


@dataclass
class PartitionData(SequenceDataset):
    """One partition's sequences with the whole dataset's indices, fingerprint and statistics."""

    digest: str = ""  # the whole dataset's fingerprint
    summary: dict = field(default_factory=dict)  # the whole dataset's statistics
    partition: int = 0
    num_partitions: int = 1

    def fingerprint(self) -> str:
        return self.digest

    def stats(self) -> dict:
        return dict(self.summary)

    def held_users(self) -> np.ndarray:
        return partition_users(self.num_users, self.partition, self.num_partitions)

    def cache_key(self) -> str:
        return f"{self.digest}-p{self.partition}of{self.num_partitions}"

    def with_cold_items(self, fraction: float, seed: int = 0) -> "PartitionData":
        if fraction > 0:  # (the Flower app refuses the new-item protocol before data is read)
            raise ValueError("the new-item protocol needs the whole dataset, not one partition of it")
        return self

    def train_counts(self) -> np.ndarray:
        raise ValueError("item popularity is the whole dataset's; a partition holds only its users' interactions")


def is_partitioned(path: Path | str) -> bool:
    """Whether ``path`` is a folder written by :func:`write_partitions`."""
    return (Path(path) / INDEX_FILE).is_file()


def _arrays(data: SequenceDataset, users: np.ndarray) -> dict[str, np.ndarray]:
    """A partition file's arrays: the users, their lengths, their items, their raw ids (as text)."""
    _, idx = ranges(data.offsets[users], data.offsets[users + 1])
    raw = np.asarray(data.user_ids[users])
    return {"users": users, "lengths": data.lengths[users].astype(np.int64), "items": data.items[idx].astype(np.int64),
            "user_ids": raw.astype(str) if raw.dtype == object else raw}


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """A partition file's content hash (checked when a node reads it)."""
    digest = hashlib.sha256()
    for name in ("users", "lengths", "items"):
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def write_partitions(data: SequenceDataset, num_partitions: int, folder: Path | str,
                     top_users: int | None) -> Path:
    """Split ``data`` (read with ``top_users``) into ``num_partitions`` files in ``folder``; returns it."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if data.cold_items is not None:
        raise ValueError("write the partitions from the data as read, before the new-item protocol")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / CATALOGUE_FILE, data.occurring_items().astype(np.int64), allow_pickle=False)
    digests = {}
    for partition in range(num_partitions):
        arrays = _arrays(data, partition_users(data.num_users, partition, num_partitions))
        np.savez(folder / partition_file(partition), **arrays)
        digests[str(partition)] = _digest(arrays)
    index = {"format": FORMAT, "num_partitions": num_partitions, "num_users": int(data.num_users),
             "num_items": int(data.num_items), "fingerprint": data.fingerprint(), "stats": data.stats(),
             "top_users": top_users, "layout": data.layout, "source": data.source, "digests": digests}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return folder


def read_index(folder: Path | str) -> dict:
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(path, f"not a readable partition index ({exc})") from None
    if index.get("format") != FORMAT:
        raise DataError(path, f"partition format {index.get('format')!r}, expected {FORMAT}")
    return index


def load_partition(folder: Path | str, partition: int, num_partitions: int, top_users: int | None) -> PartitionData:
    """Partition ``partition`` of a folder written by :func:`write_partitions`: only its file is read
    (besides the side table). The split must match the node's (``num_partitions``, ``top_users``)."""
    folder = Path(folder)
    index = read_index(folder)
    if int(index["num_partitions"]) != num_partitions:
        raise DataError(folder, f"written for {index['num_partitions']} partitions, the node is one of "
                                f"{num_partitions}; write them again with --nodes {num_partitions}")
    if index["top_users"] != top_users:
        raise DataError(folder, f"written with top_users={index['top_users']}, the run has top_users={top_users}; "
                                "write the partitions with the run's --top-users")
    path = folder / partition_file(partition)
    arrays = load_npz(path, required=("users", "lengths", "items", "user_ids"))
    _check_partition(path, arrays, index, partition, num_partitions)
    return _dataset(arrays, index, np.sort(load_npy(folder / CATALOGUE_FILE, kind="iu", ndim=1)).astype(np.int64),
                    partition, num_partitions)


def _check_partition(path: Path, arrays: dict[str, np.ndarray], index: dict, partition: int,
                     num_partitions: int) -> None:
    """Refuse a partition file that is not this partition's, or not what the index says was written."""
    users, lengths, items = arrays["users"], arrays["lengths"], arrays["items"]
    expected = partition_users(int(index["num_users"]), partition, num_partitions)
    if not np.array_equal(users, expected):
        raise DataError(path, f"does not hold partition {partition}'s users (u % {num_partitions} == {partition})")
    if len(lengths) != len(users) or len(arrays["user_ids"]) != len(users) or int(lengths.sum()) != len(items):
        raise DataError(path, "users, lengths, raw ids and items do not match in size")
    if len(lengths) and int(lengths.min()) < MIN_INTERACTIONS:
        raise DataError(path, f"a user has fewer than {MIN_INTERACTIONS} interactions")
    if len(items) and (int(items.min()) < 1 or int(items.max()) >= int(index["num_items"])):
        raise DataError(path, f"item indices outside 1..{int(index['num_items']) - 1}")
    if _digest(arrays) != index["digests"].get(str(partition)):
        raise DataError(path, "its content is not what partitions.json records; write the partitions again")


def _dataset(arrays: dict[str, np.ndarray], index: dict, catalogue: np.ndarray, partition: int,
             num_partitions: int) -> PartitionData:
    """The partition as a dataset over every user index (the other users' sequences empty)."""
    num_users = int(index["num_users"])
    lengths = np.zeros(num_users, dtype=np.int64)
    lengths[arrays["users"]] = arrays["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    raw = arrays["user_ids"]
    user_ids = np.full(num_users, "", dtype=object) if raw.dtype.kind == "U" else np.zeros(num_users, raw.dtype)
    user_ids[arrays["users"]] = raw.astype(object) if raw.dtype.kind == "U" else raw
    return PartitionData(arrays["items"].astype(np.int64), offsets, user_ids, int(index["num_items"]),
                         str(index["layout"]), str(index["source"]), catalogue=catalogue,
                         digest=str(index["fingerprint"]), summary=dict(index["stats"]), partition=partition,
                         num_partitions=num_partitions)
