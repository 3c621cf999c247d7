"""Parameter groups: the units a stage trains, freezes, sends and loads (pure names, no torch)."""

from __future__ import annotations

PARAM_GROUPS = ("item_embedding", "backbone", "projectors", "experts", "router", "gate")
_GROUP_OF_PREFIX = {
    "sasrec.item_emb.": "item_embedding",
    "sasrec.": "backbone",
    "proj_visual.": "projectors",
    "proj_text.": "projectors",
    "item_content.": "projectors",  # the candidate-side content tower (content_item_side)
    "visual_expert.": "experts",
    "semantic_expert.": "experts",
    "vis_ln.": "experts",
    "sem_ln.": "experts",
    "router.": "router",
    "gating_weight": "gate",
}


def group_of(name: str) -> str:
    """The parameter group of a state-dict key (first matching prefix wins)."""
    for prefix, group in _GROUP_OF_PREFIX.items():
        if name.startswith(prefix):
            return group
    raise KeyError(f"parameter {name!r} belongs to no parameter group")
