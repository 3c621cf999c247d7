"""Centralized training: every user's training windows pooled on one machine, no federation.

The reference the federated runs are measured against: the same model, the same windows
(and memory snapshots), the same loss and the same evaluation, trained by plain mini-batch
Adam over the pooled data. One "epoch" is one pass over all windows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data.dataset import SequenceDataset
from .evaluation import evaluate, format_metrics
from .federation import checkpoint as ckpt
from .federation.client import build_clients
from .federation.memory import MemoryConfig
from .runner import SELECT_METRIC, eval_memory, final_scores, memory_scorer, plot_history, setup

log = logging.getLogger(__name__)


def run_centralized(config: TrainConfig, data: SequenceDataset, out_dir: Path, epochs: int,
                    features_dir: Path | None = None, init_dir: Path | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fed = setup(config, data, features_dir, init_dir)
    model = fed.model
    memory_config = MemoryConfig.from_train_config(config) if config.use_memory else None
    clients = build_clients(data, config.max_seq_len, memory_config, fed.space, seed=config.seed)
    inputs = np.concatenate([c.inputs for c in clients.values()])
    targets = np.concatenate([c.targets for c in clients.values()])
    memory = np.concatenate([c.memory for c in clients.values()])
    pool = torch.from_numpy(data.occurring_items())
    model.set_trainable(config.transmitted_groups)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    val_memory = eval_memory(clients, "val", data.num_users, config.use_memory)
    ckpt.write_json(out_dir / ckpt.CONFIG_FILE, {
        "train": config.to_dict(), "centralized_epochs": epochs,
        "model": config.model_kwargs(data.num_items, model.visual_dim, model.text_dim),
        "trained_groups": fed.trained_groups, "init": fed.init_dir, "features": fed.feature_meta,
        "data": data.stats(), "select_metric": SELECT_METRIC})
    history: dict = {"rounds": [], "val_metrics": [], "best_round": None, "mode": "centralized"}
    best = -1.0
    for epoch in range(1, epochs + 1):
        tick = time.time()
        losses = pooled_pass(model, optimizer, inputs, targets, memory, fed.content, pool, config, generator)
        train_seconds = time.time() - tick
        model.eval()
        result = evaluate(memory_scorer(model, fed.content, val_memory, None), data, "val", config.eval_protocol,
                          seed=config.seed, max_len=config.max_seq_len, cache_dir=out_dir / "cache",
                          num_negatives=config.eval_negatives)
        history["val_metrics"].append(result)
        history["rounds"].append({"round": epoch, "losses": {"next_item": float(np.mean(losses))},
                                  "train_seconds": round(train_seconds, 3), "val_metrics": result,
                                  "samples": int((targets != 0).sum()),
                                  "seconds": round(time.time() - tick, 3)})
        if result[SELECT_METRIC] > best:
            best = result[SELECT_METRIC]
            history["best_round"], history["best_val"] = epoch, result
            ckpt.save_weights(out_dir / ckpt.MODEL_FILE, model.state_dict(), {"epoch": epoch})
        log.info("epoch %d/%d: loss %.4f, %.1fs | val %s", epoch, epochs, np.mean(losses), train_seconds,
                 format_metrics(result))
        ckpt.write_json(out_dir / ckpt.HISTORY_FILE, history)
    model.load_state_dict(ckpt.load_weights(out_dir / ckpt.MODEL_FILE))
    history["final"] = final_scores(model, fed.content, clients, data, config, None, out_dir / "cache")
    history["total_seconds"] = round(sum(r["seconds"] for r in history["rounds"]), 2)
    ckpt.write_json(out_dir / ckpt.HISTORY_FILE, history)
    plot_history(history, out_dir / "validation_curves.png", "centralized")
    return history


def pooled_pass(model, optimizer: torch.optim.Optimizer, inputs: np.ndarray, targets: np.ndarray,
                memory: np.ndarray, content, pool: torch.Tensor, config: TrainConfig,
                generator: torch.Generator, prototypes: torch.Tensor | None = None) -> list[float]:
    """One shuffled pass of plain mini-batch training over pooled windows; the next-item losses."""
    from .federation.client import catalogue_mask

    model.train()
    order = torch.randperm(len(inputs), generator=generator).numpy()
    losses = []
    catalogue = catalogue_mask(model.num_items, pool)
    full = config.loss == "full_softmax"
    for lo in range(0, len(order), config.batch_size):
        rows = order[lo:lo + config.batch_size]
        negatives = None if full else \
            pool[torch.randint(len(pool), (len(rows), config.num_negatives), generator=generator)]
        memory_visual = memory_text = None
        if config.use_memory:
            memory_visual, memory_text = content.memory(memory[rows], prototypes)
        align = None
        if config.use_memory and config.contrastive_lambda > 0:
            align = torch.from_numpy(np.unique(targets[rows]))
        out = model.losses(torch.from_numpy(inputs[rows]), torch.from_numpy(targets[rows]), negatives,
                           memory_visual, memory_text, align_items=align, objective=config.loss,
                           catalogue=catalogue, gbce_t=config.gbce_t)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["next_item"]))
    return losses
