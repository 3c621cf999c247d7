"""The in-process federation: every client trained in turn by one reusable trainer.

This is the research loop (and the reference the Flower app must match). Per round:
sample clients -> local updates -> aggregate -> (prototypes) -> validate -> keep the best.
After the last round the best model is scored once on the test split, both protocols.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data.dataset import SequenceDataset
from .evaluation import PROTOCOLS, ScoreFn, evaluate, format_metrics
from .federation import checkpoint as ckpt
from .federation.client import ClientData, ItemContent, LocalTrainer, build_clients
from .federation.memory import ItemSpace, MemoryConfig
from .federation.privacy import DifferentialPrivacy
from .federation.server import Aggregator, ServerOptimizer, aggregate_prototypes, sample_clients
from .models import PARAM_GROUPS, CheckpointError, UR4RecV2MoE
from .safeio import load_npy, load_npz

log = logging.getLogger(__name__)

SELECT_METRIC = "NDCG@10"


# --------------------------------------------------------------------------- shared set-up

@dataclass
class Federation:
    """Everything a runner needs, built the same way by the in-process loop and the Flower app."""

    config: TrainConfig
    data: SequenceDataset
    model: UR4RecV2MoE  # the global model (server side, used for evaluation)
    content: ItemContent
    space: ItemSpace | None
    feature_meta: dict
    trained_groups: list[str]
    init_dir: str | None


def load_content(config: TrainConfig, features_dir: Path | None, num_items: int) -> tuple[ItemContent, dict, int, int]:
    """Item feature tables for the memory (None for a modality switched off)."""
    if not config.use_memory:
        return ItemContent(None, None), {}, 512, 384
    if features_dir is None:
        raise ValueError(f"stage {config.stage} reads item features: pass --features DIR "
                         "(make them with `feddmmr features --data ... --out DIR`)")
    from .features.store import load_features

    text, visual = load_features(Path(features_dir))
    for name, table in (("text", text), ("visual", visual)):
        if table.features.shape[0] != num_items:
            raise ValueError(f"{features_dir}: {name} features have {table.features.shape[0]} rows, "
                             f"the dataset has {num_items} item indices; extract features for this dataset")
    meta = {"dir": str(features_dir), "text": text.meta, "visual": visual.meta}
    visual_table = visual.features.float() if config.use_visual else None
    text_table = text.features.float() if config.use_text else None
    return ItemContent(visual_table, text_table), meta, visual.dim, text.dim


def setup(config: TrainConfig, data: SequenceDataset, features_dir: Path | None = None,
          init_dir: Path | None = None) -> Federation:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    content, meta, visual_dim, text_dim = load_content(config, features_dir, data.num_items)
    model = UR4RecV2MoE(**config.model_kwargs(data.num_items, visual_dim, text_dim))
    if config.use_memory:
        model.set_item_features(content.visual, content.text)
    frozen = [g for g in PARAM_GROUPS if g not in config.trainable_groups]
    used = frozen if config.use_memory else [g for g in frozen if g in ("item_embedding", "backbone")]
    trained = list(config.trainable_groups)
    if init_dir is not None:
        held = ckpt.load_init(model, Path(init_dir), required=used)
        trained = sorted(set(trained) | set(held), key=PARAM_GROUPS.index)
    elif used:
        raise CheckpointError(f"stage {config.stage} freezes parameter group(s) {used}: pass --init with the "
                              "run directory of the previous stage (e.g. a Stage 1 run)")
    space = None
    if config.use_memory:
        space = ItemSpace(content.visual, content.text)
    return Federation(config, data, model, content, space, meta, trained,
                      str(init_dir) if init_dir is not None else None)


def memory_scorer(model: UR4RecV2MoE, content: ItemContent, memory_ids: np.ndarray | None,
                  prototypes: torch.Tensor | None) -> ScoreFn:
    """The evaluation scorer: the last position's representation, the users' memory, one scoring rule."""

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        hidden = model.encode(seq)[:, -1]
        memory_visual = memory_text = None
        if memory_ids is not None:
            memory_visual, memory_text = content.memory(memory_ids[users], prototypes)
        if items is None:
            items = torch.arange(model.num_items).expand(len(users), -1)
        return model.score(hidden, items, memory_visual, memory_text)

    return score


def eval_memory(clients: dict[int, ClientData], split: str, num_users: int, use_memory: bool) -> np.ndarray | None:
    if not use_memory:
        return None
    return np.stack([clients[u].eval_memory[split] for u in range(num_users)])


def make_server_optimizer(config: TrainConfig) -> ServerOptimizer:
    return ServerOptimizer(config.server_optimizer, config.server_learning_rate, config.server_momentum)


def client_seed(seed: int, round_number: int, user: int) -> int:
    return int(np.random.SeedSequence([seed, round_number, user]).generate_state(1)[0])


# --------------------------------------------------------------------------- the loop

def run_federated(config: TrainConfig, data: SequenceDataset, out_dir: Path, features_dir: Path | None = None,
                  init_dir: Path | None = None, resume: bool = False, progress: bool = True,
                  data_info: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    resume_state = out_dir / ckpt.RESUME_DIR / "state.json"
    if resume_state.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    dp = DifferentialPrivacy.from_config(config, data.num_users)  # None unless DP mode (may adjust config)
    fed = setup(config, data, features_dir, init_dir)
    model = fed.model
    memory_config = MemoryConfig.from_train_config(config) if config.use_memory else None
    t0 = time.time()
    clients = build_clients(data, config.max_seq_len, memory_config, fed.space, seed=config.seed, progress=progress)
    memory_seconds = time.time() - t0
    trainer = LocalTrainer(copy.deepcopy(model), config, fed.content, data.occurring_items())
    global_state = model.group_state(config.transmitted_groups)
    server_optimizer = make_server_optimizer(config)
    val_memory = eval_memory(clients, "val", data.num_users, config.use_memory)
    run_config = {
        "train": config.to_dict(), "model": config.model_kwargs(data.num_items, model.visual_dim, model.text_dim),
        "trained_groups": fed.trained_groups, "init": fed.init_dir, "features": fed.feature_meta,
        "data": data_info or data.stats(), "select_metric": SELECT_METRIC,
        "versions": {"torch": torch.__version__},
        "privacy": dp.spent(config.num_rounds) if dp else None,
    }
    ckpt.write_json(out_dir / ckpt.CONFIG_FILE, run_config)

    history: dict = {"rounds": [], "val_metrics": [], "best_round": None, "best_val": None,
                     "memory_build_seconds": round(memory_seconds, 2)}
    start_round, best_value, prototypes = 1, -1.0, None
    if resume and resume_state.exists():
        state = json.loads(resume_state.read_text())
        model.load_state_dict(ckpt.load_weights(out_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE))
        global_state = model.group_state(config.transmitted_groups)
        optimizer_file = out_dir / ckpt.RESUME_DIR / "server_optimizer.safetensors"
        if optimizer_file.exists():
            server_optimizer.load_state_dict(ckpt.load_weights(optimizer_file))
        history = json.loads((out_dir / ckpt.HISTORY_FILE).read_text())
        start_round, best_value = state["round"] + 1, state["best_value"]
        prototypes = torch.tensor(state["prototypes"]) if state.get("prototypes") else None
        log.info("resuming %s after round %d", out_dir, state["round"])

    rounds = range(start_round, config.num_rounds + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.num_rounds, initial=start_round - 1, desc=f"stage {config.stage}", unit="round")
    for round_number in rounds:
        tick = time.time()
        if dp:  # DP mode: Poisson sampling, clipped deltas + Gaussian noise over a fixed denominator
            selected, aggregator = dp.sample(round_number), dp.aggregator(global_state, round_number)
        else:
            selected = sample_clients(data.num_users, config.client_fraction, config.seed, round_number)
            aggregator = Aggregator(global_state, config.item_embedding_aggregation)
        received, sums = [], {}
        updates = trainer.train_many([clients[int(u)] for u in selected], global_state,
                                     [client_seed(config.seed, round_number, int(u)) for u in selected], prototypes)
        for update in updates:
            aggregator.add(update.state, update.num_samples)
            if update.prototypes is not None:
                received.append(update.prototypes)
            for key, value in update.metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        global_state = server_optimizer.step(global_state, aggregator.result())
        trainer.load_global(global_state)
        with torch.no_grad():
            own = model.state_dict()
            for key, value in global_state.items():
                own[key].copy_(value)
        if config.use_memory and config.use_prototypes:
            centers = aggregate_prototypes(received, config.num_global_prototypes, config.seed + round_number)
            prototypes = torch.from_numpy(centers) if centers is not None else prototypes
        train_seconds = time.time() - tick
        entry = {"round": round_number, "clients": int(len(selected)),
                 "samples": int(sum(clients[int(u)].num_samples for u in selected)),
                 "losses": {k: v / max(len(selected), 1) for k, v in sums.items()},
                 "gate": float(model.gating_weight.detach()), "train_seconds": round(train_seconds, 3)}
        if dp:
            entry["privacy"] = {**dp.spent(round_number), **aggregator.stats()}
        if round_number % config.eval_every == 0 or round_number == config.num_rounds:
            tick = time.time()
            model.eval()
            result = evaluate(memory_scorer(model, fed.content, val_memory, prototypes), data, "val",
                              config.eval_protocol, seed=config.seed, max_len=config.max_seq_len,
                              cache_dir=out_dir / "cache", num_negatives=config.eval_negatives)
            entry["val_metrics"] = result
            entry["eval_seconds"] = round(time.time() - tick, 3)
            history["val_metrics"].append(result)
            if result[SELECT_METRIC] > best_value:
                best_value = result[SELECT_METRIC]
                history["best_round"], history["best_val"] = round_number, result
                ckpt.save_weights(out_dir / ckpt.MODEL_FILE, model.state_dict(), {"round": round_number})
                if prototypes is not None:
                    np.save(out_dir / "global_prototypes.npy", prototypes.numpy(), allow_pickle=False)
        entry["seconds"] = round(train_seconds + entry.get("eval_seconds", 0.0), 3)
        history["rounds"].append(entry)
        summary = (f"round {round_number}/{config.num_rounds}: {len(selected)} clients, "
                   f"loss {entry['losses'].get('next_item', float('nan')):.4f}, gate {entry['gate']:.4f}, "
                   f"{train_seconds:.1f}s train")
        if "val_metrics" in entry:
            summary += " | val " + format_metrics(entry["val_metrics"])
        if dp:
            summary += f" | eps {entry['privacy']['epsilon']:.3g}"
        if bar is not None:
            bar.update(1)
            bar.write(summary)
        else:
            log.info(summary)
        # the resume point: everything needed to continue after this round
        ckpt.save_weights(out_dir / ckpt.RESUME_DIR / ckpt.MODEL_FILE, model.state_dict())
        if server_optimizer.state:
            ckpt.save_weights(out_dir / ckpt.RESUME_DIR / "server_optimizer.safetensors", server_optimizer.state_dict())
        ckpt.write_json(out_dir / ckpt.HISTORY_FILE, history)
        ckpt.write_json(resume_state, {"round": round_number, "best_value": best_value,
                                       "prototypes": prototypes.tolist() if prototypes is not None else None})
    if bar is not None:
        bar.close()

    # test once, on the best model, both protocols (validation too, for the report)
    model.load_state_dict(ckpt.load_weights(out_dir / ckpt.MODEL_FILE))
    model.eval()
    best_prototypes = None
    if (out_dir / "global_prototypes.npy").exists():
        best_prototypes = torch.from_numpy(load_npy(out_dir / "global_prototypes.npy", kind="f", ndim=2))
    final = final_scores(model, fed.content, clients, data, config, best_prototypes, out_dir / "cache")
    history["final"] = final
    if dp:
        history["privacy"] = dp.spent(config.num_rounds)
        print(dp.describe(config.num_rounds))
    history["total_seconds"] = round(sum(r["seconds"] for r in history["rounds"]), 2)
    ckpt.write_json(out_dir / ckpt.HISTORY_FILE, history)
    save_memory_state(out_dir / ckpt.MEMORY_FILE, clients)
    plot_history(history, out_dir / "validation_curves.png", f"stage {config.stage} ({config.preset})")
    for key in ("test_sampled", "test_full"):
        print(f"best round {history['best_round']} " + format_metrics(final[key]))
    return history


def final_scores(model: UR4RecV2MoE, content: ItemContent, clients: dict[int, ClientData], data: SequenceDataset,
                 config: TrainConfig, prototypes: torch.Tensor | None, cache_dir: Path) -> dict:
    """The best model on both splits under both protocols (run once, after training)."""
    model.eval()
    final = {}
    for split in ("val", "test"):
        scorer = memory_scorer(model, content, eval_memory(clients, split, data.num_users, config.use_memory),
                               prototypes)
        for protocol in PROTOCOLS:
            final[f"{split}_{protocol}"] = evaluate(
                scorer, data, split, protocol, seed=config.seed, max_len=config.max_seq_len, cache_dir=cache_dir,
                batch_size=256 if protocol == "sampled" else 64, num_negatives=config.eval_negatives)
    return final


def save_memory_state(path: Path, clients: dict[int, ClientData]) -> None:
    """The clients' LT memories (user row -> entries), concatenated with offsets."""
    users = [u for u, c in clients.items() if c.memory_state is not None]
    if not users:
        return
    parts = {key: [] for key in ("lt_items", "lt_freq", "lt_last", "recent")}
    scalars = {key: [] for key in ("step", "threshold", "writes")}
    for user in users:
        state = clients[user].memory_state.state_dict()
        for key in parts:
            parts[key].append(state[key])
        for key in scalars:
            scalars[key].append(state[key][0])
    arrays = {"users": np.asarray(users)}
    for key, values in parts.items():
        arrays[key] = np.concatenate(values)
        arrays[key + "_offsets"] = np.concatenate([[0], np.cumsum([len(v) for v in values])])
    arrays.update({key: np.asarray(values) for key, values in scalars.items()})
    np.savez_compressed(path, **arrays)


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


# --------------------------------------------------------------------------- using a finished run

@dataclass
class TrainedRun:
    """A finished run rebuilt for scoring: its model, config, item content and client memories."""

    model: UR4RecV2MoE
    config: TrainConfig
    content: ItemContent
    clients: dict[int, ClientData]
    prototypes: torch.Tensor | None

    def scorer(self, split: str) -> ScoreFn:
        memory_ids = eval_memory(self.clients, split, len(self.clients), self.config.use_memory)
        return memory_scorer(self.model, self.content, memory_ids, self.prototypes)


def restore(run_dir: Path, data: SequenceDataset, features_dir: Path | None = None) -> TrainedRun:
    """Load a run directory's best model and rebuild the clients' memories from ``data``."""
    run_dir = Path(run_dir)
    model, saved = ckpt.load_model(run_dir)
    config = TrainConfig(**saved["train"])
    if saved["model"]["num_items"] != data.num_items:
        raise CheckpointError(f"{run_dir}: the model has {saved['model']['num_items']} item indices, the data "
                              f"{data.num_items}; pass the dataset (and --top-users) the run was trained on")
    features_dir = features_dir or (saved.get("features") or {}).get("dir")
    content, _, _, _ = load_content(config, Path(features_dir) if features_dir else None, data.num_items)
    if config.use_memory:
        model.set_item_features(content.visual, content.text)
    space = ItemSpace(content.visual, content.text) if config.use_memory else None
    memory_config = MemoryConfig.from_train_config(config) if config.use_memory else None
    clients = build_clients(data, config.max_seq_len, memory_config, space, seed=config.seed)
    prototypes = None
    if (run_dir / "global_prototypes.npy").exists():
        prototypes = torch.from_numpy(load_npy(run_dir / "global_prototypes.npy", kind="f", ndim=2))
    return TrainedRun(model, config, content, clients, prototypes)
