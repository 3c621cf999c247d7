"""Model layer: torch only, knows nothing of clients or servers."""

from .moe import PARAM_GROUPS, CheckpointError, UR4RecV2MoE, group_of
from .sasrec import SASRec

__all__ = ["PARAM_GROUPS", "CheckpointError", "SASRec", "UR4RecV2MoE", "group_of"]
