"""The ``device`` setting: ``cpu`` (the default), ``cuda`` or ``auto``, for training, evaluation, the
Flower nodes and feature extraction.

* ``auto`` is a GPU when torch sees one, else the CPU; ``cuda`` without a GPU is a ConfigError that
  names the key and says how to install a CUDA build of the pinned torch.
* ``device=cpu`` (and ``auto`` on a machine without a GPU) trains the default run bit for bit.
* Every tensor the trainer and the evaluation make is made on the model's device. A CPU-only machine
  cannot put the model on a GPU, so the check turns it around: the model stays on the CPU and the
  *default* device becomes ``meta`` while a step runs; a tensor made without naming its device
  (``torch.zeros(n)``) lands on ``meta`` and is reported with the line that made it. (A
  ``torch.from_numpy`` batch is always made on the CPU; that it is then moved with ``.to(device)``
  only a real second device can show.)
"""

from __future__ import annotations

import json
import re
import traceback
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from feddmmr.cli import main
from feddmmr.config import ConfigError, TrainConfig, apply_overrides, validate_config
from feddmmr.devices import resolve_device
from feddmmr.engine import assemble as assemble_module
from feddmmr.engine.assemble import LocalClients, assemble, client_seed
from feddmmr.evaluation import evaluate
from feddmmr.federation import checkpoint as ckpt
from feddmmr.federation import client as client_module
from feddmmr.federation.server import aggregate_prototypes
from feddmmr.runner import run_federated

from .fedtools import tiny_config, tiny_dataset, tiny_features
from .test_features import tiny_st  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "feddmmr")
HERE = str(Path(__file__).resolve())


def pinned_torch() -> str:
    """The torch version pyproject.toml pins (``torch==X``)."""
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==")[1] for d in dependencies if re.match(r"torch\s*==", d))


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without a usable GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- resolving the setting

def test_cpu_is_the_default_and_auto_is_a_gpu_only_when_there_is_one():
    assert TrainConfig().device == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_auto_without_a_gpu_is_the_cpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert validate_config(apply_overrides(TrainConfig(), {"device": "auto"}, "--set")).device == "auto"


def test_cuda_without_a_gpu_is_a_config_error_naming_the_key_and_the_cuda_build(no_gpu):
    with pytest.raises(ConfigError) as raised:
        apply_overrides(TrainConfig(), {"device": "cuda"}, "--set")
    message = str(raised.value)
    assert message.startswith("--set: config key 'device' = 'cuda': ")
    assert "torch.cuda.is_available() is False" in message
    assert f"pip install torch=={pinned_torch()} --index-url https://download.pytorch.org/whl/cu" in message
    with pytest.raises(ConfigError, match=r"device = 'cuda': .*CUDA build"):
        resolve_device("cuda")


def test_an_unknown_device_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"config key 'device' = 'gpu' is not one of \('cpu', 'cuda', 'auto'\)"):
        apply_overrides(TrainConfig(), {"device": "gpu"}, "--set")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_device("mps")


def test_the_command_line_refuses_cuda_without_a_gpu_before_any_work(tmp_path, capsys, no_gpu):
    """``--device cuda`` (or ``--set device=cuda``): exit status 2 and one line, nothing written."""
    data = Path(tiny_dataset(tmp_path).source).parent
    for argv in (["train", "--stage", "1", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda"],
                 ["train", "--stage", "1", "--data", str(data), "--out", str(tmp_path / "run"),
                  "--set", "device=cuda"],
                 ["features", "--data", str(data), "--out", str(tmp_path / "features"), "--device", "cuda"]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("feddmmr: error: ") and "'cuda'" in error and "CUDA build" in error, error
    assert not (tmp_path / "run").exists() and not (tmp_path / "features").exists()


def test_flower_checks_the_device_on_each_node_not_on_the_server(tmp_path, no_gpu):
    """The run config is shared: the ServerApp (which only aggregates, on the CPU) accepts
    ``device=cuda``; a node without a GPU refuses it, naming the key."""
    from feddmmr.flower import core

    data = Path(tiny_dataset(tmp_path).source).parent
    run_config = {**core.default_app_config(), "data": str(data), "top_users": "all", "device": "cuda"}
    assert core.train_config(run_config).device == "cuda"
    with pytest.raises(ConfigError, match=r"config key 'device' on this node = 'cuda': .*CUDA build"):
        core.NodeRuntime.create(run_config, {"partition-id": 0, "num-partitions": 1})
    assert core.NodeRuntime.create({**run_config, "device": "auto"}, {}).assembly.model.device.type == "cpu"


# --------------------------------------------------------------------------- same numbers

def _model_bytes(run_dir: Path) -> bytes:
    return (run_dir / ckpt.MODEL_FILE).read_bytes()


def test_device_cpu_trains_the_default_run_bit_for_bit(tmp_path, no_gpu):
    """Stage 1 and Stage 3 (memory, experts, prototypes): the default, ``device=cpu`` and ``auto``
    without a GPU write the same model bytes, losses and scores; config.json records what was asked."""
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    for stage in (1, 3):
        runs = {}
        for device in (None, "cpu", "auto"):
            config = tiny_config(stage) if device is None else tiny_config(stage, device=device)
            out = tmp_path / f"stage{stage}-{device}"
            init = tmp_path / "stage1-None" if stage == 3 else None
            runs[device] = (run_federated(config, data, out, features if stage == 3 else None, init,
                                          progress=False), out)
        default, default_dir = runs[None]
        for device in ("cpu", "auto"):
            history, out = runs[device]
            assert _model_bytes(out) == _model_bytes(default_dir), (stage, device)
            assert [r["losses"] for r in history["rounds"]] == [r["losses"] for r in default["rounds"]]
            assert history["final"] == default["final"]
            assert json.loads((out / ckpt.CONFIG_FILE).read_text())["train"]["device"] == device


def test_a_run_started_before_the_device_key_existed_resumes_exactly(tmp_path, no_gpu):
    """Its resume point has no ``train.device``: resuming with the default (``cpu``, what it ran on)
    continues it bit for bit; another value is a config change, refused."""
    data = tiny_dataset(tmp_path)
    run_federated(tiny_config(1, num_rounds=2), data, tmp_path / "whole", progress=False)
    run_federated(tiny_config(1, num_rounds=1), data, tmp_path / "old", progress=False)
    state_file = tmp_path / "old" / ckpt.RESUME_DIR / "state.json"
    state = json.loads(state_file.read_text())
    del state["run_config"]["train"]["device"]  # as written before the key existed
    state_file.write_text(json.dumps(state))
    with pytest.raises(ckpt.ResumeError, match=r"train\.device was '<absent>', now 'auto'"):
        run_federated(tiny_config(1, num_rounds=2, device="auto"), data, tmp_path / "old", resume=True,
                      progress=False)
    run_federated(tiny_config(1, num_rounds=2), data, tmp_path / "old", resume=True, progress=False)
    assert _model_bytes(tmp_path / "old") == _model_bytes(tmp_path / "whole")


# --------------------------------------------------------------------------- every tensor on the model's device

FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "asarray", "eye", "linspace",
             "rand", "randn", "randint", "randperm", "scalar_tensor", "zeros_like", "ones_like", "full_like",
             "empty_like", "rand_like", "randn_like", "randint_like", "new_zeros", "new_ones", "new_full",
             "new_empty", "new_tensor"}


@dataclass
class Made:
    """One tensor a factory made: the factory, the tensor's device and the line of feddmmr that asked."""

    factory: str
    device: torch.device
    site: str


class FactoryRecorder(TorchFunctionMode):
    """Records the device of every tensor a factory call returns, with the line of feddmmr (or of a test
    step) that called it."""

    def __init__(self):
        super().__init__()
        self.made: list[Made] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in FACTORIES and isinstance(out, torch.Tensor):
            ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE)
                    or (f.filename == HERE and f.name not in ("__torch_function__", "made_off_device"))]
            site = f"{Path(ours[-1].filename).relative_to(REPO)}:{ours[-1].lineno}" if ours else "torch"
            self.made.append(Made(name, out.device, site))
        return out


def made_off_device(step, device: torch.device) -> tuple[list[Made], list[Made]]:
    """Run ``step`` with the default device moved to ``meta``: (every tensor made, those not on ``device``).
    A step that breaks because a stray tensor landed on ``meta`` reports the stray tensors first."""
    recorder = FactoryRecorder()
    error = None
    with recorder, torch.device("meta"):
        try:
            step()
        except Exception as exc:  # e.g. a meta tensor meeting a CPU one: the stray tensor is the finding
            error = exc
    stray = [m for m in recorder.made if m.device != device]
    assert not stray, f"tensors made off the model's device {device}: {stray}"
    assert error is None, f"the step failed: {error!r}"
    return recorder.made, stray


def _stage3(tmp_path, **overrides):
    """A Stage 3 assembly (memory, experts, prototypes, alignment) on the CPU, its clients and prototypes."""
    data, features = tiny_dataset(tmp_path), tiny_features(tmp_path)
    run_federated(tiny_config(1), data, tmp_path / "s1", progress=False)
    config = tiny_config(3, **overrides)
    assembly = assemble(config, data, features, tmp_path / "s1")
    clients = assembly.build_clients()
    prototypes = torch.from_numpy(aggregate_prototypes([c.prototypes for c in clients.values()],
                                                       config.num_global_prototypes, 0))
    return assembly, clients, prototypes


@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_every_tensor_made_while_training_and_scoring_is_on_the_models_device(tmp_path, loss):
    assembly, clients, prototypes = _stage3(tmp_path, loss=loss)
    data, config = assembly.data, assembly.config
    users = sorted(clients)[:3]
    global_state = assembly.model.group_state(config.transmitted_groups)
    seeds = [client_seed(config.seed, 1, u) for u in users]

    def train() -> None:
        trainer = assembly.trainer()  # its catalogue mask too
        updates = trainer.train_many([clients[u] for u in users], global_state, seeds, prototypes)
        assert all(v.device.type == "cpu" for update in updates for v in update.state.values())  # what travels

    made, _ = made_off_device(train, assembly.model.device)
    sites = {m.site for m in made}
    assert any("federation/client.py" in s for s in sites) and any("models/" in s for s in sites)

    model = assembly.model.eval()
    local = LocalClients(assembly, clients, tmp_path / "cache")
    for split, protocol, block in (("val", "sampled", 8192), ("test", "full", 8192), ("test", "full", 7)):
        original = assemble_module.ITEM_BLOCK
        assemble_module.ITEM_BLOCK = block  # the scorer precomputes the item tables, as for a large catalogue
        try:
            scorer = assemble_module.memory_scorer(model, assembly.content, local.memory_ids(split), prototypes)
        finally:
            assemble_module.ITEM_BLOCK = original
        made_off_device(lambda: evaluate(scorer, data, split, protocol, max_len=8, batch_size=5, item_block=block,
                                         cache_dir=tmp_path / "cache", num_negatives=config.eval_negatives,
                                         device=model.device), model.device)


def test_the_pooled_pass_makes_its_tensors_on_the_models_device(tmp_path):
    from feddmmr.centralized import pooled_pass

    assembly, clients, prototypes = _stage3(tmp_path)
    model, config = assembly.model, assembly.config
    model.set_trainable(config.transmitted_groups)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    arrays = [np.concatenate([getattr(c, key) for c in clients.values()]) for key in ("inputs", "targets", "memory")]
    pool, generator = torch.from_numpy(assembly.data.occurring_items()), torch.Generator().manual_seed(0)
    pooled_pass(model, optimizer, *arrays, assembly.content, pool, config, generator, prototypes)  # Adam's state
    made_off_device(lambda: pooled_pass(model, optimizer, *arrays, assembly.content, pool, config, generator,
                                        prototypes), model.device)


def test_the_check_catches_a_tensor_made_without_its_device(tmp_path, monkeypatch):
    """The check itself: a ``torch.zeros(n)`` planted in the trainer's batch is reported, with its line."""
    assembly, clients, prototypes = _stage3(tmp_path)
    trainer, config = assembly.trainer(), assembly.config
    batch = client_module.LocalTrainer._batch

    def planted(self, *args, **kwargs):
        torch.zeros(len(args[0]))  # the mistake: a tensor made without device=
        return batch(self, *args, **kwargs)

    monkeypatch.setattr(client_module.LocalTrainer, "_batch", planted)
    users = sorted(clients)[:2]
    with pytest.raises(AssertionError, match=r"\[Made\(factory='zeros', device=device\(type='meta'\), "
                                             r"site='tests/test_device.py:\d+'\)"):
        made_off_device(lambda: trainer.train_many([clients[u] for u in users],
                                                   assembly.model.group_state(config.transmitted_groups),
                                                   [1, 2], prototypes), trainer.model.device)


# --------------------------------------------------------------------------- feature extraction

def test_feature_encoders_run_on_the_requested_device_and_say_so(tmp_path, tiny_st, no_gpu):  # noqa: F811
    from feddmmr.features.extract import run_extract
    from feddmmr.features.store import load_table
    from feddmmr.features.text_encoder import load_text_encoder

    assert load_text_encoder(tiny_st, torch.device("cpu")).model.device.type == "cpu"
    data = tiny_dataset(tmp_path)
    summary = run_extract(data, Path(data.source).parent, tmp_path / "features", text_encoder=tiny_st,
                          modalities=("text",), progress=False, device="auto")
    assert summary["text"]["status"] == "computed"
    assert load_table(tmp_path / "features" / "text_features.pt").meta["device"] == "cpu"
