"""Shared fixtures: tiny synthetic datasets written in every accepted layout, and the ML-1M path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ML1M = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-1m"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (10x slower on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ml1m() -> Path:
    if not (ML1M / "interactions_all_users_ordered.tsv.gz").exists():
        pytest.skip(f"MovieLens-1M not found at {ML1M}")
    return ML1M


def write_ratings(folder: Path, rows: list[tuple[int, int, int, int]], movies: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    (folder / "movies.dat").write_bytes("".join(
        f"{m}::Movie {m} (199{m % 10})::Drama|Comedy\n" for m in range(1, movies + 1)).encode("iso-8859-1"))
    (folder / "users.dat").write_text("".join(
        f"{u}::F::1::10::48067\n" for u in sorted({r[0] for r in rows})))
    return folder


def synthetic_rows(num_users: int = 30, num_items: int = 20, min_len: int = 5, max_len: int = 15,
                   seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Each user a random walk over items with increasing timestamps (no repeats)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        length = int(rng.integers(min_len, max_len + 1))
        items = rng.permutation(np.arange(1, num_items + 1))[:length]
        for step, item in enumerate(items):
            rows.append((user, int(item), int(rng.integers(1, 6)), 1000 + 10 * step))
    return rows


@pytest.fixture
def tiny_ml1m(tmp_path: Path) -> Path:
    return write_ratings(tmp_path / "ml", synthetic_rows())
