"""Parity helpers: per-dtype tolerances (the one place they are set) and module
comparisons, on dense and PackedSequence input, that check outputs, final states and
every gradient against torch.nn.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastchar.backends
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


def skip_unless_runnable(impl: str) -> None:
    """Skip the test, saying why, where ``impl`` cannot run on CPU tensors here."""
    reason = fastchar.backends.why_not(impl, "cpu")
    if reason is not None:
        pytest.skip(reason)


def state_shapes(module, B: int) -> list[tuple[int, int, int]]:
    """The initial states' shapes [L*D, B, width] of a torch.nn-style module: h is
    proj_size wide where an LSTM has one, c (and h otherwise) hidden_size."""
    LD = module.num_layers * (2 if module.bidirectional else 1)
    H = module.hidden_size
    widths = [getattr(module, "proj_size", 0) or H] + (
        [H] if isinstance(module, torch.nn.LSTM) else []
    )
    return [(LD, B, w) for w in widths]


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
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device)
    n_states = 2 if cell == "lstm" else 1
    states = [torch.randn(s, dtype=dtype, device=device) for s in state_shapes(ours, B)]

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


def run_packed(
    cell: str,
    impl: str,
    lengths: list[int],
    dtype: torch.dtype,
    *,
    I: int = 3,
    H: int = 5,
    enforce_sorted: bool = True,
    with_state: bool = True,
    batch_first: bool = False,
    **kwargs,
):
    """Forward + backward of fastchar.nn (``impl``) and torch.nn with the same weights on
    one packed batch. Returns, per module, (output PackedSequence, [out.data, h_n, (c_n)],
    {gradient name: gradient}). The RNG is seeded the same before each forward, so
    training-mode dropout draws the same masks."""
    ours, theirs = make_pair(cell, impl, I, H, dtype, batch_first=batch_first, **kwargs)
    T, B = max(lengths), len(lengths)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    n_states = 2 if cell == "lstm" else 1
    states = [torch.randn(s, dtype=dtype) for s in state_shapes(ours, B)]

    def run(module):
        xi = x.clone().requires_grad_()
        si = [s.clone().requires_grad_() for s in states]
        packed = pack_padded_sequence(
            xi, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted
        )
        hx = None if not with_state else (tuple(si) if n_states == 2 else si[0])
        torch.manual_seed(7)
        out, hx_n = module(packed, hx)
        results = flatten_out((out.data, hx_n))
        torch.manual_seed(1)  # random weights on every output: each gradient path counts
        sum((r * torch.randn_like(r)).sum() for r in results).backward()
        grads = {"x": xi.grad}
        if with_state:
            grads.update({f"state{k}": s.grad for k, s in enumerate(si)})
        grads.update({n: p.grad for n, p in module.named_parameters()})
        return out, results, grads

    return run(ours), run(theirs)


def check_packed_parity(cell, impl, lengths, dtype, **kwargs) -> None:
    (got_out, got, got_grads), (want_out, want, want_grads) = run_packed(
        cell, impl, lengths, dtype, **kwargs
    )
    assert isinstance(got_out, PackedSequence)
    assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(got_out, name), getattr(want_out, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    for name, a, b in zip(["out", "h_n", "c_n"], got, want, strict=False):
        assert a.shape == b.shape, name
        assert_close(a, b, dtype, name)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert got_grads[name] is not None, f"no gradient for {name}"
        assert_close(got_grads[name], want_grads[name], dtype, f"grad {name}")


def _bf16_errors(module, x, ref_out, ref_grads):
    """Max abs error of the output and of each gradient against float64 results."""
    xi = x.to(next(module.parameters()).dtype).requires_grad_()
    out = module(xi)[0]
    (out.float() * ref_out["w"]).sum().backward()
    errs = {"out": (out.double() - ref_out["out"]).abs().max().item()}
    errs["x"] = (xi.grad.double() - ref_grads["x"]).abs().max().item()
    for n, p in module.named_parameters():
        errs[n] = (p.grad.double() - ref_grads[n]).abs().max().item()
    return errs


def check_bf16_within_torchs(ours, theirs, x: torch.Tensor) -> None:
    """float64 modules ``ours`` (fastchar) and ``theirs`` (torch.nn, the same weights), run in
    bfloat16 on x: our output and gradient errors against the float64 run are at most 2x
    torch's own bf16 errors (+ eps), and not zero (it did run in bf16)."""
    ref = copy.deepcopy(theirs)
    xr = x.clone().requires_grad_()
    out = ref(xr)[0]
    w = torch.randn_like(out)
    (out * w).sum().backward()
    ref_out = {"out": out.detach(), "w": w.float()}
    ref_grads = {"x": xr.grad, **{n: p.grad for n, p in ref.named_parameters()}}
    mine = _bf16_errors(ours.to(torch.bfloat16), x, ref_out, ref_grads)
    torch_bf16 = _bf16_errors(theirs.to(torch.bfloat16), x, ref_out, ref_grads)
    assert mine.keys() == torch_bf16.keys()
    for name, err in mine.items():
        assert err <= 2 * torch_bf16[name] + 1e-2, (name, err, torch_bf16[name])
        assert err > 0, f"{name}: bf16 result equals float64 exactly, so it was not bf16"
