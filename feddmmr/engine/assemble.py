"""A run assembled from its config: data, item content, the global model, the clients' memories.

Every transport (in-process, Flower, centralized) builds its parts here, the same way, so they
train the same model from the same state; nothing here knows how updates travel.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import TrainConfig, apply_overrides, load_preset, stage_preset
from ..data.dataset import SequenceDataset
from ..data.dataset import SPLITS
from ..devices import resolve_device
from ..evaluation import ITEM_BLOCK, SCORED_PAIRS, ScoreFn, evaluate
from ..features.store import load_features
from ..federation import checkpoint as ckpt
from ..federation.client import (ClientData, ItemContent, LocalTrainer, build_client, build_clients,
                                 build_eval_memory, pack_clients, pack_surprise, pool_top_k)
from ..federation.memory import ItemSpace, MemoryConfig
from ..federation.server import ServerOptimizer
from ..models import PARAM_GROUPS, CheckpointError, UR4RecV2MoE
from ..new_items import NewItemChannel, new_item_channel
from ..safeio import load_npy


@dataclass
class Assembly:
    """Everything a transport needs, built once per run (per node on Flower)."""

    config: TrainConfig
    data: SequenceDataset  # on the Flower server: what the nodes report (sizes and fingerprint only)
    model: UR4RecV2MoE  # the global model (server side, used for evaluation)
    content: ItemContent
    space: ItemSpace | None
    memory_config: MemoryConfig | None
    feature_meta: dict
    trained_groups: list[str]
    init_dir: str | None
    features_dir: Path | None = None  # the item features (the memory's, and the new-item channel's signal)

    def build_clients(self, users: np.ndarray | None = None, progress: bool = False,
                      surprised: Mapping[int, np.ndarray] | None = None) -> dict[int, ClientData]:
        """The clients' windows and memories from their histories (all users, or ``users``); ``surprised``:
        user -> the training steps its surprise trigger wrote in earlier rounds."""
        return build_clients(self.data, self.config.max_seq_len, self.memory_config, self.space, users,
                             self.config.seed, progress, surprised)

    def rebuild_client(self, user: int, surprised: np.ndarray | None) -> ClientData:
        """One client again, its memory read with ``surprised`` (the trigger's steps so far)."""
        return build_client(self.data, user, self.config.max_seq_len, self.memory_config, self.space,
                            self.config.seed + int(user), surprised)

    def trainer(self) -> LocalTrainer:
        """One local trainer on a copy of the global model (clients never touch the server's model)."""
        return LocalTrainer(copy.deepcopy(self.model), self.config, self.content, self.data.warm_items())


def load_content(config: TrainConfig, features_dir: Path | None, num_items: int) -> tuple[ItemContent, dict, int, int]:
    """Item feature tables for the memory (None for a modality switched off)."""
    if not config.use_memory:
        return ItemContent(None, None), {}, 512, 384
    if features_dir is None:
        raise ValueError(f"stage {config.stage} reads item features: pass --features DIR "
                         "(make them with `feddmmr features --data ... --out DIR`)")
    text, visual = load_features(Path(features_dir))
    for name, table in (("text", text), ("visual", visual)):
        if table.features.shape[0] != num_items:
            raise ValueError(f"{features_dir}: {name} features have {table.features.shape[0]} rows, "
                             f"the dataset has {num_items} item indices; extract features for this dataset")
    meta = {"dir": str(features_dir), "text": text.meta, "visual": visual.meta}
    visual_table = visual.features.float() if config.use_visual else None
    text_table = text.features.float() if config.use_text else None
    return ItemContent(visual_table, text_table), meta, visual.dim, text.dim


def assemble(config: TrainConfig, data: SequenceDataset, features_dir: Path | None = None,
             init_dir: Path | None = None, device: torch.device | str | None = None) -> Assembly:
    """The global model (initialised from the seed, then the previous stage's groups) and the item content.

    The model is built on the CPU (the same initial weights on any device), then moved to ``device``
    (default: the config's ``device``, resolved here); the item content stays on the CPU.
    ``Assembly.data`` is ``data`` under the config's new-item protocol (``cold_item_fraction``): every
    part of a run (clients, negatives, evaluation) reads it, never the ``data`` passed in."""
    data = data_for(config, data)
    if init_dir is not None:
        check_same_new_items(config, Path(init_dir))
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
    model.to(resolve_device(config.device) if device is None else torch.device(device))
    space, memory_config = _memory_parts(config, content)
    if channel_active(config, data) and features_dir is None:
        raise ValueError(f"new_item_channel = {config.new_item_channel!r} scores the new items by their content: "
                         "pass --features DIR")
    return Assembly(config, data, model, content, space, memory_config, meta, trained,
                    str(init_dir) if init_dir is not None else None,
                    Path(features_dir) if features_dir is not None else None)


def channel_active(config: TrainConfig, data: SequenceDataset) -> bool:
    """Does the run's final scoring go through the new-item channel (on, and ``data`` has new items)."""
    return config.new_item_channel != "off" and data.cold_items is not None and len(data.cold_items) > 0


def data_for(config: TrainConfig, data: SequenceDataset) -> SequenceDataset:
    """``data`` as a run with ``config`` sees it: its new items removed (``cold_item_fraction`` > 0)."""
    if config.cold_item_fraction <= 0:  # (the Flower server's stand-in catalogue has no sequences)
        return data
    return data.with_cold_items(config.cold_item_fraction, config.cold_item_seed)


NEW_ITEM_KEYS = ("cold_item_fraction", "cold_item_seed")


def check_same_new_items(config: TrainConfig, init_dir: Path) -> None:
    """A stage must hold out the same new items as the stage it starts from (else they leak into training)."""
    saved = ckpt.read_run_config(init_dir)["train"]
    default = TrainConfig()
    theirs = {k: saved.get(k, getattr(default, k)) for k in NEW_ITEM_KEYS}
    ours = {k: getattr(config, k) for k in NEW_ITEM_KEYS}
    if theirs["cold_item_fraction"] == 0 == ours["cold_item_fraction"]:
        return
    if theirs != ours:
        raise CheckpointError(f"{init_dir} was trained with {theirs}, this stage has {ours}: the new items must be "
                              "the same in every stage (set cold_item_fraction and cold_item_seed alike)")


def _memory_parts(config: TrainConfig, content: ItemContent) -> tuple[ItemSpace | None, MemoryConfig | None]:
    """The item space and memory settings of a run with memory (both None without)."""
    if not config.use_memory:
        return None, None
    return ItemSpace(content.visual, content.text), MemoryConfig.from_train_config(config)


def stage_config(stage: int, init: Path | str | None = None, preset: str | Path | None = None) -> TrainConfig:
    """The config a stage starts from: ``preset`` (a name or TOML file) or the stage's default
    preset, where the previous stage is read from the ``init`` run directory."""
    if not preset:
        previous = ckpt.read_run_config(Path(init))["train"]["stage"] if init else None
        preset = stage_preset(stage, previous)
    return load_preset(preset)


def memory_scorer(model: UR4RecV2MoE, content: ItemContent, memory_ids: np.ndarray | None,
                  prototypes: torch.Tensor | None, pool_top_k: int = 0,
                  pairs: int = SCORED_PAIRS) -> ScoreFn:
    """The evaluation scorer: the last position's representation, the users' memory, one scoring rule.

    Over a catalogue streamed in blocks, the experts' item-only terms are computed once for the
    whole evaluation instead of once per batch and block, and a batch's sequence representation
    and memory once for all its blocks. With a memory, a batch goes through the model a few users at
    a time (about ``pairs`` (user, candidate) pairs a call, :func:`scoring_calls`): the scores are the
    whole batch's bit for bit, while a full-ranking batch never holds the experts' ``[users,
    catalogue, D]`` activations of all its users at once (without a memory there are no such
    activations, and one call per batch holds less).
    ``pool_top_k`` > 0: candidate-conditioned retrieval (``memory_retrieval = "candidate"``; the
    memory's ``top_k``), each candidate reads its own entries."""
    blocks = model.num_items > ITEM_BLOCK
    tables = None
    if memory_ids is not None and (blocks or pool_top_k):
        with torch.no_grad():
            tables = model.projected_tables()
    batch: dict = {}  # the last batch's input tensor (kept alive, so identity is safe) and its user side
    device = model.device  # seq and items come on it (evaluate(..., device=model.device))

    def pooled(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        """Candidate retrieval: the batch's users in groups of similar long-term pool size, each group's rows
        cut after its own longest pool (the attention is ``[B, heads, C, K]``: K is the cost)."""
        if batch.get("seq") is not seq:
            ids = memory_ids[users]
            order = np.argsort((ids[:, pool_top_k:] != 0).sum(1), kind="stable")
            groups = [order[lo:lo + POOL_GROUP] for lo in range(0, len(order), POOL_GROUP)]
            batch.update(seq=seq, hidden=model.encode(seq)[:, -1], groups=groups,
                         memory=[content.pooled_memory(ids[g], prototypes, device, pool_top_k) for g in groups])
        hidden = batch["hidden"]
        if items is None:
            items = torch.arange(model.num_items, device=device).expand(len(users), -1)
        out = None
        for group, (memory_visual, memory_text, memory_pool) in zip(batch["groups"], batch["memory"]):
            rows = torch.from_numpy(group).to(device)
            candidates = items[:1].expand(len(group), -1) if items.stride(0) == 0 else items[rows]
            part = model.score(hidden[rows], candidates, memory_visual, memory_text, tables=tables,
                               shared_candidates=blocks, memory_pool=memory_pool)
            if out is None:
                out = part.new_empty(len(users), part.shape[1])
            out[rows] = part
        return out

    def score(users: np.ndarray, seq: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        if pool_top_k and memory_ids is not None:
            return pooled(users, seq, items)
        if batch.get("seq") is not seq:
            memory = content.memory(memory_ids[users], prototypes, device) if memory_ids is not None else (None, None)
            batch.update(seq=seq, hidden=model.encode(seq)[:, -1], memory=memory)
        hidden, (memory_visual, memory_text) = batch["hidden"], batch["memory"]
        if items is None:
            items = torch.arange(model.num_items, device=device).expand(len(users), -1)
        calls = scoring_calls(len(users), items.shape[1], pairs) if memory_visual is not None or \
            memory_text is not None else 1
        if calls == 1:
            return model.score(hidden, items, memory_visual, memory_text, tables=tables, shared_candidates=blocks)
        bounds = np.linspace(0, len(users), calls + 1).round().astype(int)
        part = lambda x, lo, hi: None if x is None else x[lo:hi]  # noqa: E731
        return torch.cat([model.score(hidden[lo:hi], items[lo:hi], part(memory_visual, lo, hi),
                                      part(memory_text, lo, hi), tables=tables, shared_candidates=blocks)
                          for lo, hi in zip(bounds[:-1], bounds[1:])])

    return score


def scoring_calls(users: int, candidates: int, pairs: int) -> int:
    """Into how many model calls :func:`memory_scorer` splits a batch of ``users`` x ``candidates``: about
    ``pairs`` pairs a call, split evenly, never a call of one user out of several (a single row takes
    another matrix-product path in the experts' attention, whose last bits may differ; the users of
    a call of two or more are scored as in one call of the whole batch, bit for bit)."""
    rows = max(2, pairs // max(1, candidates))
    return max(1, min(-(-users // rows), users // 2))


POOL_GROUP = 64  # candidate retrieval: users scored together (sorted by pool size; see memory_scorer)


def memory_width(config: TrainConfig) -> int:
    """Item ids per memory row."""
    return MemoryConfig.from_train_config(config).width


def eval_memory(clients: dict[int, ClientData], split: str, num_users: int, top_k: int,
                use_memory: bool) -> np.ndarray | None:
    """``[num_users, K]`` memory ids each user is scored with on ``split`` (rows of absent users stay empty;
    ``top_k``: the row width, :func:`memory_width`)."""
    if not use_memory:
        return None
    out = np.zeros((num_users, top_k), dtype=np.int64)
    for user, client in clients.items():
        out[user] = client.eval_memory[split]
    return out


def make_server_optimizer(config: TrainConfig) -> ServerOptimizer:
    return ServerOptimizer(config.server_optimizer, config.server_learning_rate, config.server_momentum,
                           schedule=config.server_lr_schedule, num_rounds=config.num_rounds,
                           final_ratio=config.server_lr_final_ratio)


def client_seed(seed: int, round_number: int, user: int) -> int:
    """A client's seed for a round: derived from (seed, round, user) alone, whatever the transport."""
    return int(np.random.SeedSequence([seed, round_number, user]).generate_state(1)[0])


# --------------------------------------------------------------------------- using a finished run

@dataclass
class TrainedRun:
    """A finished run rebuilt for scoring: its model, config, item content and client memories."""

    model: UR4RecV2MoE
    config: TrainConfig
    content: ItemContent
    clients: dict[int, ClientData]
    prototypes: torch.Tensor | None
    data: SequenceDataset  # the data as the run saw it (its new items removed); score with this one

    def scorer(self, split: str) -> ScoreFn:
        memory_ids = eval_memory(self.clients, split, len(self.clients), memory_width(self.config),
                                 self.config.use_memory)
        return memory_scorer(self.model, self.content, memory_ids, self.prototypes, pool_top_k(self.config))


def restore(run_dir: Path, data: SequenceDataset, features_dir: Path | None = None,
            device: str = "cpu") -> TrainedRun:
    """Load a run directory's best model onto ``device`` (``cpu``, ``cuda``, ``auto``: where it is
    scored now, whatever it was trained on) and rebuild the clients' memories from ``data``."""
    run_dir = Path(run_dir)
    model, saved = ckpt.load_model(run_dir)
    config = apply_overrides(TrainConfig(), {**saved["train"], "device": device}, str(run_dir / ckpt.CONFIG_FILE))
    data = data_for(config, data)
    model.to(resolve_device(config.device))
    if saved["model"]["num_items"] != data.num_items:
        raise CheckpointError(f"{run_dir}: the model has {saved['model']['num_items']} item indices, the data "
                              f"{data.num_items}; pass the dataset (and --top-users) the run was trained on")
    features_dir = features_dir or (saved.get("features") or {}).get("dir")
    content, _, _, _ = load_content(config, Path(features_dir) if features_dir else None, data.num_items)
    if config.use_memory:
        model.set_item_features(content.visual, content.text)
    space, memory_config = _memory_parts(config, content)
    surprised = saved_surprise(run_dir) if config.surprise_trigger else None
    clients = build_clients(data, config.max_seq_len, memory_config, space, seed=config.seed, surprised=surprised)
    prototypes = None
    if (run_dir / ckpt.BEST_PROTOTYPES_FILE).exists():
        prototypes = torch.from_numpy(load_npy(run_dir / ckpt.BEST_PROTOTYPES_FILE, kind="f", ndim=2))
    return TrainedRun(model, config, content, clients, prototypes, data)


def saved_surprise(run_dir: Path) -> dict[int, np.ndarray]:
    """The surprise trigger's steps per user at the end of a run (``memory_state.npz``; empty without)."""
    from ..federation.client import unpack_surprise

    path = Path(run_dir) / ckpt.MEMORY_FILE
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as arrays:
        return unpack_surprise({key: arrays[key] for key in arrays.files if key.startswith("surprise")})


class LocalClients:
    """Clients held in this process: scored with the one evaluation loop, their memories packed for disk.

    Held (``resident``): every client built once. Built on demand (:meth:`on_demand`): a round's
    sampled clients are built when sampled and dropped after it; a user's evaluation memory (``[K]``
    ids per split) is built the first time that user is scored (or trained) and kept."""

    def __init__(self, assembly: Assembly, clients: dict[int, ClientData], cache_dir: Path | None,
                 packed: tuple[dict[str, np.ndarray], str] | None = None):
        self.assembly, self.clients, self.cache_dir = assembly, clients, cache_dir
        self.num_users = assembly.data.num_users
        if packed is None:
            arrays = pack_clients(clients)
            packed = (arrays, ckpt.array_digest(arrays)) if arrays else None
        self.packed = packed
        self.resident = True
        self._memory_ids: dict[str, np.ndarray | None] = {}
        self._has_eval_memory: np.ndarray | None = None  # on demand, with memory: users whose rows are built
        # surprise_trigger: user -> the training steps its trigger wrote (what each client's device keeps
        # between rounds; a client's memory is its history read with them)
        self.surprised: dict[int, np.ndarray] = {u: c.surprised for u, c in clients.items() if c.surprised is not None}

    @classmethod
    def on_demand(cls, assembly: Assembly, cache_dir: Path | None) -> "LocalClients":
        """Clients built when a round samples them and dropped after it (see the class)."""
        local = cls(assembly, {}, cache_dir)
        local.build_on_demand()
        return local

    def build_on_demand(self) -> None:
        """Switch to clients built when sampled, evaluation memories built when first needed."""
        self.resident, self.clients, self.packed = False, {}, None
        config = self.assembly.config
        self._memory_ids = {split: None for split in SPLITS}
        if config.use_memory:
            self._memory_ids = {split: np.zeros((self.num_users, memory_width(config)), dtype=np.int64)
                                for split in SPLITS}
            self._has_eval_memory = np.zeros(self.num_users, dtype=bool)

    def take(self, users: list[int]) -> dict[int, ClientData]:
        """The clients of ``users``: held ones, or built now (and not kept) when clients are built on demand
        (their evaluation memories, which come with them, are kept)."""
        if self.resident:
            return {u: self.clients[u] for u in users}
        clients = self.assembly.build_clients(np.asarray(users, dtype=np.int64), surprised=self.surprised)
        if self._has_eval_memory is not None:
            for user, client in clients.items():
                self._set_eval_memory(user, client.eval_memory)
        return clients

    def _set_eval_memory(self, user: int, memory: dict[str, np.ndarray]) -> None:
        for split in SPLITS:
            self._memory_ids[split][user] = memory[split]
        self._has_eval_memory[user] = True

    def ensure_eval_memory(self, users: np.ndarray | None = None) -> int:
        """On demand: build the evaluation memories of ``users`` (all when None) not built yet; how many were built."""
        if self._has_eval_memory is None:
            return 0
        users = self.assembly.data.held_users() if users is None else np.asarray(users, dtype=np.int64)
        missing = np.unique(users[~self._has_eval_memory[users]])
        for user in missing.tolist():
            self._set_eval_memory(user, build_eval_memory(self.assembly.data, user, self.assembly.memory_config,
                                                          self.assembly.space, self.surprised.get(user)))
        return int(len(missing))

    def eval_memory_arrays(self, users: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """On demand: the built evaluation memories (of ``users``) as arrays ``users``, ``eval_val``, ``eval_test``."""
        if self._has_eval_memory is None:
            return {}
        built = np.flatnonzero(self._has_eval_memory)
        if users is not None:
            built = np.intersect1d(built, np.asarray(users, dtype=np.int64))
        return {"users": built, **{f"eval_{split}": self._memory_ids[split][built] for split in SPLITS}}

    def load_eval_memory_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """On demand: take evaluation memories saved by :meth:`eval_memory_arrays`."""
        if self._has_eval_memory is None or not arrays:
            return
        users = np.asarray(arrays["users"], dtype=np.int64)
        for split in SPLITS:
            self._memory_ids[split][users] = arrays[f"eval_{split}"]
        self._has_eval_memory[users] = True

    def memory_ids(self, split: str, users: np.ndarray | None = None) -> np.ndarray | None:
        """``[num_users, K]`` memory ids for ``split``; the rows of ``users`` (all when None) are filled."""
        if not self.resident:
            self.ensure_eval_memory(users)
            return self._memory_ids[split]
        if split not in self._memory_ids:
            config = self.assembly.config
            self._memory_ids[split] = eval_memory(self.clients, split, self.num_users, memory_width(config),
                                                  config.use_memory)
        return self._memory_ids[split]

    def scorer(self, model: UR4RecV2MoE, prototypes: torch.Tensor | None, split: str,
               users: np.ndarray | None = None) -> ScoreFn:
        """``model``'s scorer on ``split`` with the clients' evaluation memories (of ``users``, all when None)."""
        return memory_scorer(model, self.assembly.content, self.memory_ids(split, users), prototypes,
                             pool_top_k(self.assembly.config))

    def evaluate(self, model: UR4RecV2MoE, prototypes: torch.Tensor | None, requests, tag=None,
                 users: np.ndarray | None = None, channel: NewItemChannel | None = None) -> list[dict]:
        """One result per ``(split, protocol, batch_size)`` request, over every user (or ``users``);
        with ``channel`` the new items are scored by it."""
        config, data = self.assembly.config, self.assembly.data
        model.eval()
        wrap = channel.scorer if channel is not None else (lambda scorer: scorer)
        return [evaluate(wrap(self.scorer(model, prototypes, split, users)), data,
                         split, protocol, seed=config.seed, max_len=config.max_seq_len, batch_size=batch_size,
                         cache_dir=self.cache_dir, users=users, num_negatives=config.eval_negatives,
                         device=model.device)
                for split, protocol, batch_size in requests]

    def new_item_channel(self, model: UR4RecV2MoE, prototypes: torch.Tensor | None,
                         users: np.ndarray | None = None) -> NewItemChannel | None:
        """The new-item channel calibrated for ``model`` on validation (None when the run has none)."""
        config, data = self.assembly.config, self.assembly.data
        if not channel_active(config, data):
            return None
        model.eval()
        return new_item_channel(lambda split: self.scorer(model, prototypes, split, users), data,
                                self.assembly.features_dir, config.seed, signal=config.new_item_channel,
                                max_len=config.max_seq_len, users=users, device=model.device)

    def remember_surprise(self, user: int, steps: np.ndarray | None) -> None:
        """The surprise trigger after a client's local training: its surprising training steps join the
        ones it kept, and its memory (snapshots, evaluation memory, prototypes) is read again with them.
        Only later rounds see the change; a step writes its item at its own place in the history."""
        if steps is None:
            return
        before = self.surprised.get(user, np.zeros(0, dtype=np.int64))
        merged = np.union1d(before, np.asarray(steps, dtype=np.int64)).astype(np.int64)
        if user in self.surprised and np.array_equal(merged, before):
            return
        self.surprised[user] = merged
        if self.resident:
            client = self.assembly.rebuild_client(user, merged)
            self.clients[user] = client
            for split, ids in self._memory_ids.items():
                if ids is not None:
                    ids[user] = client.eval_memory[split]
            self.packed = None  # packed again when asked (memory())
        elif self._has_eval_memory is not None:
            self._set_eval_memory(user, build_eval_memory(self.assembly.data, user, self.assembly.memory_config,
                                                          self.assembly.space, merged))

    def load_surprise(self, surprised: Mapping[int, np.ndarray]) -> None:
        """On demand, resuming: the trigger's steps saved by :meth:`memory` (evaluation memories rebuilt with them)."""
        self.surprised = {int(u): np.asarray(s, dtype=np.int64) for u, s in surprised.items()}
        if self._has_eval_memory is not None:
            self._has_eval_memory[:] = False

    def memory(self) -> tuple[dict[str, np.ndarray], str] | None:
        """The clients' packed memories and digest (held clients); built on demand, only the surprise
        trigger's steps (all the rest is rebuilt from the data)."""
        if self.resident and self.packed is None and self.clients:
            arrays = pack_clients(self.clients)
            self.packed = (arrays, ckpt.array_digest(arrays)) if arrays else None
        if not self.resident and self.surprised:
            users = sorted(self.surprised)
            arrays = pack_surprise(users, [self.surprised[u] for u in users])
            return arrays, ckpt.array_digest(arrays)
        return self.packed

    def summary(self) -> dict:
        return {}
