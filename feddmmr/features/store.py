"""Saving and loading feature tables.

A feature file is a ``torch.save`` of a plain dict (tensors, str, int, float, lists, dicts) so that
``torch.load(path, weights_only=True)`` can read it without executing code::

    {"features": FloatTensor[num_items, D], "mask": BoolTensor[num_items],
     "meta": {"encoder": str, "dim": int, "coverage": int, "input_hash": str,
              "sources": {...}, "missing": [...], "seconds": float, ...}}

Row 0 (padding) and items without a feature are zero with mask False; other rows are unit-norm.
Loading validates all of this and names the file in any error, because a silently wrong table
(e.g. random or misaligned rows) would poison every later training stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.parsing import DataError
from . import TEXT_FILE, VISUAL_FILE

FORMAT_VERSION = 1
REQUIRED_META = {"encoder": str, "dim": int, "coverage": int, "input_hash": str}


class FeatureError(DataError):
    """A feature file is missing or malformed (the message names the file)."""


@dataclass
class FeatureTable:
    """One modality's item features: ``features[i]`` is item i's unit vector when ``mask[i]``."""

    features: torch.Tensor  # float32 [num_items, dim]
    mask: torch.Tensor  # bool [num_items]
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_items(self) -> int:
        return int(self.features.shape[0])

    @property
    def coverage(self) -> int:
        return int(self.mask.sum())

    def to_dict(self) -> dict:
        return {"features": self.features, "mask": self.mask, "meta": self.meta}


def save_table(table: FeatureTable, path: Path) -> None:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a file."""
    validate(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(table.to_dict(), tmp)
    os.replace(tmp, path)


def load_table(path: Path | str, num_items: int | None = None) -> FeatureTable:
    """Load and validate one feature file."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(path, "feature file not found; create it with "
                                 "'feddmmr features --data DATA --out DIR'")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors come in many types
        raise FeatureError(path, f"not a readable feature file ({_load_failure(exc)})") from None
    if not isinstance(raw, dict) or not {"features", "mask", "meta"} <= set(raw):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise FeatureError(path, f"malformed feature file: expected a dict with 'features', 'mask' and "
                                 f"'meta', found {found}")
    table = FeatureTable(raw["features"], raw["mask"], raw["meta"])
    validate(table, path)
    if num_items is not None and table.num_items != num_items:
        raise FeatureError(path, f"has {table.num_items} rows but the dataset has {num_items} item indices; "
                                 "extract the features for this dataset")
    return table


def _load_failure(exc: Exception) -> str:
    """One line for a failed ``torch.load``: torch's own message spans lines and suggests turning
    weights-only loading off, which must never be followed for a file that asks to run code."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].split())
        if "global" in reason.lower():
            return (f"{type(exc).__name__}: refused, the file holds code or objects other than tensors and plain "
                    f"data ({reason.split('. ')[0]}); never load it with weights-only loading turned off")
        return f"{type(exc).__name__}: not a torch.save file ({reason})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'unknown error'}"


def validate(table: FeatureTable, path: Path | str) -> None:
    """Shape, dtype, metadata, zero padding row and masked rows; raises FeatureError naming ``path``."""
    features, mask, meta = table.features, table.mask, table.meta

    def bad(problem: str) -> FeatureError:
        return FeatureError(path, "malformed feature file: " + problem)

    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise bad(f"'features' must be a 2-D float tensor, found "
                  f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != features.shape[:1]:
        raise bad(f"'mask' must be a bool tensor of shape [{features.shape[0]}], found "
                  f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if features.shape[0] < 1:
        raise bad("no rows (row 0 is the padding item)")
    if not isinstance(meta, dict):
        raise bad(f"'meta' must be a dict, found {type(meta).__name__}")
    for key, kind in REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise bad(f"meta[{key!r}] must be {kind.__name__}, found {meta.get(key)!r}")
    if meta["dim"] != features.shape[1]:
        raise bad(f"meta['dim'] = {meta['dim']} but features have {features.shape[1]} columns")
    if meta["coverage"] != int(mask.sum()):
        raise bad(f"meta['coverage'] = {meta['coverage']} but the mask has {int(mask.sum())} items")
    if bool(mask[0]):
        raise bad("row 0 is the padding item and must have mask False")
    if not torch.isfinite(features).all():
        row = int((~torch.isfinite(features)).any(1).nonzero()[0])
        raise bad(f"features contain NaN or infinite values (first in row {row})")
    if (features[~mask] != 0).any():
        raise bad("rows with mask False must be zero")
    norms = features[mask].norm(dim=1)
    if norms.numel() and ((norms - 1).abs() > 1e-3).any():
        raise bad("rows with mask True must be L2-normalised")


def load_features(directory: Path | str, num_items: int | None = None) -> tuple[FeatureTable, FeatureTable]:
    """``(text, visual)`` tables from a folder written by ``feddmmr features``.

    With ``num_items`` both tables must have that many rows (the dataset's item index).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FeatureError(directory, "feature folder not found; create it with "
                                      "'feddmmr features --data DATA --out DIR'")
    text = load_table(directory / TEXT_FILE, num_items)
    visual = load_table(directory / VISUAL_FILE, num_items)
    if text.num_items != visual.num_items:
        raise FeatureError(directory, f"{TEXT_FILE} has {text.num_items} rows but {VISUAL_FILE} has "
                                      f"{visual.num_items}; they were extracted for different datasets")
    return text, visual
