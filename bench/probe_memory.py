"""Cheap probes of why Stage 3's memory adds nothing (issue #14): one trained Stage 1 -> Stage 3 pair.

    .venv/bin/python bench/probe_memory.py --data ../shared/data/ml-1m --features runs/features \
        --stage1 RUN1 --stage3 RUN3 [--probes collapse movement gradients candidate] [--users 200] [--json OUT]

Probes (each prints a small table; ``--json`` writes every number):

  collapse   (hypothesis a) raw and projected item features: mean pairwise cosine of the unit vectors
             (1 = all items the same direction); for ``--users`` users x 500 candidates, the cosine
             between the experts' output vectors of different users (same candidate) and of different
             candidates (same user), and a two-way decomposition of the bonus ``<aux, E[c]>`` into an
             item-only, a user-only and an interaction share of its variance; the bonus's spread
             against SASRec's own score spread (per user, over candidates).
  movement   (hypothesis b) per new parameter group: distance of Stage 3's best model from its fresh
             initialisation, against the Adam bound ``lr x (local steps per round) x rounds`` per
             coordinate; and one round from the Stage 3 init on 20 clients: each client's update and
             the averaged update (RMS per coordinate) as a share of that bound.
  gradients  (hypothesis c) one local batch of 8 clients, at Stage 3's init and at its best model:
             the norm of the gradient of the next-item loss and of ``contrastive_lambda x InfoNCE``
             on each new group.
  candidate  (hypothesis d) content on the candidate side, without training: a ridge map from an
             item's (centred) content features to its Stage 1 ID embedding, fitted on warm items (the
             ridge strength chosen on 10 % held-out warm items); new items (or, for a reference, every
             item) are scored by SASRec's user representation against the mapped embedding. Needs a
             Stage 1 run trained under the new-item protocol to say anything about new items.

Full-ranking metrics use ``feddmmr.evaluation.evaluate`` (test split, the run's new-item protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import start_bench  # noqa: E402

NEW_GROUPS = ("projectors", "experts", "router", "gate")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--stage1", type=Path, required=True, help="a Stage 1 run directory")
    p.add_argument("--stage3", type=Path, default=None, help="a Stage 3 run started from --stage1")
    p.add_argument("--probes", nargs="+", default=["collapse", "movement", "gradients", "candidate"],
                   choices=["collapse", "movement", "gradients", "candidate"])
    p.add_argument("--users", type=int, default=200, help="users for the collapse probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- loading

def load(args):
    from feddmmr.config import TrainConfig, apply_overrides
    from feddmmr.data.dataset import load_dataset
    from feddmmr.engine.assemble import assemble, data_for
    from feddmmr.federation import checkpoint as ckpt

    saved1 = ckpt.read_run_config(args.stage1)
    data = load_dataset(args.data, top_users=saved1["train"]["top_users"])
    parts = {"stage1": args.stage1}
    if args.stage3 is not None:
        saved3 = ckpt.read_run_config(args.stage3)
        config3 = apply_overrides(TrainConfig(), saved3["train"], "stage3")
        fresh = assemble(config3, data, args.features, args.stage1)  # Stage 3 as it started: Stage 1 + fresh groups
        trained, _ = ckpt.load_model(args.stage3)
        trained.set_item_features(fresh.content.visual, fresh.content.text)
        parts.update(config3=config3, fresh=fresh, trained=trained)
    config1 = apply_overrides(TrainConfig(), saved1["train"], "stage1")
    stage1, _ = ckpt.load_model(args.stage1)
    parts.update(data=data_for(config1, data), config1=config1, stage1_model=stage1)
    return parts


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of the (non-zero) rows: (|sum u|^2 - n) / (n (n - 1))."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    unit = unit[unit.norm(dim=-1) > 0]
    n = len(unit)
    return float((unit.sum(0).norm() ** 2 - n) / (n * (n - 1)))


def two_way_shares(matrix: torch.Tensor) -> dict:
    """Variance shares of ``[users, items]``: item main effect, user main effect, interaction."""
    m = matrix.double()
    total = ((m - m.mean()) ** 2).mean()
    item = ((m.mean(0) - m.mean()) ** 2).mean()
    user = ((m.mean(1) - m.mean()) ** 2).mean()
    return {"item_share": float(item / total), "user_share": float(user / total),
            "interaction_share": float(1 - (item + user) / total)}


# --------------------------------------------------------------------------- (a) collapse

def expert_outputs(model, items: torch.Tensor, memory_visual, memory_text):
    """The experts' combined output ``aux [B, C, D]`` and the bonus ``<aux, E[c]>`` (gate excluded),
    the same computation as ``UR4RecV2MoE.auxiliary``."""
    from feddmmr.models.moe import _present

    usable_vis, usable_txt = _present(memory_visual), _present(memory_text)
    mem_vis, mem_txt = model.proj_visual(memory_visual), model.proj_text(memory_text)
    tgt_vis, has_tvis = model._item_side(items, model.item_visual, None, model.proj_visual)
    tgt_txt, _ = model._item_side(items, model.item_text, None, model.proj_text)
    target_emb = model.sasrec.item_emb(items)
    vis = model.vis_ln(model.visual_expert(tgt_vis, mem_vis, usable_vis))
    sem = model.sem_ln(model.semantic_expert(target_emb, mem_txt, usable_txt))
    cands = items.shape[1]
    available = torch.stack([has_tvis & usable_vis.any(1, keepdim=True),
                             usable_txt.any(1, keepdim=True).expand(-1, cands)], dim=-1)
    logits = torch.where(available, model.router(torch.cat([tgt_vis, tgt_txt], dim=-1)), -1e4)
    weights = torch.softmax(logits, dim=-1) * available
    aux = weights[..., :1] * vis + weights[..., 1:] * sem
    return aux, (aux * target_emb).sum(-1), weights


def probe_collapse(parts, args) -> dict:
    from feddmmr.data.dataset import SequenceDataset  # noqa: F401
    from feddmmr.federation.client import build_clients

    fresh, trained, data, config = parts["fresh"], parts["trained"], parts["data"], parts["config3"]
    out = {}
    for name, table in (("visual", fresh.content.visual), ("text", fresh.content.text)):
        rows = table[torch.from_numpy(data.warm_items())]
        centred = rows - rows[rows.norm(dim=-1) > 0].mean(0)
        with torch.no_grad():
            proj = trained.proj_visual if name == "visual" else trained.proj_text
            proj0 = fresh.model.proj_visual if name == "visual" else fresh.model.proj_text
            present = rows.norm(dim=-1) > 0
            out[f"{name}_raw_mean_cos"] = mean_pairwise_cosine(rows[present])
            out[f"{name}_centred_mean_cos"] = mean_pairwise_cosine(centred[present])
            out[f"{name}_projected_init_mean_cos"] = mean_pairwise_cosine(proj0(rows[present]))
            out[f"{name}_projected_trained_mean_cos"] = mean_pairwise_cosine(proj(rows[present]))
            # the cures, at init: centred inputs; standardised inputs (z-score per dimension)
            standard = centred[present] / centred[present].std(0).clamp_min(1e-6)
            out[f"{name}_projected_init_mean_cos_centred"] = mean_pairwise_cosine(proj0(centred[present]))
            out[f"{name}_projected_init_mean_cos_standardised"] = mean_pairwise_cosine(proj0(standard))
            out[f"{name}_input_norm_raw_centred_standardised"] = [
                float(rows[present].norm(dim=-1).mean()), float(centred[present].norm(dim=-1).mean()),
                float(standard.norm(dim=-1).mean())]
            last = proj0[-1]
            out[f"{name}_init_output_bias_norm_over_output_norm"] = float(
                last.bias.norm() / proj0(rows[present]).norm(dim=-1).mean())
    users = np.arange(min(args.users, data.num_users))
    clients = build_clients(data, config.max_seq_len, fresh.memory_config, fresh.space, users, seed=config.seed)
    memory_ids = np.stack([clients[int(u)].eval_memory["test"] for u in users])
    memory_visual, memory_text = fresh.content.memory(memory_ids, None)
    rng = np.random.default_rng(0)
    items = torch.from_numpy(np.sort(rng.choice(data.warm_items(), 500, replace=False)))
    seq = torch.from_numpy(data.padded_inputs("test", users, config.max_seq_len))
    for tag, model in (("init", fresh.model), ("trained", trained)):
        model.eval()
        with torch.no_grad():
            aux, bonus, weights = expert_outputs(model, items.expand(len(users), -1), memory_visual, memory_text)
            hidden = model.encode(seq)[:, -1]
            sasrec = hidden @ model.sasrec.item_emb(items).T
        unit = torch.nn.functional.normalize(aux.double(), dim=-1)
        # cosine of different users' outputs for the same candidate, and of different candidates for one user
        across_users = float(np.mean([mean_pairwise_cosine(aux[:, c]) for c in range(0, aux.shape[1], 10)]))
        across_items = float(np.mean([mean_pairwise_cosine(aux[u]) for u in range(0, aux.shape[0], 4)]))
        gate = float(model.gating_weight.detach())
        out[tag] = {"gate": gate, "aux_cos_across_users": across_users, "aux_cos_across_items": across_items,
                    "aux_mean_norm": float(aux.norm(dim=-1).mean()),
                    "aux_global_mean_norm_share": float(unit.mean((0, 1)).norm()),
                    "bonus": two_way_shares(bonus), "sasrec": two_way_shares(sasrec),
                    "bonus_std_over_sasrec_std": float((gate * bonus).std(1).mean() / sasrec.std(1).mean()),
                    "router_visual_mean": float(weights[..., 0].mean())}
    return out


# --------------------------------------------------------------------------- (b) movement

def group_vectors(model, groups) -> dict[str, torch.Tensor]:
    from feddmmr.models.groups import group_of

    out: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    for name, param in model.named_parameters():
        group = group_of(name)
        if group in out:
            out[group].append(param.detach().reshape(-1))
    return {g: torch.cat(v) for g, v in out.items() if v}


def steps_per_round(parts) -> float:
    from feddmmr.federation.client import training_windows

    data, config = parts["data"], parts["config3"]
    counts = [len(training_windows(data.sequence(u)[:-2], config.max_seq_len)[0]) for u in range(data.num_users)]
    return float(np.mean([config.local_epochs * math.ceil(c / config.batch_size) for c in counts]))


def probe_movement(parts, args) -> dict:
    from feddmmr.engine.assemble import client_seed
    from feddmmr.federation.server import aggregate

    fresh, trained, config = parts["fresh"], parts["trained"], parts["config3"]
    history = json.loads((args.stage3 / "train_history.json").read_text())
    best = history["best_round"]
    steps = steps_per_round(parts)
    bound = config.learning_rate * steps  # Adam moves a coordinate at most ~lr per step
    start, end = group_vectors(fresh.model, NEW_GROUPS + ("backbone",)), group_vectors(trained, NEW_GROUPS + ("backbone",))
    out = {"local_steps_per_round": steps, "lr": config.learning_rate, "best_round": best,
           "gate_per_round": [r.get("gate") for r in history["rounds"]], "groups": {}}
    for group in start:
        delta = end[group] - start[group]
        rms = float(delta.pow(2).mean().sqrt())
        out["groups"][group] = {"params": int(delta.numel()), "init_rms": float(start[group].pow(2).mean().sqrt()),
                                "moved_rms": rms, "moved_over_init": rms / max(float(start[group].pow(2).mean().sqrt()), 1e-12),
                                "moved_over_bound": rms / (bound * best)}
    # one round from the Stage 3 init on 20 clients: each client's update and their average
    clients = fresh.build_clients(np.arange(20))
    trainer = fresh.trainer()
    global_state = fresh.model.group_state(config.transmitted_groups)
    updates = trainer.train_many([clients[u] for u in range(20)], global_state,
                                 [client_seed(config.seed, 1, u) for u in range(20)])
    averaged = aggregate(global_state, [(u.state, u.num_samples) for u in updates], config.item_embedding_aggregation)
    from feddmmr.models.groups import group_of

    one = {}
    for group in NEW_GROUPS + ("backbone",):
        keys = [k for k in global_state if group_of(k) == group]
        if not keys:
            continue
        each = [torch.cat([(u.state[k] - global_state[k]).reshape(-1) for k in keys]) for u in updates]
        mean = torch.cat([(averaged[k] - global_state[k]).reshape(-1) for k in keys])
        each_rms = float(np.mean([float(e.pow(2).mean().sqrt()) for e in each]))
        one[group] = {"client_rms_over_bound": each_rms / bound,
                      "averaged_rms_over_bound": float(mean.pow(2).mean().sqrt()) / bound,
                      "averaged_over_client": float(mean.pow(2).mean().sqrt()) / max(each_rms, 1e-12)}
    out["one_round_20_clients"] = one
    return out


# --------------------------------------------------------------------------- (c) gradients

def probe_gradients(parts, args) -> dict:
    fresh, trained, config = parts["fresh"], parts["trained"], parts["config3"]
    clients = fresh.build_clients(np.arange(8))
    out = {}
    for tag, model in (("init", fresh.model), ("trained", trained)):
        model.train()
        model.set_trainable(config.transmitted_groups)
        names = {g: [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)]
                 for g, prefix in (("proj_visual", "proj_visual"), ("proj_text", "proj_text"),
                                   ("visual_expert", "visual_expert"), ("semantic_expert", "semantic_expert"),
                                   ("router", "router"), ("gate", "gating_weight"))}
        params = dict(model.named_parameters())
        sums = {"next_item": {g: 0.0 for g in names}, "contrastive": {g: 0.0 for g in names}}
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        pool = torch.from_numpy(parts["data"].warm_items())
        for client in clients.values():
            rows = np.arange(min(len(client.inputs), config.batch_size))
            negatives = pool[torch.randint(len(pool), (len(rows), config.num_negatives), generator=generator)]
            memory_visual, memory_text = fresh.content.memory(client.memory[rows], None)
            targets = client.targets[rows]
            align = np.unique(targets[targets != 0])[:128]
            for kind in ("next_item", "contrastive"):
                model.zero_grad(set_to_none=True)
                if kind == "next_item":  # losses() detaches its parts: the total without the alignment term
                    lam = model.contrastive_lambda
                    model.contrastive_lambda = 0.0
                    loss = model.losses(torch.from_numpy(client.inputs[rows]), torch.from_numpy(targets), negatives,
                                        memory_visual, memory_text)["loss"]
                    model.contrastive_lambda = lam
                else:
                    loss = model.contrastive_lambda * model.alignment_loss(torch.from_numpy(align))
                loss.backward()
                for group, keys in names.items():
                    squares = sum(float(params[k].grad.pow(2).sum()) for k in keys if params[k].grad is not None)
                    sums[kind][group] += math.sqrt(squares) / len(clients)
        out[tag] = {g: {"next_item": sums["next_item"][g], "contrastive": sums["contrastive"][g],
                        "contrastive_over_next_item": sums["contrastive"][g] / max(sums["next_item"][g], 1e-30)}
                    for g in names}
        model.eval()
    return out


# --------------------------------------------------------------------------- (d) candidate side

def content_matrix(parts, features: Path) -> torch.Tensor:
    from feddmmr.features.store import load_features

    data = parts["data"]
    text, visual = load_features(features, data.num_items)
    warm = torch.from_numpy(data.warm_items())
    cols = []
    for table in (visual.features.double(), text.features.double()):
        present = table.norm(dim=-1) > 0
        centred = torch.where(present[:, None], table - table[warm[present[warm]]].mean(0), torch.zeros_like(table))
        cols += [centred, present.double()[:, None]]
    return torch.cat(cols + [torch.ones(data.num_items, 1, dtype=torch.double)], dim=1)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(x.T @ x + lam * eye, x.T @ y)


def probe_candidate(parts, args) -> dict:
    from feddmmr.evaluation import evaluate

    data, model, config = parts["data"], parts["stage1_model"], parts["config1"]
    model.eval()
    x = content_matrix(parts, args.features)
    emb = model.sasrec.item_emb.weight.detach().double()
    warm = data.warm_items()
    rng = np.random.default_rng(0)
    held = rng.random(len(warm)) < 0.1
    fit, val = torch.from_numpy(warm[~held]), torch.from_numpy(warm[held])
    choice = {}
    for lam in (1.0, 10.0, 100.0, 1000.0):
        w = ridge(x[fit], emb[fit], lam)
        residual = ((x[val] @ w - emb[val]) ** 2).sum()
        choice[lam] = float(1 - residual / ((emb[val] - emb[fit].mean(0)) ** 2).sum())
    lam = max(choice, key=choice.get)
    w = ridge(x[torch.from_numpy(warm)], emb[torch.from_numpy(warm)], lam)
    mapped = (x @ w).float()
    out = {"ridge_r2_heldout_warm": choice, "lambda": lam}
    new = torch.from_numpy(data.cold_items) if data.cold_items is not None else torch.zeros(0, dtype=torch.long)

    def scorer(table):
        def score(users, seq, items):
            with torch.no_grad():
                hidden = model.encode(seq)[:, -1]
            return hidden @ table.T if items is None else (hidden[:, None, :] * table[items]).sum(-1)
        return score

    with torch.no_grad():
        ids = model.sasrec.item_emb.weight.detach().clone()
    new_mapped = ids.clone()
    new_mapped[new] = mapped[new]
    # scale: mapped rows are shrunk by the ridge; give them the warm rows' mean norm
    scale = ids[torch.from_numpy(warm)].norm(dim=-1).mean() / mapped[torch.from_numpy(warm)].norm(dim=-1).mean()
    new_scaled = ids.clone()
    new_scaled[new] = mapped[new] * scale
    for tag, table in (("stage1_ids", ids), ("new_items_mapped", new_mapped), ("new_items_mapped_rescaled", new_scaled),
                       ("all_items_mapped", mapped)):
        result = evaluate(scorer(table), data, "test", "full", max_len=config.max_seq_len, batch_size=256)
        out[tag] = {k: result[k] for k in ("HR@10", "NDCG@10")}
        for group in ("warm", "new"):
            if group in result and result[group]["users"]:
                out[tag][group] = {k: result[group][k] for k in ("users", "HR@10", "NDCG@10")}
    return out


def main(argv=None) -> int:
    args = start_bench(parse_args, argv)
    torch.manual_seed(0)
    parts = load(args)
    results = {}
    for probe in args.probes:
        if probe != "candidate" and args.stage3 is None:
            raise SystemExit(f"probe {probe} needs --stage3")
        results[probe] = globals()[f"probe_{probe}"](parts, args)
        print(json.dumps({probe: results[probe]}, indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
