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


# --dtype auto picks bfloat16 where its step GEMMs run at least this much faster than
# float32's: measured on an AMD EPYC Zen 4 (bf16 step GEMM ~2x float32, bf16 training
# 1.6x the tokens/s), the 10-minute shakespeare preset reached val 1.4279 in bfloat16
# against 1.4492 in float32 (benchmarks/RESULTS.md); without bf16 instructions the two
# rates are about equal and float32 won.
BF16_MIN_SPEEDUP = 1.5
N_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def pick_dtype(dtype: str, kind: str, device: torch.device, model: str, batch: int, hidden: int):
    """--dtype as given, or for ``auto`` the dtype this machine trains faster in, with a
    note that says why: bfloat16 on a CPU whose bf16 step GEMMs (measured by the plan at
    this model's step shapes) beat float32's by BF16_MIN_SPEEDUP, else float32."""
    if dtype != "auto":
        return dtype, None
    if device.type != "cpu" or kind != "cpp":
        return "float32", f"--dtype auto: float32 (impl {kind} on {device.type})"
    from fastchar import plan

    speedup = plan.bf16_step_speedup(N_GATES[model], batch, hidden)
    pick = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return pick, (
        f"--dtype auto: {pick} (this CPU's bfloat16 step GEMMs run {speedup:.2f}x its float32 "
        f"ones; bfloat16 from {BF16_MIN_SPEEDUP}x)"
    )
