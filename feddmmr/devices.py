"""The one place a ``device`` setting (``cpu``, ``cuda``, ``auto``) becomes a ``torch.device``.

Training, evaluation, feature extraction and the Flower nodes all resolve their device here, so
``auto`` means the same everywhere and a missing GPU fails the same way: one ConfigError that
names the setting and says how to get a CUDA build of the pinned torch (docs/configuration.md, Devices).
The default everywhere is ``cpu``: a run's numbers do not depend on what hardware happens to be there.
"""

from __future__ import annotations

import torch

from .config import ConfigError, device_problem


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``cpu`` -> cpu; ``cuda`` -> the current CUDA GPU (ConfigError when there is none);
    ``auto`` -> cuda when one is available, else cpu. ``setting`` names the key or option in the error."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"{setting} = {name!r}: {problem}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # with its index, so that it compares equal to the device of the tensors made on it
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)
