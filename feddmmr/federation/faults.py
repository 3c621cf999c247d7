"""Fault injection FOR BENCHMARKS AND TESTS ONLY: turn some of a round's clients into attackers.

With ``attack != "none"`` the in-process runner replaces the updates of a seeded
``attack_fraction`` of each round's sampled clients before the server screens them, to measure
what update validation, clipping and robust aggregation withstand (``bench/robustness.py``,
``tests/test_robust_aggregation.py``). Attacks act on the update delta ``state - global``:

* ``scale``: delta x ``attack_scale`` (a boosted update);
* ``sign_flip``: delta x ``-attack_scale`` (training pushed backwards, and boosted);
* ``nan``: every value NaN (a broken or hostile client; validation must reject it).

Real runs keep the default ``attack = "none"``; nothing here runs then.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import ATTACKS
from .client import ClientUpdate

ATTACK_STREAM = 0xA77AC  # separates the attackers' draw from the client sampling's


def pick_attackers(users: np.ndarray, fraction: float, seed: int, round_number: int) -> np.ndarray:
    """The attacking users of a round: ``round(fraction * len(users))`` of them (at least one if
    ``fraction > 0``), a seeded draw reproducible from (seed, round) alone; sorted."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"attack_fraction must be in [0, 1], got {fraction}")
    users = np.asarray(users)
    if fraction == 0 or len(users) == 0:
        return users[:0]
    count = min(len(users), max(1, int(round(fraction * len(users)))))
    rng = np.random.default_rng([seed, round_number, ATTACK_STREAM])
    return np.sort(rng.choice(users, size=count, replace=False))


def attack_state(global_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor], attack: str,
                 scale: float) -> dict[str, torch.Tensor]:
    """The attacked version of one client's state (see the module docstring)."""
    if attack == "nan":
        return {key: torch.full_like(value, float("nan")) for key, value in state.items()}
    if attack == "scale":
        factor = scale
    elif attack == "sign_flip":
        factor = -scale
    else:
        raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS[1:]}")
    out = {}
    for key, value in state.items():
        reference = global_state[key].double()
        out[key] = (reference + (value.double() - reference) * factor).to(value.dtype)
    return out


def inject_attacks(updates: list[ClientUpdate], users: np.ndarray, global_state: dict[str, torch.Tensor],
                   config, round_number: int) -> tuple[list[ClientUpdate], list[int]]:
    """``updates`` (one per user, same order) with the round's attackers' states replaced; and who attacked.

    Sample counts, prototypes and metrics pass unchanged: only the model update is poisoned.
    """
    if config.attack == "none":
        return updates, []
    attackers = {int(u) for u in pick_attackers(users, config.attack_fraction, config.seed, round_number)}
    out = [dataclasses.replace(update, state=attack_state(global_state, update.state, config.attack,
                                                          config.attack_scale))
           if int(user) in attackers else update
           for user, update in zip(users, updates)]
    return out, sorted(attackers)
