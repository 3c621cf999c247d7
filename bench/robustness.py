"""Poisoned updates on ML-1M: test HR@10 of each aggregator under each attack, against clean runs.

    .venv/bin/python bench/robustness.py --data ../shared/data/ml-1m [--quick] [--threads 1]
        [--rounds 10] [--top-users 1000] [--seeds 0 1 2] [--preset stage1_tuned] [--attack-fraction 0.1]
        [--attack-scale 10] [--trim-fraction 0.1] [--aggregators fedavg trimmed_mean median]
        [--attacks none scale sign_flip nan scale:100] [--out bench/results/robustness] [--set key=value ...] [--force]

Every (aggregator, attack, seed) is one Stage 1 federated run (the preset, ``--rounds`` rounds).
``attack=none`` is the clean run of that aggregator and seed. Attacks are injected in-process
(``feddmmr/federation/faults.py``): each round a seeded ``--attack-fraction`` of the sampled
clients send ``scale`` (delta x ``--attack-scale``), ``sign_flip`` (delta x -``--attack-scale``) or
``nan`` (all NaN; update validation rejects these, with every aggregator); ``KIND:S`` uses the
factor ``S`` instead of ``--attack-scale`` (e.g. ``scale:100``). Reported: test split,
sampled protocol (1 + 100), at the best validation round; relative HR@10 loss vs the clean run of
the same aggregator and seed, and vs clean FedAvg of the same seed (negative = better than clean);
with several seeds, mean ± std over the seeds of these paired losses.

Writes ``<out>/<aggregation>_<attack>[_x<S>]_seed<k>.json`` per run (skipped when present with the same config,
unless ``--force``), ``<out>/robustness.json`` (all runs + machine) and ``<out>/robustness.md``
(the table, also printed). ``--quick``: a smoke test, top 100 users, 2 rounds, output in
``bench/results/robustness_quick``; its numbers are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from feddmmr.config import ATTACKS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import REPO, differing, machine, mean_std, read_json, start_bench  # noqa: E402

log = logging.getLogger("bench.robustness")

AGGREGATORS = ("fedavg", "trimmed_mean", "median")
QUICK_USERS, QUICK_ROUNDS = 100, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, required=True, help="MovieLens-1M folder")
    p.add_argument("--quick", action="store_true", help=f"smoke test: top {QUICK_USERS} users, {QUICK_ROUNDS} rounds")
    p.add_argument("--top-users", type=int, default=None, help=f"default 1000 (--quick: {QUICK_USERS})")
    p.add_argument("--rounds", type=int, default=None, help=f"default 10 (--quick: {QUICK_ROUNDS})")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0], help="default 0")
    p.add_argument("--preset", default="stage1_tuned", help="Stage 1 preset (its num_rounds is replaced by --rounds)")
    p.add_argument("--attack-fraction", type=float, default=0.1)
    p.add_argument("--attack-scale", type=float, default=10.0)
    p.add_argument("--trim-fraction", type=float, default=0.1)
    p.add_argument("--aggregators", nargs="+", choices=AGGREGATORS, default=list(AGGREGATORS))
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), metavar="KIND[:SCALE]",
                   help=f"of {ATTACKS}, optionally with its own factor (scale:100); 'none' (the clean runs) "
                        "is always added")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/robustness (--quick: bench/results/robustness_quick)")
    p.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.set = [pair for group in args.set for pair in group]
    args.top_users = args.top_users or (QUICK_USERS if args.quick else 1000)
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else 10)
    args.out = args.out or REPO / "bench" / "results" / ("robustness_quick" if args.quick else "robustness")
    for spec in args.attacks:
        parse_attack(spec, p)
    if "none" not in args.attacks:
        args.attacks = ["none", *args.attacks]
    return args


def parse_attack(spec: str, parser: argparse.ArgumentParser | None = None) -> tuple[str, float | None]:
    """``"scale:100"`` -> ("scale", 100.0); ``"nan"`` -> ("nan", None) (None: ``--attack-scale``)."""
    kind, _, factor = spec.partition(":")
    try:
        if kind not in ATTACKS or (factor and kind in ("none", "nan")):
            raise ValueError
        return kind, float(factor) if factor else None
    except ValueError:
        message = f"--attacks: {spec!r} is not KIND or KIND:SCALE with KIND in {ATTACKS} (SCALE for scale/sign_flip)"
        if parser is None:
            raise ValueError(message) from None
        parser.error(message)


def attack_label(spec: str, args: argparse.Namespace) -> str:
    kind, factor = parse_attack(spec)
    factor = args.attack_scale if factor is None else factor
    return {"scale": f"scale (x{factor:g})", "sign_flip": f"sign_flip (x{-factor:g})"}.get(kind, kind)


def run_name(aggregation: str, spec: str, seed: int) -> str:
    kind, factor = parse_attack(spec)
    return f"{aggregation}_{kind}" + ("" if factor is None else f"_x{factor:g}") + f"_seed{seed}"


def run_config(aggregation: str, spec: str, seed: int, args: argparse.Namespace):
    from feddmmr.config import apply_overrides, load_preset, parse_sets

    attack, factor = parse_attack(spec)
    config = load_preset(args.preset)
    apply_overrides(config, parse_sets(args.set), "--set")
    apply_overrides(config, {"num_rounds": args.rounds, "seed": seed, "aggregation": aggregation,
                             "trim_fraction": args.trim_fraction, "attack": attack,
                             "attack_fraction": args.attack_fraction,
                             "attack_scale": args.attack_scale if factor is None else factor}, "bench")
    config.top_users = args.top_users
    return config


def run_one(aggregation: str, attack: str, seed: int, args: argparse.Namespace, data, data_info: dict) -> dict:
    """One federated run (or its finished JSON); returns its record."""
    from feddmmr.federation import checkpoint as ckpt
    from feddmmr.runner import run_federated

    name = run_name(aggregation, attack, seed)
    path, directory = args.out / f"{name}.json", args.out / "runs" / name
    config = run_config(aggregation, attack, seed, args)
    existing = read_json(path)
    if existing is not None and not args.force:
        keys = differing(existing.get("config"), config.to_dict())
        if keys:
            raise SystemExit(f"bench/robustness.py: error: {path} was written with a different config "
                             f"(keys {keys}); use another --out or --force")
        log.info("%s: done (%s), skipping", name, path)
        return existing
    resume = (directory / ckpt.RESUME_DIR / "state.json").exists() and not args.force
    if resume and differing((read_json(directory / ckpt.CONFIG_FILE) or {}).get("train"), config.to_dict()):
        resume = False
    if not resume and directory.exists():
        shutil.rmtree(directory)
    log.info("%s: starting%s", name, " (resuming)" if resume else "")
    wall = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # the runner prints its result lines
        history = run_federated(config, data, directory, resume=resume, progress=not args.no_progress,
                                data_info=data_info)
    record = {"name": name, "aggregation": aggregation, "attack": attack, "seed": seed, "config": config.to_dict(),
              "final": history["final"], "best_round": history["best_round"], "rounds": len(history["rounds"]),
              "rejected": sum(len(r.get("rejected", [])) for r in history["rounds"]),
              "attackers": sum(len(r.get("attackers", [])) for r in history["rounds"]),
              "clients": sum(r["clients"] for r in history["rounds"]),
              "train_seconds": round(sum(r["train_seconds"] for r in history["rounds"]), 2),
              "wall_seconds": round(time.time() - wall, 2), "run_dir": str(directory)}
    ckpt.write_json(path, record)
    test = record["final"]["test_sampled"]
    log.info("%s: test sampled HR@10 %.4f NDCG@10 %.4f, %.0fs", name, test["HR@10"], test["NDCG@10"],
             record["wall_seconds"])
    return record


def relative_loss(value: float, reference: float) -> float:
    """(reference - value) / reference: 0.05 = 5 % worse than the reference."""
    return (reference - value) / reference if reference else float("nan")


def table(records: dict[tuple[str, str, int], dict], args: argparse.Namespace, info: dict, data_info: dict) -> str:
    hr = {key: r["final"]["test_sampled"]["HR@10"] for key, r in records.items()}
    seeds = args.seeds
    lines = [
        "# Robust aggregation under attack",
        "",
        f"ML-1M, the {data_info['users']} most active users; Stage 1 preset `{args.preset}` with "
        f"**num_rounds={args.rounds}** (instead of the preset's rounds, to fit the machine), "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}. "
        "**Test split**, **sampled protocol** (target vs 100 negatives), model at the best validation round "
        "(validation NDCG@10, sampled)." + (" Mean ± std over the seeds; a relative loss is computed per seed "
                                             "against the clean run of the same seed (paired)." if len(seeds) > 1 else ""),
        f"Attackers: each round a seeded {args.attack_fraction:.0%} of the sampled clients; `scale (xS)` = "
        "update delta x S, `sign_flip (x-S)` = delta x -S, `nan` = all-NaN update (rejected "
        f"by validation). `trimmed_mean` drops {args.trim_fraction:g} at each end per coordinate."
        + (" **--quick smoke test: not results.**" if args.quick else "")
        + (f" `--set {' '.join(args.set)}`." if args.set else ""),
        f"Machine: {info['nproc']} CPUs, {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"commit {info['commit']}, {info['date']}, load average {info['load_avg']} at the start.",
        "",
        "| aggregation | attack | test HR@10 | test NDCG@10 | rel. loss vs clean (same aggregation) "
        "| rel. loss vs clean fedavg | rejected updates | best rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for aggregation in args.aggregators:
        for attack in args.attacks:
            runs = [(seed, records[(aggregation, attack, seed)]) for seed in seeds]
            own = [relative_loss(hr[(aggregation, attack, s)], hr[(aggregation, "none", s)]) for s, _ in runs]
            versus = [relative_loss(hr[(aggregation, attack, s)], hr[("fedavg", "none", s)]) for s, _ in runs
                      if ("fedavg", "none", s) in hr]
            test = [r["final"]["test_sampled"] for _, r in runs]
            rejected = sum(r["rejected"] for _, r in runs)
            clients = sum(r["clients"] for _, r in runs)
            lines.append(
                f"| {aggregation} | {attack_label(attack, args)} | {mean_std([t['HR@10'] for t in test], '.4f')} "
                f"| {mean_std([t['NDCG@10'] for t in test], '.4f')} "
                f"| {'-' if attack == 'none' else mean_std(own, '+.1%')} "
                f"| {'-' if (aggregation, attack) == ('fedavg', 'none') else mean_std(versus, '+.1%')} "
                f"| {rejected}/{clients} | {', '.join(str(r['best_round']) for _, r in runs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = start_bench(parse_args, argv)
    from feddmmr.data.dataset import load_dataset
    from feddmmr.federation import checkpoint as ckpt

    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    data = load_dataset(args.data, top_users=args.top_users)
    data_info = data.stats()
    log.info("machine %s; data %s", json.dumps(info), json.dumps(data_info))
    started = time.time()
    records = {}
    for seed in args.seeds:
        for attack in args.attacks:  # clean runs first: every row's reference exists early
            for aggregation in args.aggregators:
                records[(aggregation, attack, seed)] = run_one(aggregation, attack, seed, args, data, data_info)
    text = table(records, args, info, data_info)
    (args.out / "robustness.md").write_text(text)
    ckpt.write_json(args.out / "robustness.json", {"machine": info, "data": data_info, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": list(records.values())})
    log.info("wrote %s; bench %.0fs", args.out / "robustness.md", time.time() - started)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
