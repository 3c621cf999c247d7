"""The client side: what a client holds, and its local update.

A client's data is its own training sequence cut into windows of ``max_seq_len`` positions
(every position predicts the next item), each paired with its memory snapshot taken just
before the window starts, so nothing a window predicts is in the memory it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.dataset import SequenceDataset, last_n_padded
from ..models import UR4RecV2MoE
from .memory import ItemSpace, LocalMemory, MemoryConfig, client_threshold


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


def build_client(data: SequenceDataset, user: int, max_len: int, memory_config: MemoryConfig | None,
                 space: ItemSpace | None, prototype_seed: int = 0) -> ClientData:
    """Everything one client derives from its own history (runs on the client)."""
    sequence = data.sequence(user)
    train = sequence[:-2]
    inputs, targets, starts = training_windows(train, max_len)
    if memory_config is None or space is None:
        nothing = np.zeros(0, dtype=np.int64)
        return ClientData(user, inputs, targets, np.zeros((len(inputs), 0), dtype=np.int64),
                          {"val": nothing, "test": nothing})
    memory = LocalMemory(memory_config, space, client_threshold(space, train, memory_config))
    snapshots = np.zeros((len(starts), memory_config.top_k), dtype=np.int64)
    seen = 0
    for row in np.argsort(starts, kind="stable"):
        memory.observe(train[seen:starts[row]])
        seen = max(seen, int(starts[row]))
        snapshots[row] = memory.retrieve()
    memory.observe(train[seen:])
    eval_memory = {"val": memory.retrieve()}
    memory.observe(sequence[len(train):len(train) + 1])
    eval_memory["test"] = memory.retrieve()
    return ClientData(user, inputs, targets, snapshots, eval_memory, memory.prototypes(prototype_seed), memory)


def build_clients(data: SequenceDataset, max_len: int, memory_config: MemoryConfig | None,
                  space: ItemSpace | None, users: np.ndarray | None = None, seed: int = 0,
                  progress: bool = False) -> dict[int, ClientData]:
    users = np.arange(data.num_users) if users is None else users
    iterator = users
    if progress and memory_config is not None:
        from tqdm import tqdm

        iterator = tqdm(users, desc="client memories", unit="client", leave=False)
    return {int(u): build_client(data, int(u), max_len, memory_config, space, seed + int(u)) for u in iterator}


# --------------------------------------------------------------------------- the local update

@dataclass
class ClientUpdate:
    """What leaves a client: its trained groups, its sample count and, if enabled, prototypes."""

    state: dict[str, torch.Tensor]
    num_samples: int
    prototypes: np.ndarray | None
    metrics: dict[str, float]


class ItemContent:
    """The public item feature tables a client reads its memory through (zero row = missing)."""

    def __init__(self, visual: torch.Tensor | None, text: torch.Tensor | None):
        self.visual, self.text = visual, text

    def memory(self, ids: np.ndarray, prototypes: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """``[B, K(+P), Dv]``, ``[B, K(+P), Dt]`` for memory item ids ``[B, K]`` plus global prototypes."""
        if ids.shape[-1] == 0 and prototypes is None:
            return None, None
        index = torch.from_numpy(ids)
        out = []
        offset = 0
        for table in (self.visual, self.text):
            if table is None:
                out.append(None)
                continue
            part = table[index]
            if prototypes is not None and len(prototypes):
                proto = torch.nn.functional.normalize(prototypes[:, offset:offset + table.shape[1]], dim=-1)
                part = torch.cat([part, proto.unsqueeze(0).expand(len(ids), -1, -1)], dim=1)
            offset += table.shape[1]
            out.append(part)
        return tuple(out)


class LocalTrainer:
    """One model and one optimiser reused for every client a process serves (no deep copies)."""

    def __init__(self, model: UR4RecV2MoE, config, content: ItemContent, item_pool: np.ndarray):
        self.model, self.config, self.content = model, config, content
        self.item_pool = torch.from_numpy(np.asarray(item_pool, dtype=np.int64))
        self.transmitted = config.transmitted_groups
        groups = list(config.trainable_groups)
        if config.fix_gate and "gate" in groups:
            groups.remove("gate")
        model.set_trainable(groups)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"stage trains no parameters (trainable_groups={config.trainable_groups})")
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def load_global(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def train(self, client: ClientData, global_state: dict[str, torch.Tensor], seed: int,
              global_prototypes: torch.Tensor | None = None) -> ClientUpdate:
        cfg = self.config
        self.load_global(global_state)
        self.optimizer.state.clear()  # a fresh local optimiser per client and round
        self.model.train()
        generator = torch.Generator().manual_seed(seed)
        anchors = [p.detach().clone() for p in self.params] if cfg.fedprox_mu > 0 else None
        use_memory = cfg.use_memory
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(len(client.inputs), generator=generator).numpy()
            for lo in range(0, len(order), cfg.batch_size):
                rows = order[lo:lo + cfg.batch_size]
                inputs = torch.from_numpy(client.inputs[rows])
                targets = torch.from_numpy(client.targets[rows])
                pick = torch.randint(len(self.item_pool), (len(rows), cfg.num_negatives), generator=generator)
                negatives = self.item_pool[pick]
                memory_visual = memory_text = None
                if use_memory:
                    memory_visual, memory_text = self.content.memory(client.memory[rows], global_prototypes)
                out = self.model.losses(inputs, targets, negatives, memory_visual, memory_text,
                                        align=use_memory and cfg.contrastive_lambda > 0)
                loss = out["loss"]
                if anchors is not None:
                    loss = loss + 0.5 * cfg.fedprox_mu * sum(((p - a) ** 2).sum() for p, a in zip(self.params, anchors))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                steps += 1
                for key, value in out.items():
                    if key == "router_usage":
                        sums["router_visual"] = sums.get("router_visual", 0.0) + float(value[0])
                        sums["router_semantic"] = sums.get("router_semantic", 0.0) + float(value[1])
                    else:
                        sums[key] = sums.get(key, 0.0) + float(value.detach())
        metrics = {key: value / max(steps, 1) for key, value in sums.items()}
        state = {k: v.detach().clone() for k, v in self.model.group_state(self.transmitted).items()}
        prototypes = client.prototypes if (use_memory and cfg.use_prototypes) else None
        return ClientUpdate(state, client.num_samples, prototypes, metrics)
