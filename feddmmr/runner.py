"""The in-process transport: every sampled client trained in this process by one reusable trainer.

The research loop, and the reference the Flower app must match: the round loop is
:func:`feddmmr.engine.loop.run_rounds`; this module only moves the global state to the clients
and their updates back (with the benchmarks' fault injection: dropouts and attacks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, validate_config
from .data.dataset import SequenceDataset
from .engine.assemble import Assembly, LocalClients, assemble, client_seed
from .engine.loop import Reply, RoundResult, run_rounds
from .engine.run_dir import RunDir, run_config_payload
from .federation.client import ClientData, ClientFailure, ClientUpdate, unpack_clients, unpack_surprise
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
              prototypes: torch.Tensor | None, offer: Callable[[Reply], None]) -> RoundResult:
        """Each client's update goes to ``offer`` as its vmapped group finishes; with injected attacks
        (benchmarks) the round's answers are gathered first, since the attackers are drawn among them."""
        config = self.config
        dropped = {int(u): "fault injection (client_dropout)"
                   for u in dropped_clients(users, config.client_dropout, config.seed, round_number)}
        trained = [int(u) for u in users if int(u) not in dropped]
        clients = self.take(trained)
        seeds = [client_seed(config.seed, round_number, u) for u in trained]
        stream = self.trainer.train_stream([clients[u] for u in trained], global_state, seeds, prototypes,
                                           isolate_failures=True)
        answers, info = [], {}
        for index, result in stream:
            user = trained[index]
            if isinstance(result, ClientFailure):
                dropped[user] = result.reason
                continue
            self.remember_surprise(user, self.trainer.surprised_steps.pop(user, None))  # its memory, for later rounds
            if config.attack == "none":
                offer(self.reply(user, result, clients[user]))
                answers.append(user)
            else:
                answers.append((user, result))
        if config.attack != "none":
            answers.sort(key=lambda pair: pair[0])
            poisoned, attackers = inject_attacks([u for _, u in answers], np.array([u for u, _ in answers]),
                                                 global_state, config, round_number)
            for (user, _), update in zip(answers, poisoned):
                offer(self.reply(user, update, clients[user]))
            info = {"attackers": attackers} if attackers else {}
        return RoundResult(len(answers), dict(sorted(dropped.items())), info)

    @staticmethod
    def reply(user: int, update: ClientUpdate, client: ClientData) -> Reply:
        return Reply({"user": user}, [(user, update.state, update.num_samples)],
                     prototypes=[(user, update.prototypes)] if update.prototypes is not None else [],
                     losses=dict(update.metrics), samples=client.num_samples, num_clients=1)


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
        if point is not None and point.clients:  # the surprise trigger's steps (the rest is rebuilt)
            transport.load_surprise(unpack_surprise(point.clients))
    elif point is not None and point.clients:  # the saved memories, not a rebuild (checked by digest)
        clients = unpack_clients(point.clients, assembly.data, config.max_seq_len, assembly.memory_config, assembly.space)
        transport = InProcess(assembly, clients, out_dir / "cache", (point.clients, point.clients_digest))
    else:
        transport = InProcess(assembly, assembly.build_clients(progress=progress), out_dir / "cache")
    run_dir.history["memory_build_seconds"] = round(time.time() - tick, 2)
    return run_rounds(config, assembly.model, transport, run_dir, dp=dp, progress=progress)
