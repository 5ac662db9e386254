"""GPU-only checks: bfloat16/float16/float32 against cuDNN with bounds tied to cuDNN's
own error, every launch variant at sizes the interpreter cannot afford (persistent
grid, several batch tiles, streamed weights), and CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from _cases import CELLS, check_error_within_torch, make_inputs
from parity import assert_close

from fastchar import ops
from fastchar.triton._common import use_variant

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# every (cell, dtype, variant, shape) is a compile of two kernels, so the half types are
# covered for LSTM in full and once for GRU and RNN
CELL_DTYPES = {
    "lstm-bf16": ("lstm", torch.bfloat16),
    "lstm-f16": ("lstm", torch.float16),
    "lstm-f32": ("lstm", torch.float32),
    "gru-bf16": ("gru", torch.bfloat16),
    "rnn_tanh-bf16": ("rnn_tanh", torch.bfloat16),
    "rnn_relu-f16": ("rnn_relu", torch.float16),
}
CASES = {  # id -> ((T, B, I, H), variants)
    "T64_B16_H48": ((64, 16, 32, 48), ("loop", "step", "persistent")),
    "T33_B70_H256": ((33, 70, 32, 256), ("step", "persistent")),
}
NAMES = ("out", "h_n", "c_n")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("cell_dtype", CELL_DTYPES.values(), ids=CELL_DTYPES.keys())
def test_error_within_cudnns(cell_dtype, case):
    """Against a float64 reference on the same rounded inputs, triton's error is within
    twice cuDNN's plus a few ulps, for every output and gradient (float32 with TF32
    off, see conftest.py)."""
    cell, dtype = cell_dtype
    shape, variants = case
    check_error_within_torch(cell, shape, dtype, variants, device="cuda")


@pytest.mark.parametrize("variant", ["step", "persistent", "loop"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_replays_in_a_cuda_graph(cell, variant):
    H = 32 if variant == "loop" else 256
    static = make_inputs(cell, 16, 8, 32, H, torch.float32, device="cuda")
    *_, layer, _, extra = CELLS[cell]
    with use_variant(variant):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile outside the capture
            layer(*static.values(), **extra, impl="triton")
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = layer(*static.values(), **extra, impl="triton")
    fresh = make_inputs(cell, 16, 8, 32, H, torch.float32, device="cuda")
    for k, v in fresh.items():
        static[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    want = layer(*fresh.values(), **extra, impl="reference")
    for name, a, b in zip(NAMES[: len(want)], got, want, strict=True):
        assert_close(a, b, torch.float32, f"graph replay {name}")


def test_fp64_runs_on_the_gpu():
    inputs = make_inputs("lstm", 5, 3, 4, 33, torch.float64, device="cuda")
    got = ops.lstm(*inputs.values(), impl="triton")
    want = ops.lstm(*inputs.values(), impl="reference")
    for name, a, b in zip(NAMES[: len(want)], got, want, strict=True):
        assert_close(a, b, torch.float64, name)
