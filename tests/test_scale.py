"""Costs that grow with the work: clients built when sampled, validation on a sample of users.

Both are exact where they claim to be: a run whose clients are built on demand is the run whose
clients are all held, bit for bit; a sampled validation scores exactly the sampled users.
"""

from __future__ import annotations

import json

import numpy as np

from feddmmr.engine.loop import validation_sample
from feddmmr.federation import checkpoint as ckpt
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features


def _model_bytes(run_dir) -> bytes:
    return (run_dir / ckpt.MODEL_FILE).read_bytes()


def test_clients_built_on_demand_train_the_same_model_as_resident_clients(tmp_path):
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    for stage, init in ((1, None), (3, tmp_path / "s1")):
        runs = {}
        for resident in (True, False):
            out = tmp_path / f"stage{stage}-{resident}"
            history = run_federated(tiny_config(stage, resident_clients=resident), data, out,
                                    features if stage == 3 else None, init, progress=False)
            runs[resident] = (history, out)
        (held, held_dir), (lazy, lazy_dir) = runs[True], runs[False]
        assert _model_bytes(held_dir) == _model_bytes(lazy_dir)
        assert held["final"] == lazy["final"]
        assert [r["losses"] for r in held["rounds"]] == [r["losses"] for r in lazy["rounds"]]
        assert not (lazy_dir / ckpt.MEMORY_FILE).exists()  # nothing of the clients is held to write


def test_validation_on_a_user_sample_scores_those_users_and_the_final_scores_all(tmp_path):
    data = tiny_dataset(tmp_path)
    config = tiny_config(1, eval_users=5)
    history = run_federated(config, data, tmp_path / "run", progress=False)
    assert all(r["val_metrics"]["users"] == 5 for r in history["rounds"])
    assert all(result["users"] == data.num_users for result in history["final"].values())
    sample = validation_sample(config, data.num_users)
    assert len(sample) == 5 and len(set(sample.tolist())) == 5
    assert np.array_equal(sample, validation_sample(config, data.num_users))  # the same users every round
    assert validation_sample(tiny_config(1, eval_users=0), data.num_users) is None
    assert validation_sample(tiny_config(1, eval_users=data.num_users), data.num_users) is None
    saved = json.loads((tmp_path / "run" / ckpt.CONFIG_FILE).read_text())
    assert saved["train"]["eval_users"] == 5


def test_full_ranking_in_item_blocks_gives_the_ranks_of_one_pass(tmp_path):
    """Streaming the catalogue in blocks (with the item-only expert terms computed once) ranks
    every target exactly where scoring the whole catalogue at once does."""
    from feddmmr.engine.assemble import LocalClients, assemble
    from feddmmr.evaluation import evaluate
    import feddmmr.engine.assemble as assemble_module

    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    for stage, init in ((1, None), (3, tmp_path / "s1")):
        assembly = assemble(tiny_config(stage), data, features if stage == 3 else None, init)
        local = LocalClients(assembly, assembly.build_clients(), None)
        model = assembly.model.eval()
        for split in ("val", "test"):
            whole = evaluate(assemble_module.memory_scorer(model, assembly.content, local.memory_ids(split), None),
                             data, split, "full", max_len=8)
            original = assemble_module.ITEM_BLOCK
            assemble_module.ITEM_BLOCK = 7  # the scorer's tables too, as for a large catalogue
            try:
                scorer = assemble_module.memory_scorer(model, assembly.content, local.memory_ids(split), None)
            finally:
                assemble_module.ITEM_BLOCK = original
            blocked = evaluate(scorer, data, split, "full", max_len=8, item_block=7)
            assert blocked == whole, (stage, split)
