"""Training configuration: one flat dataclass, the seed's key names, TOML presets in ``configs/``."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

STAGE_PRESETS = {
    1: "stage1_backbone",
    2: "stage2_alignment",
    3: "stage3_moe",
}


@dataclass
class TrainConfig:
    # stage and schedule
    stage: int = 1
    preset: str = "stage1_backbone"
    num_rounds: int = 20
    client_fraction: float = 0.1
    local_epochs: int = 1
    learning_rate: float = 1e-3
    batch_size: int = 64
    num_negatives: int = 100
    weight_decay: float = 0.0
    local_optimizer: str = "adam"  # adam | sgd (fresh per client and round)
    fedprox_mu: float = 0.0  # > 0: FedProx proximal term
    item_embedding_aggregation: str = "updated_rows"  # or "fedavg"
    update_negative_items: bool = True  # False: a client only moves rows of items it interacted with
    server_optimizer: str = "fedavg"  # fedavg | fedavgm | fedadam
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    trainable_groups: list[str] = field(default_factory=lambda: ["item_embedding", "backbone"])
    eval_every: int = 1
    eval_protocol: str = "sampled"  # validation protocol used to pick the best round
    eval_negatives: int = 100  # negatives per user in the sampled protocol (1 + 100)
    seed: int = 0
    # data
    top_users: int | None = 1000
    # model (seed names)
    sasrec_hidden_dim: int = 128
    sasrec_num_blocks: int = 2
    sasrec_num_heads: int = 4
    max_seq_len: int = 50
    moe_num_heads: int = 8
    dropout: float = 0.1
    gating_init: float = 0.01
    fix_gate: bool = False  # ablation: keep the gate at gating_init
    contrastive_lambda: float = 0.5
    load_balance_lambda: float = 0.01
    contrastive_temperature: float = 0.07
    # multimodal inputs and memory (SPEC §4)
    use_memory: bool = False
    use_visual: bool = True
    use_text: bool = True
    memory_top_k: int = 20
    st_window: int = 50
    lt_capacity: int = 200
    novelty_threshold: float = -1.0  # < 0: per-client quantile below
    novelty_quantile: float = 0.9
    duplicate_threshold: float = 0.74
    recency_half_life: float = 200.0
    recency_weight: float = 0.6
    st_fraction: float = 0.25
    num_prototypes: int = 5
    use_prototypes: bool = True
    num_global_prototypes: int = 10
    # differential privacy (central, user-level; see federation/privacy.py). Off unless sigma or a target epsilon is set.
    dp_noise_multiplier: float = 0.0  # sigma: noise std = sigma * dp_clip_norm on the sum of clipped updates
    dp_target_epsilon: float = 0.0  # > 0: sigma from the RDP accountant to reach this epsilon after num_rounds
    dp_clip_norm: float = 0.0  # C: L2 bound on each client's update (required in DP mode)
    dp_delta: float = 1e-4  # the delta of the reported (epsilon, delta); keep it below 1 / number of users

    @property
    def transmitted_groups(self) -> list[str]:
        """Only the groups a stage trains travel; the gate stays home when it is fixed."""
        groups = list(self.trainable_groups)
        if self.fix_gate and "gate" in groups:
            groups.remove("gate")
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
                    contrastive_temperature=self.contrastive_temperature)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _coerce(name: str, value, current):
    """Turn a TOML or ``--set`` value into the field's type, with a clear error."""
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    try:
        if isinstance(value, str) and "list" in str(kind):
            return [v for v in value.replace(" ", "").split(",") if v]
        if isinstance(value, str):
            if "bool" in str(kind):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            if "None" in str(kind) and value.lower() in ("none", "all", ""):
                return None
            if "int" in str(kind) and "float" not in str(kind):
                return int(value)
            if "float" in str(kind):
                return float(value)
            return value
        if "float" in str(kind) and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    except ValueError:
        raise ConfigError(f"config key {name!r}: cannot read {value!r} as {kind}") from None


def apply_overrides(config: TrainConfig, values: dict, source: str) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown config key {key!r}")
        setattr(config, key, _coerce(key, value, getattr(config, key)))
    return config


def check_privacy(config: TrainConfig) -> bool:
    """Validate the ``dp_*`` keys; in DP mode switch off what would leak past the noise (logged).

    Returns whether DP is on. ``updated_rows`` averaging tells the server which item rows each
    client changed, and memory prototypes travel un-noised: neither is covered by the guarantee.
    """
    for key in ("dp_noise_multiplier", "dp_target_epsilon", "dp_clip_norm"):
        value = getattr(config, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ConfigError(f"config key {key!r}: must be a finite number >= 0, got {value!r}")
    if not config.dp_enabled:
        return False
    if config.dp_noise_multiplier > 0 and config.dp_target_epsilon > 0:
        raise ConfigError("config keys 'dp_noise_multiplier' and 'dp_target_epsilon' both set: set one "
                          "(the target epsilon chooses the noise multiplier)")
    if not config.dp_clip_norm > 0:
        raise ConfigError("config key 'dp_clip_norm': DP mode needs a positive clipping norm for client updates "
                          f"(got {config.dp_clip_norm!r})")
    if not 0 < config.dp_delta < 1:
        raise ConfigError(f"config key 'dp_delta': must be in (0, 1), got {config.dp_delta!r}")
    if config.item_embedding_aggregation != "fedavg":
        log.warning("DP mode: item_embedding_aggregation %r reveals which item rows each client updated; "
                    "using plain averaging ('fedavg')", config.item_embedding_aggregation)
        config.item_embedding_aggregation = "fedavg"
    if config.use_memory and config.use_prototypes:
        log.warning("DP mode: memory prototypes would be uploaded without noise; use_prototypes set to false")
        config.use_prototypes = False
    return True


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


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out
