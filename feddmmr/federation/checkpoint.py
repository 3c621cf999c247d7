"""The one checkpoint format: a run directory with safetensors weights and JSON beside them.

    run_dir/model.safetensors      best global model (every group)
    run_dir/config.json            everything needed to rebuild and reproduce the run
    run_dir/train_history.json     per round: val_metrics, losses, gate, router usage, seconds
    run_dir/memory_state.npz       the clients' memory state (written by the clients' runner)
    run_dir/resume/                the last completed round, for --resume (see ResumePoint)

Weights never go through pickle: safetensors only. Every file is written to a temporary
name and renamed into place, and the resume point (several files) is written into a fresh
directory that is swapped in by renames, so a process killed at any moment leaves either
the previous or the new complete checkpoint, never a half-written one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import TrainConfig
from ..models import PARAM_GROUPS, CheckpointError, UR4RecV2MoE, group_of

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "train_history.json"
MEMORY_FILE = "memory_state.npz"
RESUME_DIR = "resume"


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file, then rename (no pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    tmp.replace(path)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: not found; is {run_dir} a feddmmr run directory?")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    _require_section(path, payload, "train")
    return payload


def _require_section(path: Path, payload, name: str) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get(name), dict):
        raise CheckpointError(f"{path}: not a feddmmr run config (no {name!r} section); is it from another tool?")


def load_model(run_dir: Path) -> tuple[UR4RecV2MoE, dict]:
    """Rebuild a run's model from its config and weights (for evaluate / recommend)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    _require_section(run_dir / CONFIG_FILE, config, "model")
    try:
        model = UR4RecV2MoE(**config["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{run_dir / CONFIG_FILE}: cannot rebuild the model from its 'model' section ({exc})") \
            from None
    _load_groups(model, load_weights(run_dir / MODEL_FILE), run_dir / MODEL_FILE)
    model.eval()
    return model, config


def load_init(model: UR4RecV2MoE, init_dir: Path, required: list[str]) -> list[str]:
    """Load a previous stage into ``model`` by parameter group.

    Loads every group the previous run holds trained values for; fails, naming the group,
    if one of ``required`` (the groups this stage freezes, and the backbone) is missing there
    or any loaded tensor is mis-shaped. Returns the groups loaded.
    """
    init_dir = Path(init_dir)
    previous = read_run_config(init_dir)
    held = list(previous.get("trained_groups", []))
    missing = [g for g in required if g not in held]
    if missing:
        raise CheckpointError(f"{init_dir}: the previous stage holds no trained values for parameter group(s) "
                              f"{missing} (it holds {held}); train them first or pass another --init")
    state = load_weights(init_dir / MODEL_FILE)
    present = {group_of(k) for k in state if _known(k)}
    absent = [g for g in held if g not in present]
    if absent:
        raise CheckpointError(f"{init_dir / MODEL_FILE}: parameter group(s) {absent} are missing from the weights")
    _load_groups(model, state, init_dir / MODEL_FILE, held)
    return held


def _load_groups(model: UR4RecV2MoE, state: dict, path: Path, groups: list[str] | None = None) -> None:
    """``model.load_state_dict`` with the checkpoint file named in a mismatch (group, key and shapes)."""
    try:
        model.load_state_dict(state, groups=groups)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc} (was it trained with another model size or dataset?)") from None


def _known(key: str) -> bool:
    try:
        group_of(key)
        return True
    except KeyError:
        return False


def frozen_groups(trainable: list[str]) -> list[str]:
    return [g for g in PARAM_GROUPS if g not in trainable]


# --------------------------------------------------------------------------- the resume point

RESUME_FORMAT = 2
# Keys a resume may change: extend a run (num_rounds; in DP mode the planned epsilon follows, the noise
# multiplier may not change) or relax the quorum after a failed round (min_clients).
RESUMABLE_CHANGES = ("train.num_rounds", "train.min_clients", "privacy.rounds", "privacy.epsilon")
BEST_PROTOTYPES_FILE = "global_prototypes.npy"  # the best round's global prototypes, beside MODEL_FILE
_STATE, _HISTORY, _OPTIMIZER = "state.json", "history.json", "server_optimizer.safetensors"
_PROTOTYPES, _CLIENTS = "prototypes.npy", "clients.npz"
_BEST = {MODEL_FILE: "best.safetensors", BEST_PROTOTYPES_FILE: "best_prototypes.npy"}  # run dir -> resume dir


class ResumeError(CheckpointError):
    """A resume point that cannot be continued exactly (another config, an older format, corrupt)."""


@dataclass
class ResumePoint:
    """Everything that carries state from one round to the next, as of the end of ``round``.

    On disk (``run_dir/resume/``): the global model and server optimizer state (safetensors),
    the global prototypes, the history, the clients' memories (``pack_clients`` arrays, with
    a digest checked on load), the best model so far, and ``state.json`` (round, best value,
    RNG states, the run config it must be resumed with).
    """

    round: int
    model: dict[str, torch.Tensor]
    server_optimizer: dict[str, torch.Tensor]
    prototypes: torch.Tensor | None
    best_value: float
    history: dict
    run_config: dict
    rng: dict
    clients: dict[str, np.ndarray] | None = None
    clients_digest: str | None = None  # array_digest(clients); computed on write when not given


def resume_dir(run_dir: Path) -> Path | None:
    """The complete resume point of ``run_dir``, if any (``resume.old`` after a kill mid-swap)."""
    for name in (RESUME_DIR, RESUME_DIR + ".old"):
        if (Path(run_dir) / name / _STATE).exists():
            return Path(run_dir) / name
    return None


def write_resume_point(run_dir: Path, point: ResumePoint) -> None:
    """Write ``point`` into a fresh directory, then swap it in: the old one stays until the new one is whole.

    Unchanged big files (the clients' memories, the best model) are hard links, so a round
    costs the model, the optimizer state and a few small files.
    """
    run_dir = Path(run_dir)
    current, old, tmp = run_dir / RESUME_DIR, run_dir / (RESUME_DIR + ".old"), run_dir / (RESUME_DIR + ".tmp")
    previous = resume_dir(run_dir)
    if tmp.exists():  # left over by a write that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights(tmp / MODEL_FILE, point.model)
    if point.server_optimizer:
        save_weights(tmp / _OPTIMIZER, point.server_optimizer)
    if point.prototypes is not None:
        save_array(tmp / _PROTOTYPES, point.prototypes.numpy())
    digest = None
    if point.clients:
        digest = point.clients_digest or array_digest(point.clients)
        before = _read_state(previous) if previous is not None else {}
        if before.get("clients_digest") == digest and (previous / _CLIENTS).exists():
            _link_or_copy(previous / _CLIENTS, tmp / _CLIENTS)
        else:
            np.savez(tmp / _CLIENTS, **point.clients)
    best = [name for name in _BEST if (run_dir / name).exists()]
    for name in best:
        _link_or_copy(run_dir / name, tmp / _BEST[name])
    write_json(tmp / _HISTORY, point.history)
    write_json(tmp / _STATE, {"format": RESUME_FORMAT, "round": point.round, "best_value": point.best_value,
                              "best_files": best, "clients_digest": digest, "rng": point.rng,
                              "run_config": point.run_config})
    if current.exists():
        if old.exists():
            shutil.rmtree(old)
        current.rename(old)
    tmp.rename(current)
    if old.exists():
        shutil.rmtree(old)


def load_resume_point(run_dir: Path, run_config: dict) -> ResumePoint:
    """The resume point of ``run_dir``, refused unless it was written with ``run_config``.

    Also puts the point's best model (and best prototypes) back into the run directory: a
    run killed mid-round may have left a newer best there, which the repeated round rewrites.
    """
    run_dir = Path(run_dir)
    folder = resume_dir(run_dir)
    if folder is None:
        raise ResumeError(f"{run_dir}: no resume point ({RESUME_DIR}/{_STATE}) to continue from")
    state = _read_state(folder)
    if state.get("format") != RESUME_FORMAT:
        raise ResumeError(f"{folder / _STATE}: written by an older feddmmr without the exact-resume state "
                          f"(format {state.get('format')}, expected {RESUME_FORMAT}); start a new run")
    differences = config_differences(state["run_config"], run_config)
    if differences:
        raise ResumeError(f"{run_dir}: cannot resume a run started with another config: {'; '.join(differences)}. "
                          f"Resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} may change) "
                          "or start a new run in another directory")
    clients = None
    if state.get("clients_digest"):
        try:
            with np.load(folder / _CLIENTS, allow_pickle=False) as arrays:
                clients = {key: arrays[key] for key in arrays.files}
        except (OSError, ValueError) as exc:
            raise ResumeError(f"{folder / _CLIENTS}: unreadable client memories ({exc})") from None
        if array_digest(clients) != state["clients_digest"]:
            raise ResumeError(f"{folder / _CLIENTS}: the client memories do not match their digest in "
                              f"{_STATE}; the resume point is corrupt")
    for name, saved in _BEST.items():
        target = run_dir / name
        if name in state.get("best_files", []):
            tmp = target.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            _link_or_copy(folder / saved, tmp)
            tmp.replace(target)
        else:
            target.unlink(missing_ok=True)
    prototypes = None
    if (folder / _PROTOTYPES).exists():
        prototypes = torch.from_numpy(np.load(folder / _PROTOTYPES, allow_pickle=False))
    optimizer = load_weights(folder / _OPTIMIZER) if (folder / _OPTIMIZER).exists() else {}
    return ResumePoint(state["round"], load_weights(folder / MODEL_FILE), optimizer, prototypes,
                       state["best_value"], _read_json(folder / _HISTORY), state["run_config"], state["rng"],
                       clients, state.get("clients_digest"))


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved vs current`` for every differing leaf (dotted keys; versions and RESUMABLE_CHANGES ignored).

    A training key the saved config lacks (added to ``TrainConfig`` after the run started) is no
    difference while it keeps its default: a new key's default is the behaviour before it existed."""
    before, now = _flatten(saved), _flatten(json.loads(json.dumps(current, default=_jsonable)))
    defaults = _flatten(json.loads(json.dumps({"train": TrainConfig().to_dict()})))
    missing = "<absent>"
    out = []
    for key in sorted(set(before) | set(now)):
        if key in RESUMABLE_CHANGES or key.startswith("versions."):
            continue
        if key not in before and key in defaults and now.get(key, missing) == defaults[key]:
            continue
        if before.get(key, missing) != now.get(key, missing):
            out.append(f"{key} was {before.get(key, missing)!r}, now {now.get(key, missing)!r}")
    return out


def _flatten(payload: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in payload.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def array_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: detects any change or corruption of saved arrays."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def rng_state() -> dict:
    """The global RNG states (torch, NumPy, Python) as JSON, so a resumed run draws what the original would."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _read_state(folder: Path) -> dict:
    return _read_json(folder / _STATE)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: unreadable ({exc})") from None


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (files are never modified in place, only replaced), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
