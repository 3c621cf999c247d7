"""The in-process federation: every client trained in turn by one reusable trainer.

This is the research loop (and the reference the Flower app must match). Per round:
sample clients -> local updates -> (injected attacks, benchmarks only) -> reject invalid updates
-> (clip) -> aggregate -> (prototypes) -> validate -> keep the best.
After the last round the best model is scored once on the test split, both protocols.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig, apply_overrides, validate_config
from .data.dataset import SequenceDataset
from .evaluation import PROTOCOLS, ScoreFn, evaluate, format_metrics
from .federation import checkpoint as ckpt
from .federation.client import (ClientData, ClientFailure, ClientUpdate, ItemContent, LocalTrainer, build_clients,
                               pack_clients, unpack_clients)
from .federation.memory import ItemSpace, MemoryConfig
from .federation.faults import inject_attacks
from .federation.privacy import DifferentialPrivacy
from .federation.server import (ServerOptimizer, TooFewClients, UpdateScreen, aggregate_prototypes, dropped_clients,
                                make_aggregator, sample_clients)
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
    """Train ``config.num_rounds`` rounds, writing the run directory (see checkpoint.py).

    With ``resume`` the run continues exactly from its resume point: a run killed after any
    round ends as the uninterrupted one would. A round aggregates the clients that answered and
    whose updates pass ``check_update``; fewer than ``min_clients`` answers stop the run
    (TooFewClients) with the resume point saved.
    """
    validate_config(config)
    out_dir = Path(out_dir)
    if ckpt.resume_dir(out_dir) is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    dp = DifferentialPrivacy.from_config(config, data.num_users)  # None unless DP mode (may adjust config)
    fed = setup(config, data, features_dir, init_dir)
    model = fed.model
    check_quorum(config, data.num_users)
    run_config = {
        "train": config.to_dict(), "model": config.model_kwargs(data.num_items, model.visual_dim, model.text_dim),
        "trained_groups": fed.trained_groups, "init": fed.init_dir, "features": fed.feature_meta,
        "data": data_info or data.stats(), "data_fingerprint": data.fingerprint(), "select_metric": SELECT_METRIC,
        "versions": {"torch": torch.__version__},
        "privacy": dp.spent(config.num_rounds) if dp else None,
    }
    point = ckpt.load_resume_point(out_dir, run_config) if resume and ckpt.resume_dir(out_dir) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out_dir / ckpt.CONFIG_FILE, run_config)
    memory_config = MemoryConfig.from_train_config(config) if config.use_memory else None
    t0 = time.time()
    if point is not None and point.clients:  # the saved memories, not a rebuild (checked by digest)
        clients = unpack_clients(point.clients, data, config.max_seq_len, memory_config, fed.space)
        packed, digest = point.clients, point.clients_digest
    else:
        clients = build_clients(data, config.max_seq_len, memory_config, fed.space, seed=config.seed,
                                progress=progress)
        packed = pack_clients(clients) or None
        digest = ckpt.array_digest(packed) if packed else None
    memory_seconds = time.time() - t0
    trainer = LocalTrainer(copy.deepcopy(model), config, fed.content, data.occurring_items())
    server_optimizer = make_server_optimizer(config)
    val_memory = eval_memory(clients, "val", data.num_users, config.use_memory)

    history: dict = {"rounds": [], "val_metrics": [], "best_round": None, "best_val": None,
                     "memory_build_seconds": round(memory_seconds, 2)}
    start_round, best_value, prototypes = 1, -1.0, None
    if point is not None:
        model.load_state_dict(point.model)
        server_optimizer.load_state_dict(point.server_optimizer)
        history, start_round, best_value, prototypes = point.history, point.round + 1, point.best_value, point.prototypes
        ckpt.set_rng_state(point.rng)
        log.info("resuming %s after round %d", out_dir, point.round)
    global_state = model.group_state(config.transmitted_groups)

    def save_point(round_number: int, rng: dict) -> None:
        """The resume point: everything needed to continue after ``round_number``."""
        ckpt.write_resume_point(out_dir, ckpt.ResumePoint(
            round_number, model.state_dict(), server_optimizer.state_dict(), prototypes, best_value, history,
            run_config, rng, packed, digest))

    rounds = range(start_round, config.num_rounds + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.num_rounds, initial=start_round - 1, desc=f"stage {config.stage}", unit="round")
    for round_number in rounds:
        rng = ckpt.rng_state()  # as the round starts: saved with the previous round if this one cannot count
        tick = time.time()
        if dp:  # DP mode: Poisson sampling, clipped deltas + Gaussian noise over a fixed denominator
            selected = dp.sample(round_number)
        else:
            selected = sample_clients(data.num_users, config.client_fraction, config.seed, round_number)
        updates, dropped = local_updates(trainer, clients, selected, global_state, prototypes, config, round_number)
        if dropped:
            log.warning("round %d: %d of %d sampled clients dropped: %s", round_number, len(dropped), len(selected),
                        "; ".join(f"user {u}: {why}" for u, why in dropped.items()))
        if len(updates) < min(config.min_clients, len(selected)):  # (a Poisson sample may be smaller)
            save_point(round_number - 1, rng)
            raise TooFewClients(
                f"round {round_number}: {len(updates)} of {len(selected)} sampled clients answered, fewer than "
                f"min_clients={config.min_clients}; the run stopped with its state after round {round_number - 1} "
                f"saved in {out_dir / ckpt.RESUME_DIR}: fix the cause (or lower min_clients) and resume")
        users = np.array([u for u, _ in updates], dtype=np.int64)
        poisoned, attackers = inject_attacks([u for _, u in updates], users, global_state, config, round_number)
        if dp:
            aggregator = dp.aggregator(global_state, round_number)
        else:
            aggregator = make_aggregator(global_state, config.aggregation, config.item_embedding_aggregation,
                                         config.trim_fraction)
        screen = UpdateScreen(global_state, aggregator, config.clip_norm, round_number)
        received, sums = [], {}
        for user, update in zip(users, poisoned):
            if not screen.offer(user, update.state, update.num_samples):
                continue  # never aggregated
            if update.prototypes is not None:
                received.append(update.prototypes)
            for key, value in update.metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        rejected, clipped, accepted = screen.rejected, screen.clipped, screen.accepted
        global_state = server_optimizer.step(global_state, screen.result())
        trainer.load_global(global_state)
        with torch.no_grad():
            own = model.state_dict()
            for key, value in global_state.items():
                own[key].copy_(value)
        if config.use_memory and config.use_prototypes:
            centers = aggregate_prototypes(received, config.num_global_prototypes, config.seed + round_number)
            prototypes = torch.from_numpy(centers) if centers is not None else prototypes
        train_seconds = time.time() - tick
        entry = {"round": round_number, "clients": len(updates),
                 "samples": int(sum(clients[u].num_samples for u, _ in updates)),
                 "losses": {k: v / max(accepted, 1) for k, v in sums.items()},
                 "gate": float(model.gating_weight.detach()), "train_seconds": round(train_seconds, 3),
                 "dropped": sorted(dropped)}
        if dropped:
            entry["drop_reasons"] = {str(u): why for u, why in sorted(dropped.items())}
        if rejected:
            entry["rejected"] = rejected
        if config.clip_norm > 0:
            entry["clipped"] = int(clipped)
        if attackers:
            entry["attackers"] = attackers  # injected faults (benchmarks/tests only)
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
                    ckpt.save_array(out_dir / ckpt.BEST_PROTOTYPES_FILE, prototypes.numpy())
        entry["seconds"] = round(train_seconds + entry.get("eval_seconds", 0.0), 3)
        history["rounds"].append(entry)
        summary = (f"round {round_number}/{config.num_rounds}: {len(updates)} clients, "
                   f"loss {entry['losses'].get('next_item', float('nan')):.4f}, gate {entry['gate']:.4f}, "
                   f"{train_seconds:.1f}s train")
        if dropped:
            summary += f", {len(dropped)} dropped"
        if rejected:
            summary += f", {len(rejected)} update(s) rejected"
        if "val_metrics" in entry:
            summary += " | val " + format_metrics(entry["val_metrics"])
        if dp:
            summary += f" | eps {entry['privacy']['epsilon']:.3g}"
        if bar is not None:
            bar.update(1)
            bar.write(summary)
        else:
            log.info(summary)
        save_point(round_number, ckpt.rng_state())
        ckpt.write_json(out_dir / ckpt.HISTORY_FILE, history)
    if bar is not None:
        bar.close()

    # test once, on the best model, both protocols (validation too, for the report)
    model.load_state_dict(ckpt.load_weights(out_dir / ckpt.MODEL_FILE))
    model.eval()
    best_prototypes = None
    if (out_dir / ckpt.BEST_PROTOTYPES_FILE).exists():
        best_prototypes = torch.from_numpy(load_npy(out_dir / ckpt.BEST_PROTOTYPES_FILE, kind="f", ndim=2))
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


def check_quorum(config: TrainConfig, num_users: int) -> None:
    """``min_clients`` must be reachable: at most the number of clients sampled per round."""
    sampled = len(sample_clients(num_users, config.client_fraction, config.seed, 1))
    if config.min_clients > sampled:
        raise ConfigError(f"min_clients={config.min_clients} exceeds the {sampled} clients sampled per round "
                          f"(client_fraction={config.client_fraction} of {num_users} users)")


def local_updates(trainer: LocalTrainer, clients: dict[int, ClientData], selected: np.ndarray,
                  global_state: dict[str, torch.Tensor], prototypes: torch.Tensor | None, config: TrainConfig,
                  round_number: int) -> tuple[list[tuple[int, ClientUpdate]], dict[int, str]]:
    """The round's answers as (user, update), users ascending, and the dropped users with why.

    Dropped: the ``client_dropout`` fault injection (those clients do not train) and every
    client whose local training raised (see ``LocalTrainer.train_many``)."""
    dropped = {int(u): "fault injection (client_dropout)"
               for u in dropped_clients(selected, config.client_dropout, config.seed, round_number)}
    users = [int(u) for u in selected if int(u) not in dropped]
    results = trainer.train_many([clients[u] for u in users], global_state,
                                 [client_seed(config.seed, round_number, u) for u in users], prototypes,
                                 isolate_failures=True)
    updates = []
    for user, result in zip(users, results):
        if isinstance(result, ClientFailure):
            dropped[user] = result.reason
        else:
            updates.append((user, result))
    return updates, dict(sorted(dropped.items()))


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
    """The clients' memories, in the resume point's layout (:func:`pack_clients`: one format on disk)."""
    arrays = pack_clients(clients)
    if arrays:
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
    config = apply_overrides(TrainConfig(), saved["train"], str(run_dir / ckpt.CONFIG_FILE))
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
    if (run_dir / ckpt.BEST_PROTOTYPES_FILE).exists():
        prototypes = torch.from_numpy(load_npy(run_dir / ckpt.BEST_PROTOTYPES_FILE, kind="f", ndim=2))
    return TrainedRun(model, config, content, clients, prototypes)
