"""The server side: client sampling, aggregation of updates and of memory prototypes."""

from __future__ import annotations

import numpy as np
import torch

from .memory import kmeans

ITEM_EMBEDDING_KEY = "sasrec.item_emb.weight"


def sample_clients(num_clients: int, fraction: float, seed: int, round_number: int) -> np.ndarray:
    """The clients of a round: a seeded draw, reproducible from (seed, round) alone."""
    if not 0 < fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {fraction}")
    count = max(1, int(round(fraction * num_clients)))
    rng = np.random.default_rng([seed, round_number])
    return np.sort(rng.choice(num_clients, size=count, replace=False))


def dropped_clients(selected: np.ndarray, fraction: float, seed: int, round_number: int) -> np.ndarray:
    """Fault injection: ``round(fraction * len(selected))`` of a round's clients fail, a seeded draw from (seed, round)."""
    count = int(round(fraction * len(selected)))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, round_number, 1])  # a stream of its own: sampling stays unchanged
    return np.sort(rng.choice(np.asarray(selected, dtype=np.int64), size=count, replace=False))


class TooFewClients(RuntimeError):
    """Fewer clients answered a round than ``min_clients``: the round does not count."""


class Aggregator:
    """FedAvg weighted by sample count, accumulated one update at a time (no stacking).

    With ``updated_rows`` each item-embedding row is averaged over the clients that changed
    it (a client that never saw an item does not pull its row back toward the old value);
    rows no client changed keep their global value.
    """

    def __init__(self, global_state: dict[str, torch.Tensor], item_embedding_aggregation: str = "updated_rows"):
        if item_embedding_aggregation not in ("updated_rows", "fedavg"):
            raise ValueError(f"unknown item_embedding_aggregation {item_embedding_aggregation!r}")
        self.global_state, self.mode = global_state, item_embedding_aggregation
        self.sums: dict[str, torch.Tensor] = {}
        self.row_weight: torch.Tensor | None = None
        self.total = 0.0

    def add(self, state: dict[str, torch.Tensor], num_samples: int) -> None:
        weight = float(num_samples)
        if weight <= 0:
            return
        self.total += weight
        for key, value in state.items():
            value = value.double()
            if key == ITEM_EMBEDDING_KEY and self.mode == "updated_rows":
                changed = (value != self.global_state[key].double()).any(-1).double() * weight
                value = value * changed[:, None]
                self.row_weight = changed if self.row_weight is None else self.row_weight + changed
            else:
                value = value * weight
            self.sums[key] = value if key not in self.sums else self.sums[key] + value

    def partial(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
        """The running sums, so a node serving many clients can send one pre-aggregated update."""
        return self.sums, self.row_weight, self.total

    def merge(self, sums: dict[str, torch.Tensor], row_weight: torch.Tensor | None, total: float) -> None:
        """Add another aggregator's :meth:`partial` (sums are linear, so the result is the same)."""
        if total <= 0:
            return
        self.total += float(total)
        for key, value in sums.items():
            value = value.double()
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        if row_weight is not None:
            row_weight = row_weight.double()
            self.row_weight = row_weight if self.row_weight is None else self.row_weight + row_weight

    def result(self) -> dict[str, torch.Tensor]:
        if self.total <= 0:
            raise ValueError("no client reported a positive sample count")
        out = {}
        for key, total in self.sums.items():
            dtype = self.global_state[key].dtype
            if key == ITEM_EMBEDDING_KEY and self.mode == "updated_rows":
                rows = self.row_weight
                mean = total / rows.clamp_min(1e-12)[:, None]
                out[key] = torch.where(rows[:, None] > 0, mean, self.global_state[key].double()).to(dtype)
            else:
                out[key] = (total / self.total).to(dtype)
        return out


def aggregate(global_state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], int]],
              item_embedding_aggregation: str = "updated_rows") -> dict[str, torch.Tensor]:
    """Aggregate a list of (state, num_samples); see :class:`Aggregator`."""
    aggregator = Aggregator(global_state, item_embedding_aggregation)
    for state, count in updates:
        aggregator.add(state, count)
    return aggregator.result()


def aggregate_prototypes(prototypes: list[np.ndarray], count: int, seed: int) -> np.ndarray | None:
    """Cluster the clients' centroids into a global abstract memory ``[count, D]`` (unit rows)."""
    points = [p for p in prototypes if p is not None and len(p)]
    if not points or count <= 0:
        return None
    centers = kmeans(np.concatenate(points), count, seed)
    return centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)


class ServerOptimizer:
    """How the server applies the clients' mean update ``delta = mean(w_c) - w``.

    ``fedavg`` takes the mean as is; ``fedavgm`` adds server momentum and ``fedadam`` an
    adaptive server step (Reddi et al., "Adaptive Federated Optimization", ICLR 2021). With
    many clients doing few local steps each, momentum lets progress accumulate across rounds.
    """

    KINDS = ("fedavg", "fedavgm", "fedadam")

    def __init__(self, kind: str = "fedavg", learning_rate: float = 1.0, momentum: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if kind not in self.KINDS:
            raise ValueError(f"unknown server_optimizer {kind!r}; choose one of {self.KINDS}")
        self.kind, self.lr, self.momentum, self.beta2, self.tau = kind, learning_rate, momentum, beta2, tau
        self.state: dict[str, torch.Tensor] = {}

    def step(self, global_state: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.kind == "fedavg" and self.lr == 1.0:
            return mean_state
        out = {}
        for key, mean in mean_state.items():
            delta = mean.double() - global_state[key].double()
            if self.kind == "fedavg":
                step = delta
            elif self.kind == "fedavgm":
                moment = self.momentum * self.state.get("m." + key, torch.zeros_like(delta)) + delta
                self.state["m." + key] = moment
                step = moment
            else:
                first = self.momentum * self.state.get("m." + key, torch.zeros_like(delta)) + (1 - self.momentum) * delta
                second = self.beta2 * self.state.get("v." + key, torch.zeros_like(delta)) + (1 - self.beta2) * delta ** 2
                self.state["m." + key], self.state["v." + key] = first, second
                step = first / (second.sqrt() + self.tau)
            out[key] = (global_state[key].double() + self.lr * step).to(global_state[key].dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact (float64) moments: a resumed run must step exactly as the uninterrupted one."""
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.double() for k, v in state.items()}
