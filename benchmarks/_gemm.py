"""The GEMM limit beside the layer timings: how close each C++ layer runs to the best
step-GEMM engine's rate at its own per-thread step shapes, and to a large square GEMM.

For each (cell, B, H, dtype) of the layers part: every engine this CPU runs is timed at
the time loop's forward step GEMM (h @ W_hh^T slice) and backward step GEMM (dgates @
W_hh slice), with as many copies at once as the loop runs slices (fastchar.plan.rate);
the best engine per shape counts. The step-shape rate is their harmonic mean (both do
the same FLOPs per step). The square rate is torch.mm at 1024^3 with every thread, the
best a large GEMM gets on this machine in this run.
"""

from __future__ import annotations

import time

import torch

from fastchar import plan

SQUARE = 1024


def square_rate(dtype: torch.dtype, repeats: int = 5) -> float:
    a = torch.randn(SQUARE, SQUARE).to(dtype)
    b = torch.randn(SQUARE, SQUARE).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * SQUARE**3 / best / 1e9


def step_rates(n_gates: int, B: int, H: int, dtype: torch.dtype) -> dict:
    """Best engine and GFLOP/s (all slices together) at the loop's fwd and bwd step shapes."""
    steps = plan.step_shapes(n_gates, B, H)
    out = {}
    for op in ("fwd", "bwd"):
        rates = {
            e: plan.rate(e, dtype, *steps[op], steps["threads"])
            for e in plan.ENGINES
            if plan.why_not(e, dtype) is None
        }
        best = max(rates, key=rates.get)
        out[op] = {"engine": best, "gflops": rates[best], "all": rates}
    out["step_gflops"] = 2 / (1 / out["fwd"]["gflops"] + 1 / out["bwd"]["gflops"])
    return out


def bench_limits(layer_rows: list[dict], gates: dict, dtypes: dict) -> list[dict]:
    """One row per cpp layer: its fwd+bwd GFLOP/s as a fraction of the two limits."""
    rows, squares, cache = [], {}, {}
    for r in layer_rows:
        if r.get("impl") != "cpp" or "error" in r:
            continue
        dtype = dtypes[r["dtype"]]
        if r["dtype"] not in squares:
            squares[r["dtype"]] = square_rate(dtype)
        key = (gates[r["cell"]], r["B"], r["H"], r["dtype"])
        if key not in cache:
            cache[key] = step_rates(gates[r["cell"]], r["B"], r["H"], dtype)
        s = cache[key]
        rows.append(
            {k: r[k] for k in ("cell", "B", "T", "I", "H", "dtype")}
            | {
                "layer_gflops": r["gflops_fwd_bwd"],
                "fwd_engine": s["fwd"]["engine"],
                "bwd_engine": s["bwd"]["engine"],
                "fwd_step_gflops": s["fwd"]["gflops"],
                "bwd_step_gflops": s["bwd"]["gflops"],
                "step_gflops": s["step_gflops"],
                "square_gflops": squares[r["dtype"]],
                "of_step": r["gflops_fwd_bwd"] / s["step_gflops"],
                "of_square": r["gflops_fwd_bwd"] / squares[r["dtype"]],
                "engine_rates": {op: s[op]["all"] for op in ("fwd", "bwd")},
            }
        )
    return rows
