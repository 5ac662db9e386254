"""The device and kernel implementation a run or a sampler uses."""

from __future__ import annotations

import warnings

import torch

from fastchar.backends import resolve, why_not
from fastchar.training.errors import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available")
    return torch.device(name)


def check_impl(impl: str, device: torch.device) -> tuple[str, str | None]:
    """The impl that will run and, for a fused fallback, the note that says why."""
    if impl not in ("fused", "reference", "torch"):
        reason = why_not(impl, device.type)
        if reason is not None:
            raise ConfigError(f"--impl {impl} cannot run on {device.type}: {reason}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kind = resolve(impl, device)
    note = str(caught[0].message) if caught else None
    return kind, note
