"""Safe loading (issue 8): no code path unpickles a file it reads.

Every load is safetensors, ``torch.load(weights_only=True)``, ``np.load(allow_pickle=False)``
(:mod:`feddmmr.safeio`) or JSON. Each test plants a malicious pickle — an object whose
``__reduce__`` creates a marker file when unpickled — where the code expects a feature file, a
checkpoint, global prototypes, a memory state, a cache or a Flower array, and checks that the load
is refused with an error naming the file and that the marker never appears.
"""

from __future__ import annotations

import builtins
import io
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr.features import TEXT_FILE
from feddmmr.features.store import FeatureError, load_features, load_table
from feddmmr.federation import checkpoint as ckpt
from feddmmr.models import CheckpointError
from feddmmr.engine.assemble import restore
from feddmmr.engine.run_dir import load_memory_state, save_memory_state
from feddmmr.runner import run_federated
from feddmmr.safeio import ArrayFileError, load_npy, load_npz

from .fedtools import tiny_config, tiny_dataset, tiny_features

pytestmark = [pytest.mark.reliability,
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]  # torch, on our payloads

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a malicious pickle was executed"


def write_pickle_files(folder: Path, marker: Path) -> dict[str, Path]:
    """The same payload as a torch .pt, a raw pickle, an object .npy and an .npz with an object member."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"pt": folder / "evil.pt", "raw": folder / "evil.pkl", "npy": folder / "evil.npy",
             "npz": folder / "evil.npz"}
    torch.save({"features": Payload(marker), "mask": torch.ones(2, dtype=torch.bool), "meta": {}}, files["pt"])
    files["raw"].write_bytes(pickle.dumps(Payload(marker)))
    np.save(files["npy"], np.array([Payload(marker)], dtype=object), allow_pickle=True)
    np.savez(files["npz"], users=np.arange(2), lt_items=np.array([Payload(marker)], dtype=object))
    return files


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    data = tiny_dataset(root)
    run_federated(tiny_config(1, num_rounds=1), data, root / "run", progress=False)
    return root, data


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """Guards the other tests: their payload is live, so 'no marker' means 'refused'."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_numpy_files_are_refused_with_the_file_named(tmp_path, marker):
    files = write_pickle_files(tmp_path / "evil", marker)
    for key in ("npy", "raw", "pt"):
        with pytest.raises(ArrayFileError, match=re.escape(str(files[key]))):
            load_npy(files[key])
    with pytest.raises(ArrayFileError, match="pickled objects are never loaded"):
        load_npz(files["npz"])
    with pytest.raises(ArrayFileError, match="archive"):
        load_npy(files["npz"])
    with pytest.raises(ArrayFileError, match="not found"):
        load_npy(tmp_path / "absent.npy")


def test_a_pickle_in_place_of_a_feature_file_is_refused(tmp_path, marker):
    folder = tiny_features(tmp_path)
    files = write_pickle_files(tmp_path / "evil", marker)
    for key in ("pt", "raw", "npy"):
        shutil.copy(files[key], folder / TEXT_FILE)
        with pytest.raises(FeatureError, match=f"{re.escape(str(folder / TEXT_FILE))}.*not a readable feature file"):
            load_features(folder)
        with pytest.raises(FeatureError, match="not a readable"):
            load_table(folder / TEXT_FILE)


def test_a_pickle_in_place_of_a_checkpoint_is_refused(tiny_run, tmp_path, marker):
    root, data = tiny_run
    files = write_pickle_files(tmp_path / "evil", marker)
    for key in ("pt", "raw"):
        run_dir = tmp_path / f"run_{key}"
        shutil.copytree(root / "run", run_dir)
        shutil.copy(files[key], run_dir / ckpt.MODEL_FILE)
        with pytest.raises(CheckpointError, match=f"{re.escape(str(run_dir / ckpt.MODEL_FILE))}.*safetensors"):
            ckpt.load_model(run_dir)
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            restore(run_dir, data)
        # as the previous stage of a later one
        with pytest.raises(CheckpointError, match="not a readable safetensors file"):
            run_federated(tiny_config(3), data, tmp_path / f"stage3_{key}", tiny_features(tmp_path / key), run_dir,
                          progress=False)
        # as the resume point
        shutil.copy(files[key], run_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE)
        with pytest.raises(CheckpointError, match=re.escape(str(run_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE))):
            run_federated(tiny_config(1, num_rounds=2), data, run_dir, resume=True, progress=False)


def test_pickled_global_prototypes_are_refused(tiny_run, tmp_path, marker):
    root, data = tiny_run
    files = write_pickle_files(tmp_path / "evil", marker)
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    for key in ("npy", "raw"):
        shutil.copy(files[key], run_dir / "global_prototypes.npy")
        with pytest.raises(ArrayFileError, match=re.escape(str(run_dir / "global_prototypes.npy"))):
            restore(run_dir, data)
    np.save(run_dir / "global_prototypes.npy", np.arange(6).reshape(2, 3))  # ids, not vectors
    with pytest.raises(ArrayFileError, match="dtype int64"):
        restore(run_dir, data)


def test_a_pickled_memory_state_is_refused_and_a_real_one_round_trips(tmp_path, marker):
    from feddmmr.federation.client import build_clients, pack_clients
    from feddmmr.federation.memory import MemoryConfig
    from feddmmr.engine.assemble import assemble as setup

    data = tiny_dataset(tmp_path)
    config = tiny_config(3, trainable_groups=["item_embedding", "backbone", "projectors", "experts", "router",
                                              "gate"])
    fed = setup(config, data, tiny_features(tmp_path))
    clients = build_clients(data, config.max_seq_len, MemoryConfig.from_train_config(config), fed.space)
    path = tmp_path / ckpt.MEMORY_FILE
    save_memory_state(path, pack_clients(clients))
    loaded = load_memory_state(path)
    assert sorted(loaded) == sorted(clients)
    for user, state in loaded.items():
        own = clients[user].memory_state.state_dict()
        assert all(np.array_equal(state[k], own[k]) for k in own)
    files = write_pickle_files(tmp_path / "evil", marker)
    for key in ("npz", "raw", "pt"):
        shutil.copy(files[key], path)
        with pytest.raises(ArrayFileError, match=re.escape(str(path))):
            load_memory_state(path)
    np.savez(path, users=np.arange(2))
    with pytest.raises(ArrayFileError, match="missing array"):
        load_memory_state(path)


def test_a_pickled_candidate_cache_is_ignored_and_rebuilt(tiny_run, tmp_path, marker, caplog):
    from feddmmr.evaluation import _CANDIDATE_CACHE, candidates, sample_candidates

    _, data = tiny_run
    files = write_pickle_files(tmp_path / "evil", marker)
    expected = sample_candidates(data, "val", 0, 10)
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"candidates_{data.fingerprint()}_val_s0_n10.npy"
    shutil.copy(files["npy"], cache / name)
    _CANDIDATE_CACHE.clear()
    assert np.array_equal(candidates(data, "val", 0, cache, 10), expected)
    assert "ignoring candidate cache" in caplog.text and name in caplog.text
    assert np.array_equal(load_npy(cache / name), expected)  # rebuilt in place
    _CANDIDATE_CACHE.clear()


def test_a_pickled_flower_array_is_refused(marker):
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord

    from feddmmr.flower import messages as msgs

    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    evil = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(ValueError, match="allow_pickle"):
        msgs.record_to_arrays(ArrayRecord({"values": evil}))


def test_no_code_path_can_unpickle():
    """A static audit of the package and the bench/scripts: every load is one of the safe forms."""
    sources = [p for folder in ("feddmmr", "bench", "scripts") for p in (REPO / folder).rglob("*.py")]
    problems = []
    for path in sources:
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            if re.search(r"\bimport (c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b|\bpickle\.loads?\(", code):
                problems.append(where)
            if "allow_pickle=True" in code or "weights_only=False" in code or "read_pickle(" in code:
                problems.append(where)
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(where)
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                problems.append(where)
    assert not problems, "unsafe loads:\n" + "\n".join(problems)
