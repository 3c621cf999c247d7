"""The one checkpoint format: a run directory with safetensors weights and JSON beside them.

    run_dir/model.safetensors      best global model (every group)
    run_dir/config.json            everything needed to rebuild and reproduce the run
    run_dir/train_history.json     per round: val_metrics, losses, gate, router usage, seconds
    run_dir/memory_state.npz       the clients' memory state (written by the clients' runner)
    run_dir/resume/                the last completed round, for --resume

Weights never go through pickle: safetensors only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
