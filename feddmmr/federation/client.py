"""The client side: what a client holds, and its local update.

A client's data is its own training sequence cut into windows of ``max_seq_len`` positions
(every position predicts the next item), each paired with its memory snapshot taken just
before the window starts, so nothing a window predicts is in the memory it reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data.dataset import SequenceDataset, last_n_padded, trim_padding
from ..heap import release_free_heap
from ..models import UR4RecV2MoE
from ..models.groups import group_of
from .memory import ItemSpace, LocalMemory, MemoryConfig, client_threshold, novelty
from .server import ITEM_EMBEDDING_KEY


@dataclass
class ClientData:
    """One user's local data: training windows, memory snapshots and the memory itself."""

    user: int
    inputs: np.ndarray  # [n, L] item ids, left-padded
    targets: np.ndarray  # [n, L] next item per position (0 = none)
    memory: np.ndarray  # [n, K] memory snapshot per window (item ids, 0 = empty)
    eval_memory: dict[str, np.ndarray] = field(default_factory=dict)  # split -> [K]
    prototypes: np.ndarray | None = None  # [k, D] K-Means centroids of the LT memory
    memory_state: LocalMemory | None = None
    surprised: np.ndarray | None = None  # surprise_trigger: the training steps written as surprising (sorted)

    @property
    def num_samples(self) -> int:
        return int((self.targets != 0).sum())


def training_windows(sequence: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a training sequence into (inputs, targets, window starts), newest window last."""
    x, y = sequence[:-1], sequence[1:]
    count = max(1, math.ceil(len(x) / max_len))
    ends = len(x) - max_len * np.arange(count)[::-1]
    starts = np.maximum(ends - max_len, 0)
    return last_n_padded(x, starts, ends, max_len), last_n_padded(y, starts, ends, max_len), starts


def window_target_steps(num_train: int, max_len: int) -> np.ndarray:
    """``[n, L]``: the index in the training sequence of each window position's target (-1: padding),
    for a training sequence of ``num_train`` items cut as :func:`training_windows` cuts it."""
    return training_windows(np.arange(1, num_train + 1), max_len)[1] - 1


def surprise_flags(num_train: int, surprised: np.ndarray | None) -> np.ndarray | None:
    """Bool ``[num_train]``: the training steps the surprise trigger wrote (None: none). Only training
    items can be flagged: a step outside the training sequence (a validation or test item) is refused."""
    if surprised is None or len(surprised) == 0:
        return None
    surprised = np.asarray(surprised, dtype=np.int64)
    if surprised.min() < 0 or surprised.max() >= num_train:
        raise ValueError(f"surprise steps must index the {num_train} training items, got {surprised.min()}.."
                         f"{surprised.max()}")
    flags = np.zeros(num_train, dtype=bool)
    flags[surprised] = True
    return flags


def build_client(data: SequenceDataset, user: int, max_len: int, memory_config: MemoryConfig | None,
                 space: ItemSpace | None, prototype_seed: int = 0, surprised: np.ndarray | None = None) -> ClientData:
    """Everything one client derives from its own history (runs on the client).

    ``surprised``: training steps the surprise trigger wrote in earlier rounds (``surprise_trigger``);
    the memory is its history read in order, writing those items at their own step too, so a
    window's snapshot (taken before it starts) holds only items before every position it predicts."""
    sequence = data.sequence(user)
    train = sequence[:-2]
    inputs, targets, starts = training_windows(train, max_len)
    if memory_config is None or space is None:
        nothing = np.zeros(0, dtype=np.int64)
        return ClientData(user, inputs, targets, np.zeros((len(inputs), 0), dtype=np.int64),
                          {"val": nothing, "test": nothing})
    read, novel, memory = _history_memory(sequence, memory_config, space)
    flags = surprise_flags(len(train), surprised)
    part = (lambda lo, hi: None) if flags is None else (lambda lo, hi: flags[lo:hi])
    snapshots = np.zeros((len(starts), memory_config.width), dtype=np.int64)
    seen = 0
    for row in np.argsort(starts, kind="stable"):
        memory.observe(train[seen:starts[row]], novel[seen:starts[row]], part(seen, int(starts[row])))
        seen = max(seen, int(starts[row]))
        snapshots[row] = memory.retrieve()
    memory.observe(train[seen:], novel[seen:len(train)], part(seen, len(train)))
    eval_memory = {"val": memory.retrieve()}
    prototypes = memory.prototypes(prototype_seed)  # shared every round: from training items only
    memory.observe(read[len(train):], novel[len(train):])
    eval_memory["test"] = memory.retrieve()
    kept = None if surprised is None else np.unique(np.asarray(surprised, dtype=np.int64))
    return ClientData(user, inputs, targets, snapshots, eval_memory, prototypes, memory, kept)


def _history_memory(sequence: np.ndarray, memory_config: MemoryConfig,
                    space: ItemSpace) -> tuple[np.ndarray, np.ndarray, LocalMemory]:
    """What the memory reads (training items and the validation item), their novelty, an empty memory."""
    train = sequence[:-2]
    # every item's novelty against the window before it, computed once: the memory reads the
    # history in order, so its window before an item is the history's (st_window items)
    read = sequence[:len(train) + 1]
    novel = novelty(space, read, 0, memory_config.st_window)
    memory = LocalMemory(memory_config, space, client_threshold(space, train, memory_config, novel[:len(train)]))
    return read, novel, memory


def build_eval_memory(data: SequenceDataset, user: int, memory_config: MemoryConfig,
                      space: ItemSpace, surprised: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``build_client(...).eval_memory`` without the rest: the memory after the training items (``val``)
    and after the validation item too (``test``); no training snapshots, no prototypes. (Reading a
    stretch in one ``observe`` writes what reading it window by window writes.)"""
    read, novel, memory = _history_memory(data.sequence(user), memory_config, space)
    train = len(read) - 1
    memory.observe(read[:train], novel[:train], surprise_flags(train, surprised))
    eval_memory = {"val": memory.retrieve()}
    memory.observe(read[train:], novel[train:])
    eval_memory["test"] = memory.retrieve()
    return eval_memory


def build_clients(data: SequenceDataset, max_len: int, memory_config: MemoryConfig | None,
                  space: ItemSpace | None, users: np.ndarray | None = None, seed: int = 0,
                  progress: bool = False, surprised: Mapping[int, np.ndarray] | None = None) -> dict[int, ClientData]:
    """``surprised``: user -> the training steps its surprise trigger wrote (users absent: none)."""
    users = data.held_users() if users is None else users
    iterator = users
    if progress and memory_config is not None:
        from tqdm import tqdm

        iterator = tqdm(users, desc="client memories", unit="client", leave=False)
    surprised = surprised or {}
    return {int(u): build_client(data, int(u), max_len, memory_config, space, seed + int(u), surprised.get(int(u)))
            for u in iterator}


# --------------------------------------------------------------------------- client memories as arrays

_RAGGED = ("snapshots", "prototypes", "recent", "lt_items", "lt_freq", "lt_last")
_SCALARS = ("step", "threshold", "writes")


def pack_clients(clients: Mapping[int, ClientData]) -> dict[str, np.ndarray]:
    """The memory side of ``clients`` (snapshots, evaluation memory, prototypes, LocalMemory state) as flat arrays."""
    users = sorted(u for u, c in clients.items() if c.memory_state is not None)
    if not users:
        return {}
    parts: dict[str, list[np.ndarray]] = {key: [] for key in _RAGGED}
    scalars: dict[str, list] = {key: [] for key in _SCALARS}
    for user in users:
        client = clients[user]
        state = client.memory_state.state_dict()
        parts["snapshots"].append(client.memory)
        parts["prototypes"].append(client.prototypes)
        for key in ("recent", "lt_items", "lt_freq", "lt_last"):
            parts[key].append(state[key])
        for key in _SCALARS:
            scalars[key].append(state[key][0])
    arrays = {"users": np.asarray(users, dtype=np.int64),
              "eval_val": np.stack([clients[u].eval_memory["val"] for u in users]),
              "eval_test": np.stack([clients[u].eval_memory["test"] for u in users])}
    for key, values in parts.items():
        arrays[key] = np.concatenate(values)
        arrays[key + "_offsets"] = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int64)
    arrays.update({key: np.asarray(values) for key, values in scalars.items()})
    if any(clients[u].surprised is not None for u in users):  # surprise_trigger: the steps it wrote
        steps = [np.zeros(0, dtype=np.int64) if clients[u].surprised is None else clients[u].surprised for u in users]
        arrays.update(pack_surprise(users, steps))
    return arrays


def pack_surprise(users, steps: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The surprise trigger's steps per user as flat arrays (``surprise``, ``surprise_offsets``, ``surprise_users``)."""
    return {"surprise_users": np.asarray(users, dtype=np.int64),
            "surprise": np.concatenate([np.asarray(s, dtype=np.int64) for s in steps]) if steps else np.zeros(0, np.int64),
            "surprise_offsets": np.concatenate([[0], np.cumsum([len(s) for s in steps])]).astype(np.int64)}


def unpack_surprise(arrays: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """:func:`pack_surprise`'s arrays back as user -> steps (empty when the arrays hold none)."""
    if "surprise_users" not in arrays:
        return {}
    offsets, steps = arrays["surprise_offsets"], arrays["surprise"]
    return {int(u): np.array(steps[offsets[i]:offsets[i + 1]], dtype=np.int64)
            for i, u in enumerate(arrays["surprise_users"].tolist())}


def unpack_clients(arrays: Mapping[str, np.ndarray], data: SequenceDataset, max_len: int,
                   memory_config: MemoryConfig, space: ItemSpace, users=None) -> dict[int, ClientData]:
    """Rebuild ``ClientData`` from :func:`pack_clients` arrays: windows from the data, memory from the arrays."""
    index = {int(u): i for i, u in enumerate(arrays["users"])}
    wanted = sorted(index) if users is None else sorted(int(u) for u in users)
    missing = [u for u in wanted if u not in index]
    if missing:
        raise KeyError(f"no saved memory for users {missing[:5]}")

    def ragged(key: str, i: int) -> np.ndarray:
        lo, hi = arrays[key + "_offsets"][i], arrays[key + "_offsets"][i + 1]
        return np.array(arrays[key][lo:hi])

    surprised = unpack_surprise(arrays)
    clients = {}
    for user in wanted:
        i = index[user]
        inputs, targets, _ = training_windows(data.sequence(user)[:-2], max_len)
        snapshots = ragged("snapshots", i)
        if len(snapshots) != len(inputs):
            raise ValueError(f"saved memory of user {user} has {len(snapshots)} windows, the data {len(inputs)}")
        memory = LocalMemory(memory_config, space, float(arrays["threshold"][i]))
        memory.load_state_dict({"recent": ragged("recent", i), "lt_items": ragged("lt_items", i),
                                "lt_freq": ragged("lt_freq", i), "lt_last": ragged("lt_last", i),
                                **{key: np.array(arrays[key][i:i + 1]) for key in _SCALARS}})
        clients[user] = ClientData(user, inputs, targets, snapshots,
                                   {"val": np.array(arrays["eval_val"][i]), "test": np.array(arrays["eval_test"][i])},
                                   ragged("prototypes", i), memory, surprised.get(user))
    return clients


# --------------------------------------------------------------------------- the local update

@dataclass
class ClientUpdate:
    """What leaves a client: its trained groups, its sample count and, if enabled, prototypes."""

    state: dict[str, torch.Tensor]
    num_samples: int
    prototypes: np.ndarray | None
    metrics: dict[str, float]


@dataclass
class ClientFailure:
    """A client whose local update raised: it is dropped from the round, with the reason."""

    user: int
    reason: str


class ItemContent:
    """The public item feature tables a client reads its memory through (zero row = missing).

    ``visual`` and ``text`` stay on the CPU (the memory's item space reads them); the gathered
    memory features are made on the device the model runs on, from one copy of the tables there."""

    def __init__(self, visual: torch.Tensor | None, text: torch.Tensor | None):
        self.visual, self.text = visual, text
        self._copies: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def tables(self, device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(visual, text)`` on ``device`` (on the CPU: the tables themselves, no copy)."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = tuple(None if t is None else t.to(device) for t in (self.visual, self.text))
        return self._copies[device]

    def pooled_memory(self, ids: np.ndarray, prototypes: torch.Tensor | None, device: torch.device | str,
                      top_k: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`memory` plus, with candidate-conditioned retrieval (``top_k`` > 0: rows laid out by
        ``LocalMemory.retrieve``), the ``memory_pool [B, K(+P), 2]`` budgets and ids (:func:`pool_budget`); the rows
        are cut after their last used pool slot. ``top_k`` = 0: :meth:`memory` and no pool."""
        if not top_k:
            return (*self.memory(ids, prototypes, device), None)
        ids = trim_pool(ids, top_k)
        visual, text = self.memory(ids, prototypes, device)
        budget = pool_budget(ids, top_k)
        extra = (visual if visual is not None else text).shape[-2] - budget.shape[-2]  # the global prototypes
        budget = np.concatenate([budget, np.zeros((*budget.shape[:-2], extra, 2), dtype=np.int64)], -2)
        return visual, text, torch.from_numpy(budget).to(device)

    def memory(self, ids: np.ndarray, prototypes: torch.Tensor | None,
               device: torch.device | str) -> tuple[torch.Tensor | None, ...]:
        """``[B, K(+P), Dv]``, ``[B, K(+P), Dt]`` on ``device`` for memory item ids ``[B, K]`` plus global
        prototypes."""
        if ids.shape[-1] == 0 and prototypes is None:
            return None, None
        index = torch.from_numpy(ids).to(device)
        out = []
        offset = 0
        for table in self.tables(device):
            if table is None:
                out.append(None)
                continue
            part = table[index]
            if prototypes is not None and len(prototypes):
                proto = torch.nn.functional.normalize(prototypes[:, offset:offset + table.shape[1]].to(device), dim=-1)
                part = torch.cat([part, proto.unsqueeze(0).expand(len(ids), -1, -1)], dim=1)
            offset += table.shape[1]
            out.append(part)
        return tuple(out)


def pool_top_k(config) -> int:
    """The memory's ``top_k`` with candidate-conditioned retrieval (the rows' short-term region), else 0."""
    return config.memory_top_k if config.use_memory and config.memory_retrieval == "candidate" else 0


def trim_pool(ids: np.ndarray, top_k: int) -> np.ndarray:
    """Candidate-retrieval memory rows ``[..., top_k + pool]`` cut after the last pool slot any row uses."""
    used = np.flatnonzero((ids[..., top_k:] != 0).reshape(-1, ids.shape[-1] - top_k).any(0))
    return ids[..., :top_k + (int(used[-1]) + 1 if len(used) else 0)]


def pool_budget(ids: np.ndarray, top_k: int) -> np.ndarray:
    """``memory_pool [..., K, 2]`` for candidate-conditioned rows (``LocalMemory.retrieve`` with
    ``retrieval="candidate"``). ``[..., 0]``: 0 for the short-term region (the first ``top_k`` slots,
    always read) and empty slots; for a used pool slot, how many pool entries each candidate reads:
    ``top_k`` minus the row's short-term items. ``[..., 1]``: the pool slot's item id (0 elsewhere)."""
    short = (ids[..., :top_k] != 0).sum(-1, keepdims=True)
    budget = np.where(ids != 0, top_k - short, 0)
    budget[..., :top_k] = 0
    return np.stack([budget, np.where(budget > 0, ids, 0)], axis=-1).astype(np.int64)


def catalogue_mask(num_items: int, item_pool, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Bool ``[num_items]`` on ``device``: the rows a full softmax may rank (the items that occur; never padding 0)."""
    if num_items <= 0:
        return None
    mask = torch.zeros(num_items, dtype=torch.bool, device=device)
    mask[torch.as_tensor(np.asarray(item_pool, dtype=np.int64), device=device)] = True
    mask[0] = False
    return mask


NEW_GROUPS = ("projectors", "experts", "router", "gate")  # what Stage 3 adds to a Stage 1 model


def learning_rates(names: list[str], config) -> dict[str, float]:
    """Each parameter's local learning rate: ``learning_rate``, times ``new_group_lr_multiplier`` for
    the groups Stage 3 adds (fresh parameters that one or two Adam steps a round barely move)."""
    multiplier = config.new_group_lr_multiplier
    return {name: config.learning_rate * multiplier if multiplier != 1.0 and group_of(name) in NEW_GROUPS
            else config.learning_rate for name in names}


class _Losses(nn.Module):
    """Exposes ``model.losses`` as a forward so ``torch.func.functional_call`` can drive it."""

    def __init__(self, model: UR4RecV2MoE, detach_negatives: bool, objective: str = "sampled_softmax",
                 catalogue: torch.Tensor | None = None, gbce_t: float = 0.75, position_losses: bool = False):
        super().__init__()
        self.model, self.detach_negatives = model, detach_negatives
        self.objective, self.catalogue, self.gbce_t = objective, catalogue, gbce_t
        self.position_losses = position_losses

    def forward(self, inputs, targets, negatives, memory_visual, memory_text, align_items, memory_pool=None):
        out = self.model.losses(inputs, targets, negatives, memory_visual, memory_text, align_items=align_items,
                                detach_negatives=self.detach_negatives, objective=self.objective,
                                catalogue=self.catalogue, gbce_t=self.gbce_t, memory_pool=memory_pool,
                                position_losses=self.position_losses)
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}


class LocalTrainer:
    """Local training for many clients at once, exactly as if each trained alone.

    Clients are independent given the global model, so a group of them trains in one
    ``torch.func.vmap`` over stacked per-client parameters: each client keeps its own
    parameters, Adam moments, data order, negatives and step count; a client with fewer
    batches simply stops updating. This removes the per-client overhead of small batches
    (a 10-window client is a tiny forward) without changing the algorithm. One model is
    shared by every client of the process: no per-client copies of the model.

    Everything a step computes with lives on the model's device; the random draws (batch order,
    negatives, alignment items) come from per-client CPU generators and are moved there, so a
    client draws the same numbers on any device. Updates leave on the CPU.

    ``client_batch`` clients share a vmapped step: a larger group amortises more overhead but keeps
    more activations alive at once (measured trade-off: docs/performance.md).

    A client trains only the item-embedding rows its batches name (inputs, targets, negatives) when
    that gives the dense result exactly (:meth:`_sparse`): its stacked table and Adam moments are
    ``[G, R, D]`` with R the largest client's row count, not the catalogue, and its update is the
    global table with those rows replaced (docs/scale.md#item-rows-a-client-trains).
    """

    betas = (0.9, 0.999)
    align_items = 128  # items per step for the InfoNCE alignment
    sparse_rows = True  # train only the item-embedding rows a client touches, when that is exact (_sparse)

    def __init__(self, model: UR4RecV2MoE, config, content: ItemContent, item_pool: np.ndarray,
                 client_batch: int = 8):
        self.model, self.config, self.content = model, config, content
        self.device = model.device
        self.item_pool = torch.from_numpy(np.asarray(item_pool, dtype=np.int64))  # CPU: negatives are drawn there
        self.client_batch = max(1, int(client_batch))
        groups = list(config.transmitted_groups)
        model.set_trainable(groups)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.lrs = learning_rates(self.names, config)
        # a fresh Adam's first steps move every coordinate by about the learning rate, whatever its evidence;
        # an epsilon near the gradients' scale lets weak coordinates move in proportion (docs/quality-federation.md, H13)
        self.eps = config.local_adam_eps
        if not self.names:
            raise ValueError(f"stage trains no parameters (trainable_groups={config.trainable_groups})")
        self.wrapper = _Losses(model, not config.update_negative_items, config.loss,
                               catalogue_mask(model.num_items, item_pool, self.device), config.gbce_t,
                               position_losses=config.surprise_trigger)
        self.pool_top_k = pool_top_k(config)
        # surprise_trigger: user -> the training steps its last local training found surprising; read (and
        # removed) by whoever holds the client's memory. Client-side state, not part of any ClientUpdate.
        self.surprised_steps: dict[int, np.ndarray] = {}
        self._grads: dict[tuple, callable] = {}

    def _grad(self, params, *batch):
        """Per-client gradients of the loss: ``vmap(grad(loss))`` (absent inputs are not mapped)."""
        in_dims = (0,) + tuple(None if x is None else 0 for x in batch)
        if in_dims not in self._grads:
            self._grads[in_dims] = torch.func.vmap(torch.func.grad(self._loss, has_aux=True), in_dims=in_dims,
                                                   randomness="different")
        return self._grads[in_dims](params, *batch)

    def _loss(self, params, inputs, targets, negatives, memory_visual, memory_text, align_items, memory_pool=None):
        extra = () if memory_pool is None else (memory_pool,)  # (without the pool: the former call, exactly)
        return torch.func.functional_call(self.wrapper, {"model." + k: v for k, v in params.items()},
                                          (inputs, targets, negatives, memory_visual, memory_text, align_items, *extra))

    def train(self, client: ClientData, global_state: dict[str, torch.Tensor], seed: int,
              global_prototypes: torch.Tensor | None = None) -> ClientUpdate:
        return self.train_many([client], global_state, [seed], global_prototypes)[0]

    def train_many(self, clients: list[ClientData], global_state: dict[str, torch.Tensor], seeds: list[int],
                   global_prototypes: torch.Tensor | None = None,
                   isolate_failures: bool = False) -> list[ClientUpdate | ClientFailure]:
        """Each client's local update from ``global_state``; results in the order given.

        With ``isolate_failures`` an exception does not propagate: a vmapped group that raises
        is retried one client at a time, so only the client(s) that raise alone become a
        :class:`ClientFailure`; the others' updates come from their single runs (the same
        algorithm, not bitwise the grouped numbers, since dropout masks are drawn per group).
        """
        results: list[ClientUpdate | ClientFailure | None] = [None] * len(clients)
        for index, update in self.train_stream(clients, global_state, seeds, global_prototypes, isolate_failures):
            results[index] = update
        return results

    def train_stream(self, clients: list[ClientData], global_state: dict[str, torch.Tensor], seeds: list[int],
                     global_prototypes: torch.Tensor | None = None, isolate_failures: bool = False
                     ) -> Iterator[tuple[int, ClientUpdate | ClientFailure]]:
        """:meth:`train_many`'s results as each vmapped group finishes, ``(index, result)``: a caller
        that aggregates them at once never holds more than one group's updates."""
        self.model.copy_state_(global_state)
        self.model.train()
        order = sorted(range(len(clients)), key=lambda i: (-len(clients[i].inputs), i))  # similar sizes batch well
        for lo in range(0, len(order), self.client_batch):
            group = order[lo:lo + self.client_batch]
            try:
                updates = self._train_group([clients[i] for i in group], [seeds[i] for i in group], global_prototypes)
            except Exception as exc:
                if not isolate_failures:
                    raise
                if len(group) == 1:
                    updates = [ClientFailure(clients[group[0]].user, f"{type(exc).__name__}: {exc}")]
                else:
                    updates = [self.train_many([clients[i]], global_state, [seeds[i]], global_prototypes, True)[0]
                               for i in group]
            release_free_heap()
            yield from zip(group, updates)

    # ------------------------------------------------------------------ one vmapped group
    def _plan(self, client: ClientData, generator: torch.Generator) -> list[np.ndarray]:
        """The client's batches (window rows) over all local epochs, in its own random order."""
        batches = []
        for _ in range(self.config.local_epochs):
            order = torch.randperm(len(client.inputs), generator=generator, device=generator.device).numpy()
            batches += [order[lo:lo + self.config.batch_size] for lo in range(0, len(order), self.config.batch_size)]
        return batches

    def _sparse(self) -> bool:
        """Whether a client may train only the item rows its batches touch and give the dense result.

        A row no input, target or negative of a client names gets zero gradient, so with fresh Adam
        (or SGD) moments it never moves: training the touched rows alone is exact. Not for the full
        softmax (every row is a candidate), weight decay (it moves every row), or the memory (the
        item tables and ``projected_tables`` are indexed by global ids and sized by the catalogue)."""
        cfg = self.config
        return (self.sparse_rows and ITEM_EMBEDDING_KEY in self.names and cfg.loss != "full_softmax"
                and not cfg.weight_decay and not cfg.use_memory)

    def _local_rows(self, batches: list[tuple]) -> tuple[torch.Tensor, list[int], list[tuple]]:
        """Each client's item rows and its batches with item ids renumbered to index them.

        Returns ``rows [G, R]`` (client ``i``'s sorted distinct ids, padding row 0 first, in its first
        ``counts[i]`` entries; the rest point at row 0 and are never read), ``counts`` and the batches
        with inputs, targets and negatives as positions in the client's rows."""
        count, device = batches[0][0].shape[0], batches[0][0].device
        own = [torch.unique(torch.cat([torch.zeros(1, dtype=torch.long, device=device)] +
                                      [x[i].reshape(-1) for b in batches for x in b[:3]]))
               for i in range(count)]
        counts = [len(r) for r in own]
        sentinel = self.model.num_items  # above every id: padded row lists stay sorted
        search = torch.full((count, max(counts)), sentinel, dtype=torch.long, device=device)
        for i, r in enumerate(own):
            search[i, :len(r)] = r

        def local(x: torch.Tensor) -> torch.Tensor:
            return torch.searchsorted(search, x.reshape(count, -1).contiguous()).view_as(x)

        batches = [(local(b[0]), local(b[1]), local(b[2]), *b[3:]) for b in batches]
        return search.masked_fill(search == sentinel, 0), counts, batches

    def _train_group(self, clients: list[ClientData], seeds: list[int],
                     prototypes: torch.Tensor | None) -> list[ClientUpdate]:
        cfg = self.config
        count = len(clients)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        torch.manual_seed(int(seeds[0]))  # dropout masks under vmap come from the global generator
        plans = [self._plan(c, g) for c, g in zip(clients, generators)]
        total = max(len(p) for p in plans)
        own = dict(self.model.named_parameters())
        item = ITEM_EMBEDDING_KEY if self._sparse() else None
        batches = rows = counts = None
        if item is not None:
            # every step's batch first (the same per-client draws, in the same order, as step by step):
            # a client's item rows are the ids its batches name, its table [G, R, D] those rows only
            batches = [self._batch(clients, [p[step] if step < len(p) else None for p in plans], generators,
                                   prototypes) for step in range(total)]
            rows, counts, batches = self._local_rows(batches)
        params = {n: own[n].detach()[rows] if n == item else
                  own[n].detach().unsqueeze(0).repeat(count, *[1] * own[n].dim()) for n in self.names}
        anchor = ({n: own[n].detach()[rows] if n == item else own[n].detach() for n in self.names}
                  if cfg.fedprox_mu > 0 else None)
        first = {n: torch.zeros_like(p) for n, p in params.items()}
        second = {n: torch.zeros_like(p) for n, p in params.items()}
        steps = torch.zeros(count, device=self.device)
        sums: list[dict[str, float]] = [{} for _ in clients]
        # surprise_trigger: each position's loss, the last time its window was trained on (NaN: never)
        seen = [np.full(c.targets.shape, np.nan, dtype=np.float32) for c in clients] if self.wrapper.position_losses else None
        for step in range(total):
            active = torch.tensor([step < len(p) for p in plans], device=self.device)
            if batches is not None:
                batch, batches[step] = batches[step], None
            else:
                batch = self._batch(clients, [p[step] if step < len(p) else None for p in plans], generators,
                                    prototypes)
            grads, aux = self._grad(params, *batch)
            steps += active.float()
            with torch.no_grad():
                self._step(params, grads, first, second, steps, active, anchor)
            aux = {key: value.cpu() for key, value in aux.items()}  # one transfer, not one per number
            position = aux.pop("position_loss", None)
            if seen is not None and position is not None:
                width = position.shape[-1]
                for index in torch.nonzero(active).flatten().tolist():
                    picked = plans[index][step]
                    seen[index][picked, -width:] = position[index, :len(picked)].numpy()
            for index in torch.nonzero(active).flatten().tolist():
                for key, value in aux.items():
                    if key == "router_usage":
                        pairs = (("router_visual", value[index, 0]), ("router_semantic", value[index, 1]))
                    else:
                        pairs = ((key, value[index]),)
                    for name, number in pairs:
                        sums[index][name] = sums[index].get(name, 0.0) + float(number)
        updates = []
        for index, client in enumerate(clients):
            metrics = {k: v / max(len(plans[index]), 1) for k, v in sums[index].items()}
            state = {n: params[n][index].to("cpu", copy=True) for n in self.names if n != item}  # what travels: on the CPU
            if item is not None:  # the full-size table: the global rows, the client's own rows trained
                full = own[item].detach().to("cpu", copy=True)
                full[rows[index, :counts[index]].cpu()] = params[item][index, :counts[index]].cpu()
                state = {n: full if n == item else state[n] for n in self.names}
            shared = client.prototypes if (cfg.use_memory and cfg.use_prototypes) else None
            if seen is not None:  # stays on the client side: never part of what leaves it (ClientUpdate)
                self.surprised_steps[client.user] = self.surprising(client, seen[index])
            updates.append(ClientUpdate(state, client.num_samples, shared, metrics))
        return updates

    def surprising(self, client: ClientData, losses: np.ndarray) -> np.ndarray:
        """The training steps (indices into the client's training sequence) whose target's loss in this
        round's local training is above ``surprise_threshold`` (>= 0) or else above the client's own
        ``surprise_quantile`` of those losses: what the surprise trigger writes to its LT memory."""
        cfg = self.config
        valid = (client.targets != 0) & np.isfinite(losses)
        if not valid.any():
            return np.zeros(0, dtype=np.int64)
        values = losses[valid]
        threshold = cfg.surprise_threshold if cfg.surprise_threshold >= 0 else float(np.quantile(values, cfg.surprise_quantile))
        flagged = valid & (np.where(valid, losses, -np.inf) > threshold)
        steps = window_target_steps(client.num_samples + 1, client.targets.shape[1])
        return np.unique(steps[flagged])

    def _step(self, params: dict, grads: dict, first: dict, second: dict, steps: torch.Tensor,
              active: torch.Tensor, anchor: dict | None) -> None:
        """One optimiser step for every active client, in place (fresh Adam or SGD per client).

        The stacked parameters and moments are the largest tensors a round touches (the item
        embedding's trained rows times the group size), so the common case, every client active at
        the same step, runs as in-place arithmetic; clients that already finished are masked otherwise.
        """
        cfg, (b1, b2) = self.config, self.betas
        uniform = bool(active.all()) and bool((steps == steps[0]).all())
        for name in self.names:
            p, g = params[name], grads[name]
            if cfg.weight_decay:
                g.add_(p, alpha=cfg.weight_decay)
            if anchor is not None:
                g.add_(p - anchor[name], alpha=cfg.fedprox_mu)
            if uniform:
                if cfg.local_optimizer == "sgd":
                    p.sub_(g, alpha=self.lrs[name])
                    continue
                t = float(steps[0])
                m, v = first[name], second[name]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = v.sqrt().div_(math.sqrt(1 - b2 ** t)).add_(self.eps)
                p.addcdiv_(m, denom, value=-self.lrs[name] / (1 - b1 ** t))
                continue
            on = active.view(-1, *[1] * (p.dim() - 1))
            if cfg.local_optimizer == "sgd":
                params[name] = torch.where(on, p - self.lrs[name] * g, p)
                continue
            first[name] = torch.where(on, b1 * first[name] + (1 - b1) * g, first[name])
            second[name] = torch.where(on, b2 * second[name] + (1 - b2) * g * g, second[name])
            t = steps.clamp_min(1).view_as(on.float())
            denom = (second[name] / (1 - b2 ** t)).sqrt() + self.eps
            params[name] = torch.where(on, p - self.lrs[name] * (first[name] / (1 - b1 ** t)) / denom, p)

    def _batch(self, clients: list[ClientData], rows: list[np.ndarray | None], generators: list[torch.Generator],
               prototypes: torch.Tensor | None) -> tuple:
        """Padded ``[G, B, ...]`` tensors for one step on the model's device (an inactive client gets an
        all-padding batch); negatives are drawn on the CPU, by each client's generator, then moved."""
        cfg = self.config
        count, width = len(clients), max(len(r) for r in rows if r is not None)
        length = clients[0].inputs.shape[1]
        inputs = np.zeros((count, width, length), dtype=np.int64)
        targets = np.zeros_like(inputs)
        # full softmax scores the whole catalogue: no negatives drawn (so none of the generator's draws)
        sampled = 0 if cfg.loss == "full_softmax" else cfg.num_negatives
        negatives = torch.zeros((count, width, sampled), dtype=torch.long, device=self.item_pool.device)
        memory_k = clients[0].memory.shape[1]
        memory = np.zeros((count, width, memory_k), dtype=np.int64)
        align = np.zeros((count, self.align_items), dtype=np.int64)
        for index, (client, picked) in enumerate(zip(clients, rows)):
            if picked is None:
                continue
            n = len(picked)
            inputs[index, :n], targets[index, :n] = client.inputs[picked], client.targets[picked]
            if sampled:
                draw = torch.randint(len(self.item_pool), (n, sampled), generator=generators[index],
                                     device=generators[index].device)
                negatives[index, :n] = self.item_pool[draw]
            if memory_k:
                memory[index, :n] = client.memory[picked]
            if cfg.use_memory and cfg.contrastive_lambda > 0:
                distinct = np.unique(client.targets[picked])
                distinct = distinct[distinct != 0]
                if len(distinct) > self.align_items:
                    keep = torch.randperm(len(distinct), generator=generators[index],
                                          device=generators[index].device)[:self.align_items].numpy()
                    distinct = distinct[np.sort(keep)]
                align[index, :len(distinct)] = distinct
        memory_visual = memory_text = memory_pool = None
        if cfg.use_memory:  # with candidate-conditioned retrieval, rows cut after their pools
            memory_visual, memory_text, memory_pool = self.content.pooled_memory(
                memory.reshape(count * width, memory_k), prototypes, self.device, self.pool_top_k)
            memory_visual = None if memory_visual is None else memory_visual.view(count, width, *memory_visual.shape[1:])
            memory_text = None if memory_text is None else memory_text.view(count, width, *memory_text.shape[1:])
            memory_pool = None if memory_pool is None else memory_pool.view(count, width, -1, 2)
        device = self.device
        align_items = torch.from_numpy(align).to(device) if (cfg.use_memory and cfg.contrastive_lambda > 0) else None
        real = trim_padding(inputs)  # positions: the longest real window of the step, not max_seq_len
        batch = (torch.from_numpy(inputs[..., -real:]).to(device), torch.from_numpy(targets[..., -real:]).to(device),
                 negatives.to(device), memory_visual, memory_text, align_items)
        return batch if memory_pool is None else (*batch, memory_pool)
