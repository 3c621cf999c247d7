"""The cost of differential privacy: Stage 1 non-private vs DP at target epsilons, ML-1M 1,000 users.

    .venv/bin/python bench/privacy.py --data ../shared/data/ml-1m [--quick] [--rounds 30]
        [--epsilons 1 8] [--delta 1e-4] [--clips C ...] [--ablations] [--seed 0] [--threads 1] [--out bench/results/privacy]

Every run is the ``stage1_tuned`` preset (with ``--rounds`` rounds). The DP runs add
``dp_target_epsilon=eps``, ``dp_delta``, ``dp_clip_norm``: Poisson sampling at
``client_fraction``, each client's update clipped to ``C``, Gaussian noise with the sigma Opacus'
RDP accountant gives for ``eps`` after ``--rounds`` rounds, a fixed denominator (see
``feddmmr/federation/privacy.py``). The update norms of the first round's clients trained from
the initial model are measured and printed first; without ``--clips``, ``C`` is their median.
With several ``--clips`` every (eps, C) pair is trained (pick C by the *validation* column:
tuning C on the users' data is, strictly, outside the reported budget). ``--ablations`` adds
where the cost comes from: non-private with plain averaging of item rows (what DP mode imposes
instead of ``updated_rows``), and the DP mechanism with clipping but (almost) no noise
(sigma = 0.001, no meaningful guarantee) for each C.

Writes ``<out>/privacy.json`` (norms, every run's config, final metrics, (eps, delta), seconds,
machine) and ``<out>/results.md`` (printed): test split at the best validation round, sampled
HR@10 and full NDCG@10. A run whose history is complete is reused (``<out>/runs/<name>``).
``--quick``: the top 100 users and 3 rounds (a smoke test, not a result).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import OFFLINE_ENV, machine  # noqa: E402  (one machine description for every bench)

log = logging.getLogger("bench.privacy")
PRESET = "stage1_tuned"


def update_norms(config, data) -> list[float]:
    """L2 norms of the first round's client updates from the initial model (what ``dp_clip_norm`` bounds)."""
    from feddmmr.engine.assemble import assemble, client_seed
    from feddmmr.federation.server import sample_clients, update_norm

    fed = assemble(config, data)
    trainer = fed.trainer()
    users = sample_clients(data.num_users, config.client_fraction, config.seed, 1)
    clients = fed.build_clients(users)
    state = fed.model.group_state(config.transmitted_groups)
    updates = trainer.train_many([clients[int(u)] for u in users], state,
                                 [client_seed(config.seed, 1, int(u)) for u in users])
    return sorted(update_norm(state, u.state) for u in updates)


def run(name: str, config, data, out: Path) -> dict:
    from feddmmr.runner import run_federated

    run_dir = out / "runs" / name
    history_file = run_dir / "train_history.json"
    if history_file.exists() and "final" in json.loads(history_file.read_text()):
        saved = json.loads((run_dir / "config.json").read_text())["train"]
        if saved != config.to_dict():
            raise SystemExit(f"{run_dir} was trained with another config; remove it or use another --out")
        log.info("%s: reusing %s", name, run_dir)
        history = json.loads(history_file.read_text())
    else:
        log.info("%s: training (%d rounds)", name, config.num_rounds)
        history = run_federated(config, data, run_dir, resume=(run_dir / "resume").exists(), progress=False)
    privacy = history.get("privacy")
    return {"name": name, "config": config.to_dict(), "best_round": history["best_round"],
            "final": history["final"], "privacy": privacy, "seconds": history["total_seconds"],
            "update_norms": [r["privacy"]["update_norm_median"] for r in history["rounds"] if "privacy" in r]}


def table(results: list[dict], args, data, norms: list[float], info: dict) -> str:
    base = results[0]["final"]["test_sampled"]["HR@10"]
    lines = [f"Stage 1 (`{PRESET}`, {args.rounds} rounds, client_fraction 0.1), ML-1M top {data.num_users} users, "
             f"leave-one-out split, test split at the best validation round (sampled NDCG@10), seed {args.seed}. "
             f"Sampled = 1 + 100 uniform negatives; full = all {data.num_items - 1} items. "
             f"DP: delta = {args.delta:g}, Poisson sampling, Opacus RDP accountant; first-round update norms: "
             f"median {norms[len(norms) // 2]:.3g}, max {norms[-1]:.3g}.",
             "",
             "| run | (ε, δ) | σ | clip C | val NDCG@10 (sampled) | test HR@10 (sampled) | Δ HR@10 "
             "| test NDCG@10 (full) | best round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hr, ndcg = r["final"]["test_sampled"]["HR@10"], r["final"]["test_full"]["NDCG@10"]
        p = r["privacy"]
        eps = "(∞, 0) non-private" if not p else (f"({p['epsilon']:.2f}, {p['delta']:g})" if p["epsilon"] < 1e3
                                                  else "none (σ ≈ 0)")
        sigma, clip = (f"{p['noise_multiplier']:.3f}", f"{p['clip_norm']:g}") if p else ("0", "-")
        change = f"{(hr - base) / base:+.1%}" if r is not results[0] else "-"
        val = r["final"]["val_sampled"]["NDCG@10"]
        lines.append(f"| {r['name']} | {eps} | {sigma} | {clip} | {val:.4f} | {hr:.4f} | {change} | {ndcg:.4f} "
                     f"| {r['best_round']} |")
    lines += ["", f"Machine: {info['cpu']}, {info['nproc']} cores, torch {info['torch']} "
                  f"({info['torch_threads']} thread), {info['date']}, load {info['load_avg']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="100 users, 3 rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the preset's 30)")
    parser.add_argument("--top-users", type=int, default=1000)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-4, help="delta of (eps, delta); below 1 / users")
    parser.add_argument("--clips", type=float, nargs="+", default=None,
                        help="dp_clip_norm value(s) (default: the measured median norm)")
    parser.add_argument("--ablations", action="store_true",
                        help="also: non-private with plain item-row averaging; clipping without noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.update(OFFLINE_ENV)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)

    import torch

    from feddmmr.config import load_preset
    from feddmmr.data.dataset import load_dataset

    torch.set_num_threads(args.threads)
    if args.quick:
        args.top_users, args.rounds = 100, args.rounds or 3
    out = args.out or Path("bench/results") / ("privacy_quick" if args.quick else "privacy")
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data, None, args.top_users)
    base = load_preset(PRESET)
    args.rounds = args.rounds or base.num_rounds
    base.num_rounds, base.seed, base.top_users = args.rounds, args.seed, args.top_users

    tick = time.time()
    norms = update_norms(base, data)
    clips = args.clips or [float(f"{norms[len(norms) // 2]:.2g}")]
    log.info("first-round update norms over %d clients: min %.3g, median %.3g, max %.3g (%.0fs) -> clip %s",
             len(norms), norms[0], norms[len(norms) // 2], norms[-1], time.time() - tick, clips)

    results = [run("non-private", base, data, out)]
    if args.ablations:
        plain = copy.deepcopy(base)
        plain.item_embedding_aggregation = "fedavg"
        results.append(run("non-private-plain-avg", plain, data, out))
        for clip in clips:
            config = copy.deepcopy(base)
            config.dp_noise_multiplier, config.dp_delta, config.dp_clip_norm = 1e-3, args.delta, clip
            config.item_embedding_aggregation = "fedavg"
            results.append(run(f"clip-only-clip{clip:g}", config, data, out))
    for eps in args.epsilons:
        for clip in clips:
            config = copy.deepcopy(base)
            config.dp_target_epsilon, config.dp_delta, config.dp_clip_norm = eps, args.delta, clip
            config.item_embedding_aggregation = "fedavg"  # what DP mode requires (it would force it anyway)
            results.append(run(f"dp-eps{eps:g}-clip{clip:g}", config, data, out))
    info = machine()
    text = table(results, args, data, norms, info)
    payload = {"preset": PRESET, "rounds": args.rounds, "users": data.num_users, "seed": args.seed,
               "delta": args.delta, "clip_norms": clips, "first_round_update_norms": norms, "runs": results,
               "machine": info}
    (out / "privacy.json").write_text(json.dumps(payload, indent=2))
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
