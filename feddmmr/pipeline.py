"""The main job: features (if missing) -> Stage 1 -> Stage 3 -> popularity -> one test report.

Re-running it resumes an interrupted stage and skips finished ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .baselines import popularity_scorer
from .config import TrainConfig, apply_overrides, load_preset
from .data.dataset import SequenceDataset
from .engine.assemble import data_for
from .evaluation import METRIC_NAMES, evaluate, format_metrics
from .features.extract import run_extract
from .features.store import FeatureError, load_features
from .federation.checkpoint import HISTORY_FILE, resume_dir
from .runner import run_federated

log = logging.getLogger(__name__)

STAGES = (("stage1", "stage1_cohort20_eps"), ("stage3", "stage3_tuned"))  # (name, default preset)


def stage_configs(presets: tuple[str | None, str | None], overrides: dict, seed: int,
                  top_users: int | str | None) -> list[tuple[str, TrainConfig]]:
    """Each stage's config: its preset (or the default), ``overrides`` for both, the seed and user set."""
    configs = []
    for (name, default), chosen in zip(STAGES, presets):
        config = apply_overrides(load_preset(chosen or default), overrides, "--set")
        config.seed, config.top_users = seed, (None if top_users == "all" else top_users)
        configs.append((name, config))
    return configs


def ensure_features(data: SequenceDataset, data_path: Path, features: Path, progress: bool,
                    item_text: Path | None = None, posters: Path | None = None, device: str = "cpu") -> dict:
    """An existing valid feature folder as it is; else extract one (the encoders on ``device``). With
    ``item_text`` or ``posters`` the extraction always runs: it recomputes a modality only when its
    inputs changed (input hash)."""
    if item_text is None and posters is None:
        try:
            text, visual = load_features(features, data.num_items)
            return {name: {"status": "existing", "encoder": t.meta["encoder"], "coverage": t.coverage}
                    for name, t in (("text", text), ("visual", visual))}
        except FeatureError:
            pass
    return run_extract(data, data_path, features, posters=posters, item_text=item_text, workers=1,
                       progress=progress, device=device)


def modality_note(summary: dict) -> str | None:
    """What Stage 3 can use when a modality has no item at all (no posters, no texts); None if both do."""
    empty = [name for name in ("visual", "text") if not (summary.get(name) or {}).get("coverage")]
    if not empty:
        return None
    if len(empty) == 2:
        return "no item has a poster or a text: Stage 3 has no content features (its experts see only zeros)"
    missing, kept = ("posters", "text") if empty == ["visual"] else ("texts", "visual (poster)")
    return f"no item has {missing}: Stage 3 runs with {kept} features only"


def run_pipeline(data: SequenceDataset, data_path: Path, out: Path, features: Path | None,
                 configs: list[tuple[str, TrainConfig]], seed: int, progress: bool = True,
                 item_text: Path | None = None, posters: Path | None = None) -> dict:
    """Run every stage into ``out/<preset>`` and write ``report.json`` and ``report.md``; the report."""
    out.mkdir(parents=True, exist_ok=True)
    data.save_item_mapping(out / "item_mapping.tsv")
    stats = data.stats()
    log.info("data: %s", json.dumps(stats))
    features = features or out / "features"
    summary = ensure_features(data, data_path, features, progress, item_text, posters, configs[0][1].device)
    log.info("features: %s", json.dumps({k: {"status": v["status"], "coverage": v.get("coverage")}
                                          for k, v in summary.items()}))
    if (note := modality_note(summary)) is not None:
        log.warning("%s", note)
    report = {"data": stats, "features": summary, "seed": seed, "runs": {}}
    scored = data_for(configs[0][1], data)  # the baselines face the runs' new-item protocol, if any
    for protocol in ("sampled", "full"):
        result = evaluate(popularity_scorer(scored), scored, "test", protocol, seed=seed, cache_dir=out / "cache",
                          num_negatives=configs[0][1].eval_negatives)
        report["runs"].setdefault("popularity", {})[f"test_{protocol}"] = result
        print("popularity " + format_metrics(result))
    previous = None
    for name, config in configs:
        run_dir = out / config.preset
        history_file = run_dir / HISTORY_FILE
        if history_file.exists() and "final" in json.loads(history_file.read_text()):
            log.info("%s already finished in %s; skipping (delete the folder to retrain)", name, run_dir)
        else:
            reads_features = config.use_memory or (config.new_item_channel != "off" and config.cold_item_fraction > 0)
            run_federated(config, data, run_dir, features if reads_features else None, previous,
                          resume=resume_dir(run_dir) is not None, progress=progress, data_info=stats)
        history = json.loads(history_file.read_text())
        report["runs"][config.preset] = {**history["final"], "best_round": history["best_round"],
                                         "seconds": history.get("total_seconds"), "run_dir": str(run_dir)}
        if "new_item_channel" in history:  # the same model without the channel, beside it
            channel = history["new_item_channel"]
            report["runs"][config.preset]["new_item_channel"] = {k: channel[k] for k in ("slope", "offset")}
            report["runs"][f"{config.preset} (no new-item channel)"] = {
                **channel["final_without_channel"], "best_round": history["best_round"]}
        previous = run_dir
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    print((out / "report.md").read_text())
    return report


def feature_lines(summary: dict) -> list[str]:
    """'Features: text 1682 items, visual 0 items.' and, when a modality is empty, what that means."""
    if not summary:
        return []
    counts = ", ".join(f"{name} {(summary.get(name) or {}).get('coverage', 0)} items" for name in ("text", "visual"))
    note = modality_note(summary)
    return [f"Item features: {counts}" + (f"; {note}." if note else ".")]


def markdown_report(report: dict) -> str:
    """The pipeline's results table: test split, both protocols, each run's best validation round."""
    lines = [f"Test split, {report['data']['users']} users, seed {report['seed']}; sampled = 1 + "
             f"{next(iter(report['runs'].values()))['test_sampled'].get('negatives', 100)} candidates, "
             "full = all items (history excluded).", *feature_lines(report.get("features") or {}), "",
             "| run | protocol | best round | " + " | ".join(METRIC_NAMES) + " |",
             "|---|---|---|" + "---|" * len(METRIC_NAMES)]
    for name, run in report["runs"].items():
        for protocol in ("sampled", "full"):
            result = run[f"test_{protocol}"]
            cells = " | ".join(f"{result[m]:.4f}" for m in METRIC_NAMES)
            lines.append(f"| {name} | {protocol} | {run.get('best_round', '-')} | {cells} |")
            for kind in ("warm", "new"):  # the new-item protocol: users by test-target type
                group = result.get(kind)
                if group and group["users"]:
                    cells = " | ".join(f"{group[m]:.4f}" for m in METRIC_NAMES)
                    lines.append(f"| {name} | {protocol}, {kind} targets ({group['users']} users) | "
                                 f"{run.get('best_round', '-')} | {cells} |")
    return "\n".join(lines) + "\n"
