"""The one place a ``device`` setting (``cpu``, ``cuda``, ``auto``) becomes a ``torch.device``.

Training, evaluation, feature extraction and the Flower nodes all resolve their device here, so
``auto`` means the same everywhere and a missing GPU fails the same way: one ConfigError that
names the setting and says how to get a CUDA build of the pinned torch (the README's GPU section).
The default everywhere is ``cpu``: a run's numbers do not depend on what hardware happens to be there.
"""

from __future__ import annotations

import torch

from .config import DEVICES, ConfigError

CUDA_HELP = ("install a CUDA build of the pinned torch before the project, e.g. `pip install torch=={version} "
             "--index-url https://download.pytorch.org/whl/cu128` (README, GPU), or use device=cpu or device=auto")


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
