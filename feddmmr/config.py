"""Training configuration: one flat dataclass, the seed's key names, TOML presets in ``configs/``."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models.groups import PARAM_GROUPS
from .models.moe import OBJECTIVES
from .new_items import CHANNELS

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class TrainConfig:
    # stage and schedule
    stage: int = 1
    preset: str = "stage1_backbone"
    num_rounds: int = 20
    client_fraction: float = 0.1
    clients_per_round: int = 0  # > 0: sample this many clients a round whatever the population (else client_fraction)
    local_epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 64
    num_negatives: int = 100  # sampled_softmax / gbce: uniform negatives per training window
    loss: str = "sampled_softmax"  # next-item objective: sampled_softmax | full_softmax | gbce (models/moe.py)
    gbce_t: float = 0.75  # gbce: calibration t of gSASRec (0 = plain BCE, 1 = fully calibrated)
    weight_decay: float = 0.0
    local_optimizer: str = "adam"  # adam | sgd (fresh per client and round)
    local_adam_eps: float = 1e-8  # the local Adam's epsilon: coordinates whose gradient is far below it step like SGD
    fedprox_mu: float = 0.0  # > 0: FedProx proximal term
    item_embedding_aggregation: str = "updated_rows"  # or "fedavg"
    update_negative_items: bool = True  # False: a client only moves rows of items it interacted with
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    server_lr_schedule: str = "constant"  # constant | cosine (server step annealed over num_rounds)
    server_lr_final_ratio: float = 0.0  # cosine: the last round's step as a share of server_learning_rate
    # update screening and aggregation (federation/server.py; docs/robustness.md)
    aggregation: str = "fedavg"  # fedavg | fedprox (needs fedprox_mu > 0) | trimmed_mean | median
    trim_fraction: float = 0.1  # trimmed_mean: share dropped at each end of every coordinate, [0, 0.5)
    clip_norm: float = 0.0  # > 0: clip each client's update delta to this L2 norm; 0 = off
    # fault injection, for benchmarks and tests only (federation/faults.py); "none" in real runs
    attack: str = "none"  # none | scale | sign_flip | nan
    attack_fraction: float = 0.1  # share of each round's sampled clients that attack, [0, 1]
    attack_scale: float = 10.0  # scale: delta x attack_scale; sign_flip: delta x -attack_scale
    trainable_groups: list[str] = field(default_factory=lambda: ["item_embedding", "backbone"])
    eval_every: int = 1
    eval_protocol: str = "sampled"  # validation protocol used to pick the best round
    eval_negatives: int = 100  # negatives per user in the sampled protocol (1 + 100)
    eval_users: int = 0  # > 0: validate each round on this many users (a fixed seeded sample); the final scores use all
    final_users: int = 0  # > 0: the final scores on this many users (a fixed seeded sample; costs at scale), 0 = all
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto (cuda when available): where the model trains and scores (devices.py)
    # reliability
    client_dropout: float = 0.0  # fault injection: this fraction of each round's sampled clients fails
    min_clients: int = 1  # a round needs this many answers, else the run stops (resumable)
    resident_clients: bool = True  # False: build a round's clients when sampled, keep only the users' eval memory
    # data
    top_users: int | None = 1000
    cold_item_fraction: float = 0.0  # > 0: the new-item protocol (SequenceDataset.with_cold_items), [0, 1)
    cold_item_seed: int = 0  # which items are new; the same for every training seed unless changed
    new_item_channel: str = "off"  # off | content: new items scored by their calibrated content (new_items.py)
    # model (seed names)
    sasrec_hidden_dim: int = 128
    sasrec_num_blocks: int = 2
    sasrec_num_heads: int = 4
    max_seq_len: int = 50
    moe_num_heads: int = 8
    dropout: float = 0.1
    gating_init: float = 0.01
    fix_gate: bool = False  # ablation: keep the gate at gating_init
    use_router: bool = True  # False (ablation): the experts are mixed equally; the router is neither trained nor sent
    contrastive_lambda: float = 0.5
    load_balance_lambda: float = 0.01
    contrastive_temperature: float = 0.07
    standardise_features: bool = False  # z-score item features per dimension before the projectors (moe.Projector)
    new_group_lr_multiplier: float = 1.0  # local learning rate x this for projectors, experts, router and gate
    content_item_side: bool = False  # Stage 3 with memory: candidates scored by E[c] + P(content[c]) (moe.ContentTower)
    content_id_dropout: float = 0.0  # training only, with content_item_side: drop each item's ID row with this probability
    # multimodal inputs and memory (SPEC §4)
    use_memory: bool = False
    use_visual: bool = True
    use_text: bool = True
    memory_top_k: int = 20
    st_window: int = 50
    lt_capacity: int = 200  # 0: no long-term memory (the experts read the short-term window only)
    novelty_threshold: float = -1.0  # < 0: per-client quantile below
    novelty_quantile: float = 0.9
    duplicate_threshold: float = 0.74
    recency_half_life: float = 200.0
    recency_weight: float = 0.6
    st_fraction: float = 0.25
    num_prototypes: int = 5
    use_prototypes: bool = True
    num_global_prototypes: int = 10
    # the seed's dynamic memory (issue #14; docs/quality-memory.md, "The seed's memory as written"); off by default
    memory_retrieval: str = "centroid"  # centroid: LT entries ranked by the ST centroid | candidate: by each candidate item
    surprise_trigger: bool = False  # local training writes its high-loss training items to the client's LT memory
    surprise_quantile: float = 0.9  # surprise_threshold < 0: a position is surprising above this quantile of the client's losses
    surprise_threshold: float = -1.0  # >= 0: a fixed loss threshold instead of the client's quantile
    # differential privacy (central, user-level; see federation/privacy.py). Off unless sigma or a target epsilon is set.
    dp_noise_multiplier: float = 0.0  # sigma: noise std = sigma * dp_clip_norm on the sum of clipped updates
    dp_target_epsilon: float = 0.0  # > 0: sigma from the RDP accountant to reach this epsilon after num_rounds
    dp_clip_norm: float = 0.0  # C: L2 bound on each client's update (required in DP mode)
    dp_delta: float = 1e-4  # the delta of the reported (epsilon, delta); keep it below 1 / number of users

    @property
    def transmitted_groups(self) -> list[str]:
        """Only the groups a stage trains travel; a fixed gate or an unused router stays home."""
        groups = list(self.trainable_groups)
        if self.fix_gate and "gate" in groups:
            groups.remove("gate")
        if not self.use_router and "router" in groups:
            groups.remove("router")
        return groups

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0

    def model_kwargs(self, num_items: int, visual_dim: int, text_dim: int) -> dict:
        return dict(num_items=num_items, sasrec_hidden_dim=self.sasrec_hidden_dim,
                    sasrec_num_blocks=self.sasrec_num_blocks, sasrec_num_heads=self.sasrec_num_heads,
                    max_seq_len=self.max_seq_len, moe_num_heads=self.moe_num_heads, visual_dim=visual_dim,
                    text_dim=text_dim, dropout=self.dropout, gating_init=self.gating_init,
                    contrastive_lambda=self.contrastive_lambda, load_balance_lambda=self.load_balance_lambda,
                    contrastive_temperature=self.contrastive_temperature,
                    **({"standardise_features": True} if self.standardise_features else {}),
                    **({"content_item_side": True} if self.content_item_side else {}),
                    **({"content_id_dropout": self.content_id_dropout} if self.content_id_dropout else {}),
                    **({"use_router": False} if not self.use_router else {}),
                    **({"candidate_retrieval": self.memory_top_k} if self.memory_retrieval == "candidate" else {}))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``open_low``/``open_high`` exclude the bound."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if value != value or value in (float("inf"), float("-inf")):
            return False
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}" if self.low is not None else "any finite number"
        if self.low is None:
            return f"{'<' if self.open_high else '<='} {self.high}"
        return f"{'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


POSITIVE = Range(1)  # counts and sizes: at least 1
FRACTION = Range(0, 1)
NON_NEGATIVE = Range(0)
STRICTLY_POSITIVE = Range(0, open_low=True)

# Every numeric key's allowed values (a test checks none is missing). New keys: add a line here.
RANGES: dict[str, Range] = {
    "stage": Range(1, 3), "num_rounds": POSITIVE, "client_fraction": Range(0, 1, open_low=True),
    "clients_per_round": NON_NEGATIVE,
    "local_epochs": POSITIVE, "learning_rate": STRICTLY_POSITIVE, "batch_size": POSITIVE,
    "num_negatives": POSITIVE, "gbce_t": FRACTION, "weight_decay": NON_NEGATIVE, "fedprox_mu": NON_NEGATIVE,
    "local_adam_eps": STRICTLY_POSITIVE,
    "server_learning_rate": STRICTLY_POSITIVE, "server_momentum": Range(0, 1, open_high=True),
    "server_lr_final_ratio": FRACTION,
    "eval_every": POSITIVE, "eval_negatives": POSITIVE, "eval_users": NON_NEGATIVE, "final_users": NON_NEGATIVE, "seed": Range(0, 2**32 - 1), "top_users": POSITIVE,
    "cold_item_fraction": Range(0, 1, open_high=True), "cold_item_seed": Range(0, 2**32 - 1),
    "sasrec_hidden_dim": POSITIVE, "sasrec_num_blocks": POSITIVE, "sasrec_num_heads": POSITIVE,
    "max_seq_len": POSITIVE, "moe_num_heads": POSITIVE, "dropout": Range(0, 1, open_high=True),
    "gating_init": NON_NEGATIVE, "contrastive_lambda": NON_NEGATIVE, "load_balance_lambda": NON_NEGATIVE,
    "contrastive_temperature": STRICTLY_POSITIVE, "new_group_lr_multiplier": STRICTLY_POSITIVE,
    "content_id_dropout": Range(0, 1, open_high=True), "memory_top_k": POSITIVE, "st_window": POSITIVE,
    "lt_capacity": NON_NEGATIVE, "novelty_threshold": Range(None, 1), "novelty_quantile": FRACTION,
    "duplicate_threshold": Range(-1, 1), "recency_half_life": STRICTLY_POSITIVE, "recency_weight": FRACTION,
    "st_fraction": FRACTION, "num_prototypes": POSITIVE, "num_global_prototypes": POSITIVE,
    "surprise_quantile": FRACTION, "surprise_threshold": Range(),
    "client_dropout": Range(0, 1, open_high=True), "min_clients": POSITIVE,
    "trim_fraction": Range(0, 0.5, open_high=True), "clip_norm": NON_NEGATIVE, "attack_fraction": FRACTION,
    "attack_scale": Range(), "dp_noise_multiplier": NON_NEGATIVE, "dp_target_epsilon": NON_NEGATIVE,
    "dp_clip_norm": NON_NEGATIVE, "dp_delta": Range(0, 1, open_low=True, open_high=True),
}
DEVICES = ("cpu", "cuda", "auto")  # resolved by devices.resolve_device
AGGREGATIONS = ("fedavg", "fedprox", "trimmed_mean", "median")
ATTACKS = ("none", "scale", "sign_flip", "nan")  # fault injection for benchmarks and tests
CHOICES: dict[str, tuple[str, ...]] = {
    "local_optimizer": ("adam", "sgd"),
    "item_embedding_aggregation": ("updated_rows", "fedavg"),
    "server_optimizer": ("fedavg", "fedavgm", "fedadam"),
    "server_lr_schedule": ("constant", "cosine"),
    "eval_protocol": ("sampled", "full"),
    "loss": OBJECTIVES,
    "aggregation": AGGREGATIONS,
    "attack": ATTACKS,
    "device": DEVICES,
    "memory_retrieval": ("centroid", "candidate"),
    "new_item_channel": CHANNELS,
}


def _kind(name: str) -> str:
    return str({f.name: f.type for f in dataclasses.fields(TrainConfig)}[name])


def _coerce(name: str, value, source: str):
    """Turn a TOML or ``--set`` value into the field's type, with a clear error."""
    kind = _kind(name)
    try:
        if isinstance(value, str) and "list" in kind:
            return [v for v in value.replace(" ", "").split(",") if v]
        if isinstance(value, str):
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            if "None" in kind and value.lower() in ("none", "all", ""):
                return None
            if "int" in kind and "float" not in kind:
                return int(value)
            if "float" in kind:
                return float(value)
            return value
        if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    except ValueError:
        raise ConfigError(f"{source}: config key {name!r}: cannot read {value!r} as {kind}") from None


def _type_ok(value, kind: str) -> bool:
    """Does ``value`` have the declared field type (``kind`` as written in the dataclass)?"""
    if value is None:
        return "None" in kind
    if isinstance(value, bool):
        return kind.startswith("bool")
    if isinstance(value, int):
        return "int" in kind or "float" in kind
    if isinstance(value, float):
        return "float" in kind
    if isinstance(value, str):
        return kind.startswith("str")
    if isinstance(value, list):
        return "list" in kind and all(isinstance(v, str) for v in value)
    return False


def validate_config(config: TrainConfig, source: str = "config", *, num_users: int | None = None,
                    transport: str = "in-process", secure_aggregation: bool = False) -> TrainConfig:
    """Check every key's type, range or choice and the cross-key constraints; one clear ConfigError.

    The one place for config validation: a new key gets its range in RANGES or its choices in
    CHOICES. ``num_users`` adds the quorum check (``min_clients`` reachable each round);
    ``transport="flower"`` refuses what only the in-process runner does (fault injection, DP), and
    ``secure_aggregation`` what SecAgg+ cannot do (rules that need each update). In-process, the
    ``device`` must be usable on this machine; on Flower each node checks it on its own hardware.
    """
    for spec in dataclasses.fields(TrainConfig):
        name, value, kind = spec.name, getattr(config, spec.name), str(spec.type)
        if not _type_ok(value, kind):
            raise ConfigError(f"{source}: config key {name!r} = {value!r} has type {type(value).__name__}, "
                              f"expected {kind}")
        if name in RANGES and value is not None and value not in RANGES[name]:
            raise ConfigError(f"{source}: config key {name!r} = {value!r} is out of range; allowed: {RANGES[name]}")
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{source}: config key {name!r} = {value!r} is not one of {CHOICES[name]}")
    unknown = [g for g in config.trainable_groups if g not in PARAM_GROUPS]
    if unknown or not config.trainable_groups:
        raise ConfigError(f"{source}: config key 'trainable_groups' = {config.trainable_groups!r}: expected a "
                          f"non-empty list of parameter groups from {PARAM_GROUPS}")
    if config.content_item_side and not (config.use_memory and "projectors" in config.trainable_groups):
        raise ConfigError(f"{source}: config key 'content_item_side' needs use_memory=true (the item features) and "
                          f"'projectors' in trainable_groups (its tower is trained there), got use_memory="
                          f"{config.use_memory}, trainable_groups={config.trainable_groups}")
    if config.content_id_dropout and not config.content_item_side:
        raise ConfigError(f"{source}: config key 'content_id_dropout' = {config.content_id_dropout} needs "
                          "content_item_side=true (it drops ID rows so that the content term scores alone)")
    _check_dynamic_memory(config, source)
    if config.aggregation == "fedprox" and not config.fedprox_mu > 0:
        raise ConfigError(f"{source}: config key 'fedprox_mu': aggregation='fedprox' needs fedprox_mu > 0 (the "
                          f"proximal weight, e.g. 0.01), got {config.fedprox_mu}")
    for heads in ("sasrec_num_heads", "moe_num_heads"):
        if config.sasrec_hidden_dim % getattr(config, heads):
            raise ConfigError(f"{source}: config key 'sasrec_hidden_dim' = {config.sasrec_hidden_dim} is not "
                              f"divisible by {heads} = {getattr(config, heads)}")
    if config.dp_enabled:
        _check_privacy(config, source)
    if num_users is not None:
        _check_quorum(config, source, num_users)
    if transport == "flower":
        _check_flower(config, source, secure_aggregation)
    else:  # on Flower each node resolves the device on its own hardware (the server never trains)
        _check_device(config, source)
    return config


def _check_dynamic_memory(config: TrainConfig, source: str) -> None:
    """The seed's dynamic memory keys need the memory; candidate retrieval is not built for the full softmax."""
    if config.memory_retrieval == "candidate" and not config.use_memory:
        raise ConfigError(f"{source}: config key 'memory_retrieval' = 'candidate' needs use_memory=true (a Stage 3 "
                          "with the client memory)")
    if config.memory_retrieval == "candidate" and config.loss == "full_softmax":
        raise ConfigError(f"{source}: config key 'memory_retrieval' = 'candidate' cannot be combined with "
                          "loss='full_softmax' (every catalogue item would read its own memory at every step); use "
                          "loss='sampled_softmax' or 'gbce', or memory_retrieval='centroid'")
    if config.surprise_trigger and not (config.use_memory and config.lt_capacity > 0):
        raise ConfigError(f"{source}: config key 'surprise_trigger' needs use_memory=true and lt_capacity > 0 (it "
                          f"writes to the long-term memory), got use_memory={config.use_memory}, "
                          f"lt_capacity={config.lt_capacity}")


CUDA_HELP = ("install a CUDA build of the pinned torch before the project, e.g. `pip install torch=={version} "
             "--index-url https://download.pytorch.org/whl/cu128` (docs/configuration.md, Devices), or use device=cpu or device=auto")


def device_problem(name: str) -> str | None:
    """Why ``name`` cannot be used on this machine (None: it can)."""
    if name not in DEVICES:
        return f"{name!r} is not one of {DEVICES}"
    if name == "cuda" and not torch.cuda.is_available():
        version = torch.__version__.split("+")[0]
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return (f"torch {torch.__version__} ({build}) sees no CUDA GPU (torch.cuda.is_available() is False): "
                + CUDA_HELP.format(version=version))
    return None


def _check_device(config: TrainConfig, source: str) -> None:
    """``device=cuda`` on a machine without a usable GPU fails here, before any work, saying how to fix it."""
    problem = device_problem(config.device)
    if problem is not None:
        raise ConfigError(f"{source}: config key 'device' = {config.device!r}: {problem}")


def _check_privacy(config: TrainConfig, source: str) -> None:
    """DP mode: the ``dp_*`` keys together, and nothing that would leak past the noise: ``updated_rows``
    averaging tells the server which item rows each client changed, and memory prototypes travel
    un-noised."""
    if config.clients_per_round:
        raise ConfigError(f"{source}: config key 'clients_per_round' = {config.clients_per_round}: the DP accountant "
                          "assumes Poisson sampling at rate client_fraction; set client_fraction instead in DP mode")
    if config.dp_noise_multiplier > 0 and config.dp_target_epsilon > 0:
        raise ConfigError(f"{source}: config keys 'dp_noise_multiplier' and 'dp_target_epsilon' both set: set one "
                          "(the target epsilon chooses the noise multiplier)")
    if not config.dp_clip_norm > 0:
        raise ConfigError(f"{source}: config key 'dp_clip_norm': DP mode needs a positive clipping norm for client "
                          f"updates (got {config.dp_clip_norm!r})")
    if config.item_embedding_aggregation != "fedavg":
        raise ConfigError(f"{source}: config key 'item_embedding_aggregation' = "
                          f"{config.item_embedding_aggregation!r} reveals which item rows each client updated, "
                          "which DP does not cover: set item_embedding_aggregation=fedavg in DP mode")
    if config.use_memory and config.use_prototypes:
        raise ConfigError(f"{source}: config key 'use_prototypes': memory prototypes would be uploaded without "
                          "noise, which DP does not cover: set use_prototypes=false in DP mode")


def _check_quorum(config: TrainConfig, source: str, num_users: int) -> None:
    """``min_clients`` must be reachable: at most the number of clients sampled per round."""
    sampled = round_size(num_users, config.client_fraction, config.clients_per_round)
    if config.min_clients > sampled:
        rule = (f"clients_per_round={config.clients_per_round}" if config.clients_per_round
                else f"client_fraction={config.client_fraction}")
        raise ConfigError(f"{source}: min_clients={config.min_clients} exceeds the {sampled} clients sampled per "
                          f"round ({rule} of {num_users} users)")


def round_size(num_users: int, fraction: float, count: int = 0) -> int:
    """How many clients a round samples: ``count`` (capped by the population) when set, else
    ``round(fraction * users)``, at least one. A fixed count keeps a recipe's round the same size
    when it moves from 1,000 users to 6,040."""
    if count > 0:
        return min(count, num_users)
    return max(1, int(round(fraction * num_users)))


def _check_flower(config: TrainConfig, source: str, secure_aggregation: bool) -> None:
    """Refuse what the Flower path cannot do rather than silently ignore it."""
    problems = []
    if config.attack != "none":
        problems.append(f"attack={config.attack!r} (in-process fault injection)")
    if config.client_dropout > 0:
        problems.append("client_dropout > 0 (in-process fault injection; on Flower, stop a SuperNode instead)")
    if config.cold_item_fraction > 0:
        problems.append("cold_item_fraction > 0 (the new-item protocol; in-process only for now)")
    if config.surprise_trigger:
        problems.append("surprise_trigger=true (a client's memory updated by its training must persist between "
                        "rounds and resumes on its node; in-process only for now)")
    if config.dp_enabled:
        problems.append("differential privacy (dp_noise_multiplier / dp_target_epsilon; in-process only: "
                        "`feddmmr train --set dp_...`)")
    if problems:
        raise ConfigError(f"{source}: the Flower app does not support " + "; ".join(problems)
                          + "; run it in-process with `feddmmr train`")
    if secure_aggregation and config.aggregation in ("trimmed_mean", "median"):
        raise ConfigError(f"{source}: secure_aggregation=true cannot be combined with aggregation="
                          f"{config.aggregation!r}: SecAgg+ reveals only the sum of the updates, a median or "
                          "trimmed mean needs each one; use aggregation='fedavg' (or 'fedprox') or "
                          "secure_aggregation=false")
    if secure_aggregation and config.clip_norm > 0:
        raise ConfigError(f"{source}: secure_aggregation=true cannot be combined with clip_norm > 0: the server "
                          "clips each client's update, and SecAgg+ reveals only their sum; set clip_norm=0 or "
                          "secure_aggregation=false")


def apply_overrides(config: TrainConfig, values: dict, source: str, transport: str = "in-process") -> TrainConfig:
    """Set ``values`` on ``config`` (coerced to each key's type), then validate the whole config
    (for ``transport``: see :func:`validate_config`)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown config key {key!r}")
        setattr(config, key, _coerce(key, value, source))
    return validate_config(config, source, transport=transport)


def load_preset(name_or_path: str | Path) -> TrainConfig:
    """A preset name from ``configs/`` (e.g. ``stage1_backbone``) or a TOML file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.exists():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"{path}: config not found (presets: {available})")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    config = apply_overrides(TrainConfig(), values, str(path))
    if "preset" not in values:
        config.preset = path.stem
    return config


def stage_preset(stage: int, previous_stage: int | None = None) -> str:
    """The preset a stage runs unless told otherwise: the seed's schedule, where Stage 3 after
    Stage 2 is ``stage3_moe`` and Stage 3 straight after Stage 1 is ``stage3_skip_stage2``."""
    if stage == 3:
        return "stage3_moe" if previous_stage == 2 else "stage3_skip_stage2"
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1, 2 or 3, got {stage!r}")
    return {1: "stage1_backbone", 2: "stage2_alignment"}[stage]


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out
