"""Parity helpers: per-dtype tolerances (the one place they are set) and a module
comparison that checks outputs, final states and every gradient against torch.nn.
"""

from __future__ import annotations

import torch

import fastchar.nn

# Absolute and relative tolerances for outputs, states and gradients, per dtype.
# float32 leaves room for another summation order over T <= 17 steps and H <= 33
# (differences seen are ~1e-6); float64 is near round-off.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=1e-4),
}

CELLS = {
    "lstm": (fastchar.nn.LSTM, torch.nn.LSTM, {}),
    "gru": (fastchar.nn.GRU, torch.nn.GRU, {}),
    "rnn_tanh": (fastchar.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (fastchar.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
}


def assert_close(actual, expected, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=lambda m: f"{what}: {m}")


def flatten_out(result):
    """(out, h_n) or (out, (h_n, c_n)) -> [out, h_n, (c_n)]."""
    out, hx = result
    return [out, *(hx if isinstance(hx, tuple) else (hx,))]


def make_pair(cell: str, impl: str, I: int, H: int, dtype=torch.float64, **kwargs):
    """A fastchar module and its torch.nn twin holding the same weights."""
    ours_cls, theirs_cls, extra = CELLS[cell]
    ours = ours_cls(I, H, impl=impl, dtype=dtype, **extra, **kwargs)
    theirs = theirs_cls(I, H, dtype=dtype, **extra, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def check_module_parity(
    cell: str,
    impl: str,
    T: int,
    B: int,
    I: int,
    H: int,
    dtype=torch.float64,
    with_state: bool = True,
    device: str = "cpu",
    **kwargs,
) -> None:
    """Forward + backward of ``fastchar.nn`` (``impl``) vs ``torch.nn``; compares outputs,
    final states and the gradients of the input, the initial states and every parameter."""
    ours, theirs = make_pair(cell, impl, I, H, dtype, **kwargs)
    ours.to(device), theirs.to(device)
    batch_first = kwargs.get("batch_first", False)
    LD = ours.num_layers * (2 if ours.bidirectional else 1)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device)
    n_states = 2 if cell == "lstm" else 1
    states = [torch.randn(LD, B, H, dtype=dtype, device=device) for _ in range(n_states)]

    def run(module):
        xi = x.clone().requires_grad_()
        si = [s.clone().requires_grad_() for s in states]
        hx = None if not with_state else (tuple(si) if n_states == 2 else si[0])
        results = flatten_out(module(xi, hx))
        # random weights on every output so each gradient path is exercised
        torch.manual_seed(1)
        loss = sum((r * torch.randn_like(r)).sum() for r in results)
        loss.backward()
        grads = {"x": xi.grad}
        if with_state:
            grads.update({f"state{k}": s.grad for k, s in enumerate(si)})
        grads.update({n: p.grad for n, p in module.named_parameters()})
        return results, grads

    got, got_grads = run(ours)
    want, want_grads = run(theirs)
    names = ["out", "h_n", "c_n"]
    for name, a, b in zip(names[: len(want)], got, want, strict=True):
        assert_close(a, b, dtype, name)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert got_grads[name] is not None, f"no gradient for {name}"
        assert_close(got_grads[name], want_grads[name], dtype, f"grad {name}")
