"""The device and kernel implementation a run or a sampler uses."""

from __future__ import annotations

import statistics
import warnings

import torch

from fastchar.backends import resolve, why_not
from fastchar.training.errors import ConfigError, first_line


def pick_device(name: str | torch.device) -> torch.device:
    """The device ``name`` ("auto": CUDA, else MPS, else the CPU) names; ConfigError when
    it is not one this machine has, or not one fastchar runs on."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {name}: not a device ({first_line(e)})") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}: fastchar runs on cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available")
    return device


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


def check_torch_bf16(kind: str, dtype: str, device: torch.device, model: str) -> None:
    """torch.nn's own RNNs under CPU bfloat16 autocast fail on some CPUs (its LSTM on an AMD
    EPYC Zen 3: oneDNN cannot create the primitive). Tried on a tiny input first, so that
    the run fails before its first step and before a fresh run replaces an old one's files."""
    if kind != "torch" or dtype != "bfloat16" or device.type != "cpu":
        return
    layer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[model]
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays put
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = layer(2, 2)(torch.zeros(1, 1, 2))[0]
            out.float().sum().backward()
        except RuntimeError as e:
            raise ConfigError(
                f"--impl torch --dtype bfloat16: torch's own {model.upper()} fails under "
                f"bfloat16 autocast on this CPU ({first_line(e)}); use --impl fused, or "
                "--dtype float32"
            ) from None


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


class DtypeTrial:
    """--dtype auto under a time limit, where the step GEMMs favour bfloat16: speed alone
    does not decide there, the steps it buys do. The run's first training steps are the
    trial: ``WARMUP + TIMED`` in float32, then as many in bfloat16 (the master weights are
    float32 in both, so the switch costs nothing), the last ``TIMED`` of each timed. Each
    dtype's steps by the limit are projected from the median step, capped at the run's
    steps, and bfloat16 is kept where it reaches BF16_MIN_SPEEDUP times float32's. On an
    Intel AMX VM bfloat16 trains 2.2x the steps a second, but the shakespeare preset's
    3000-step cap leaves it 1.34x float32's 2231 steps, and the two val losses tied
    (float32 1.4270, bfloat16 1.4275, the same hour); on an AMD EPYC Zen 4 bfloat16
    reached 1.76x the steps and the lower loss (1.4227 vs 1.4492). The time of
    evaluations is left out.
    """

    WARMUP = 3  # steps left untimed after a switch: packing, and the plan's first timings
    TIMED = 5
    PER_DTYPE = WARMUP + TIMED

    def __init__(self, time_limit: float, last_step: int):
        self.time_limit = time_limit
        self.last_step = last_step
        self.start = 0  # the run's step the trial starts at (Trainer.fit: a resumed run's own)
        self.times: dict[str, list[float]] = {"float32": [], "bfloat16": []}

    @classmethod
    def wanted(cls, picked: str, time_limit: float | None, last_step: int) -> bool:
        """Whether a run is worth the trial: auto picked bfloat16 by speed, under a time
        limit, with steps enough that the trial is a small part of them."""
        return picked == "bfloat16" and time_limit is not None and last_step >= 8 * cls.span()

    @classmethod
    def span(cls) -> int:
        return 2 * cls.PER_DTYPE

    def dtype_at(self, step: int) -> str:
        """The dtype of training step ``step`` (0-based) during the trial."""
        return "float32" if step - self.start < self.PER_DTYPE else "bfloat16"

    def record(self, step: int, seconds: float) -> None:
        """Step ``step``'s time, kept where it is one of a dtype's timed steps."""
        if (step - self.start) % self.PER_DTYPE >= self.WARMUP:
            self.times[self.dtype_at(step)].append(seconds)

    def done(self, steps_taken: int) -> bool:
        return steps_taken - self.start >= self.span()

    def decide(self, step: int, wall: float, seconds: dict[str, float]) -> tuple[str, str]:
        """The dtype for the rest of the run and the note that says why, from each
        dtype's seconds a step (``seconds``, the same on every rank) at ``step`` steps
        and ``wall`` seconds into the limit."""
        left = max(self.time_limit - wall, 0.0)
        reach = {
            d: min(self.last_step, step + int(left / max(t, 1e-9))) for d, t in seconds.items()
        }
        gain = reach["bfloat16"] / max(reach["float32"], 1)
        pick = "bfloat16" if gain >= BF16_MIN_SPEEDUP else "float32"
        return pick, (
            f"--dtype auto: {pick} (a step timed: bfloat16 {seconds['bfloat16']:.3f} s, float32 "
            f"{seconds['float32']:.3f} s; by the {self.time_limit:g} s limit bfloat16 reaches "
            f"{reach['bfloat16']} of {self.last_step} steps, float32 {reach['float32']}: "
            f"{gain:.2f}x; bfloat16 from {BF16_MIN_SPEEDUP}x)"
        )

    def medians(self) -> dict[str, float]:
        return {d: statistics.median(ts) for d, ts in self.times.items()}
