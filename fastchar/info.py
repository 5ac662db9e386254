"""``python -m fastchar.info``: versions, and which impls can run on which device (and why not)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings

import torch

import fastchar.ops  # noqa: F401  (loads the extension and the plan's cache file)
from fastchar import __version__, plan
from fastchar.backends import IMPLS, cpp_loaded, interpreter_on, resolve, triton_version, why_not
from fastchar.training.errors import drop_closed_stderr, print_stdout

# Per-thread step GEMMs of DESIGN section 5's grid: (B, H) for an LSTM layer.
PLAN_SHAPES = ((32, 256), (64, 512), (1, 256), (8, 512))


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def _unwritable_note(directory) -> str:
    """ " (not writable: ...)" where the plan cache cannot be kept (each process then
    measures again), else ""."""
    existing = directory
    try:
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # the directory is created at the first save
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return ""
        why = "read-only" if existing.is_dir() else "no directory"
    except OSError as e:  # a parent that cannot be searched
        why = f"not accessible ({e.strerror or e})"
    return f" (not writable: {existing} is {why}; each process measures again)"


def gemm_report(measure: bool = True) -> list[str]:
    """The CPU, the step-GEMM engines it runs, and the plan (measured for the grid here)."""
    lines = [
        "[cpu gemm]",
        f"  cpu        {plan.cpu_model()} (flags: {' '.join(plan.cpu_flags()) or 'none'})",
    ]
    if not cpp_loaded():
        return lines + ["  engines    none: the C++ extension is not built"]
    for dtype in plan.DTYPES:
        name = str(dtype).removeprefix("torch.")
        for engine in plan.ENGINES:
            reason = plan.why_not(engine, dtype)
            status = "runs" if reason is None else "no: " + reason
            lines.append(f"  {name:<9}  {engine:<8} {status}")
    forced = plan.forced_report()
    lines += [f"  forced     {line}" for line in forced] or ["  plan       measured at first use"]
    if measure and not forced:
        for dtype in plan.DTYPES:
            for B, H in PLAN_SHAPES:
                steps = plan.step_shapes(4, B, H)
                for op in ("fwd", "bwd"):
                    plan.choose(dtype, *steps[op], steps["threads"])
        for dtype in plan.DTYPES:
            for K in (64, 512):  # a 2 x 512 LSTM's sampling step, batch 1
                plan.choose(dtype, "cell", 1, 2048, K)
    lines.append(f"  row blocks {plan.row_blocks() if measure else 'measured at first use'}")
    path = plan.cache_path()
    lines.append(
        f"  cache      {path}{_unwritable_note(path.parent)}"
        if path
        else "  cache      none: no home directory is known (set FASTCHAR_CACHE_DIR); "
        "each process measures again"
    )
    for e in plan.entries():
        op = {
            "nt": "h @ W^T",
            "nn": "d @ W  ",
            "cell": "x @ W^T",
            "wide_nn": "d @ W_ih",
            "wide_tn": "d^T @ h",
        }[e["op"]]
        name = str(e["dtype"]).removeprefix("torch.")
        shape = f"M={e['M']:<4} N={e['N']:<5} K={e['K']:<5}"
        lines.append(f"  {name:<9}  {op}  {shape} -> {e['engine']}")
    return lines


def report(measure_plan: bool = True) -> str:
    lines = [
        f"fastchar {__version__}",
        f"python   {platform.python_version()} ({sys.platform}, {platform.machine()})",
        f"torch    {torch.__version__} (threads: {torch.get_num_threads()})",
        f"triton   {triton_version() or 'not installed'}"
        + (" (TRITON_INTERPRET=1: interpreter)" if interpreter_on() else ""),
        "cuda     "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    for device in _devices():
        lines.append("")
        lines.append(f"[{device}]")
        for impl in IMPLS:
            if impl == "fused":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    target = resolve("fused", device)
                note = " (fallback, see below)" if target == "reference" else ""
                lines.append(f"  fused      -> {target}{note}")
                continue
            reason = why_not(impl, device)
            lines.append(f"  {impl:<10} {'available' if reason is None else 'no: ' + reason}")
    lines.append("")
    lines += gemm_report(measure_plan)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    about = "Versions, and which impls can run on which device (and why not)."
    argparse.ArgumentParser(prog="python -m fastchar.info", description=about).parse_args(argv)
    drop_closed_stderr()
    return print_stdout("fastchar.info", report())


if __name__ == "__main__":
    sys.exit(main())
