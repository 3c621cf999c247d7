"""Loading numpy files without unpickling: the one way every ``.npy`` / ``.npz`` is read.

A ``.npy`` holding an object array, or an ``.npz`` member that is one, is a pickle: loading it
with pickling allowed runs whatever its author wrote. Everything here uses
``allow_pickle=False`` and turns numpy's refusal into an error naming the file. (Weights are
safetensors, feature tables ``torch.load(weights_only=True)``, everything else JSON.)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


class ArrayFileError(ValueError):
    """A numpy file is missing, not a numpy file, holds pickled objects or has the wrong kind of values."""


def _check(path: Path, name: str, array: np.ndarray, kind: str | None, ndim: int | None) -> np.ndarray:
    if kind is not None and array.dtype.kind not in kind:
        raise ArrayFileError(f"{path}: {name} has dtype {array.dtype}, expected kind {kind!r}")
    if ndim is not None and array.ndim != ndim:
        raise ArrayFileError(f"{path}: {name} has shape {array.shape}, expected {ndim} dimension(s)")
    return array


def load_npy(path: Path | str, kind: str | None = None, ndim: int | None = None) -> np.ndarray:
    """One array from ``path`` (never unpickled); ``kind`` (e.g. ``"f"``, ``"iu"``) and ``ndim`` are checked."""
    path = Path(path)
    if not path.is_file():
        raise ArrayFileError(f"{path}: file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
        raise ArrayFileError(f"{path}: refused, not a plain numeric array file ({exc}); pickled objects are "
                             "never loaded") from None
    except (OSError, EOFError) as exc:
        raise ArrayFileError(f"{path}: not a readable .npy file ({exc})") from None
    if not isinstance(array, np.ndarray):  # an .npz under a .npy name
        array.close()
        raise ArrayFileError(f"{path}: expected one array (.npy), found an archive (.npz)")
    return _check(path, "the array", array, kind, ndim)


def load_npz(path: Path | str, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every member of an ``.npz`` archive (never unpickled), with the ``required`` names present."""
    path = Path(path)
    if not path.is_file():
        raise ArrayFileError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:
        raise ArrayFileError(f"{path}: refused, a member is not a plain numeric array ({exc}); pickled objects "
                             "are never loaded") from None
    except (OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
        raise ArrayFileError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ArrayFileError(f"{path}: missing array(s) {missing} (found {sorted(arrays)})")
    return arrays
