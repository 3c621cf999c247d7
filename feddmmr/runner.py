"""The in-process transport: every sampled client trained in this process by one reusable trainer.

The research loop, and the reference the Flower app must match: the round loop is
:func:`feddmmr.engine.loop.run_rounds`; this module only moves the global state to the clients
and their updates back (with the benchmarks' fault injection: dropouts and attacks).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, validate_config
from .data.dataset import SequenceDataset
from .engine.assemble import Assembly, LocalClients, assemble, client_seed
from .engine.loop import Reply, RoundResult, run_rounds
from .engine.run_dir import RunDir, run_config_payload
from .federation.client import ClientData, ClientFailure, ClientUpdate, unpack_clients
from .federation.faults import inject_attacks
from .federation.privacy import DifferentialPrivacy
from .federation.server import dropped_clients


class InProcess(LocalClients):
    """Trains a round's clients here, in groups under one vmapped step (``LocalTrainer.train_many``)."""

    def __init__(self, assembly: Assembly, clients: dict[int, ClientData], cache_dir: Path,
                 packed: tuple[dict[str, np.ndarray], str] | None = None):
        super().__init__(assembly, clients, cache_dir, packed)
        self.config = assembly.config
        self.trainer = assembly.trainer()

    def train(self, round_number: int, users: np.ndarray, global_state: dict[str, torch.Tensor],
              prototypes: torch.Tensor | None) -> RoundResult:
        clients = self.take([int(u) for u in users])
        updates, dropped = self.local_updates(clients, round_number, users, global_state, prototypes)
        answered = np.array([u for u, _ in updates], dtype=np.int64)
        poisoned, attackers = inject_attacks([u for _, u in updates], answered, global_state, self.config,
                                             round_number)
        replies = [Reply({"user": int(user)}, [(int(user), update.state, update.num_samples)],
                         prototypes=[(int(user), update.prototypes)] if update.prototypes is not None else [],
                         losses=dict(update.metrics), samples=clients[int(user)].num_samples, num_clients=1)
                   for user, update in zip(answered, poisoned)]
        return RoundResult(replies, len(updates), dropped, {"attackers": attackers} if attackers else {})

    def local_updates(self, clients: dict[int, ClientData], round_number: int, selected: np.ndarray,
                      global_state: dict[str, torch.Tensor], prototypes: torch.Tensor | None
                      ) -> tuple[list[tuple[int, ClientUpdate]], dict[int, str]]:
        """The round's answers as (user, update), users ascending, and the dropped users with why.

        Dropped: the ``client_dropout`` fault injection (those clients do not train) and every
        client whose local training raised (see ``LocalTrainer.train_many``)."""
        config = self.config
        dropped = {int(u): "fault injection (client_dropout)"
                   for u in dropped_clients(selected, config.client_dropout, config.seed, round_number)}
        users = [int(u) for u in selected if int(u) not in dropped]
        results = self.trainer.train_many([clients[u] for u in users], global_state,
                                          [client_seed(config.seed, round_number, u) for u in users], prototypes,
                                          isolate_failures=True)
        updates = []
        for user, result in zip(users, results):
            if isinstance(result, ClientFailure):
                dropped[user] = result.reason
            else:
                updates.append((user, result))
        return updates, dict(sorted(dropped.items()))


def run_federated(config: TrainConfig, data: SequenceDataset, out_dir: Path, features_dir: Path | None = None,
                  init_dir: Path | None = None, resume: bool = False, progress: bool = True,
                  data_info: dict | None = None) -> dict:
    """Train ``config.num_rounds`` rounds in this process, writing the run directory.

    With ``resume`` the run continues exactly from its resume point: a run killed after any
    round ends as the uninterrupted one would. Fewer than ``min_clients`` answers in a round
    stop the run (TooFewClients) with the resume point saved.
    """
    validate_config(config, num_users=data.num_users)
    out_dir = Path(out_dir)
    run_dir = RunDir(out_dir, resume)
    dp = DifferentialPrivacy.from_config(config, data.num_users)
    assembly = assemble(config, data, features_dir, init_dir)
    payload = run_config_payload(config, assembly, data_info or data.stats(),
                                 privacy=dp.spent(config.num_rounds) if dp else None)
    point = run_dir.start(payload)
    tick = time.time()
    if not config.resident_clients:
        transport = InProcess.on_demand(assembly, out_dir / "cache")
    elif point is not None and point.clients:  # the saved memories, not a rebuild (checked by digest)
        clients = unpack_clients(point.clients, data, config.max_seq_len, assembly.memory_config, assembly.space)
        transport = InProcess(assembly, clients, out_dir / "cache", (point.clients, point.clients_digest))
    else:
        transport = InProcess(assembly, assembly.build_clients(progress=progress), out_dir / "cache")
    run_dir.history["memory_build_seconds"] = round(time.time() - tick, 2)
    return run_rounds(config, assembly.model, transport, run_dir, dp=dp, progress=progress)
