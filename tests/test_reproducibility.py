"""Same seed, same numbers: what a run's numbers depend on, and what they must not depend on.

A step that changes a process-wide setting for itself (torch threads, default dtype, grad mode,
the global RNGs) gives it back, so a pipeline that extracts its features in-process trains with
the threads, and to the bytes, of the same pipeline that finds its features cached.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr import global_state
from feddmmr.cli import main
from feddmmr.features.extract import run_extract
from feddmmr.federation.client import LocalTrainer

from .fedtools import tiny_dataset
from .test_features import make_poster, tiny_st  # noqa: F401  (tiny_st: a fixture)

TINY = ["--set", "sasrec_hidden_dim=16", "--set", "sasrec_num_blocks=1", "--set", "sasrec_num_heads=2",
        "--set", "max_seq_len=8", "--set", "moe_num_heads=2", "--set", "memory_top_k=4", "--set", "num_rounds=2",
        "--set", "client_fraction=0.5", "--set", "batch_size=4", "--set", "num_negatives=5",
        "--set", "eval_negatives=10", "--set", "num_global_prototypes=2", "--set", "num_prototypes=2"]


@pytest.fixture
def posters_data(tmp_path, tiny_st, monkeypatch) -> Path:  # noqa: F811
    """The tiny two-genre dataset with posters for a third of its items; the default text encoder
    replaced by a tiny random one (EfficientNet-Lite0, shipped offline, encodes the posters)."""
    from feddmmr.features import text_encoder

    resolve = text_encoder.resolve_text_encoder
    monkeypatch.setattr(text_encoder, "resolve_text_encoder", lambda name: tiny_st if name is None else resolve(name))
    folder = Path(tiny_dataset(tmp_path).source).parent
    (folder / "posters").mkdir()
    for movie in range(1, 41, 3):
        make_poster(folder / "posters" / f"{movie}.jpg", (5 * movie, 100, 200 - 4 * movie))
    return folder


def unusual_threads() -> int:
    """A small thread count extraction never picks by itself (it picks the cores, or the cores minus
    one loader worker)."""
    cores = os.cpu_count() or 1
    return min(n for n in range(2, 6) if n not in (cores, cores - 1))


def test_feature_extraction_gives_back_threads_rngs_and_dtype(posters_data, tmp_path):
    """``run_extract`` sizes torch's threads to its loader workers and loads encoders (which draw
    from the global generator), then restores every process-wide setting it touched."""
    from feddmmr.data.dataset import load_dataset

    data = load_dataset(posters_data)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(unusual_threads())
        torch.manual_seed(3), np.random.seed(3), random.seed(3)
        before = global_state.snapshot()
        summary = run_extract(data, posters_data, tmp_path / "features", workers=1, progress=False)
        after = global_state.snapshot()
    finally:
        torch.set_num_threads(threads)
    assert summary["visual"]["status"] == summary["text"]["status"] == "computed"
    assert after["threads"] == before["threads"] == unusual_threads()
    assert after["dtype"] == before["dtype"] and after["grad"] == before["grad"]
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert all(np.array_equal(a, b) for a, b in zip(after["numpy_rng"], before["numpy_rng"]))
    assert after["python_rng"] == before["python_rng"]


def test_preserved_restores_also_when_the_step_raises():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with pytest.raises(RuntimeError):
        with global_state.preserved():
            torch.set_num_threads(unusual_threads())
            torch.set_default_dtype(torch.float64)
            raise RuntimeError("the step failed")
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype


def test_a_pipeline_trains_the_same_bytes_with_features_extracted_in_process_or_cached(posters_data, tmp_path,
                                                                                        monkeypatch):
    """``feddmmr pipeline`` on a fresh folder (features extracted in the same process) and again with
    ``--features`` pointing at those features: both stages train with the requested thread count and
    write byte-identical ``model.safetensors``, with identical validation and test metrics."""
    threads_seen: list[int] = []
    train_group = LocalTrainer._train_group  # every local update goes through one vmapped group

    def record(self, *args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return train_group(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "_train_group", record)
    wanted, threads = unusual_threads(), torch.get_num_threads()
    common = ["pipeline", "--data", str(posters_data), "--top-users", "all", "--no-progress",
              "--threads", str(wanted), *TINY]
    fresh, cached = tmp_path / "fresh", tmp_path / "cached"
    try:
        assert main([*common, "--out", str(fresh)]) == 0
        fresh_threads, threads_seen[:] = list(threads_seen), []
        assert main([*common, "--out", str(cached), "--features", str(fresh / "features")]) == 0
    finally:
        torch.set_num_threads(threads)
    report = {name: json.loads((folder / "report.json").read_text()) for name, folder in (("fresh", fresh),
                                                                                          ("cached", cached))}
    assert report["fresh"]["features"]["visual"]["status"] == "computed"
    assert report["cached"]["features"]["visual"]["status"] == "existing"
    assert len(fresh_threads) >= 4 and fresh_threads == threads_seen  # 2 rounds x 2 stages, group by group
    assert set(fresh_threads) == {wanted}  # every group trained at the requested threads
    for stage in ("stage1_cohort20_eps", "stage3_tuned"):
        assert (fresh / stage / "model.safetensors").read_bytes() == (cached / stage / "model.safetensors").read_bytes()
        histories = [json.loads((folder / stage / "train_history.json").read_text()) for folder in (fresh, cached)]
        assert [r.get("val_metrics") for r in histories[0]["rounds"]] == [r.get("val_metrics") for r in histories[1]["rounds"]]
        assert histories[0]["final"] == histories[1]["final"]
