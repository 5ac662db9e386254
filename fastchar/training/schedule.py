"""The learning-rate schedule: linear warm-up, then a cosine, linear or no decay to
``final_lr``, by steps or by wall time under ``--time-limit``.

Resuming with a different ``--steps`` recomputes the decay for the new total: the
learning rate continues from the new schedule's value at the saved step.
"""

from __future__ import annotations

import math

from fastchar.training.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, wall: float = 0.0, floor: float = 0.0) -> float:
    """Learning rate for optimisation step ``step`` (0-based): warm-up, then decay.

    With ``time_limit`` the decay follows ``wall`` (seconds in the training loop)
    towards the limit, or the steps towards ``steps``, whichever is further on; it is
    never behind ``floor`` (0..1: where a run that ended at its time limit had got to).
    """
    if step < cfg.warmup and floor == 0:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup, 1)
    progress = max(min((step - cfg.warmup) / span, 1.0), floor)
    if cfg.time_limit is not None:
        progress = max(progress, min(wall / cfg.time_limit, 1.0))
    if cfg.schedule == "cosine":
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        scale = 1.0 - progress
    return cfg.lr - (cfg.lr - cfg.final_lr()) * (1.0 - scale)
