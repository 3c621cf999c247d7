"""Recommendation quality of every method on ML-1M (1,000 users): mean ± std over seeds, both protocols.

    .venv/bin/python bench/quality.py --data ../shared/data/ml-1m [--quick] [--seeds 0 1 2]
        [--out bench/results/quality] [--features features/ml-1m] [--only NAME ...] [--set key=value ...]
        [--epochs 10] [--stage1-preset PRESET] [--stage3-preset PRESET]
        [--stage2-preset stage2_alignment] [--stage3-after2-preset PRESET] [--force]

The defaults are the pipeline's presets (``feddmmr pipeline``); the seed's own schedule is
``--stage1-preset stage1_backbone --stage3-preset stage3_skip_stage2 --stage3-after2-preset stage3_moe``.

Methods (``--only`` names), each trained/scored once per seed:

  popularity        training-split item counts (no learning)
  content_knn       content-only item kNN: mean cosine of a candidate's centred text+poster features to the
                    user's 10 most recent items (no learning; ``feddmmr.baselines.content_knn_scorer``)
  centralized       SASRec (the Stage 1 config) trained on every user's windows pooled (``run_centralized``)
  fedsasrec         Stage 1 federated (``--stage1-preset``); its run directory is the init of every Stage 3 run
  feddmmr_1_3       Stage 3 straight after Stage 1 (``--stage3-preset``)
  feddmmr_stage2    Stage 2 (``--stage2-preset``), the intermediate of 1->2->3 (JSON only, no table row)
  feddmmr_1_2_3     Stage 3 after Stage 2 (``--stage3-after2-preset``)
  no_visual         feddmmr_1_3 with use_visual=false
  no_text           feddmmr_1_3 with use_text=false
  no_memory         feddmmr_1_3 whose experts read only the short-term window (see NO_MEMORY below)
  fixed_gate        feddmmr_1_3 with fix_gate=true (the gate stays at gating_init)
  no_router         feddmmr_1_3 with use_router=false (the two experts mixed equally)
  fair_control      FedSASRec continued with Stage 3's schedule (rounds, clients, local epochs, learning
                    rate; the backbone trained, no memory): what Stage 3 gets from its extra rounds alone
  knn_fusion        fair_control's model plus w x content_knn's scores (late fusion), w picked from
                    ``FUSION_WEIGHTS`` by validation full NDCG@10 (no further training)

A method's dependencies (the seed's Stage 1 or Stage 2 run) are trained first when missing. Each
run writes ``<out>/<name>_seed<k>.json`` (config, final metrics, best round, seconds, validation
curve); its run directory is ``<out>/runs/<name>_seed<k>/``. A run whose JSON exists is skipped (so
an interrupted bench resumes; an interrupted federated run continues from its last round) unless
``--force``; a JSON written with a different config is an error (use another ``--out`` or ``--force``).
At the end: ``<out>/results.md`` (test split at the best validation round, mean ± std over seeds,
both protocols; printed to stdout) and ``<out>/validation_curves.png`` (first seed).

``--quick``: a smoke test of the whole bench in under 10 minutes on an idle 2-core machine: one
seed (0), the top **100** users (unless ``--top-users``), Stage 1 3 rounds, Stages 2/3 2 rounds,
centralized 1 epoch, output in ``bench/results/quality_quick`` unless ``--out``. It cannot keep
1,000 users: each of the 7 memory runs pays a fixed cost at 1,000 users (building 1,000 memories,
then scoring every user on both splits and protocols after the last round), so ``--quick
--top-users 1000`` takes roughly 20-30 minutes. Numbers from ``--quick`` are not results.
On a shared machine ``--threads 1`` is several times faster than torch's two spinning threads.
``--set`` overrides apply to every trained config (after the preset and ``--quick``, before a
method's own ablation keys).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
}

log = logging.getLogger("bench.quality")

# The "no memory" ablation: no long-term memory, so no prototypes either; retrieval returns the
# memory_top_k most recent distinct items of the short-term window.
NO_MEMORY = {"lt_capacity": 0, "use_prototypes": False}
NO_MEMORY_NOTE = ("LT memory off: lt_capacity=0 (nothing is ever written to the long-term memory) and "
                  "use_prototypes=false; the experts read the memory_top_k most recent distinct items of the "
                  "short-term window.")

# The fair control: Stage 3's schedule without the multimodal branch (only the backbone trains, as in
# Stage 3, whose item embedding is frozen), so "Stage 3 vs Stage 1" is not confounded with more training.
FAIR_CONTROL = {"use_memory": False, "trainable_groups": ["backbone"]}


# --------------------------------------------------------------------------- the methods

# name -> (label, kind, preset option, dependency, ablation overrides, in the table)
METHODS = {
    "popularity": ("Popularity", "popularity", None, None, {}, True),
    "content_knn": ("Content kNN (text + posters, last 10)", "content_knn", None, None, {}, True),
    "centralized": ("Centralized SASRec", "centralized", "stage1_preset", None, {}, True),
    "fedsasrec": ("FedSASRec (Stage 1)", "federated", "stage1_preset", None, {}, True),
    "feddmmr_1_3": ("FedDMMR 1->3", "federated", "stage3_preset", "fedsasrec", {}, True),
    "feddmmr_stage2": ("FedDMMR Stage 2 (intermediate)", "federated", "stage2_preset", "fedsasrec", {}, False),
    "feddmmr_1_2_3": ("FedDMMR 1->2->3", "federated", "stage3_after2_preset", "feddmmr_stage2", {}, True),
    "no_visual": ("FedDMMR 1->3, no visual", "federated", "stage3_preset", "fedsasrec",
                  {"use_visual": False}, True),
    "no_text": ("FedDMMR 1->3, no text", "federated", "stage3_preset", "fedsasrec", {"use_text": False}, True),
    "no_memory": ("FedDMMR 1->3, no LT memory (ST window only)", "federated", "stage3_preset", "fedsasrec",
                  NO_MEMORY, True),
    "fixed_gate": ("FedDMMR 1->3, gate fixed", "federated", "stage3_preset", "fedsasrec", {"fix_gate": True}, True),
    "no_router": ("FedDMMR 1->3, no router (experts mixed equally)", "federated", "stage3_preset", "fedsasrec",
                  {"use_router": False}, True),
    "fair_control": ("Fair control: FedSASRec + Stage 3's rounds, no memory", "federated", "stage3_preset",
                     "fedsasrec", FAIR_CONTROL, True),
    "knn_fusion": ("Fair control + content kNN (late fusion)", "fusion", None, "fair_control", {}, True),
}
# The seed project's own figures (its README; SPEC §6): reported, not reproduced; its protocol's
# negatives and users are not ours, so they sit beside the table rather than in it.
SEED_FIGURES = {
    "seed project, Stage 1 (reported)": {"HR@5": "0.249", "HR@10": "0.388", "HR@20": "0.558", "NDCG@10": "0.209"},
    "seed project, Stage 3 (claimed)": {"HR@5": "~0.30", "HR@10": "~0.45-0.50", "HR@20": "~0.65", "NDCG@10": "~0.28"},
}
QUICK_ROUNDS = {1: 3, 2: 2, 3: 2}
QUICK_EPOCHS = 1
QUICK_USERS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from feddmmr.pipeline import STAGES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", type=Path, required=True, help="MovieLens-1M folder")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 seed, top 100 users, 3 + 2 rounds, 1 centralized epoch")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    p.add_argument("--out", type=Path, default=None,
                   help="default bench/results/quality (--quick: bench/results/quality_quick)")
    p.add_argument("--features", type=Path, default=REPO / "features" / "ml-1m",
                   help="item feature folder (extracted there if missing)")
    p.add_argument("--only", nargs="+", default=None, choices=list(METHODS), metavar="NAME",
                   help=f"methods to run (default all): {' '.join(METHODS)}")
    p.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config override for every trained run (repeatable)")
    p.add_argument("--top-users", type=users_option, default=None,
                   help=f"the most active N users, or 'all' (the papers' protocol: all 6,040 ML-1M users); "
                        f"default 1000 (--quick: {QUICK_USERS})")
    p.add_argument("--epochs", type=int, default=None, help="centralized epochs (default 10, --quick 1)")
    (_, stage1_preset), (_, stage3_preset) = STAGES  # the pipeline's, so the bench measures what it runs
    p.add_argument("--stage1-preset", default=stage1_preset, help=f"default: the pipeline's, {stage1_preset}")
    p.add_argument("--stage2-preset", default="stage2_alignment")
    p.add_argument("--stage3-preset", default=stage3_preset,
                   help=f"Stage 3 after Stage 1 (1->3 and ablations); default: the pipeline's, {stage3_preset}")
    p.add_argument("--stage3-after2-preset", default=stage3_preset,
                   help=f"Stage 3 after Stage 2 (1->2->3); default {stage3_preset}")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; 1 can be faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.set = [pair for group in args.set for pair in group]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.top_users is None:
        args.top_users = QUICK_USERS if args.quick else 1000
    elif args.top_users == "all":
        args.top_users = None  # every user
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else 10
    if args.out is None:
        args.out = REPO / "bench" / "results" / ("quality_quick" if args.quick else "quality")
    return args


def users_option(text: str) -> int | str:
    if text == "all":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of users or 'all', got {text!r}")
    return int(text)


def with_dependencies(names: list[str]) -> list[str]:
    """The methods to run, each after its dependencies, in METHODS order."""
    wanted = set()
    for name in names:
        while name is not None:
            wanted.add(name)
            name = METHODS[name][3]
    return [name for name in METHODS if name in wanted]


def run_config(name: str, seed: int, args: argparse.Namespace):
    """The TrainConfig of a trained method: preset -> --quick -> --set -> the method's own keys."""
    from feddmmr.config import apply_overrides, load_preset, parse_sets

    label, kind, preset_option, _, ablation, _ = METHODS[name]
    config = load_preset(getattr(args, preset_option))
    if args.quick:
        config.num_rounds = QUICK_ROUNDS[config.stage]
    apply_overrides(config, parse_sets(args.set), "--set")
    apply_overrides(config, dict(ablation), name)
    config.seed, config.top_users = seed, args.top_users
    return config


# --------------------------------------------------------------------------- machine and helpers

def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = len(os.sched_getaffinity(0))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"nproc": nproc, "cpu": model, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def ensure_features(data, data_path: Path, features: Path, progress: bool) -> None:
    from feddmmr.features.extract import run_extract
    from feddmmr.features.store import FeatureError, load_features

    try:
        load_features(features, data.num_items)
        return
    except FeatureError as exc:
        log.info("features: %s; extracting into %s (cached by input hash)", exc, features)
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_extract(data, data_path, features, workers=1, progress=progress)
    log.info("features: %s", json.dumps({k: {"status": v["status"], "coverage": v["coverage"]}
                                          for k, v in summary.items()}))


def val_curve(history: dict) -> list[dict]:
    return [{"round": r["round"], "protocol": r["val_metrics"]["protocol"], "HR@10": r["val_metrics"]["HR@10"],
             "NDCG@10": r["val_metrics"]["NDCG@10"]} for r in history["rounds"] if "val_metrics" in r]


def json_path(out: Path, name: str, seed: int) -> Path:
    return out / f"{name}_seed{seed}.json"


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}_seed{seed}"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def differing(a: dict | None, b: dict | None) -> list[str]:
    """Config keys whose values differ; a key one side lacks counts as its default (a key added later)."""
    from feddmmr.config import TrainConfig

    a, b, default = a or {}, b or {}, TrainConfig().to_dict()
    return sorted(k for k in set(a) | set(b) if a.get(k, default.get(k)) != b.get(k, default.get(k)))


# --------------------------------------------------------------------------- one run

BASELINES = ("popularity", "content_knn", "fusion")  # scored, never trained (fusion: a trained run's model)


def new_item_keys(args: argparse.Namespace | None) -> dict:
    """The new-item protocol the trained runs use (their ``--set`` keys; defaults without)."""
    from feddmmr.config import TrainConfig, apply_overrides, parse_sets

    config = TrainConfig()
    if args is not None:
        sets = parse_sets(args.set)
        apply_overrides(config, {k: v for k, v in sets.items() if k.startswith("cold_item_")}, "--set")
    return {"cold_item_fraction": config.cold_item_fraction, "cold_item_seed": config.cold_item_seed}


def baseline_scorer(kind: str, data, args: argparse.Namespace):
    from feddmmr import baselines

    if kind == "popularity":
        return baselines.popularity_scorer(data)
    from feddmmr.features.store import load_features

    text, visual = load_features(Path(args.features), data.num_items)
    return baselines.content_knn_scorer(data, visual.features.float(), text.features.float())


def fused_final(trained_dir: Path, data, seed: int, args: argparse.Namespace) -> dict:
    """Late fusion of a trained run's model with the content kNN: the weight with the best validation
    full NDCG@10 (ties: the smaller weight), then both splits and protocols at that weight."""
    from feddmmr.baselines import FUSION_WEIGHTS, late_fusion_scorer
    from feddmmr.engine.assemble import restore
    from feddmmr.evaluation import FINAL_REQUESTS, evaluate

    trained = restore(trained_dir, data, Path(args.features))
    knn = baseline_scorer("content_knn", trained.data, args)
    cache, max_len = Path(args.out) / "cache", trained.config.max_seq_len

    def run(split: str, protocol: str, batch: int, weight: float) -> dict:
        scorer = late_fusion_scorer(trained.scorer(split), knn, weight)
        return evaluate(scorer, trained.data, split, protocol, seed=seed, max_len=max_len, batch_size=batch,
                        cache_dir=cache, num_negatives=trained.config.eval_negatives)

    val = {w: run("val", "full", 64, w)["NDCG@10"] for w in FUSION_WEIGHTS}
    best = max(FUSION_WEIGHTS, key=lambda w: (val[w], -w))
    log.info("late fusion of %s: validation full NDCG@10 by weight %s; weight %g", trained_dir,
             {w: round(v, 4) for w, v in val.items()}, best)
    final = {f"{split}_{protocol}": run(split, protocol, batch, best) for split, protocol, batch in FINAL_REQUESTS}
    return {"final": final, "best_round": None, "fusion_weight": best, "val_curve": [],
            "fusion_val_ndcg10": {str(w): v for w, v in val.items()}}


def run_one(name: str, seed: int, args: argparse.Namespace, data, data_info: dict) -> dict:
    """Run (or skip) one method for one seed; returns its JSON record."""
    from feddmmr.federation import checkpoint as ckpt

    out = Path(args.out)
    path = json_path(out, name, seed)
    label, kind, preset_option, dependency, ablation, _ = METHODS[name]
    config = run_config(name, seed, args) if kind not in BASELINES else None
    spec = {"config": config.to_dict() if config else None,
            "epochs": args.epochs if kind == "centralized" else None}
    if kind in BASELINES:  # the new-item protocol of the trained runs (--set), which the baselines face too
        spec["protocol"] = new_item_keys(args)
    directory = run_dir(out, name, seed)
    existing = read_json(path)
    if existing is not None and not args.force:
        keys = differing(existing.get("config"), spec["config"])
        if existing.get("epochs") != spec["epochs"]:
            keys.append("epochs")
        if kind in BASELINES and existing.get("protocol", new_item_keys(None)) != spec["protocol"]:
            keys.append("protocol")
        if keys:
            raise SystemExit(f"bench/quality.py: error: {path} was written with a different config "
                             f"(keys {keys}); use another --out or --force")
        if kind != "federated" or (directory / ckpt.MODEL_FILE).exists():
            log.info("%s seed %d: done (%s), skipping", name, seed, path)
            return existing
        log.info("%s seed %d: %s exists but its run directory is gone; retraining", name, seed, path)

    init = run_dir(out, dependency, seed) if dependency else None
    log.info("%s seed %d: starting%s", name, seed, f" (init {init})" if init else "")
    wall, cpu = time.time(), time.process_time()
    record = {"name": name, "method": label, "seed": seed, "kind": kind,
              "preset": config.preset if config else None, **spec,
              "init": str(init) if init else None, "top_users": args.top_users, "quick": bool(args.quick),
              "set": list(args.set), "ablation": {k: v for k, v in ablation.items()}, "data": data_info}
    if kind in BASELINES:
        from feddmmr.evaluation import PROTOCOLS, evaluate

        scored = data.with_cold_items(spec["protocol"]["cold_item_fraction"], spec["protocol"]["cold_item_seed"])
        if kind == "fusion":
            record.update(fused_final(run_dir(out, dependency, seed), data, seed, args))
        else:
            scorer = baseline_scorer(kind, scored, args)
            final = {f"{split}_{protocol}": evaluate(scorer, scored, split, protocol, seed=seed,
                                                     cache_dir=out / "cache", num_negatives=100, batch_size=256)
                     for split in ("val", "test") for protocol in PROTOCOLS}
            record.update(final=final, best_round=None, val_curve=[])
        record.update(train_seconds=0.0, memory_build_seconds=0.0)
    else:
        if args.force and directory.exists():
            shutil.rmtree(directory)
        with contextlib.redirect_stdout(sys.stderr):  # the runners print their result lines
            if kind == "centralized":
                from feddmmr.centralized import run_centralized

                history = run_centralized(config, data, directory, args.epochs)
            else:
                from feddmmr.runner import run_federated

                resume = ckpt.resume_dir(directory) is not None
                if resume:
                    saved = read_json(directory / ckpt.CONFIG_FILE) or {}
                    if differing(saved.get("train"), config.to_dict()):
                        log.info("%s: an interrupted run with another config; starting over", directory)
                        shutil.rmtree(directory)
                        resume = False
                    else:
                        log.info("%s: resuming an interrupted run", directory)
                features = args.features if config.use_memory else None
                history = run_federated(config, data, directory, features, init, resume=resume,
                                        progress=not args.no_progress, data_info=data_info)
        record.update(final=history["final"], best_round=history["best_round"],
                      best_val=history.get("best_val"), val_curve=val_curve(history),
                      rounds=len(history["rounds"]),
                      train_seconds=round(sum(r["train_seconds"] for r in history["rounds"]), 2),
                      total_seconds=history.get("total_seconds"),
                      memory_build_seconds=history.get("memory_build_seconds"), run_dir=str(directory))
    record["wall_seconds"] = round(time.time() - wall, 2)
    record["cpu_seconds"] = round(time.process_time() - cpu, 2)
    record["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    ckpt.write_json(path, record)
    test = record["final"]["test_sampled"]
    log.info("%s seed %d: test sampled HR@10 %.4f NDCG@10 %.4f, %.0fs wall, %.0fs cpu", name, seed,
             test["HR@10"], test["NDCG@10"], record["wall_seconds"], record["cpu_seconds"])
    return record


# --------------------------------------------------------------------------- the report

def mean_std(values: list[float], fmt: str = ".4f") -> str:
    """``mean ± std`` (sample std, n-1) over seeds; one value alone as is; none as ``-``."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt.lstrip('+'))}"


def results_table(records: dict[str, list[dict]], args: argparse.Namespace, info: dict, data_info: dict) -> str:
    from feddmmr.baselines import FUSION_WEIGHTS
    from feddmmr.evaluation import METRIC_NAMES

    seeds = sorted({r["seed"] for runs in records.values() for r in runs})
    presets = {option: getattr(args, option) for option in
               ("stage1_preset", "stage2_preset", "stage3_preset", "stage3_after2_preset")}
    lines = [
        "# Recommendation quality",
        "",
        f"ML-1M, the {data_info['users']} most active users ({data_info['interactions']} interactions, "
        f"{data_info['items']} items). **Test split** (leave-one-out: last item), each run's model at its "
        "**best validation round** (validation NDCG@10 under each config's `eval_protocol`).",
        "",
        "* **sampled** (1 + 100): the held-out item against 100 negatives drawn uniformly without replacement "
        "from the occurring items the user never interacted with, drawn once per split and seed;",
        "* **full**: the held-out item ranked among every occurring item, the user's history excluded.",
        "* Ties count against the target. Cells: mean ± sample std (n-1) over seeds "
        f"{', '.join(map(str, seeds))} (a single number: one seed). Candidate negatives differ per seed.",
        f"* Presets: Stage 1 `{presets['stage1_preset']}`, Stage 3 after 1 `{presets['stage3_preset']}`, "
        f"Stage 2 `{presets['stage2_preset']}`, Stage 3 after 2 `{presets['stage3_after2_preset']}`; "
        f"centralized: the Stage 1 config, {args.epochs} epoch(s) of plain Adam over all users' windows"
        + (" (**--quick** smoke test, not results: Stage 1 3 rounds, Stages 2/3 2 rounds)" if args.quick else "")
        + (f"; `--set {' '.join(args.set)}`" if args.set else "") + ".",
        f"* No LT memory: {NO_MEMORY_NOTE}",
        "* Gate fixed: `fix_gate=true`, the residual gate stays at `gating_init` (neither trained nor sent).",
        "* No router: `use_router=false`, the two experts mixed equally where both are usable (neither trained nor sent).",
        "* Fair control: FedSASRec continued with the Stage 3 preset's schedule, no memory, the backbone trained "
        "(`use_memory=false`, `trainable_groups=[backbone]`). Late fusion: its model's scores plus w x the "
        "content kNN's, w from " + ", ".join(map(str, FUSION_WEIGHTS)) + " by validation full NDCG@10.",
        f"* Machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), commit {info['commit']}, {info['date']}; load average "
        f"{info['load_avg']} at the start of the bench (the machine may be shared: seconds are wall clock).",
        "* Seconds: training only (all rounds/epochs), mean over seeds; Stage 3 rows exclude the shared "
        "Stage 1 run, 1->2->3 excludes Stage 2 (see its JSON).",
        "",
        "| method | protocol | seeds | best round | " + " | ".join(METRIC_NAMES) + " | train s |",
        "|---|---|---|---|" + "---|" * len(METRIC_NAMES) + "---|",
    ]
    for name, runs in records.items():
        if not runs or not METHODS[name][5]:
            continue
        rounds = [r["best_round"] for r in runs if r.get("best_round") is not None]
        best = ", ".join(map(str, rounds)) if rounds else "-"
        seconds = sum(r.get("train_seconds") or 0.0 for r in runs) / len(runs)
        for protocol in ("sampled", "full"):
            cells = " | ".join(mean_std([r["final"][f"test_{protocol}"][m] for r in runs]) for m in METRIC_NAMES)
            lines.append(f"| {METHODS[name][0]} | {protocol} | {len(runs)} | {best} | {cells} | {seconds:.0f} |")
            for kind in ("warm", "new"):  # the new-item protocol: users by test-target type
                groups = [r["final"][f"test_{protocol}"].get(kind) for r in runs]
                if all(g and g["users"] for g in groups):
                    cells = " | ".join(mean_std([g[m] for g in groups]) for m in METRIC_NAMES)
                    users = "/".join(str(g["users"]) for g in groups)
                    lines.append(f"| {METHODS[name][0]} | {protocol}, {kind} targets ({users} users) | {len(runs)} | "
                                 f"{best} | {cells} | {seconds:.0f} |")
    for label, figures in SEED_FIGURES.items():  # beside ours, as the seed's README gives them
        cells = " | ".join(figures.get(m, "-") for m in METRIC_NAMES)
        lines.append(f"| {label} | its sampled protocol | - | - | {cells} | - |")
    lines += ["", "Per-run JSON (config, all final metrics, validation curve, seconds): "
              f"`{Path(args.out)}/<name>_seed<k>.json`. Validation curves (first seed): "
              f"`{Path(args.out)}/validation_curves.png`."]
    return "\n".join(lines) + "\n"


def plot_curves(records: dict[str, list[dict]], path: Path, seed: int, users: int) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def run(name):
        return next((r for r in records.get(name, []) if r["seed"] == seed), None)

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn, x_max = False, 1
    stage1 = run("fedsasrec")
    offset1 = stage1["val_curve"][-1]["round"] if stage1 and stage1["val_curve"] else 0
    series = []
    if stage1:
        series.append(("FedSASRec (Stage 1)", [c["round"] for c in stage1["val_curve"]], stage1["val_curve"], "-o"))
    one_three = run("feddmmr_1_3")
    if one_three:
        series.append(("FedDMMR 1->3 (Stage 3 from Stage 1's best)",
                       [offset1 + c["round"] for c in one_three["val_curve"]], one_three["val_curve"], "-s"))
    stage2, two_three = run("feddmmr_stage2"), run("feddmmr_1_2_3")
    if two_three:
        curve, xs = [], []
        offset2 = offset1
        if stage2:
            curve += stage2["val_curve"]
            xs += [offset1 + c["round"] for c in stage2["val_curve"]]
            offset2 = offset1 + (stage2["val_curve"][-1]["round"] if stage2["val_curve"] else 0)
            ax.axvline(offset2 + 0.5, color="grey", linestyle=":", linewidth=1)
        curve += two_three["val_curve"]
        xs += [offset2 + c["round"] for c in two_three["val_curve"]]
        series.append(("FedDMMR 1->2->3 (Stage 2, then Stage 3)", xs, curve, "-^"))
    central = run("centralized")
    if central:
        from feddmmr.config import round_size

        users = central.get("data", {}).get("users") or 1000
        cfg = central["config"]
        per_epoch = users / round_size(users, cfg["client_fraction"], cfg.get("clients_per_round", 0))
        series.append((f"centralized SASRec (epoch e at x = {per_epoch:g}e: one epoch = the data of "
                       f"{per_epoch:g} rounds)", [c["round"] * per_epoch for c in central["val_curve"]],
                       central["val_curve"], "--D"))
    protocol = "sampled"
    for label, xs, curve, style in series:
        if not curve:
            continue
        ax.plot(xs, [c["HR@10"] for c in curve], style, label=label, markersize=4)
        protocol = curve[0]["protocol"]
        x_max = max(x_max, max(xs))
        drawn = True
    if stage1 and offset1:
        ax.axvline(offset1 + 0.5, color="grey", linestyle=":", linewidth=1)
    popularity = run("popularity")
    if popularity:
        value = popularity["final"]["val_sampled"]["HR@10"]
        ax.axhline(value, color="black", linestyle="-.", linewidth=1, label="popularity")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlim(0, x_max + 1)
    ax.set_xlabel("communication round (cumulative over stages; dotted lines = stage boundaries)")
    ax.set_ylabel(f"validation HR@10 ({protocol}, 1 + 100)")
    ax.set_title(f"Validation HR@10, ML-1M top {users} users, seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the bench

def run_quality(args: argparse.Namespace) -> str:
    """Run every requested method for every seed (skipping finished runs); returns the markdown table."""
    from feddmmr.data.dataset import load_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    log.info("machine: %s", json.dumps(info))
    data = load_dataset(args.data, top_users=args.top_users)
    data_info = data.stats()
    log.info("data: %s", json.dumps(data_info))
    names = with_dependencies(args.only or list(METHODS))
    needs_features = {"content_knn", "knn_fusion"} & set(names) or any(run_config(n, args.seeds[0], args).use_memory for n in names
                                                   if METHODS[n][1] not in BASELINES)
    if needs_features:
        ensure_features(data, args.data, Path(args.features), not args.no_progress)
    records: dict[str, list[dict]] = {name: [] for name in names}
    started = time.time()
    for seed in args.seeds:
        for name in names:
            records[name].append(run_one(name, seed, args, data, data_info))
        log.info("seed %d done, %.0fs since start", seed, time.time() - started)
    table = results_table(records, args, info, data_info)
    (out / "results.md").write_text(table)
    if plot_curves(records, out / "validation_curves.png", args.seeds[0], data_info["users"]):
        log.info("wrote %s", out / "validation_curves.png")
    log.info("wrote %s; bench %.0fs", out / "results.md", time.time() - started)
    return table


def start_bench(parse, argv: list[str] | None):
    """What every bench does first: offline switches, logging to stderr, its arguments, torch threads."""
    os.environ.update(OFFLINE_ENV)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    print(run_quality(start_bench(parse_args, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
