"""The run directory: the one writer every runner uses (see ``federation/checkpoint.py`` for the files).

``config.json`` (everything needed to reproduce the run), ``train_history.json`` (one entry per
round, the best round, the final scores), ``model.safetensors`` (the best validation round) and
its ``global_prototypes.npy``, ``memory_state.npz`` (the clients' memories), ``resume/`` after
every round, and ``validation_curves.png``. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig
from ..evaluation import SELECT_METRIC
from ..federation import checkpoint as ckpt
from ..federation.server import ServerOptimizer
from ..models import UR4RecV2MoE
from ..safeio import load_npy, load_npz
from .assemble import Assembly

log = logging.getLogger(__name__)


def run_config_payload(config: TrainConfig, assembly: Assembly, data_stats: dict, **extra) -> dict:
    """``config.json``: the training config, model shape, data, features and where the run started from."""
    model = assembly.model
    payload = {
        "train": config.to_dict(), "model": config.model_kwargs(assembly.data.num_items, model.visual_dim,
                                                                 model.text_dim),
        "trained_groups": assembly.trained_groups, "init": assembly.init_dir, "features": assembly.feature_meta,
        "data": data_stats, "data_fingerprint": assembly.data.fingerprint(), "select_metric": SELECT_METRIC,
        "versions": {"torch": torch.__version__},
    }
    versions = extra.pop("versions", {})
    payload["versions"].update(versions)
    payload.update(extra)
    return payload


class RunDir:
    """Writes one run directory; resumes from its last round when asked (refusing another config)."""

    def __init__(self, out_dir: Path, resume: bool = False, resume_points: bool = True):
        self.out_dir = Path(out_dir)
        held = ckpt.resume_dir(self.out_dir) is not None
        if held and not resume:
            raise FileExistsError(f"{self.out_dir} already holds a run; resume it (`--resume`, or resume=true on "
                                  "Flower) or choose another output directory")
        self.resuming = resume and held
        self.resume_points = resume_points
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.history: dict = {}
        self.best_value = -1.0
        self.payload: dict = {}
        self.point: ckpt.ResumePoint | None = None

    def start(self, payload: dict, memory_seconds: float | None = None, **history) -> ckpt.ResumePoint | None:
        """Write config.json (after refusing to resume a run started with another config); the resume point."""
        self.payload = payload
        if self.resuming:
            self.point = ckpt.load_resume_point(self.out_dir, payload)
        ckpt.write_json(self.out_dir / ckpt.CONFIG_FILE, payload)
        self.history = {"rounds": [], "val_metrics": [], "best_round": None, "best_val": None,
                        "memory_build_seconds": None if memory_seconds is None else round(memory_seconds, 2),
                        **history}
        return self.point

    def restore(self, model: UR4RecV2MoE, server_optimizer: ServerOptimizer) -> tuple[int, torch.Tensor | None]:
        """(first round to run, global prototypes): after loading the last finished round when resuming."""
        point = self.point
        if point is None:
            return 1, None
        model.load_state_dict(point.model)
        server_optimizer.load_state_dict(point.server_optimizer)
        self.history, self.best_value = point.history, point.best_value
        ckpt.set_rng_state(point.rng)
        log.info("resuming %s after round %d", self.out_dir, point.round)
        return point.round + 1, point.prototypes

    def validated(self, entry: dict, result: dict, seconds: float, model: UR4RecV2MoE,
                  prototypes: torch.Tensor | None) -> None:
        """Record a round's validation; keep the model (and prototypes) when it is the best so far."""
        entry["val_metrics"] = result
        entry["eval_seconds"] = round(seconds, 3)
        self.history["val_metrics"].append(result)
        if result[SELECT_METRIC] > self.best_value:
            self.best_value = result[SELECT_METRIC]
            self.history["best_round"], self.history["best_val"] = entry["round"], result
            ckpt.save_weights(self.out_dir / ckpt.MODEL_FILE, model.state_dict(), {"round": entry["round"]})
            if prototypes is not None:
                ckpt.save_array(self.out_dir / ckpt.BEST_PROTOTYPES_FILE, prototypes.numpy())

    def end_round(self, entry: dict, model: UR4RecV2MoE, server_optimizer: ServerOptimizer | None,
                  prototypes: torch.Tensor | None, clients: tuple[dict, str] | None = None) -> None:
        """Append the round to the history and write the resume point (``clients``: packed memories, digest)."""
        self.history["rounds"].append(entry)
        if self.resume_points:
            self.save_point(entry["round"], model, server_optimizer, prototypes, ckpt.rng_state(), clients)
        ckpt.write_json(self.out_dir / ckpt.HISTORY_FILE, self.history)

    def save_point(self, round_number: int, model: UR4RecV2MoE, server_optimizer: ServerOptimizer,
                   prototypes: torch.Tensor | None, rng: dict, clients: tuple[dict, str] | None = None) -> None:
        """The resume point: everything needed to continue after ``round_number``."""
        packed, digest = clients if clients else (None, None)
        ckpt.write_resume_point(self.out_dir, ckpt.ResumePoint(
            round_number, model.state_dict(), server_optimizer.state_dict(), prototypes, self.best_value,
            self.history, self.payload, rng, packed, digest))

    def load_best(self, model: UR4RecV2MoE) -> torch.Tensor | None:
        """Load the best round's model into ``model``; its global prototypes, if any."""
        model.load_state_dict(ckpt.load_weights(self.out_dir / ckpt.MODEL_FILE))
        model.eval()
        path = self.out_dir / ckpt.BEST_PROTOTYPES_FILE
        return torch.from_numpy(load_npy(path, kind="f", ndim=2)) if path.exists() else None

    def finish(self, final: dict, title: str, extra: dict | None = None,
               memory: dict[str, np.ndarray] | None = None) -> dict:
        """The final scores into the history; the clients' memories and the validation curves beside it."""
        self.history["final"] = final
        if extra:
            self.history.update(extra)
        self.history["total_seconds"] = round(sum(r["seconds"] for r in self.history["rounds"]), 2)
        ckpt.write_json(self.out_dir / ckpt.HISTORY_FILE, self.history)
        if memory:
            save_memory_state(self.out_dir / ckpt.MEMORY_FILE, memory)
        plot_history(self.history, self.out_dir / "validation_curves.png", title)
        return self.history


def save_memory_state(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The clients' memories (:func:`pack_clients` arrays: the resume point's layout), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    tmp.replace(path)


def load_memory_state(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """:func:`save_memory_state`'s file back as user -> ``LocalMemory.state_dict()`` (never unpickled)."""
    keys = ("lt_items", "lt_freq", "lt_last", "recent")
    arrays = load_npz(path, required=("users", "step", "threshold", "writes")
                      + keys + tuple(k + "_offsets" for k in keys))
    out = {}
    for row, user in enumerate(arrays["users"].tolist()):
        state = {}
        for key in keys:
            offsets = arrays[key + "_offsets"]
            state[key] = arrays[key][offsets[row]:offsets[row + 1]]
        state.update({key: arrays[key][row:row + 1] for key in ("step", "threshold", "writes")})
        out[int(user)] = state
    return out


def plot_history(history: dict, path: Path, title: str) -> None:
    """Validation HR@10 and NDCG@10 per evaluated round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history["rounds"] if "val_metrics" in r]
    if not rounds:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    protocol = history["val_metrics"][0]["protocol"]
    for name in ("HR@10", "NDCG@10"):
        ax.plot(rounds, [r["val_metrics"][name] for r in history["rounds"] if "val_metrics" in r], marker="o",
                label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(f"validation ({protocol})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
