"""The server side: client sampling, update validation and clipping, aggregation of updates
(FedAvg or a robust coordinate-wise rule) and of memory prototypes.

Per round the server (``runner.run_federated``, and the Flower ServerApp when its nodes send
each client's update) takes each client update through :class:`UpdateScreen`: :func:`check_update`
(rejected updates are logged, never aggregated), then :func:`clip_update` when ``clip_norm > 0``,
then the aggregator of ``aggregation`` (:func:`make_aggregator`); then :class:`ServerOptimizer`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..config import AGGREGATIONS, round_size
from .memory import kmeans

ITEM_EMBEDDING_KEY = "sasrec.item_emb.weight"
ROBUST = ("trimmed_mean", "median")

log = logging.getLogger(__name__)


def sample_clients(num_clients: int, fraction: float, seed: int, round_number: int, count: int = 0) -> np.ndarray:
    """The clients of a round: a seeded draw, reproducible from (seed, round) alone."""
    if not 0 < fraction <= 1:
        raise ValueError(f"client_fraction must be in (0, 1], got {fraction}")
    count = round_size(num_clients, fraction, count)
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



# --------------------------------------------------------------------------- screening updates

def check_update(global_state: dict[str, torch.Tensor], state, num_samples=None) -> str | None:
    """Why a client update must be rejected, or None if it is acceptable.

    The one validity check of the server: the same keys as the global state, each a floating-point
    tensor of the global shape with only finite values, and (if given) a finite sample count >= 0.
    A single NaN would otherwise poison every weighted mean it enters.
    """
    if not isinstance(state, dict):
        return f"update is a {type(state).__name__}, not a dict of tensors"
    missing = sorted(set(global_state) - set(state))
    if missing:
        return f"missing key(s) {missing}"
    extra = sorted(set(state) - set(global_state))
    if extra:
        return f"unexpected key(s) {extra}"
    for key, reference in global_state.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{key}: a {type(value).__name__}, not a tensor"
        if not value.is_floating_point():
            return f"{key}: dtype {value.dtype}, expected a floating-point tensor"
        if value.shape != reference.shape:
            return f"{key}: shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        if not bool(torch.isfinite(value).all()):  # counted only when there is something to count
            return f"{key}: {int((~torch.isfinite(value)).sum())} non-finite value(s) (NaN/Inf)"
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(num_samples)) or num_samples < 0:
            return f"num_samples {num_samples!r}: expected a finite number >= 0"
    return None


def update_norm(global_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    """L2 norm of the update delta ``state - global_state`` over all of ``state``'s tensors (float64)."""
    total = 0.0
    for key, value in state.items():
        total += float(((value.double() - global_state[key].double()) ** 2).sum())
    return math.sqrt(total)


def clip_update(global_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """``state`` with its delta scaled down to L2 norm <= ``clip_norm``; also the norm before clipping.

    The one clipping function (norm clipping before aggregation, and the clipping step of a
    differential-privacy mode). The norm is taken jointly over every transmitted tensor; a delta
    already within the bound is returned unchanged (the same object). Rows the client did not
    change stay bit-identical, so ``updated_rows`` still sees which item rows it touched.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = update_norm(global_state, state)
    if norm <= clip_norm:
        return state, norm
    scale = clip_norm / norm
    out = {}
    for key, value in state.items():
        reference = global_state[key].double()
        out[key] = (reference + (value.double() - reference) * scale).to(value.dtype)
    return out, norm


class UpdateScreen:
    """The server's gate in front of an aggregator: each client update is checked, clipped, added.

    The one per-client path of a round, shared by the in-process runner and the Flower ServerApp,
    so both reject, clip and count the same way.
    """

    def __init__(self, global_state: dict[str, torch.Tensor], aggregator, clip_norm: float = 0.0,
                 round_number: int | None = None):
        self.global_state, self.aggregator, self.clip_norm, self.round = global_state, aggregator, clip_norm, round_number
        self.rejected: list[dict] = []
        self.clipped = 0
        self.accepted = 0

    def offer(self, user: int, state, num_samples) -> bool:
        """Add ``state`` to the aggregate if it is a valid update (clipped first); False if rejected."""
        reason = check_update(self.global_state, state, num_samples)
        if reason is not None:
            self.rejected.append({"user": int(user), "reason": reason})
            log.warning("round %s: rejected the update of user %d: %s", self.round, int(user), reason)
            return False
        if self.clip_norm > 0:
            state, norm = clip_update(self.global_state, state, self.clip_norm)
            self.clipped += norm > self.clip_norm
        self.aggregator.add(state, num_samples)
        self.accepted += 1
        return True

    def offer_sum(self, source: dict, sums: dict[str, torch.Tensor], row_weight: torch.Tensor | None,
                  total: float) -> bool:
        """Merge a pre-aggregated sum (a Flower node's partition, FedAvg only) if it is valid; ``source``
        names it in the rejection record (e.g. ``{"partition": 2}``). Empty sums (no samples) pass."""
        if total <= 0:
            return True
        reason = check_update(self.global_state, sums)
        if reason is not None:
            self.rejected.append({**source, "reason": reason})
            log.warning("round %s: rejected the update of %s: %s", self.round, source, reason)
            return False
        self.aggregator.merge(sums, row_weight, total)
        self.accepted += 1
        return True

    def result(self) -> dict[str, torch.Tensor]:
        if self.accepted == 0 and self.rejected:
            raise RuntimeError(f"round {self.round}: every client update was rejected "
                               f"({self.rejected[0]['reason']}, ...)")
        return self.aggregator.result()


# --------------------------------------------------------------------------- aggregation

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
            if key == ITEM_EMBEDDING_KEY and self.mode == "updated_rows":
                # compared in the states' own dtype (widening to float64 is exact, so the same rows)
                rows = (value != self.global_state[key]).any(-1)
                changed = rows.double() * weight
                self.row_weight = changed if self.row_weight is None else self.row_weight + changed
                if key in self.sums:  # only the changed rows: the others would add (+-)0
                    index = rows.nonzero().flatten()
                    self.sums[key].index_add_(0, index, value[index].double() * weight)
                    continue
                value = value.double() * changed[:, None]
            else:
                value = value.double() * weight
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
            value = value.double()  # a copy when kept: add() changes its sums in place
            self.sums[key] = value.clone() if key not in self.sums else self.sums[key] + value
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


class RobustAggregator:
    """Coordinate-wise ``median`` or ``trimmed_mean`` of the clients' states (Yin et al., ICML 2018).

    Unlike FedAvg these cannot be streamed as sums: the states are kept (float32, one per client;
    100 clients x the model is a few hundred MB at 1,000 ML-1M users) and reduced key by key in
    chunks of rows. Each client counts once, whatever its sample count: the count is self-reported,
    so weighting by it would let one client buy influence. ``trimmed_mean`` drops
    ``floor(trim_fraction * n)`` values at each end of every coordinate (``n`` = contributing clients;
    with fewer than ``1 / trim_fraction`` of them nothing is dropped and it is the plain mean);
    ``median`` is the middle value (mean of the two middle values for even ``n``).

    With ``updated_rows`` an item-embedding row is reduced over the clients that changed it only
    (``n`` per row), as in :class:`Aggregator`; rows no client changed keep their global value.
    """

    CHUNK_ELEMENTS = 1 << 22  # values reduced at once (x clients), bounds the float64 working memory

    def __init__(self, global_state: dict[str, torch.Tensor], kind: str,
                 item_embedding_aggregation: str = "updated_rows", trim_fraction: float = 0.1):
        if kind not in ("trimmed_mean", "median"):
            raise ValueError(f"RobustAggregator: unknown kind {kind!r}; choose trimmed_mean or median")
        if item_embedding_aggregation not in ("updated_rows", "fedavg"):
            raise ValueError(f"unknown item_embedding_aggregation {item_embedding_aggregation!r}")
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.global_state, self.kind, self.mode, self.trim = global_state, kind, item_embedding_aggregation, trim_fraction
        self.states: list[dict[str, torch.Tensor]] = []

    def add(self, state: dict[str, torch.Tensor], num_samples: int) -> None:
        if float(num_samples) <= 0:
            return
        self.states.append({key: value.detach() for key, value in state.items()})

    def partial(self):
        raise NotImplementedError(f"aggregation={self.kind!r} needs every client's update; it cannot be "
                                  "pre-aggregated into partial sums")

    merge = partial

    def result(self) -> dict[str, torch.Tensor]:
        if not self.states:
            raise ValueError("no client reported a positive sample count")
        return {key: self._reduce(key) for key in self.states[0]}

    def _reduce(self, key: str) -> torch.Tensor:
        reference = self.global_state[key]
        if reference.numel() == 0:
            return reference.clone()
        rows = reference.shape[0] if reference.dim() else 1
        glob = reference.reshape(rows, -1)
        count = len(self.states)
        step = max(1, self.CHUNK_ELEMENTS // (count * glob.shape[1]))
        by_rows = key == ITEM_EMBEDDING_KEY and self.mode == "updated_rows"
        out = []
        for lo in range(0, rows, step):
            # sorted in the states' own dtype (exact), summed in float64
            values = torch.stack([s[key].reshape(rows, -1)[lo:lo + step] for s in self.states]).to(glob.dtype)
            base = glob[lo:lo + step]
            if by_rows:
                changed = (values != base).any(-1)  # [clients, rows]
                values = torch.where(changed[..., None], values, torch.inf)  # sorted past the real values
                n = changed.sum(0)[:, None]
            else:
                n = torch.full((1, 1), count, device=glob.device)
            out.append(torch.where(n > 0, self._middle(values.sort(dim=0).values, n), base.double()))
        return torch.cat(out).reshape(reference.shape).to(reference.dtype)

    def _middle(self, ordered: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Mean of the sorted values ranked [lo, hi) per coordinate, ``n`` values present (the rest +inf)."""
        if self.kind == "median":
            lo, hi = (n - 1) // 2, n // 2 + 1
        else:
            drop = torch.floor(n.double() * self.trim + 1e-9).long()
            lo, hi = drop, n - drop
        ranks = torch.arange(ordered.shape[0], device=ordered.device).view(-1, *[1] * (ordered.dim() - 1))
        keep = (ranks >= lo) & (ranks < hi)
        return torch.where(keep, ordered.double(), 0.0).sum(0) / keep.sum(0).clamp_min(1)


def make_aggregator(global_state: dict[str, torch.Tensor], aggregation: str = "fedavg",
                    item_embedding_aggregation: str = "updated_rows",
                    trim_fraction: float = 0.1) -> Aggregator | RobustAggregator:
    """The aggregator of a config's ``aggregation``.

    ``fedavg`` and ``fedprox`` share the weighted mean (FedProx differs on the client: the
    proximal term ``fedprox_mu``); ``trimmed_mean`` and ``median`` are :class:`RobustAggregator`.
    Every choice yields a model state; the :class:`ServerOptimizer` then treats
    ``aggregate - global`` as its pseudo-gradient (FedAvgM/FedAdam apply momentum/adaptivity to
    the robust aggregate just as to the mean).
    """
    if aggregation in ("fedavg", "fedprox"):
        return Aggregator(global_state, item_embedding_aggregation)
    if aggregation in ("trimmed_mean", "median"):
        return RobustAggregator(global_state, aggregation, item_embedding_aggregation, trim_fraction)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


def aggregate(global_state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], int]],
              item_embedding_aggregation: str = "updated_rows", aggregation: str = "fedavg",
              trim_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Aggregate a list of (state, num_samples); see :func:`make_aggregator`."""
    aggregator = make_aggregator(global_state, aggregation, item_embedding_aggregation, trim_fraction)
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
    """How the server applies the clients' aggregate update ``delta = aggregate(w_c) - w``.

    The aggregate is whatever ``aggregation`` produced (the weighted mean, or a trimmed mean /
    median): the optimizer only sees the pseudo-gradient, so robust rules compose with it.

    ``fedavg`` takes the mean as is; ``fedavgm`` adds server momentum and ``fedadam`` an
    adaptive server step (Reddi et al., "Adaptive Federated Optimization", ICLR 2021). With
    many clients doing few local steps each, momentum lets progress accumulate across rounds.
    """

    KINDS = ("fedavg", "fedavgm", "fedadam")
    SCHEDULES = ("constant", "cosine")

    def __init__(self, kind: str = "fedavg", learning_rate: float = 1.0, momentum: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3, schedule: str = "constant", num_rounds: int = 1,
                 final_ratio: float = 0.0):
        if kind not in self.KINDS:
            raise ValueError(f"unknown server_optimizer {kind!r}; choose one of {self.KINDS}")
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown server_lr_schedule {schedule!r}; choose one of {self.SCHEDULES}")
        self.kind, self.lr, self.momentum, self.beta2, self.tau = kind, learning_rate, momentum, beta2, tau
        self.schedule, self.num_rounds, self.final_ratio = schedule, num_rounds, final_ratio
        self.state: dict[str, torch.Tensor] = {}

    def learning_rate(self, round_number: int) -> float:
        """The server step of a round. ``cosine`` anneals it from ``lr`` (round 1) to
        ``final_ratio x lr`` (the last round): small cohorts make progress fast, but their
        averaged update is noisy, and a shrinking step averages that noise out late in training."""
        if self.schedule == "constant" or self.num_rounds <= 1:
            return self.lr
        progress = (round_number - 1) / (self.num_rounds - 1)
        return self.lr * (self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def step(self, global_state: dict[str, torch.Tensor], mean_state: dict[str, torch.Tensor],
             round_number: int = 1) -> dict[str, torch.Tensor]:
        lr = self.learning_rate(round_number)
        if self.kind == "fedavg" and lr == 1.0:
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
            out[key] = (global_state[key].double() + lr * step).to(global_state[key].dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The exact (float64) moments: a resumed run must step exactly as the uninterrupted one."""
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.double() for k, v in state.items()}
