"""Shared pieces of the benchmarks: layer inputs, timing, FLOP counts, environment.

Used by ``run.py`` (table / JSON / plot) and the pytest-benchmark suite, so both
time exactly the same calls. Shape letters: T time, B batch, I input, H hidden,
G gates (4H LSTM, 3H GRU, H RNN).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

import fastchar
import fastchar.ops as ops
from fastchar import plan
from fastchar.backends import cpp_loaded, interpreter_on, triton_version, why_not

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# fused is left out of the defaults: it resolves to cpp or triton, timed under their names.
KERNEL_IMPLS = ("cpp", "triton", "reference", "torch")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    I: int
    H: int

    def label(self) -> str:
        return f"B{self.B} T{self.T} I{self.I} H{self.H}"


STANDARD_GRID = (
    Shape(32, 128, 64, 256),
    Shape(64, 128, 128, 512),
    Shape(1, 256, 64, 256),
    Shape(8, 256, 64, 512),
)


def parse_ints(text: str, n: int, names: str) -> list[int]:
    """``"2,4,8"`` -> [2, 4, 8]; ValueError naming the entry unless it is n positive ints."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n or min(values) < 1:
        raise ValueError(f"{text.strip()!r} must be {n} positive integers {names}")
    return values


def parse_shapes(text: str) -> list[Shape]:
    """``"B,T,I,H;B,T,I,H"`` -> shapes; ValueError naming the bad entry."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        shapes.append(Shape(*parse_ints(part, 4, "B,T,I,H")))
    if not shapes:
        raise ValueError(f"no shapes in {text!r}")
    return shapes


def layer_flops(cell: str, s: Shape) -> int:
    """Forward FLOPs of one layer: input and recurrent GEMMs, 2*T*B*G*(I+H)."""
    return 2 * s.T * s.B * GATES[cell] * s.H * (s.I + s.H)


def fwd_bwd_flops(cell: str, s: Shape) -> int:
    """Backward does about two GEMMs per forward GEMM (data and weight gradients)."""
    return 3 * layer_flops(cell, s)


def runnable(impl: str, device_type: str) -> str | None:
    """None when ``impl`` can be benchmarked on ``device_type``, else why not."""
    if impl == "triton" and device_type == "cpu":
        return "Triton is benchmarked on CUDA only (the interpreter is a test tool, not a kernel)"
    if impl == "triton" and interpreter_on():
        return "TRITON_INTERPRET=1 is set: the interpreter's timings mean nothing"
    if impl == "fused":
        kernel = {"cpu": "cpp", "cuda": "triton"}.get(device_type)
        return why_not(kernel, device_type) if kernel else f"no fastchar kernel for {device_type}"
    return why_not(impl, device_type)


@dataclass
class LayerCase:
    """Inputs of one ``fastchar.ops`` layer call, all requiring grad as in training."""

    cell: str
    shape: Shape
    args: list[Tensor]  # x, h0 (, c0), w_ih, w_hh, b_ih, b_hh
    grad_out: Tensor  # [T, B, H]

    def forward(self, impl: str) -> Tensor:
        if self.cell == "lstm":
            return ops.lstm(*self.args, impl=impl)[0]
        if self.cell == "gru":
            return ops.gru(*self.args, impl=impl)[0]
        return ops.rnn(*self.args, self.cell.removeprefix("rnn_"), impl=impl)[0]

    def forward_backward(self, impl: str) -> list[Tensor]:
        out = self.forward(impl)  # [T, B, H]
        return list(torch.autograd.grad(out, self.args, self.grad_out))


def make_layer_case(
    cell: str, s: Shape, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> LayerCase:
    gen = torch.Generator().manual_seed(seed)
    G = GATES[cell] * s.H
    scale = s.H**-0.5

    def rand(*shape: int, std: float = 1.0) -> Tensor:
        t = torch.randn(*shape, generator=gen) * std
        return t.to(device=device, dtype=dtype).requires_grad_()

    x = rand(s.T, s.B, s.I)  # [T, B, I]
    h0 = rand(s.B, s.H, std=0.5)  # [B, H]
    c0 = rand(s.B, s.H, std=0.5) if cell == "lstm" else None  # [B, H]
    w_ih = rand(G, s.I, std=scale)  # [G, I]
    w_hh = rand(G, s.H, std=scale)  # [G, H]
    b_ih = rand(G, std=scale)  # [G]
    b_hh = rand(G, std=scale)  # [G]
    grad_out = torch.randn(s.T, s.B, s.H, generator=gen).to(device=device, dtype=dtype)
    states = [h0, c0] if cell == "lstm" else [h0]
    return LayerCase(cell, s, [x, *states, w_ih, w_hh, b_ih, b_hh], grad_out)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        if len(samples_ms) > 1:
            q = statistics.quantiles(samples_ms, n=4, method="inclusive")
        else:
            q = samples_ms * 3
        return cls(statistics.median(samples_ms), q[0], q[2], min(samples_ms), len(samples_ms))

    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms else 0.0


def error_line(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def time_interleaved(
    fns: dict[Hashable, Callable[[], object]],
    device: torch.device | str,
    *,
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
) -> tuple[dict[Hashable, Timing], dict[Hashable, str]]:
    """Wall time of each ``fns`` entry, CUDA synchronised inside each timed call.

    The calls are timed in rounds, one of each per round, so that load from
    other processes lands on every impl alike and the ratios stay fair. Each
    entry's repeat count follows its warm-up speed, so slow cases (the reference
    at large shapes) stay within ``budget_s`` yet get ``min_repeats``; its calls
    are spread evenly over the rounds. Returns (timings, errors) by name.
    """
    errors: dict[Hashable, str] = {}
    repeats: dict[Hashable, int] = {}
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            for _ in range(max(warmup, 1)):
                fn()
                synchronize(device)
        except Exception as e:
            errors[name] = error_line(e)
            continue
        per_call = (time.perf_counter() - start) / max(warmup, 1)
        repeats[name] = int(min(max_repeats, max(min_repeats, budget_s / max(per_call, 1e-9))))
    rounds = max(repeats.values(), default=0)
    samples: dict[Hashable, list[float]] = {name: [] for name in repeats}
    for r in range(rounds):
        for name, n in repeats.items():
            if name in errors or (r * n) // rounds == ((r + 1) * n) // rounds:
                continue
            try:
                synchronize(device)
                t0 = time.perf_counter()
                fns[name]()
                synchronize(device)
            except Exception as e:
                errors[name] = error_line(e)
                continue
            samples[name].append((time.perf_counter() - t0) * 1e3)
    timings = {name: Timing.of(ms) for name, ms in samples.items() if name not in errors}
    return timings, errors


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: above the core count, other jobs shared the CPU."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    """The commit of the checkout the imported fastchar package is in (the code timed,
    wherever run.py is), "-dirty" with changes; "unknown" where the package is not a
    checkout's (an install into a site-packages inside some repository included)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastchar.__file__)))
    try:
        top, sha = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if os.path.realpath(top) != os.path.realpath(root):
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def environment(device: torch.device | str, dtype: torch.dtype) -> dict:
    """What every number is recorded with: device, dtype, threads, versions, commit."""
    device = torch.device(device)
    env = {
        "device": device.type,
        "cpu": plan.cpu_model(),
        "cpu_flags": plan.cpu_flags(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "cpp_extension": cpp_loaded(),
        "fastchar_commit": git_commit(),
        "fastchar_path": os.path.dirname(os.path.abspath(fastchar.__file__)),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_start": load_average(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env
