"""pytest-benchmark cases: one layer and one cell step per cell x impl, small shapes.

The table with ratios, GFLOP/s and the standard grid is ``benchmarks/run.py``;
these cases feed pytest-benchmark's own storage and comparison
(``pytest benchmarks/ --benchmark-autosave``, ``--benchmark-compare``).
"""

from __future__ import annotations

import pytest
import torch
from _harness import KERNEL_IMPLS, Shape, layer_flops, make_layer_case, runnable, synchronize

import fastchar.ops as ops

CELLS = ("lstm", "gru", "rnn_tanh")
SHAPES = (Shape(B=8, T=32, I=32, H=64), Shape(B=1, T=32, I=32, H=128))


def _runnable_or_skip(impl: str, device: str) -> None:
    reason = runnable(impl, device)
    if reason is not None:
        pytest.skip(f"{impl} on {device}: {reason}")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label().replace(" ", "-"))
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_layer(benchmark, bench_device, cell, impl, shape, mode):
    _runnable_or_skip(impl, bench_device)
    case = make_layer_case(cell, shape, torch.float32, bench_device)

    def call():
        result = case.forward(impl) if mode == "fwd" else case.forward_backward(impl)
        synchronize(bench_device)
        return result

    benchmark.group = f"{cell} {shape.label()} {mode}"
    benchmark.extra_info["tokens"] = shape.B * shape.T
    benchmark.extra_info["flops"] = layer_flops(cell, shape) * (1 if mode == "fwd" else 3)
    result = benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    first = result if mode == "fwd" else result[0]
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("cell", CELLS)
def test_cell_step(benchmark, bench_device, cell, impl):
    """One time step at batch 1, as sampling runs it."""
    _runnable_or_skip(impl, bench_device)
    shape = Shape(B=1, T=1, I=64, H=512)
    case = make_layer_case(cell, shape, torch.float32, bench_device)
    x, *rest = (a.detach() for a in case.args)
    x = x[0]  # [B, I]
    if cell == "lstm":
        fn = ops.lstm_cell
    elif cell == "gru":
        fn = ops.gru_cell
    else:
        fn = ops.rnn_cell
        rest.append(cell.removeprefix("rnn_"))

    def call():
        with torch.no_grad():
            h = fn(x, *rest, impl=impl)
        synchronize(bench_device)
        return h

    benchmark.group = f"{cell} cell step B1 H512"
    h = benchmark.pedantic(call, rounds=20, iterations=5, warmup_rounds=2)
    assert torch.isfinite(h[0] if isinstance(h, tuple) else h).all()
