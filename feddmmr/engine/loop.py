"""The one round loop, for every transport.

Per round: sample clients -> train them through the transport -> quorum -> screen each update
(check, clip) -> aggregate -> server step -> prototypes -> validate -> record. After the last
round the best model is scored once, on both splits under both protocols.

A transport moves the global state to the clients and their updates back: in one process
(:mod:`feddmmr.runner`) or over Flower's Grid (:mod:`feddmmr.flower.server_app`). It answers a
round with :class:`RoundResult` and scores a model with the one evaluation loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..config import TrainConfig
from ..evaluation import FINAL_REQUESTS, VALIDATION_BATCH, format_metrics
from ..federation import checkpoint as ckpt
from ..federation.privacy import DifferentialPrivacy
from ..federation.server import TooFewClients, UpdateScreen, aggregate_prototypes, make_aggregator, sample_clients
from ..heap import release_free_heap
from ..models import UR4RecV2MoE
from .assemble import make_server_optimizer
from .run_dir import RunDir

log = logging.getLogger(__name__)

Requests = list[tuple[str, str, int]]  # (split, protocol, users per batch)


@dataclass
class Reply:
    """One answer to a round's train request: a client's update, or a node's partition of clients.

    Either ``clients`` (each client's ``(user, state, samples)``, screened one by one) or ``sums``
    (a pre-aggregated partition: ``(sums, row_weight, total)``, screened as a whole)."""

    source: dict  # names the reply in rejection records: {"user": u}, {"partition": p}, ...
    clients: list[tuple[int, dict[str, torch.Tensor], int]] = field(default_factory=list)
    sums: tuple[dict[str, torch.Tensor], torch.Tensor | None, float] | None = None
    prototypes: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (user, centroids)
    losses: dict[str, float] = field(default_factory=dict)  # summed over the reply's clients
    samples: int = 0
    num_clients: int = 0


@dataclass
class RoundResult:
    """What came back from a round's sampled clients (their replies went to ``offer`` as they came)."""

    arrived: int  # sampled clients whose updates arrived
    dropped: dict[int, str]  # user -> why their update did not arrive
    info: dict = field(default_factory=dict)  # recorded in the round's history entry (e.g. injected attackers)


class Transport(Protocol):
    num_users: int

    def train(self, round_number: int, users: np.ndarray, global_state: dict[str, torch.Tensor],
              prototypes: torch.Tensor | None, offer: Callable[[Reply], None]) -> RoundResult:
        """Train ``users`` from ``global_state``; hand each reply to ``offer`` as soon as it exists
        (the server aggregates while the round runs, never holding every update at once)."""
        ...

    def evaluate(self, model: UR4RecV2MoE, prototypes: torch.Tensor | None, requests: Requests,
                 tag: int | str, users: np.ndarray | None = None) -> list[dict]:
        """One result per request, over every user (or ``users``)."""
        ...

    def memory(self) -> tuple[dict[str, np.ndarray], str] | None:
        """The clients' packed memories and their digest, when the server holds them (in-process)."""
        ...

    def summary(self) -> dict:
        """What the transport adds to the history at the end (e.g. Flower's waves)."""
        ...


def run_rounds(config: TrainConfig, model: UR4RecV2MoE, transport: Transport, run_dir: RunDir, *,
               dp: DifferentialPrivacy | None = None, progress: bool = False,
               say: Callable[[str], None] = log.info, title: str = "") -> dict:
    """Train ``config.num_rounds`` rounds (from the resume point, if any); the finished history."""
    server_optimizer = make_server_optimizer(config)
    start_round, prototypes = run_dir.restore(model, server_optimizer)
    global_state = model.group_state(config.transmitted_groups)
    validation_users = validation_sample(config, transport.num_users)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.num_rounds, initial=start_round - 1, desc=f"stage {config.stage}", unit="round")
        say = bar.write
    for round_number in range(start_round, config.num_rounds + 1):
        rng = ckpt.rng_state()  # as the round starts: saved with the previous round if this one cannot count
        tick = time.time()
        if dp:  # DP mode: Poisson sampling, clipped deltas + Gaussian noise over a fixed denominator
            selected = dp.sample(round_number)
        else:
            selected = sample_clients(transport.num_users, config.client_fraction, config.seed, round_number,
                                      config.clients_per_round)
        if dp:
            aggregator = dp.aggregator(global_state, round_number)
        else:
            aggregator = make_aggregator(global_state, config.aggregation, config.item_embedding_aggregation,
                                         config.trim_fraction)
        screen, counted = UpdateScreen(global_state, aggregator, config.clip_norm, round_number), Counted()
        result = transport.train(round_number, selected, global_state, prototypes,
                                 lambda reply: counted.offer(screen, reply))
        if result.dropped:
            log.warning("round %d: %d of %d sampled clients dropped: %s", round_number, len(result.dropped),
                        len(selected), "; ".join(f"user {u}: {why}" for u, why in result.dropped.items()))
        if result.arrived < min(config.min_clients, len(selected)):  # (a Poisson sample may be smaller)
            run_dir.save_point(round_number - 1, model, server_optimizer, prototypes, rng, transport.memory())
            reasons = [f"user {u}: {why}" for u, why in result.dropped.items()]
            dropped = "; ".join(reasons[:5]) + (f"; ... ({len(reasons)} in all)" if len(reasons) > 5 else "")
            raise TooFewClients(
                f"round {round_number}: the updates of {result.arrived} of {len(selected)} sampled clients arrived, "
                f"fewer than min_clients={config.min_clients} (dropped: {dropped or 'none'}); the run stopped "
                f"with its state after round "
                f"{round_number - 1} saved in {run_dir.out_dir / ckpt.RESUME_DIR}: fix the cause (or lower "
                "min_clients) and resume")
        release_free_heap()
        global_state = server_optimizer.step(global_state, screen.result(), round_number)
        model.copy_state_(global_state)
        prototypes = merge_prototypes(config, counted.prototypes, round_number, prototypes)
        entry = round_entry(config, round_number, result, counted, screen, model, time.time() - tick)
        if dp:
            entry["privacy"] = {**dp.spent(round_number), **aggregator.stats()}
        if round_number % config.eval_every == 0 or round_number == config.num_rounds:
            tick = time.time()
            model.eval()
            val = transport.evaluate(model, prototypes, [("val", config.eval_protocol, VALIDATION_BATCH)],
                                     round_number, users=validation_users)[0]
            release_free_heap()
            run_dir.validated(entry, val, time.time() - tick, model, prototypes)
        entry["seconds"] = round(entry["train_seconds"] + entry.get("eval_seconds", 0.0), 3)
        run_dir.end_round(entry, model, server_optimizer, prototypes, transport.memory())
        if bar is not None:
            bar.update(1)
        say(round_summary(entry, config.num_rounds))
    if bar is not None:
        bar.close()
    return finish(config, model, transport, run_dir, dp, title)


def validation_sample(config: TrainConfig, num_users: int) -> np.ndarray | None:
    """The users every round is validated on: all (None), or ``eval_users`` of them, one seeded draw
    for the whole run so that rounds compare on the same users."""
    return _user_sample(config.seed, 0xE7A1, config.eval_users, num_users)


def final_sample(config: TrainConfig, num_users: int) -> np.ndarray | None:
    """The users the final scores cover: all (None), or ``final_users`` of them (one seeded draw)."""
    return _user_sample(config.seed, 0xF1A1, config.final_users, num_users)


def _user_sample(seed: int, salt: int, count: int, num_users: int) -> np.ndarray | None:
    if not 0 < count < num_users:
        return None
    return np.sort(np.random.default_rng([seed, salt]).choice(num_users, count, replace=False))


@dataclass
class Counted:
    """The replies that passed the screen: their prototypes, summed losses, samples and clients."""

    prototypes: list[tuple[int, np.ndarray]] = field(default_factory=list)
    losses: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    clients: int = 0

    def offer(self, screen: UpdateScreen, reply: Reply) -> None:
        """Offer ``reply`` to the screen; count what it accepted (a rejected update adds nothing)."""
        if reply.sums is not None:
            if not screen.offer_sum(reply.source, *reply.sums):
                return
            accepted = None  # the whole partition
        else:
            accepted = {user for user, state, samples in reply.clients if screen.offer(user, state, samples)}
            if not accepted:
                return
        self.prototypes += [(u, p) for u, p in reply.prototypes if accepted is None or u in accepted]
        for key, value in reply.losses.items():
            self.losses[key] = self.losses.get(key, 0.0) + value
        self.samples += reply.samples
        self.clients += reply.num_clients


def merge_prototypes(config: TrainConfig, received: list[tuple[int, np.ndarray]], round_number: int,
                     current: torch.Tensor | None) -> torch.Tensor | None:
    """The next global prototypes: K-Means over the users' centroids, in ascending user order."""
    if not (config.use_memory and config.use_prototypes):
        return current
    ordered = [protos for _, protos in sorted(received, key=lambda pair: pair[0])]
    centers = aggregate_prototypes(ordered, config.num_global_prototypes, config.seed + round_number)
    return torch.from_numpy(centers) if centers is not None else current


def round_entry(config: TrainConfig, round_number: int, result: RoundResult, counted: Counted,
                screen: UpdateScreen, model: UR4RecV2MoE, train_seconds: float) -> dict:
    """A round of ``train_history.json``."""
    entry = {"round": round_number, "clients": int(result.arrived), "samples": int(counted.samples),
             "losses": {k: v / max(counted.clients, 1) for k, v in counted.losses.items()},
             "gate": float(model.gating_weight.detach()), "train_seconds": round(train_seconds, 3),
             "dropped": sorted(result.dropped)}
    if result.dropped:
        entry["drop_reasons"] = {str(u): why for u, why in sorted(result.dropped.items())}
    if screen.rejected:
        entry["rejected"] = screen.rejected
    if config.clip_norm > 0:
        entry["clipped"] = int(screen.clipped)
    entry.update(result.info)
    return entry


def round_summary(entry: dict, num_rounds: int) -> str:
    """One log line per round."""
    summary = (f"round {entry['round']}/{num_rounds}: {entry['clients']} clients, "
               f"loss {entry['losses'].get('next_item', float('nan')):.4f}, gate {entry['gate']:.4f}, "
               f"{entry['train_seconds']:.1f}s train")
    if entry["dropped"]:
        summary += f", {len(entry['dropped'])} dropped"
    if entry.get("rejected"):
        summary += f", {len(entry['rejected'])} update(s) rejected"
    if "val_metrics" in entry:
        summary += " | val " + format_metrics(entry["val_metrics"])
    if "privacy" in entry:
        summary += f" | eps {entry['privacy']['epsilon']:.3g}"
    return summary


def finish(config: TrainConfig, model: UR4RecV2MoE, transport: Transport, run_dir: RunDir,
           dp: DifferentialPrivacy | None, title: str) -> dict:
    """Score the best round once on both splits under both protocols; close the run directory.
    The results go to stdout."""
    prototypes = run_dir.load_best(model)
    tick = time.time()
    users = final_sample(config, transport.num_users)
    results = transport.evaluate(model, prototypes, list(FINAL_REQUESTS), "final", users=users)
    final = {f"{split}_{protocol}": result for (split, protocol, _), result in zip(FINAL_REQUESTS, results)}
    extra = {}
    if config.new_item_channel != "off" and config.cold_item_fraction > 0:  # in-process only (Flower refuses it)
        channel = transport.new_item_channel(model, prototypes, users)
        if channel is not None:
            results = transport.evaluate(model, prototypes, list(FINAL_REQUESTS), "final", users=users,
                                         channel=channel)
            extra["new_item_channel"] = {**channel.summary(), "final_without_channel": final}
            final = {f"{split}_{protocol}": result for (split, protocol, _), result in zip(FINAL_REQUESTS, results)}
    extra.update({"final_seconds": round(time.time() - tick, 3), **transport.summary()})
    if dp:
        extra["privacy"] = dp.spent(config.num_rounds)
        print(dp.describe(config.num_rounds), flush=True)
    memory = transport.memory()
    history = run_dir.finish(final, title or f"stage {config.stage} ({config.preset})", extra,
                             memory[0] if memory else None)
    for key in ("test_sampled", "test_full"):
        print(f"best round {history['best_round']} " + format_metrics(final[key]), flush=True)
    return history
