"""Exact resume: a run stopped after round k and resumed ends exactly as the uninterrupted run.

The federation is Stage 3 on tiny synthetic data: client memories and global prototypes on,
dropout in the model, and FedAdam on the server (state carried across rounds).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation.checkpoint import ResumeError
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features

pytestmark = pytest.mark.reliability

ROUNDS = 4


def stage3(**overrides):
    return tiny_config(3, num_rounds=ROUNDS, server_optimizer="fedadam", server_learning_rate=0.05, **overrides)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """The data, features and Stage 1 init shared by every test, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("resume")
    data = tiny_dataset(root)
    features = tiny_features(root)
    run_federated(tiny_config(1, num_rounds=1), data, root / "stage1", progress=False)
    full = run_federated(stage3(), data, root / "full", features, root / "stage1", progress=False)
    return {"root": root, "data": data, "features": features, "init": root / "stage1", "full": full}


def run(fed, out: Path, resume: bool = False, **overrides) -> dict:
    return run_federated(stage3(**overrides), fed["data"], out, fed["features"], fed["init"], resume=resume,
                         progress=False)


class Killed(Exception):
    pass


def stop_after(monkeypatch, round_number: int) -> None:
    """Simulate a kill right after round ``round_number``'s resume point is written."""
    write = ckpt.write_resume_point

    def write_then_die(run_dir, point):
        write(run_dir, point)
        if point.round == round_number:
            raise Killed

    monkeypatch.setattr(ckpt, "write_resume_point", write_then_die)


def without_seconds(value):
    """A history without its wall-clock entries."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if not k.endswith("seconds")}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def assert_same_run(fed, out: Path, history: dict) -> None:
    """Bit-identical last global model, best model and prototypes; identical history and metrics."""
    reference = fed["root"] / "full"
    assert without_seconds(history) == without_seconds(fed["full"])
    assert without_seconds(json.loads((out / ckpt.HISTORY_FILE).read_text())) == without_seconds(fed["full"])
    for name in (ckpt.MODEL_FILE, f"{ckpt.RESUME_DIR}/{ckpt.MODEL_FILE}",
                 f"{ckpt.RESUME_DIR}/server_optimizer.safetensors"):
        a, b = ckpt.load_weights(reference / name), ckpt.load_weights(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert np.array_equal(np.load(reference / ckpt.BEST_PROTOTYPES_FILE), np.load(out / ckpt.BEST_PROTOTYPES_FILE))


def test_a_run_stopped_after_round_k_resumes_to_the_same_parameters_and_metrics(fed, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        with pytest.raises(Killed):
            run(fed, out)
    assert json.loads((out / ckpt.RESUME_DIR / "state.json").read_text())["round"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        run(fed, out)
    # the memories come from the resume point, not from a rebuild
    monkeypatch.setattr("feddmmr.engine.assemble.build_clients", lambda *a, **k: pytest.fail("memories rebuilt on resume"))
    torch.manual_seed(1234)  # whatever happened to the global RNGs in between is undone by the resume point
    np.random.seed(1234)
    history = run(fed, out, resume=True)
    assert [r["round"] for r in history["rounds"]] == list(range(1, ROUNDS + 1))
    assert_same_run(fed, out, history)



def seed_globals(value: int) -> None:
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def test_a_resumed_round_starts_from_the_global_rng_states_of_the_uninterrupted_run(fed, tmp_path, monkeypatch):
    """The global torch, NumPy and Python RNG states as a resumed round starts training equal those of
    the uninterrupted run as the same round starts, whatever the process did to them before.

    Checked where the states are read, as each vmapped group of clients starts training (the first
    group of a round before anything reseeds the torch generator), so this holds on its own, not only
    because today's client groups happen to reseed.
    """
    from feddmmr.federation.client import LocalTrainer

    seen: list[dict] = []
    train_group = LocalTrainer._train_group  # every local update of every round goes through one group

    def record(self, *args, **kwargs):
        seen.append(ckpt.rng_state())
        return train_group(self, *args, **kwargs)

    monkeypatch.setattr(LocalTrainer, "_train_group", record)
    seed_globals(7)
    run(fed, tmp_path / "whole")
    whole, seen[:] = list(seen), []
    assert len(whole) >= ROUNDS and len(whole) % ROUNDS == 0  # the same number of groups every round
    per_round = len(whole) // ROUNDS
    seed_globals(7)
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        with pytest.raises(Killed):
            run(fed, tmp_path / "split")
    seen[:] = []
    seed_globals(1234)  # the process moved on: the resume point, not the process, decides what comes next
    run(fed, tmp_path / "split", resume=True)
    assert len(seen) == (ROUNDS - 2) * per_round
    for index, (resumed, uninterrupted) in enumerate(zip(seen, whole[2 * per_round:])):
        for generator in ("torch", "numpy", "python"):
            assert resumed[generator] == uninterrupted[generator], \
                f"round {3 + index // per_round}, group {index % per_round}: {generator} RNG differs"


def test_a_subprocess_killed_with_sigkill_mid_run_resumes_exactly(fed, tmp_path):
    out = tmp_path / "killed"
    child = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from feddmmr.config import TrainConfig
from feddmmr.data.dataset import load_dataset
from feddmmr.federation import checkpoint as ckpt
from feddmmr.runner import run_federated
write = ckpt.write_resume_point
def slow_write(run_dir, point):  # leave the parent time to kill us mid-run
    write(run_dir, point)
    time.sleep(0.3)
ckpt.write_resume_point = slow_write
config = TrainConfig(**{stage3().to_dict()!r})
run_federated(config, load_dataset({str(fed["root"] / "data")!r}), {str(out)!r}, {str(fed["features"])!r},
              {str(fed["init"])!r}, progress=False)
"""
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / ckpt.RESUME_DIR / "state.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and process.poll() is None:
            if state.exists() and json.loads(state.read_text())["round"] >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    stopped = json.loads((ckpt.resume_dir(out) / "state.json").read_text())["round"]
    assert 2 <= stopped < ROUNDS
    history = run(fed, out, resume=True)
    assert_same_run(fed, out, history)


def test_a_kill_while_writing_the_resume_point_leaves_the_previous_one(fed, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_json = ckpt.write_json

    def die_writing_round_3(path, payload):
        if path.name == "state.json" and payload.get("round") == 3:
            raise Killed  # the model, optimizer, history of round 3 are already in resume.tmp
        write_json(path, payload)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "write_json", die_writing_round_3)
        with pytest.raises(Killed):
            run(fed, out)
    assert (out / "resume.tmp").exists()
    assert json.loads((ckpt.resume_dir(out) / "state.json").read_text())["round"] == 2
    history = run(fed, out, resume=True)
    assert_same_run(fed, out, history)
    assert not (out / "resume.tmp").exists()


def test_a_kill_between_the_two_renames_of_the_swap_keeps_a_resume_point(fed, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 2)
        with pytest.raises(Killed):
            run(fed, out)
    (out / ckpt.RESUME_DIR).rename(out / "resume.old")  # the swap's first step, the second never happened
    assert ckpt.resume_dir(out) == out / "resume.old"
    with pytest.raises(FileExistsError):
        run(fed, out)
    history = run(fed, out, resume=True)
    assert_same_run(fed, out, history)
    assert ckpt.resume_dir(out) == out / ckpt.RESUME_DIR and not (out / "resume.old").exists()


def test_resume_with_another_config_is_refused_naming_the_keys(fed, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        with pytest.raises(Killed):
            run(fed, out)
    saved = (out / ckpt.CONFIG_FILE).read_text()
    with pytest.raises(ResumeError, match=r"train\.learning_rate was 0\.001, now 0\.01.*train\.seed"):
        run(fed, out, resume=True, learning_rate=0.01, seed=3)
    assert (out / ckpt.CONFIG_FILE).read_text() == saved  # the refused resume changed nothing
    with pytest.raises(ResumeError, match=r"model\.moe_num_heads was 2, now 4"):
        run(fed, out, resume=True, moe_num_heads=4)


def test_corrupt_or_old_resume_points_fail_loudly(fed, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_after(patch, 1)
        with pytest.raises(Killed):
            run(fed, out)
    memories = out / ckpt.RESUME_DIR / "clients.npz"
    with np.load(memories) as arrays:
        changed = {key: arrays[key] for key in arrays.files}
    changed["lt_items"] = changed["lt_items"][::-1].copy()
    np.savez(memories, **changed)
    with pytest.raises(ResumeError, match="client memories do not match their digest"):
        run(fed, out, resume=True)
    state_file = out / ckpt.RESUME_DIR / "state.json"
    state = json.loads(state_file.read_text())
    del state["format"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeError, match="older feddmmr"):
        run(fed, out, resume=True)


def test_rng_state_round_trips():
    saved = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(json.loads(json.dumps(saved)))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_the_run_directory_writes_and_restores_the_same_resume_point(tmp_path):
    """The one run-directory writer (every transport's) restores exactly what it saved, and refuses
    to resume under another config."""
    from feddmmr.engine.run_dir import RunDir
    from feddmmr.federation.server import ServerOptimizer
    from feddmmr.models import UR4RecV2MoE

    def model():
        torch.manual_seed(0)
        return UR4RecV2MoE(num_items=10, sasrec_hidden_dim=8, sasrec_num_blocks=1, sasrec_num_heads=2, max_seq_len=4,
                           moe_num_heads=2, visual_dim=4, text_dim=4)

    payload = {"train": tiny_config(1).to_dict(), "versions": {"flwr": "x"}}
    record, trained, optimizer = RunDir(tmp_path), model(), ServerOptimizer("fedavgm")
    record.start(payload)
    with torch.no_grad():
        trained.sasrec.pos_emb.weight.add_(1.0)
    optimizer.step(trained.state_dict(), {k: v + 1 for k, v in trained.state_dict().items()})
    entry = {"round": 1, "clients": 2, "losses": {}, "gate": 0.0, "train_seconds": 0.0}
    record.end_round(entry, trained, optimizer, torch.ones(2, 8))
    with pytest.raises(FileExistsError):
        RunDir(tmp_path)
    with pytest.raises(ResumeError, match="train.learning_rate"):
        RunDir(tmp_path, resume=True).start({**payload, "train": tiny_config(1, learning_rate=0.5).to_dict()})
    again, restored, restored_optimizer = RunDir(tmp_path, resume=True), model(), ServerOptimizer("fedavgm")
    again.start(payload)
    start, prototypes = again.restore(restored, restored_optimizer)
    assert start == 2 and torch.equal(prototypes, torch.ones(2, 8))
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), restored.state_dict().values()))
    assert restored_optimizer.state.keys() == optimizer.state.keys()
    assert all(torch.equal(optimizer.state[k], restored_optimizer.state[k]) for k in optimizer.state)
    assert again.history["rounds"] == [entry]
