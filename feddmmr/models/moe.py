"""FedDMMR's model: SASRec plus visual and semantic experts over the user's memory.

    fused(b, t, c) = LN(seq[b, t]) + g * (w_vis * LN(vis(b, c)) + w_sem * LN(sem(b, c)))
    score(b, t, c) = <fused(b, t, c), E[c]>
                   = <LN(seq[b, t]), E[c]> + g * <w_vis * LN(vis) + w_sem * LN(sem), E[c]>

The experts read the memory of user b (a snapshot taken before the scored positions) and the
candidate item c, never the position t, so the auxiliary part of the score is a per
(user, item) term added to SASRec's score. That identity is what makes training at every
position cheap: the experts run once per (user, candidate), not once per (position, candidate).

With ``content_item_side`` a candidate is represented by ``E[c] + P(content[c])`` instead of
``E[c]`` wherever SASRec's part of the score reads it (training's positives, negatives and full
catalogue, evaluation's candidates): :class:`ContentTower`, a trained projection of the item's
standardised features, so an item without a trained ID row (a new item) still gets a score from
its content. The experts' bonus and the input sequence keep the ID embedding.

Missing modalities are all-zero feature rows: an expert with no usable memory entries, or a
candidate without a poster, gets router weight 0, and with no memory at all the model is
exactly SASRec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .groups import PARAM_GROUPS, group_of
from .sasrec import SASRec

OBJECTIVES = ("sampled_softmax", "full_softmax", "gbce")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model; the message names the group and the key."""


def _present(x: torch.Tensor) -> torch.Tensor:
    """A feature row is present when it is not all zero (missing items are stored as zeros)."""
    return x.abs().sum(-1) > 0


def combined_content(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``norm([norm(visual); norm(text)])`` per row (a missing modality's zero row adds nothing): the
    content space the client memory compares items in (``federation.memory.ItemSpace``)."""
    return F.normalize(torch.cat([F.normalize(visual, dim=-1), F.normalize(text, dim=-1)], dim=-1), dim=-1)


class MemoryAttention(nn.Module):
    """Multi-head attention of candidate queries ``[B, C, D]`` over memory entries ``[B, K, D]``."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.k(memory)``, ``self.v(memory)`` (what a caller scoring many candidate blocks over one memory
        passes to every :meth:`forward` instead of projecting the memory again)."""
        return self.k(memory), self.v(memory)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, usable: torch.Tensor,
                projected: torch.Tensor | None = None,
                keys_values: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``query`` may be ``[1, C, D]`` (the same candidates for every row): projected once, broadcast.
        ``projected`` is ``self.q(query)`` when the caller has it already (per item, gathered);
        ``keys_values`` likewise :meth:`keys_values` of ``memory``."""
        batch, (cands, hidden) = memory.shape[0], query.shape[1:]
        split = lambda x: x.view(x.shape[0], x.shape[1], self.heads, hidden // self.heads).transpose(1, 2)
        # rows without a usable entry attend to everything and are zeroed by the router weight;
        # explicit attention (K is small) because SDPA has no vmap batching rule on CPU
        if usable.dim() == 3:  # [B, C, K]: each candidate reads its own entries (candidate-conditioned retrieval)
            mask = (usable | ~usable.any(-1, keepdim=True))[:, None, :, :]
        else:
            mask = (usable | ~usable.any(1, keepdim=True))[:, None, None, :]
        q = split(self.q(query) if projected is None else projected)
        k, v = (self.k(memory), self.v(memory)) if keys_values is None else keys_values
        k, v = split(k), split(v)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf")).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, cands, hidden))


def _feature_statistics(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-dimension mean and std (floored) over the present rows of a feature table; None with < 2."""
    rows = table[_present(table)]
    if len(rows) < 2:
        return None
    return rows.mean(0), rows.std(0).clamp_min(1e-6)


class Projector(nn.Sequential):
    """An item feature projector ``Linear -> GELU -> Linear``; with ``standardise`` its input is first
    z-scored per dimension (``shift``/``scale``: the catalogue's feature statistics, set by
    ``UR4RecV2MoE.set_item_features``; buffers outside the state dict, like the feature tables).

    Unit-norm features in 1,280 or 384 dimensions are tiny per coordinate, so at the default
    initialisation the output is almost the last layer's bias, the same vector for every item
    (docs/quality-memory.md); standardised inputs are spread over every dimension."""

    def __init__(self, in_dim: int, hidden: int, standardise: bool = False):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.standardise = standardise
        self.register_buffer("shift", torch.zeros(in_dim), persistent=False)
        self.register_buffer("scale", torch.ones(in_dim), persistent=False)

    def set_statistics(self, table: torch.Tensor) -> None:
        """Mean and std per dimension over the rows of ``table`` that are present (not all zero)."""
        stats = _feature_statistics(table)
        if stats is not None:
            self.shift, self.scale = stats[0].to(self.shift), stats[1].to(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardise:
            x = (x - self.shift) / self.scale
        return super().forward(x)


class ContentTower(nn.Module):
    """The candidate-side content term ``gate * MLP([z(visual); z(text)])`` of every item (issue #14 (d)).

    Each modality is z-scored per dimension with the catalogue's statistics (as ``Projector`` with
    ``standardise``), zero where missing; an item with neither modality (padding) gets zero. The last
    layer starts at zero, so at initialisation the term is zero and the model scores as without it.
    Its parameters (``item_content.*``) are in the "projectors" group: trained and transmitted
    whenever Stage 3 trains the projectors."""

    def __init__(self, visual_dim: int, text_dim: int, hidden: int):
        super().__init__()
        self.visual_dim, self.text_dim = visual_dim, text_dim
        self.net = nn.Sequential(nn.Linear(visual_dim + text_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.gate = nn.Parameter(torch.tensor(1.0))
        for name, dim in (("visual", visual_dim), ("text", text_dim)):
            self.register_buffer(f"{name}_shift", torch.zeros(dim), persistent=False)
            self.register_buffer(f"{name}_scale", torch.ones(dim), persistent=False)

    def set_statistics(self, visual: torch.Tensor, text: torch.Tensor) -> None:
        """Mean and std per dimension over the present rows of each table (as ``Projector.set_statistics``)."""
        for name, table in (("visual", visual), ("text", text)):
            stats = _feature_statistics(table)
            if stats is not None:
                setattr(self, f"{name}_shift", stats[0].to(getattr(self, f"{name}_shift")))
                setattr(self, f"{name}_scale", stats[1].to(getattr(self, f"{name}_scale")))

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``visual [..., Dv]``, ``text [..., Dt]`` raw feature rows (zero = missing) -> ``[..., hidden]``."""
        has_vis, has_txt = _present(visual), _present(text)
        z_vis = (visual - self.visual_shift) / self.visual_scale * has_vis.unsqueeze(-1)
        z_txt = (text - self.text_shift) / self.text_scale * has_txt.unsqueeze(-1)
        out = self.net(torch.cat([z_vis, z_txt], dim=-1)) * (has_vis | has_txt).unsqueeze(-1)
        return self.gate * out


class UR4RecV2MoE(nn.Module):
    """The seed's model class and constructor names; see the module docstring for the maths."""

    def __init__(self, num_items: int, sasrec_hidden_dim: int = 128, sasrec_num_blocks: int = 2,
                 sasrec_num_heads: int = 4, max_seq_len: int = 50, moe_num_heads: int = 8,
                 visual_dim: int = 512, text_dim: int = 384, dropout: float = 0.1,
                 gating_init: float = 0.01, contrastive_lambda: float = 0.5,
                 load_balance_lambda: float = 0.01, contrastive_temperature: float = 0.07,
                 visual_expert_heads: int = 1, standardise_features: bool = False,
                 content_item_side: bool = False, content_id_dropout: float = 0.0, use_router: bool = True,
                 candidate_retrieval: int = 0):
        super().__init__()
        hidden = sasrec_hidden_dim
        self.num_items, self.hidden, self.max_seq_len = num_items, hidden, max_seq_len
        self.visual_dim, self.text_dim = visual_dim, text_dim
        self.contrastive_lambda, self.load_balance_lambda = contrastive_lambda, load_balance_lambda
        self.temperature = contrastive_temperature
        self.sasrec = SASRec(num_items, hidden, sasrec_num_blocks, sasrec_num_heads, max_seq_len, dropout)
        self.proj_visual = Projector(visual_dim, hidden, standardise_features)
        self.proj_text = Projector(text_dim, hidden, standardise_features)
        self.visual_expert = MemoryAttention(hidden, visual_expert_heads)
        self.semantic_expert = MemoryAttention(hidden, moe_num_heads)
        self.vis_ln, self.sem_ln = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.router = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 2))
        self.gating_weight = nn.Parameter(torch.tensor(float(gating_init)))
        # item content (the same public table on every client); not part of the state dict
        self.register_buffer("item_visual", torch.zeros(0, visual_dim), persistent=False)
        self.register_buffer("item_text", torch.zeros(0, text_dim), persistent=False)
        # built last, and only when on: without it the model (its keys, its seeded init) is as before
        self.item_content = ContentTower(visual_dim, text_dim, hidden) if content_item_side else None
        if content_id_dropout and not content_item_side:
            raise ValueError("content_id_dropout needs content_item_side (it drops ID rows so content scores alone)")
        self.content_id_dropout = content_id_dropout
        self.use_router = use_router  # False: equal logits, the two experts mixed equally where both are usable
        # > 0: candidate-conditioned retrieval, each candidate reads at most this many memory entries
        # (the client memory's top_k): see _auxiliary_pooled
        self.candidate_retrieval = int(candidate_retrieval)
        self.register_buffer("item_combined", torch.zeros(0, visual_dim + text_dim), persistent=False)
        self.register_buffer("item_similarity", torch.zeros(0, 0), persistent=False)

    # ------------------------------------------------------------------ parameter groups
    def named_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in PARAM_GROUPS}
        for name, param in self.named_parameters():
            groups[group_of(name)].append((name, param))
        return groups

    def set_trainable(self, groups: tuple[str, ...] | list[str]) -> None:
        unknown = set(groups) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; known: {PARAM_GROUPS}")
        for name, param in self.named_parameters():
            param.requires_grad_(group_of(name) in groups)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live: every tensor fed to it is created there."""
        return self.gating_weight.device

    def group_state(self, groups: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """The state-dict entries of ``groups`` (what a client transmits), on the CPU: what travels,
        is aggregated and is saved never lives on an accelerator (on the CPU, the model's own tensors)."""
        return {k: v.cpu() for k, v in self.state_dict().items() if group_of(k) in groups}

    def copy_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Copy (part of) a state into this model's tensors in place: how a global state enters a model."""
        own = self.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False, groups=None):
        """Load, validating every expected key by group first (a clear error, never silent garbage).

        ``groups`` restricts loading to those groups (the others keep their current values).
        """
        if "model_state_dict" in state_dict:  # the seed's wrapped format
            state_dict = state_dict["model_state_dict"]
        own = self.state_dict()
        wanted = set(groups) if groups is not None else set(PARAM_GROUPS)
        if wanted - set(PARAM_GROUPS):  # a misspelt group would otherwise load nothing, silently
            raise CheckpointError(f"unknown parameter group(s) {sorted(wanted - set(PARAM_GROUPS))}; "
                                  f"known: {PARAM_GROUPS}")
        for key, value in own.items():
            group = group_of(key)
            if group not in wanted:
                continue
            if key not in state_dict:
                if strict or groups is not None:
                    raise CheckpointError(f"checkpoint is missing parameter group {group!r} (key {key!r})")
                continue
            if tuple(state_dict[key].shape) != tuple(value.shape):
                raise CheckpointError(f"parameter group {group!r}: key {key!r} has shape "
                                      f"{tuple(state_dict[key].shape)}, the model expects {tuple(value.shape)}")
        selected = {k: v for k, v in state_dict.items() if k in own and group_of(k) in wanted}
        if strict and groups is None:
            extra = sorted(set(state_dict) - set(own))
            if extra:
                raise CheckpointError(f"checkpoint has keys this model does not know: {extra[:5]}")
        return super().load_state_dict(selected, strict=False, assign=assign)

    # ------------------------------------------------------------------ item content
    def set_item_features(self, visual: torch.Tensor | None, text: torch.Tensor | None) -> None:
        """Attach the item feature tables ``[num_items, D]`` (zero rows = missing)."""
        for name, table, dim in (("item_visual", visual, self.visual_dim), ("item_text", text, self.text_dim)):
            if table is None:
                table = torch.zeros(self.num_items, dim, device=self.device)
            if tuple(table.shape) != (self.num_items, dim):
                raise ValueError(f"{name} must be [{self.num_items}, {dim}], got {tuple(table.shape)}")
            setattr(self, name, table.float().to(self.device))
        self.proj_visual.set_statistics(self.item_visual)
        self.proj_text.set_statistics(self.item_text)
        if self.item_content is not None:
            self.item_content.set_statistics(self.item_visual, self.item_text)
        if self.candidate_retrieval:
            self.item_combined = combined_content(self.item_visual, self.item_text)
            if self.num_items <= self.SIMILARITY_TABLE_ITEMS:  # item x item cosines: a gather, not a 1,664-d product
                self.item_similarity = self.item_combined @ self.item_combined.T

    def _lookup(self, table: torch.Tensor, items: torch.Tensor, dim: int) -> torch.Tensor:
        if table.shape[0] == 0:
            return torch.zeros(*items.shape, dim, device=items.device)
        return table[items]

    # ------------------------------------------------------------------ the candidate side
    def content_table(self) -> torch.Tensor | None:
        """:class:`ContentTower`'s term for every item ``[num_items, D]`` (None when ``content_item_side`` is off)."""
        if self.item_content is None:
            return None
        tables = [table if table.shape[0] else torch.zeros(self.num_items, dim, device=self.device)
                  for table, dim in ((self.item_visual, self.visual_dim), (self.item_text, self.text_dim))]
        return self.item_content(*tables)

    def candidate_emb(self, items: torch.Tensor, content: torch.Tensor | None = None,
                      id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """What a candidate's SASRec score reads: ``E[c]``, plus its content term with ``content_item_side``
        (``content``: :meth:`content_table`, when the caller has it; ``id_keep [num_items]``: training's
        ID dropout, :meth:`id_keep_mask`)."""
        emb = self.sasrec.item_emb(items)
        if self.item_content is None:
            return emb
        if id_keep is not None:
            emb = emb * id_keep[items].unsqueeze(-1)
        return emb + (self.content_table() if content is None else content)[items]

    def id_keep_mask(self) -> torch.Tensor | None:
        """Training only, with ``content_id_dropout`` p: which items keep their ID row in this step
        (each is dropped with probability p, for every position and role of the step), so the content
        term learns to score an item alone, as a new item is scored (DropoutNet, Volkovs et al., 2017).
        None in evaluation mode or at p = 0: the scoring rule is then :meth:`score`'s."""
        if not (self.training and self.content_id_dropout > 0 and self.item_content is not None):
            return None
        return (torch.rand(self.num_items, device=self.device) >= self.content_id_dropout).float()

    # ------------------------------------------------------------------ the model
    def encode(self, input_seq: torch.Tensor) -> torch.Tensor:
        """``LN(seq_out)`` at every position: ``[B, L, D]``."""
        return self.sasrec.seq_ln(self.sasrec(input_seq))

    def auxiliary(self, items: torch.Tensor, memory_visual: torch.Tensor | None,
                  memory_text: torch.Tensor | None, target_visual: torch.Tensor | None = None,
                  target_text: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                  dedupe: bool = True, tables: dict | None = None,
                  memory_pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per (user, candidate) auxiliary score term, router weights and load-balance loss.

        items ``[B, C]``; memory ``[B, K, Dv]`` / ``[B, K, Dt]``; returns ``bonus [B, C]``,
        ``weights [B, C, 2]`` and a scalar. All zero when there is no memory. ``tables``
        (:meth:`projected_tables`) are the candidates' projections, precomputed for every item.
        ``memory_pool [B, K]`` (candidate-conditioned retrieval): see :meth:`_auxiliary_pooled`.
        """
        batch, cands = items.shape
        zero = items.new_zeros((batch, cands), dtype=torch.float)
        if memory_visual is None and memory_text is None:
            return zero, zero.unsqueeze(-1).expand(-1, -1, 2), zero.sum()
        if memory_visual is None:
            memory_visual = memory_text.new_zeros(*memory_text.shape[:2], self.visual_dim)
        if memory_text is None:
            memory_text = memory_visual.new_zeros(*memory_visual.shape[:2], self.text_dim)
        usable_vis, usable_txt = _present(memory_visual), _present(memory_text)
        if memory_mask is not None:
            usable_vis, usable_txt = usable_vis & memory_mask, usable_txt & memory_mask
        mem_vis, mem_txt = self.proj_visual(memory_visual), self.proj_text(memory_text)
        # full ranking gives every row the same candidates: the item-only terms (projections, queries,
        # router logits) are then computed once, on one row, and broadcast over the users
        if batch > 1 and items.stride(0) == 0 and target_visual is None and target_text is None:
            items = items[:1]
        if memory_pool is not None:
            return self._auxiliary_pooled(items, batch, cands, memory_visual, memory_text, mem_vis, mem_txt,
                                          usable_vis, usable_txt, target_visual, target_text, memory_pool, dedupe,
                                          tables)
        tables = tables or {}
        tgt_vis, has_tvis = self._item_side(items, self.item_visual, target_visual, self.proj_visual, dedupe,
                                            tables.get("visual"))
        tgt_txt, _ = self._item_side(items, self.item_text, target_text, self.proj_text, dedupe, tables.get("text"))

        target_emb = self.sasrec.item_emb(items)
        per_item = {key: tables[key][items] for key in ("visual_query", "semantic_query", "router") if key in tables}
        vis = self.vis_ln(self.visual_expert(tgt_vis, mem_vis, usable_vis, per_item.get("visual_query")))
        sem = self.sem_ln(self.semantic_expert(target_emb, mem_txt, usable_txt, per_item.get("semantic_query")))

        available = torch.stack([has_tvis & usable_vis.any(1, keepdim=True),
                                 usable_txt.any(1, keepdim=True).expand(-1, cands)], dim=-1)
        return self._mix(available, per_item, tgt_vis, tgt_txt, vis, sem, target_emb)

    POOLED_BLOCK = 1 << 24  # evaluation: (row, head, candidate, entry) attention cells per candidate block
    SIMILARITY_TABLE_ITEMS = 16384  # candidate retrieval keeps an item x item cosine table up to this catalogue

    def _auxiliary_pooled(self, items, batch, cands, memory_visual, memory_text, mem_vis, mem_txt, usable_vis,
                          usable_txt, target_visual, target_text, memory_pool, dedupe,
                          tables) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`auxiliary` with candidate-conditioned retrieval (``memory_retrieval = "candidate"``).

        ``memory_pool [B, K, 2]`` (or ``[B, K]``, the first part alone): ``[..., 0]`` is 0 for entries every
        candidate reads (the short-term share, the global prototypes, empty slots), and for a long-term
        pool entry the number ``n`` of pool entries each candidate reads; ``[..., 1]`` the pool entry's
        item id. Candidate ``c`` of row ``b`` reads the ``n`` pool entries whose combined content
        (``norm([norm(visual); norm(text)])``, the memory's own similarity) is closest to ``c``'s: read
        from the item x item cosine table when the ids are given and the catalogue is small enough
        (``SIMILARITY_TABLE_ITEMS``), else computed from the feature rows (the same cosines). The
        seed's "LT entries ranked by similarity to the target item", with every candidate (positive,
        negative, catalogue item) treated alike, in training and in evaluation. The selection is a
        discrete mask, without gradient. Without gradient (evaluation) the candidates are processed in
        blocks so that the ``[B, heads, C, K]`` attention stays bounded. (Gathering each candidate's ~2 top_k
        entries instead of masking K was measured 5x slower on CPU: the masked batched matmuls win.)
        ``items`` may be one row broadcast over the ``batch`` rows (:meth:`auxiliary`); ``mem_*`` are the
        projected memory entries and ``usable_*`` their masks."""
        pool_items = None
        if memory_pool.dim() == 3:
            memory_pool, pool_items = memory_pool[..., 0], memory_pool[..., 1]
        table = pool_items is not None and self.item_similarity.shape[0] > 0
        mem_comb = None if table else combined_content(memory_visual, memory_text)  # [B, K, Dv + Dt]
        pool = memory_pool > 0
        budget = memory_pool.max(-1).values  # [B]: pool entries each candidate reads
        entries = memory_visual.shape[1]
        reads = min(entries, max(self.candidate_retrieval, 1))
        width = cands
        if not torch.is_grad_enabled():
            width = max(1, self.POOLED_BLOCK // max(1, batch * entries * self.semantic_expert.heads))
        tables = tables or {}
        vis_kv, sem_kv = self.visual_expert.keys_values(mem_vis), self.semantic_expert.keys_values(mem_txt)
        bonuses, weights_out, balances = [], [], []
        for lo in range(0, cands, width):
            part = items[:, lo:lo + width]
            t_vis = None if target_visual is None else target_visual[:, lo:lo + width]
            t_txt = None if target_text is None else target_text[:, lo:lo + width]
            count = part.shape[1]
            tgt_vis, has_tvis = self._item_side(part, self.item_visual, t_vis, self.proj_visual, dedupe,
                                                tables.get("visual"))
            tgt_txt, _ = self._item_side(part, self.item_text, t_txt, self.proj_text, dedupe, tables.get("text"))
            with torch.no_grad():
                if table and t_vis is None and t_txt is None:
                    sims = self.item_similarity[part.unsqueeze(-1), pool_items.unsqueeze(1)]  # [B, c, K]
                else:
                    if mem_comb is None:
                        mem_comb = combined_content(memory_visual, memory_text)
                    if t_vis is None and t_txt is None and self.item_combined.shape[0]:
                        cand_comb = self.item_combined[part]
                    else:
                        vis = t_vis if t_vis is not None else self._lookup(self.item_visual, part, self.visual_dim)
                        txt = t_txt if t_txt is not None else self._lookup(self.item_text, part, self.text_dim)
                        cand_comb = combined_content(vis, txt)
                    sims = cand_comb @ mem_comb.transpose(-1, -2)
                sims = sims.masked_fill(~pool.unsqueeze(1), float("-inf"))
                top = sims.topk(reads, dim=-1).indices  # [B, c, reads]
                take = (torch.arange(reads, device=items.device) < budget.unsqueeze(-1)).float()  # [B, reads]
                chosen = torch.zeros_like(sims).scatter(-1, top, take.unsqueeze(1).expand_as(top).contiguous()) > 0
                visible = chosen | ~pool.unsqueeze(1)  # [B, c, K]
            see_vis, see_txt = visible & usable_vis.unsqueeze(1), visible & usable_txt.unsqueeze(1)
            target_emb = self.sasrec.item_emb(part)
            per_item = {key: tables[key][part] for key in ("visual_query", "semantic_query", "router") if key in tables}
            vis = self.vis_ln(self.visual_expert(tgt_vis, mem_vis, see_vis, per_item.get("visual_query"), vis_kv))
            sem = self.sem_ln(self.semantic_expert(target_emb, mem_txt, see_txt, per_item.get("semantic_query"), sem_kv))
            available = torch.stack([has_tvis & see_vis.any(-1), see_txt.any(-1)], dim=-1)
            bonus, weights, balance = self._mix(available, per_item, tgt_vis, tgt_txt, vis, sem, target_emb)
            bonuses.append(bonus)
            weights_out.append(weights)
            balances.append(balance * count / cands)
        if len(bonuses) == 1:
            return bonuses[0], weights_out[0], balances[0]
        return torch.cat(bonuses, 1), torch.cat(weights_out, 1), torch.stack(balances).sum()

    def _mix(self, available: torch.Tensor, per_item: dict, tgt_vis: torch.Tensor, tgt_txt: torch.Tensor,
             vis: torch.Tensor, sem: torch.Tensor,
             target_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gated bonus ``g * <mix, E[c]>``, the router's weights over the usable experts and the
        load-balance loss over candidates where both experts are available (masked: vmap-safe)."""
        if not self.use_router:
            router = torch.zeros_like(available, dtype=tgt_txt.dtype)
        elif "router" in per_item:
            router = per_item["router"]
        else:
            router = self.router(torch.cat([tgt_vis, tgt_txt], dim=-1))
        weights = torch.softmax(torch.where(available, router, -1e4), dim=-1) * available
        aux = weights[..., :1] * vis + weights[..., 1:] * sem
        both = available.all(-1).unsqueeze(-1).float()
        usage = (weights * both).sum((0, 1)) / both.sum().clamp_min(1.0)
        load_balance = (2.0 * (usage ** 2).sum() - 1.0) * (both.sum() > 0).float()  # 0 at an even split
        return self.gating_weight * (aux * target_emb).sum(-1), weights, load_balance

    def projected_tables(self) -> dict:
        """Every item-only term of :meth:`auxiliary`, once per item: the projected visual and text
        features (zero when missing) with their presence, the experts' queries, the router logits.

        Training scores ``B x (L + N)`` (row, candidate) pairs per client and step; when the
        catalogue is smaller than that, computing these per item and gathering is cheaper, and
        the ``[B, L + N, 1280]`` gathered raw features (the largest tensor of a Stage 3 step,
        kept for the backward pass) never exist.
        """
        out = {}
        for name, table, proj in (("visual", self.item_visual, self.proj_visual), ("text", self.item_text, self.proj_text)):
            present = _present(table)
            out[name] = (proj(table) * present.unsqueeze(-1), present)
        out["visual_query"] = self.visual_expert.q(out["visual"][0])
        out["semantic_query"] = self.semantic_expert.q(self.sasrec.item_emb.weight)
        out["router"] = self.router(torch.cat([out["visual"][0], out["text"][0]], dim=-1))
        if self.item_content is not None:
            out["content"] = self.content_table()
        return out

    def _item_side(self, items: torch.Tensor, table: torch.Tensor, given: torch.Tensor | None,
                   proj: nn.Module, dedupe: bool = True,
                   projected: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected candidate features (zero when missing) and their presence, ``[B, C, D]``, ``[B, C]``.

        ``given`` features are per (row, candidate) and used as given, never swapped for another
        row's features of the same item id; rows broadcast along the batch are projected once.
        Table lookups, with ``dedupe``, look up and project each distinct item once: full ranking
        repeats every item in every row, and gathering ``[B, num_items, 1280]`` raw features
        would dominate the cost. Training turns ``dedupe`` off (``torch.unique`` cannot be vmapped).
        """
        if given is not None:
            if given.dim() == 3 and given.stride(0) == 0:  # the same candidates for every row
                given = given[:1]
            present = _present(given)
            projected = proj(given) * present.unsqueeze(-1)
            return projected.expand(*items.shape, -1), present.expand(items.shape)
        if projected is not None:  # precomputed for every item (projected_tables)
            return projected[0][items], projected[1][items]
        if not dedupe:
            features = self._lookup(table, items, proj[0].in_features)
            present = _present(features)
            return proj(features) * present.unsqueeze(-1), present
        unique, inverse = torch.unique(items.reshape(-1), return_inverse=True)
        features = self._lookup(table, unique, proj[0].in_features)
        present = _present(features)
        projected = proj(features) * present.unsqueeze(-1)
        return projected[inverse].view(*items.shape, -1), present[inverse].view(items.shape)

    def score(self, hidden: torch.Tensor, items: torch.Tensor, memory_visual=None, memory_text=None,
              target_visual=None, memory_mask=None, tables: dict | None = None,
              shared_candidates: bool = False, memory_pool: torch.Tensor | None = None) -> torch.Tensor:
        """The one scoring rule. ``hidden [B, D]`` (a position), ``items [B, C]`` -> ``[B, C]``
        (``tables``: :meth:`projected_tables`, when the caller scores many batches with one model;
        ``shared_candidates``: every row scores the same items, a catalogue block: one matrix product
        instead of ``[B, C, D]`` products)."""
        bonus, _, _ = self.auxiliary(items, memory_visual, memory_text, target_visual, memory_mask=memory_mask,
                                     tables=tables, memory_pool=memory_pool)
        content = (tables or {}).get("content")
        if shared_candidates and items.stride(0) == 0:
            return hidden @ self.candidate_emb(items[0], content).T + bonus
        return (hidden.unsqueeze(1) * self.candidate_emb(items, content)).sum(-1) + bonus

    def forward(self, user_ids=None, input_seq: torch.Tensor = None, target_items: torch.Tensor = None,
                target_visual: torch.Tensor | None = None, memory_visual: torch.Tensor | None = None,
                memory_text: torch.Tensor | None = None, training_mode: bool = False,
                memory_mask: torch.Tensor | None = None, memory_pool: torch.Tensor | None = None) -> torch.Tensor:
        """The seed's call: the last position's scores for ``target_items``.

        ``training_mode=False``: ``target_items [B, N]`` -> ``[B, N]``. ``training_mode=True``:
        ``target_items [B]`` (one target per sequence) -> ``[B, B]``, every target scored for every
        sequence (in-batch negatives), ``target_visual`` then ``[B, Dv]``.
        """
        hidden = self.encode(input_seq)[:, -1]
        if training_mode:
            batch = target_items.shape[0]
            target_items = target_items.reshape(1, batch).expand(batch, batch)
            if target_visual is not None:
                target_visual = target_visual.unsqueeze(0).expand(batch, -1, -1)
        return self.score(hidden, target_items, memory_visual, memory_text, target_visual, memory_mask,
                          memory_pool=memory_pool)

    # ------------------------------------------------------------------ training losses
    def losses(self, input_seq: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
               memory_visual: torch.Tensor | None = None, memory_text: torch.Tensor | None = None,
               memory_mask: torch.Tensor | None = None, align_items: torch.Tensor | None = None,
               detach_negatives: bool = False, objective: str = "sampled_softmax",
               catalogue: torch.Tensor | None = None, gbce_t: float = 0.75,
               memory_pool: torch.Tensor | None = None, position_losses: bool = False) -> dict[str, torch.Tensor]:
        """Next-item loss at every position plus the auxiliary losses, returned separately.

        input_seq/positives ``[B, L]`` (positives[b, t] follows input_seq[b, t]; 0 = no target),
        negatives ``[B, N]`` shared by the positions of a sequence. ``objective``:

        * ``sampled_softmax``: softmax cross-entropy over (positive, negatives); a negative equal to
          the positive is masked out.
        * ``full_softmax``: softmax cross-entropy over the whole catalogue: every item row is a
          candidate except padding (row 0) and, when ``catalogue`` (bool ``[num_items]``) is given,
          the rows it marks False (items that never occur). ``negatives`` are not used.
        * ``gbce``: gSASRec's generalised BCE (Petrov & Macdonald, 2023) over the sampled negatives:
          ``-beta * log sigmoid(s+) - sum log(1 - sigmoid(s-))`` with
          ``beta = alpha (t (1 - 1/alpha) + 1/alpha)``, ``alpha = N / (catalogue size - 1)``.

        The experts' bonus (a per (user, candidate) term) is added to every candidate's logit, for the
        full catalogue too. ``align_items`` ``[A]`` (0 = padding) are the items the InfoNCE alignment
        runs over. Everything is masked rather than indexed, so a batch of clients can run under
        ``torch.func.vmap``. ``detach_negatives``: only the positives' embedding rows get gradient
        (full softmax: the normaliser's rows are detached too, except the target's own logit).
        ``memory_pool``: candidate-conditioned retrieval (:meth:`_auxiliary_pooled`; not with the full
        softmax). ``position_losses``: also return ``"position_loss" [B, L]``, each position's detached
        next-item loss (what the surprise trigger reads).
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
        hidden = self.encode(input_seq)
        uses_memory = memory_visual is not None or memory_text is not None
        valid = (positives != 0).float()
        count = valid.sum().clamp_min(1.0)
        if objective == "full_softmax":
            if memory_pool is not None:
                raise ValueError("candidate-conditioned retrieval (memory_pool) is not built for the full softmax")
            return self._full_softmax(hidden, positives, memory_visual, memory_text, memory_mask, align_items,
                                      detach_negatives, catalogue, valid, count, position_losses)
        tables = content = id_keep = None
        whole_catalogue = uses_memory and 0 < self.num_items <= positives.numel() + negatives.numel()
        if self.item_content is not None:  # the content tower's term enters the candidates' embeddings
            tables = self.projected_tables() if whole_catalogue else None
            content = tables["content"] if tables is not None else self.content_table()
            id_keep = self.id_keep_mask()
        # (without the tower, the order of operations is the former one: gradients bit for bit as before)
        pos_emb, neg_emb = self.candidate_emb(positives, content, id_keep), self.candidate_emb(negatives, content, id_keep)
        if detach_negatives:
            neg_emb = neg_emb.detach()
        pos_logit = (hidden * pos_emb).sum(-1)
        neg_logit = torch.einsum("bld,bnd->bln", hidden, neg_emb)
        if whole_catalogue and tables is None:
            tables = self.projected_tables()  # one projection of the catalogue serves both calls
        pos_bonus, pos_w, lb_pos = self.auxiliary(positives, memory_visual, memory_text, memory_mask=memory_mask,
                                                  dedupe=False, tables=tables, memory_pool=memory_pool)
        neg_bonus, _, lb_neg = self.auxiliary(negatives, memory_visual, memory_text, memory_mask=memory_mask,
                                              dedupe=False, tables=tables, memory_pool=memory_pool)
        pos_logit = pos_logit + pos_bonus
        neg_logit = neg_logit + neg_bonus.unsqueeze(1)
        same = negatives.unsqueeze(1) == positives.unsqueeze(-1)
        if objective == "gbce":
            size = (int(catalogue.sum()) if catalogue is not None else self.num_items - 1)
            alpha = negatives.shape[-1] / max(size - 1, 1)
            beta = alpha * (gbce_t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
            per_position = -beta * F.logsigmoid(pos_logit) - (F.logsigmoid(-neg_logit) * (~same).float()).sum(-1)
            next_item = (per_position * valid).sum() / count
        else:
            neg_logit = neg_logit.masked_fill(same, float("-inf"))
            logits = torch.cat([pos_logit.unsqueeze(-1), neg_logit], dim=-1)
            per_position = torch.logsumexp(logits, -1) - logits[..., 0]
            next_item = (per_position * valid).sum() / count
        out = self._total(next_item, 0.5 * (lb_pos + lb_neg), align_items, pos_w, valid, count)
        if position_losses:
            out["position_loss"] = (per_position * valid).detach()
        return out

    def _full_softmax(self, hidden, positives, memory_visual, memory_text, memory_mask, align_items,
                      detach_negatives, catalogue, valid, count, position_losses=False) -> dict[str, torch.Tensor]:
        """Cross-entropy of each position's next item against every catalogue row ``[B, L, num_items]``."""
        rows = torch.arange(self.num_items, device=positives.device)
        content, id_keep = self.content_table(), self.id_keep_mask()
        weight = self.sasrec.item_emb.weight if id_keep is None else self.sasrec.item_emb.weight * id_keep.unsqueeze(-1)
        weight = weight if content is None else weight + content
        allowed = rows != 0
        if catalogue is not None:
            allowed = allowed & catalogue
        logits = hidden @ (weight.detach() if detach_negatives else weight).T  # [B, L, I]
        target = positives.unsqueeze(-1)
        pos_logit = (hidden * self.candidate_emb(positives, content, id_keep)).sum(-1)
        uses_memory = memory_visual is not None or memory_text is not None
        pos_w = hidden.new_zeros((*positives.shape, 2))
        load_balance = hidden.new_zeros(())
        if uses_memory:
            tables = self.projected_tables()
            everything = rows.unsqueeze(0).expand(positives.shape[0], -1)
            bonus, _, load_balance = self.auxiliary(everything, memory_visual, memory_text, memory_mask=memory_mask,
                                                    dedupe=False, tables=tables)  # [B, I]
            logits = logits + bonus.unsqueeze(1)
            pos_bonus, pos_w, _ = self.auxiliary(positives, memory_visual, memory_text, memory_mask=memory_mask,
                                                 dedupe=False, tables=tables)
            pos_logit = pos_logit + pos_bonus
        if detach_negatives:  # the target's own column keeps its gradient
            logits = torch.where(rows == target, pos_logit.unsqueeze(-1), logits)
        logits = logits.masked_fill(~allowed, float("-inf"))
        per_position = torch.logsumexp(logits, -1) - pos_logit
        next_item = (per_position * valid).sum() / count
        out = self._total(next_item, load_balance, align_items, pos_w, valid, count)
        if position_losses:
            out["position_loss"] = (per_position * valid).detach()
        return out

    def _total(self, next_item, load_balance, align_items, pos_w, valid, count) -> dict[str, torch.Tensor]:
        if align_items is not None:
            contrastive = self.alignment_loss(align_items)
        else:
            contrastive = next_item.new_zeros(())
        total = next_item + self.load_balance_lambda * load_balance + self.contrastive_lambda * contrastive
        usage = (pos_w * valid.unsqueeze(-1)).sum((0, 1)) / count
        return {"loss": total, "next_item": next_item.detach(), "load_balance": load_balance.detach(),
                "contrastive": contrastive.detach(), "router_usage": usage.detach()}

    def alignment_loss(self, items: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between each item's projected visual and text features.

        ``items [A]``: rows that are padding (0), lack a modality or repeat an earlier item are
        masked out, so the loss is the same as over the distinct items with both modalities.
        """
        visual = self._lookup(self.item_visual, items, self.visual_dim)
        text = self._lookup(self.item_text, items, self.text_dim)
        same = items.unsqueeze(0) == items.unsqueeze(1)
        first = ~(same & torch.ones_like(same).tril(-1)).any(1)  # first occurrence of each item
        keep = _present(visual) & _present(text) & (items != 0) & first
        zv = F.normalize(self.proj_visual(visual), dim=-1)
        zt = F.normalize(self.proj_text(text), dim=-1)
        logits = (zv @ zt.T / self.temperature).masked_fill(~(keep.unsqueeze(0) & keep.unsqueeze(1)), -1e4)
        diag = logits.diagonal()
        row = torch.logsumexp(logits, 1) - diag
        col = torch.logsumexp(logits, 0) - diag
        count = keep.float().sum()
        loss = ((row + col) * 0.5 * keep.float()).sum() / count.clamp_min(1.0)
        return loss * (count >= 2).float()
