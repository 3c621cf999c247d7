"""Process-wide settings a step may change for itself and must give back.

torch's thread count, default dtype and grad mode, and the global torch, NumPy and Python random
generators are shared by everything that runs later in the process. A step that changes one
of them for its own sake (feature extraction sizes its threads to its DataLoader workers;
loading an encoder initialises weights from the global generator) runs inside
:func:`preserved`, so what runs after it (training) does not depend on whether it ran: a
pipeline that extracts its features first trains exactly like one that finds them cached.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def snapshot() -> dict:
    """The settings :func:`preserved` restores (RNG states as copies)."""
    return {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}


def restore(saved: dict) -> None:
    if torch.get_num_threads() != saved["threads"]:
        torch.set_num_threads(saved["threads"])
    torch.set_default_dtype(saved["dtype"])
    torch.set_grad_enabled(saved["grad"])
    torch.set_rng_state(saved["torch_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["python_rng"])


@contextmanager
def preserved() -> Iterator[None]:
    """Run a step with the process-wide settings put back afterwards, also when it raises."""
    saved = snapshot()
    try:
        yield
    finally:
        restore(saved)
