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
from .data.dataset import SequenceDataset, trim_padding
from .engine.assemble import LocalClients, assemble
from .engine.loop import finish
from .engine.run_dir import RunDir, run_config_payload
from .evaluation import VALIDATION_BATCH, format_metrics
from .federation.client import learning_rates, pool_top_k

log = logging.getLogger(__name__)


def run_centralized(config: TrainConfig, data: SequenceDataset, out_dir: Path, epochs: int,
                    features_dir: Path | None = None, init_dir: Path | None = None) -> dict:
    """Train ``epochs`` passes over the pooled windows; the run directory as a federated run writes it
    (one epoch per round entry, no resume point)."""
    out_dir = Path(out_dir)
    if config.surprise_trigger:
        raise ValueError("config key 'surprise_trigger' needs clients whose memories persist between rounds; the "
                         "centralized reference pools every window into one training set: set it to false")
    assembly = assemble(config, data, features_dir, init_dir)
    model = assembly.model
    clients = assembly.build_clients()
    inputs = np.concatenate([c.inputs for c in clients.values()])
    targets = np.concatenate([c.targets for c in clients.values()])
    memory = np.concatenate([c.memory for c in clients.values()])
    pool = torch.from_numpy(assembly.data.warm_items())
    model.set_trainable(config.transmitted_groups)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rates = learning_rates([n for n, _ in trained], config)
    optimizer = torch.optim.Adam([{"params": [p for n, p in trained if rates[n] == lr], "lr": lr}
                                  for lr in sorted(set(rates.values()))], weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    local = LocalClients(assembly, clients, out_dir / "cache")
    run_dir = RunDir(out_dir, resume_points=False)
    run_dir.start(run_config_payload(config, assembly, data.stats(), centralized_epochs=epochs), mode="centralized")
    for epoch in range(1, epochs + 1):
        tick = time.time()
        losses = pooled_pass(model, optimizer, inputs, targets, memory, assembly.content, pool, config, generator)
        entry = {"round": epoch, "losses": {"next_item": float(np.mean(losses))},
                 "train_seconds": round(time.time() - tick, 3), "samples": int((targets != 0).sum())}
        tick = time.time()
        result = local.evaluate(model, None, [("val", config.eval_protocol, VALIDATION_BATCH)])[0]
        run_dir.validated(entry, result, time.time() - tick, model, None)
        entry["seconds"] = round(entry["train_seconds"] + entry["eval_seconds"], 3)
        run_dir.end_round(entry, model, None, None)
        log.info("epoch %d/%d: loss %.4f, %.1fs | val %s", epoch, epochs, np.mean(losses), entry["train_seconds"],
                 format_metrics(result))
    return finish(config, model, local, run_dir, None, "centralized")


def pooled_pass(model, optimizer: torch.optim.Optimizer, inputs: np.ndarray, targets: np.ndarray,
                memory: np.ndarray, content, pool: torch.Tensor, config: TrainConfig,
                generator: torch.Generator, prototypes: torch.Tensor | None = None) -> list[float]:
    """One shuffled pass of plain mini-batch training over pooled windows; the next-item losses.

    Batches are made on the model's device; the order and the negatives are drawn on the CPU from
    ``generator`` (``pool`` stays there), so every device draws the same numbers."""
    from .federation.client import catalogue_mask

    model.train()
    device = model.device
    order = torch.randperm(len(inputs), generator=generator, device=generator.device).numpy()
    losses = []
    catalogue = catalogue_mask(model.num_items, pool, device)
    full = config.loss == "full_softmax"
    for lo in range(0, len(order), config.batch_size):
        rows = order[lo:lo + config.batch_size]
        negatives = None if full else \
            pool[torch.randint(len(pool), (len(rows), config.num_negatives), generator=generator,
                               device=generator.device)].to(device)
        memory_visual = memory_text = memory_pool = None
        if config.use_memory:
            memory_visual, memory_text, memory_pool = content.pooled_memory(memory[rows], prototypes, device,
                                                                            pool_top_k(config))
        align = None
        if config.use_memory and config.contrastive_lambda > 0:
            align = torch.from_numpy(np.unique(targets[rows])).to(device)
        width = trim_padding(inputs[rows])
        out = model.losses(torch.from_numpy(inputs[rows, -width:]).to(device),
                           torch.from_numpy(targets[rows, -width:]).to(device), negatives, memory_visual, memory_text,
                           align_items=align, objective=config.loss, catalogue=catalogue, gbce_t=config.gbce_t,
                           memory_pool=memory_pool)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["next_item"]))
    return losses
