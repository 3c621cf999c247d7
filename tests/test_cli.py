"""The command line end to end on a tiny dataset: train, evaluate, recommend, pipeline, errors."""

from __future__ import annotations

import json
import subprocess
import sys

from .fedtools import tiny_dataset, tiny_features

TINY = ["--set", "sasrec_hidden_dim=16", "--set", "sasrec_num_blocks=1", "--set", "sasrec_num_heads=2",
        "--set", "max_seq_len=8", "--set", "moe_num_heads=2", "--set", "memory_top_k=4", "--set", "num_rounds=2",
        "--set", "client_fraction=0.5", "--set", "batch_size=4", "--set", "num_negatives=5",
        "--set", "eval_negatives=10", "--set", "num_global_prototypes=2", "--set", "num_prototypes=2"]


def feddmmr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feddmmr.cli", *args], capture_output=True, text=True)


def test_train_evaluate_recommend_and_stage_handover(tmp_path):
    data_dir = tiny_dataset(tmp_path).source.rsplit("/", 1)[0]
    features = tiny_features(tmp_path)
    s1, s3 = tmp_path / "s1", tmp_path / "s3"
    result = feddmmr("train", "--stage", "1", "--data", data_dir, "--top-users", "all", "--out", str(s1),
                     "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    assert (s1 / "model.safetensors").exists() and (s1 / "train_history.json").exists()
    result = feddmmr("train", "--stage", "3", "--data", data_dir, "--top-users", "all", "--features", str(features),
                     "--init", str(s1), "--out", str(s3), "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    config = json.loads((s3 / "config.json").read_text())
    assert config["train"]["preset"] == "stage3_skip_stage2" and config["init"] == str(s1)

    result = feddmmr("evaluate", "--checkpoint", str(s3), "--data", data_dir, "--protocol", "sampled",
                     "--split", "test", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["protocol"] == "sampled" and metrics["split"] == "test" and 0 <= metrics["HR@10"] <= 1
    history = json.loads((s3 / "train_history.json").read_text())
    assert metrics["HR@10"] == history["final"]["test_sampled"]["HR@10"]  # the same model, memory and candidates

    result = feddmmr("recommend", "--checkpoint", str(s3), "--data", data_dir, "--user", "3", "--k", "5", "--json")
    assert result.returncode == 0, result.stderr
    recs = json.loads(result.stdout)["items"]
    seen = {int(line.split("::")[1]) for line in open(f"{data_dir}/ratings.dat") if line.startswith("3::")}
    assert len(recs) == 5 and not {r["item"] for r in recs} & seen
    assert recs[0]["title"].startswith("Movie")


def test_stage3_without_init_and_bad_set_are_clear_errors(tmp_path):
    data_dir = tiny_dataset(tmp_path).source.rsplit("/", 1)[0]
    result = feddmmr("train", "--stage", "3", "--data", data_dir, "--features", str(tiny_features(tmp_path)),
                     "--out", str(tmp_path / "x"), *TINY)
    assert result.returncode == 2 and "--init" in result.stderr and "Traceback" not in result.stderr
    result = feddmmr("train", "--stage", "1", "--data", data_dir, "--out", str(tmp_path / "y"),
                     "--set", "num_rounds=many")
    assert result.returncode == 2 and "num_rounds" in result.stderr
    result = feddmmr("train", "--stage", "1", "--data", data_dir, "--out", str(tmp_path / "y"), "--set", "rounds=2")
    assert result.returncode == 2 and "unknown config key 'rounds'" in result.stderr


def test_pipeline_runs_both_stages_and_reports_both_protocols(tmp_path):
    data_dir = tiny_dataset(tmp_path).source.rsplit("/", 1)[0]
    features = tiny_features(tmp_path)
    out = tmp_path / "pipe"
    result = feddmmr("pipeline", "--data", data_dir, "--top-users", "all", "--features", str(features),
                     "--out", str(out), "--no-progress", *TINY)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["runs"]) == {"popularity", "stage1_cohort20_eps", "stage3_tuned"}
    assert "| stage3_tuned | full |" in (out / "report.md").read_text()
    again = feddmmr("pipeline", "--data", data_dir, "--top-users", "all", "--features", str(features),
                    "--out", str(out), "--no-progress", *TINY)
    assert again.returncode == 0 and "already finished" in again.stderr
