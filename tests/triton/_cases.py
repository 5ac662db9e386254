"""Inputs, runners and the device/variants under test, shared by the Triton test files.

Shape letters: T time, B batch, I input, H hidden, G gates (4H / 3H / H).
Tolerances come from tests/parity.py, the one place they are set.
"""

from __future__ import annotations

import math

import torch

from fastchar import ops
from fastchar.backends import interpreter_on
from fastchar.triton._common import use_variant

# Under the interpreter the kernels run on CPU tensors; otherwise this directory is only
# collected with a CUDA device (see conftest.py).
DEVICE = "cpu" if interpreter_on() else "cuda"
# the persistent variant's grid barrier deadlocks in the interpreter, which runs
# programs one after another
VARIANTS = ("loop", "step") if DEVICE == "cpu" else ("loop", "step", "persistent")

# cell name -> (gates per unit, states, layer op, cell op, extra keyword arguments)
CELLS = {
    "lstm": (4, 2, ops.lstm, ops.lstm_cell, {}),
    "gru": (3, 1, ops.gru, ops.gru_cell, {}),
    "rnn_tanh": (1, 1, ops.rnn, ops.rnn_cell, {"nonlinearity": "tanh"}),
    "rnn_relu": (1, 1, ops.rnn, ops.rnn_cell, {"nonlinearity": "relu"}),
}
STATE_NAMES = ("h0", "c0")
OUT_NAMES = ("out", "h_n", "c_n")
# bfloat16/float16 bound: error vs a float64 reference at most this many times torch's
# own (cuDNN or oneDNN) error, plus this many ulps of the dtype
HALF_ERROR_FACTOR = 2.0
HALF_ERROR_ULPS = 4


def make_inputs(
    cell: str,
    T: int | None,
    B: int,
    I: int,
    H: int,
    dtype: torch.dtype,
    with_state: bool = True,
    bias: bool = True,
    device: str = DEVICE,
) -> dict[str, torch.Tensor | None]:
    """x [T, B, I] (or [B, I] when T is None), states [B, H], weights with torch.nn's init."""
    n_gates, n_states, *_ = CELLS[cell]
    G = n_gates * H
    kw = dict(dtype=dtype, device=device)
    bound = 1 / math.sqrt(H)

    def uniform(*shape):
        return torch.empty(*shape, **kw).uniform_(-bound, bound)

    inputs = {"x": torch.randn(*((B, I) if T is None else (T, B, I)), **kw)}
    for name in STATE_NAMES[:n_states]:
        inputs[name] = torch.randn(B, H, **kw) if with_state else None
    inputs.update(w_ih=uniform(G, I), w_hh=uniform(G, H))
    inputs.update(b_ih=uniform(G) if bias else None, b_hh=uniform(G) if bias else None)
    return inputs


def run_layer(
    cell: str, impl: str, inputs: dict, round_to: torch.dtype | None = None
) -> tuple[list[torch.Tensor], dict]:
    """Forward and backward of one layer op; returns (outputs, gradient of every input).

    The loss puts a fixed random weight on every output, so each gradient path is
    exercised; the weights are drawn in float64 and rounded to ``round_to`` (default:
    the outputs' dtype), so runs in different dtypes see the same loss.
    """
    *_, layer, _, extra = CELLS[cell]
    leaves = {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}
    results = list(layer(*leaves.values(), **extra, impl=impl))
    gen = torch.Generator(device=results[0].device).manual_seed(1)

    def weight(r):
        w = torch.randn(r.shape, generator=gen, dtype=torch.float64, device=r.device)
        return w.to(round_to or r.dtype).to(r.dtype)

    loss = sum((r * weight(r)).sum() for r in results)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return [r.detach() for r in results], grads


def run_cell(cell: str, impl: str, inputs: dict) -> list[torch.Tensor]:
    *_, step, extra = CELLS[cell]
    result = step(*inputs.values(), **extra, impl=impl)
    return list(result) if isinstance(result, tuple) else [result]


def rel_errors(got, want) -> dict[str, float]:
    """Largest error of each output and gradient relative to the largest reference value."""
    outs, grads = got
    ref_outs, ref_grads = want
    pairs = dict(zip(OUT_NAMES[: len(outs)], zip(outs, ref_outs, strict=True), strict=True))
    pairs.update({f"grad {k}": (grads[k], ref_grads[k]) for k in ref_grads})
    return {
        k: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for k, (a, b) in pairs.items()
    }


def check_error_within_torch(cell, shape, dtype, variants, device=DEVICE) -> None:
    """In a low-precision dtype, triton's error against a float64 reference on the same
    rounded inputs stays within HALF_ERROR_FACTOR x torch's own error + HALF_ERROR_ULPS,
    for every output and gradient and every launch variant."""
    inputs = make_inputs(cell, *shape, torch.float64, device=device)
    low = {k: None if v is None else v.to(dtype) for k, v in inputs.items()}
    exact = {k: None if v is None else v.double() for k, v in low.items()}
    want = run_layer(cell, "reference", exact, round_to=dtype)
    theirs = rel_errors(run_layer(cell, "torch", low), want)
    ulps = HALF_ERROR_ULPS * torch.finfo(dtype).eps
    for variant in variants:
        with use_variant(variant):
            ours = rel_errors(run_layer(cell, "triton", low), want)
        for name, err in ours.items():
            bound = HALF_ERROR_FACTOR * theirs[name] + ulps
            assert err <= bound, (
                f"{variant} {name}: error {err:.3g} > {bound:.3g} (torch {theirs[name]:.3g})"
            )
