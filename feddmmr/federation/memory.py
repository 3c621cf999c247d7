"""A client's local dynamic memory (SPEC §4). It lives on the device and is never uploaded.

* Short-term (ST): the last ``st_window`` items.
* Long-term (LT), ``lt_capacity`` entries ``(item, frequency, last_step)``: an item is written
  when its novelty ``1 - max cos(item, ST window)`` exceeds the threshold; a near-duplicate of
  an LT entry (``cos >= duplicate_threshold``) raises that entry's frequency instead; when
  full, the entry with the lowest utility ``w * recency + (1 - w) * frequency`` expires
  (recency halves every ``recency_half_life`` steps, frequency is relative to the largest).
  ``lt_capacity = 0`` turns the LT memory off (the "no long-term memory" ablation).
* Retrieval: ``top_k`` item ids, a share from ST (the most recent) and the rest from LT
  ranked by similarity to the ST centroid; the ST share grows with drift (ST centroid moving
  away from the LT centroid). With ``retrieval = "candidate"`` (config ``memory_retrieval``) the
  LT part is not ranked here: the row holds the ST share and the whole LT pool, and each
  candidate item reads the LT entries most similar to itself (``UR4RecV2MoE``'s pooled experts;
  the seed's target-conditioned retrieval, see docs/quality-memory.md).
* Surprise writes (config ``surprise_trigger``): ``observe`` also writes the items the client's
  local training found surprising (high loss), at their own step, so they reach only the memory
  of later positions.
* Prototypes: K-Means centroids of the LT entries, the only thing a client may share.

Items are compared by a combined content embedding ``norm([norm(visual); norm(text)])``;
all pairwise similarities come from one ``[num_items, num_items]`` table, so novelty over a
whole sequence is a vectorised gather, and only the (few) written items loop in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..config import TrainConfig


MIN_PROTOTYPE_ITEMS = 2  # distinct memory items a shared centroid must average (never one entry verbatim)


_DEFAULTS = TrainConfig()  # the memory's settings are the training config's keys (SPEC §4), one source


@dataclass(frozen=True)
class MemoryConfig:
    """The client memory's settings: the training config's memory keys (``top_k`` is ``memory_top_k``)."""

    st_window: int = _DEFAULTS.st_window
    lt_capacity: int = _DEFAULTS.lt_capacity
    novelty_threshold: float = _DEFAULTS.novelty_threshold  # < 0: use the client's own novelty quantile
    novelty_quantile: float = _DEFAULTS.novelty_quantile
    duplicate_threshold: float = _DEFAULTS.duplicate_threshold
    recency_half_life: float = _DEFAULTS.recency_half_life
    recency_weight: float = _DEFAULTS.recency_weight
    top_k: int = _DEFAULTS.memory_top_k
    st_fraction: float = _DEFAULTS.st_fraction
    num_prototypes: int = _DEFAULTS.num_prototypes
    retrieval: str = _DEFAULTS.memory_retrieval  # "centroid" | "candidate" (see the module docstring)

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> "MemoryConfig":
        return cls(**{f.name: getattr(config, _CONFIG_NAMES.get(f.name, f.name)) for f in fields(cls)})

    @property
    def width(self) -> int:
        """Item ids per retrieved memory row: ``top_k``, or ``top_k`` (ST region) + ``lt_capacity``
        (the LT pool) with candidate-conditioned retrieval."""
        return self.top_k + (self.lt_capacity if self.retrieval == "candidate" else 0)


_CONFIG_NAMES = {"top_k": "memory_top_k", "retrieval": "memory_retrieval"}  # MemoryConfig name -> config key


class ItemSpace:
    """Combined, normalised item content embeddings; cosine similarities computed on demand.

    Nothing item x item is stored: the memory only ever compares an item with the window before
    it or with the client's long-term entries, so similarities cost what a client reads, not the
    catalogue squared.
    """

    def __init__(self, visual: torch.Tensor | None, text: torch.Tensor | None):
        parts = [F.normalize(t.float(), dim=-1) for t in (visual, text) if t is not None]
        if not parts:
            raise ValueError("the memory needs at least one modality")
        combined = F.normalize(torch.cat(parts, dim=-1), dim=-1)
        self.embedding = combined.numpy()
        self.present = combined.norm(dim=-1).numpy() > 0
        self._table = combined

    def similarity(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``[len(rows), len(cols)]`` cosine similarities."""
        table = self._table
        return (table[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
                @ table[torch.from_numpy(np.asarray(cols, dtype=np.int64))].T).numpy()

    def window_similarity(self, items: np.ndarray, start: int, window: int, block: int = 64) -> np.ndarray:
        """``[len(items) - start, window]``: ``items[p]`` against ``items[p - 1 - w]`` (NaN before the start)."""
        out = np.full((len(items) - start, window), np.nan, dtype=np.float32)
        for lo in range(start, len(items), block):
            hi = min(len(items), lo + block)
            context = max(0, lo - window)
            sims = self.similarity(items[lo:hi], items[context:hi])
            before = np.arange(lo, hi)[:, None] - 1 - np.arange(window)[None, :]
            valid = before >= 0
            rows = np.broadcast_to(np.arange(hi - lo)[:, None], before.shape)
            out[lo - start:hi - start] = np.where(valid, sims[rows, np.clip(before - context, 0, None)], np.nan)
        return out


class LocalMemory:
    """One user's memory; ``observe`` a chronological stretch of items, then ``retrieve``."""

    def __init__(self, config: MemoryConfig, space: ItemSpace, threshold: float):
        self.config, self.space, self.threshold = config, space, threshold
        self.step = 0
        self.recent = np.zeros(0, dtype=np.int64)  # ST window, oldest first
        self.lt_items = np.zeros(0, dtype=np.int64)
        self.lt_freq = np.zeros(0, dtype=np.float64)
        self.lt_last = np.zeros(0, dtype=np.float64)
        self.writes = 0

    # ------------------------------------------------------------------ writing
    def novelty(self, items: np.ndarray) -> np.ndarray:
        """Novelty of each item against the ST window just before it (1 when the window is empty)."""
        return novelty(self.space, np.concatenate([self.recent, items]), len(self.recent), self.config.st_window)

    def observe(self, items: np.ndarray, novel: np.ndarray | None = None, surprised: np.ndarray | None = None) -> None:
        """Read ``items`` in order; ``novel`` is their novelty when the caller has it (see :func:`novelty`);
        ``surprised`` (bool, one per item) marks items the surprise trigger writes whatever their novelty."""
        items = np.asarray(items, dtype=np.int64)
        if len(items) == 0:
            return
        if novel is None:
            novel = self.novelty(items)
        write = novel > self.threshold
        if surprised is not None:
            write = write | np.asarray(surprised, dtype=bool)
        written = np.flatnonzero(write & self.space.present[items])
        for index in written:
            self._write(int(items[index]), self.step + int(index))
        self.step += len(items)
        self.recent = np.concatenate([self.recent, items])[-self.config.st_window:]

    def _write(self, item: int, step: int) -> None:
        cfg = self.config
        if cfg.lt_capacity == 0:  # no long-term memory
            return
        if len(self.lt_items):
            sims = self.space.similarity([item], self.lt_items)[0]
            best = int(sims.argmax())
            if sims[best] >= cfg.duplicate_threshold:
                self.lt_freq[best] += 1.0
                self.lt_last[best] = step
                return
        if len(self.lt_items) >= cfg.lt_capacity:
            victim = int(self.utility(step).argmin())
            keep = np.arange(len(self.lt_items)) != victim
            self.lt_items, self.lt_freq, self.lt_last = self.lt_items[keep], self.lt_freq[keep], self.lt_last[keep]
        self.lt_items = np.append(self.lt_items, item)
        self.lt_freq = np.append(self.lt_freq, 1.0)
        self.lt_last = np.append(self.lt_last, float(step))
        self.writes += 1

    def utility(self, now: float) -> np.ndarray:
        recency = 0.5 ** ((now - self.lt_last) / self.config.recency_half_life)
        frequency = self.lt_freq / self.lt_freq.max()
        return self.config.recency_weight * recency + (1.0 - self.config.recency_weight) * frequency

    # ------------------------------------------------------------------ reading
    def drift(self) -> float:
        """1 - cos(ST centroid, LT centroid); 0 when either part is empty."""
        st = self.recent[self.space.present[self.recent]]
        if len(st) == 0 or len(self.lt_items) == 0:
            return 0.0
        a = self.space.embedding[st].mean(0)
        b = self.space.embedding[self.lt_items].mean(0)
        return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))

    def retrieve(self) -> np.ndarray:
        """``top_k`` item ids (0 = empty slot): recent ST items, then LT entries nearest the ST centroid.

        With ``retrieval = "candidate"``: ``width`` ids, the ST share in the first ``top_k`` slots (the
        rest of them empty), then every LT entry not already among them (insertion order): each
        candidate reads the ST share and the ``top_k - n_st`` pool entries most similar to itself."""
        cfg = self.config
        if cfg.retrieval == "candidate":
            return self._retrieve_pool()
        st, n_st, n_lt = self._shares()
        chosen = list(st[:n_st])
        if n_lt:
            centroid = self.space.embedding[st].mean(0) if len(st) else self.space.embedding[self.lt_items].mean(0)
            rank = np.argsort(-(self.space.embedding[self.lt_items] @ centroid), kind="stable")
            chosen += [i for i in self.lt_items[rank] if i not in set(chosen)][:n_lt]
        out = np.zeros(cfg.top_k, dtype=np.int64)
        out[:len(chosen)] = chosen
        return out

    def _shares(self) -> tuple[np.ndarray, int, int]:
        """The distinct present ST items (most recent first) and how many ST and LT slots a row gets."""
        cfg = self.config
        st = self.recent[self.space.present[self.recent]][::-1]  # most recent first
        st = st[np.sort(np.unique(st, return_index=True)[1])]  # distinct, keep recency order
        share = min(0.75, cfg.st_fraction + self.drift())
        n_st = int(round(cfg.top_k * share)) if len(self.lt_items) else cfg.top_k
        n_st = min(n_st, len(st))
        n_lt = min(cfg.top_k - n_st, len(self.lt_items))
        n_st = min(len(st), cfg.top_k - n_lt)  # give unused LT slots back to ST
        return st, n_st, n_lt

    def _retrieve_pool(self) -> np.ndarray:
        cfg = self.config
        st, n_st, _ = self._shares()
        out = np.zeros(cfg.width, dtype=np.int64)
        out[:n_st] = st[:n_st]
        pool = self.lt_items[~np.isin(self.lt_items, st[:n_st])]
        out[cfg.top_k:cfg.top_k + len(pool)] = pool
        return out

    def prototypes(self, seed: int = 0) -> np.ndarray:
        """K-Means centroids ``[k, D]`` of the LT entries: what a client may share.

        A centroid is kept only if its cluster averages at least ``MIN_PROTOTYPE_ITEMS`` distinct
        items, so no memory entry (whose content embedding identifies the item through the
        public feature tables) ever leaves the client verbatim; small memories give fewer or no
        centroids.
        """
        dim = self.space.embedding.shape[1]
        k = min(self.config.num_prototypes, len(np.unique(self.lt_items)) // MIN_PROTOTYPE_ITEMS)
        if k == 0:
            return np.zeros((0, dim), dtype=np.float32)
        points = self.space.embedding[self.lt_items]
        centers = kmeans(points, k, seed, weights=self.lt_freq)
        labels = ((points[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        keep = [j for j in range(len(centers)) if len(np.unique(self.lt_items[labels == j])) >= MIN_PROTOTYPE_ITEMS]
        return centers[keep].astype(np.float32)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, np.ndarray]:
        return {"step": np.array([self.step]), "recent": self.recent, "lt_items": self.lt_items,
                "lt_freq": self.lt_freq, "lt_last": self.lt_last, "threshold": np.array([self.threshold]),
                "writes": np.array([self.writes])}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.step = int(state["step"][0])
        self.recent = np.asarray(state["recent"], dtype=np.int64)
        self.lt_items = np.asarray(state["lt_items"], dtype=np.int64)
        self.lt_freq = np.asarray(state["lt_freq"], dtype=np.float64)
        self.lt_last = np.asarray(state["lt_last"], dtype=np.float64)
        self.threshold = float(state["threshold"][0])
        self.writes = int(state["writes"][0])


def novelty(space: ItemSpace, items: np.ndarray, start: int, window: int) -> np.ndarray:
    """Novelty of ``items[start:]``, each against the ``window`` items before it (1 with none present)."""
    positions = np.arange(start, len(items))
    if window == 0:
        return np.ones(len(positions))
    before = positions[:, None] - np.arange(1, window + 1)[None, :]
    valid = before >= 0
    others = items[np.clip(before, 0, None)]
    sims = space.window_similarity(items, start, window)
    sims = np.where(valid & space.present[others], sims, -np.inf)
    best = sims.max(axis=1)
    return np.where(np.isfinite(best), 1.0 - best, 1.0)


def client_threshold(space: ItemSpace, items: np.ndarray, config: MemoryConfig,
                     novel: np.ndarray | None = None) -> float:
    """The fixed threshold, or the client's own novelty quantile over its history (``novel``: its novelty)."""
    if config.novelty_threshold >= 0:
        return config.novelty_threshold
    present = space.present[items]
    if novel is None:
        novel = novelty(space, items, 0, config.st_window)
    values = novel[present]
    return float(np.quantile(values, config.novelty_quantile)) if len(values) else 1.0


def kmeans(points: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Centroids of ``points`` (scikit-learn K-Means, one seeded initialisation)."""
    from sklearn.cluster import KMeans

    if k <= 0 or len(points) == 0:
        return np.zeros((0, points.shape[1]), dtype=np.float32)
    if len(points) <= k:
        return points.astype(np.float32)
    model = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50)
    model.fit(points, sample_weight=weights)
    return model.cluster_centers_.astype(np.float32)
